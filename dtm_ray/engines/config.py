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
# On a GPU (both engines): the residual stream in pinned host memory when it does not fit the GPU
# budget above (512 prompts x 288 tokens of a 13B model: 1.5 GB per layer, 60 GB for all 40).
RESIDUAL_HOST_BYTES = 32 * _GIB
# The session's current (compressed) weights, kept so repeated probes need not replay chains.
STATE_CACHE_BYTES = 1 * _GIB
# A state change writes its new weights in batches of about this many bytes: the memory a state
# change takes beside the model (and, on vllm, what one call ships to the workers).
STATE_PUSH_BYTES = 512 << 20
# vllm: checkpoint originals read back for restores (an LRU over safetensors reads).
ORIGINAL_CACHE_BYTES = 2 * _GIB
# Sensitivity (fisher): calibration sequences per forward + backward pass (ModelOpt's score
# depends on the batch split, its loss being a mean per batch: compare scores of one batch size).
FISHER_BATCH_SIZE = 8
# Sensitivity (fisher): the candidates' weight changes kept in float32 during a pass; more
# candidates than fit make further passes over the calibration batches.
SENSITIVITY_DELTA_BYTES = 1 * _GIB
# vllm on CPU: the KV cache (vLLM's own memory check fails on small machines without it); at
# least two full-length sequences are reserved whatever this says.
CPU_KV_CACHE_BYTES = 1 * _GIB


# vLLM's batch-invariant mode (`VLLM_BATCH_INVARIANT=1`): every sequence's logits are the same
# bits whatever else shares its batch, so a reference built in slices on many actors and probes
# scoring all prompts at once on another agree exactly. vLLM 0.32 runs it on NVIDIA GPUs of
# compute capability >= 8.0 (Ampere, Hopper, Blackwell: its own Triton matmuls on 8.x, cuBLAS
# without split-k above) with the FlashAttention, FlexAttention or Triton attention backends.
BATCH_INVARIANT_MIN_CAPABILITY = (8, 0)


def batch_invariant_blocker(
    engine: str, device: str, capability: tuple[int, int] | None = None
) -> str | None:
    """Why an engine on `device` ("cuda" = NVIDIA, "rocm", "xpu", "cpu", ...) with compute
    `capability` (major, minor) cannot run batch-invariant; None when it can."""
    if engine != "vllm":
        return f"the {engine} engine has no batch-invariant mode (only vllm has one)"
    if device != "cuda":
        return f"vLLM's batch-invariant mode needs an NVIDIA GPU and this engine runs on {device}"
    if capability is None:
        return "the GPU's compute capability is unknown"
    if tuple(capability) < BATCH_INVARIANT_MIN_CAPABILITY:
        major, minor = BATCH_INVARIANT_MIN_CAPABILITY
        return (
            f"vLLM's batch-invariant mode needs compute capability >= {major}.{minor} and this "
            f"GPU has {capability[0]}.{capability[1]}"
        )
    return None


def resolve_batch_invariant(
    setting: bool | None, engine: str, device: str, capability: tuple[int, int] | None = None
) -> bool:
    """Whether an engine runs batch-invariant: `setting` None = where it can (the vllm engine on
    an NVIDIA GPU of capability >= 8.0), False = off; True where it cannot is a ValueError."""
    blocker = batch_invariant_blocker(engine, device, capability)
    if setting is True and blocker is not None:
        raise ValueError(f"engine_options.batch_invariant: true cannot be honoured: {blocker}")
    if setting is None:
        return blocker is None
    return bool(setting)


def describe_batch_invariance(setting: bool | None, engine: str, gpus: float) -> str:
    """What the job's actors will do, as `dtm-ray plan` says it (before any engine exists: a GPU's
    capability is known only where the engine starts)."""
    if setting is False:
        return "batch invariance: off (engine_options.batch_invariant: false)"
    if engine != "vllm" or not gpus:
        where = f"the {engine} engine" if engine != "vllm" else "the engine actors run on CPU"
        return f"batch invariance: off ({where}; the noise/ table shows each actor's noise floor)"
    if setting is True:
        return (
            "batch invariance: on (engine_options.batch_invariant: true; an engine on a GPU that "
            "cannot run it fails to start)"
        )
    return (
        "batch invariance: on where the actors' GPUs are NVIDIA with compute capability >= 8.0, "
        "off elsewhere (decided as each engine starts; recorded in run.json and noise/)"
    )


def residual_stride(per_layer_bytes: int, layers: int, budget: int) -> int:
    """Keep the input of every k-th decoder layer, k the smallest that fits `budget` bytes."""
    return max(1, -(-per_layer_bytes * layers // budget))


def residual_keep(
    per_layer_bytes: int, layers: int, device_budget: int, host_budget: int = 0
) -> tuple[int, bool]:
    """(stride, on_host) of the kept residual stream: every k-th layer's input in the device
    budget, or, where a host budget is given (an engine on a GPU) and keeps more layers, in
    pinned host memory instead."""
    stride = residual_stride(per_layer_bytes, layers, device_budget)
    if stride > 1 and host_budget > 0:
        host_stride = residual_stride(per_layer_bytes, layers, host_budget)
        if host_stride < stride:
            return host_stride, True
    return stride, False


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
    residual_host_bytes: int = RESIDUAL_HOST_BYTES  # on a GPU: the stream in host memory
    state_cache_bytes: int = STATE_CACHE_BYTES
    state_push_bytes: int = STATE_PUSH_BYTES
    original_cache_bytes: int = ORIGINAL_CACHE_BYTES
    cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES  # vllm on CPU
    # vllm: VLLM_BATCH_INVARIANT. None: on where it can be (an NVIDIA GPU of compute capability
    # >= 8.0), off elsewhere; True: required (an engine that cannot fails to start); False: off.
    batch_invariant: bool | None = None

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
        if self.batch_invariant is not None and not isinstance(self.batch_invariant, bool):
            raise ValueError(
                f"batch_invariant must be true, false or null (auto), got {self.batch_invariant!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1")
        if self.state_push_bytes == 0:
            raise ValueError("state_push_bytes must be > 0: a state change must write something")
        budgets = (
            "residual_cache_bytes",
            "residual_host_bytes",
            "state_cache_bytes",
            "state_push_bytes",
        )
        for name in (*budgets, "original_cache_bytes", "cpu_kv_cache_bytes"):
            _check_bytes(name, getattr(self, name))
