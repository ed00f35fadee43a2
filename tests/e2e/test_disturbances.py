"""One compressing run disturbed in each way a run can be, then resumed by the same command: its
final tables equal the session's undisturbed run (`fdt_sparsify_run`, the same job). One case a
disturbance:

- chaos: a driver kill, an engine actor kill and a transient storage fault, each once, at points
  drawn from a seed (set DTM_RAY_CHAOS_SEED to draw others; the points are printed);
- between-rounds: the driver killed right after round 0 committed its state, then mid-round 1;
- transient-writes: every third file the run opens fails once with S3's timeout;
- full-disk: the disk fills mid-round, the run ends in one line, space comes back, it resumes;
- store-cut: the object store holding the run dir goes away mid-round, then comes back;
- node-loss: the node holding both engine actors dies mid-round, another joins later.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.checks import assert_same_result, visible_files
from support.cluster import NodeCluster, engine_actor_pids, engine_nodes
from support.faults import (
    TRANSIENT,
    every_nth_write,
    faulty_split,
    mount_tmpfs,
    small_probe_files,
)
from support.jobs import (
    SPARSIFY,
    driver_command,
    driver_env,
    start_driver,
    tiny_job,
    wait_for,
    write_job,
)

from dtm_ray import cli
from dtm_ray.records import store as store_module
from dtm_ray.records.lease import LEASE_FILE
from dtm_ray.records.store import RunStore

SEED = int(os.environ.get("DTM_RAY_CHAOS_SEED", "2026"))
PROBES_PER_ROUND = 28  # the tiny Llama's 14 weights at two added sparsities
RESUMABLE = "run the same command again to resume once storage is back"
WAITING = "to restart: it needs {CPU: 1} and no node has that free"  # an actor without a node


@dataclass
class Case:
    """What a disturbance gets: the test's folder, the tiny Llama and the test's request."""

    tmp_path: Path
    model: Path
    request: pytest.FixtureRequest

    def job(self, out: str | Path) -> Path:
        """The undisturbed run's job, into `out`."""
        return write_job(self.tmp_path, tiny_job(self.model, out, **SPARSIFY))

    def session_ray_address(self) -> str:
        return self.request.getfixturevalue("ray_session").get_runtime_context().gcs_address


class PartFiles:
    """Counts the probe files a run has made visible since this counter was made (part files
    come and go: each round's are compacted into one at its end). Files an earlier driver left
    do not count, so a kill waits for the new driver's own writes."""

    def __init__(self, run: Path) -> None:
        self.folder = run / "probes"
        self.before = self._names()
        self.seen: set[str] = set()

    def _names(self) -> set[str]:
        if not self.folder.is_dir():
            return set()
        return {p.name for p in self.folder.glob("part-*.parquet")}

    def count(self) -> int:
        self.seen.update(self._names() - self.before)
        return len(self.seen)


def resumed_with_rows(log: str, round_: int) -> None:
    """The log says `round_` resumed with some of its probes done before (none redone)."""
    found = re.search(rf"round {round_}: probing: (\d+) to run, (\d+) done before", log)
    assert found and int(found[2]) > 0 and int(found[1]) + int(found[2]) == PROBES_PER_ROUND, log


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


