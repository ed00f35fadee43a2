"""Guides side by side on SmolLM2: does FDT guidance give a better compressed model than the
signals the anchors use (nll, ModelOpt's fisher, NNCF's weight error, uniform), at the same size,
judged on prompts no decision read?

Every variant is a `dtm-ray run` (as a user runs it) of SmolLM2-135M in float32 on the hf engine
with 2 workers: 16 decide, 16 validate and 64 test prompts of 16 + 32 tokens drawn apart from
pydoc's text (`prompts.seed` per seed), the 7 linear weights of the chosen layers. The methods:

- `sparsify-magnitude-30`, `-50`, `sparsify-wanda-30`, `-50`: to that sparsity, step 0.15 (0.25 to
  50 %), the same sparsity for every guide;
- `quantize-5`, `quantize-6`: int4-g64 / int8 at `target_bits` 5 or 6 bits per parameter, the
  same budget for every guide (no floor: the budget alone decides how much goes to int4);
- `sparsify-magnitude-floor`, `quantize-floor`: no budget, a quality floor instead (`min_fdt` 8
  toward 90 % sparsity; `min_fdt` 16 for int4-g64 / int8), judged on the validate prompts, for
  the fdt and nll guides only: how far each guide goes before the floor stops it.

Judged by the run's own `final/summary` on its 64 test prompts (FDT@75 with its 90 % interval,
mean FDT, SDT share), perplexity on pydoc text, optionally the shipped `facts` tasks with flips
(`--tasks`, `dtm-ray evaluate RUN --tasks facts`), and cost: wall time, probes and their seconds,
sensitivity passes and seconds. Per method the paper's headlines at small scale (share of
attention components pruned beyond 90 %, share of parameters at int8) and, for quantize, the
additivity the knapsack anchors assume: the combined model's divergence against the sum of its
int4 components' individual divergences, read from the fdt and nll runs' rank-round probes.

    python -m bench.guides --out docs/benchmarks --layers 0 15 29 --seeds 0 \\
        --methods sparsify-magnitude-30 quantize-6

Run directories go to `--work` (default runs/guides) and are reused: a finished run is read back,
not run again. `--plot DIR` draws test mean FDT against size, one line per guide.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from bench.common import Results, add_output_arguments, markdown_table

GUIDES = ["fdt", "nll", "fisher", "weight_error", "uniform"]
METHODS = {
    "sparsify-magnitude-30": {"target_sparsity": 0.3, "step": 0.15, "criterion": "magnitude"},
    "sparsify-magnitude-50": {"target_sparsity": 0.5, "step": 0.25, "criterion": "magnitude"},
    "sparsify-wanda-30": {"target_sparsity": 0.3, "step": 0.15, "criterion": "wanda"},
    "sparsify-wanda-50": {"target_sparsity": 0.5, "step": 0.25, "criterion": "wanda"},
    "quantize-5": {"method": "quantize", "levels": ["int4-g64", "int8"], "target_bits": 5},
    "quantize-6": {"method": "quantize", "levels": ["int4-g64", "int8"], "target_bits": 6},
    # The paper's headlines at small scale: how far each guide goes under a quality floor judged
    # on the validate prompts (no budget), for FDT and for perplexity (nll) guidance.
    "sparsify-magnitude-floor": {
        "target_sparsity": 0.9,
        "step": 0.15,
        "criterion": "magnitude",
        "min_fdt": 8,
    },
    "quantize-floor": {"method": "quantize", "levels": ["int4-g64", "int8"], "min_fdt": 16},
}
FLOOR_GUIDES = ("fdt", "nll")
ATTENTION = ("q", "k", "v", "o")
DTM_RAY = [sys.executable, "-m", "dtm_ray.cli"]


def job(method: str, guide: str, layers: list[int], seed: int, out: Path) -> dict[str, Any]:
    compress = {"method": "sparsify", **METHODS[method], "guide": guide}
    return {
        "model": "smollm2-135m",
        "engine": "hf",
        "dtype": "float32",
        "prompts": {
            "source": "pydoc",
            "count": 16,
            "prefix_tokens": 16,
            "seed": seed,
            "validate_count": 16,
        },
        "new_tokens": 32,
        "probe": {
            "components": [
                {"kinds": list(("q", "k", "v", "o", "gate", "up", "down")), "layers": layers}
            ]
        },
        "compress": compress,
        "evaluation": {"text": "pydoc", "count": 8, "tokens": 128, "prompts": 64},
        "workers": 2,
        "resources_per_worker": {"CPU": 1},
        "out": str(out),
    }


def run_one(work: Path, method: str, guide: str, layers: list[int], seed: int) -> Path:
    """The run directory of one variant, run now unless it finished before."""
    name = f"{method}-{guide}-s{seed}"
    run = work / "runs" / name
    if (run / "final" / "summary").exists():
        return run
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    path = work / "jobs" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job(method, guide, layers, seed, run)))
    started = time.monotonic()
    with open(work / "logs" / f"{name}.log", "w") as log:
        done = subprocess.run([*DTM_RAY, "run", str(path)], stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}); see {work}/logs/{name}.log")
    (run / "bench_seconds.json").write_text(json.dumps({"seconds": time.monotonic() - started}))
    return run


def evaluate_tasks(run: Path, tasks: str, work: Path) -> None:
    if (run / "final" / "tasks").exists():
        return
    with open(work / "logs" / f"{run.name}-tasks.log", "w") as log:
        subprocess.run(
            [*DTM_RAY, "evaluate", str(run), "--tasks", tasks],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )


def _read(run: Path, table: str) -> pd.DataFrame | None:
    path = run / table
    return pd.read_parquet(path) if path.exists() else None


def measure(run: Path) -> dict[str, Any]:
    """One run's figures, from its run directory alone."""
    s = _read(run, "final/summary").iloc[0]
    components = _read(run, "final/components")
    probes = _read(run, "probes")
    scores = _read(run, "sensitivity")
    seconds = json.loads((run / "bench_seconds.json").read_text())["seconds"]
    row: dict[str, Any] = {
        "test_fdt_at_75": int(s["test_fdt_at_75"]),
        "test_fdt_at_75_low": int(s["test_fdt_at_75_low"]),
        "test_fdt_at_75_high": int(s["test_fdt_at_75_high"]),
        "test_fdt_mean": float(s["test_fdt_mean"]),
        "test_sdt_share": float(s["test_sdt_share"]),
        "decide_fdt_at_75": int(s["fdt_at_75"]),
        "decide_fdt_mean": float(s["fdt_mean"]),
        "ppl_text": float(s["ppl_text"]),
        "dense_ppl_text": float(s["dense_ppl_text"]),
        "sparsity": float(s["sparsity"]),
        "bits_per_param": float(s["bits_per_param"]),
        "rounds": int(s["rounds"]),
        "seconds": round(seconds, 1),
        "probes": 0 if probes is None else len(probes),
        "probe_seconds": 0.0 if probes is None else round(float(probes["seconds"].sum()), 1),
        "sensitivity_candidates": 0 if scores is None else len(scores),
        "sensitivity_seconds": 0.0,
        "sensitivity_passes": 0,
    }
    if scores is not None:
        calls = scores.drop_duplicates(["round", "call"])
        row["sensitivity_seconds"] = round(float(calls["seconds"].sum()), 1)
        row["sensitivity_passes"] = int(calls["passes"].sum())
    attention = components[components["kind"].isin(ATTENTION)]
    row["attention_beyond_90"] = float((attention["sparsity"] > 0.9).mean())
    row["sparsity_min"] = float(components["sparsity"].min())
    row["sparsity_max"] = float(components["sparsity"].max())
    params = components["params"].sum()
    row["int8_share"] = float(
        components.loc[components["precision"] == "int8", "params"].sum() / params
    )
    row["int4_share"] = float(
        components.loc[components["precision"].str.startswith("int4"), "params"].sum() / params
    )
    # Per test prompt (by prompt_id), for the paired comparison: every guide of a seed is
    # judged on the same test prompts (the draw depends on the seed alone; checked by digest).
    prompts = _read(run, "final/prompts")
    test = prompts[prompts["role"] == "test"].sort_values("prompt_id")
    row["test_fdt"] = [int(v) for v in test["fdt"]]
    info = json.loads((run / "run.json").read_text())
    row["test_tokens_sha256"] = info["prompt_roles"]["test"]["tokens_sha256"]
    tasks = _read(run, "final/tasks")
    if tasks is not None and len(tasks):
        row["tasks"] = [
            {
                k: t[k]
                for k in ("task", "metric", "examples", "dense", "compressed", "flips", "flipped")
            }
            for t in tasks.to_dict("records")
        ]
    return row


