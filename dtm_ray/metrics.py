"""Divergent Token Metrics (DESIGN §1): pure numpy, no engine, no Ray.

`reference` and `predicted` are integer token arrays of shape [P, N]: P prompts, N continuation
positions. Torch tensors are accepted and converted.
"""

from __future__ import annotations

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


def fdt_at(fdt: Any, q: float) -> int:
    """The FDT value that at least q % of prompts reach (FDT@75 is the paper's "FDT75")."""
    if not 0 <= q <= 100:
        raise ValueError(f"q must be a percentage in [0, 100], got {q}")
    values = np.asarray(fdt.detach().cpu().numpy() if hasattr(fdt, "detach") else fdt)
    if values.size == 0:
        raise ValueError("fdt_at needs at least one prompt's FDT")
    return int(np.quantile(values, 1 - q / 100, method="lower"))


def summarize(fdt: np.ndarray, sdt: np.ndarray, n_new: int) -> dict[str, float]:
    """The aggregates stored with every probe row."""
    return {
        "fdt_mean": float(np.mean(fdt)),
        "fdt_at_75": fdt_at(fdt, 75),
        "fdt_at_50": fdt_at(fdt, 50),
        "sdt_mean": float(np.mean(sdt)),
        "sdt_share": float(np.mean(sdt) / n_new),
    }
