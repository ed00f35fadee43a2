"""Probes per hour: dtm_ray's engine sessions against the loop people write today, side by side.

    python -m bench.probe_speed                       # SmolLM2, 16 prompts x (16 + 32), 1 thread
    python -m bench.probe_speed --methods naive hf --threads 2

Per thread: every method on one thread, one after the other. Per machine (`--workers W`, default
the core count): the naive loop with W threads against W dtm_ray sessions of one thread each in
W processes at once, as `dtm-ray run` places W engine actors on this machine. The engines tell
malloc to keep freed memory (`keep_freed_memory`); the naive loops run with the C library's
defaults, as people run them (per thread: before any engine starts in this process; per machine:
in fresh processes), and per machine once more with that setting (`naive+heap`).

The same probes (one weight each, `--spec`), prompts and N for every method, in one invocation:
- naive:   copy the model, compress one weight, batched `generate(do_sample=False)`, compare with
           the dense model's cached greedy output (what a researcher writes with transformers);
- single:  the same, one prompt at a time;
- hf-full: dtm_ray's session on the hf engine, every probe a full teacher-forced pass;
- hf:      the same with layer skip (a probe on layer L starts from the residual stream at L);
- vllm-full, vllm: dtm_ray's session on the vllm engine, without and with layer skip.
FDT must agree across all of them; SDT across the dtm_ray methods (the naive loops see only the
first divergence). Times are per probe, wall clock and this process's CPU time (the box may be
shared: CPU time is the steadier figure; ratios are taken on both).

Also: where a probe's time goes (compress, write, forward, result extraction, put-back), the
FLOPs the metrics need per probe against this machine's measured fp32 matmul FLOP/s per thread,
and (`--grid`) how the cost grows with N, prompts and model size on random Llama configs.
Prints the tables and writes them with a JSON of every figure (`--out DIR`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    KINDS,
    LlamaShape,
    Results,
    add_output_arguments,
    greedy,
    markdown_table,
    random_llama,
    weight_name,
)
from dtm_ray.core.compress import compress
from dtm_ray.core.metrics import first_divergent_token
from dtm_ray.engines.base import keep_freed_memory, token_stats
from dtm_ray.engines.config import RESIDUAL_CACHE_BYTES
from dtm_ray.engines.prompts import load_prompts
from dtm_ray.engines.session import EngineSession
from dtm_ray.engines.sources import node_folder

METHODS = ["naive", "single", "hf-full", "hf", "vllm-full", "vllm"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="HF folder or known model name")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prefix", type=int, default=16, help="prompt tokens, BOS included")
    p.add_argument("--new", type=int, default=32, help="N: generated / scored tokens per prompt")
    p.add_argument("--spec", default="magnitude:0.5")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 10, 20, 29])
    p.add_argument("--kinds", nargs="+", default=["q", "down"], choices=KINDS)
    p.add_argument("--threads", type=int, default=1, help="torch threads (every method)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=METHODS,
        choices=METHODS,
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="per-machine comparison: naive with this many threads against this many "
        "one-thread sessions in parallel (0: skip it)",
    )
    p.add_argument("--single-probes", type=int, default=2, help="probes for the slow `single`")
    p.add_argument("--grid", action="store_true", help="also: cost against N, prompts, size")
    add_output_arguments(p)
    return p.parse_args(argv)


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


# --- the loops people write today -----------------------------------------------------------------
def load_hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def naive_probe(
    model: Any, name: str, spec: str, prefixes: np.ndarray, base: np.ndarray, batch: int
) -> np.ndarray:
    """Copy the model, compress one weight, generate, compare: FDT per prompt."""
    probe = copy.deepcopy(model)
    weight = dict(probe.named_parameters())[name]
    with torch.no_grad():
        weight.copy_(compress(weight.detach(), spec))
    fdt = first_divergent_token(base, greedy(probe, prefixes, base.shape[1], batch))
    del probe
    return fdt


# --- dtm_ray -----------------------------------------------------------------------------------
def session_for(method: str, model_dir: Path, prompts: int, threads: int) -> EngineSession:
    budget = 0 if method.endswith("-full") else RESIDUAL_CACHE_BYTES  # 0 turns layer skip off
    if method.startswith("hf"):
        from dtm_ray.engines.hf import HFEngine

        return EngineSession(HFEngine(model_dir, batch_size=prompts, residual_cache_bytes=budget))
    from dtm_ray.engines.vllm import VLLMEngine

    return EngineSession(
        VLLMEngine(model_dir, dtype="float32", cpu_threads=threads, residual_cache_bytes=budget)
    )


def timed_probe(session: EngineSession, name: str, spec: str, reference: Any) -> dict[str, Any]:
    """One probe through the session's steps, each timed (the same steps as `probe`): the
    engine compresses and writes the weight where it lives (`compress`; `write` stays 0), scores,
    and puts its own copy back."""
    parts = {k: Clock() for k in ("compress", "write", "score", "put_back")}
    from dtm_ray.core.state import Link
    from dtm_ray.engines.probe import score_against

    from_layer = session._first_layer({name: spec}, reference)
    with parts["compress"]:
        session.engine.compress_in_place({name: (Link(spec),)}, keep=True)
    with parts["score"]:
        result = score_against(session.engine, reference, from_layer)
    with parts["put_back"]:
        session.engine.put_back([name])
    return {"result": result, "parts": parts, "from_layer": from_layer}


def extraction_seconds(vocab: int, prompts: int, n_new: int) -> float:
    """The engines' result extraction (`token_stats`: log-softmax, top-2, gather) on logits of
    the N scored positions, as the hf engine's lm_head returns them."""
    logits = torch.randn(prompts, n_new, vocab)
    targets = torch.randint(0, vocab, (prompts, n_new))
    token_stats(logits, targets)
    with Clock() as clock:
        for _ in range(3):
            token_stats(logits, targets)
    return clock.cpu / 3


