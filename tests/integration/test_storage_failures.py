"""Storage on a local S3 server (leases with conditional writes, the endpoint from the environment)
and an export or report on a full disk. (Runs disturbed by storage faults:
tests/e2e/test_disturbances.py.)"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from support.checks import visible_files
from support.faults import mount_tmpfs
from support.jobs import SPARSIFY, tiny_job

from dtm_ray import cli
from dtm_ray.records.lease import LEASE_FILE, RunLease
from dtm_ray.records.store import RunStore


def test_an_s3_run_dir_takes_its_endpoint_from_the_aws_environment(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_server.endpoint}")
    store = RunStore(f"s3://{s3_server.bucket}/from-env/run")  # no endpoint in the URI
    store.write_json("run.json", {"config": {"model": "m"}})
    assert store.read_run_info() == {"config": {"model": "m"}}
    stored = s3_server.filesystem().get_file_info(f"{s3_server.bucket}/from-env/run/run.json")
    assert stored.size > 0  # on the local server, not on AWS


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
        job.write_text(yaml.safe_dump(tiny_job(tiny_llama_dir, run_uri, **SPARSIFY)))
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


def test_an_export_or_report_on_a_full_disk_is_one_line_and_the_same_command_writes_it_again(
    fdt_sparsify_run, tmp_path: Path, capsys
) -> None:
    """The export's weights (safetensors, which reports the disk in its own words) and the
    report's files fail like a run's tables: one line, exit 1, nothing that looks finished; once
    space is freed the same command writes the export the run wrote itself, byte for byte."""
    run, _ = fdt_sparsify_run
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "64m"):
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
