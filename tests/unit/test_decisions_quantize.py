"""Mixed-precision search on hand-made inputs: every expected value is worked out in a comment."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from dtm_ray.core.decisions.quantize import (
    SearchStep,
    average_bits,
    bits_per_parameter,
    budget_assignment,
    budget_met,
    budget_prefix,
    candidate_sets,
    rank_components,
    search_level,
    search_step,
    spec_bits,
    uniform_assignment,
    unranked_components,
)

COLUMNS = ("component", "spec", "fdt_at_75", "fdt_mean", "nll_mean", "params", "status")


def _probes(rows: list[tuple]) -> pa.Table:
    return pa.table({name: [row[i] for row in rows] for i, name in enumerate(COLUMNS)})


class _Recorder:
    """An `evaluate` callback: FDT@75 of a combined model = 64 - base - sum of its damages."""

    def __init__(self, damage: dict[str, float], base: float = 0.0) -> None:
        self.damage, self.base, self.calls = damage, base, []

    def __call__(self, candidates: list[tuple[str, ...]]) -> list[float]:
        self.calls.append(candidates)
        return [64.0 - self.base - sum(self.damage[c] for c in cand) for cand in candidates]


# --- ranking -------------------------------------------------------------------------------------
# y's failed row comes first in the table and x has no row at all: the flagged ones still go last,
# in name order (x before y), not in table order or by kind of failure.
TIES = _probes(
    [
        ("y", "int4-g64", 30, 30.0, 1.0, 100, "failed"),
        ("a", "int4-g64", 40, 45.0, 1.5, 200, "ok"),
        ("b", "int4-g64", 40, 50.0, 2.0, 300, "ok"),
        ("c", "int4-g64", 40, 50.0, 1.5, 100, "ok"),
        ("d", "int4-g64", 40, 50.0, 1.5, 100, "ok"),
        ("e", "int4-g64", 64, 10.0, 0.5, 500, "ok"),
        ("other", "int4-g64", 64, 64.0, 0.1, 10, "ok"),  # not a selected component: ignored
    ]
)
NAMES = ["a", "b", "c", "d", "e", "x", "y"]


def test_rank_by_fdt_with_ties_and_failed_probes_last() -> None:
    # e has FDT@75 64, the rest of the ok ones 40: e first.
    # Among the 40s, fdt_mean 50 (b, c, d) beats 45 (a): a is last of them.
    # Among b, c, d (40, 50.0): fewer params first, c and d (100) before b (300).
    # c and d tie on everything but the name: c, d.
    # Then the flagged ones in name order: x (no probe), y (failed).
    assert rank_components(TIES, NAMES, "fdt") == ["e", "c", "d", "b", "a", "x", "y"]
    assert unranked_components(TIES, NAMES, "fdt") == {"x": "no probe", "y": "failed probe"}


def test_rank_by_nll_ascending() -> None:
    # nll_mean ascending: e 0.5; then a, c, d at 1.5, fewer params first: c, d (100; by name)
    # before a (200); then b 2.0. fdt_at_75 plays no part. Flagged x, y last as before.
    assert rank_components(TIES, NAMES, "nll") == ["e", "c", "d", "a", "b", "x", "y"]


def test_rank_keeps_the_level_and_the_first_usable_row() -> None:
    probes = _probes(
        [
            ("a", "int8", 64, 64.0, 0.0, 100, "ok"),  # another level: dropped with spec=
            ("a", "int4-g64", 10, 10.0, 3.0, 100, "ok"),
            ("b", "int4-g64", 20, 20.0, 2.0, 100, "failed"),
            ("b", "int4-g64", 30, 30.0, 1.0, 100, "ok"),  # b's ok row wins over the failed one
            ("c", "int4-g64", math.nan, 5.0, 1.0, 100, "ok"),  # ok but no FDT@75: "failed"
            ("d", "int8", 64, 64.0, 0.0, 100, "ok"),  # d only has an int8 row: "no probe"
        ]
    )
    names = ["a", "b", "c", "d"]
    # At int4-g64: b 30 before a 10; c (NaN) and d (no row) flagged, by name.
    assert rank_components(probes, names, "fdt", spec="int4-g64") == ["b", "a", "c", "d"]
    assert unranked_components(probes, names, "fdt", spec="int4-g64") == {
        "c": "failed probe",
        "d": "no probe",
    }
    # Without spec= the first ok rows are a's int8 row (64) and d's int8 row (64): a and d tie
    # (64, 64.0, 100 params), so by name a, d; then b 30; c flagged.
    assert rank_components(probes, names, "fdt") == ["a", "d", "b", "c"]


def test_rank_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown guide"):
        rank_components(TIES, NAMES, "uniform")
    with pytest.raises(ValueError, match="twice"):
        rank_components(TIES, ["a", "a"], "fdt")
    with pytest.raises(ValueError, match="lacks columns"):
        rank_components(TIES.drop(["nll_mean"]), NAMES, "nll")


# --- candidates ----------------------------------------------------------------------------------
def test_candidate_sets_are_prefixes_cut_by_k_and_rest() -> None:
    # k = 2 < len(R) = 3: S + R[:1], S + R[:2].
    assert candidate_sets(("s",), ("a", "b", "c"), 2) == [("s", "a"), ("s", "a", "b")]
    # k = 5 > len(R) = 3: only 3 candidates.
    assert candidate_sets(("s",), ("a", "b", "c"), 5) == [
        ("s", "a"),
        ("s", "a", "b"),
        ("s", "a", "b", "c"),
    ]
    assert candidate_sets(("s",), (), 3) == []


def test_candidate_sets_respect_the_parameter_cap() -> None:
    params = {"s": 10, "a": 20, "b": 30, "c": 5}
    # Totals: s + a = 30, + b = 60, + c = 65. Cap 60: the third (65) is not evaluated; 60 = cap
    # is allowed.
    assert candidate_sets(("s",), ("a", "b", "c"), 5, params, 60) == [
        ("s", "a"),
        ("s", "a", "b"),
    ]
    # Cap 29: even s + a = 30 is over: nothing to evaluate.
    assert candidate_sets(("s",), ("a", "b", "c"), 5, params, 29) == []
    # Cap 9: the accepted set alone (10) is already over: an inconsistent state.
    with pytest.raises(ValueError, match="already holds 10"):
        candidate_sets(("s",), ("a",), 1, params, 9)
    with pytest.raises(ValueError, match="needs params"):
        candidate_sets(("s",), ("a",), 1, None, 100)
    with pytest.raises(ValueError, match="k"):
        candidate_sets(("s",), ("a",), 0)


# --- one step ------------------------------------------------------------------------------------
def test_step_takes_the_longest_passing_prefix() -> None:
    # min_fdt 40: values 50, 45, 30 pass, pass, fail: the longest passing prefix is 2.
    step = search_step(("s",), ("a", "b", "c"), ("z",), [50, 45, 30], 40)
    assert step.accepted == ("s", "a", "b")
    assert step.rest == ("c",)
    assert step.skipped == ("z",)
    assert step.taken == 2
    assert step.rows == [
        {"size": 1, "added": "a", "fdt_at_75": 50.0, "passed": True, "chosen": False},
        {"size": 2, "added": "b", "fdt_at_75": 45.0, "passed": True, "chosen": True},
        {"size": 3, "added": "c", "fdt_at_75": 30.0, "passed": False, "chosen": False},
    ]


def test_step_accepts_a_non_contiguous_pass() -> None:
    # min_fdt 40: S + R[:1] = 30 fails, S + R[:2] = 41 passes, S + R[:3] = 40 passes (= min_fdt),
    # S + R[:4] = 39 fails. The largest passing size is 3: a, b and c are all accepted even though
    # the model with a alone failed.
    step = search_step((), ("a", "b", "c", "d"), (), [30, 41, 40, 39], 40)
    assert step.accepted == ("a", "b", "c")
    assert step.rest == ("d",)
    assert step.taken == 3
    assert [row["passed"] for row in step.rows] == [False, True, True, False]
    assert [row["chosen"] for row in step.rows] == [False, False, True, False]


def test_step_skips_the_head_when_none_passes() -> None:
    # min_fdt 40: 39 and NaN (a failed evaluation) both fail: a moves to skipped, the rest goes on.
    step = search_step(("s",), ("a", "b", "c"), ("z",), [39, math.nan], 40)
    assert step == SearchStep(
        accepted=("s",),
        rest=("b", "c"),
        skipped=("z", "a"),
        taken=0,
        rows=step.rows,
    )
    assert step.rows[0]["passed"] is False and step.rows[1]["passed"] is False
    assert step.rows[-1] == {"skipped": "a", "reason": "no candidate passed"}
    assert len(step.rows) == 3


def test_step_skips_the_head_over_the_cap() -> None:
    params = {"s": 10, "a": 100, "b": 5}
    # Cap 50: s + a = 110 is over, so nothing was evaluated: a is skipped for the cap.
    step = search_step(("s",), ("a", "b"), (), [], 40, params, 50)
    assert (step.accepted, step.rest, step.skipped, step.taken) == (("s",), ("b",), ("a",), 0)
    assert step.rows == [{"skipped": "a", "reason": "over the parameter cap"}]


def test_step_rejects_bad_values() -> None:
    # k = 2 and 3 components in R: exactly 2 values expected.
    with pytest.raises(ValueError, match="expected 2 values"):
        search_step((), ("a", "b", "c"), (), [50], 40, k=2)
    # Without k: at most len(R) = 2 values.
    with pytest.raises(ValueError, match="only 2 candidates"):
        search_step((), ("a", "b"), (), [50, 50, 50], 40)
    # With the cap 15 only s + a = 15 fits (s + a + b = 20): a second value is one too many.
    with pytest.raises(ValueError, match="only 1 candidates"):
        search_step(("s",), ("a", "b"), (), [50, 50], 40, {"s": 10, "a": 5, "b": 5}, 15)
    with pytest.raises(ValueError, match="no values"):
        search_step((), ("a",), (), [], 40)
    with pytest.raises(ValueError, match="min_fdt"):
        search_step((), ("a",), (), [50], -1)
    with pytest.raises(ValueError, match="min_fdt"):
        search_step((), ("a",), (), [50], math.nan)
    with pytest.raises(ValueError, match="rest is empty"):
        search_step(("a",), (), (), [], 40)
    with pytest.raises(ValueError, match="twice"):
        search_step(("a",), ("a",), (), [50], 40)


# --- a whole level -------------------------------------------------------------------------------
def test_search_level_on_an_additive_damage_model() -> None:
    # FDT@75 of a combined model = 64 - sum of damages; min_fdt 50 (a damage budget of 14); k = 2.
    # The ranking is noisy (c ranks third with the largest damage), so the search must backtrack.
    damage = {"a": 3, "b": 4, "c": 9, "d": 2, "e": 5, "f": 1}
    evaluate = _Recorder(damage)
    accepted, skipped, steps = search_level(("a", "b", "c", "d", "e", "f"), evaluate, 2, 50)
    # Round 1: [a] 61 pass, [a, b] 57 pass: take 2, S = (a, b), damage 7.
    # Round 2: [a, b, c] 48 fail, [a, b, c, d] 46 fail: skip c.
    # Round 3: [a, b, d] 55 pass, [a, b, d, e] 50 pass (= min_fdt): take 2, S = (a, b, d, e), 14.
    # Round 4: [a, b, d, e, f] 49 fail (only one candidate left): skip f.
    assert accepted == ("a", "b", "d", "e")
    assert skipped == ("c", "f")
    assert [s.taken for s in steps] == [2, 0, 2, 0]
    assert evaluate.calls == [
        [("a",), ("a", "b")],
        [("a", "b", "c"), ("a", "b", "c", "d")],
        [("a", "b", "d"), ("a", "b", "d", "e")],
        [("a", "b", "d", "e", "f")],
    ]
    assert [row["fdt_at_75"] for row in steps[2].rows] == [55.0, 50.0]
    assert steps[1].rows[-1] == {"skipped": "c", "reason": "no candidate passed"}
    # Each step's state is the next step's input: the last one has an empty rest.
    assert steps[-1].rest == ()
    with pytest.raises(ValueError, match="k"):
        search_level(("a",), evaluate, 0, 50)


def test_search_level_with_the_parameter_cap() -> None:
    # No damage at all (every evaluated candidate passes); only the cap of 200 params binds. k = 3.
    params = {"a": 100, "b": 300, "c": 50, "d": 200}
    evaluate = _Recorder(dict.fromkeys(params, 0.0))
    accepted, skipped, steps = search_level(("a", "b", "c", "d"), evaluate, 3, 60, params, 200)
    # Round 1: [a] 100 fits, [a, b] 400 does not: one candidate, 64 passes, take a.
    # Round 2: [a, b] 400 > 200: nothing evaluated, b skipped for the cap.
    # Round 3: [a, c] 150 fits, [a, c, d] 350 does not: take c.
    # Round 4: [a, c, d] 350 > 200: d skipped for the cap.
    assert accepted == ("a", "c")
    assert skipped == ("b", "d")
    assert evaluate.calls == [[("a",)], [("a", "c")]]
    assert [s.taken for s in steps] == [1, 0, 1, 0]
    assert steps[1].rows == [{"skipped": "b", "reason": "over the parameter cap"}]
    assert steps[3].rows == [{"skipped": "d", "reason": "over the parameter cap"}]


def test_several_levels_remove_what_an_earlier_level_accepted() -> None:
    # Damages at int4-g64 and int8; min_fdt 56 (budget 8 for the whole model); k = 2.
    d4 = {"a": 2, "b": 10, "c": 3, "d": 8}
    d8 = {"a": 0.5, "b": 2, "c": 0.5, "d": 1}
    names = ["a", "b", "c", "d"]
    # Probes alone: FDT@75 = 64 - damage; the int8 probe table also holds a and c (probed before
    # level 1 ended), which must not be ranked at level 2.
    probes = _probes(
        [(n, "int4-g64", 64 - d4[n], 64.0 - d4[n], 0.0, 100, "ok") for n in names]
        + [(n, "int8", 64 - d8[n], 64.0 - d8[n], 0.0, 100, "ok") for n in names]
    )
    assignment: dict[str, str] = {}
    for level, damage in (("int4-g64", d4), ("int8", d8)):
        unassigned = [n for n in names if n not in assignment]
        ranked = rank_components(probes, unassigned, "fdt", spec=level)
        # The combined model holds the earlier levels' assignment too.
        base = sum(d4[n] if s == "int4-g64" else d8[n] for n, s in assignment.items())
        accepted, _, _ = search_level(ranked, _Recorder(damage, base), 2, 56)
        assignment.update(dict.fromkeys(accepted, level))
        if level == "int4-g64":
            # Ranked by 64 - d4: a 62, c 61, d 56, b 54.
            assert ranked == ["a", "c", "d", "b"]
            # Round 1: [a] 62, [a, c] 59 pass: take both (damage 5).
            # Round 2: [a, c, d] 51, [a, c, d, b] 41 fail: skip d. Round 3: [a, c, b] 49: skip b.
            assert accepted == ("a", "c")
        else:
            # Only b and d are left: by 64 - d8, d 63 before b 62.
            assert ranked == ["d", "b"]
            # Base 5: [d] 64 - 5 - 1 = 58 pass, [d, b] 64 - 5 - 3 = 56 pass: take both.
            assert accepted == ("d", "b")
    assert assignment == {"a": "int4-g64", "c": "int4-g64", "d": "int8", "b": "int8"}


# --- baseline and cost ---------------------------------------------------------------------------
def test_uniform_assignment_takes_a_prefix_in_model_order() -> None:
    params = {"a": 100, "b": 300, "c": 50, "d": 200}
    order = ["a", "b", "c", "d"]
    # No cap: everything, in order.
    assert uniform_assignment(order, params, None) == ("a", "b", "c", "d")
    # Cap 200: a (100) fits, a + b = 400 does not: stop there; c (150 with a) is not taken.
    assert uniform_assignment(order, params, 200) == ("a",)
    # Cap 400: a + b = 400 = cap fits, + c = 450 does not.
    assert uniform_assignment(order, params, 400) == ("a", "b")
    # Cap 99: not even a.
    assert uniform_assignment(order, params, 99) == ()
    with pytest.raises(ValueError, match="lacks"):
        uniform_assignment(["a", "e"], params, None)


def test_bits_per_parameter_worked_example() -> None:
    # int4-g64: 4 + 16/64 = 4.25; int4-g128: 4 + 16/128 = 4.125; int8 and fp8: 8.
    assert spec_bits("int4-g64") == pytest.approx(4.25)
    assert spec_bits("int4-g128") == pytest.approx(4.125)
    assert spec_bits("int8") == 8.0
    assert spec_bits("fp8-e4m3") == 8.0
    params = {"a": 1000, "b": 3000, "c": 1000, "d": 5000}
    assignment = {"a": "int4-g64", "b": "int8", "c": "fp8-e4m3"}
    # (1000 * 4.25 + 3000 * 8 + 1000 * 8 + 5000 * 16) / 10000
    # = (4250 + 24000 + 8000 + 80000) / 10000 = 11.625 (d unassigned: dense 16 bits).
    assert bits_per_parameter(assignment, params, 16) == pytest.approx(11.625)
    # Nothing assigned: the dense width.
    assert bits_per_parameter({}, params, 16) == pytest.approx(16.0)
    with pytest.raises(ValueError, match="unknown quantization spec"):
        bits_per_parameter({"a": "int3"}, params, 16)
    with pytest.raises(ValueError, match="not in params"):
        bits_per_parameter({"e": "int8"}, params, 16)
    with pytest.raises(ValueError, match="dense_bits"):
        bits_per_parameter({}, params, 0)


# --- bits budget ---------------------------------------------------------------------------------
def test_budget_prefix_takes_whole_units_in_order_until_the_average_is_at_the_target() -> None:
    # Units of 100, 100 and 200 parameters (400); fallback int8 (8 bits): 8.0 on average.
    # A unit at int4-g64 (4.25) saves p * 3.75 bits: a, b 375 each, c 750.
    params = {"a": 100, "b": 100, "c": 200}
    # Target 6 (2400 bits): a -> 2825 (7.06), b -> 2450 (6.125), c -> 1700 (4.25 <= 6): all.
    assert budget_prefix(["a", "b", "c"], params, "int4-g64", "int8", 6) == ("a", "b", "c")
    # Order c, a: c -> 2450 (6.125), a -> 2075 (5.19 <= 6): stop there, b stays at int8.
    assert budget_prefix(["c", "a", "b"], params, "int4-g64", "int8", 6) == ("c", "a")
    # A target met exactly stops at once: c alone gives 6.125.
    assert budget_prefix(["c", "a", "b"], params, "int4-g64", "int8", 6.125) == ("c",)
    # Already met (everything at the fallback is 8): nothing.
    assert budget_prefix(["a", "b", "c"], params, "int4-g64", "int8", 8) == ()
    # What is already placed counts: with c at int4 (6.125), a alone reaches 5.19.
    assert budget_prefix(["a", "b"], params, "int4-g64", "int8", 6, {"c": "int4-g64"}) == ("a",)
    # Out of units before the target: all of them, above it.
    assert budget_prefix(["a"], params, "int4-g64", "int8", 5) == ("a",)
    with pytest.raises(ValueError, match="already have a level"):
        budget_prefix(["a", "c"], params, "int4-g64", "int8", 6, {"c": "int4-g64"})
    with pytest.raises(ValueError, match="target_bits"):
        budget_prefix(["a"], params, "int4-g64", "int8", 0)


def test_budget_prefix_is_the_shortest_prefix_whose_average_meets_the_target() -> None:
    """Against a brute force over prefixes, with the average from bits_per_parameter."""
    import random

    rng = random.Random(0)
    for _ in range(200):
        names = [f"u{i}" for i in range(rng.randint(1, 8))]
        params = {n: rng.randint(1, 1000) for n in names}
        order = rng.sample(names, len(names))
        target = rng.uniform(4.25, 8.5)
        got = budget_prefix(order, params, "int4-g64", "int8", target)

        def average(prefix, params=params):
            full = {n: "int4-g64" if n in prefix else "int8" for n in params}
            return bits_per_parameter(full, params, 32)

        meets = [i for i in range(len(order) + 1) if average(order[:i]) <= target + 1e-9]
        expected = tuple(order[: meets[0]]) if meets else tuple(order)
        assert got == expected, (order, params, target)


def test_budget_assignment_puts_every_unit_at_a_level_the_last_one_the_fallback() -> None:
    # A fused group "qkv" (300 parameters) moves whole; "o" 100, "up" 200, "down" 200: 800.
    params = {"qkv": 300, "o": 100, "up": 200, "down": 200}
    order = ["o", "qkv", "up", "down"]  # the guide's ranking
    levels = ["int4-g64", "fp8-e4m3", "int8"]
    # All at int8: 8 (6400 bits). Target 6.5 (5200 bits): o saves 375 (6025 -> 7.53), qkv
    # 1125 (4900 -> 6.125 <= 6.5): stop. The middle level is never needed: the first level
    # reaches any target the levels allow.
    got = budget_assignment(order, params, levels, 6.5)
    assert got == {"o": "int4-g64", "qkv": "int4-g64", "up": "int8", "down": "int8"}
    assert average_bits(got, params, "int8") == pytest.approx(6.125)
    assert budget_met(got, params, "int8", 6.5) and not budget_met({}, params, "int8", 6.5)
    # The floor of the levels: every unit at the most aggressive one.
    assert set(budget_assignment(order, params, levels, 4.25).values()) == {"int4-g64"}
    # At or above the fallback's bits: everything at the fallback.
    assert set(budget_assignment(order, params, levels, 8).values()) == {"int8"}
    with pytest.raises(ValueError, match="every unit"):
        budget_assignment(order[:2], params, levels, 6)
