"""FDT-guided sparsification (the DTM paper's Algorithm 1) and its baselines, as pure functions.

No Ray, no torch, no I/O: the inputs are probe results (an Arrow table or `Candidate`s) and the
current per-component sparsities; the output is a `SparsifyDecision`, the map of added sparsity
for the round.

Definitions
-----------
- A *component* is one selected linear weight with `params` p_c and current sparsity s0_c (share
  of zeros, in [0, 1]).
- Overall sparsity S = sum(p_c * s0_c) / sum(p_c), parameter-weighted over the selected components.
- A probe at *added* sparsity a on a component at s0 prunes it to absolute sparsity
  s0 + a * (1 - s0): the existing zeros are kept and a share a of the remaining weights goes.
- Step of a round: `round_step(S, target, step) = min(step, (target - S) / (1 - S))`, so the last
  step is cut to land on the target; 0 once S >= target.
- Probe points: `probe_points(t) = (t / 2, min(1, 3t / 2))` = (a_lo, a_hi).
- A component's quality curve q(a) is piecewise linear through (0, q0), (a_lo, Q_lo), (a_hi, Q_hi):
  q0 is the quality of the current model, Q the probes' statistics.
  - guide `fdt`: Q = FDT@75 of the probe (0..N); q0 = the current model's FDT@75 against the
    round's reference (N when the reference is the current model itself, possibly less when it is
    the dense model's).
  - guide `nll`: Q = -(nll_mean of the probe - base nll), minus the increase of the mean negative
    log-likelihood of the reference continuation; q0 = 0.
  - guides `fisher`, `weight_error` (the anchors' sensitivity signals, `dtm_ray.core.sensitivity`):
    Q = -score, the table's column named by the guide holding the damage score of the candidate
    (ModelOpt's gradient score, or the relative Frobenius error of the weight change); q0 = 0
    (no change, no damage). Thresholds as for `nll`.
- `largest_added(points, f)`: the largest a in [0, a_hi] with q(a) >= f, 0 when there is none.
  For points (x_i, y_i): if the last y >= f, the last x; otherwise scan the segments from right to
  left and, for the first (x1, y1)-(x2, y2) with y2 < f <= y1, return the crossing
  x1 + (x2 - x1)(y1 - f)/(y1 - y2); 0 when no segment qualifies. Scanning from the right handles
  curves that are not monotone (a component that gets better at a_hi than at a_lo).
- S(a), the overall sparsity after a map a_c: sum(p_c * (s0_c + a_c (1 - s0_c))) / sum(p_c).
  Equivalently, the mean of a_c weighted by the remaining weights p_c (1 - s0_c) is t exactly
  when S(a) = S + t (1 - S).

Algorithm (`decide_sparsify`)
-----------------------------
1. t = round_step(S, target, step); the goal of the round is G = S + t (1 - S) <= target.
2. Lower a threshold f and give every component a_c = largest_added(points_c, f), until
   S(a(f)) >= G:
   - guide `fdt`: f = N, N - 1, ..., 0 (N = `n_new`, the number of generated tokens). At f = 0
     every probed component reaches a_hi >= 3t/2, so the goal is reached unless unprobed
     components hold too much of the remaining weight.
   - guides `nll`, `fisher`, `weight_error`: f runs over the distinct values of {q0} and all
     probe qualities, in descending order; at the smallest every point of every curve is >= f,
     so each component reaches a_hi.
3. Commit a(f*) at the first threshold f* that reaches G. If S(a(f*)) overshoots the target
   (by more than 1e-9), blend with the map a_prev of the previous threshold (all zeros when f*
   was the first): a = a_prev + lam * (a(f*) - a_prev), lam = (target - S(a_prev)) /
   (S(a(f*)) - S(a_prev)). S is linear in lam, so the run lands on the target exactly. A
   non-final round may overshoot G, never the target.
4. A component without a usable probe (a probe point missing or failed) gets a = 0 ("no probe");
   a component already fully pruned (s0 >= 1) gets a = 0 ("fully pruned"). When even the lowest
   threshold does not reach G (unprobed components hold too much weight), its map is committed
   and `overall_after < goal` shows the shortfall.

`uniform_step` is the baseline: every component straight to absolute sparsity `target` (one
already at or above it is left as is, a = 0).

Reporting: `added` and `overall_after` are exact; `new_sparsity` is rounded to 6 decimals (the
spec the engines apply), so the overall sparsity of the rounded specs differs from
`overall_after` by at most 5e-7. `reasons` names, per component, why it got its value:
"threshold", "blended", "no probe", "fully pruned", "uniform", "at or above target" or
"target reached" (S >= target already: nothing to do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

GUIDES = ("fdt", "nll", "fisher", "weight_error")
# Guides whose table holds a damage score in a column named by the guide (quality = -score).
SCORE_GUIDES = ("fisher", "weight_error")
POINT_TOLERANCE = 1e-6  # a probe row's `added` matches a probe point within this
OVERSHOOT_TOLERANCE = 1e-9  # an overshoot of the target beyond this triggers the blend
# A run has reached its target when the selected components' sparsity is this close to it
# (the loop stops; the cost estimate counts its rounds the same way).
TARGET_TOLERANCE = 0.005
REACH_TOLERANCE = 1e-12  # float slack when testing S(a) >= G (sums of products are inexact)
SPARSITY_DECIMALS = 6

REASON_THRESHOLD = "threshold"
REASON_BLENDED = "blended"
REASON_NO_PROBE = "no probe"
REASON_FULLY_PRUNED = "fully pruned"
REASON_UNIFORM = "uniform"
REASON_AT_TARGET = "at or above target"
REASON_DONE = "target reached"

Points = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Candidate:
    """One component's probe results for this round."""

    component: str
    params: int
    sparsity: float  # s0, the current share of zeros
    points: Points  # ((0, q0), (a_lo, Q_lo), (a_hi, Q_hi)); empty if no usable probe