# --- the disturbances: each leaves a finished run and returns its folder --------------------------
def chaos(case: Case) -> Path:
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
    tmp_path, run = case.tmp_path, case.tmp_path / "run"
    job = case.job(run)
    # The drivers join this session's cluster: a killed driver leaves no Ray behind.
    env = driver_env(case.session_ray_address())
    others = set(engine_actor_pids())  # actors other tests of this session may still hold

    # Files of 4 rows, so that the kills land mid-round with part of the round written.
    first = start_driver(
        driver_command(job, fault_at_write, flush_every=4), env, tmp_path / "first.log"
    )
    parts = PartFiles(run)
    try:
        killed = wait_for(lambda: parts.count() >= kill_driver_at, "part files", process=first)
    finally:
        kill(first)
    first_log = (tmp_path / "first.log").read_text()
    assert killed, f"the first driver ended before its kill ({points}):\n{first_log[-2000:]}"
    survived = RunStore(str(run)).read_probes(dedupe=False).to_pylist()
    fault = f"chaos: storage fault on write {fault_at_write}"
    # Killed before its fault came: the fault goes to the second driver.
    second_fault = 0 if fault in first_log else fault_at_write

    parts = PartFiles(run)
    second = start_driver(
        driver_command(job, second_fault, flush_every=4), env, tmp_path / "second.log"
    )
    try:
        # Its own part files, written by its own actors (a compaction alone needs none).
        reached = wait_for(
            lambda: parts.count() >= kill_actor_at and set(engine_actor_pids()) - others,
            "part files and engine actors",
            process=second,
        )
        victims = sorted(set(engine_actor_pids()) - others)
        if reached and victims:
            victim = victims[int(rng.integers(len(victims)))]
            os.kill(victim, signal.SIGKILL)
        second.wait(timeout=600)
    finally:
        if second.poll() is None:
            kill(second)
    second_log = (tmp_path / "second.log").read_text()
    assert reached and victims, f"the second driver ended before the actor kill ({points})"
    assert second.returncode == 0, second_log[-3000:]
    assert "taking over the lease of the driver" in second_log  # the killed one's
    # The round the kill cut short resumes with the rows written before it, not from nothing.
    cut = max((r["round"] for r in survived), default=None)
    kept_rows = sum(r["round"] == cut for r in survived)
    if cut is not None and kept_rows < PROBES_PER_ROUND:
        left = PROBES_PER_ROUND - kept_rows
        assert f"round {cut}: probing: {left} to run, {kept_rows} done before" in second_log
    assert (fault in first_log) != (fault in second_log)  # once
    assert not Path(f"/proc/{victim}").exists()
    # An actor killed while scoring costs its probe a crash; one killed between calls is
    # restarted by Ray before anyone notices.
    crashed = [ln for ln in second_log.splitlines() if "died while running" in ln]
    print(f"actor {victim} killed: {crashed or 'between calls'}")
    # The rows the killed driver wrote were kept as they were, not redone.
    rows = RunStore(str(run)).read_probes().to_pylist()
    final = {(r["round"], r["component"], r["spec"]): r for r in rows}
    for row in survived:
        kept = final[(row["round"], row["component"], row["spec"])]
        assert (kept["worker"], kept["fdt"]) == (row["worker"], row["fdt"])
    return run


def between_rounds(case: Case) -> Path:
    tmp_path, run = case.tmp_path, case.tmp_path / "run"
    env = driver_env(case.session_ray_address())
    # Probe rows in files of 2, so that the mid-round kill finds part of round 1 written.
    command = driver_command(case.job(run), flush_every=2)

    def run_until(condition, what: str) -> None:  # noqa: ANN001
        driver = start_driver(command, env, tmp_path / "driver.log")
        try:
            wait_for(lambda: condition() or driver.poll() is not None, what)
        finally:
            kill(driver)

    # Between rounds: right after round 0 committed its state.
    run_until(lambda: (run / "states" / "round-000.parquet").exists(), "round 0's state")
    # Mid-round: once round 1 has written some, but not all, of its probes.
    run_until(
        lambda: any((run / "probes").glob("part-r001-*.parquet")), "round 1's first probe file"
    )
    assert not (run / "states" / "round-001.parquet").exists(), "round 1 was not interrupted"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_with_rows(resumed.stderr, 1)
    return run


def transient_writes(case: Case) -> Path:
    monkeypatch = case.request.getfixturevalue("monkeypatch")
    case.request.getfixturevalue("ray_session")
    fail = every_nth_write(3, lambda: OSError(TRANSIENT))
    monkeypatch.setattr(store_module, "_split_uri", faulty_split(fail))
    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.01,) * 5)
    run = case.tmp_path / "run"
    assert cli.main(["run", str(case.job(run))]) == 0
    assert not (run / LEASE_FILE).exists()
    return run


def full_disk(case: Case) -> Path:
    from dtm_ray.loop import rounds

    case.request.getfixturevalue("ray_session")
    capsys = case.request.getfixturevalue("capsys")
    # Files of 2 rows: the disk fills at round 0's first file, and the writer thread's next file
    # fails mid-round.
    case.request.getfixturevalue("monkeypatch").setattr(rounds, "ProbeWriter", small_probe_files(2))
    disk = case.tmp_path / "disk"
    if not mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs needs root and the mount command")
    case.request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(disk)], check=False))
    out, ballast = disk / "run", disk / "ballast"
    job = case.job(out)

    def fill_the_disk_once_probes_arrive() -> None:
        deadline = time.monotonic() + 300
        while not list((out / "probes").glob("part-*.parquet")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        with open(ballast, "wb") as fill:
            try:
                while True:
                    fill.write(b"\0" * (1 << 20))
                    fill.flush()
            except OSError:
                pass  # full

    filler = threading.Thread(target=fill_the_disk_once_probes_arrive, daemon=True)
    filler.start()
    start = time.monotonic()
    code = cli.main(["run", str(job)])
    seconds = time.monotonic() - start
    filler.join(timeout=10)
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("dtm-ray: error:")]
    with capsys.disabled():
        print(f"\nfull disk: exit {code} after {seconds:.1f} s: {failed}")
    assert code == 1, err
    assert len(failed) == 1 and "Traceback" not in err
    assert f"in run dir {out}:" in failed[0] and "(ENOSPC)" in failed[0]
    assert failed[0].endswith(RESUMABLE)
    assert not (out / LEASE_FILE).exists()  # released (a delete frees space, so it works)
    for path in visible_files(out):
        if path.suffix == ".parquet":
            pq.read_table(path)  # nothing half-written is visible

    ballast.unlink()  # space again: the same command resumes
    assert cli.main(["run", str(job)]) == 0, capsys.readouterr().err
    resumed_with_rows(capsys.readouterr().err, 0)
    return out


