"""The numbers `final/summary` holds per prompt role, test first: one home for how `show`, the
report, the end-of-run summary and the export quote them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _known(value: Any) -> bool:
    """A number a summary holds (null columns of older runs read as None, or NaN in pandas)."""
    return value is not None and not (isinstance(value, float) and np.isnan(value))


# How final/ names each role's prompts, in the order it quotes them.
ROLE_LABELS = {
    "test": "test prompts (held out: no decision read them)",
    "validate": "validate prompts (the floors and the search checked them)",
    "decide": "decide prompts (in-sample: the rounds probed them)",
}


def role_numbers(s: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(role, its numbers) for each role `final/summary`'s row `s` holds, test first; the
    numbers under the names of the decide role's columns (prompts, fdt_at_75, ...)."""
    names = ("prompts", "fdt_at_75", "fdt_at_75_low", "fdt_at_75_high", "fdt_mean", "sdt_share")
    out = []
    for role in ("test", "validate"):
        numbers = {name: s.get(f"{role}_{name}") for name in names}
        if _known(numbers["fdt_at_75"]):
            out.append((role, numbers))
    out.append(("decide", {name: s.get(name) for name in names}))
    return out


def fdt_line(numbers: Mapping[str, Any]) -> str:
    """FDT@75 (90% CI), mean FDT and SDT share of one role, as text."""
    return (
        f"FDT@75 {int(numbers['fdt_at_75'])} (90% CI {int(numbers['fdt_at_75_low'])}-"
        f"{int(numbers['fdt_at_75_high'])}), mean FDT {numbers['fdt_mean']:.2f}, SDT share "
        f"{numbers['sdt_share']:.3f}"
    )


def fdt_lines(s: Mapping[str, Any]) -> list[str]:
    """One line per role of a `final/summary` row, test first; a run from before the roles
    has the decide prompts only, then said plainly."""
    roles = role_numbers(s)
    if len(roles) == 1:
        numbers = roles[0][1]
        return [
            f"on {int(numbers['prompts'])} prompts (the ones the rounds probed: in-sample): "
            f"{fdt_line(numbers)}"
        ]
    return [f"on {int(n['prompts'])} {ROLE_LABELS[role]}: {fdt_line(n)}" for role, n in roles]
