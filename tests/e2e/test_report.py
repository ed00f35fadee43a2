"""The installed command end to end: a run is quiet and leaves tables, plots and a report; show,
plan and report on it. (The logs alone: tests/unit/test_report.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def dtm_ray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, output captured as a user would pipe it (not a terminal)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "dtm_ray.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_a_run_is_quiet_and_leaves_tables_plots_and_a_report(tmp_path, tiny_llama_dir):
    job = {
        "model": str(tiny_llama_dir),
        "engine": "vllm",  # the engine with the most start-up chatter
        "dtype": "float32",
        "prompts": {"source": "pydoc", "count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "probe": {"components": [{"kinds": ["q", "down"], "layers": [0, 1]}]},
        "compress": {"method": "sparsify", "target_sparsity": 0.3, "step": 0.1},
        "evaluation": {"count": 2, "tokens": 32},
        "workers": 1,
        "out": "run",
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    began = time.monotonic()
    result = dtm_ray("run", "job.yaml", cwd=tmp_path)
    seconds = time.monotonic() - began
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "\x1b" not in output  # no colour codes when not on a terminal
    for chatter in ("EngineActor", "WARNING", "INFO", "vLLM", "Loading safetensors", "Triton"):
        assert chatter not in output, f"{chatter!r} reached the user's output"
    assert "dtm-ray: round 1:" in output and "final:" in output
    run = tmp_path / "run"
    engine_log = (run / "logs" / "engines.log").read_text()
    assert "(EngineActor pid=" in engine_log and "WARNING" in engine_log

    # The report, written at the end of the run: every plot a real PNG, linked from both pages.
    report = run / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == [
        "compression_progress.png",
        "fdt_heatmap.png",
        "fdt_vs_compression.png",
        "perplexity_vs_fdt.png",
    ]
    for name in pngs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (report / "report.md").read_text()
        assert f'src="{name}"' in (report / "report.html").read_text()
    markdown = (report / "report.md").read_text()
    assert "noise_positions" in markdown and "key numbers" in markdown and "FDT@75" in markdown

    # show: the rounds and the final result of a finished run.
    shown = dtm_ray("show", "run", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "finished" in shown.stdout and "sparsity_after" in shown.stdout
    rounds_block = shown.stdout.split("rounds:\n")[1].split("\nfinal")[0].splitlines()[1:]
    # Each round adds at most 3/2 of the step (0.15), so reaching 0.3 takes two rounds or more.
    ran = [int(line.split()[0]) for line in rounds_block]
    assert len(ran) >= 2 and ran == list(range(len(ran)))

    # plan: the schedule it predicts is the one the run ran.
    planned = dtm_ray("plan", "job.yaml", "--no-calibrate", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    import pandas as pd

    probes = pd.read_parquet(run / "probes")
    for round_, count in probes.groupby("round").size().items():
        assert f"\n{round_:>8} {count:>7} " in planned.stdout

    # A run still going: no final/, round 1 uncommitted. show and report read what is there.
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "final")
    (partial / "states" / "round-001.parquet").unlink()
    shown = dtm_ray("show", "partial", "--round", "1", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "in progress" in shown.stdout and "round 1, FDT@75" in shown.stdout
    reported = dtm_ray("report", "partial", "--out", "partial-report", cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    assert (tmp_path / "partial-report" / "fdt_heatmap.png").is_file()

    # A user's mistake in show is one line and exit code 2.
    missing = dtm_ray("show", "no-such-run", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "not a run directory" in missing.stderr

    # plan, calibrated on one engine actor, lands near what the run took (start-up included).
    calibrated = dtm_ray("plan", "job.yaml", cwd=tmp_path)
    assert calibrated.returncode == 0, calibrated.stderr
    assert "\x1b" not in calibrated.stdout + calibrated.stderr
    assert "EngineActor" not in calibrated.stdout + calibrated.stderr
    total = calibrated.stdout.split("estimated total: ")[1].split(" on ")[0]
    estimate = _seconds(total)
    assert seconds / 4 < estimate < seconds * 4, (estimate, seconds)


def _seconds(text: str) -> float:
    """'1 min 05 s' / '45 s' / '1 h 02 min' -> seconds."""
    parts = text.split()
    units = {"h": 3600, "min": 60, "s": 1}
    return float(sum(int(v) * units[u] for v, u in zip(parts[::2], parts[1::2], strict=True)))