def store_cut(case: Case) -> Path:
    import pyarrow.fs as pafs

    s3 = case.request.getfixturevalue("s3_server")
    tmp_path, run_uri = case.tmp_path, s3.uri("cut/run")
    env = driver_env(case.session_ray_address())
    # Files of 4 rows: the store goes away at round 0's first file, while the round goes on.
    # Short waits between retries: the store's bound on them is tests/e2e/test_unreachable_stores'
    # (the default waits add ~50 s here: each failing call spends ~15 s before it gives up).
    command = driver_command(case.job(run_uri), flush_every=4, retry_delays=(0.05, 0.1))
    store = s3.filesystem()

    def part_files() -> list:
        found = store.get_file_info(
            pafs.FileSelector(f"{s3.bucket}/cut/run/probes", allow_not_found=True)
        )
        return [f for f in found if f.base_name.startswith("part-")]

    # Logs of an object-store run go to ./dtm-ray-logs: here, the test's folder.
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not part_files() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    s3.relay.cut()  # the store goes away mid-round: every request is refused
    cut_at = time.monotonic()
    try:
        _, err = driver.communicate(timeout=300)
    finally:
        seconds = time.monotonic() - cut_at
        s3.relay.restore()
    failed = [line for line in err.splitlines() if line.startswith("dtm-ray: error:")]
    print(f"\nobject store cut: exit {driver.returncode} after {seconds:.1f} s: {failed}")
    assert driver.returncode == 1, err[-3000:]
    assert len(failed) == 1 and "Traceback" not in err, err[-3000:]
    assert f"in run dir {run_uri.split('?')[0]}" in failed[0] or "s3://" in failed[0], failed
    assert failed[0].endswith(RESUMABLE)

    again = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    resumed_with_rows(again.stderr, 0)
    return s3.download("cut/run", tmp_path / "copy")


def node_loss(case: Case) -> Path:
    tmp_path, run = case.tmp_path, case.tmp_path / "run"
    job = case.job(run)
    log = tmp_path / "driver.log"
    # Both engine actors on one node: when it dies nothing can run until a node joins.
    cluster = NodeCluster(cpus=[2])
    try:
        command = [sys.executable, "-m", "dtm_ray.cli", "run", str(job)]
        driver = start_driver(command, driver_env(cluster.address), log)
        try:
            # Once round 0's probes are handed out the actors are busy with them (rows are
            # written in files of many rows, so the first file may come only at the end).
            probing = wait_for(
                lambda: "round 0: probing" in log.read_text(), "the probes", 300, driver
            )
            assert probing, f"the driver ended before probing:\n{log.read_text()[-3000:]}"
            (node,) = set(engine_nodes(run).values())
            lost_at = time.monotonic()
            cluster.tell(f"remove {node}", "removed")
            # A node joins once the driver has said what its actors wait for.
            waited = wait_for(lambda: WAITING in log.read_text(), "the restart wait", 300, driver)
            assert waited, f"the driver ended before waiting:\n{log.read_text()[-3000:]}"
            cluster.tell("add 2", "node")
            driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                kill(driver)
        took = time.monotonic() - lost_at
    finally:
        cluster.close()
    output = log.read_text()
    print(f"\nnode lost: the run ended {took:.0f} s later\n" + output[-3000:])
    assert driver.returncode == 0, output[-3000:]
    for worker in engine_nodes(run):  # as first started
        assert f"{worker} died while running" in output
        assert f"{worker} is back after" in output
    assert "failed" not in output.lower(), output[-3000:]
    return run


DISTURBANCES = {
    "chaos": chaos,
    "between-rounds": between_rounds,
    "transient-writes": transient_writes,
    "full-disk": full_disk,
    "store-cut": store_cut,
    "node-loss": node_loss,
}


@pytest.mark.parametrize("disturbance", list(DISTURBANCES))
def test_a_disturbed_run_resumes_to_the_undisturbed_result(
    disturbance: str,
    fdt_sparsify_run,
    tiny_llama_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    undisturbed, _ = fdt_sparsify_run
    run = DISTURBANCES[disturbance](Case(tmp_path, tiny_llama_dir, request))
    assert_same_result(run, undisturbed)
