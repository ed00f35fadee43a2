"""The export's dense checkpoint, replayed shard by shard on a GPU or on all of the machine's cores.

Each selected weight is read alone from its shard (or from recovery's base, `base/round-NNN`),
moved to the replay device, cast to the run's engine dtype, its chain replayed there by
`core.compress.replay` (the engines' own function), cast to the checkpoint's dtype and brought
back; its share of zeros is counted on the device. The shard's tensors are saved together once
the last is done, and the next shard starts from nothing.

Devices: `auto` (the default) is `cuda` when torch sees a CUDA GPU, else `cpu`. The CPU replay
runs torch on every core the process may use (`os.sched_getaffinity`): a Ray worker or a driver
may have been given one OMP thread, and the export is the only work left at that point. The
replay gives the same bits on every device and thread count: pruning keeps values from the input
(`masked_fill`) by a mask made of comparisons, a k-th value and stable sorts; quantizers compute
in float32 with true divisions and round to nearest, then cast (`core.compress`). bench/gpu_check
compares the GPU's compressions against the CPU's; tests compare 1 and 2 threads byte for byte.

Memory (host; on a GPU the working copies are GPU memory and the host keeps the weight in flight):

    peak = largest shard bytes (its saved tensors, held until the shard is written)
         + one weight read in the checkpoint's dtype
         + k x largest selected weight in float32 bytes, k = 5

k measured above the input on a 4096 x 4096 weight, the result included: a 2-round wanda chain
5 (float32) / 4.5 (bf16): |w|*norm, the sort's values and int64 indices, the mask, the result;
magnitude 4 / 2.5; int4 and int8 2 / 3. The input shard's pages that safetensors maps in also
count in the process's RSS, as page cache the kernel can drop. Measured (bench/export_speed.py,
float32, 243 MiB shards): anonymous peak about twice the largest shard, as before this module,
since the C allocator keeps the previous shard's freed memory in its heap.

safetensors 0.8 saves from the tensors' memory (older versions serialised a copy first: one more
shard). The export never holds the model, only its largest shard, whatever the model's size.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from dtm_ray.core.state import Chain, ModelState
from dtm_ray.errors import ConfigError
from dtm_ray.results.model_files import is_plain_file, shards, write_file

DEVICES = ("auto", "cpu", "cuda")  # and cuda:N


def replay_device(device: str = "auto") -> torch.device:
    """The device an export replays on: `auto` is cuda when torch sees a GPU, else cpu. A device
    this machine lacks is a ConfigError naming it and what is expected."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if ":" in device else 0
        if index >= count:
            have = f"{count} CUDA GPU(s)" if count else "no CUDA GPU torch can use"
            raise ConfigError(
                f"--device {device}: this machine has {have}; use --device auto or cpu"
            )
        return torch.device(device)
    raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N")


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Torch's intra-op threads set to `threads` (None: every available core) for the block,
    restored after; yields the number used."""
    before = torch.get_num_threads()
    count = max(1, threads or available_cores())
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


def replay_on(
    weight: torch.Tensor,
    chain: Chain,
    engine_dtype: torch.dtype,
    device: torch.device,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`weight`'s chain replayed on `device` in the engine dtype (what the run measured), cast to
    `out_dtype` (default: `weight`'s), still on `device`; the same bits on every device."""
    from dtm_ray.core.compress import replay

    start = weight.to(device=device).to(engine_dtype)
    return replay(start, chain).to(out_dtype or weight.dtype).contiguous()


def write_dense(
    model_dir: Path,
    out: Path,
    state: ModelState,
    engine_dtype: torch.dtype,
    write: bool = True,
    shard_done: Callable[[Path], None] | None = None,
    device: torch.device | None = None,
    where: str = "",
) -> dict[str, tuple[float, str]]:
    """Write the dense checkpoint of `state` into `out` (only measure it when not `write`),
    replaying on `device` (default cpu); returns, per tensor found, (share of zeros, dtype name)
    as saved. `shard_done` gets each shard as soon as it is written (an export to an object store
    uploads it and frees the disk). `where`: the export's target, named when a write fails (a
    StorageError). Peak memory: see the module's docstring."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    device = device or torch.device("cpu")
    where = where or str(out)
    base = None
    if state.base is not None:
        from dtm_ray.engines.checkpoint import BaseWeights

        base = BaseWeights(state.base)
    try:
        wanted = set(state.components()) | (set(base.names) if base is not None else set())
        saved: dict[str, tuple[float, str]] = {}
        for shard in shards(model_dir):
            path = model_dir / shard
            tensors: dict[str, torch.Tensor] = {}  # the shard as saved, filled one by one
            with safe_open(path, framework="pt") as handle:
                metadata = handle.metadata()
                for name in handle.keys():  # one tensor read at a time
                    tensor = handle.get_tensor(name)
                    if name in wanted:
                        start = tensor
                        if base is not None and name in base:  # recovery's trained weight
                            start = base.get(name)
                        chain = state.chain(name)
                        replayed = replay_on(start, chain, engine_dtype, device, tensor.dtype)
                        nonzero = int(torch.count_nonzero(replayed))
                        del start, tensor
                        tensor = replayed.cpu()
                        del replayed
                    else:
                        nonzero = int(torch.count_nonzero(tensor))
                    dtype = str(tensor.dtype).removeprefix("torch.")
                    saved[name] = (1.0 - nonzero / tensor.numel(), dtype)
                    if write:
                        tensors[name] = tensor
                    del tensor
            if write:
                save = partial(save_file, tensors, out / shard, metadata=metadata)
                write_file(where, shard, save)
                del save  # it holds the shard's tensors
                if shard_done is not None:
                    shard_done(out / shard)
            del tensors  # one shard in memory at a time
    finally:
        if base is not None:
            base.close()
    for item in sorted(model_dir.iterdir() if write else ()):
        # config, tokenizer, generation config and the index (names and shapes are unchanged).
        if is_plain_file(item):
            write_file(where, item.name, lambda i=item: shutil.copy2(i, out / i.name))
    return saved
