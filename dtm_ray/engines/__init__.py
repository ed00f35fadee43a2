"""Engines behind one protocol: `vllm` (production) and `hf` (transformers, fallback, reference)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dtm_ray.engines.base import DTYPES, Engine, ScoreResult

ENGINE_KINDS = ("vllm", "hf")
# Probes use prompts of a few hundred tokens; vLLM's default (the model's full context, 128k for
# Llama 3) makes start-up reserve KV cache for one full-length sequence and fail on small devices.
# The vllm engine's max_model_len when the job leaves it unset (and the model allows this much).
DEFAULT_MAX_MODEL_LEN = 2048
ENGINE_DTYPES = ("auto", *DTYPES)


@dataclass
class EngineConfig:
    """Engine options a job sets; `auto` picks per device (float32 on CPU, bfloat16 on GPU)."""

    kind: str = "vllm"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    # None: eager on CPU (compiling there costs more than it saves), CUDA graphs on GPU.
    enforce_eager: bool | None = None
    batch_size: int = 16  # hf engine: sequences per forward pass

    def __post_init__(self) -> None:
        if self.kind not in ENGINE_KINDS:
            raise ValueError(f"engine {self.kind!r} unknown; expected one of {list(ENGINE_KINDS)}")
        if self.dtype not in ENGINE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; expected one of {list(ENGINE_DTYPES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization {self.gpu_memory_utilization} must be in (0, 1]"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len {self.max_model_len} must be >= 2")
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")


def resolve_dtype(dtype: str) -> str:
    if dtype != "auto":
        return dtype
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def make_engine(model_dir: str | Path, config: EngineConfig | None = None) -> Engine:
    config = config or EngineConfig()
    dtype = resolve_dtype(config.dtype)
    if config.kind == "hf":
        from dtm_ray.engines.hf import HFEngine

        return HFEngine(model_dir, dtype=dtype, batch_size=config.batch_size)
    from dtm_ray.engines.vllm import VLLMEngine

    return VLLMEngine(
        model_dir,
        dtype=dtype,
        max_model_len=config.max_model_len,
        gpu_memory_utilization=config.gpu_memory_utilization,
        tensor_parallel_size=config.tensor_parallel_size,
        enforce_eager=config.enforce_eager,
    )


__all__ = [
    "DEFAULT_MAX_MODEL_LEN",
    "ENGINE_KINDS",
    "Engine",
    "EngineConfig",
    "ScoreResult",
    "make_engine",
    "resolve_dtype",
]
