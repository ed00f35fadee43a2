"""Cross-check `dtm-ray compare` against free-running text, two ways, on finished compare runs.

For each compare run directory (both sides loadable by transformers: folders, known names), on
the run's own prompts (its `reference/` prefixes) and N = its new_tokens:

1. exact: both models generate N greedy tokens freely in plain transformers (EOS ignored, as
   dtm_ray does); the first position where the two token sequences differ. DTM's teacher-forced
   FDT equals this wherever both models' scoring agrees with their decoding.
2. after the fact (OpenVINO who_what_benchmark's `evaluate_divergency`): both continuations are
   decoded to text, re-tokenized with `tokenizer.encode` (special tokens added as it does), and
   compared with difflib's SequenceMatcher: FDT = the size of the first matching block when it
   starts both sequences, else 0; SDT = candidate tokens left unmatched.

Per prompt it records the three FDTs and, where the after-the-fact one differs from the exact
one, why: `retokenized` (decode -> encode moved the boundary: the common prefix of the
re-tokenized sequences is not the exact FDT) or `matcher` (difflib's first block is shorter than
the common prefix: it matches the longest block first, and a longer match further on cuts the
first one short). Writes JSON (`--json`) and prints a Markdown table.

    python -m bench.compare_crosscheck runs/cmp-bf16 runs/cmp-pruned --json out.json

Needs torch and transformers (plus compressed-tensors for such a candidate); no Ray.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bench.common import greedy as greedy_of

_GREEDY: dict[tuple, np.ndarray] = {}  # the runs of one call often share their base


def greedy(model_dir: str, dtype: str, prefixes: np.ndarray, n_new: int) -> np.ndarray:
    """N free-running greedy tokens per prefix, EOS ignored, in plain transformers."""
    key = (model_dir, dtype, prefixes.tobytes(), n_new)
    if key not in _GREEDY:
        _GREEDY[key] = _greedy(model_dir, dtype, prefixes, n_new)
    return _GREEDY[key]


def _greedy(model_dir: str, dtype: str, prefixes: np.ndarray, n_new: int) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    return greedy_of(model, prefixes, n_new, batch=8)


def first_difference(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def after_the_fact(tokenizer: Any, base: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """who_what_benchmark's evaluate_divergency on one prompt's two continuations."""
    texts = [tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in (base, candidate)]
    a, b = (tokenizer.encode(text) for text in texts)
    blocks = difflib.SequenceMatcher(None, a, b).get_matching_blocks()
    first = blocks[0]
    fdt = first.size if (first.a, first.b) == (0, 0) else 0
    matched = sum(block.size for block in blocks)
    return {
        "fdt": fdt,
        "sdt": len(b) - matched,
        "common_prefix": first_difference(a, b),
        "tokens": [len(a), len(b)],
    }


def crosscheck(run: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from dtm_ray.engines.sources import ModelSource, node_folder

    info = json.loads((run / "run.json").read_text())
    summary = pd.read_parquet(run / "compare" / "summary").iloc[0]
    prompts = pd.read_parquet(run / "compare" / "prompts").sort_values("prompt_id")
    reference = pd.read_parquet(run / "reference").sort_values("prompt_id")
    prefixes = np.stack(reference["prefix_ids"].to_numpy())
    n_new = int(summary["new_tokens"])
    folders = {
        s: str(node_folder(ModelSource(**info["model_sources"][s]))) for s in ("base", "candidate")
    }
    start = time.monotonic()
    tokens = {
        side: greedy(folders[side], str(summary[f"{side}_dtype"]), prefixes, n_new)
        for side in ("base", "candidate")
    }
    tokenizer = AutoTokenizer.from_pretrained(folders["base"])
    rows = []
    for p, teacher_forced in enumerate(prompts["fdt"].to_numpy()):
        exact = first_difference(tokens["base"][p], tokens["candidate"][p])
        wwb = after_the_fact(tokenizer, tokens["base"][p], tokens["candidate"][p])
        why = None
        if wwb["fdt"] != exact:
            why = "retokenized" if wwb["common_prefix"] != exact else "matcher"
        rows.append(
            {
                "prompt_id": p,
                "teacher_forced": int(teacher_forced),
                "exact": int(exact),
                "after_the_fact": int(wwb["fdt"]),
                "after_the_fact_sdt": int(wwb["sdt"]),
                "retokenized_common_prefix": int(wwb["common_prefix"]),
                "retokenized_lengths": wwb["tokens"],
                "why": why,
            }
        )
    frame = pd.DataFrame(rows)
    return {
        "run": str(run),
        "base": shown(str(summary["base"])),
        "candidate": shown(str(summary["candidate"])),
        "dtypes": [str(summary["base_dtype"]), str(summary["candidate_dtype"])],
        "prompts": len(frame),
        "new_tokens": n_new,
        "teacher_forced_equals_exact": int((frame["teacher_forced"] == frame["exact"]).sum()),
        "after_the_fact_equals_exact": int((frame["after_the_fact"] == frame["exact"]).sum()),
        "why": {k: int(v) for k, v in frame["why"].value_counts().items()},
        "mean": {k: float(frame[k].mean()) for k in ("teacher_forced", "exact", "after_the_fact")},
        "seconds_free_running": time.monotonic() - start,
        "per_prompt": rows,
    }


def shown(name: str) -> str:
    """A model as the tables show it: a folder under the working directory by its relative
    path (no machine paths in the published results)."""
    path = Path(name)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        return str(path.relative_to(Path.cwd()))
    return name


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| candidate | prompts x N | teacher-forced = free-running | after-the-fact = "
        "free-running | mean FDT: teacher-forced / free-running / after-the-fact | "
        "why they differ |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    for r in results:
        m = r["mean"]
        why = ", ".join(f"{k} {v}" for k, v in r["why"].items()) or "-"
        lines.append(
            f"| {r['candidate']} | {r['prompts']} x {r['new_tokens']} | "
            f"{r['teacher_forced_equals_exact']}/{r['prompts']} | "
            f"{r['after_the_fact_equals_exact']}/{r['prompts']} | "
            f"{m['teacher_forced']:.2f} / {m['exact']:.2f} / {m['after_the_fact']:.2f} | {why} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished compare run directories")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [crosscheck(Path(run)) for run in args.runs]
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    out = {
        "command": " ".join(["python", *sys.argv]),
        "commit": commit,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "note": "shared with other developers' jobs while it ran (seconds are noisy)",
        },
        "results": results,
    }
    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