def additivity(run: Path) -> dict[str, Any] | None:
    """The combined model's divergence on the decide prompts against the sum of its int4
    components' divergences alone (the rank round's probes against the dense model, same
    prompts). SDT adds when the components' damages fall on different positions; the NLL
    increase adds to first order. The int8 fallback's damage is not in the sum (not probed)."""
    probes = _read(run, "probes")
    if probes is None:
        return None
    components = _read(run, "final/components")
    summary = _read(run, "final/summary").iloc[0]
    reference = _read(run, "reference")
    dense_nll = float(
        np.mean([np.mean(v) for v in reference.loc[reference["round"] == 0, "current_nll"]])
    )
    rank = probes[(probes["round"] == 0) & (probes["status"] == "ok")].set_index("component")
    at_int4 = components.loc[components["precision"].str.startswith("int4"), "component"]
    return {
        "components_at_int4": len(at_int4),
        "sum_sdt_mean": float(rank.loc[at_int4, "sdt_mean"].sum()),
        "combined_sdt_mean": float(summary["sdt_mean"]),
        "sum_nll_increase": float((rank.loc[at_int4, "nll_mean"] - dense_nll).sum()),
        "combined_nll_increase": float(
            math.log(summary["ppl_reference"]) - math.log(summary["dense_ppl_reference"])
        ),
    }