# --- FLOPs -------------------------------------------------------------------------------------
def probe_flops(config: dict, layer: int, prompts: int, tokens: int, n_new: int) -> float:
    """FLOPs a probe's metrics need: layers `layer`.. over every position (attention needs them
    all), the final norm aside, and the lm_head over the N scored positions only."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    linear = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2 + 3 * hidden * inter
    causal_pairs = tokens * (tokens + 1) / 2
    per_layer = 2 * linear * tokens + 2 * 2 * heads * head_dim * causal_pairs
    layers = config["num_hidden_layers"] - layer
    return prompts * (layers * per_layer + 2 * hidden * config["vocab_size"] * n_new)


def matmul_flops_per_s(rows: int, inner: int, cols: int) -> float:
    """fp32 matmul FLOP/s of one thread (CPU time, like the probes'), on a shape like the
    model's largest matmuls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    a @ b
    best = float("inf")
    for _ in range(5):
        with Clock() as clock:
            for _ in range(5):
                a @ b
        best = min(best, clock.cpu / 5)
    torch.set_num_threads(before)
    return 2 * rows * inner * cols / best


# --- the comparison ----------------------------------------------------------------------------
def compare(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    config = json.loads((model_dir / "config.json").read_text())
    prefixes = load_prompts("pydoc", model_dir, args.prompts, args.prefix)
    names = [weight_name(layer, kind) for layer in args.layers for kind in args.kinds]
    model = load_hf_model(model_dir)
    base = greedy(model, prefixes, args.new, args.prompts)  # cached once, as the naive loop would
    rows: dict[str, dict[str, Any]] = {}
    fdts: dict[str, dict[str, np.ndarray]] = {}
    sdts: dict[str, dict[str, np.ndarray]] = {}

    for method in args.methods:
        if method in ("naive", "single"):
            batch = args.prompts if method == "naive" else 1
            probed = names if method == "naive" else names[: args.single_probes]
            naive_probe(model, probed[0], args.spec, prefixes[:2], base[:2], batch)  # warm-up
            clock = Clock()
            fdts[method] = {}
            for name in probed:
                with clock:
                    fdts[method][name] = naive_probe(model, name, args.spec, prefixes, base, batch)
            rows[method] = {
                "probes": len(probed),
                "wall_s": clock.wall / len(probed),
                "cpu_s": clock.cpu / len(probed),
            }
            continue
        session = session_for(method, model_dir, args.prompts, args.threads)
        reference = session.build_reference(prefixes, args.new)
        if not np.array_equal(reference.continuation, base):
            print(
                f"note: {method}'s greedy reference differs from transformers' on "
                f"{int((reference.continuation != base).any(axis=1).sum())} prompts"
            )
        timed_probe(session, names[0], args.spec, reference)  # warm-up (and the kept stream)
        totals, parts = Clock(), {k: 0.0 for k in ("compress", "write", "score", "put_back")}
        fdts[method], sdts[method] = {}, {}
        flops = 0.0
        for name in names:
            with totals:
                done = timed_probe(session, name, args.spec, reference)
            for key, clock in done["parts"].items():
                parts[key] += clock.cpu
            fdts[method][name], sdts[method][name] = done["result"].fdt, done["result"].sdt
            # What the metrics need: the layers from the probed one up, whatever the method ran.
            layer = int(name.split(".")[2])
            flops += probe_flops(config, layer, args.prompts, args.prefix + args.new, args.new)
        rows[method] = {
            "probes": len(names),
            "wall_s": totals.wall / len(names),
            "cpu_s": totals.cpu / len(names),
            **{f"{k}_cpu_s": v / len(names) for k, v in parts.items()},
            "needed_gflop_per_probe": flops / len(names) / 1e9,
        }
        if method.startswith("hf"):
            rows[method]["extraction_cpu_s"] = extraction_seconds(
                config["vocab_size"], args.prompts, args.new
            )
        session.engine.close()

    full_flops = probe_flops(config, 0, args.prompts, args.prefix + args.new, args.new)
    peak = matmul_flops_per_s(
        args.prompts * (args.prefix + args.new), config["hidden_size"], config["intermediate_size"]
    )
    for row in rows.values():
        row["probes_per_hour"] = 3600 / row["wall_s"]
        if "needed_gflop_per_probe" in row:
            # Score time only: the FLOPs counted are the scoring pass's.
            row["matmul_share"] = row["needed_gflop_per_probe"] * 1e9 / row["score_cpu_s"] / peak
    agree = agreement(fdts, sdts)
    return {
        "rows": rows,
        "agreement": agree,
        "matmul_gflops_per_thread": peak / 1e9,
        "full_pass_gflop": full_flops / 1e9,
        "probes": names,
    }


def agreement(fdts: dict, sdts: dict) -> dict[str, Any]:
    """FDT of every method against every other on the probes both ran; SDT across dtm_ray's."""
    out = {}
    methods = list(fdts)
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            shared = [n for n in fdts[a] if n in fdts[b]]
            same = sum(int(np.array_equal(fdts[a][n], fdts[b][n])) for n in shared)
            out[f"fdt {a}={b}"] = f"{same}/{len(shared)} probes"
    sessions = list(sdts)
    for i, a in enumerate(sessions):
        for b in sessions[i + 1 :]:
            same = sum(int(np.array_equal(sdts[a][n], sdts[b][n])) for n in sdts[a])
            out[f"sdt {a}={b}"] = f"{same}/{len(sdts[a])} probes"
    return out


# --- per machine: W one-thread sessions at once against the naive loop on W threads -----------
def _session_worker(
    method: str,
    model_dir: str,
    prefixes: np.ndarray,
    n_new: int,
    names: list[str],
    spec: str,
    barrier: Any,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    session = session_for(method, Path(model_dir), len(prefixes), 1)
    reference = session.build_reference(prefixes, n_new)
    session.probe({names[0]: spec}, reference)  # warm-up (and the kept stream)
    barrier.wait()
    start = time.perf_counter()
    fdt = {name: session.probe({name: spec}, reference).fdt for name in names}
    wall = time.perf_counter() - start
    session.engine.close()
    return {"wall": wall, "fdt": fdt}


def _naive_worker(
    model_dir: str,
    prefixes: np.ndarray,
    base: np.ndarray,
    names: list[str],
    spec: str,
    threads: int,
    batch: int,
    heap: bool,
) -> dict[str, Any]:
    """The naive loop in a fresh process: glibc's default malloc settings, or (`heap`) the ones
    dtm_ray's engines set, to show how much of the difference that setting is."""
    torch.set_num_threads(threads)
    if heap:
        keep_freed_memory()
    model = load_hf_model(Path(model_dir))
    naive_probe(model, names[0], spec, prefixes[:2], base[:2], batch)  # warm-up
    start = time.perf_counter()
    fdt = {n: naive_probe(model, n, spec, prefixes, base, batch) for n in names}
    return {"s_per_probe": (time.perf_counter() - start) / len(names), "fdt": fdt}


def per_machine(
    args: argparse.Namespace,
    model_dir: Path,
    prefixes: np.ndarray,
    base: np.ndarray,
    names: list[str],
) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = args.workers
    out: dict[str, Any] = {"workers": workers}
    context = multiprocessing.get_context("spawn")
    loops = [("naive", names, len(prefixes), False), ("naive+heap", names, len(prefixes), True)]
    if "single" in args.methods:
        loops.append(("single", names[: args.single_probes], 1, False))
    naive_fdt = {}
    for label, probed, batch, heap in loops:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            done = pool.submit(
                _naive_worker,
                str(model_dir),
                prefixes,
                base,
                probed,
                args.spec,
                workers,
                batch,
                heap,
            ).result()
        out[label] = {"s_per_probe": done["s_per_probe"], "threads": workers}
        if label == "naive":
            naive_fdt = done["fdt"]
    for method in [m for m in args.methods if m in ("hf", "vllm")]:
        with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
            barrier = manager.Barrier(workers)
            futures = [
                pool.submit(
                    _session_worker,
                    method,
                    str(model_dir),
                    prefixes,
                    args.new,
                    names[i::workers],
                    args.spec,
                    barrier,
                )
                for i in range(workers)
            ]
            results = [f.result() for f in futures]
        fdt = {name: f for r in results for name, f in r["fdt"].items()}
        same = sum(int(np.array_equal(fdt[n], naive_fdt[n])) for n in names)
        out[method] = {
            "s_per_probe": max(r["wall"] for r in results) / len(names),
            "processes": workers,
            "fdt_equal_naive": f"{same}/{len(names)}",
        }
        out[method]["x_naive"] = out["naive"]["s_per_probe"] / out[method]["s_per_probe"]
        out[method]["x_naive_heap"] = out["naive+heap"]["s_per_probe"] / out[method]["s_per_probe"]
        if "single" in out:
            out[method]["x_single"] = out["single"]["s_per_probe"] / out[method]["s_per_probe"]
    return out


# --- cost growth -------------------------------------------------------------------------------
def probe_cpu_seconds(
    model_dir: Path, prompts: int, prefix: int, n_new: int, spec: str, layers: list[int], skip: bool
) -> float:
    from dtm_ray.engines.hf import HFEngine

    engine = HFEngine(
        model_dir, batch_size=prompts, residual_cache_bytes=RESIDUAL_CACHE_BYTES if skip else 0
    )
    session = EngineSession(engine)
    rng = np.random.default_rng(0)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    reference = session.build_reference(rng.integers(3, vocab, size=(prompts, prefix)), n_new)
    names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in layers]
    session.probe({names[0]: spec}, reference)  # warm-up
    clock = Clock()
    for name in names:
        with clock:
            session.probe({name: spec}, reference)
    engine.close()
    return clock.cpu / len(names)


def grid(args: argparse.Namespace, model_dir: Path) -> list[dict[str, Any]]:
    """Per-probe CPU seconds against N, prompts and model size (hf engine, layer skip on/off)."""
    out = []
    config = json.loads((model_dir / "config.json").read_text())
    layers = [config["num_hidden_layers"] // 4, config["num_hidden_layers"] * 3 // 4]
    for n_new in (16, 32, 64, 128):
        for skip in (False, True):
            s = probe_cpu_seconds(
                model_dir, args.prompts, args.prefix, n_new, args.spec, layers, skip
            )
            out.append({"vary": "N", "value": n_new, "skip": skip, "cpu_s": s})
    for prompts in (4, 8, 16, 32):
        for skip in (False, True):
            s = probe_cpu_seconds(
                model_dir, prompts, args.prefix, args.new, args.spec, layers, skip
            )
            out.append({"vary": "prompts", "value": prompts, "skip": skip, "cpu_s": s})
    with tempfile.TemporaryDirectory() as tmp:
        for hidden, depth in ((256, 8), (512, 8), (512, 16), (1024, 16)):
            folder = Path(tmp) / f"llama-{hidden}x{depth}"
            heads = hidden // 64
            shape = LlamaShape(hidden, depth, hidden * 8 // 3 // 64 * 64, heads, heads, 8192)
            random_llama(folder, shape, max_positions=1024)
            for skip in (False, True):
                s = probe_cpu_seconds(
                    folder,
                    args.prompts,
                    args.prefix,
                    args.new,
                    args.spec,
                    [depth // 4, depth * 3 // 4],
                    skip,
                )
                out.append({"vary": "size", "value": f"{hidden}x{depth}", "skip": skip, "cpu_s": s})
    return out


# --- output ------------------------------------------------------------------------------------
def table(rows: dict[str, dict[str, Any]]) -> str:
    naive = rows.get("naive")
    single = rows.get("single")
    head = [
        "method",
        "probes",
        "s/probe wall",
        "s/probe cpu",
        "probes/h",
        "× naive (cpu)",
        "× single (cpu)",
        "needed FLOPs / matmul peak",
    ]
    lines = []
    for method, r in rows.items():
        lines.append(
            [
                method,
                r["probes"],
                f"{r['wall_s']:.2f}",
                f"{r['cpu_s']:.2f}",
                f"{r['probes_per_hour']:.0f}",
                f"{naive['cpu_s'] / r['cpu_s']:.2f}" if naive else "-",
                f"{single['cpu_s'] / r['cpu_s']:.1f}" if single else "-",
                f"{r['matmul_share']:.0%}" if "matmul_share" in r else "-",
            ]
        )
    return markdown_table(head, lines)


def parts_table(rows: dict[str, dict[str, Any]]) -> str:
    keys = ["compress", "write", "score", "put_back"]
    head = ["method", *(f"{k} ms" for k in keys), "extraction ms", "outside score"]
    lines = []
    for method, r in rows.items():
        if "score_cpu_s" not in r:
            continue
        outside = 1 - r["score_cpu_s"] / r["cpu_s"]
        extraction = f"{1000 * r['extraction_cpu_s']:.0f}" if "extraction_cpu_s" in r else "-"
        lines.append(
            [method, *(f"{1000 * r[k + '_cpu_s']:.1f}" for k in keys), extraction, f"{outside:.1%}"]
        )
    return markdown_table(head, lines)


def machine_table(per_machine: dict[str, Any]) -> str:
    head = ["method", "s/probe wall", "× naive", "× naive+heap", "× single", "FDT = naive"]
    lines = []
    for method, r in per_machine.items():
        if not isinstance(r, dict):
            continue
        lines.append(
            [
                method,
                f"{r['s_per_probe']:.2f}",
                f"{r['x_naive']:.1f}" if "x_naive" in r else "-",
                f"{r['x_naive_heap']:.1f}" if "x_naive_heap" in r else "-",
                f"{r['x_single']:.1f}" if "x_single" in r else "-",
                r.get("fdt_equal_naive", "-"),
            ]
        )
    return markdown_table(head, lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(args, "probe_speed", __doc__)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    model_dir = node_folder(args.model)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    report: dict[str, Any] = {
        "model": Path(model_dir).name,
        "settings": settings,
        **compare(args, model_dir),
    }
    setting = (
        f"{report['model']}, {args.prompts} prompts × ({args.prefix} + {args.new}) tokens, "
        f"{len(report['probes'])} probes ({' and '.join(args.kinds)} of layers "
        f"{', '.join(map(str, args.layers))}, {args.spec})"
    )
    agreement = "\n".join(f"- {key}: {value}" for key, value in report["agreement"].items())
    sections = [
        (f"Per thread: {setting}, {args.threads} thread(s)", table(report["rows"])),
        ("Where a probe's CPU time goes", parts_table(report["rows"])),
        (
            "Agreement",
            f"{agreement}\n\nfp32 matmul: {report['matmul_gflops_per_thread']:.1f} GFLOP/s per "
            f"thread; a full pass needs {report['full_pass_gflop']:.1f} GFLOP",
        ),
    ]
    if args.workers:
        prefixes = load_prompts("pydoc", model_dir, args.prompts, args.prefix)
        base = greedy(load_hf_model(model_dir), prefixes, args.new, args.prompts)
        report["per_machine"] = per_machine(args, model_dir, prefixes, base, report["probes"])
        sections.append(
            (
                f"Per machine: the naive loops on {args.workers} threads against "
                f"{args.workers} one-thread sessions at once",
                machine_table(report["per_machine"]),
            )
        )
    if args.grid:
        report["grid"] = grid(args, model_dir)
        lines = [[r["vary"], r["value"], r["skip"], f"{r['cpu_s']:.3f}"] for r in report["grid"]]
        sections.append(
            ("Cost growth", markdown_table(["vary", "value", "layer skip", "s/probe cpu"], lines))
        )
    results.write(report, sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
