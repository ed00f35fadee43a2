"""Every shipped job file through the installed command's dry run, in a fresh process: it passes
without starting Ray. (The job files' contents: tests/unit/test_jobs.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.fakes import LLAMA2, llama2_folder

from dtm_ray.job.spec import (
    load_job,
)

ROOT = Path(__file__).resolve().parents[2]


JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


JOB_FILES = [p for p in JOBS if p.name != "runtime_env.yaml"]


# Llama-2's published config.json values: enough for validation without the weights.


def model_override(job: Path, tmp_path: Path) -> list[str]:
    """Llama-2 jobs name hub ids, unreachable here; validate them against a folder holding the
    same config.json."""
    for size in LLAMA2:
        if f"llama2-{size}" in job.name:
            return ["--set", f"model={llama2_folder(tmp_path, size)}"]
    return []


# Run in one fresh process (whose imports are the dry run's own): per job file, dtm-ray's exit
# code, everything written to file descriptors 1 and 2 while it ran, and whether ray is imported
# by then. The results go to a JSON file, as stdout and stderr are the ones being captured.
DRY_RUNS = r"""
import json, os, sys, tempfile
from dtm_ray import cli

results_path, runs = sys.argv[1], json.loads(sys.argv[2])
results = []
for name, argv in runs:
    captured = {}
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile() for fd in (1, 2)}
    for fd, file in files.items():
        os.dup2(file.fileno(), fd)
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    except BaseException as err:
        code = f"raised {type(err).__name__}: {err}"
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
    for fd, file in files.items():
        file.seek(0)
        captured[fd] = file.read().decode(errors="replace")
    results.append(
        {"name": name, "code": code, "stdout": captured[1], "stderr": captured[2],
         "ray_imported": "ray" in sys.modules}
    )
with open(results_path, "w") as out:
    json.dump(results, out)
"""


def test_every_job_file_passes_dry_run_without_starting_ray(tmp_path):
    runs, outs = [], {}
    for job in JOB_FILES:
        (tmp_path / job.stem).mkdir()  # two jobs may need the same Llama-2 folder
        override = model_override(job, tmp_path / job.stem)
        runs.append((job.name, ["run", str(job), "--dry-run", *override]))
        out = load_job(job, [a for a in override if a != "--set"]).out
        if "://" not in out and not (ROOT / out).exists():
            outs[job.name] = ROOT / out  # the subprocess runs in ROOT
    results_path = tmp_path / "dry-runs.json"
    done = subprocess.run(
        [sys.executable, "-c", DRY_RUNS, str(results_path), json.dumps(runs)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0 and results_path.exists(), done.stderr
    results = json.loads(results_path.read_text())
    assert [r["name"] for r in results] == [name for name, _ in runs]

    failures = []
    for result in results:
        name, stdout, stderr = result["name"], result["stdout"], result["stderr"]
        if result["code"] != 0:
            failures.append(f"{name}: exit {result['code']}: {stderr.strip()}")
        if "valid" not in stdout or "estimated total" not in stdout:
            failures.append(f"{name}: no 'valid ... estimated total' in its output: {stdout!r}")
        if stderr:
            failures.append(f"{name}: wrote to stderr: {stderr.strip()}")
        if result["ray_imported"]:  # imports accumulate: the first file named is the culprit
            failures.append(f"{name}: its dry run (or an earlier one) imported ray")
        if name in outs and outs[name].exists():
            failures.append(f"{name}: the dry run created its run dir {outs[name]}")
    failures += [f"stderr outside any dry run: {done.stderr.strip()}"] if done.stderr else []
    assert not failures, "\n".join(failures)
