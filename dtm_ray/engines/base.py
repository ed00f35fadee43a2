"""The engine protocol: everything a probe needs from the place the model runs."""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from dtm_ray.core.state import Chain, Link
from dtm_ray.engines.config import DTYPE_NAMES
from dtm_ray.engines.sensitivity import SignalValues

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype an engine runs in, by name; a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} not supported; expected one of {list(DTYPES)}")
    return DTYPES[name]


def continuation_length(sequences: Sequence[Sequence[int]], n_prefix: int) -> int:
    """N for `score`: every sequence is n_prefix prompt tokens plus the same N >= 1 continuation."""
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"score needs sequences of one length, got lengths {sorted(lengths)}")
    n_new = lengths.pop() - n_prefix
    if n_prefix < 1 or n_new < 1:
        raise ValueError(f"n_prefix={n_prefix} must leave >= 1 prefix and continuation token")
    return n_new


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> None:
    """Have this process's malloc keep freed memory for the next allocation instead of handing it
    back to the operating system.

    Every probe allocates and frees the same large activations (the logits alone are
    prompts x N x vocabulary floats). By default glibc serves each large block with a fresh mmap
    and trims the heap after a free, so every probe pays the page faults and zeroing of that
    memory again: about a sixth of a CPU probe on SmolLM2. Served from a heap that is never
    trimmed, the blocks are reused warm. The cost is that the process keeps its peak heap, so
    engines call this only when their tensors live in host memory, after the model has loaded.
    A no-op where the C library has no mallopt (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    mallopt(_M_MMAP_MAX, 0)  # large blocks from the heap, not from per-block mmaps
    mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # never give the heap's free top back
    mallopt(_M_TOP_PAD, 256 << 20)  # grow the heap in large steps


def token_stats(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position of `logits` [..., V]: the argmax, the top-1 minus top-2 log-probability and
    the log-probability of `targets` [...] — what `ScoreResult` holds, computed one way for
    every engine."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top2 = logprobs.topk(2, dim=-1)
    margin = top2.values[..., 0] - top2.values[..., 1]
    return top2.indices[..., 0], margin, logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


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

    def input_norms(
        self, sequences: Sequence[Sequence[int]], names: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """Wanda's calibration statistics: for each named linear weight (HF name, [out, in]),
        ‖x_j‖₂ of its input over every token of every sequence, float32 [in] on CPU.

        One forward pass of the current weights over `sequences`; q/k/v (gate/up) of a layer
        share one input, so their norms are identical. An unknown name is a KeyError.
        """
        ...

    def close(self) -> None:
        """Free the model and everything the engine holds (GPU memory, worker processes).

        Idempotent; any other method raises RuntimeError afterwards.
        """
        ...


@runtime_checkable
class EditsInPlace(Protocol):
    """What an engine that compresses the weights it holds itself offers besides `Engine` (both
    engines here): a probe or a state change then sends names and specs, never a weight, and a
    probe's put-back comes from a copy kept where the weight lives."""

    def compress_in_place(self, chains: Mapping[str, Chain], keep: bool = False) -> None:
        """Apply each named weight's links in order (with their calibration statistics) to the
        weight the engine holds now, on its device, bit for bit what `core.compress` gives.
        `keep` saves a copy of what was overwritten, for `put_back`."""
        ...

    def put_back(self, names: Iterable[str]) -> None:
        """Write back the copies `compress_in_place(keep=True)` saved, bit for bit."""
        ...

    def nonzero_counts(self, names: Iterable[str]) -> dict[str, int]:
        """Nonzero values of each named weight as the engine holds it now."""
        ...


@runtime_checkable
class MeasuresSensitivity(Protocol):
    """The anchors' sensitivity signals on the weights the engine holds now (both engines here;
    definitions in `dtm_ray.core.sensitivity`, machinery in `dtm_ray.engines.sensitivity`).
    Candidates map a component (HF weight name) to the links to score, each applied to its
    current weight; results are `SignalValues` keyed by (component, spec). Neither writes a
    weight."""

    def weight_errors(self, candidates: Mapping[str, Sequence[Link]]) -> SignalValues:
        """Data-free: the compressed weight against the current one, per (component, spec)."""
        ...

    def fisher_scores(
        self,
        sequences: Sequence[Sequence[int]],
        candidates: Mapping[str, Sequence[Link]],
        batch_size: int = ...,
    ) -> SignalValues:
        """ModelOpt's gradient score over calibration `sequences`, one forward + backward pass
        per batch of `batch_size`."""
        ...
