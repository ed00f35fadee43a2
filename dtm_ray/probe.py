"""A probe, in-process: compress one component, score the reference, put the weight back.

The reference of a round is built once with the current model (DESIGN §1): its greedy continuation
`y` and its own teacher-forced argmax `a(F)` over `prefix ++ y`. A probe compares the compressed
model's teacher-forced argmax `a(F')` with `a(F)`, both from the same scoring path, so kernel
differences between decoding and prefill never count as compression damage.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dtm_ray.compress import compress
from dtm_ray.engines.base import Engine
from dtm_ray.metrics import first_divergent_token, share_of_divergent_tokens, summarize


@dataclass
class Reference:
    prefixes: np.ndarray  # int64 [P, n]
    continuation: np.ndarray  # int64 [P, N]: y, the current model's greedy tokens
    base_argmax: np.ndarray  # int64 [P, N]: a(F), its teacher-forced argmax over prefix ++ y
    base_margin: np.ndarray  # float32 [P, N]: top-1 minus top-2 log-probability of a(F)

    @property
    def n_prefix(self) -> int:
        return self.prefixes.shape[1]

    @property
    def n_new(self) -> int:
        return self.continuation.shape[1]

    @property
    def sequences(self) -> np.ndarray:
        return np.concatenate([self.prefixes, self.continuation], axis=1)

    @property
    def noise_positions(self) -> np.ndarray:
        """Per prompt, positions where the base model's scoring disagrees with its own greedy."""
        return (self.base_argmax != self.continuation).sum(axis=1)

    @property
    def noise_floor(self) -> int:
        return int(self.noise_positions.sum())


def build_reference(engine: Engine, prefixes: np.ndarray, n_new: int) -> Reference:
    prefixes = np.asarray(prefixes, dtype=np.int64)
    continuation = engine.generate_greedy(prefixes.tolist(), n_new)
    scored = engine.score(
        np.concatenate([prefixes, continuation], axis=1).tolist(), len(prefixes[0])
    )
    return Reference(prefixes, continuation, scored.argmax, scored.margin)


@dataclass
class ProbeResult:
    component: str
    spec: str
    fdt: np.ndarray  # int64 [P]
    sdt: np.ndarray  # int64 [P]
    nll_mean: float  # mean negative log-likelihood of y under the compressed model
    seconds: float
    margin: np.ndarray  # float32 [P, N]: the compressed model's top-1 minus top-2 log-probability
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def margin_at_fdt(self) -> np.ndarray:
        """Per prompt, the compressed model's margin where it first diverges (NaN: no divergence).

        A tiny margin marks a near-tie, where decode and prefill kernels may pick different tokens.
        """
        n_new = self.margin.shape[1]
        at = np.minimum(self.fdt, n_new - 1)
        picked = self.margin[np.arange(len(self.fdt)), at]
        return np.where(self.fdt < n_new, picked, np.nan).astype(np.float32)


def run_probe(
    engine: Engine,
    reference: Reference,
    component: str,
    spec: str,
    stats: Mapping[str, Any] | None = None,
    current: torch.Tensor | None = None,
) -> ProbeResult:
    """Apply `spec` to `component`, score, and put the component back as it was.

    `current` is the component's value in the current model state when that is not the original
    (a component compressed in an earlier round); the probe compresses from it and writes it back.
    """
    start = time.perf_counter()
    base = current if current is not None else engine.original_weight(component)
    engine.set_weights({component: compress(base, spec, stats)})
    try:
        scored = engine.score(reference.sequences.tolist(), reference.n_prefix)
    finally:
        if current is None:
            engine.restore([component])
        else:
            engine.set_weights({component: current})
    fdt = first_divergent_token(reference.base_argmax, scored.argmax)
    sdt = share_of_divergent_tokens(reference.base_argmax, scored.argmax)
    return ProbeResult(
        component=component,
        spec=spec,
        fdt=fdt,
        sdt=sdt,
        nll_mean=float(-np.mean(scored.ref_logprob)),
        seconds=time.perf_counter() - start,
        margin=scored.margin,
        summary=summarize(fdt, sdt, reference.n_new),
    )
