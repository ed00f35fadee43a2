"""When the run directory cannot be written: transient errors (a timeout, a throttle) are retried
and the run goes on; a persistent one (a full disk, no permission) ends the run in one line with
exit code 1, the lease released and no half-written file, and the same command resumes it to
the same result as a run never disturbed."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import FDT_SPARSIFY, assert_same_result, tiny_compress_job, visible_files
from faults import TRANSIENT, Fail, every_nth_write, faulty_split, small_probe_files

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


# --- real runs -----------------------------------------------------------------------------------
def write_job(folder: Path, model_dir: Path, out: Path) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_compress_job(model_dir, out, FDT_SPARSIFY)))
    return path


@pytest.mark.slow
def test_transient_storage_errors_are_retried_and_change_nothing(
    ray_session, fdt_sparsify_run, monkeypatch, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    undisturbed, _ = fdt_sparsify_run
    faulty_store(monkeypatch, every_nth_write(3, lambda: OSError(TRANSIENT)))
    out = tmp_path / "run"
    assert cli.main(["run", str(write_job(tmp_path, tiny_llama_dir, out))]) == 0
    assert_same_result(out, undisturbed)
    assert not (out / LEASE_FILE).exists()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_the_same_command_resumes(
    ray_session, fdt_sparsify_run, tiny_llama_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from dtm_ray.loop import rounds

    undisturbed, _ = fdt_sparsify_run
    # Files of 2 rows: the disk fills at round 0's first file, and the writer thread's next file
    # fails mid-round.
    monkeypatch.setattr(rounds, "ProbeWriter", small_probe_files(2))
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs needs root and the mount command")
    try:
        out = disk / "run"
        job = write_job(tmp_path, tiny_llama_dir, out)
        ballast = disk / "ballast"

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
        assert failed[0].endswith("run the same command again to resume once storage is back")
        assert not (out / LEASE_FILE).exists()  # released (a delete frees space, so it works)
        for path in visible_files(out):
            if path.suffix == ".parquet":
                pq.read_table(path)  # nothing half-written is visible

        ballast.unlink()  # space again: the same command resumes
        assert cli.main(["run", str(job)]) == 0, capsys.readouterr().err
        assert "done before" in capsys.readouterr().err
        assert_same_result(out, undisturbed)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# --- an object store (the s3_server fixture: conftest) ------------------------------------------


def test_an_s3_run_dir_takes_its_endpoint_from_the_aws_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_server.endpoint}")
    store = RunStore(f"s3://{s3_server.bucket}/from-env/run")  # no endpoint in the URI
    store.write_json("run.json", {"config": {"model": "m"}})
    assert store.read_run_info() == {"config": {"model": "m"}}
    stored = s3_server.filesystem().get_file_info(f"{s3_server.bucket}/from-env/run/run.json")
    assert stored.size > 0  # on the local server, not on AWS


@pytest.mark.slow
def test_an_object_store_that_goes_away_ends_the_run_in_one_line_and_the_same_command_resumes(
    ray_session, fdt_sparsify_run, s3_server, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import pyarrow.fs as pafs

    undisturbed, _ = fdt_sparsify_run
    run_uri = s3_server.uri("cut/run")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_compress_job(tiny_llama_dir, run_uri, FDT_SPARSIFY)))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # Files of 4 rows: the store goes away at round 0's first file, while the round goes on.
    faults = Path(__file__).resolve().parent / "driver_with_faults.py"
    command = [sys.executable, str(faults), str(job), "--flush-every", "4"]
    store = s3_server.filesystem()

    def part_files() -> list:
        found = store.get_file_info(
            pafs.FileSelector(f"{s3_server.bucket}/cut/run/probes", allow_not_found=True)
        )
        return [f for f in found if f.base_name.startswith("part-")]

    # Logs of an object-store run go to ./dtm-ray-logs: here, the test's folder.
    driver = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not part_files() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    s3_server.relay.cut()  # the store goes away mid-round: every request is refused
    cut_at = time.monotonic()
    try:
        _, err = driver.communicate(timeout=300)
    finally:
        seconds = time.monotonic() - cut_at
        s3_server.relay.restore()
    failed = [line for line in err.splitlines() if line.startswith("dtm-ray: error:")]
    print(f"\nobject store cut: exit {driver.returncode} after {seconds:.1f} s: {failed}")
    assert driver.returncode == 1, err[-3000:]
    assert len(failed) == 1 and "Traceback" not in err, err[-3000:]
    assert f"in run dir {run_uri.split('?')[0]}" in failed[0] or "s3://" in failed[0], failed
    assert failed[0].endswith("run the same command again to resume once storage is back")

    again = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "done before" in again.stderr
    assert_same_result(s3_server.download("cut/run", tmp_path / "copy"), undisturbed)


def test_two_drivers_on_one_s3_run_dir_one_is_refused_in_one_line(
    s3_server, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    """On S3 the lease is taken with conditional writes: of two drivers creating it at once,
    or taking over the same stale lease, exactly one succeeds; the other refuses naming it."""
    import json
    import socket

    from dtm_ray.errors import ConfigError

    run_uri = s3_server.uri("two-drivers/run")
    first = RunLease(RunStore(run_uri), heartbeat_s=0.2).acquire()
    try:
        assert first.conditional
        # A second driver's run ends in one line naming the holder, before any actor starts.
        job = tmp_path / "job.yaml"
        job.write_text(yaml.safe_dump(tiny_compress_job(tiny_llama_dir, run_uri, FDT_SPARSIFY)))
        assert cli.main(["run", str(job)]) == 2
        err = capsys.readouterr().err.strip()
        holder = f"the driver {socket.gethostname()}:{os.getpid()}"
        assert err.startswith(f"dtm-ray: error: run dir {run_uri} is in use by {holder} (last")
        assert "\n" not in err
        # The race itself: both read "no lease" (or the same stale one), both write.
        other = RunLease(RunStore(run_uri))
        etag = first._file.read()[1]
        assert other._file.write(other._record(), None) is None  # it exists: create fails
        assert other._file.write(other._record(), '"stale-etag"') is None  # changed meanwhile
        time.sleep(0.5)  # the holder's heartbeats renew it with its own etag
        assert first._file.read()[1] != etag and first._file.read()[0]["token"] == first.token
        with pytest.raises(ConfigError, match=f"is in use by {holder}"):
            other.acquire()
    finally:
        first.release()
    assert RunStore(run_uri).read_json(LEASE_FILE) is None
    # A stale lease (a driver killed elsewhere) is taken over with If-Match: only one wins.
    store = RunStore(run_uri)
    store.write_json(LEASE_FILE, {"host": "gone", "pid": 1, "token": "x", "heartbeat": 0.0})
    a, b = RunLease(RunStore(run_uri)), RunLease(RunStore(run_uri))
    stale, etag = a._file.read()
    assert a._file.write(a._record(), etag) is not None
    assert b._file.write(b._record(), etag) is None  # the same stale etag: refused
    assert json.loads(json.dumps(store.read_json(LEASE_FILE)))["token"] == a.token
    store.delete(LEASE_FILE)


def test_a_driver_releasing_its_lease_never_deletes_one_another_driver_took_over(
    s3_server, monkeypatch
) -> None:
    """On S3 the release deletes the lease with If-Match on the etag it read as its own: a
    takeover between that read and the delete keeps the new holder's lease. A store without
    conditional deletes gets the read-then-delete of other stores."""
    from botocore.exceptions import ClientError

    run_uri = s3_server.uri("release/run")
    a = RunLease(RunStore(run_uri), heartbeat_s=60).acquire()
    b = RunLease(RunStore(run_uri), heartbeat_s=60)
    assert a.conditional and b.conditional
    read = a._file.read

    def read_then_taken_over():  # a stalled holder: its lease is taken over right after
        holder, etag = read()
        assert holder["token"] == a.token
        b._etag = b._file.write(b._record(), etag)
        assert b._etag is not None
        return holder, etag

    monkeypatch.setattr(a._file, "read", read_then_taken_over)
    a.release()
    monkeypatch.undo()
    assert RunStore(run_uri).read_json(LEASE_FILE)["token"] == b.token  # still b's
    b.release()
    assert RunStore(run_uri).read_json(LEASE_FILE) is None  # b's own release deletes it

    # A store that answers a conditional delete with 501: the lease read as ours is deleted.
    c = RunLease(RunStore(run_uri), heartbeat_s=60).acquire()
    plain = c._file.client.delete_object

    def no_conditions(**kwargs):
        if "IfMatch" in kwargs:
            error = {"Error": {"Code": "NotImplemented", "Message": "If-Match"}}
            raise ClientError(error, "DeleteObject")
        return plain(**kwargs)

    monkeypatch.setattr(c._file.client, "delete_object", no_conditions)
    c.release()
    assert RunStore(run_uri).read_json(LEASE_FILE) is None


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


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib
    import json

    found = {}
    for path in visible_files(folder):
        data = path.read_bytes()
        if path.name == "export.json":  # its time and run dir are the export's own
            meta = {k: v for k, v in json.loads(data).items() if k not in ("exported", "run_dir")}
            data = json.dumps(meta, sort_keys=True).encode()
        found[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return found


def _fill(path: Path, leave: int = 0) -> None:
    """Write zeros into `path` until its disk has `leave` bytes free (or none)."""
    with open(path, "ab") as fill:
        try:
            while True:
                room = os.statvfs(path.parent)
                left = room.f_bavail * room.f_frsize - leave
                if left <= 0:
                    return
                fill.write(b"\0" * min(left, 1 << 20))
                fill.flush()
        except OSError:
            pass  # full


@pytest.mark.slow
def test_an_export_or_report_on_a_full_disk_is_one_line_and_the_same_command_writes_it_again(
    fdt_sparsify_run, tmp_path: Path, capsys
) -> None:
    """The export's weights (safetensors, which reports the disk in its own words) and the
    report's files fail like a run's tables: one line, exit 1, nothing that looks finished; once
    space is freed the same command writes the export the run wrote itself, byte for byte."""
    run, _ = fdt_sparsify_run
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("mounting a tmpfs needs root and the mount command")
    try:
        ballast = disk / "ballast"
        _fill(ballast, leave=4 << 20)  # the tiny Llama's weights are 26 MB
        out = disk / "export"
        command = ["export", str(run), "--out", str(out)]
        code = cli.main(command)
        err = capsys.readouterr().err
        assert code == 1, err
        assert err == (
            f"dtm-ray: error: cannot write model.safetensors of the export to {out}: No space "
            "left on device (ENOSPC); run the same command again to resume once storage is back\n"
        )
        assert [p.name for p in disk.iterdir()] == ["ballast"]  # no export, no hidden folder

        _fill(ballast)  # not even a report's plots fit
        assert cli.main(["report", str(run), "--out", str(disk / "report")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("dtm-ray: error: cannot write ") and err.count("\n") == 1
        assert f"of the report in {disk / 'report'}: No space left on device (ENOSPC)" in err

        ballast.unlink()  # space again: the same command
        assert cli.main(command) == 0, capsys.readouterr().err
        assert _hashes(out) == _hashes(run / "export")
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
