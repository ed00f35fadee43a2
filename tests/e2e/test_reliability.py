"""Runs that meet broken actors and drivers: two drivers on one run dir, a probe that kills its
actor, an actor killed while its memory grows, a GPU job on a CPU cluster, a resume on another
dtype, a model that cannot load, SIGTERM while waiting. (The rules alone:
tests/unit/test_reliability.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.jobs import SHORT, tiny_job, write_job

from dtm_ray.cluster.actor import EngineActor, RoundContext
from dtm_ray.core.state import ModelState
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.rounds import JobEngines, Probe, build_reference, run_probes
from dtm_ray.records.store import RunStore

POISON = "model.layers.0.self_attn.k_proj.weight"


def probe_counts(out: Path) -> dict[tuple[str, str], int]:
    """How often each probe appears in the raw table, as a user's pandas reads it."""
    table = pd.read_parquet(out / "probes")
    return table.groupby(["component", "spec"]).size().to_dict()


def test_two_drivers_on_one_out_one_runs_one_refuses(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job = write_job(tmp_path, tiny_job(tiny_llama_dir, out, SHORT))
    # Both join this session's cluster, so neither pays for starting Ray.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "dtm_ray.cli", "run", str(job)]
    start = time.monotonic()
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    drivers = [subprocess.Popen(command, env=env, **pipes) for _ in range(2)]
    results = [(d.communicate(timeout=600), d.returncode) for d in drivers]
    seconds = time.monotonic() - start
    codes = sorted(code for _, code in results)
    refused = next(err for (_, err), code in results if code == 2)
    print(f"\ntwo drivers: exit codes {codes} after {seconds:.1f} s; refusal: {refused.strip()}")
    assert codes == [0, 2]
    assert refused.strip().splitlines()[-1].startswith("dtm-ray: error: run dir ")
    assert "is in use by the driver" in refused and "Traceback" not in refused
    counts = probe_counts(out)
    assert len(counts) == 8 and set(counts.values()) == {1}, counts
    assert not (out / "lease.json").exists()  # released by the driver that ran


def probe_round_on(checked, store: RunStore, actor_class: type, workers: int) -> int:  # noqa: ANN001
    """Round 0's probes of `checked` on `workers` actors of `actor_class`; how many ran."""
    engines = JobEngines(checked, workers, actor_class=actor_class)
    try:
        reference = build_reference(engines, store, checked.job, 0, ModelState())
        context = RoundContext(0, ModelState(), reference.reference)
        probes = [Probe(c, s) for c, s in checked.probes]
        return run_probes(engines, store, context, probes, Streaming())
    finally:
        engines.close()


class PoisonActor(EngineActor):
    """An engine actor whose process dies (SIGKILL) whenever it is asked to probe POISON."""

    def probe(self, delta, context):  # noqa: ANN001, ANN201
        if POISON in delta:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().probe(delta, context)


def test_a_probe_that_kills_its_actor_is_recorded_failed_and_the_others_finish(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "run"
    checked = check_job(
        load_job(write_job(tmp_path, tiny_job(tiny_llama_dir, out, SHORT, max_probe_crashes=2)))
    )
    store = RunStore(str(out))
    start = time.monotonic()
    ran = probe_round_on(checked, store, PoisonActor, workers=1)
    seconds = time.monotonic() - start
    rows = {r["component"]: r for r in store.read_probes().to_pylist()}
    print(f"\npoison probe: {ran} probes in {seconds:.1f} s; {POISON}: {rows[POISON]['error']}")
    assert ran == 8 and len(rows) == 8
    poison = rows.pop(POISON)
    assert poison["status"] == "failed" and poison["attempts"] == 3  # 1 try + 2 after crashes
    assert "its engine actor died under it 3 times" in poison["error"]
    # The others finished, and a probe queued behind the poison one was not charged a try.
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert {r["attempts"] for r in rows.values()} == {1}


HUNGRY = "model.layers.1.self_attn.v_proj.weight"


HUNGRY_MARK = Path(os.environ.get("TMPDIR", "/tmp")) / f"dtm-ray-hungry-{os.getpid()}"


class HungryActor(EngineActor):
    """An engine actor whose first probe of HUNGRY grows its memory until it is killed, as a
    probe that overruns its node's memory does until Ray's memory monitor kills the process."""

    def probe(self, delta, context):  # noqa: ANN001, ANN201
        if HUNGRY in delta and not HUNGRY_MARK.exists():
            # Written whole, then renamed: the test never reads a half-written mark.
            part = HUNGRY_MARK.with_suffix(".part")
            part.write_text(str(os.getpid()))
            part.replace(HUNGRY_MARK)
            grown = []
            for _ in range(160):  # up to 5 GiB over ~8 s, if nobody kills it first
                grown.append(np.ones(2**22, dtype=np.float64))  # 32 MiB, touched
                time.sleep(0.05)
            raise RuntimeError("nobody killed the hungry actor")
        return super().probe(delta, context)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_an_actor_killed_while_its_memory_grows_costs_its_probe_one_crash_only(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    HUNGRY_MARK.unlink(missing_ok=True)
    out = tmp_path / "run"
    checked = check_job(
        load_job(write_job(tmp_path, tiny_job(tiny_llama_dir, out, SHORT, max_probe_crashes=2)))
    )
    store = RunStore(str(out))
    killed = {}

    def kill_once_grown() -> None:
        deadline = time.monotonic() + 300
        while not HUNGRY_MARK.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        pid = int(HUNGRY_MARK.read_text())
        start = _rss_mib(pid)
        while _rss_mib(pid) < start + 512 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed["grown_mib"] = _rss_mib(pid) - start
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = ThreadPoolExecutor(1).submit(kill_once_grown)
    try:
        ran = probe_round_on(checked, store, HungryActor, workers=2)
    finally:
        HUNGRY_MARK.unlink(missing_ok=True)
    killer.result(timeout=10)
    rows = {r["component"]: r for r in store.read_probes().to_pylist()}
    print(
        f"\nmemory kill: actor {killed['pid']} killed after growing {killed['grown_mib']:.0f} MiB"
    )
    assert ran == 8 and len(rows) == 8
    assert {r["status"] for r in rows.values()} == {"ok"}
    # Charged as a crash of its probe, which ran again on the restarted actor; nothing else.
    assert rows[HUNGRY]["attempts"] == 2
    assert [r["attempts"] for c, r in rows.items() if c != HUNGRY] == [1] * 7


def _processes_with(marker: str, names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(pid, name) of the processes called one of `names` whose environment holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            name = Path(f"/proc/{entry}/comm").read_text().strip()
            if name in names and marker.encode() in Path(f"/proc/{entry}/environ").read_bytes():
                found.append((int(entry), name))
        except OSError:
            continue
    return found


@dataclass
class WaitingDriver:
    """A `dtm-ray run` of a GPU job with a Ray of its own on this CPU-only machine."""

    out: Path
    marker: str  # in the environment of the driver and of the Ray it starts
    lines: list[tuple[float, str]]  # (seconds since start, stderr line)
    returncode: int
    seconds: float


def _run_waiting_driver(
    folder: Path, model_dir: Path, startup_timeout_s: float, sigterm_when_waiting: bool
) -> WaitingDriver:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "run"
    job = write_job(
        folder,
        tiny_job(
            model_dir,
            out,
            SHORT,
            resources_per_worker={"GPU": 1},
            startup_timeout_s=startup_timeout_s,
        ),
    )
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env.update({"DTM_RAY_TEST_MARK": marker, "RAY_AUTH_MODE": "disabled"})
    command = [sys.executable, "-m", "dtm_ray.cli", "run", str(job)]
    start = time.monotonic()
    driver = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    for line in driver.stderr:
        lines.append((time.monotonic() - start, line.rstrip()))
        if sigterm_when_waiting and "no node has GPU" in line:
            driver.send_signal(signal.SIGTERM)  # as `kill` or a scheduler's timeout would
    driver.wait(timeout=60)
    return WaitingDriver(out, marker, lines, driver.returncode, time.monotonic() - start)


@pytest.fixture(scope="module")
def gpu_jobs_on_a_cpu_cluster(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, WaitingDriver]:
    """Two GPU jobs on this CPU-only machine, run side by side (each mostly waits): one that
    gives up after its startup_timeout_s, one stopped by SIGTERM while it waits."""
    folder = tmp_path_factory.mktemp("gpu-jobs")
    settings = {"gives-up": (6, False), "sigterm": (300, True)}
    with ThreadPoolExecutor(len(settings)) as pool:
        futures = {
            name: pool.submit(_run_waiting_driver, folder / name, tiny_llama_dir, timeout, term)
            for name, (timeout, term) in settings.items()
        }
        return {name: future.result() for name, future in futures.items()}


def _ray_left_behind(marker: str) -> list[tuple[int, str]]:
    """Ray's processes a driver started and still running 2 s after it ended (they exit as the
    driver shuts Ray down)."""
    deadline = time.monotonic() + 2
    left = _processes_with(marker, ("raylet", "gcs_server"))
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _processes_with(marker, ("raylet", "gcs_server"))
    return left


def test_a_gpu_job_on_a_cpu_cluster_says_so_and_gives_up(gpu_jobs_on_a_cpu_cluster) -> None:
    driver = gpu_jobs_on_a_cpu_cluster["gives-up"]
    text = "\n".join(f"{t:6.1f} s  {line}" for t, line in driver.lines)
    print(f"\nGPU job on a CPU cluster, exit {driver.returncode} after {driver.seconds:.1f} s")
    print(text)

    lines = driver.lines
    asked = next(t for t, line in lines if "starting 1 engine actor(s)" in line)
    waiting = [(t, line) for t, line in lines if "waiting" in line and "no node has GPU" in line]
    assert waiting and waiting[0][0] - asked < 10
    assert "the cluster offers: CPU" in waiting[0][1]
    errors = [line for _, line in lines if line.startswith("dtm-ray: error:")]
    assert driver.returncode == 2 and len(errors) == 1
    assert "gave up after" in errors[0] and "never started" in errors[0]
    assert "Traceback" not in text
    assert not driver.out.exists()  # nothing was measured, so nothing is left
    assert _ray_left_behind(driver.marker) == []


def test_a_resume_whose_actors_resolve_another_dtype_is_refused(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import json
    import shutil

    from dtm_ray.errors import ConfigError
    from dtm_ray.loop.driver import run_checked_job

    out = tmp_path / "run"
    job = write_job(
        tmp_path,
        tiny_job(
            tiny_llama_dir, out, SHORT, probe={"components": [{"kinds": ["q"]}], "specs": ["int8"]}
        ),
    )
    run_checked_job(check_job(load_job(job)), print_summary=False)
    run = json.loads((out / "run.json").read_text())
    assert run["engine_facts"] == {"engine": "hf", "dtype": "float32"}
    assert run["actors"][0]["actors"][0]["hardware"]["cpu_count"] == os.cpu_count()
    assert set(pd.read_parquet(out / "reference")["dtype"]) == {"float32"}
    # As if the run had been measured on a GPU, where `dtype: auto` means bfloat16.
    run["engine_facts"]["dtype"] = "bfloat16"
    (out / "run.json").write_text(json.dumps(run))
    shutil.rmtree(out / "probes")  # probes left to run, so the resume starts actors
    with pytest.raises(ConfigError, match="was measured by hf in bfloat16; its actors now run hf"):
        run_checked_job(check_job(load_job(job)), print_summary=False)


def test_an_actor_that_cannot_load_the_model_ends_the_run_in_one_line(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from dtm_ray.errors import StartupError
    from dtm_ray.loop.driver import run_checked_job

    broken = tmp_path / "model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    out = tmp_path / "run"
    checked = check_job(
        load_job(write_job(tmp_path, tiny_job(broken, out, SHORT)))
    )  # valid: config.json is fine
    start = time.monotonic()
    with pytest.raises(StartupError) as caught:
        run_checked_job(checked, print_summary=False)
    message = str(caught.value)
    print(f"\nbroken weights: {time.monotonic() - start:.1f} s: {message}")
    assert message.startswith("engine actor engine-0 on node ") and " could not start: " in message
    assert "\n" not in message
    assert not out.exists()  # nothing measured, nothing left


def test_sigterm_while_waiting_for_resources_stops_cleanly(gpu_jobs_on_a_cpu_cluster) -> None:
    driver = gpu_jobs_on_a_cpu_cluster["sigterm"]
    lines = [line for _, line in driver.lines]
    print(f"\nSIGTERM while waiting: exit {driver.returncode}; last line: {lines[-1]}")
    assert any("no node has GPU" in line for line in lines)  # the signal came while it waited
    assert driver.returncode == 130, "\n".join(lines)
    assert "interrupted" in lines[-1]
    assert not driver.out.exists()
    assert _ray_left_behind(driver.marker) == []
