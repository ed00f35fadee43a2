import numpy as np
import pytest
import torch

from dtm_ray.core.metrics import (
    expected_interval_width,
    fdt_at,
    fdt_at_interval,
    first_divergent_token,
    prompts_for_interval_width,
    share_of_divergent_tokens,
    summarize,
)


def test_no_divergence_gives_n():
    ref = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert first_divergent_token(ref, ref.copy()).tolist() == [4, 4]
    assert share_of_divergent_tokens(ref, ref.copy()).tolist() == [0, 0]


def test_divergence_at_zero_and_later():
    ref = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    pred = np.array([[9, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 9]])
    assert first_divergent_token(ref, pred).tolist() == [0, 2, 3]
    assert share_of_divergent_tokens(ref, pred).tolist() == [1, 2, 1]


def test_sdt_counts_every_divergent_position_not_just_the_first_run():
    ref = np.array([[1, 2, 3, 4, 5, 6]])
    pred = np.array([[1, 0, 3, 0, 5, 0]])
    assert first_divergent_token(ref, pred).tolist() == [1]
    assert share_of_divergent_tokens(ref, pred).tolist() == [3]


def test_single_position():
    ref = np.array([[7], [7]])
    pred = np.array([[7], [8]])
    assert first_divergent_token(ref, pred).tolist() == [1, 0]
    assert share_of_divergent_tokens(ref, pred).tolist() == [0, 1]


def test_torch_tensors_accepted():
    ref = torch.tensor([[1, 2, 3]])
    pred = torch.tensor([[1, 5, 3]])
    assert first_divergent_token(ref, pred).tolist() == [1]
    assert share_of_divergent_tokens(ref, pred).tolist() == [1]


@pytest.mark.parametrize(
    "ref, pred",
    [
        (np.zeros((2, 3), dtype=int), np.zeros((2, 4), dtype=int)),
        (np.zeros(3, dtype=int), np.zeros(3, dtype=int)),
        (np.zeros((2, 3)), np.zeros((2, 3))),
    ],
)
def test_bad_shapes_and_dtypes_rejected(ref, pred):
    with pytest.raises(ValueError):
        first_divergent_token(ref, pred)


def test_fdt_at_is_the_largest_value_at_least_q_percent_reach():
    fdt = np.array([30, 0, 20, 10])
    # sorted [0, 10, 20, 30], P = 4: index P - ceil(q*P/100).
    # q=75 -> 4-3 = 1 -> 10 (0 is one rank too low: all four reach 0, but three reach 10);
    # q=50 -> 4-2 = 2 -> 20; q=25 -> 4-1 = 3 -> 30; q=100 -> 0 -> 0; q=0 -> the largest, 30.
    assert fdt_at(fdt, 75) == 10
    assert fdt_at(fdt, 50) == 20
    assert fdt_at(fdt, 25) == 30
    assert fdt_at(fdt, 100) == 0
    assert fdt_at(fdt, 0) == 30
    assert fdt_at(np.array([0, 40, 40, 40, 40]), 75) == 40  # 4 of 5 prompts reach 40
    # P=5, q=75: ceil(3.75) = 4 prompts must reach it -> sorted [1,2,3,4,5][1] = 2.
    assert fdt_at(np.array([5, 4, 3, 2, 1]), 75) == 2
    for q in (1, 10, 25, 50, 75, 90, 100):
        v = fdt_at(fdt, q)
        assert (fdt >= v).mean() >= q / 100  # at least q % reach it ...
        assert (fdt > v).mean() < q / 100  # ... and no larger value is reached by q %


def test_fdt_at_ties_and_single_prompt():
    assert fdt_at(np.array([5, 5, 5, 5]), 75) == 5
    assert fdt_at(np.array([3]), 75) == 3
    assert fdt_at(torch.tensor([1, 2, 3, 4]), 50) == 3


def test_fdt_at_interval_brackets_the_statistic_and_narrows_with_agreement():
    spread = np.arange(0, 64, 2)  # 32 prompts, FDTs 0..62
    low, high = fdt_at_interval(spread, 75)
    assert low <= fdt_at(spread, 75) <= high and high - low >= 4
    assert fdt_at_interval(spread, 75) == (low, high)  # seeded: reproducible
    assert fdt_at_interval(np.full(32, 17), 75) == (17, 17)  # no spread, no uncertainty
    with pytest.raises(ValueError, match="level"):
        fdt_at_interval(spread, 75, level=1.5)


def test_fdt_at_rejects_bad_q_and_empty():
    with pytest.raises(ValueError, match="150"):
        fdt_at(np.array([1, 2]), 150)
    with pytest.raises(ValueError):
        fdt_at(np.array([]), 75)


def test_summarize():
    s = summarize(np.array([64, 10, 0, 64]), np.array([0, 5, 64, 0]), 64)
    assert s["fdt_mean"] == pytest.approx(34.5)
    assert s["fdt_at_75"] == 10  # sorted [0, 10, 64, 64]: index 4 - ceil(3) = 1
    assert s["fdt_at_50"] == 64  # index 4 - 2 = 2
    assert s["fdt_at_75_low"] <= 10 <= s["fdt_at_75_high"]
    assert s["sdt_mean"] == pytest.approx(17.25)
    assert s["sdt_share"] == pytest.approx(17.25 / 64)


def test_expected_interval_width_is_the_order_statistics_formula_and_matches_a_simulation():
    # 2 * 1.6449 * sqrt(0.25 * 0.75 / 16) * 32 = 11.396 tokens for 16 prompts of N = 32.
    assert expected_interval_width(16, 32) == pytest.approx(11.396, abs=1e-3)
    assert expected_interval_width(64, 32) == pytest.approx(11.396 / 2, abs=1e-3)  # 1/sqrt(P)
    assert expected_interval_width(1, 32) == 32  # never wider than the range
    # FDT spread evenly over 0..32, 200 prompt sets of each size: the spread of FDT@75 itself
    # (5th to 95th percentile over the sets) and the mean width of the bootstrap intervals
    # `final/` reports are the formula's within 25 % (measured: 11.05 and 9.9 for 16 prompts,
    # 7 and 5.7 for 64; FDT's integer steps widen the first at 64).
    rng = np.random.default_rng(1)
    for prompts in (16, 64):
        widths, values = [], []
        for trial in range(200):
            fdt = rng.integers(0, 33, size=prompts)
            low, high = fdt_at_interval(fdt, 75, seed=trial)
            widths.append(high - low)
            values.append(fdt_at(fdt, 75))
        expected = expected_interval_width(prompts, 32)
        assert np.mean(widths) == pytest.approx(expected, rel=0.25)
        spread = np.percentile(values, 95) - np.percentile(values, 5)
        assert spread == pytest.approx(expected, rel=0.25)
    # Enough prompts for a width of 8 of 32: (1.6449 * 2 * sqrt(0.1875) * 32 / 8)^2 = 32.5.
    assert prompts_for_interval_width(8, 32) == 33
    assert expected_interval_width(33, 32) <= 8 < expected_interval_width(32, 32)
    with pytest.raises(ValueError, match="prompts"):
        expected_interval_width(0, 32)
