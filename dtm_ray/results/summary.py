"""What a run prints when it ends: plain text from the run's tables."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from dtm_ray.core.state import Reference
from dtm_ray.records.schemas import STATE_SCHEMA, STATUS_OK
from dtm_ray.records.store import RunStore
from dtm_ray.results.roles import fdt_lines


def format_probe_summary(table: pa.Table, reference: Reference, n_new: int, top: int = 5) -> str:
    """Top and bottom components by FDT@75 per spec, failures and the noise floor, as text."""
    frame = table.to_pandas()
    ok = frame[frame["status"] == STATUS_OK]
    failed = frame[frame["status"] != STATUS_OK]
    prompts = reference.prefixes.shape[0]
    noisy = int((reference.noise_positions > 0).sum())
    lines = [
        f"{len(frame)} probes ({len(ok)} ok, {len(failed)} failed) over {prompts} prompts "
        f"x {n_new} tokens",
        f"noise floor: {reference.noise_floor} positions where a(F) != y, in {noisy} of "
        f"{prompts} prompts; smallest top-1/top-2 margin {_min_margin(reference):.4g}",
    ]
    columns = ["component", "fdt_at_75", "fdt_mean", "sdt_mean", "nll_mean"]
    for spec, group in ok.groupby("spec", sort=False):
        ranked = group.sort_values(["fdt_at_75", "fdt_mean"], ascending=False)[columns]
        if len(ranked) <= 2 * top:
            lines.append(f"\n{spec}: all components by FDT@75 (of {n_new})")
            lines.append(_table_text(ranked))
            continue
        lines.append(f"\n{spec}: {top} most robust by FDT@75 (of {n_new})")
        lines.append(_table_text(ranked.head(top)))
        lines.append(f"{spec}: {top} least robust")
        lines.append(_table_text(ranked.tail(top)))
    for _, row in failed.head(top).iterrows():
        lines.append(f"failed: {row['component']} {row['spec']}: {row['error']}")
    return "\n".join(lines)


def format_compression_summary(store: RunStore, final: dict[str, pa.Table]) -> str:
    """Sparsity per round and the final result against the dense model."""
    states = store.read_round_table("states", STATE_SCHEMA)
    lines = []
    if states is not None and states.num_rows:
        frame = states.to_pandas()
        frame["zeros"] = frame["sparsity"] * frame["params"]
        per_round = frame.groupby("round").agg(zeros=("zeros", "sum"), params=("params", "sum"))
        lines.append("round  sparsity")
        for round_, row in per_round.iterrows():
            lines.append(f"{round_:5d}  {row['zeros'] / row['params']:.4f}")
    s = final["summary"].to_pylist()[0]
    bits = f", {s['bits_per_param']:.2f} bits per parameter" if s.get("quantized_share") else ""
    lines += [
        f"final: sparsity {s['sparsity']:.4f} of {s['selected_params']:,} selected parameters"
        f"{bits} after {s['rounds']} round(s); vs the dense model, {s['new_tokens']} tokens:",
        *[f"  {line}" for line in fdt_lines(s)],
        f"  perplexity on the reference {s['ppl_reference']:.3f} (dense "
        f"{s['dense_ppl_reference']:.3f}); on {s['text_source']} text {s['ppl_text']:.3f} "
        f"(dense {s['dense_ppl_text']:.3f})",
    ]
    if "tasks" in final:
        from dtm_ray.results.tasks import format_run_tasks

        lines += ["lm-eval tasks, dense vs compressed:", format_run_tasks(final["tasks"])]
    return "\n".join(lines)


def _table_text(frame: Any) -> str:
    return frame.to_string(index=False, float_format="%.2f")


def _min_margin(reference: Reference) -> float:
    margin = np.asarray(reference.base_margin, dtype=np.float64)
    return float(np.nanmin(margin)) if not np.isnan(margin).all() else float("nan")
