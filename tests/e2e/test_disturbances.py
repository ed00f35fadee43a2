"""Chaos: one compressing run meets a driver kill, an engine actor kill and a transient storage
failure, each once, at points drawn from a seed; its final tables equal a run never disturbed.

Set DTM_RAY_CHAOS_SEED to draw other points (the seed and the points are printed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FDT_SPARSIFY, assert_same_result, tiny_compress_job
from test_driver import engine_actor_pids

HERE = Path(__file__).resolve().parent
SEED = int(os.environ.get("DTM_RAY_CHAOS_SEED", "2026"))


class PartFiles:
    """Counts the probe files a run has made visible so far (part files come and go: each
    round's are compacted into one at its end)."""

    def __init__(self, run: Path) -> None:
        self.folder, self.seen = run / "probes", set()

    def count(self) -> int:
        if self.folder.is_dir():
            self.seen.update(p.name for p in self.folder.glob("part-*.parquet"))
        return len(self.seen)


def driver(job: Path, nth_write: int, log: Path, env: dict) -> subprocess.Popen:
    command = [sys.executable, str(HERE / "driver_with_faults.py"), str(job)]
    # Files of 4 rows, so that the kills land mid-round with part of the round written.
    command += ["--fault-at-write", str(nth_write), "--flush-every", "4"]
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until(condition, process: subprocess.Popen, what: str, timeout: float = 600) -> bool:
    """Poll `condition` until true (True) or the process ends first (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_a_run_through_a_driver_kill_an_actor_kill_and_a_storage_fault_ends_undisturbed(
    ray_session, fdt_sparsify_run, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    undisturbed, _ = fdt_sparsify_run
    rng = np.random.default_rng(SEED)
    # The run makes 21 part files (3 rounds of 28 probes, 4 rows each) and opens ~40 files.
    kill_driver_at = int(rng.integers(1, 10))  # part files seen by the first driver
    kill_actor_at = int(rng.integers(1, 10))  # part files seen by the second
    fault_at_write = int(rng.integers(1, 30))  # files opened by the first driver
    points = (
        f"seed {SEED}: driver kill at part file {kill_driver_at}, actor kill at "
        f"{kill_actor_at} after the resume, storage fault on write {fault_at_write}"
    )
    print(f"\nchaos {points}")

    run = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_compress_job(tiny_llama_dir, run, FDT_SPARSIFY)))
    # The drivers join this session's cluster: a killed driver leaves no Ray behind.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    others = set(engine_actor_pids())  # actors other tests of this session may still hold

    first = driver(job, fault_at_write, tmp_path / "first.log", env)
    parts = PartFiles(run)
    try:
        killed = wait_until(lambda: parts.count() >= kill_driver_at, first, "part files")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert killed, f"the first driver ended before its kill ({points}):\n{first_log[-2000:]}"
    fault = f"chaos: storage fault on write {fault_at_write}"
    # Killed before its fault came: the fault goes to the second driver.
    second_fault = 0 if fault in first_log else fault_at_write

    parts = PartFiles(run)
    second = driver(job, second_fault, tmp_path / "second.log", env)
    try:
        reached = wait_until(lambda: parts.count() >= kill_actor_at, second, "part files")
        victims = sorted(set(engine_actor_pids()) - others)
        if reached and victims:
            victim = victims[int(rng.integers(len(victims)))]
            os.kill(victim, signal.SIGKILL)
        second.wait(timeout=600)
    finally:
        if second.poll() is None:
            second.kill()
    second_log = (tmp_path / "second.log").read_text()
    assert reached and victims, f"the second driver ended before the actor kill ({points})"
    assert second.returncode == 0, second_log[-3000:]
    assert "taking over the lease of the driver" in second_log  # the killed one's
    assert (fault in first_log) != (fault in second_log)  # once
    assert not Path(f"/proc/{victim}").exists()
    # An actor killed while scoring costs its probe a crash; one killed between calls is
    # restarted by Ray before anyone notices.
    crashed = [ln for ln in second_log.splitlines() if "died while running" in ln]
    print(f"actor {victim} killed: {crashed or 'between calls'}")
    assert_same_result(run, undisturbed)
