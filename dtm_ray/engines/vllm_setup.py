"""How vLLM is set up in this process before it builds an engine: what it will run on (its own
platform detection), the batch-invariant mode in the environment its workers inherit, and the
CPU build's traps, handled here, never in user config: in-process engine core, one torch thread
per engine (each tensor-parallel rank its share), an explicit KV-cache size, a vLLM cache folder
under dtm_ray's own cache, and the process state vLLM's CPU start-up changes put back.
oneDNN/AMX weight packing is turned off in the worker module (`dtm_ray.engines.vllm_worker`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


def on_cpu() -> bool:
    # vLLM's own platform detection (NVML, no CUDA init), so we agree with what vLLM will do.
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def device() -> tuple[str, tuple[int, int] | None]:
    """What vLLM will run on, by its own platform detection: ("cuda" for NVIDIA, "rocm", "xpu",
    "cpu", ...) and the GPU's compute capability (major, minor) where it has one."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu", None
    if current_platform.is_cuda():
        capability = current_platform.get_device_capability()
        return "cuda", (capability.major, capability.minor) if capability else None
    if current_platform.is_rocm():
        return "rocm", None
    return str(getattr(current_platform, "device_type", "") or "unknown"), None


def set_batch_invariant(on: bool) -> None:
    """VLLM_BATCH_INVARIANT for the engine about to be built and the worker processes it starts
    (they inherit this process's environment). Set either way: a value left in the environment
    must not turn the mode on where it cannot run (its Triton kernels on a CPU)."""
    os.environ["VLLM_BATCH_INVARIANT"] = "1" if on else "0"


def cpu_env_defaults(tensor_parallel_size: int) -> None:
    """Environment the CPU build needs, set before vLLM builds an engine; explicit values win."""
    if tensor_parallel_size > 1:
        # vLLM binds each rank's threads to a NUMA node of its own and refuses to start on a
        # machine with fewer nodes than ranks (most machines, and every Ray actor shares its
        # node's cores anyway): unbound, each rank runs the threads `rank_threads` gives it.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # In-process engine core: no spawned child, so the thread count set here is the one that runs
    # the model, and entry scripts need no `if __name__ == "__main__"` guard.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM writes compile caches and model info under ~/.cache/vllm otherwise.
    from dtm_ray.engines.models import cache_dir

    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache_dir().parent / "vllm"))


def cpu_threads_default() -> int:
    """OMP_NUM_THREADS when the user (or Ray, per actor) set it, else one thread per engine."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    set_by_vllm = os.environ.get("VLLM_OMP_NUM_THREADS_SET_BY_VLLM") == "1"
    return int(value) if value.isdigit() and int(value) > 0 and not set_by_vllm else 1


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """Undo what vLLM's CPU start-up changes for the whole process that the engine no longer needs.

    The CPU worker swaps torch.set_num_threads for a no-op (guarding a thread binding that
    in-process mode never does), and the CPU platform adds tcmalloc and libgomp to LD_PRELOAD for
    the workers it spawns during start-up. Left in place, other engines and user code could no
    longer set threads, and every later subprocess (Ray's raylet and workers) would preload them.
    """
    set_num_threads = torch.set_num_threads
    preload = os.environ.get("LD_PRELOAD")
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if preload is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = preload


def _kv_bytes_per_token(config: dict[str, Any], dtype: torch.dtype) -> int:
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    layers = config.get("num_hidden_layers", 1)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * itemsize


def cpu_kv_cache_bytes(
    config: dict[str, Any], dtype: torch.dtype, max_model_len: int, budget: int
) -> int:
    # At least two full-length sequences, so a big model's start-up check still passes.
    return max(budget, 2 * max_model_len * _kv_bytes_per_token(config, dtype))


@contextlib.contextmanager
def engine_threads(cpu_threads: int | None) -> Iterator[None]:
    """Run vLLM with `cpu_threads` torch threads (None: leave them), then give the process its
    count back.

    One thread per engine is far faster than torch's default (one per core) on a busy small
    box: ~50x measured on 2 cores.
    torch._C.set_num_threads is the real setter even while vLLM has patched the alias.
    """
    if cpu_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch._C.set_num_threads(cpu_threads)
    try:
        yield
    finally:
        torch._C.set_num_threads(before)


@contextlib.contextmanager
def rank_threads(on_cpu: bool, cpu_threads: int | None, ranks: int) -> Iterator[None]:
    """On CPU with tensor parallelism and unbound ranks: each worker process the engine
    starts runs its share of `cpu_threads` (OMP_NUM_THREADS, which the workers read at
    start); the variable is given back afterwards."""
    unbound = os.environ.get("VLLM_CPU_OMP_THREADS_BIND") == "nobind"
    if not (on_cpu and ranks > 1 and unbound):
        yield
        return
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_threads // ranks))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before
