"""The independent reference the end-to-end tests compare runs with: plain transformers
free-running greedy generation, and the first position where two token arrays part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch


def free_running_greedy(model, prefixes: np.ndarray, n_new: int) -> np.ndarray:  # noqa: ANN001
    """`n_new` greedy tokens after each prefix, EOS ignored: int64 [P, n_new]."""
    ids = torch.as_tensor(np.asarray(prefixes), dtype=torch.long)
    with torch.inference_mode():
        # An explicit all-ones mask: prefixes may contain the pad/EOS id, which generate would
        # otherwise mask out of the context.
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def first_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the first position where `a` and `b` differ; their length where none does."""
    diff = np.asarray(a) != np.asarray(b)
    return np.where(diff.any(axis=1), diff.argmax(axis=1), diff.shape[1])


def dense_reference(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(prefixes, greedy continuations) of the dense model: round 0 of a run's reference/."""
    reference = pd.read_parquet(run / "reference")
    dense = reference[reference["round"] == 0].sort_values("prompt_id")
    assert (dense["noise_positions"] == 0).all()  # fp32 on CPU: decode and prefill agree
    return np.stack(dense["prefix_ids"].to_numpy()), np.stack(dense["continuation_ids"].to_numpy())
