"""Sparsify decisions on hand-made curves: every expected value is worked out in a comment."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from dtm_ray.core.decisions.sparsify import (
    Candidate,
    absolute_sparsity,
    candidates_from_table,
    decide_sparsify,
    largest_added,
    overall_sparsity,
    probe_points,
    quality_at,
    round_step,
    uniform_step,
)

# Probe points of t = 0.1 are (0.05, 0.15); of t = 0.2 they are (0.1, 0.3).
X_01 = (0.0, 0.05, 0.15)
X_02 = (0.0, 0.1, 0.3)


def _cand(name: str, params: int, s0: float, ys: tuple[float, ...], xs=X_01) -> Candidate:
    points = tuple(zip(xs, ys, strict=True)) if ys else ()
    return Candidate(name, params, s0, points)


# --- schedule arithmetic -------------------------------------------------------------------------
def test_round_step_cuts_the_last_step() -> None:
    # S = 0: (0.5 - 0) / 1 = 0.5 > 0.2, so the full step 0.2.
    assert round_step(0.0, 0.5, 0.2) == pytest.approx(0.2)
    # S = 0.36: (0.5 - 0.36) / 0.64 = 0.21875 > 0.2, still the full step.
    assert round_step(0.36, 0.5, 0.2) == pytest.approx(0.2)
    # S = 0.4: (0.5 - 0.4) / 0.6 = 1/6 < 0.2, cut so that 0.4 + (1/6) * 0.6 = 0.5.
    assert round_step(0.4, 0.5, 0.2) == pytest.approx(1 / 6)
    # S = 0.5 = target and S = 0.6 > target: nothing left to do.
    assert round_step(0.5, 0.5, 0.2) == 0.0
    assert round_step(0.6, 0.5, 0.2) == 0.0
    # S = 1: 1 - S = 0 must not divide; S >= target gives 0.
    assert round_step(1.0, 0.5, 0.2) == 0.0


def test_probe_points_halve_and_one_and_a_half_the_step() -> None:
    # t = 0.2: (0.2 / 2, 3 * 0.2 / 2) = (0.1, 0.3).
    assert probe_points(0.2) == pytest.approx((0.1, 0.3))
    # t = 0.8: 3 * 0.8 / 2 = 1.2, clipped to 1.
    assert probe_points(0.8) == pytest.approx((0.4, 1.0))


def test_absolute_sparsity_keeps_existing_zeros() -> None:
    # 0.2 + 0.2 * (1 - 0.2) = 0.36.
    assert absolute_sparsity(0.2, 0.2) == pytest.approx(0.36, abs=1e-12)
    # 0.1 + (1/3) * 0.9 = 0.4.
    assert absolute_sparsity(0.1, 1 / 3) == pytest.approx(0.4, abs=1e-12)
    # 0.5 + 1 * 0.5 = 1.
    assert absolute_sparsity(0.5, 1.0) == 1.0
    # Rounded to 6 decimals: 0.1234567 -> 0.123457.
    assert absolute_sparsity(0.0, 0.1234567) == 0.123457


def test_overall_sparsity_is_parameter_weighted() -> None:
    # (100 * 0.5 + 300 * 0.1) / 400 = 80 / 400 = 0.2 (the unweighted mean would be 0.3).
    assert overall_sparsity({"a": 100, "b": 300}, {"a": 0.5, "b": 0.1}) == pytest.approx(0.2)


# --- quality curves ------------------------------------------------------------------------------
def test_largest_added_interpolates_on_each_segment() -> None:
    points = ((0.0, 10.0), (0.05, 6.0), (0.15, 2.0))
    # Last y = 2 >= f = 2 and f = 1: the whole probed range, a_hi = 0.15.
    assert largest_added(points, 2.0) == pytest.approx(0.15)
    assert largest_added(points, 1.0) == pytest.approx(0.15)
    # f = 4 on the second segment: 0.05 + 0.1 * (6 - 4) / (6 - 2) = 0.10.
    assert largest_added(points, 4.0) == pytest.approx(0.10)
    # f = 6 is the middle point: 0.05 + 0.1 * 0 / 4 = 0.05.
    assert largest_added(points, 6.0) == pytest.approx(0.05)
    # f = 8 on the first segment: 0 + 0.05 * (10 - 8) / (10 - 6) = 0.025.
    assert largest_added(points, 8.0) == pytest.approx(0.025)
    # f = 10 = q0: the crossing is at a = 0; f = 11 is above the whole curve: 0.
    assert largest_added(points, 10.0) == 0.0
    assert largest_added(points, 11.0) == 0.0
    # No curve: 0.
    assert largest_added((), 0.0) == 0.0


def test_quality_at_interpolates() -> None:
    points = ((0.0, 10.0), (0.05, 6.0), (0.15, 2.0))
    # a = 0.10: halfway along (0.05, 6)-(0.15, 2): 6 + 0.5 * (2 - 6) = 4.
    assert quality_at(points, 0.10) == pytest.approx(4.0)
    # a = 0.025: halfway along (0, 10)-(0.05, 6): 8.
    assert quality_at(points, 0.025) == pytest.approx(8.0)
    # No curve: NaN.
    assert math.isnan(quality_at((), 0.0))


def test_largest_added_on_non_monotone_curves() -> None:
    dip = ((0.0, 64.0), (0.05, 10.0), (0.15, 40.0))
    # f = 30: the last y = 40 >= 30, so a_hi = 0.15 although q dips to 10 at 0.05.
    assert largest_added(dip, 30.0) == pytest.approx(0.15)
    # f = 50: the second segment (10 -> 40) never reaches 50; the first crosses at
    # 0.05 * (64 - 50) / (64 - 10) = 0.05 * 14 / 54 = 0.0129629...
    assert largest_added(dip, 50.0) == pytest.approx(0.05 * 14 / 54)
    bump = ((0.0, 5.0), (0.05, 8.0), (0.15, 2.0))
    # f = 6 above q0 = 5: crossing on the falling segment, 0.05 + 0.1 * (8 - 6) / (8 - 2) = 0.08333.
    assert largest_added(bump, 6.0) == pytest.approx(0.05 + 0.1 / 3)
    # f = 5: 0.05 + 0.1 * (8 - 5) / 6 = 0.1.
    assert largest_added(bump, 5.0) == pytest.approx(0.1)
    # f = 9 above the peak: 0.
    assert largest_added(bump, 9.0) == 0.0
    # Two falling crossings (four points): the right one counts, 0.2 + 0.1 * (8 - 5) / 8 = 0.2375,
    # not the left one at 0.1 * (10 - 5) / 8 = 0.0625.
    zigzag = ((0.0, 10.0), (0.1, 2.0), (0.2, 8.0), (0.3, 0.0))
    assert largest_added(zigzag, 5.0) == pytest.approx(0.2375)


# --- the fdt guide -------------------------------------------------------------------------------
def test_threshold_is_lowered_by_one_from_n() -> None:
    # Two equal components, S = 0, t = 0.1 (target 0.5 far away): G = 0.1, i.e. a_A + a_B >= 0.2.
    a = _cand("A", 100, 0.0, (8, 6, 2))
    b = _cand("B", 100, 0.0, (8, 8, 4))
    d = decide_sparsify([a, b], target=0.5, step=0.1, guide="fdt", n_new=8)
    # f = 8: A 0, B 0.05 (sum 0.05). f = 7: A 0.05 * 1/2 = 0.025, B 0.05 + 0.1 * 1/4 = 0.075
    # (sum 0.1). f = 6: A 0.05, B 0.05 + 0.1 * 2/4 = 0.1 (sum 0.15).
    # f = 5: A 0.05 + 0.1 * 1/4 = 0.075, B 0.05 + 0.1 * 3/4 = 0.125 (sum 0.2): G reached.
    assert d.threshold == 5.0
    assert d.added["A"] == pytest.approx(0.075)
    assert d.added["B"] == pytest.approx(0.125)
    # S(a) = (100 * 0.075 + 100 * 0.125) / 200 = 0.1 <= target: committed as is.
    assert d.overall_after == pytest.approx(0.1)
    assert d.goal == pytest.approx(0.1)
    assert d.overall_before == 0.0
    assert not d.blended
    # Both land where their curve crosses f = 5: A 6 + (2 - 6) * 0.25 = 5, B 8 - 4 * 0.75 = 5.
    assert d.quality == pytest.approx({"A": 5.0, "B": 5.0})
    assert d.new_sparsity == pytest.approx({"A": 0.075, "B": 0.125})
    assert d.reasons == {"A": "threshold", "B": "threshold"}


def test_the_bigger_component_decides_when_the_goal_is_reached() -> None:
    robust = (4, 4, 4)  # q stays at N = 4: reaches a_hi = 0.15 at f = 4
    fragile = (4, 0, 0)  # crosses f at 0.05 * (4 - f) / 4 until f = 0
    # Robust one big: f = 4 gives (300 * 0.15 + 100 * 0) / 400 = 0.1125 >= G = 0.1.
    d = decide_sparsify(
        [_cand("big", 300, 0.0, robust), _cand("small", 100, 0.0, fragile)],
        target=0.5, step=0.1, guide="fdt", n_new=4,
    )  # fmt: skip
    assert d.threshold == 4.0
    assert d.added == pytest.approx({"big": 0.15, "small": 0.0})
    assert d.overall_after == pytest.approx(0.1125)
    # Robust one small: f = 4: 100 * 0.15 / 400 = 0.0375; f = 3: (300 * 0.0125 + 15) / 400
    # = 0.046875; f = 2: (7.5 + 15) / 400 = 0.05625; f = 1: (11.25 + 15) / 400 = 0.065625;
    # f = 0: the fragile one reaches 0.15 too: (45 + 15) / 400 = 0.15 >= 0.1.
    d = decide_sparsify(
        [_cand("big", 300, 0.0, fragile), _cand("small", 100, 0.0, robust)],
        target=0.5, step=0.1, guide="fdt", n_new=4,
    )  # fmt: skip
    assert d.threshold == 0.0
    assert d.added == pytest.approx({"big": 0.15, "small": 0.15})
    assert d.overall_after == pytest.approx(0.15)


def test_last_step_is_cut_and_blended_onto_the_target() -> None:
    # S = 0.5 (both at s0 = 0.5), target 0.6, step 0.25: t = (0.6 - 0.5) / 0.5 = 0.2 < 0.25.
    assert round_step(0.5, 0.6, 0.25) == pytest.approx(0.2)
    # Probes at (0.1, 0.3); equal remaining weights, so S(a) = 0.5 + 0.5 * mean(a), G = 0.6.
    a = _cand("A", 100, 0.5, (8, 6, 2), X_02)
    b = _cand("B", 100, 0.5, (8, 8, 5), X_02)
    # The uncut step is passed on purpose: decide_sparsify cuts it again itself.
    d = decide_sparsify([a, b], target=0.6, step=0.25, guide="fdt", n_new=8)
    # f = 6: A 0.1, B 0.1 + 0.2 * (8 - 6) / 3 = 7/30: S = 0.5 + 0.25 * (1/3) = 7/12 < 0.6.
    # f = 5: A 0.1 + 0.2 / 4 = 0.15, B 0.3: S = 0.5 + 0.5 * 0.225 = 0.6125 > target: blend.
    # lam = (3/5 - 7/12) / (49/80 - 7/12) = (1/60) / (7/240) = 4/7.
    # A = 0.1 + 4/7 * 0.05 = 0.9/7; B = 7/30 + 4/7 * (0.3 - 7/30) = 57/210.
    assert d.blended
    assert d.threshold == 5.0
    assert d.goal == pytest.approx(0.6)
    assert d.added["A"] == pytest.approx(0.9 / 7)
    assert d.added["B"] == pytest.approx(57 / 210)
    assert abs(d.overall_after - 0.6) <= 1e-12
    # Absolute: A 0.5 + 0.5 * 0.9/7 = 0.564286 (rounded), B 0.5 + 0.5 * 57/210 = 0.635714.
    assert d.new_sparsity == {"A": 0.564286, "B": 0.635714}
    # Quality: A 6 + (2 - 6) * (0.9/7 - 0.1) / 0.2 = 6 - 4/7; B 8 - 3 * (57/210 - 0.1) / 0.2.
    assert d.quality["A"] == pytest.approx(6 - 4 / 7)
    assert d.quality["B"] == pytest.approx(8 - 3 * (57 / 210 - 0.1) / 0.2)
    assert d.reasons == {"A": "blended", "B": "blended"}


def test_non_final_step_may_overshoot_the_goal_but_is_not_blended() -> None:
    # Same curves, target 0.7: t = min(0.2, 0.2 / 0.5) = 0.2, G = 0.6 < target.
    a = _cand("A", 100, 0.5, (8, 6, 2), X_02)
    b = _cand("B", 100, 0.5, (8, 8, 5), X_02)
    d = decide_sparsify([a, b], target=0.7, step=0.2, guide="fdt", n_new=8)
    # f = 5 gives 0.6125 (see above): past G = 0.6 but below 0.7, committed unblended.
    assert not d.blended
    assert d.goal == pytest.approx(0.6)
    assert d.overall_after == pytest.approx(0.6125)
    assert d.added == pytest.approx({"A": 0.15, "B": 0.3})


def test_blend_at_the_first_threshold_starts_from_zero() -> None:
    # One robust component, target 0.1 = G: f = 4 already gives a = 0.15, S = 0.15 > 0.1.
    # Blend with the all-zero map: lam = (0.1 - 0) / (0.15 - 0) = 2/3, a = 0.1.
    d = decide_sparsify([_cand("A", 100, 0.0, (4, 4, 4))], 0.1, 0.1, "fdt", 4)
    assert d.blended
    assert d.threshold == 4.0
    assert d.added["A"] == pytest.approx(0.1)
    assert abs(d.overall_after - 0.1) <= 1e-12
    assert d.quality["A"] == pytest.approx(4.0)  # flat curve


def test_non_monotone_curve_in_a_decision() -> None:
    # q = 8 at 0, dips to 2 at 0.05, recovers to 6 at 0.15; S = 0, G = 0.1.
    d = decide_sparsify([_cand("A", 100, 0.0, (8, 2, 6))], 0.5, 0.1, "fdt", 8)
    # f = 8: a = 0 (crossing at 0); f = 7: 0.05 * 1/6 = 0.0083 < 0.1; f = 6: the last point
    # q(0.15) = 6 >= 6, so a = 0.15 (not the left crossing 0.05 * 2/6): S = 0.15 <= target.
    assert d.threshold == 6.0
    assert d.added["A"] == pytest.approx(0.15)
    assert d.quality["A"] == pytest.approx(6.0)


def test_existing_sparsity_weighs_remaining_parameters() -> None:
    # X: p = 100, s0 = 0.5 (50 remaining); Y: p = 100, s0 = 0 (100 remaining). S = 0.25.
    # target 0.5, step 0.2: t = min(0.2, 0.25 / 0.75) = 0.2, G = 0.25 + 0.2 * 0.75 = 0.4.
    x = _cand("X", 100, 0.5, (4, 4, 4), X_02)
    y = _cand("Y", 100, 0.0, (4, 0, 0), X_02)
    d = decide_sparsify([x, y], target=0.5, step=0.2, guide="fdt", n_new=4)
    # f = 4: X 0.3, Y 0: S = 100 * (0.5 + 0.3 * 0.5) / 200 = 65 / 200 = 0.325.
    # f = 3, 2, 1: Y 0.025, 0.05, 0.075: S = 0.3375, 0.35, 0.3625.
    # f = 0: Y 0.3: S = (65 + 30) / 200 = 0.475 >= 0.4, below the target: committed.
    assert d.overall_before == pytest.approx(0.25)
    assert d.goal == pytest.approx(0.4)
    assert d.threshold == 0.0
    assert d.added == pytest.approx({"X": 0.3, "Y": 0.3})
    # X: 0.5 + 0.3 * 0.5 = 0.65; Y: 0 + 0.3 = 0.3.
    assert d.new_sparsity == {"X": 0.65, "Y": 0.3}
    assert d.overall_after == pytest.approx(0.475)
    assert not d.blended


# --- the nll guide -------------------------------------------------------------------------------
def test_nll_guide_lowers_over_candidate_values() -> None:
    a = _cand("A", 100, 0.0, (0.0, -0.1, -0.5))
    b = _cand("B", 100, 0.0, (0.0, -0.2, -0.3))
    # Candidates: {0, -0.1, -0.5, -0.2, -0.3} descending: 0, -0.1, -0.2, -0.3, -0.5.
    # G = 0.1 (S = 0, t = 0.1): a_A + a_B >= 0.2.
    # f = 0: 0 + 0. f = -0.1: A 0.05, B 0.05 * 0.1 / 0.2 = 0.025 (0.075).
    # f = -0.2: A 0.05 + 0.1 * 0.1 / 0.4 = 0.075, B 0.05 (0.125).
    # f = -0.3: A 0.05 + 0.1 * 0.2 / 0.4 = 0.1, B 0.15 (0.25): reached; S = 0.125 <= 0.5.
    d = decide_sparsify([a, b], target=0.5, step=0.1, guide="nll", n_new=0)
    assert d.threshold == pytest.approx(-0.3)
    assert d.added == pytest.approx({"A": 0.1, "B": 0.15})
    assert d.overall_after == pytest.approx(0.125)
    assert not d.blended
    # t = 0.15, G = 0.15 (a_A + a_B >= 0.3): f = -0.3 gives 0.25; f = -0.5, the smallest value,
    # puts both at a_hi: (15 + 15) / 200 = 0.15.
    d = decide_sparsify([a, b], target=0.9, step=0.15, guide="nll", n_new=0)
    assert d.threshold == pytest.approx(-0.5)
    assert d.added == pytest.approx({"A": 0.15, "B": 0.15})


# --- components left out -------------------------------------------------------------------------
def test_component_without_probe_gets_zero() -> None:
    # A robust, B no probe; S = 0, t = 0.05, G = 0.05. f = 4: A 0.15, S = 15 / 200 = 0.075 >= 0.05.
    d = decide_sparsify(
        [_cand("A", 100, 0.0, (4, 4, 4)), _cand("B", 100, 0.0, ())], 0.5, 0.05, "fdt", 4
    )
    assert d.added == {"A": pytest.approx(0.15), "B": 0.0}
    assert d.overall_after == pytest.approx(0.075)
    assert d.reasons == {"A": "threshold", "B": "no probe"}
    assert math.isnan(d.quality["B"])


def test_unreachable_goal_commits_the_lowest_threshold() -> None:
    # A probed, B no probe, C already fully pruned: S = 100 / 300 = 1/3, target 0.5, step 0.1:
    # t = min(0.1, (1/6) / (2/3) = 0.25) = 0.1, G = 1/3 + 0.1 * 2/3 = 0.4.
    # A alone can add at most 0.15 * 100: S = (15 + 100) / 300 = 0.38333 < 0.4 at every f.
    cands = [
        _cand("A", 100, 0.0, (4, 4, 4)),
        _cand("B", 100, 0.0, ()),
        _cand("C", 100, 1.0, (4, 4, 4)),
    ]
    d = decide_sparsify(cands, 0.5, 0.1, "fdt", 4)
    assert d.goal == pytest.approx(0.4)
    assert d.added == {"A": pytest.approx(0.15), "B": 0.0, "C": 0.0}
    assert d.overall_after == pytest.approx(115 / 300)
    assert d.threshold == 0.0  # the last threshold tried (4, 3, 2, 1, 0)
    assert d.reasons == {"A": "threshold", "B": "no probe", "C": "fully pruned"}
    assert d.new_sparsity["C"] == 1.0


def test_target_already_reached_changes_nothing() -> None:
    # S = 0.6 >= target 0.5: round_step = 0, all a = 0.
    d = decide_sparsify([_cand("A", 100, 0.6, (4, 4, 4))], 0.5, 0.1, "fdt", 4)
    assert d.added == {"A": 0.0}
    assert d.overall_after == pytest.approx(0.6)
    assert d.reasons == {"A": "target reached"}


# --- uniform baseline ----------------------------------------------------------------------------
def test_uniform_step_prunes_everything_to_the_target() -> None:
    params = {"a": 100, "b": 300, "c": 100}
    sparsity = {"a": 0.0, "b": 0.2, "c": 0.6}
    d = uniform_step(params, sparsity, 0.5)
    # a: (0.5 - 0) / 1 = 0.5; b: (0.5 - 0.2) / 0.8 = 0.375; c: 0.6 > 0.5 stays, a = 0.
    assert d.added == pytest.approx({"a": 0.5, "b": 0.375, "c": 0.0})
    assert d.new_sparsity == {"a": 0.5, "b": 0.5, "c": 0.6}
    # Before: (0 + 60 + 60) / 500 = 0.24; after: (50 + 150 + 60) / 500 = 0.52.
    assert d.overall_before == pytest.approx(0.24)
    assert d.overall_after == pytest.approx(0.52)
    assert math.isnan(d.threshold)
    assert d.reasons == {"a": "uniform", "b": "uniform", "c": "at or above target"}


# --- probe table -> candidates -------------------------------------------------------------------
def _probes() -> pa.Table:
    rows = [
        # component, added, fdt_at_75, nll_mean, status
        ("q", 0.1, 6, 2.5, "ok"),
        ("q", 0.30000001, 3, 3.0, "ok"),  # within 1e-6 of a_hi = 0.3
        ("q", 0.5, 0, 9.0, "ok"),  # another step's probe: ignored
        ("k", 0.1, 7, 2.2, "ok"),
        ("k", 0.3, None, None, "failed"),  # k misses a_hi: no curve
        ("v", 0.1, 8, 2.1, "ok"),
        ("v", 0.3, 0, 9.0, "failed"),  # failed first, then retried ok: the ok row counts
        ("v", 0.3, 5, 2.4, "ok"),
        ("o", 0.1, 5, 2.0, "ok"),
        ("o", 0.3, 4, 2.0, "ok"),
        ("o", 0.3, 1, 5.0, "ok"),  # a duplicate: the first ok row wins
        ("x", 0.1, 1, 1.0, "ok"),  # not a selected component: ignored
    ]
    names = ["component", "added", "fdt_at_75", "nll_mean", "status"]
    types = [pa.string(), pa.float64(), pa.int32(), pa.float64(), pa.string()]
    columns = list(zip(*rows, strict=True))
    return pa.table({n: pa.array(c, type=t) for n, c, t in zip(names, columns, types, strict=True)})


def _flat(points) -> list[float]:
    """pytest.approx compares flat sequences only."""
    return [v for point in points for v in point]


def _components() -> pa.Table:
    return pa.table(
        {
            "component": ["q", "k", "v", "o"],
            "params": pa.array([100, 200, 50, 50], type=pa.int64()),
            "sparsity": [0.0, 0.2, 0.0, 0.0],
        }
    )


def test_candidates_from_table_fdt() -> None:
    cands = candidates_from_table(_probes(), _components(), "fdt", 8, 2.0, step=0.2)
    by_name = {c.component: c for c in cands}
    assert [c.component for c in cands] == ["q", "k", "v", "o"]
    # q: (0, base 8), (0.1, 6), (0.3, 3).
    assert _flat(by_name["q"].points) == pytest.approx([0.0, 8.0, 0.1, 6.0, 0.3, 3.0])
    assert by_name["k"].points == ()
    assert by_name["k"].params == 200 and by_name["k"].sparsity == 0.2
    assert _flat(by_name["v"].points) == pytest.approx([0.0, 8.0, 0.1, 8.0, 0.3, 5.0])
    assert _flat(by_name["o"].points) == pytest.approx([0.0, 8.0, 0.1, 5.0, 0.3, 4.0])


def test_candidates_from_table_nll() -> None:
    cands = candidates_from_table(_probes(), _components(), "nll", 8, 2.0, step=0.2)
    by_name = {c.component: c for c in cands}
    # q: -(2.5 - 2.0) = -0.5 and -(3.0 - 2.0) = -1.0, q0 = 0.
    assert _flat(by_name["q"].points) == pytest.approx([0.0, 0.0, 0.1, -0.5, 0.3, -1.0])
    # v: -(2.1 - 2.0) = -0.1 and the retried -(2.4 - 2.0) = -0.4.
    assert _flat(by_name["v"].points) == pytest.approx([0.0, 0.0, 0.1, -0.1, 0.3, -0.4])
    assert by_name["k"].points == ()


# --- validation ----------------------------------------------------------------------------------
def test_invalid_inputs_are_rejected() -> None:
    ok = [_cand("A", 100, 0.0, (4, 4, 4))]
    with pytest.raises(ValueError, match="unknown guide"):
        decide_sparsify(ok, 0.5, 0.1, "ppl", 4)
    with pytest.raises(ValueError, match="target"):
        decide_sparsify(ok, 1.0, 0.1, "fdt", 4)
    with pytest.raises(ValueError, match="target"):
        uniform_step({"A": 100}, {"A": 0.0}, 0.0)
    with pytest.raises(ValueError, match="step"):
        decide_sparsify(ok, 0.5, 0.0, "fdt", 4)
    with pytest.raises(ValueError, match="params"):
        decide_sparsify([_cand("A", 0, 0.0, (4, 4, 4))], 0.5, 0.1, "fdt", 4)
    with pytest.raises(ValueError, match="params"):
        overall_sparsity({"A": -1}, {"A": 0.0})
    with pytest.raises(ValueError, match="unknown guide"):
        candidates_from_table(_probes(), _components(), "uniform", 8, 2.0, 0.2)
