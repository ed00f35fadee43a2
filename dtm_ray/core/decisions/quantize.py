"""FDT-guided mixed-precision quantization (a greedy search per precision level) and its
baseline, as pure functions.

No Ray, no torch, no I/O: the inputs are a probe table (Arrow), component names, parameter counts
and the FDT@75 values the caller measured for combined models; the outputs are plain tuples and
rows that the caller persists.

Definitions
-----------
- A *component* is one selected linear weight with `params` p_c (a positive integer).
- A *level* is one precision spec, e.g. "int4-g64" or "int8". Levels are searched one at a time,
  most aggressive first (e.g. ["int4-g64", "int8"]); the components accepted at a level are removed
  from the candidates of the next level, so each component gets at most one level. The
  candidate sets of a level name only that level's components; the combined model the caller
  builds and measures for a candidate also holds the assignment of the earlier levels.
- A *combined model* is the dense model with a whole set of components quantized at the level.
  Its quality is FDT@75 (section 1 of the design brief: with the P per-prompt values sorted
  ascending, `sorted(fdt)[P - ceil(0.75 P)]`) measured by the caller against the dense model.

Ranking (`rank_components`)
---------------------------
Every still-unassigned selected component was probed alone at the level; the probe table has
columns component, spec, fdt_at_75, fdt_mean, nll_mean, params, status (`spec` is only read when
the caller passes `spec=` to keep the rows of one level). A row counts when status == "ok" and the
guide's statistic is a finite number; the first such row of a component wins (as in the store's
de-duplication); rows of components not asked for are ignored.
- guide `fdt`: FDT@75 descending; ties by fdt_mean descending (a missing fdt_mean ranks after any
  number), then fewer parameters first, then component name. The order is total and deterministic.
- guide `nll`: nll_mean ascending (less damage first); ties by fewer parameters, then name.
- Components with only failed probes, or with no probe (or no usable statistic) at this level, go
  last, in name order. `unranked_components` names them with the reason ("failed probe" or
  "no probe") so the caller can report them; they stay in the ranking, so the search may still
  try them.

Search state and one search round (`candidate_sets`, `search_step`)
-------------------------------------------------------------------
The state of a level search is the accepted set S (ordered tuple), the ranked rest R (tuple) and
the skipped components (tuple); they are disjoint.
- Candidates: the combined models S + R[:1], ..., S + R[:k], with k the number of engine actors,
  fewer when R is shorter. With an optional cap `max_params` (the caller derives it from
  `max_params_share` times the selected parameters), a candidate whose total parameters
  sum(p_c for c in S + R[:i]) exceed the cap is not evaluated. Parameters are positive, so the
  totals grow with i and the evaluated candidates are always a prefix of the list.
- The caller measures FDT@75 of each candidate against the dense model and hands the values back
  in candidate order (`values[i]` belongs to `candidate_sets(...)[i]`, i.e. to S + R[:i + 1]).
  A NaN value (a failed evaluation) never passes.
- Step rule: accept the *longest evaluated prefix that passes*, i.e. the largest i with
  values[i - 1] >= min_fdt. Passing need not be contiguous: when S + R[:1] fails but S + R[:2]
  passes, both R[0] and R[1] are accepted (the value of S + R[:2] is what the accepted model is;
  the failed shorter candidate does not matter). S grows by R[:i] and R loses them.
- Backtracking: when no evaluated candidate passes, R[0] moves to `skipped` (reason
  "no candidate passed") and the search goes on with R[1:]. When even S + R[:1] exceeds the cap,
  nothing is evaluated and R[0] is skipped with reason "over the parameter cap": a later, smaller
  component may still fit, so the search continues.
- Each step either accepts at least one component or skips one, so a level ends (R empty) after at
  most len(ranked) steps. `search_level` runs the whole loop with an `evaluate` callback (for tests
  and small runs); the driver calls `search_step` itself so each step is persisted and resumable.
- Every step reports rows: one per evaluated candidate,
  {"size": i, "added": R[i - 1], "fdt_at_75": v, "passed": v >= min_fdt, "chosen": i == taken},
  plus one {"skipped": R[0], "reason": ...} row when the head was skipped.

Baseline (`uniform_assignment`)
-------------------------------
No FDT used: take components in the given (model) order while the running total of parameters
stays <= max_params (all of them when max_params is None). It stops at the first component that
does not fit: the result is a prefix of the order (unlike the search, which skips an over-cap
component and goes on with smaller ones).

Bits per parameter (`bits_per_parameter`)
-----------------------------------------
The parameter-weighted mean storage cost over the components of `params`:
"int8" and "int8-tensor" -> 8, "fp8-e4m3" -> 8, "int4-gG" -> 4 + 16/G (one fp16 scale per group of
G weights), unassigned -> `dense_bits`. The per-row scales of int8 and fp8 (one fp16 per row of
in_features weights, i.e. 16/in_features bits, 0.03 at 576 inputs) and the per-tensor scale of
int8-tensor are ignored as negligible.

API changes against the first sketch (all additive): `rank_components` takes an optional
keyword `spec` that keeps only the probe rows of that level; `unranked_components` returns the
flags for the components ranked last; `search_step` takes an optional keyword `k` that, when
given, makes it check that `values` has exactly one value per candidate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

GUIDES = ("fdt", "nll")

REASON_NO_PASS = "no candidate passed"
REASON_OVER_CAP = "over the parameter cap"
FLAG_FAILED = "failed probe"
FLAG_NO_PROBE = "no probe"

FP16_SCALE_BITS = 16  # one fp16 scale per int4 group


# --- validation ----------------------------------------------------------------------------------
def _check_guide(guide: str) -> None:
    if guide not in GUIDES:
        raise ValueError(
            f"unknown guide {guide!r}: expected one of {GUIDES} "
            "(use uniform_assignment for 'uniform')"
        )


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of engine actors) must be an integer >= 1, got {k!r}")


def _check_min_fdt(min_fdt: float) -> None:
    if not min_fdt >= 0.0:  # also rejects NaN
        raise ValueError(f"min_fdt must be >= 0, got {min_fdt!r}")


def _check_max_params(max_params: int | None) -> None:
    if max_params is not None and not max_params >= 0:
        raise ValueError(f"max_params must be >= 0 or None, got {max_params!r}")


def _check_unique(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} names component {name!r} twice")
        seen.add(name)


def _check_params(params: Mapping[str, int], names: Sequence[str]) -> None:
    missing = [name for name in names if name not in params]
    if missing:
        raise ValueError(f"params lacks components {missing}")
    for name in names:
        p = params[name]
        if isinstance(p, bool) or not p > 0:
            raise ValueError(f"component {name!r}: params must be > 0, got {p!r}")


def _check_state(accepted: Sequence[str], rest: Sequence[str], skipped: Sequence[str]) -> None:
    _check_unique([*accepted, *rest, *skipped], "the search state (accepted, rest, skipped)")


# --- ranking -------------------------------------------------------------------------------------
def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _probe_rows(probes: pa.Table, guide: str, spec: str | None) -> list[dict]:
    needed = ["component", "status", "params", "fdt_at_75" if guide == "fdt" else "nll_mean"]
    if guide == "fdt" and "fdt_mean" in probes.column_names:
        needed.append("fdt_mean")
    if spec is not None:
        needed.append("spec")
    missing = [name for name in needed if name not in probes.column_names]
    if missing:
        raise ValueError(f"probe table lacks columns {missing}")
    rows = probes.select(needed).to_pylist()
    return rows if spec is None else [row for row in rows if row["spec"] == spec]


def _classify(
    probes: pa.Table, components: Sequence[str], guide: str, spec: str | None
) -> tuple[dict[str, dict], dict[str, str]]:
    """(usable row per component, flag per component without one)."""
    _check_guide(guide)
    _check_unique(components, "components")
    statistic = "fdt_at_75" if guide == "fdt" else "nll_mean"
    wanted = set(components)
    usable: dict[str, dict] = {}
    failed: set[str] = set()
    for row in _probe_rows(probes, guide, spec):
        name = row["component"]
        if name not in wanted or name in usable:
            continue
        if row["status"] == "ok" and _finite(row[statistic]):
            p = row["params"]
            if p is None or not p > 0:
                raise ValueError(f"component {name!r}: probe params must be > 0, got {p!r}")
            usable[name] = row
        else:
            failed.add(name)
    flags = {
        name: FLAG_FAILED if name in failed else FLAG_NO_PROBE
        for name in sorted(wanted - set(usable))
    }
    return usable, flags


def _rank_key(row: dict, guide: str) -> tuple:
    if guide == "fdt":
        mean = row.get("fdt_mean")
        mean_key = -float(mean) if _finite(mean) else math.inf  # missing: after any number
        return (-float(row["fdt_at_75"]), mean_key, int(row["params"]), row["component"])
    return (float(row["nll_mean"]), int(row["params"]), row["component"])


def rank_components(
    probes: pa.Table, components: Sequence[str], guide: str, *, spec: str | None = None
) -> list[str]:
    """The components, best first: ranked by the guide's statistic, then the unranked ones.

    `spec`, when given, keeps only the probe rows of that level. See the module docstring for
    the tie-breaks; `unranked_components` names the components placed last and why.
    """
    usable, flags = _classify(probes, components, guide, spec)
    ranked = sorted(usable.values(), key=lambda row: _rank_key(row, guide))
    return [row["component"] for row in ranked] + list(flags)


def unranked_components(
    probes: pa.Table, components: Sequence[str], guide: str, *, spec: str | None = None
) -> dict[str, str]:
    """Component -> "failed probe" | "no probe" for those `rank_components` puts last (name order).

    "failed probe": it has rows, none of them ok with a finite statistic; "no probe": no row.
    """
    return _classify(probes, components, guide, spec)[1]


# --- one search round ----------------------------------------------------------------------------
def _total(names: Sequence[str], params: Mapping[str, int]) -> int:
    return sum(int(params[name]) for name in names)


def candidate_sets(
    accepted: Sequence[str],
    rest: Sequence[str],
    k: int,
    params: Mapping[str, int] | None = None,
    max_params: int | None = None,
) -> list[tuple[str, ...]]:
    """The combined models S + R[:1], ..., S + R[:m] to evaluate this round.

    m = min(k, len(R)), cut further so that no candidate's total parameters exceed `max_params`
    (which needs `params`). Empty when R is empty or when S + R[:1] is already over the cap.
    """
    _check_k(k)
    _check_max_params(max_params)
    _check_unique([*accepted, *rest], "accepted and rest")
    accepted, rest = tuple(accepted), tuple(rest)
    sizes: Mapping[str, int] = {}
    total = 0
    if max_params is not None:
        if params is None:
            raise ValueError("max_params needs params (the parameter count of every component)")
        _check_params(params, [*accepted, *rest])
        sizes = params
        total = _total(accepted, params)
        if total > max_params:
            raise ValueError(
                f"the accepted set already holds {total} parameters, over max_params={max_params}"
            )
    out: list[tuple[str, ...]] = []
    for i in range(1, min(k, len(rest)) + 1):
        if max_params is not None:
            total += int(sizes[rest[i - 1]])
            if total > max_params:
                break  # params > 0: every longer prefix is over the cap too
        out.append(accepted + rest[:i])
    return out


@dataclass(frozen=True)
class SearchStep:
    """The state after one search round, and what the round saw."""

    accepted: tuple[str, ...]
    rest: tuple[str, ...]
    skipped: tuple[str, ...]
    taken: int  # how many of the old rest were accepted (0: the head was skipped)
    rows: list[dict] = field(default_factory=list)  # see the module docstring


def search_step(
    accepted: Sequence[str],
    rest: Sequence[str],
    skipped: Sequence[str],
    values: Sequence[float],
    min_fdt: float,
    params: Mapping[str, int] | None = None,
    max_params: int | None = None,
    *,
    k: int | None = None,
) -> SearchStep:
    """Apply one round's measured values: accept the longest passing prefix, or skip R[0].

    `values[i]` is FDT@75 of `candidate_sets(accepted, rest, k, params, max_params)[i]`. Without
    `k`, `values` may hold fewer values than actors (R shorter, or the cap) but no more than the
    candidates the cap allows, and at least one unless even S + R[:1] is over the cap; with `k`,
    it must hold exactly one value per candidate.
    """
    _check_min_fdt(min_fdt)
    _check_state(accepted, rest, skipped)
    accepted, rest, skipped = tuple(accepted), tuple(rest), tuple(skipped)
    if not rest:
        raise ValueError("nothing to search: the ranked rest is empty (the level has ended)")
    values = [float(v) for v in values]
    # The candidates the rule allows: with k, exactly those; without it, as many as R and the cap
    # allow (k = len(rest) is never the binding limit then).
    allowed = candidate_sets(accepted, rest, len(rest) if k is None else k, params, max_params)
    if k is not None and len(values) != len(allowed):
        raise ValueError(f"expected {len(allowed)} values (one per candidate), got {len(values)}")
    if len(values) > len(allowed):
        raise ValueError(
            f"got {len(values)} values but only {len(allowed)} candidates fit "
            f"(rest has {len(rest)}, max_params={max_params})"
        )
    if allowed and not values:
        raise ValueError("no values: S + R[:1] fits, so at least one candidate must be evaluated")

    passed = [v >= min_fdt for v in values]  # NaN compares False: a failed evaluation fails
    taken = max((i + 1 for i, ok in enumerate(passed) if ok), default=0)
    rows: list[dict] = [
        {
            "size": i + 1,
            "added": rest[i],
            "fdt_at_75": v,
            "passed": ok,
            "chosen": i + 1 == taken,
        }
        for i, (v, ok) in enumerate(zip(values, passed, strict=True))
    ]
    if taken:
        return SearchStep(accepted + rest[:taken], rest[taken:], skipped, taken, rows)
    reason = REASON_NO_PASS if values else REASON_OVER_CAP
    rows.append({"skipped": rest[0], "reason": reason})
    return SearchStep(accepted, rest[1:], skipped + rest[:1], 0, rows)


def search_level(
    ranked: Sequence[str],
    evaluate: Callable[[list[tuple[str, ...]]], list[float]],
    k: int,
    min_fdt: float,
    params: Mapping[str, int] | None = None,
    max_params: int | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...], list[SearchStep]]:
    """The whole search of one level: (accepted, skipped, steps).

    `evaluate` gets the round's candidates and returns their FDT@75 values in order; it is not
    called when nothing fits under the cap.
    """
    _check_k(k)
    _check_min_fdt(min_fdt)
    _check_max_params(max_params)
    _check_unique(ranked, "ranked")
    accepted: tuple[str, ...] = ()
    rest = tuple(ranked)
    skipped: tuple[str, ...] = ()
    steps: list[SearchStep] = []
    while rest:
        candidates = candidate_sets(accepted, rest, k, params, max_params)
        values = list(evaluate(candidates)) if candidates else []
        step = search_step(accepted, rest, skipped, values, min_fdt, params, max_params, k=k)
        steps.append(step)
        accepted, rest, skipped = step.accepted, step.rest, step.skipped
    return accepted, skipped, steps


# --- baseline and cost ---------------------------------------------------------------------------
def uniform_assignment(
    order: Sequence[str], params: Mapping[str, int], max_params: int | None
) -> tuple[str, ...]:
    """Components in `order` while the running total stays <= max_params (all when None).

    Stops at the first component that does not fit: a prefix of `order`.
    """
    _check_unique(order, "order")
    _check_params(params, order)
    _check_max_params(max_params)
    if max_params is None:
        return tuple(order)
    out: list[str] = []
    total = 0
    for name in order:
        total += int(params[name])
        if total > max_params:
            break
        out.append(name)
    return tuple(out)


def spec_bits(spec: str) -> float:
    """Storage bits per weight of a quantization spec (scales of int8 / fp8 rows ignored)."""
    text = spec.strip().lower()
    if text in ("int8", "int8-tensor", "fp8-e4m3"):
        return 8.0
    group = re.fullmatch(r"int4-g(\d+)", text)
    if group and int(group[1]) >= 1:
        return 4.0 + FP16_SCALE_BITS / int(group[1])
    raise ValueError(
        f"unknown quantization spec {spec!r}: expected int8, int8-tensor, int4-gG or fp8-e4m3"
    )


def bits_per_parameter(
    assignment: Mapping[str, str], params: Mapping[str, int], dense_bits: int
) -> float:
    """Parameter-weighted mean bits per weight over the components of `params`.

    Components of `params` missing from `assignment` cost `dense_bits`.
    """
    if isinstance(dense_bits, bool) or not dense_bits > 0:
        raise ValueError(f"dense_bits must be > 0, got {dense_bits!r}")
    if not params:
        raise ValueError("no components: bits per parameter needs at least one")
    extra = sorted(set(assignment) - set(params))
    if extra:
        raise ValueError(f"assignment names components not in params: {extra}")
    names = list(params)
    _check_params(params, names)
    total = math.fsum(params.values())
    bits = math.fsum(
        params[name] * (spec_bits(assignment[name]) if name in assignment else dense_bits)
        for name in names
    )
    return bits / total


__all__: list[str] = [
    "SearchStep",
    "bits_per_parameter",
    "candidate_sets",
    "rank_components",
    "search_level",
    "search_step",
    "spec_bits",
    "uniform_assignment",
    "unranked_components",
]
