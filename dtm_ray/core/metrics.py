"""Divergent Token Metrics: pure numpy, no engine, no Ray.

`reference` and `predicted` are integer token arrays of shape [P, N]: P prompts, N continuation
positions. Torch tensors are accepted and converted.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np


def _as_tokens(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [prompts, tokens] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    return arr


def _divergence_mask(reference: Any, predicted: Any) -> np.ndarray:
    ref = _as_tokens(reference, "reference")
    pred = _as_tokens(predicted, "predicted")
    if ref.shape != pred.shape:
        raise ValueError(
            f"reference {ref.shape} and predicted {pred.shape} must have the same shape"
        )
    return ref != pred


def first_divergent_token(reference: Any, predicted: Any) -> np.ndarray:
    """Per prompt, the index of the first position where the two differ; N where none does."""
    diverged = _divergence_mask(reference, predicted)
    n = diverged.shape[1]
    return np.where(diverged.any(axis=1), diverged.argmax(axis=1), n).astype(np.int64)


def share_of_divergent_tokens(reference: Any, predicted: Any) -> np.ndarray:
    """Per prompt, how many of the N positions differ (divide by N for the share)."""
    return _divergence_mask(reference, predicted).sum(axis=1).astype(np.int64)


def _values(fdt: Any) -> np.ndarray:
    values = np.asarray(fdt.detach().cpu().numpy() if hasattr(fdt, "detach") else fdt)
    if values.size == 0:
        raise ValueError("FDT statistics need at least one prompt's FDT")
    return values.reshape(-1)


def _rank(prompts: int, q: float) -> int:
    """Index into the ascending sort of `prompts` values of the largest value q % reach."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be a percentage in [0, 100], got {q}")
    # ceil(q*P/100) prompts must reach the value; the tiny slack absorbs float noise in q*P/100.
    needed = max(1, math.ceil(q * prompts / 100 - 1e-9))
    return prompts - needed


def fdt_at(fdt: Any, q: float) -> int:
    """The largest FDT value that at least q % of prompts reach (FDT@75 is the paper's FDT75).

    With the P values sorted ascending it is `sorted(fdt)[P - ceil(q*P/100)]`: for
    [0, 10, 20, 30], FDT@75 = 10 (three of four prompts reach 10), FDT@100 = 0, FDT@50 = 20.
    q = 0 gives the largest value.
    """
    values = np.sort(_values(fdt))
    return int(values[_rank(values.size, q)])


def fdt_at_interval(
    fdt: Any, q: float = 75, level: float = 0.9, resamples: int = 1000, seed: int = 0
) -> tuple[int, int]:
    """A percentile bootstrap interval of FDT@q over prompts: (low, high) at `level` confidence.

    Tells a user whether two components' FDT@q really differ or only by the luck of the prompts.
    Seeded, so the same per-prompt values always give the same interval.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = _values(fdt)
    rng = np.random.default_rng(seed)
    samples = np.sort(values[rng.integers(0, values.size, size=(resamples, values.size))], axis=1)
    stats = samples[:, _rank(values.size, q)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail], method="lower")
    return int(low), int(high)


def expected_interval_width(prompts: int, n_new: int, q: float = 75, level: float = 0.9) -> float:
    """The expected width, in tokens, of FDT@q's `level` interval over `prompts` prompts, under
    the stated assumption that FDT is spread evenly over 0..n_new (the wide case: FDT
    concentrated at N, or on a few values, gives narrower intervals).

    Order statistics: FDT@q is the p-quantile of the prompts' values, p = 1 - q/100, the value
    of rank p·P; that rank varies over prompt sets with standard deviation sqrt(P·p·(1 - p))
    (binomial), so the interval spans ranks p·P ± z·sqrt(P·p·(1 - p)), z the normal quantile
    of the level (1.645 at 90 %); evenly spread values lie n_new/P tokens apart per rank. The
    width is then 2·z·sqrt(p·(1 - p)/P)·n_new (about 1.42·N/sqrt(P) for FDT@75 at 90 %),
    at most n_new."""
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"prompts must be an integer >= 1, got {prompts!r}")
    if not 0 < q < 100:
        raise ValueError(f"q must be a percentage in (0, 100), got {q}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    p = 1 - q / 100
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return min(float(n_new), 2 * z * math.sqrt(p * (1 - p) / prompts) * n_new)


def prompts_for_interval_width(width: float, n_new: int, q: float = 75, level: float = 0.9) -> int:
    """The fewest prompts whose `expected_interval_width` is at most `width` tokens."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    one = 2 * NormalDist().inv_cdf(0.5 + level / 2) * math.sqrt(q / 100 * (1 - q / 100)) * n_new
    prompts = max(1, math.ceil((one / width) ** 2))
    while expected_interval_width(prompts, n_new, q, level) > width:  # float rounding
        prompts += 1
    return prompts


def summarize(fdt: np.ndarray, sdt: np.ndarray, n_new: int) -> dict[str, float]:
    """The aggregates stored with every probe row."""
    low, high = fdt_at_interval(fdt, 75)
    return {
        "fdt_mean": float(np.mean(fdt)),
        "fdt_at_75": fdt_at(fdt, 75),
        "fdt_at_75_low": low,
        "fdt_at_75_high": high,
        "fdt_at_50": fdt_at(fdt, 50),
        "sdt_mean": float(np.mean(sdt)),
        "sdt_share": float(np.mean(sdt) / n_new),
    }
