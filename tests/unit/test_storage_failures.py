"""When the run directory cannot be written: transient errors (a timeout, a throttle) are retried
and the run goes on; a persistent one (a full disk, no permission) ends the run in one line with
exit code 1, the lease released and no half-written file. (Whole runs that meet these faults
and resume: tests/e2e/test_disturbances.py; S3 and a full disk: tests/integration.)"""

from __future__ import annotations

import errno
import time

import pytest
from support.checks import visible_files
from support.faults import TRANSIENT, Fail, every_nth_write, faulty_split

from dtm_ray import cli
from dtm_ray.cluster.logs import EngineLog
from dtm_ray.errors import StorageError
from dtm_ray.records import store as store_module
from dtm_ray.records.lease import LEASE_FILE, RunLease
from dtm_ray.records.store import RunStore


def faulty_store(monkeypatch, fail: Fail) -> None:
    """Every RunStore made from now on writes through FaultyFS(fail)."""
    monkeypatch.setattr(store_module, "_split_uri", faulty_split(fail))
    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.01, 0.01, 0.01, 0.01, 0.01))


# --- the store -----------------------------------------------------------------------------------
def test_a_transient_error_is_retried_and_the_write_lands(monkeypatch, tmp_path) -> None:
    tries = []

    def fail(method: str, path: str) -> OSError | None:
        if method == "open_output_stream":
            tries.append(path)
            return OSError(TRANSIENT) if len(tries) <= 2 else None
        return None

    faulty_store(monkeypatch, fail)
    store = RunStore(str(tmp_path / "run"))
    store.write_json("run.json", {"config": {"model": "m"}})
    assert len(tries) == 3  # two failures, then the write
    assert store.read_run_info() == {"config": {"model": "m"}}
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["run.json"]  # no temp file left


def test_a_full_disk_ends_at_once_naming_the_run_the_file_and_the_cause(
    monkeypatch, tmp_path
) -> None:
    tries = []

    def fail(method: str, path: str) -> OSError | None:
        if method == "open_output_stream":
            tries.append(path)
            return OSError(errno.ENOSPC, "No space left on device")
        return None

    faulty_store(monkeypatch, fail)
    store = RunStore(str(tmp_path / "run"))
    with pytest.raises(StorageError) as raised:
        store.write_json("run.json", {"config": {}})
    assert len(tries) == 1  # a persistent error is not retried
    message = str(raised.value)
    assert message.startswith("cannot write run.json in run dir ")
    assert str(tmp_path / "run") in message and message.endswith("(ENOSPC)")
    assert visible_files(tmp_path) == []


def test_a_transient_error_that_does_not_end_gives_up_after_the_retries(
    monkeypatch, tmp_path
) -> None:
    faulty_store(monkeypatch, every_nth_write(1, lambda: OSError(TRANSIENT)))
    store = RunStore(str(tmp_path / "run"))
    start = time.monotonic()
    with pytest.raises(StorageError, match="cannot write run.json in run dir .*NETWORK_CONNECTION"):
        store.write_json("run.json", {"config": {}})
    assert time.monotonic() - start >= 0.05  # it waited between the six tries
    assert visible_files(tmp_path) == []


def test_releasing_the_lease_on_failing_storage_does_not_raise(monkeypatch, tmp_path, capsys):
    store = RunStore(str(tmp_path / "run"))
    lease = RunLease(store, settle_s=0).acquire()
    faulty_store(monkeypatch, lambda method, path: OSError(errno.EACCES, "Permission denied"))
    lease.store = RunStore(str(tmp_path / "run"))
    lease.release()
    assert "could not remove the lease" in capsys.readouterr().err
    assert (tmp_path / "run" / LEASE_FILE).is_file()  # it lapses without heartbeats


def test_an_unwritable_engine_log_warns_once_and_the_run_goes_on(tmp_path, capsys) -> None:
    (tmp_path / "logs").write_text("a file where the log folder should be")
    log = EngineLog(tmp_path / "logs" / "engines.log", verbose=False)
    log.write(["first"])
    log.write(["second"])
    log.close()
    err = capsys.readouterr().err
    assert err.count("cannot write") == 1 and "engine output is not kept" in err


def test_a_write_that_fails_in_the_probe_writer_is_raised_on_the_driver(
    monkeypatch, tmp_path
) -> None:
    from dtm_ray.loop.progress import ProbeWriter

    def fail(method: str, path: str) -> OSError | None:
        full = OSError(errno.ENOSPC, "No space left on device")
        return full if method == "open_output_stream" and "part-" in path else None

    faulty_store(monkeypatch, fail)
    store = RunStore(str(tmp_path / "run"))
    writer = ProbeWriter(store, 0, every=1, seconds=60.0)
    writer.add(_row("a"))  # handed to the writer thread, which fails
    with pytest.raises(StorageError, match="ENOSPC"):
        writer.close()
    assert not list((tmp_path / "run").glob("probes/*.parquet"))


def _row(component: str) -> dict:
    return {
        "round": 0,
        "component": component,
        "layer": 0,
        "kind": "q",
        "spec": "int8",
        "params": 16,
        "fdt": [1],
        "sdt": [0],
        "fdt_mean": 1.0,
        "fdt_at_75": 1,
        "sdt_mean": 0.0,
        "nll_mean": 1.0,
        "seconds": 0.1,
        "worker": "engine-0",
        "attempts": 1,
        "status": "ok",
        "error": None,
    }


# --- one mapping for every writer ----------------------------------------------------------------
class SafetensorLikeError(Exception):
    """What safetensors raises on a full disk: no OSError, the OS error in its text."""


def test_every_writer_maps_a_full_disk_the_same_way_whatever_raised_it(monkeypatch) -> None:
    from dtm_ray.records.store import retrying

    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.01, 0.01))
    tries = []

    def save() -> None:
        tries.append(1)
        raise SafetensorLikeError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    with pytest.raises(StorageError) as raised:
        retrying("write", "model.safetensors of the export to /x/export", save)
    assert len(tries) == 1  # persistent: not retried
    assert str(raised.value) == (
        "cannot write model.safetensors of the export to /x/export: "
        "No space left on device (ENOSPC)"
    )
    # A transient OS error is retried, then the write lands; what is no storage failure passes.
    flaky = iter([OSError(TRANSIENT), None])

    def write() -> str:
        error = next(flaky)
        if error is not None:
            raise error
        return "written"

    assert retrying("write", "x", write) == "written"
    with pytest.raises(KeyError):
        retrying("write", "x", lambda: {}["bug"])


def test_a_full_disk_no_writer_mapped_is_still_one_line_and_exit_1(monkeypatch, capsys) -> None:
    from dtm_ray.results import show

    def full(run_dir: str):  # noqa: ANN202
        raise OSError(errno.ENOSPC, "No space left on device", "/x/run/file")

    monkeypatch.setattr(show, "load_run", full)
    assert cli.main(["show", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "dtm-ray: error: cannot write /x/run/file: No space left on device (ENOSPC); run the "
        "same command again to resume once storage is back\n"
    )
