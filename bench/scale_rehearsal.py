"""State changes at scale, rehearsed in miniature: what one engine session pays per round of a
sparsify run, in memory and time, on a random-weight Llama built on this machine (no hub).

    python -m bench.scale_rehearsal                      # hidden 1024, 16 layers, fp32, hf
    python -m bench.scale_rehearsal --size 1b            # ~1.1 B
    python -m bench.scale_rehearsal --engine vllm --out DIR

Every round r = 1..R moves every selected weight (q, k, v, o, gate, up, down of the chosen
layers) one link further, as a sparsify round that prunes everything does: magnitude at
sparsity 0.1 r (`--criterion wanda`: wanda with fresh statistics each round). Per round it
measures, for one session (what each engine actor holds):
- the state change: seconds, and the peak resident memory above the resident model during it
  (the kernel's high-water mark, reset before the change), the weight bytes handed to the
  engine's `set_weights`, and the weight bytes passed between processes (vllm: every weight
  its edits load goes to the engine core and on to each worker rank);
- four probes on top of the state: seconds each, and the same two byte counts;
- the replay a restarted actor (or an export) runs to rebuild the round's state from the
  originals: seconds for every selected weight.
Run it against two checkouts to compare code versions (bench/README.md says how); the JSON holds
every figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    KINDS,
    SHAPES,
    Results,
    add_output_arguments,
    markdown_table,
    random_llama,
    weight_name,
)
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines import EngineConfig, make_engine
from dtm_ray.engines.config import ORIGINAL_CACHE_BYTES
from dtm_ray.engines.probe import build_reference
from dtm_ray.engines.session import EngineSession


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SHAPES), default="small", help="the random Llama")
    p.add_argument("--select-layers", type=int, default=0, help="0: every layer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--criterion", choices=["magnitude", "wanda"], default="magnitude")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--push-mib", type=int, default=512, help="state_push_bytes, where known")
    p.add_argument(
        "--original-cache-mib",
        type=int,
        default=ORIGINAL_CACHE_BYTES >> 20,
        help="original_cache_bytes: the engine's LRU of checkpoint originals (host memory)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    add_output_arguments(p)
    return p.parse_args(argv)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_above(before: int) -> float | None:
    """Peak GPU memory allocated since `reset_peak` above `before` bytes, in MiB."""
    if not torch.cuda.is_available():
        return None
    return (torch.cuda.max_memory_allocated() - before) / 2**20


class Counting:
    """The engine, with the weight bytes handed to `set_weights` counted, and for vllm the weight
    bytes its edits pass to vLLM's engine core and workers (`set_weights` and `restore` both end
    in `_load`, in every code version): weights passed between processes."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.bytes, self.crossed = engine, 0, 0
        load = getattr(engine, "_load", None)
        if load is not None:

            def counted(weights: list) -> None:
                self.crossed += sum(tensor.nbytes for _, tensor in weights)
                load(weights)

            engine._load = counted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self.bytes += sum(w.nbytes for w in weights.values())
        self.engine.set_weights(weights)

    def reset(self) -> None:
        self.bytes = self.crossed = 0


def counting(engine: Any) -> Counting:
    """`Counting(engine)`, whose class also names the engine's in-place edit methods: the
    session checks `isinstance(engine, EditsInPlace)`, which on Python >= 3.12 looks the
    methods up on the class (never through `__getattr__`), so a plain wrapper would send the
    session down the whole-tensor path and the bench would measure that instead."""
    methods = {
        name: (lambda self, *a, _name=name, **k: getattr(self.engine, _name)(*a, **k))
        for name in ("compress_in_place", "put_back", "nonzero_counts")
        if callable(getattr(engine, name, None))
    }
    return type("Counting", (Counting,), methods)(engine)


def original_cache_bytes(engine: Any) -> int:
    """Bytes the engine holds in its LRU of checkpoint originals: a declared budget
    (`original_cache_bytes`), filled by the first edit of each weight, counted apart from the
    state change's own peak."""
    checkpoint = getattr(engine, "_checkpoint", None)
    cache = getattr(checkpoint, "_cache", {})
    return sum(t.nbytes for t in cache.values())


