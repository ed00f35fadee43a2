"""Engines behind one protocol (`base.Engine`): `vllm` (production) and `hf` (transformers,
fallback and reference). Importing this package loads no torch: `make_engine` does."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dtm_ray.engines.config import EngineConfig

if TYPE_CHECKING:
    from dtm_ray.engines.base import Engine


def resolve_dtype(dtype: str) -> str:
    """What `auto` means on this process's device: bfloat16 on a GPU, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def make_engine(
    model_dir: str | Path, config: EngineConfig | None = None, edits: bool = True
) -> Engine:
    """The engine `config` names, loaded from `model_dir`. `edits=False`: the model as its
    engine serves it, for generating and scoring only (vLLM then runs without dtm_ray's worker
    extension, see `VLLMEngine`); the hf engine loads the same way either way."""
    config = config or EngineConfig()
    dtype = resolve_dtype(config.dtype)
    if config.kind == "hf":
        from dtm_ray.engines.hf import HFEngine

        return HFEngine(
            model_dir,
            dtype=dtype,
            batch_size=config.batch_size,
            residual_cache_bytes=config.residual_cache_bytes,
            original_cache_bytes=config.original_cache_bytes,
            residual_host_bytes=config.residual_host_bytes,
        )
    from dtm_ray.engines.vllm import VLLMEngine

    return VLLMEngine(
        model_dir,
        dtype=dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
        cpu_kv_cache_bytes=config.cpu_kv_cache_bytes,
        original_cache_bytes=config.original_cache_bytes,
        residual_cache_bytes=config.residual_cache_bytes,
        residual_host_bytes=config.residual_host_bytes,
        batch_invariant=config.batch_invariant,
        edits=edits,
    )


__all__ = ["EngineConfig", "make_engine", "resolve_dtype"]
