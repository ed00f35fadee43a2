"""The engine protocol (DESIGN §3): everything a probe needs from the place the model runs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class ScoreResult:
    """Teacher-forced scoring of `prefix ++ continuation` over the N continuation positions.

    argmax[p, i] is the model's top-1 token for continuation position i given everything before it.
    margin[p, i] is the top-1 minus top-2 log-probability (NaN where the engine cannot tell).
    ref_logprob[p, i] is the log-probability of the sequence's own token at that position.
    """

    argmax: np.ndarray
    margin: np.ndarray
    ref_logprob: np.ndarray


@runtime_checkable
class Engine(Protocol):
    """A loaded model that can generate, score and have single weights edited in place."""

    def generate_greedy(self, prefixes: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        """Greedy continuation, exactly n_new tokens per prefix (EOS ignored): int64 [P, n_new]."""
        ...

    def sample(self, prefixes: Sequence[Sequence[int]], n_new: int, seed: int) -> np.ndarray:
        """Seeded temperature-1 samples of n_new tokens per prefix, int64 [P, n_new]."""
        ...

    def score(self, sequences: Sequence[Sequence[int]], n_prefix: int) -> ScoreResult:
        """Teacher-forced argmax over positions n_prefix.. of each (equal-length) sequence."""
        ...

    def original_weight(self, name: str) -> torch.Tensor:
        """The unmodified weight `name` (HF checkpoint name) as the engine loaded it, on CPU."""
        ...

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Replace the named weights (HF names, full unsharded tensors) in place."""
        ...

    def restore(self, names: Iterable[str]) -> None:
        """Write back the bit-identical original of each named weight."""
        ...