def state_of_round(names: list[str], r: int, criterion: str, shapes: dict) -> ModelState:
    chains = {}
    for name in names:
        links = []
        for k in range(1, r + 1):
            if criterion == "wanda":
                norm = np.random.default_rng(k).uniform(0.5, 2.0, shapes[name][1]).astype("f4")
                links.append(Link(f"wanda:{0.1 * k:g}", k, norm))
            else:
                links.append(Link(f"magnitude:{0.1 * k:g}"))
        chains[name] = tuple(links)
    return ModelState(chains)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    results = Results(args, "scale_rehearsal", __doc__)
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="dtm-rehearsal-"))
    # The weights in float32, as before: the engine casts them to --dtype when it loads.
    params = random_llama(folder, SHAPES[args.size])
    if args.engine == "vllm":
        from dtm_ray.engines.vllm import VLLMEngine

        # The built model has no tokenizer; the engine passes token ids and never detokenizes.
        vllm = VLLMEngine(
            folder,
            dtype=args.dtype,
            original_cache_bytes=args.original_cache_mib << 20,
            llm_kwargs={"skip_tokenizer_init": True},
        )
        engine = counting(vllm)
    else:
        config = EngineConfig(
            kind=args.engine, dtype=args.dtype, original_cache_bytes=args.original_cache_mib << 20
        )
        engine = counting(make_engine(folder, config))
    try:
        session = EngineSession(engine, push_bytes=args.push_mib << 20)
        push = f"{args.push_mib} MiB"
    except TypeError:  # a version without push batches
        session = EngineSession(engine)
        push = "none (whole state at once)"
    layers = range(args.select_layers or SHAPES[args.size].layers)
    names = [weight_name(i, k) for i in layers for k in KINDS]
    shapes = {n: tuple(engine.original_weight(n).shape) for n in names}
    selected = sum(int(np.prod(s)) for s in shapes.values())
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    high = min(30000, SHAPES[args.size].vocab)  # 30000: the draws of the 32000-token shapes
    prefixes = np.random.default_rng(0).integers(3, high, size=(8, 16))
    reference = build_reference(engine, prefixes, 16)
    resident = rss_kib("VmRSS")
    rounds = []
    for r in range(1, args.rounds + 1):
        state = state_of_round(names, r, args.criterion, shapes)
        engine.reset()
        reset_peak()
        gpu_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        start = time.perf_counter()
        session.apply_state(state)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        change_s = time.perf_counter() - start
        peak_above = rss_kib("VmHWM") - resident
        cache = original_cache_bytes(engine.engine)
        gpu_peak = gpu_peak_above(gpu_before)
        change_bytes, change_crossed = engine.bytes, engine.crossed
        engine.reset()
        probes = [names[len(names) // 4], names[len(names) // 2], names[-1], names[0]]
        probe_s = []
        for name in probes:
            start = time.perf_counter()
            session.probe({name: "magnitude:0.9"}, reference)
            probe_s.append(time.perf_counter() - start)
        probe_bytes, probe_crossed = engine.bytes / len(probes), engine.crossed / len(probes)
        start = time.perf_counter()
        for name in names:  # as a restarted actor rebuilds the state (on the engine's device)
            session.replay(name, state.chain(name))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        replay_s = time.perf_counter() - start
        rounds.append(
            {
                "round": r,
                "state_change_s": change_s,
                "peak_above_model_mib": peak_above / 1024,
                # The originals' LRU (a budget of its own, kept between rounds), and the peak
                # beside the model and that cache: what the push budget bounds.
                "original_cache_mib": cache / 2**20,
                "peak_above_model_and_cache_mib": peak_above / 1024 - cache / 2**20,
                "gpu_peak_above_model_mib": gpu_peak,
                "state_change_weight_mib": change_bytes / 2**20,
                "probe_s": float(np.median(probe_s)),
                "probe_weight_mib": probe_bytes / 2**20,
                # Weights passed between processes (vllm: to the engine core and its workers).
                "state_change_crossed_mib": change_crossed / 2**20,
                "probe_crossed_mib": probe_crossed / 2**20,
                "restart_replay_s": replay_s,
            }
        )
        row = rounds[-1]
        gpu = "" if gpu_peak is None else f" (GPU +{gpu_peak:.0f} MiB)"
        print(
            f"round {r}: state change {change_s:6.2f} s, peak +{row['peak_above_model_mib']:7.0f} "
            f"MiB{gpu} above the model ({row['original_cache_mib']:.0f} MiB of it the originals' "
            f"cache), {row['state_change_weight_mib']:7.0f} MiB handed over, "
            f"{row['state_change_crossed_mib']:7.0f} MiB between processes; "
            f"probe {row['probe_s']:.2f} s ({row['probe_weight_mib']:.1f} MiB handed over, "
            f"{row['probe_crossed_mib']:.1f} MiB between processes, each); "
            f"restart replay {replay_s:.2f} s",
            flush=True,
        )
    engine.close()
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params,
        "selected_weights": len(names),
        "selected_mib": selected * itemsize / 2**20,
        "resident_model_mib": resident / 1024,
        "push_budget": push,
        "rounds": rounds,
        "round_last_vs_first_state_change": rounds[-1]["state_change_s"]
        / rounds[0]["state_change_s"],
    }
    columns = [
        ("state change s", "state_change_s", "{:.2f}"),
        ("peak above model MiB", "peak_above_model_mib", "{:.0f}"),
        ("of it originals' cache MiB", "original_cache_mib", "{:.0f}"),
        ("GPU peak above model MiB", "gpu_peak_above_model_mib", "{:.0f}"),
        ("handed over MiB", "state_change_weight_mib", "{:.0f}"),
        ("between processes MiB", "state_change_crossed_mib", "{:.0f}"),
        ("probe s", "probe_s", "{:.2f}"),
        ("restart replay s", "restart_replay_s", "{:.2f}"),
    ]
    table = markdown_table(
        ["round", *(c[0] for c in columns)],
        [
            [r["round"], *("-" if r[k] is None else f.format(r[k]) for _, k, f in columns)]
            for r in rounds
        ],
    )
    heading = (
        f"{args.engine} engine, {args.criterion}, {params / 1e6:.0f} M parameters ({args.dtype}), "
        f"{len(names)} selected weights ({result['selected_mib']:.0f} MiB), push budget {push}"
    )
    results.write(result, [(heading, table)])
    return result


if __name__ == "__main__":
    main()
