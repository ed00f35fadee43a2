"""An engine actor for a model as its engine serves it: it generates and scores, never edits.

`dtm-ray compare` measures checkpoints someone already has (a quantized copy, a GGUF, a serving
dtype), so nothing of dtm_ray's weight editing may stand between the checkpoint and the kernels
that run it: the engine is made with `edits=False` (see `dtm_ray.engines.make_engine`; for vLLM
no worker extension, so the CPU build keeps its own weight packing and a quantized checkpoint runs
through vLLM's quantized kernels). Everything else (model fetch per node, threads, start-up
reports, restarts) is `EngineActor`'s.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dtm_ray.cluster.actor import EngineActor
from dtm_ray.core.state import Reference


class ServedActor(EngineActor):
    EDITS = False

    def info(self) -> dict[str, Any]:
        """`EngineActor.info`, plus the VLLM_* environment the engine read: it picks kernels
        (on CPUs with AMX, vLLM serves 4-bit weights with int8 activations unless
        VLLM_CPU_INT4_W4A8=0), so a compare records what it measured."""
        env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("VLLM_")}
        if self.engine_kind == "vllm":  # the switch's effective value, set or not
            from vllm import envs

            env["VLLM_CPU_INT4_W4A8"] = str(int(envs.VLLM_CPU_INT4_W4A8))
        return {**super().info(), "vllm_env": env}

    def built_by(self) -> dict[str, Any]:
        return {"worker": self.worker, "engine": self.engine_kind, "dtype": self.dtype}

    def reference(self, prefixes: np.ndarray, n_new: int) -> tuple[Reference, dict[str, Any]]:
        """The model's greedy continuation of `prefixes` and its own teacher-forced scoring of
        it, and who built it."""
        return self.session.build_reference(prefixes, n_new), self.built_by()

    def score_chunk(self, sequences: np.ndarray, n_prefix: int) -> dict[str, Any]:
        """Teacher-forced argmax, margin and reference log-probability over the continuation
        of each (prefix ++ continuation) sequence of one chunk."""
        start = time.perf_counter()
        scored = self.session.engine.score(np.asarray(sequences).tolist(), n_prefix)
        return {
            "argmax": scored.argmax,
            "margin": scored.margin,
            "logprob": scored.ref_logprob,
            "worker": self.worker,
            "seconds": time.perf_counter() - start,
        }

    def window_nll(self, windows: np.ndarray) -> np.ndarray:
        """Per-token negative log-likelihood of real-text windows [W, T] -> [W, T-1]."""
        return self.session.text_nll(windows)
