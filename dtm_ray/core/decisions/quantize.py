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
- guides `fisher`, `weight_error`: the damage score in the column named by the guide (ModelOpt's
  gradient score, the relative Frobenius error of the weight change; for a fused unit the sum of
  its members'), ascending, i.e. quality = -score descending; ties by fewer parameters, then name.
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

Bits budget (`average_bits`, `budget_prefix`, `budget_assignment`)
-------------------------------------------------------------------
With a budget `target_bits` (average bits per selected parameter, as `bits_per_parameter` counts
them), every unit ends at one of the levels; the last (least aggressive) level is the fallback for
all of them. The average of a partial assignment counts every still-unassigned unit at the
fallback. A more aggressive level is filled in the given order (the guide's ranking, or model
order), units taken whole, while that average is above `target_bits`, stopping as soon as it is
<= target_bits (`budget_prefix`). Alone (no quality floor) the first level is filled so, and
the rest go to the fallback (`budget_assignment`): the first level can always meet a target
at or above its own bits. With a floor, the search of each level stops adding once the budget is
met, and what it could not add ends at the fallback.

API changes against the first sketch (all additive): `rank_components` takes an optional
keyword `spec` that keeps only the probe rows of that level; `unranked_components` returns the
flags for the components ranked last; `search_step` takes an optional keyword `k` that, when
given, makes it check that `values` has exactly one value per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from dtm_ray.core.specs import spec_bits

GUIDES = ("fdt", "nll", "fisher", "weight_error")

REASON_NO_PASS = "no candidate passed"
REASON_OVER_CAP = "over the parameter cap"
FLAG_FAILED = "failed probe"
FLAG_NO_PROBE = "no probe"


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


def _statistic(guide: str) -> str:
    """The column a guide ranks by: FDT@75, the NLL, or a score guide's own column."""
    return {"fdt": "fdt_at_75", "nll": "nll_mean"}.get(guide, guide)


def _probe_rows(probes: pa.Table, guide: str, spec: str | None) -> list[dict]:
    needed = ["component", "status", "params", _statistic(guide)]
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
    statistic = _statistic(guide)
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
    return (float(row[_statistic(guide)]), int(row["params"]), row["component"])


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

    `values[i]` is the statistic that decides `candidate_sets(accepted, rest, k, params,
    max_params)[i]`: FDT@75 of the combined model, or (the driver's) the lower end of its 90 %
    interval on the validate prompts; it passes at >= min_fdt. Without
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


# --- bits budget ---------------------------------------------------------------------------------
# Averages within this of the target count as meeting it (float sums of many products).
BITS_TOLERANCE = 1e-9


def average_bits(assignment: Mapping[str, str], params: Mapping[str, int], fallback: str) -> float:
    """Parameter-weighted mean bits over the units of `params`: each at its level in
    `assignment`, every other one at `fallback`."""
    extra = sorted(set(assignment) - set(params))
    if extra:
        raise ValueError(f"assignment names units not in params: {extra}")
    full = {name: assignment.get(name, fallback) for name in params}
    return bits_per_parameter(full, params, 1)


def _check_target(target_bits: float) -> None:
    if isinstance(target_bits, bool) or not target_bits > 0:  # also rejects NaN
        raise ValueError(f"target_bits must be > 0, got {target_bits!r}")


def budget_met(
    assignment: Mapping[str, str], params: Mapping[str, int], fallback: str, target_bits: float
) -> bool:
    """Whether the average bits, unassigned units at `fallback`, is <= target_bits."""
    _check_target(target_bits)
    return average_bits(assignment, params, fallback) <= target_bits + BITS_TOLERANCE


def budget_prefix(
    order: Sequence[str],
    params: Mapping[str, int],
    level: str,
    fallback: str,
    target_bits: float,
    assignment: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The units of `order` to put at `level`: taken whole, in order, while the average bits
    (`assignment`'s units at their levels, every other unit of `params` at `fallback`) is above
    `target_bits`; it stops as soon as the average is <= target_bits, so the result is empty
    when it already is. It may end above the target when `order` runs out.

    Every unit of `order` must be in `params` and not in `assignment`."""
    _check_target(target_bits)
    _check_unique(order, "order")
    _check_params(params, order)
    assignment = dict(assignment or {})
    taken = sorted(set(order) & set(assignment))
    if taken:
        raise ValueError(f"order names units that already have a level: {taken}")
    total = math.fsum(params.values())
    bits = average_bits(assignment, params, fallback) * total
    step = spec_bits(level) - spec_bits(fallback)
    out: list[str] = []
    for name in order:
        if bits <= (target_bits + BITS_TOLERANCE) * total:
            break
        out.append(name)
        bits += params[name] * step
    return tuple(out)


def budget_assignment(
    order: Sequence[str], params: Mapping[str, int], levels: Sequence[str], target_bits: float
) -> dict[str, str]:
    """A bits budget alone: every unit of `params` at one of `levels` (most aggressive first).
    The more aggressive levels are filled in `order` (`budget_prefix`, each over the units the
    earlier ones left) while the average is above target_bits; every other unit goes to the
    last level, the fallback. `order` must name every unit of `params` once."""
    if not levels:
        raise ValueError("levels must name at least one precision")
    _check_unique(order, "order")
    if set(order) != set(params):
        raise ValueError("order must name every unit of params once")
    fallback = levels[-1]
    assignment: dict[str, str] = {}
    for level in levels[:-1]:
        rest = [name for name in order if name not in assignment]
        for name in budget_prefix(rest, params, level, fallback, target_bits, assignment):
            assignment[name] = level
    return {name: assignment.get(name, fallback) for name in order}


__all__: list[str] = [
    "SearchStep",
    "average_bits",
    "budget_assignment",
    "budget_met",
    "budget_prefix",
    "bits_per_parameter",
    "candidate_sets",
    "rank_components",
    "search_level",
    "search_step",
    "spec_bits",
    "uniform_assignment",
    "unranked_components",
]
