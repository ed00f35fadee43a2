"""Wall time of `dtm-ray compare` against a plain transformers loop on the same pair, side by
side in one run (same machine, same moment, same prompts).

The plain loop is what one writes without dtm_ray: load the base, generate N greedy tokens for
every prompt, load the candidate, generate again, compare the token sequences (first difference
per prompt). `dtm-ray compare` does more (each side's teacher-forced scoring with margins and
log-probabilities, both models' perplexity on real text, a run directory, a report) and starts
Ray and its actors; its time is split into its phases from run.json. Each contender runs in a
fresh process; the loop's per-prompt FDTs are checked against the compare's.

    python bench/compare_speed.py BASE CANDIDATE --engine hf --dtype float32 \
        --count 32 --prefix-tokens 32 --new-tokens 64 --workers 1 2 \
        --json docs/benchmarks/compare.json --markdown docs/benchmarks/compare.md

Needs the package on PYTHONPATH (or installed), Ray, torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The plain loop, run in its own process: argv = base, candidate, dtype, prefixes.npy, N, threads.
PLAIN_LOOP = r"""
import json, sys, time
t0 = time.monotonic()
import numpy as np, torch
from transformers import AutoModelForCausalLM
base, candidate, dtype, prefixes, n_new, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
prefixes = torch.as_tensor(np.load(prefixes), dtype=torch.long)
n_new = int(n_new)
def greedy(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    rows = []
    with torch.inference_mode():
        for start in range(0, len(prefixes), 16):
            batch = prefixes[start : start + 16]
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch),
                max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                eos_token_id=None, pad_token_id=0)
            rows.append(out[:, batch.shape[1]:].numpy())
    return np.concatenate(rows)
a = greedy(base)
t1 = time.monotonic()
b = greedy(candidate)
diff = a != b
fdt = np.where(diff.any(axis=1), diff.argmax(axis=1), diff.shape[1])
print(json.dumps({"fdt": fdt.tolist(), "base_s": t1 - t0, "candidate_s": time.monotonic() - t1,
                  "seconds": time.monotonic() - t0}))
"""


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
    return done.stdout.strip()


def run_compare(args: argparse.Namespace, workers: int, out: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "dtm_ray.cli", "compare", args.base, args.candidate,
        "--engine", args.engine, "--dtype", args.dtype,
        "--count", str(args.count), "--prefix-tokens", str(args.prefix_tokens),
        "--new-tokens", str(args.new_tokens), "--workers", str(workers), "--out", str(out),
        *(["--candidate-engine", args.candidate_engine] if args.candidate_engine else []),
        *(["--candidate-dtype", args.candidate_dtype] if args.candidate_dtype else []),
        *[item for s in args.set for item in ("--set", s)],
    ]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"compare failed ({done.returncode}): {done.stderr[-2000:]}")
    import pandas as pd

    prompts = pd.read_parquet(out / "compare" / "prompts").sort_values("prompt_id")
    summary = pd.read_parquet(out / "compare" / "summary").iloc[0]
    return {
        "command": " ".join(command[1:]),
        "workers": workers,
        "seconds": seconds,  # the whole process: imports, checks, Ray, actors, report
        "base_phase_s": float(summary["base_seconds"]),
        "candidate_phase_s": float(summary["candidate_seconds"]),
        "fdt": prompts["fdt"].tolist(),
        "fdt_at_75": int(summary["fdt_at_75"]),
        "fdt_mean": float(summary["fdt_mean"]),
    }


def run_plain(
    args: argparse.Namespace, compare_dir: Path, scratch: Path, threads: int
) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    from dtm_ray.engines.sources import node_folder

    reference = pd.read_parquet(compare_dir / "reference").sort_values("prompt_id")
    prefixes = scratch / "prefixes.npy"
    np.save(prefixes, np.stack(reference["prefix_ids"].to_numpy()))
    folders = [str(node_folder(model)) for model in (args.base, args.candidate)]
    command = [
        sys.executable, "-c", PLAIN_LOOP, *folders, args.dtype, str(prefixes),
        str(args.new_tokens), str(threads),
    ]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    if done.returncode:
        raise SystemExit(f"plain loop failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"threads": threads, "seconds": seconds, **result}


def markdown(out: dict[str, Any]) -> str:
    plain = out["plain_loop"][0]
    lines = [
        f"# `dtm-ray compare` against a plain transformers loop ({out['date']})",
        "",
        f"Command: `{out['command']}`  ",
        f"Commit: `{out['commit']}`  ",
        f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, "
        f"{out['machine']['note']}",
        "",
        f"Pair: {out['base']} (base) and {out['candidate']} (candidate), "
        f"{out['count']} prompts x {out['new_tokens']} new tokens, {out['dtype']}.",
        "",
        "| contender | wall s | base phase s | candidate phase s | per-prompt FDT equal to the "
        f"first plain loop's ({plain['threads']} thread(s)) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for p in out["plain_loop"]:
        equal = sum(a == b for a, b in zip(p["fdt"], plain["fdt"], strict=True))
        lines.append(
            f"| plain transformers loop, {p['threads']} torch thread(s), generate both | "
            f"{p['seconds']:.1f} | {p['base_s']:.1f} | {p['candidate_s']:.1f} | "
            f"{equal}/{len(plain['fdt'])} |"
        )
    for c in out["compare"]:
        equal = sum(a == b for a, b in zip(c["fdt"], plain["fdt"], strict=True))
        lines.append(
            f"| dtm-ray compare, {c['workers']} worker(s) x 1 thread | {c['seconds']:.1f} | "
            f"{c['base_phase_s']:.1f} | {c['candidate_phase_s']:.1f} | "
            f"{equal}/{len(plain['fdt'])} |"
        )
    lines += [
        "",
        "Wall s: the whole process (imports, checks, Ray start, actor starts, report). A "
        "compare's phases include starting its actors and each side's perplexity on real text, "
        "which the plain loop does not measure; the plain loop's phases include loading each "
        "model. Each compare actor runs one torch thread. The machine was shared with other "
        "work while this ran: compare the ratios within this table, not the seconds with other "
        "tables.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("candidate")
    parser.add_argument("--engine", default="hf")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--candidate-engine")
    parser.add_argument("--candidate-dtype")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--plain-threads",
        type=int,
        nargs="+",
        default=sorted({1, os.cpu_count() or 1}),
        help="torch threads of the plain loop, one run each (default: 1 and every core)",
    )
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--note", default="shared with other developers' jobs while it ran")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="compare-speed-"))
    try:
        runs = [run_compare(args, w, scratch / f"compare-w{w}") for w in args.workers]
        first = scratch / f"compare-w{args.workers[0]}"
        plain = [run_plain(args, first, scratch, threads) for threads in args.plain_threads]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = {
        "command": " ".join(["python", *sys.argv]),
        "commit": _git("rev-parse", "HEAD"),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": args.note,
        },
        "base": args.base,
        "candidate": args.candidate,
        "dtype": args.dtype,
        "count": args.count,
        "prefix_tokens": args.prefix_tokens,
        "new_tokens": args.new_tokens,
        "compare": runs,
        "plain_loop": plain,
    }
    text = markdown(out)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
