"""Export speed and memory: the dense checkpoint of a compressed state written shard by shard
(`dtm_ray.results.export_dense.write_dense`, what `dtm-ray export` runs), on one CPU thread, on
every core, and on CUDA when torch sees a GPU. Seconds, seconds per GB written, peak resident
memory (and peak GPU memory), and whether every setting wrote the same bytes.

    python -m bench.export_speed                       # ~0.67 B fp32 model, 1 GB shards
    python -m bench.export_speed --size 1b --out DIR
    python -m bench.export_speed --size tiny           # seconds: the same code path

A random-weight Llama is built on the machine (no hub). States, every linear weight of every
layer: `magnitude` (2 rounds, magnitude:0.25 then magnitude:0.5, which replays as one pass) and
`wanda` (2 rounds, wanda:0.25 and wanda:0.5 with made-up input norms, replayed link by link);
`--states` adds `int4` (int4-g128) or `int8`. Each (state, setting) runs in a fresh process, so its
peak RSS (the kernel's high-water mark) is its own. Needs torch, transformers and safetensors
only: no Ray, no vLLM, no compressed-tensors, no pyarrow.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    SHAPES,
    Results,
    add_output_arguments,
    is_linear,
    markdown_table,
    random_llama,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=list(SHAPES), default="half")
    p.add_argument("--dtype", default="float32", help="the checkpoint's and the run's dtype")
    p.add_argument("--shard-mib", type=int, default=1024, help="largest shard (save_pretrained)")
    p.add_argument("--states", default="magnitude,wanda", help="of magnitude, wanda, int4, int8")
    p.add_argument(
        "--settings",
        default="",
        help="comma-separated cpu:N (N threads), cpu (every core) and cuda "
        "(default: cpu:1, cpu, and cuda when torch sees a GPU)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of dtm_ray: every measurement also runs its code, side by side",
    )
    add_output_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one measurement, in a fresh process
    return p.parse_args(argv)


def make_state(kind: str, model_dir: Path) -> Any:
    import numpy as np
    from safetensors import safe_open

    from dtm_ray.core.state import Link, ModelState

    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if is_linear(name):
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    chains = {}
    for name, (_, columns) in sorted(shapes.items()):
        if kind == "magnitude":
            chains[name] = (Link("magnitude:0.25"), Link("magnitude:0.5"))
        elif kind == "wanda":
            rng = np.random.default_rng(len(chains))
            norms = [rng.uniform(0.5, 2.0, columns).astype("f4") for _ in range(2)]
            chains[name] = (Link("wanda:0.25", 1, norms[0]), Link("wanda:0.5", 2, norms[1]))
        elif kind == "int4":
            chains[name] = (Link("int4-g128"),)
        elif kind == "int8":
            chains[name] = (Link("int8"),)
        else:
            raise SystemExit(f"unknown state {kind!r}; expected magnitude, wanda, int4 or int8")
    return ModelState(chains)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: what a shard's tensors and
    the working copies take; file pages mapped from the checkpoint are page cache the kernel can
    drop), sampled every 10 ms on a thread."""

    def __init__(self) -> None:
        import threading

        self.peak = rss_kib("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_kib("RssAnon"))


def writer() -> Any:
    """`write_dense`, or an older version's `_write_checkpoint` (run against two checkouts with
    PYTHONPATH to compare): (model_dir, out, state, dtype name, device) -> None."""
    try:
        from dtm_ray.results.export_dense import write_dense
    except ImportError:
        from dtm_ray.results.export import _write_checkpoint

        return lambda model_dir, out, state, dtype, device: _write_checkpoint(
            model_dir, out, state, dtype
        )
    import torch

    return lambda model_dir, out, state, dtype, device: write_dense(
        model_dir, out, state, getattr(torch, dtype), device=device
    )


@contextlib.contextmanager
def threads_set(threads: int | None) -> Any:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure(task: dict[str, Any]) -> dict[str, Any]:
    """One export of one state with one setting, in this (fresh) process."""
    import torch

    model_dir, out = Path(task["model_dir"]), Path(task["out"])
    state = make_state(task["state"], model_dir)
    setting = task["setting"]
    device = torch.device("cuda" if setting == "cuda" else "cpu")
    threads = int(setting.split(":")[1]) if setting.startswith("cpu:") else None
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA's start-up is not the export's
        torch.cuda.reset_peak_memory_stats()
    write = writer()
    before, anon_before = rss_kib("VmRSS"), rss_kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    out.mkdir(parents=True, exist_ok=True)
    with threads_set(threads) as used:
        anon = AnonPeak()
        start = time.perf_counter()
        write(model_dir, out, state, task["dtype"], device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        anon_peak = anon.stop()
    files = sorted(out.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return {
        "state": task["state"],
        "setting": setting,
        "threads": used,
        "seconds": seconds,
        "bytes": sum(p.stat().st_size for p in files),
        "peak_rss_mib": rss_kib("VmHWM") / 1024,
        "peak_above_start_mib": (rss_kib("VmHWM") - before) / 1024,
        "peak_anon_above_start_mib": (anon_peak - anon_before) / 1024,
        "gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else None,
        "sha256": digest.hexdigest(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return {}
    results = Results(args, "export_speed", __doc__)
    import torch
    from safetensors import safe_open

    cores = len(os.sched_getaffinity(0))
    settings = args.settings.split(",") if args.settings else ["cpu:1", "cpu"]
    if not args.settings and torch.cuda.is_available():
        settings.append("cuda")
    folder = Path(tempfile.mkdtemp(prefix="dtm-export-speed-"))
    try:
        model_dir = folder / "model"
        start = time.perf_counter()
        params = random_llama(
            model_dir, SHAPES[args.size], dtype=args.dtype, shard_mib=args.shard_mib
        )
        built_s = time.perf_counter() - start
        shard_bytes = [p.stat().st_size for p in model_dir.glob("*.safetensors")]
        largest_weight = 0
        for path in model_dir.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    if is_linear(name):
                        shape = f.get_slice(name).get_shape()
                        largest_weight = max(largest_weight, shape[0] * shape[1] * 4)
        print(
            f"{params / 1e6:.0f} M parameters ({args.dtype}), {len(shard_bytes)} shards, largest "
            f"{max(shard_bytes) / 2**20:.0f} MiB; largest selected weight "
            f"{largest_weight / 2**20:.0f} MiB in float32; built in {built_s:.0f} s; "
            f"{cores} cores available",
            flush=True,
        )
        # Each measurement runs this module in a fresh process whose dtm_ray comes first from the
        # code measured (PYTHONPATH; run in the temporary folder, so the current folder is not
        # ahead of it), and bench from this checkout after it.
        codes = {"this": str(REPO)}
        if args.baseline:
            codes = {"baseline": str(args.baseline.resolve()), **codes}
        rows = []
        for state in args.states.split(","):
            for setting, code in ((s, c) for s in settings for c in codes):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([codes[code], str(REPO)])}
                out = folder / f"export-{state}-{setting.replace(':', '')}"
                task = {
                    "model_dir": str(model_dir),
                    "out": str(out),
                    "state": state,
                    "setting": setting,
                    "dtype": args.dtype,
                }
                done = subprocess.run(
                    [sys.executable, "-m", "bench.export_speed", "--worker", json.dumps(task)],
                    env=env,
                    cwd=folder,
                    capture_output=True,
                    text=True,
                )
                if done.returncode:
                    sys.exit(f"{state} on {setting} failed:\n{done.stderr[-3000:]}")
                row = {"code": code, **json.loads(done.stdout.strip().splitlines()[-1])}
                row["s_per_gb"] = row["seconds"] / (row["bytes"] / 1e9)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
                gpu = "" if row["gpu_peak_mib"] is None else f", GPU {row['gpu_peak_mib']:.0f} MiB"
                print(
                    f"{code:8s} {state:9s} {setting:5s} {row['threads']:2d} threads"
                    f" {row['seconds']:7.1f} s  {row['s_per_gb']:6.2f} s/GB"
                    f"  peak RSS {row['peak_rss_mib']:6.0f} MiB (+{row['peak_above_start_mib']:.0f}"
                    f" during the export, anonymous +{row['peak_anon_above_start_mib']:.0f}{gpu})"
                    f"  sha256 {row['sha256'][:12]}",
                    flush=True,
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    identical = {  # across settings and code versions
        state: len({r["sha256"] for r in rows if r["state"] == state}) == 1
        for state in args.states.split(",")
    }
    print(f"same bytes in every setting: {identical}")
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "parameters": params,
        "shards": len(shard_bytes),
        "largest_shard_mib": max(shard_bytes) / 2**20,
        "largest_weight_f32_mib": largest_weight / 2**20,
        "rows": rows,
        "identical_across_settings": identical,
    }
    table = markdown_table(
        [
            "code",
            "state",
            "setting",
            "threads",
            "s",
            "s/GB",
            "peak RSS above the start MiB (anonymous)",
            "GPU peak MiB",
        ],
        [
            [
                r["code"],
                r["state"],
                r["setting"],
                r["threads"],
                f"{r['seconds']:.1f}",
                f"{r['s_per_gb']:.2f}",
                f"{r['peak_above_start_mib']:.0f} ({r['peak_anon_above_start_mib']:.0f})",
                "-" if r["gpu_peak_mib"] is None else f"{r['gpu_peak_mib']:.0f}",
            ]
            for r in rows
        ],
    )
    heading = (
        f"{params / 1e6:.0f} M parameters ({args.dtype}), {len(shard_bytes)} shards of at most "
        f"{max(shard_bytes) / 2**20:.0f} MiB, {cores} cores; same bytes in every setting: "
        f"{identical}"
    )
    results.write(result, [(heading, table)])
    return result


if __name__ == "__main__":
    main()