def paired(by_guide: dict[str, dict[str, dict[str, Any]]], seeds: list[int]) -> dict[str, Any]:
    """FDT guidance against each other guide on the same test prompts: the mean over prompts
    (pooled over seeds) of fdt's FDT minus the other's, with a 90 % bootstrap interval that
    resamples prompts within each seed, and on how many prompts fdt diverged later, the same,
    or earlier."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    base = by_guide.get("fdt", {})
    for guide, by_seed in by_guide.items():
        if guide == "fdt":
            continue
        diffs = []
        for seed in seeds:
            a, b = base.get(str(seed)), by_seed.get(str(seed))
            if a is None or b is None:
                continue
            if a["test_tokens_sha256"] != b["test_tokens_sha256"]:
                raise SystemExit(f"seed {seed}: fdt and {guide} were judged on different prompts")
            diffs.append(np.asarray(a["test_fdt"]) - np.asarray(b["test_fdt"]))
        if not diffs:
            continue
        pooled = np.concatenate(diffs)
        draws = [
            np.concatenate([d[rng.integers(0, len(d), len(d))] for d in diffs]).mean()
            for _ in range(2000)
        ]
        out[guide] = {
            "prompts": len(pooled),
            "mean_difference": float(pooled.mean()),
            "low": float(np.quantile(draws, 0.05)),
            "high": float(np.quantile(draws, 0.95)),
            "fdt_later": int((pooled > 0).sum()),
            "same": int((pooled == 0).sum()),
            "fdt_earlier": int((pooled < 0).sum()),
        }
    return out


def _cell(values: list[float], digits: int = 1) -> str:
    """A mean, with the range over seeds when there are several."""
    if len(values) == 1 or min(values) == max(values):
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def tables(results: dict[str, Any], seeds: list[int]) -> list[tuple[str, str]]:
    sections = []
    for method, by_guide in results["runs"].items():
        head = [
            "guide",
            "test FDT@75 (90% CI)",
            "test mean FDT",
            "test SDT share",
            "ppl (dense)",
            "size",
            "probes / scored",
            "probe s / score s (passes)",
            "run s",
        ]
        if any("tasks" in r for rs in by_guide.values() for r in rs.values()):
            head.append("facts acc (dense) · flips")
        rows = []
        for guide, by_seed in by_guide.items():
            runs = [by_seed[str(s)] for s in seeds if str(s) in by_seed]
            if not runs:
                continue
            fdt75 = "; ".join(
                f"{r['test_fdt_at_75']} ({r['test_fdt_at_75_low']}–{r['test_fdt_at_75_high']})"
                for r in runs
            )
            size = (
                _cell([r["bits_per_param"] for r in runs], 2) + " bits"
                if method.startswith("quantize")
                else _cell([100 * r["sparsity"] for r in runs], 1) + " %"
            )
            row = [
                guide,
                fdt75,
                _cell([r["test_fdt_mean"] for r in runs], 2),
                _cell([r["test_sdt_share"] for r in runs], 3),
                f"{_cell([r['ppl_text'] for r in runs], 2)} ({runs[0]['dense_ppl_text']:.2f})",
                size,
                f"{_cell([r['probes'] for r in runs], 0)} / "
                f"{_cell([r['sensitivity_candidates'] for r in runs], 0)}",
                f"{_cell([r['probe_seconds'] for r in runs], 0)} / "
                f"{_cell([r['sensitivity_seconds'] for r in runs], 1)} "
                f"({_cell([r['sensitivity_passes'] for r in runs], 0)})",
                _cell([r["seconds"] for r in runs], 0),
            ]
            if len(head) > len(row):
                cells = []
                for r in runs:
                    for t in r.get("tasks", []):
                        cells.append(
                            f"{t['task']} {t['compressed']:.3f} ({t['dense']:.3f}) · {t['flipped']}"
                        )
                row.append("; ".join(cells) or "-")
            rows.append(row)
        sections.append((f"{method}: on the 64 test prompts", markdown_table(head, rows)))
        if method.startswith("quantize"):
            head = ["guide", "params at int8", "params at int4-g64"]
            rows = [
                [
                    g,
                    _cell([100 * r["int8_share"] for r in rs.values()], 1) + " %",
                    _cell([100 * r["int4_share"] for r in rs.values()], 1) + " %",
                ]
                for g, rs in by_guide.items()
            ]
        else:
            head = ["guide", "attention components > 90 % sparse", "component sparsity min–max"]
            rows = [
                [
                    g,
                    _cell([100 * r["attention_beyond_90"] for r in rs.values()], 0) + " %",
                    "; ".join(
                        f"{100 * r['sparsity_min']:.0f}–{100 * r['sparsity_max']:.0f} %"
                        for r in rs.values()
                    ),
                ]
                for g, rs in by_guide.items()
            ]
        sections.append((f"{method}: how each guide spread the budget", markdown_table(head, rows)))
        if method.endswith("-floor"):
            continue  # floor runs land on different sizes: a paired difference compares sizes
        against = results.setdefault("paired", {})[method] = paired(by_guide, seeds)
        if against:
            head = [
                "fdt against",
                "test prompts",
                "mean FDT difference (90% CI)",
                "fdt later / same / earlier",
            ]
            rows = [
                [
                    g,
                    a["prompts"],
                    f"{a['mean_difference']:+.2f} ({a['low']:+.2f} to {a['high']:+.2f})",
                    f"{a['fdt_later']} / {a['same']} / {a['fdt_earlier']}",
                ]
                for g, a in against.items()
            ]
            sections.append(
                (
                    f"{method}: fdt guidance against each guide, prompt by prompt (same test "
                    "prompts per seed; > 0: fdt's model diverges later)",
                    markdown_table(head, rows),
                )
            )
    add = results.get("additivity", {})
    if add:
        head = [
            "run",
            "int4 components",
            "Σ SDT alone",
            "SDT combined",
            "Σ NLL increase alone",
            "NLL increase combined",
        ]
        rows = [
            [
                name,
                a["components_at_int4"],
                f"{a['sum_sdt_mean']:.2f}",
                f"{a['combined_sdt_mean']:.2f}",
                f"{a['sum_nll_increase']:.4f}",
                f"{a['combined_nll_increase']:.4f}",
            ]
            for name, a in add.items()
        ]
        sections.append(
            (
                "quantize: additivity on the decide prompts (sum of the int4 components alone "
                "vs the combined model; the int8 fallback not in the sum)",
                markdown_table(head, rows),
            )
        )
    return sections


def plot(results: dict[str, Any], folder: Path) -> list[str]:
    """Test mean FDT against size, one line per guide, a panel per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for family, xkey, xlabel in (
        ("sparsify", "sparsity", "sparsity of the selected weights"),
        ("quantize", "bits_per_param", "bits per parameter"),
    ):
        # Floor runs land where their floor stops them, not on a shared budget: not plotted.
        methods = [m for m in results["runs"] if m.startswith(family) and not m.endswith("-floor")]
        if not methods:
            continue
        for criterion in sorted({m.rsplit("-", 1)[0] for m in methods}):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for guide in GUIDES:
                points = []
                for method in methods:
                    if not method.startswith(criterion):
                        continue
                    runs = results["runs"][method].get(guide, {})
                    if runs:
                        points.append(
                            (
                                # sparsify lands on its target to 1e-7: plot it as the target
                                round(float(np.mean([r[xkey] for r in runs.values()])), 3),
                                np.mean([r["test_fdt_mean"] for r in runs.values()]),
                            )
                        )
                if points:
                    xs, ys = zip(*sorted(points), strict=True)
                    ax.plot(xs, ys, marker="o", label=guide)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean FDT on the 64 test prompts")
            ax.set_title(f"SmolLM2-135M, {criterion}")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = folder / f"guides-{criterion}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_output_arguments(parser)
    parser.add_argument("--work", type=Path, default=Path("runs/guides"))
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--method-seeds",
        nargs="+",
        default=[],
        metavar="METHOD:SEEDS",
        help="seeds of one method, e.g. sparsify-wanda-30:0,1 (overrides the others)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--guides", nargs="+", default=GUIDES, choices=GUIDES)
    parser.add_argument("--tasks", default=None, help="e.g. facts: dtm-ray evaluate each run")
    parser.add_argument("--plot", type=Path, default=None, help="folder for the plots")
    parser.add_argument("--cut", default="", help="what this run left out, for the record")
    args = parser.parse_args()
    method_seeds = {}
    for entry in args.method_seeds:
        method, _, seeds = entry.partition(":")
        if method not in METHODS or not seeds:
            parser.error(f"--method-seeds {entry!r}: expected METHOD:SEEDS, e.g. quantize-5:0,1")
        method_seeds[method] = [int(seed) for seed in seeds.split(",")]
    results_out = Results(args, "guides", __doc__)
    results: dict[str, Any] = {
        "settings": {
            "layers": args.layers,
            "seeds": args.seeds,
            "method_seeds": method_seeds,
            "methods": {m: METHODS[m] for m in args.methods},
            "guides": args.guides,
            "tasks": args.tasks,
            "cut": args.cut,
            "job": job(args.methods[0], args.guides[0], args.layers, args.seeds[0], Path("RUN")),
        },
        "runs": {},
        "additivity": {},
    }
    for method in args.methods:
        for guide in args.guides:
            if method.endswith("-floor") and guide not in FLOOR_GUIDES:
                continue
            for seed in method_seeds.get(method, args.seeds):
                started = time.monotonic()
                run = run_one(args.work, method, guide, args.layers, seed)
                if args.tasks:
                    evaluate_tasks(run, args.tasks, args.work)
                row = measure(run)
                print(
                    f"{run.name}: test FDT@75 {row['test_fdt_at_75']}, mean FDT "
                    f"{row['test_fdt_mean']:.2f} ({time.monotonic() - started:.0f} s)",
                    flush=True,
                )
                results["runs"].setdefault(method, {}).setdefault(guide, {})[str(seed)] = row
                if method.startswith("quantize") and guide in ("fdt", "nll"):
                    found = additivity(run)
                    if found is not None:
                        results["additivity"][run.name] = found
    sections = tables(results, args.seeds)
    if args.plot is not None:
        results["plots"] = plot(results, args.plot)
    results_out.write(results, sections)


if __name__ == "__main__":
    main()
