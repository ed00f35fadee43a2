"""The one job the tests start from, and the ways to run it: in this process, or as a `dtm-ray run`
driver process (with faults) that the test can kill."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# The tiny Llama's job: every weight, 8 pydoc prompts of 8 tokens, 16 new tokens, 2 hf workers.
TINY = {
    "engine": "hf",
    "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 8},
    "new_tokens": 16,
    "probe": {"components": "all"},
    "workers": 2,
}
# The FDT-guided sparsify run to 30 % in steps of 0.1 (three rounds of 28 probes on the tiny
# Llama), with its final evaluation: the undisturbed run the failure tests compare with.
FDT_SPARSIFY = {"target_sparsity": 0.3, "step": 0.1}
EVALUATION = {"text": "pydoc", "count": 4, "tokens": 32}
SPARSIFY = {"compress": FDT_SPARSIFY, "evaluation": EVALUATION}
# A shorter job, for tests that need a run rather than its numbers: 4 prompts, 8 new tokens, int8
# on the attention weights, the default workers.
SHORT = {
    "prompts": {"count": 4},
    "new_tokens": 8,
    "probe": {"components": [{"kinds": ["q", "k", "v", "o"]}], "specs": ["int8"]},
    "workers": None,
}
# Everything pruned to 50 % at once (no probes), with a short final evaluation.
UNIFORM_HALF = {
    "probe": None,
    "compress": {"target_sparsity": 0.5, "step": 0.5, "guide": "uniform"},
    "evaluation": {"text": "pydoc", "count": 2, "tokens": 32},
}
# Recovery training after each round (2 Ray Train workers, 4 steps), to 20 % in steps of 0.1.
RECOVERY = {
    "steps": 4,
    "learning_rate": 1e-3,
    "batch_size": 2,
    "sequence_tokens": 32,
    "workers": 2,
    "checkpoint_every": 2,
}


def tiny_job(model: str | Path, out: str | Path | None = None, *presets: dict, **overrides) -> dict:
    """TINY on `model` into `out`, changed by each preset (SPARSIFY, SHORT, ...) and then by
    `overrides`: a dict given for a dict key (prompts, probe) changes only the keys it names; None
    removes a key; anything else replaces it."""
    job = {"model": str(model), **copy.deepcopy(TINY)}
    for changes in (*presets, overrides):
        for key, value in changes.items():
            if value is None:
                job.pop(key, None)
            elif isinstance(value, dict) and isinstance(job.get(key), dict):
                job[key] = {**job[key], **copy.deepcopy(value)}
            else:
                job[key] = copy.deepcopy(value)
    if out is not None:
        job["out"] = str(out)
    return job


def recovery_job(model: str | Path, out: str | Path, **recovery) -> dict:
    """TINY in float32 pruned to 20 % in steps of 0.1 with RECOVERY (changed by `recovery`)
    after each round, and the final evaluation."""
    compress = {"target_sparsity": 0.2, "step": 0.1, "recovery": {**RECOVERY, **recovery}}
    return tiny_job(
        model, out, dtype="float32", probe=None, compress=compress, evaluation=EVALUATION
    )


def write_job(folder: Path, job: dict | str, name: str = "job.yaml") -> Path:
    """The job as a YAML file in `folder` (a str is written as it is)."""
    path = Path(folder) / name
    path.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    return path


def checked_job(
    folder: Path, job: dict, overrides: list[str] | None = None, name: str = "job.yaml"
):  # noqa: ANN201
    """The validated job, as `dtm-ray run` checks it before Ray starts."""
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job

    return check_job(load_job(write_job(folder, job, name), overrides))


def run_job(folder: Path, job: dict, name: str = "job.yaml", **options):  # noqa: ANN201
    """Run (or resume) `job` in this process on the Ray it is connected to, and wait: its
    outcome. `options` go to the driver (streaming, print_summary: False unless given)."""
    from dtm_ray.loop.driver import run_checked_job

    options.setdefault("print_summary", False)
    return run_checked_job(checked_job(folder, job, name=name), **options)


def existing_run(tmp: Path, model_dir: Path, job: dict, probe_file: bytes | None = None) -> Path:
    """A run directory of `job` as an earlier invocation left it: run.json and a probes file."""
    out = tmp / "run"
    path = tmp / "earlier.yaml"
    path.write_text(yaml.safe_dump({**job, "out": str(out)}))
    from dtm_ray.engines.models import model_digest
    from dtm_ray.job.spec import load_job
    from dtm_ray.records.store import RunStore

    store = RunStore(str(out))
    config = load_job(path).to_dict()
    store.write_json("run.json", {"config": config, "model_digest": model_digest(model_dir)})
    (out / "probes").mkdir()
    target = out / "probes" / "part-r000-00000000000000000001-abcdef01.parquet"
    if probe_file is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"round": [0], "component": ["x"]}), target)
    else:
        target.write_bytes(probe_file)
    return out


def wait_for(
    condition: Callable[[], object],
    what: str,
    timeout: float = 600,
    process: subprocess.Popen | None = None,
    poll: float = 0.05,
) -> bool:
    """Poll `condition` until it holds (True), or `process` ends first (False); a timeout
    raises naming `what`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return True


def driver_command(
    job: Path, fault_at_write: int = 0, flush_every: int = 0, retry_delays: tuple[float, ...] = ()
) -> list[str]:
    """`dtm-ray run JOB` in a process of its own, through support/driver_with_faults.py:
    `fault_at_write` N fails the N-th file it opens once with S3's timeout, `flush_every` K
    writes probe rows in files of at most K rows (so a kill finds part of a round written),
    `retry_delays` replace the store's waits between retries."""
    command = [sys.executable, str(HERE / "driver_with_faults.py"), str(job)]
    if fault_at_write:
        command += ["--fault-at-write", str(fault_at_write)]
    if flush_every:
        command += ["--flush-every", str(flush_every)]
    if retry_delays:
        command += ["--retry-delays", ",".join(map(str, retry_delays))]
    return command


def driver_env(ray_address: str | None = None) -> dict[str, str]:
    """The environment of a driver process, joining `ray_address` (the session's cluster, so a
    killed driver leaves no Ray behind: Ray removes a dead driver's actors itself)."""
    env = dict(os.environ)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


def start_driver(command: list[str], env: dict[str, str], log: Path, **popen) -> subprocess.Popen:  # noqa: ANN003
    """Start a driver process, its output appended to `log`."""
    with open(log, "a") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, **popen)
