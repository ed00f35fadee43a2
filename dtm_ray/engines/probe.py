"""Building a reference and measuring a model against it.

The reference of a round is built once with the current model: its greedy continuation `y` and
its own teacher-forced argmax `a(F)` over `prefix ++ y`. A probe compares the compressed model's
teacher-forced argmax `a(F')` with `a(F)`, both from the same scoring path, so kernel differences
between decoding and prefill never count as compression damage.

`run_probe` is the whole probe of one component in-process, for notebooks and tests; the engine
session (`dtm_ray.engines.session`) does the same for any set of components on top of a model state.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dtm_ray.core.compress import compress
from dtm_ray.core.metrics import first_divergent_token, share_of_divergent_tokens, summarize
from dtm_ray.core.state import Reference
from dtm_ray.engines.base import Engine, ScoreResult


def build_reference(engine: Engine, prefixes: np.ndarray, n_new: int) -> Reference:
    prefixes = np.asarray(prefixes, dtype=np.int64)
    continuation = engine.generate_greedy(prefixes.tolist(), n_new)
    scored = engine.score(
        np.concatenate([prefixes, continuation], axis=1).tolist(), len(prefixes[0])
    )
    return Reference(prefixes, continuation, scored.argmax, scored.margin, scored.ref_logprob)


@dataclass
class ProbeResult:
    fdt: np.ndarray  # int64 [P]
    sdt: np.ndarray  # int64 [P]
    nll: np.ndarray  # float64 [P]: mean negative log-likelihood of y per prompt
    seconds: float
    margin: np.ndarray  # float32 [P, N]: the scored model's top-1 minus top-2 log-probability
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def nll_mean(self) -> float:
        return float(np.mean(self.nll))


def measure(reference: Reference, scored: ScoreResult, seconds: float = 0.0) -> ProbeResult:
    """FDT, SDT and NLL of a scoring pass over `reference.sequences` against its `a(F)`."""
    fdt = first_divergent_token(reference.base_argmax, scored.argmax)
    sdt = share_of_divergent_tokens(reference.base_argmax, scored.argmax)
    return ProbeResult(
        fdt=fdt,
        sdt=sdt,
        nll=-np.asarray(scored.ref_logprob, dtype=np.float64).mean(axis=1),
        seconds=seconds,
        margin=scored.margin,
        summary=summarize(fdt, sdt, reference.n_new),
    )


def score_against(
    engine: Engine, reference: Reference, from_layer: int = 0, keep_residuals: bool = False
) -> ProbeResult:
    """Measure the model the engine holds right now against `reference`.

    `from_layer` and `keep_residuals` are the hf engine's layer skip (see `dtm_ray.engines.hf`);
    other engines are only ever called without them.
    """
    start = time.perf_counter()
    skip = {"from_layer": from_layer} if from_layer else {}
    if keep_residuals:
        skip["keep_residuals"] = True
    scored = engine.score(reference.sequences.tolist(), reference.n_prefix, **skip)
    return measure(reference, scored, time.perf_counter() - start)


def run_probe(
    engine: Engine,
    reference: Reference,
    component: str,
    spec: str,
    stats: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """Compress one component of an unedited engine, score, and restore the original."""
    start = time.perf_counter()
    engine.set_weights({component: compress(engine.original_weight(component), spec, stats)})
    try:
        result = score_against(engine, reference)
    finally:
        engine.restore([component])
    result.seconds = time.perf_counter() - start
    return result
