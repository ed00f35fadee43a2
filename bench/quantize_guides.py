"""FDT-guided mixed precision against its baselines: one quantize job per level set, run with
guide fdt, guide nll, and guide uniform at the parameter share the FDT search reached.

    python bench/quantize_guides.py                     # jobs/smollm2-quantize.yaml
    python bench/quantize_guides.py --levels int8 --levels int4-g64,int8

Every run is a normal resumable run directory under --out. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd
import ray

from dtm_ray.job.checks import plan_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop.driver import run_plan


def run(job_file: str, overrides: list[str], folder: Path) -> dict:
    job = load_job(job_file, [*overrides, f"out={folder}"])
    start = time.monotonic()
    outcome = run_plan(plan_job(job), print_summary=False)
    summary = outcome.final["summary"].to_pylist()[0]
    components = outcome.final["components"].to_pandas()
    shares = components.groupby("precision")["params"].sum() / components["params"].sum()
    return {
        **summary,
        "seconds": time.monotonic() - start,
        "shares": {k: round(float(v), 4) for k, v in shares.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/smollm2-quantize.yaml")
    parser.add_argument("--out", default="bench/results/quantize-guides")
    parser.add_argument("--levels", action="append", help="comma-separated, e.g. int4-g64,int8")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    results = []
    for levels in args.levels or ["int8", "int4-g64,int8"]:
        base = [*args.set, f"compress.levels=[{levels}]"]
        tag = levels.replace(",", "+")
        out = Path(args.out) / tag
        fdt = run(args.job, [*base, "compress.guide=fdt"], out / "fdt")
        nll = run(args.job, [*base, "compress.guide=nll"], out / "nll")
        # Uniform at the FDT search's share of the most aggressive level (each level may take
        # up to that share, in model order).
        first = levels.split(",")[0]
        share = max(fdt["shares"].get(first, 0.0), 1e-6)
        uniform = run(
            args.job,
            [*base, "compress.guide=uniform", f"compress.max_params_share={share}"],
            out / "uniform",
        )
        for name, r in (("fdt", fdt), ("nll", nll), ("uniform", uniform)):
            results.append({"levels": levels, "guide": name, **r})
            print(f"{levels} {name}: done in {r['seconds']:.0f}s", flush=True)
    ray.shutdown()

    frame = pd.DataFrame(results)
    frame["FDT@75 (90% CI)"] = [
        f"{r.fdt_at_75} ({r.fdt_at_75_low}..{r.fdt_at_75_high})" for r in frame.itertuples()
    ]
    columns = [
        "levels", "guide", "shares", "bits_per_param", "FDT@75 (90% CI)", "fdt_mean",
        "sdt_share", "ppl_text", "dense_ppl_text", "ppl_reference", "dense_ppl_reference",
    ]  # fmt: skip
    print(frame[columns].to_string(index=False, float_format="%.3f"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
