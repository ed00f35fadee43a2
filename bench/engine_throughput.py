"""Side-by-side throughput of the engines on the same work: greedy generation, teacher-forced
scoring, one weight edit + restore, and the noise floor.

    python -m bench.engine_throughput --engines vllm hf --dtype float32

Prompts come from `--source` (default `self`: BOS + seeded float32 transformers samples),
identical for every engine and dtype.
Prints a table and writes it with a JSON of every figure (`--out DIR`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import Results, add_output_arguments, markdown_table
from dtm_ray.core.compress import compress
from dtm_ray.engines.base import Engine
from dtm_ray.engines.prompts import load_prompts
from dtm_ray.engines.sources import node_folder

EDIT_SPEC = "magnitude:0.5"
EDIT_REPEATS = 5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    p.add_argument("--model", default="smollm2-135m", help="HF folder or known model name")
    p.add_argument("--source", default="self", help="prompt source, as a job's `prompts`")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prefix", type=int, default=32, help="prompt tokens, BOS included")
    p.add_argument("--new", type=int, default=64, help="generated / scored tokens per prompt")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine on CPU")
    p.add_argument("--component", default="model.layers.10.mlp.up_proj.weight")
    add_output_arguments(p)
    return p.parse_args(argv)


def make_prompts(model_dir: Path, args: argparse.Namespace) -> np.ndarray:
    """The same prompts for every engine and dtype; `self` samples with float32 transformers."""
    from dtm_ray.engines.hf import HFEngine

    maker = HFEngine(model_dir, dtype="float32", batch_size=args.prompts)
    return load_prompts(args.source, model_dir, args.prompts, args.prefix, engine=maker, seed=0)


def load_engine(kind: str, model_dir: Path, args: argparse.Namespace) -> Engine:
    if kind == "hf":
        from dtm_ray.engines.hf import HFEngine

        return HFEngine(model_dir, dtype=args.dtype, batch_size=args.prompts)
    from dtm_ray.engines.vllm import VLLMEngine

    return VLLMEngine(model_dir, dtype=args.dtype, cpu_threads=args.threads)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def digest(engine: Any) -> str:
    """One hash of all live weights, to check that restore is bit-identical."""
    if hasattr(engine, "params_digest"):
        return "".join(engine.params_digest())
    h = hashlib.sha256()
    for name, param in sorted(engine.model.named_parameters()):
        h.update(name.encode())
        h.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def edit_latency(engine: Engine, name: str) -> dict[str, Any]:
    edited = compress(engine.original_weight(name), EDIT_SPEC)
    before = digest(engine)
    times = []
    for _ in range(EDIT_REPEATS):
        _, t_set = timed(lambda: engine.set_weights({name: edited}))
        _, t_restore = timed(lambda: engine.restore([name]))
        times.append(t_set + t_restore)
    return {
        "component": name,
        "spec": EDIT_SPEC,
        "edit_restore_ms": 1000 * float(np.median(times)),
        "restore_bit_identical": digest(engine) == before,
    }


def measure(engine: Engine, prompts: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    rows = prompts.tolist()
    engine.generate_greedy(rows[:2], 4)  # warm-up: first calls allocate and build kernels
    engine.score([r + r[:4] for r in rows[:2]], args.prefix)
    greedy, t_gen = timed(lambda: engine.generate_greedy(rows, args.new))
    sequences = np.concatenate([prompts, greedy], axis=1).tolist()
    scores, t_score = timed(lambda: engine.score(sequences, args.prefix))
    positions = greedy.size
    return {
        "greedy_tokens_per_s": positions / t_gen,
        "score_positions_per_s": positions / t_score,
        "score_sequences_per_s": len(rows) / t_score,
        "noise_floor_positions": int((scores.argmax != greedy).sum()),
        "positions": positions,
        "min_margin": float(np.nanmin(scores.margin)),
        **edit_latency(engine, args.component),
        "_greedy": greedy,
        "_argmax": scores.argmax,
    }


def run_engine(
    kind: str, model_dir: Path, prompts: np.ndarray, args: argparse.Namespace, first: dict | None
) -> dict:
    engine, t_load = timed(lambda: load_engine(kind, model_dir, args))
    result = {"engine": kind, "load_s": t_load, **measure(engine, prompts, args)}
    if first is not None:  # also score the first engine's sequences, to compare like with like
        sequences = np.concatenate([prompts, first["_greedy"]], axis=1).tolist()
        result["_argmax_on_first"] = engine.score(sequences, args.prefix).argmax
    del engine
    return result


def compare(results: list[dict]) -> dict[str, Any]:
    if len(results) < 2:
        return {}
    a, b = results[0], results[1]
    return {
        "engines": [a["engine"], b["engine"]],
        "greedy_identical_prompts": int((a["_greedy"] == b["_greedy"]).all(axis=1).sum()),
        "prompts": len(a["_greedy"]),
        # Both engines' teacher-forced argmax over the same sequences (the first engine's).
        "score_argmax_identical_positions": int((a["_argmax"] == b["_argmax_on_first"]).sum()),
        "positions": int(a["_argmax"].size),
    }


def settings(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    return {
        "dtype": args.dtype,
        "threads": args.threads,
        "model": str(model_dir),
        "source": args.source,
        "prompts": args.prompts,
        "prefix": args.prefix,
        "new": args.new,
    }


def table(results: list[dict]) -> str:
    cols = [
        ("engine", "engine", "{}"),
        ("load s", "load_s", "{:.1f}"),
        ("greedy tok/s", "greedy_tokens_per_s", "{:.1f}"),
        ("score pos/s", "score_positions_per_s", "{:.1f}"),
        ("score seq/s", "score_sequences_per_s", "{:.2f}"),
        ("edit+restore ms", "edit_restore_ms", "{:.1f}"),
        ("restore exact", "restore_bit_identical", "{}"),
        ("noise floor", "noise_floor", "{}"),
    ]
    rows = []
    for r in results:
        r = {**r, "noise_floor": f"{r['noise_floor_positions']}/{r['positions']}"}
        rows.append([fmt.format(r[key]) for _, key, fmt in cols])
    return markdown_table([c[0] for c in cols], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Results(args, "engine_throughput", __doc__)
    torch.set_num_threads(args.threads)
    model_dir = node_folder(args.model)
    prompts = make_prompts(model_dir, args)
    results: list[dict] = []
    for kind in args.engines:
        results.append(run_engine(kind, model_dir, prompts, args, results[0] if results else None))
    report = {
        **settings(args, model_dir),
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        "comparison": compare(results),
    }
    sections = [("Engines", table(results))]
    if report["comparison"]:
        rows = [[k, v] for k, v in report["comparison"].items()]
        sections.append(
            ("The engines against each other", markdown_table(["figure", "value"], rows))
        )
    out.write(report, sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
