"""Storage on a local S3 server (leases with conditional writes, the endpoint from the environment)
and an export or report on a full disk. (Runs disturbed by storage faults:
tests/e2e/test_disturbances.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
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
