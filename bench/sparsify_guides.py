"""Does FDT guidance beat uniform and perplexity (NLL) guidance? One sparsify job, run with each
guide and each reference, compared against the dense model in one table.

    python bench/sparsify_guides.py                         # jobs/smollm2-sparsify.yaml
    python bench/sparsify_guides.py --set compress.target_sparsity=0.5 --out bench/results/s50

Every run is a normal resumable run directory under --out (re-running skips finished runs).
Prints a table and writes `summary.json` beside the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import ray

from dtm_ray.job.checks import plan_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop.driver import run_plan

VARIANTS = {
    "fdt": ["compress.guide=fdt", "compress.reference=current"],
    "nll": ["compress.guide=nll", "compress.reference=current"],
    "uniform": ["compress.guide=uniform", "compress.reference=current"],
    "fdt, reference original": ["compress.guide=fdt", "compress.reference=original"],
    "nll, reference original": ["compress.guide=nll", "compress.reference=original"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/smollm2-sparsify.yaml")
    parser.add_argument("--out", default="bench/results/sparsify-guides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", action="append", choices=list(VARIANTS), help="run only these")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False)
    out = Path(args.out)
    results = []
    for name in args.only or VARIANTS:
        folder = out / name.replace(", ", "-").replace(" ", "-")
        job = load_job(args.job, [*args.set, *VARIANTS[name], f"out={folder}"])
        start = time.monotonic()
        outcome = run_plan(plan_job(job), print_summary=False)
        summary = outcome.final["summary"].to_pylist()[0]
        results.append({"variant": name, "seconds": time.monotonic() - start, **summary})
        print(f"{name}: done in {results[-1]['seconds']:.0f}s", flush=True)
    ray.shutdown()

    header = (
        f"{'variant':<26} {'rounds':>6} {'sparsity':>8} {'FDT@75':>6} {'90% CI':>9} "
        f"{'mean FDT':>8} {'SDT share':>9} {'ppl text':>8} {'ppl ref':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        ci = f"{r['fdt_at_75_low']}..{r['fdt_at_75_high']}"
        lines.append(
            f"{r['variant']:<26} {r['rounds']:>6} {r['sparsity']:>8.4f} {r['fdt_at_75']:>6} "
            f"{ci:>9} {r['fdt_mean']:>8.2f} {r['sdt_share']:>9.3f} {r['ppl_text']:>8.3f} "
            f"{r['ppl_reference']:>8.3f}"
        )
    if results:
        r = results[0]
        lines.append(
            f"{'dense':<26} {'':>6} {'':>8} {r['new_tokens']:>6} {'':>9} {r['new_tokens']:>8.2f} "
            f"{0:>9.3f} {r['dense_ppl_text']:>8.3f} {r['dense_ppl_reference']:>8.3f}"
        )
    print("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
