"""Faults a run must survive or report in one line: two drivers on one run directory, a probe that
kills its actor every time, and a cluster that lacks the resources a job asks for."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from support.jobs import SHORT, tiny_job, write_job

from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.records.store import RunStore

# --- two drivers, one run directory -------------------------------------------------------------


# --- a poison probe -----------------------------------------------------------------------------


# --- an actor killed while its memory grows ----------------------------------------------------


# --- a job asking for a GPU the cluster does not have --------------------------------------------


# --- the lease on its own (no Ray) ----------------------------------------------------------------
def test_a_lease_of_another_host_is_refused_while_fresh_and_taken_over_when_stale(
    tmp_path: Path, capsys
) -> None:
    import json

    from dtm_ray.errors import ConfigError
    from dtm_ray.records.lease import LEASE_FILE, RunLease

    store = RunStore(str(tmp_path / "run"))
    holder = {"host": "elsewhere", "pid": 1, "token": "theirs", "heartbeat": time.time()}
    store.write_json(LEASE_FILE, holder)
    with pytest.raises(ConfigError, match="in use by the driver elsewhere:1"):
        RunLease(store, settle_s=0.1).acquire()
    store.write_json(LEASE_FILE, {**holder, "heartbeat": time.time() - 120})
    lease = RunLease(store, heartbeat_s=0.2, settle_s=0.1).acquire()
    assert "taking over the lease of the driver elsewhere:1" in capsys.readouterr().err
    first = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
    time.sleep(0.6)  # the heartbeat renews it
    again = json.loads((tmp_path / "run" / LEASE_FILE).read_text())
    assert again["token"] == lease.token and again["heartbeat"] > first["heartbeat"]
    lease.release()
    assert not (tmp_path / "run" / LEASE_FILE).exists()


# --- a resume on actors that compute differently ------------------------------------------------


# --- an actor that cannot start -------------------------------------------------------------------


# --- failed probes on resume, fingerprints, prompts of another run (no Ray) ---------------------
def _row(component: str, status: str, attempts: int) -> dict:
    return {
        "round": 0,
        "component": component,
        "spec": "int8",
        "attempts": attempts,
        "status": status,
        "error": None if status == "ok" else "its engine actor died under it 3 times",
    }


def test_failed_probes_run_again_on_resume_and_keep_counting_their_tries(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    store.fingerprint = "f" * 16
    store.write_probe_rows([_row("a", "ok", 1), _row("b", "failed", 3)], 0)
    assert store.finished_probes(0) == {("a", "int8"), ("b", "int8")}  # --no-retry-failed
    assert store.finished_probes(0, failed=False) == {("a", "int8")}  # the default: b again
    assert store.failed_attempts(0) == {("b", "int8"): 3}
    store.write_probe_rows([_row("b", "failed", 6)], 0)  # failed again: 3 more tries
    rows = {r["component"]: r for r in store.read_probes().to_pylist()}
    assert rows["b"]["attempts"] == 6  # the latest failed row counts every try
    assert {r["config_fingerprint"] for r in rows.values()} == {"f" * 16}
    store.write_probe_rows([_row("b", "ok", 7)], 0)
    store.compact_probes(0)
    rows = store.read_probes(dedupe=False).to_pylist()
    assert [(r["component"], r["status"], r["attempts"]) for r in rows] == [
        ("a", "ok", 1),
        ("b", "ok", 7),
    ]


def test_the_fingerprint_changes_with_what_a_run_measures_only(tmp_path: Path) -> None:
    from dtm_ray.job.resume import config_fingerprint

    job = load_job(
        write_job(tmp_path, tiny_job(Path("smollm2-135m"), tmp_path / "r", SHORT))
    ).to_dict()
    same = {**job, "workers": 4, "out": "elsewhere", "startup_timeout_s": 5}
    assert config_fingerprint(same) == config_fingerprint(job)
    assert config_fingerprint({**job, "new_tokens": 9}) != config_fingerprint(job)


def test_a_run_dir_as_prompt_source_gives_its_prompts(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from dtm_ray.core.state import Reference
    from dtm_ray.records.schemas import reference_table

    first = tmp_path / "first"
    store = RunStore(str(first))
    store.write_json("run.json", {"config": {"model": str(tiny_llama_dir)}})
    prefixes = np.arange(4 * 8, dtype=np.int64).reshape(4, 8) + 100
    zeros = np.zeros((4, 8), dtype=np.int64)
    reference = Reference(prefixes, zeros, zeros, np.ones((4, 8), dtype=np.float32))
    store.write_reference(reference_table(reference, 0), 0)
    job = write_job(
        tmp_path,
        tiny_job(
            tiny_llama_dir,
            tmp_path / "second",
            SHORT,
            prompts={"source": f"run:{first}", "count": 3, "prefix_tokens": 6},
        ),
    )
    checked = check_job(load_job(job))
    np.testing.assert_array_equal(checked.prefixes, prefixes[:3, :6])


def test_the_fan_out_gathers_completions_only_with_many_calls_in_flight() -> None:
    from dtm_ray.cluster.pool import GATHER_FROM, GATHER_MAX_S, EnginePool, _FanOut

    fan_out = _FanOut(EnginePool([None] * 64, max_in_flight=2), "probe", [])
    assert fan_out.gather_window(128) == 0.0  # no call has finished: their length is unknown
    fan_out.shortest = 1.0
    assert fan_out.gather_window(GATHER_FROM - 1) == 0.0  # few in flight: a pass is cheap
    assert fan_out.gather_window(128) == pytest.approx(0.1)  # the freed actor runs its next call
    fan_out.shortest = 60.0
    assert fan_out.gather_window(128) == GATHER_MAX_S
    alone = _FanOut(EnginePool([None] * 64, max_in_flight=1), "probe", [])
    alone.shortest = 1.0
    assert alone.gather_window(64) == pytest.approx(0.01)  # a freed actor idles: keep it short
