"""The engine settings a job sets (`engine`, `dtype`, `engine_options`), with every default and
every memory budget in one place. No torch here: the job layer validates these before any engine
or tensor library loads."""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_KINDS = ("vllm", "hf")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENGINE_DTYPES = ("auto", *DTYPE_NAMES)
# Probes use prompts of a few hundred tokens; vLLM's default (the model's full context, 128k for
# Llama 3) makes start-up reserve KV cache for one full-length sequence and fail on small devices.
# The vllm engine's max_model_len when the job leaves it unset (and the model allows this much).
DEFAULT_MAX_MODEL_LEN = 2048

_GIB = 1 << 30
# Memory budgets, per engine, in bytes. Each buys speed, never a different result.
# Layer skip: the current model's residual stream (every layer's input, or every k-th one's).
RESIDUAL_CACHE_BYTES = 2 * _GIB
# The session's current (compressed) weights, kept so repeated probes need not replay chains.
STATE_CACHE_BYTES = 1 * _GIB
# A state change writes its new weights in batches of about this many bytes: the memory a state
# change takes beside the model (and, on vllm, what one call ships to the workers).
STATE_PUSH_BYTES = 512 << 20
# vllm: checkpoint originals read back for restores (an LRU over safetensors reads).
ORIGINAL_CACHE_BYTES = 2 * _GIB
# vllm on CPU: the KV cache (vLLM's own memory check fails on small machines without it); at
# least two full-length sequences are reserved whatever this says.
CPU_KV_CACHE_BYTES = 1 * _GIB


def residual_stride(per_layer_bytes: int, layers: int, budget: int) -> int:
    """Keep the input of every k-th decoder layer, k the smallest that fits `budget` bytes."""
    return max(1, -(-per_layer_bytes * layers // budget))


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a number of bytes >= 0, got {value!r}")


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
    residual_cache_bytes: int = RESIDUAL_CACHE_BYTES  # 0 turns layer skip off
    state_cache_bytes: int = STATE_CACHE_BYTES
    state_push_bytes: int = STATE_PUSH_BYTES
    original_cache_bytes: int = ORIGINAL_CACHE_BYTES  # vllm
    cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES  # vllm on CPU

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
        if self.state_push_bytes == 0:
            raise ValueError("state_push_bytes must be > 0: a state change must write something")
        budgets = ("residual_cache_bytes", "state_cache_bytes", "state_push_bytes")
        for name in (*budgets, "original_cache_bytes", "cpu_kv_cache_bytes"):
            _check_bytes(name, getattr(self, name))
