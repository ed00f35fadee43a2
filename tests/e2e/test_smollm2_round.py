"""SmolLM2's demo round on Ray, checked against the same probes run by an engine in this
process: every probe exactly once, FDT/SDT equal."""

from __future__ import annotations

import os
import time
from pathlib import Path

from support import REPO
from support.checks import assert_every_probe_exactly_once, in_process_values, table_values

from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop.driver import run_checked_job

ALL_KINDS = ["q", "k", "v", "o", "gate", "up", "down"]
FULL = os.environ.get("DTM_RAY_ACCEPTANCE") == "full"


def test_smollm2_round_matches_the_in_process_probe(
    ray_session, smollm2_dir: Path, tmp_path: Path
) -> None:
    """The demo job on 2 workers. CI runs a cut-down copy (14 probes, 8 prompts x 16+32 tokens);
    DTM_RAY_ACCEPTANCE=full runs its prompts on 4 layers: 56 probes, 32 prompts x 32+64 tokens.
    """
    out = tmp_path / "run"
    overrides = ["engine=hf", "workers=2", f"out={out}"]
    if FULL:
        overrides += [
            "probe.components=[{kinds: [q, k, v, o, gate, up, down], layers: [0, 10, 20, 29]}]"
        ]
    else:
        overrides += [
            "prompts.count=8",
            "prompts.prefix_tokens=16",
            "new_tokens=32",
            "probe.components=[{kinds: [q, k, v, o, gate, up, down], layers: [3]}]",
        ]
    checked = check_job(load_job(REPO / "jobs" / "smollm2-demo.yaml", overrides))
    assert {c.kind for c in checked.components} == set(ALL_KINDS) and len(checked.specs) >= 2
    start = time.monotonic()
    outcome = run_checked_job(checked)
    wall = time.monotonic() - start
    assert_every_probe_exactly_once(str(out), checked)

    n_new = checked.job.new_tokens
    expected = in_process_values(
        smollm2_dir, str(out), [(c.name, s) for c, s in checked.probes], n_new
    )
    got = table_values(str(out))
    equal = sum(got[key] == expected[key] for key in expected)
    print(
        f"\nSmolLM2: {len(checked.probes)} probes x {checked.job.prompts.count} prompts on 2 "
        f"workers in {wall:.0f}s; FDT/SDT equal to the in-process probe for {equal}/{len(expected)}"
    )
    assert equal == len(expected)
    fdt75 = outcome.probes.column("fdt_at_75").to_pylist()
    assert min(fdt75) < n_new  # magnitude pruning must hurt somewhere