@dataclass(frozen=True)
class SparsifyDecision:
    """The committed map of one round, keyed by component (every candidate appears)."""

    added: dict[str, float]  # a_c, 0 where untouched
    new_sparsity: dict[str, float]  # s0 + a (1 - s0), rounded to 6 decimals
    quality: dict[str, float]  # q(a_c) on its curve; q0 where a = 0, NaN without a probe
    threshold: float  # f*, NaN for uniform or when no threshold was tried
    blended: bool
    overall_before: float
    overall_after: float  # exact S(a) of the map
    goal: float
    reasons: dict[str, str]


# --- validation ----------------------------------------------------------------------------------
def _check_guide(guide: str) -> None:
    if guide not in GUIDES:
        raise ValueError(
            f"unknown guide {guide!r}: expected one of {GUIDES} (use uniform_step for 'uniform')"
        )


def _check_target(target: float) -> None:
    if not 0.0 < target < 1.0:  # also rejects NaN
        raise ValueError(f"target sparsity must lie in (0, 1), got {target!r}")


def _check_step(step: float) -> None:
    if not step > 0.0:  # also rejects NaN
        raise ValueError(f"step must be > 0, got {step!r}")


def _check_component(name: str, params: int, sparsity: float) -> None:
    if not params > 0:
        raise ValueError(f"component {name!r}: params must be > 0, got {params!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"component {name!r}: sparsity must lie in [0, 1], got {sparsity!r}")


def _check_points(name: str, points: Points) -> None:
    if not points:
        return
    xs = [x for x, _ in points]
    if len(points) < 2 or xs[0] != 0.0 or any(b <= a for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError(f"component {name!r}: points must start at a = 0 with increasing a")
    if not all(math.isfinite(y) for _, y in points):
        raise ValueError(f"component {name!r}: point qualities must be finite, got {points!r}")


def _check_candidates(candidates: Sequence[Candidate]) -> None:
    if not candidates:
        raise ValueError("no candidates: the round needs at least one selected component")
    seen: set[str] = set()
    for c in candidates:
        if c.component in seen:
            raise ValueError(f"component {c.component!r} appears twice among the candidates")
        seen.add(c.component)
        _check_component(c.component, c.params, c.sparsity)
        _check_points(c.component, c.points)


# --- schedule and sparsity arithmetic ------------------------------------------------------------
def round_step(overall: float, target: float, step: float) -> float:
    """The round's relative step t: `step`, cut so that S + t (1 - S) does not pass the target."""
    _check_target(target)
    _check_step(step)
    if not 0.0 <= overall <= 1.0:
        raise ValueError(f"overall sparsity must lie in [0, 1], got {overall!r}")
    if overall >= target:
        return 0.0
    # Here overall < target < 1, so 1 - overall > 0: the branch above is the division guard.
    return min(step, (target - overall) / (1.0 - overall))


def probe_points(step: float) -> tuple[float, float]:
    """(a_lo, a_hi) = (t/2, min(1, 3t/2)): the two added sparsities probed around step t."""
    _check_step(step)
    if step > 1.0:
        raise ValueError(f"step must be <= 1 (a share of the remaining weights), got {step!r}")
    return step / 2.0, min(1.0, 1.5 * step)


def absolute_sparsity(s0: float, added: float) -> float:
    """s0 + a (1 - s0), clipped to [0, 1] and rounded to 6 decimals (the spec's precision)."""
    value = s0 + added * (1.0 - s0)
    return round(min(1.0, max(0.0, value)), SPARSITY_DECIMALS)


def overall_sparsity(params: Mapping[str, int], sparsity: Mapping[str, float]) -> float:
    """Parameter-weighted sparsity sum(p s) / sum(p) over the components of `params`."""
    if not params:
        raise ValueError("no components: overall sparsity needs at least one")
    if set(params) != set(sparsity):
        missing = sorted(set(params) ^ set(sparsity))
        raise ValueError(f"params and sparsity name different components: {missing}")
    for name, p in params.items():
        _check_component(name, p, sparsity[name])
    total = math.fsum(params.values())
    return math.fsum(p * sparsity[name] for name, p in params.items()) / total


def _overall_after(candidates: Sequence[Candidate], added: Mapping[str, float]) -> float:
    """S(a): exact (unrounded), so a blended last step lands on the target to float precision."""
    total = math.fsum(c.params for c in candidates)
    zeros = math.fsum(
        c.params * (c.sparsity + added.get(c.component, 0.0) * (1.0 - c.sparsity))
        for c in candidates
    )
    return zeros / total


# --- quality curves ------------------------------------------------------------------------------
def largest_added(points: Sequence[tuple[float, float]], f: float) -> float:
    """The largest a in [0, last x] with q(a) >= f on the piecewise-linear curve; 0 when none."""
    if not points:
        return 0.0
    if points[-1][1] >= f:
        return float(points[-1][0])
    # Right to left: the first crossing found from the right is the largest a, even when the
    # curve rises again after a dip.
    for (x1, y1), (x2, y2) in zip(points[-2::-1], points[::-1], strict=False):
        if y2 < f <= y1:
            return float(x1 + (x2 - x1) * (y1 - f) / (y1 - y2))
    return 0.0


def quality_at(points: Sequence[tuple[float, float]], added: float) -> float:
    """q(a) by linear interpolation on the curve; NaN without a curve."""
    if not points:
        return math.nan
    xs, ys = zip(*points, strict=True)
    return float(np.interp(added, xs, ys))


# --- probe table -> candidates -------------------------------------------------------------------
def _statistic_column(guide: str) -> str:
    return {"fdt": "fdt_at_75", "nll": "nll_mean"}.get(guide, guide)


def _quality(guide: str, value: float, base_nll: float) -> float:
    if guide == "fdt":
        return float(value)
    if guide == "nll":
        return -(float(value) - base_nll)
    return -float(value)  # a damage score


def _point_index(added: float | None, a_lo: float, a_hi: float) -> int | None:
    if added is None:
        return None
    if abs(added - a_lo) <= POINT_TOLERANCE:
        return 0
    if abs(added - a_hi) <= POINT_TOLERANCE:
        return 1
    return None  # a probe of another step: not this round's curve


def _probe_statistics(
    probes: pa.Table, guide: str, base_nll: float, a_lo: float, a_hi: float
) -> dict[tuple[str, int], float]:
    """(component, 0 for a_lo / 1 for a_hi) -> Q. Failed rows and missing values are skipped;
    the first ok row of a point wins, as in the store's de-duplication."""
    column = _statistic_column(guide)
    needed = ("component", "added", "status", column)
    missing = [name for name in needed if name not in probes.column_names]
    if missing:
        raise ValueError(f"probe table lacks columns {missing}")
    rows = zip(*(probes.column(name).to_pylist() for name in needed), strict=True)
    stats: dict[tuple[str, int], float] = {}
    for component, added, status, value in rows:
        index = _point_index(added, a_lo, a_hi)
        if status != "ok" or index is None or value is None or not math.isfinite(value):
            continue
        stats.setdefault((component, index), _quality(guide, value, base_nll))
    return stats


def candidates_from_table(
    probes: pa.Table,
    components: pa.Table,
    guide: str,
    base_fdt: float,
    base_nll: float,
    step: float,
) -> list[Candidate]:
    """One `Candidate` per row of `components` (component, params, sparsity), in that order.

    `probes` needs component, added, status and the guide's statistic (fdt_at_75, nll_mean, or
    the score column named by a score guide: fisher, weight_error); rows whose `added` is neither
    probe point of `step` (within 1e-6), and rows of components not in `components`, are ignored.
    A component lacking an ok probe at either point gets no points. The score guides read no base
    statistic (pass NaN).
    """
    _check_guide(guide)
    if guide not in SCORE_GUIDES:
        base = base_fdt if guide == "fdt" else base_nll
        if not math.isfinite(base):
            raise ValueError(f"guide {guide!r} needs a finite base statistic, got {base!r}")
    a_lo, a_hi = probe_points(step)
    stats = _probe_statistics(probes, guide, base_nll, a_lo, a_hi)
    q0 = float(base_fdt) if guide == "fdt" else 0.0
    names = components.column("component").to_pylist()
    if len(set(names)) != len(names):
        raise ValueError("the components table names a component twice")
    rows = zip(
        names,
        components.column("params").to_pylist(),
        components.column("sparsity").to_pylist(),
        strict=True,
    )
    out = []
    for name, params, s0 in rows:
        _check_component(name, params, s0)
        lo, hi = stats.get((name, 0)), stats.get((name, 1))
        points: Points = () if lo is None or hi is None else ((0.0, q0), (a_lo, lo), (a_hi, hi))
        out.append(Candidate(name, int(params), float(s0), points))
    return out


# --- the decision --------------------------------------------------------------------------------
def _thresholds(active: Sequence[Candidate], guide: str, n_new: int) -> list[float]:
    if guide == "fdt":
        return [float(f) for f in range(n_new, -1, -1)]
    # nll and the scores: between two consecutive candidate values the maps only move along
    # segments, and the qualities are real numbers with no natural unit to step by.
    return sorted({y for c in active for _, y in c.points}, reverse=True)


def _map_at(active: Sequence[Candidate], f: float) -> dict[str, float]:
    return {c.component: largest_added(c.points, f) for c in active}


def _blend(prev: Mapping[str, float], current: Mapping[str, float], lam: float) -> dict[str, float]:
    return {name: prev[name] + lam * (current[name] - prev[name]) for name in current}


def _reason(c: Candidate, blended: bool) -> str:
    if c.sparsity >= 1.0:
        return REASON_FULLY_PRUNED
    if not c.points:
        return REASON_NO_PROBE
    return REASON_BLENDED if blended else REASON_THRESHOLD


def _decision(
    candidates: Sequence[Candidate],
    added: Mapping[str, float],
    threshold: float,
    blended: bool,
    before: float,
    goal: float,
    done: bool = False,
) -> SparsifyDecision:
    full = {c.component: added.get(c.component, 0.0) for c in candidates}
    return SparsifyDecision(
        added=full,
        new_sparsity={
            c.component: absolute_sparsity(c.sparsity, full[c.component]) for c in candidates
        },
        quality={c.component: quality_at(c.points, full[c.component]) for c in candidates},
        threshold=threshold,
        blended=blended,
        overall_before=before,
        overall_after=_overall_after(candidates, full),
        goal=goal,
        reasons={c.component: REASON_DONE if done else _reason(c, blended) for c in candidates},
    )


def decide_sparsify(
    candidates: Sequence[Candidate], target: float, step: float, guide: str, n_new: int
) -> SparsifyDecision:
    """One round of Algorithm 1: lower the threshold until the round's goal is reached.

    `step` is the round's t; it is cut again with `round_step` (a no-op when the caller did), so
    the goal never passes the target. `n_new` (N) is the first `fdt` threshold.
    """
    _check_guide(guide)
    _check_target(target)
    _check_step(step)
    _check_candidates(candidates)
    if guide == "fdt" and not (isinstance(n_new, (int, np.integer)) and n_new >= 0):
        raise ValueError(f"n_new must be an integer >= 0 for the fdt guide, got {n_new!r}")
    before = _overall_after(candidates, {})
    t = round_step(before, target, step)
    goal = before + t * (1.0 - before)
    if t == 0.0:
        return _decision(candidates, {}, math.nan, False, before, goal, done=True)
    # Fully pruned components have no remaining weight: any a would change nothing.
    active = [c for c in candidates if c.points and c.sparsity < 1.0]
    prev: dict[str, float] = {c.component: 0.0 for c in active}
    prev_overall, threshold = before, math.nan
    for f in _thresholds(active, guide, n_new):
        current = _map_at(active, f)
        current_overall = _overall_after(candidates, current)
        if current_overall >= goal - REACH_TOLERANCE:
            if current_overall <= target + OVERSHOOT_TOLERANCE:
                return _decision(candidates, current, f, False, before, goal)
            # prev_overall < goal <= target, so the denominator is positive and lam in (0, 1].
            lam = (target - prev_overall) / (current_overall - prev_overall)
            lam = min(1.0, max(0.0, lam))
            return _decision(candidates, _blend(prev, current, lam), f, True, before, goal)
        prev, prev_overall, threshold = current, current_overall, f
    # Goal out of reach (unprobed components hold too much weight): commit the lowest threshold.
    return _decision(candidates, prev, threshold, False, before, goal)


def uniform_step(
    params: Mapping[str, int], sparsity: Mapping[str, float], target: float
) -> SparsifyDecision:
    """Baseline: every component straight to absolute sparsity `target`; one at or above stays."""
    _check_target(target)
    before = overall_sparsity(params, sparsity)  # validates params and sparsities
    candidates = [Candidate(name, params[name], sparsity[name], ()) for name in params]
    added = {
        c.component: (target - c.sparsity) / (1.0 - c.sparsity) if c.sparsity < target else 0.0
        for c in candidates
    }
    reasons = {
        c.component: REASON_UNIFORM if c.sparsity < target else REASON_AT_TARGET for c in candidates
    }
    decision = _decision(candidates, added, math.nan, False, before, target)
    return replace(decision, reasons=reasons)


__all__: list[str] = [
    "Candidate",
    "SparsifyDecision",
    "absolute_sparsity",
    "candidates_from_table",
    "decide_sparsify",
    "largest_added",
    "overall_sparsity",
    "probe_points",
    "quality_at",
    "round_step",
    "uniform_step",
]
