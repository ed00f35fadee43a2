"""Store URIs: a URI of the wrong shape (no bucket, a bad bucket, an empty prefix part, an unknown
scheme) is refused in one line, exit 2, before any store client exists; a store that cannot be
reached ends, within a bounded time, in one line naming its endpoint (exit 1: storage, not the
job). The bound is tested against a closed port on 127.0.0.1, never a real endpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from support.s3_server import free_port, store_at

from dtm_ray import cli
from dtm_ray.errors import ConfigError, StorageError
from dtm_ray.records import store as store_module
from dtm_ray.records.store import RunStore, check_store_uri


@pytest.fixture
def no_store_clients(monkeypatch) -> list[str]:
    """Every way dtm_ray makes a store client raises (and is recorded): pyarrow's `from_uri`,
    its S3 and GCS filesystems, boto3's client. A test passing with this made no client."""
    made: list[str] = []

    def forbidden(name: str):  # noqa: ANN202
        def make(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            made.append(name)
            raise AssertionError(f"a store client was made: {name}")

        return make

    class NoFileSystem:
        from_uri = staticmethod(forbidden("FileSystem.from_uri"))

    monkeypatch.setattr(pafs, "FileSystem", NoFileSystem)
    monkeypatch.setattr(pafs, "S3FileSystem", forbidden("S3FileSystem"))
    monkeypatch.setattr(pafs, "GcsFileSystem", forbidden("GcsFileSystem"))
    try:
        import boto3

        monkeypatch.setattr(boto3, "client", forbidden("boto3.client"))
    except ImportError:
        pass
    return made


# --- the shape of a URI ----------------------------------------------------------------------
MALFORMED = [
    ("gs://", "names no bucket; expected gs://bucket/prefix"),
    ("s3://", "names no bucket; expected s3://bucket/prefix"),
    ("s3:///prefix", "names no bucket; expected s3://bucket/prefix"),
    ("gcs:///prefix?endpoint_override=127.0.0.1:1", "names no bucket"),
    ("s3://b/prefix", "'b' is not a bucket name"),
    ("s3://bad_bucket_/x", "'bad_bucket_' is not a bucket name"),
    ("gs://bucket//prefix", "has an empty, '.' or '..' part"),
    ("s3://bucket/a/../b", "has an empty, '.' or '..' part"),
    ("hdfs://host/path", "hdfs:// is not a supported store"),
    ("file://relative/path", "a file:// URI takes an absolute path"),
]


@pytest.mark.parametrize("uri, message", MALFORMED)
def test_a_malformed_store_uri_is_refused_without_a_client(
    no_store_clients, uri: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=f"^model {uri.split('?')[0]}.*{message}"):
        check_store_uri(uri, "model")
    with pytest.raises(ConfigError, match=message):
        RunStore(uri)
    assert no_store_clients == []


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket",
        "s3://bucket/",
        "s3://my.bucket-1/a/b/",
        "gs://bucket/a?x=1",
        "s3://key:secret@bucket/run",
        "file:///abs/run",
        "runs/x",
    ],
)
def test_a_well_formed_uri_passes_the_shape_check(uri: str) -> None:
    check_store_uri(uri, "out")


def _job(tmp_path: Path, model: str, **more) -> Path:
    job = {
        "model": model,
        "engine": "hf",
        "prompts": {"source": "pydoc", "count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "probe": {"components": "all", "specs": ["int8"]},
        "out": str(tmp_path / "run"),
        **more,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("model", ["gs://", "s3://", "s3:///prefix"])
def test_a_model_uri_without_a_bucket_is_one_line_exit_2_under_a_second(
    no_store_clients, tmp_path: Path, capsys, model: str
) -> None:
    job = _job(tmp_path, model)
    start = time.monotonic()
    code = cli.main(["run", str(job)])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nmodel: {model}: exit {code} in {seconds:.3f} s: {err.strip()}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"dtm-ray: error: model {model} names no bucket")
    assert seconds < 1.0
    assert no_store_clients == []
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "JOB", "--out", "s3:///runs/x"],
        ["run", "JOB", "--set", "prompts.source=run:gs://"],
        ["show", "s3://"],
        ["report", "gs:///x"],
        ["export", "s3:///runs/x"],
        ["evaluate", "s3://"],
    ],
)
def test_a_run_dir_uri_without_a_bucket_is_one_line_exit_2(
    no_store_clients, tiny_llama_dir: Path, tmp_path: Path, capsys, argv: list[str]
) -> None:
    job = _job(tmp_path, str(tiny_llama_dir))
    start = time.monotonic()
    code = cli.main([str(job) if a == "JOB" else a for a in argv])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "names no bucket" in err, err
    assert seconds < 5.0  # `run` reads the model's config and prompts first; no store, no Ray
    assert no_store_clients == []


# --- a store that cannot be reached ----------------------------------------------------------


def test_the_lease_on_an_unreachable_store_is_a_storage_error_naming_its_endpoint(
    monkeypatch,
) -> None:
    """The lease's own client (boto3: conditional writes) has the same bound and message."""
    pytest.importorskip("boto3")
    from dtm_ray.records.lease import ConditionalLeaseFile

    monkeypatch.setattr(store_module, "RETRY_DELAYS_S", (0.01, 0.01))
    port = free_port()
    store = RunStore(store_at("runs/lease", port))
    lease_file = ConditionalLeaseFile.of(store)
    assert lease_file is not None
    start = time.monotonic()
    with pytest.raises(StorageError) as raised:
        lease_file.read()
    assert time.monotonic() - start < 10
    message = str(raised.value)
    assert message.startswith("cannot read lease.json in run dir s3://runs/lease")
    assert f"the store at http://127.0.0.1:{port} cannot be reached" in message


def test_store_clients_are_made_with_a_connect_timeout_and_bounded_retries() -> None:
    fs, _ = store_module.open_filesystem(store_at("runs/x", free_port()))
    assert fs.__reduce__()[1][0]["connect_timeout"] == store_module.CONNECT_TIMEOUT_S
    gcs, _ = store_module.open_filesystem("gs://bucket/x?endpoint_override=127.0.0.1:1")
    limit = gcs.__reduce__()[1][0]["retry_time_limit"]
    assert limit.total_seconds() == store_module.GCS_RETRY_LIMIT_S
