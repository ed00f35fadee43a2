"""Model sources: a job's `model` named as an object-store URI or a hub id is resolved once on the
driver (pinned, digested), read there only for config and tokenizer, and materialised once per
node from the source itself; each bad source is one line, exit 2, before Ray starts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import yaml
from conftest import model_uri

from dtm_ray import cli
from dtm_ray.cluster.actor import EngineActor, StartupReport
from dtm_ray.cluster.pool import STARTUP_BYTES_PER_S, startup_budget_s
from dtm_ray.engines import sources
from dtm_ray.engines.sources import (
    HUB,
    STORE,
    driver_folder,
    evict,
    node_folder,
    resolve_source,
)
from dtm_ray.errors import ConfigError

SHA = "0123456789abcdef0123456789abcdef01234567"  # the commit the fake hub cache holds


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch) -> Path:
    """This test's node-local model cache (actors started now get it too)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DTM_RAY_CACHE", str(cache))
    return cache


# --- object stores -----------------------------------------------------------------------------
def test_an_s3_model_is_listed_on_the_driver_and_fetched_once_per_node(
    model_store, tiny_llama_dir: Path, node_cache: Path
) -> None:
    uri = model_uri(model_store, "tiny")
    source = resolve_source(uri)
    weights = (tiny_llama_dir / "model.safetensors").stat().st_size
    assert (source.kind, source.id, source.bytes) == (STORE, uri, weights)
    assert resolve_source(uri).digest == source.digest  # stable while the objects are

    meta = driver_folder(source)  # what the driver's checks read: no weights
    assert (meta / "config.json").read_bytes() == (tiny_llama_dir / "config.json").read_bytes()
    assert (meta / "tokenizer.json").is_file() and not list(meta.glob("*.safetensors"))

    said: list[str] = []
    folder = node_folder(source, said.append)
    total = sum(p.stat().st_size for p in tiny_llama_dir.iterdir())
    assert said[0] == f"fetching {source.name}: 0 of {total / 1e6:.1f} MB"
    assert folder.is_relative_to(node_cache)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    again: list[str] = []
    assert node_folder(source, again.append) == folder and again == []  # fetched once


def test_a_changed_object_is_a_new_digest_and_a_new_copy(
    model_store, tiny_llama_dir: Path, node_cache: Path
) -> None:
    fs = model_store.filesystem()
    pafs.copy_files(
        str(tiny_llama_dir), "models/changing", destination_filesystem=fs,
        source_filesystem=pafs.LocalFileSystem(),
    )  # fmt: skip
    before = resolve_source(model_uri(model_store, "changing"))
    old = node_folder(before)  # this node fetched it before the change
    with fs.open_output_stream("models/changing/generation_config.json") as out:
        out.write(b'{"changed": true, "padding": "' + b"x" * 100 + b'"}')
    after = resolve_source(model_uri(model_store, "changing"))
    assert after.digest != before.digest
    assert node_folder(before) == old  # a run that started before keeps what it measured
    new = node_folder(after)
    assert new != old and b"changed" in (new / "generation_config.json").read_bytes()
    evict(before)  # a node without a copy cannot fetch the old version any more: refused
    with pytest.raises(ConfigError, match="changed since the run resolved it"):
        node_folder(before)


def test_only_the_checkpoint_is_fetched_of_a_prefix_with_other_weight_copies(
    model_store, tiny_llama_dir: Path, node_cache: Path
) -> None:
    fs = model_store.filesystem()
    pafs.copy_files(
        str(tiny_llama_dir), "models/copies", destination_filesystem=fs,
        source_filesystem=pafs.LocalFileSystem(),
    )  # fmt: skip
    for extra in ("pytorch_model.bin", "consolidated.safetensors", "original/model.safetensors"):
        with fs.open_output_stream(f"models/copies/{extra}") as out:
            out.write(b"\0" * 1000)
    source = resolve_source(model_uri(model_store, "copies"))
    assert source.bytes == (tiny_llama_dir / "model.safetensors").stat().st_size
    folder = node_folder(source)
    assert sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "model.safetensors"
    ]
    assert not (folder / "original").exists()


@pytest.mark.parametrize(
    "path, message",
    [
        ("s3://no-such-bucket/tiny", "the bucket does not exist"),
        ("s3://models/no-such-prefix", "no such bucket or prefix"),
        ("s3://models/tiny/model.safetensors", "no such bucket or prefix"),
    ],
)
def test_a_missing_bucket_or_prefix_is_one_line(model_store, path: str, message: str) -> None:
    uri = f"{path}?{model_store.uri('x').split('?', 1)[1]}"
    with pytest.raises(ConfigError) as raised:
        resolve_source(uri)
    assert str(raised.value) == f"model {path}: {message}"


def test_a_prefix_without_config_json_is_one_line(model_store, tiny_llama_dir: Path) -> None:
    fs = model_store.filesystem()
    with fs.open_output_stream("models/weights-only/model.safetensors") as out:
        out.write((tiny_llama_dir / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"^model s3://models/weights-only has no config.json$"):
        resolve_source(model_uri(model_store, "weights-only"))


# --- the model hub -----------------------------------------------------------------------------
def _lay_out_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """`repo` at commit SHA in a hub cache laid out as the hub lays it out: blobs named by
    their hash, a snapshot of links to them, refs/main naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for path in model_dir.iterdir():
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for actors and lm-eval workers
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_hub_id_is_served_from_the_offline_cache_pinned_to_its_commit(
    offline_hub: Path, tiny_llama_dir: Path
) -> None:
    from huggingface_hub import scan_cache_dir

    snapshot = _lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
    source = resolve_source("acme/tiny")
    assert (source.kind, source.id, source.revision) == (HUB, "acme/tiny", SHA)
    assert source.bytes == (tiny_llama_dir / "model.safetensors").stat().st_size
    assert resolve_source(f"acme/tiny@{SHA}") == source  # main and its commit are one revision
    assert node_folder(source) == snapshot == driver_folder(source)
    assert (node_folder(source) / "model.safetensors").read_bytes() == (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()
    (repo,) = scan_cache_dir(offline_hub).repos  # the hub's own tools read the cache as theirs
    assert repo.repo_id == "acme/tiny" and [r.commit_hash for r in repo.revisions] == [SHA]


def test_a_resume_keeps_the_revision_the_run_started_with(
    offline_hub: Path, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    """`main` moved on since the run started: the resume goes on with the run's commit."""
    from dtm_ray.job.checks import plan_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import _check_resume
    from dtm_ray.records.store import RunStore

    _lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
    started = resolve_source("acme/tiny")
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    root = offline_hub / "models--acme--tiny"
    (root / "snapshots" / SHA).rename(root / "snapshots" / newer)
    (root / "snapshots" / newer / "model.safetensors").unlink()  # different weights now
    (root / "snapshots" / newer / "model.safetensors").write_bytes(b"x" * 100)
    _lay_out_hub_cache(tmp_path / "old", "acme/tiny", tiny_llama_dir)  # the old commit again
    (tmp_path / "old" / "models--acme--tiny" / "snapshots" / SHA).rename(root / "snapshots" / SHA)
    (root / "refs" / "main").write_text(newer)

    job = {"model": "acme/tiny", "engine": "hf", "out": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    plan = plan_job(load_job(tmp_path / "job.yaml"))
    assert plan.model_source.revision == newer
    stored = {
        "config": plan.job.to_dict(),
        "model_digest": started.digest,
        "model_source": dataclasses.asdict(started),
    }
    _check_resume(plan, RunStore(str(tmp_path / "run")), stored)
    assert plan.model_source == started
    assert f"resuming on acme/tiny@{SHA}, the revision the run started with" in (
        capsys.readouterr().err
    )


def _dry_run(tmp_path: Path, model: str, capsys, out: list | None = None) -> tuple[int, str]:
    job = {
        "model": model,
        "engine": "hf",
        "prompts": {"source": "pydoc", "count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "out": str(tmp_path / "run"),
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = cli.main(["run", str(path), "--dry-run"])
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return code, captured.err.strip()


def test_a_dry_run_says_what_each_node_downloads(
    offline_hub: Path, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    _lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
    printed: list[str] = []
    code, err = _dry_run(tmp_path, "acme/tiny", capsys, printed)
    assert code == 0, err
    gb = (tiny_llama_dir / "model.safetensors").stat().st_size / 1e9
    assert (
        f"model acme/tiny@{SHA} ({gb:.2f} GB of weights): each node downloads {gb:.2f} GB of "
        "weights once into its HF_HOME (unless cached); each engine actor then loads it"
    ) in printed[0]


def test_a_hub_id_not_in_the_offline_cache_is_one_line(offline_hub, tmp_path, capsys) -> None:
    code, err = _dry_run(tmp_path, "acme/absent", capsys)
    assert code == 2 and "\n" not in err
    assert err == (
        "dtm-ray: error: model acme/absent: HF_HUB_OFFLINE is set and the revision is not in the "
        f"local hub cache ({offline_hub}); download it there first or allow network access"
    )


def test_an_offline_cache_without_the_weights_is_one_line(
    offline_hub, tiny_llama_dir, tmp_path
) -> None:
    snapshot = _lay_out_hub_cache(offline_hub, "acme/partial", tiny_llama_dir)
    (snapshot / "model.safetensors").unlink()  # only config and tokenizer were downloaded
    source = resolve_source("acme/partial")
    assert driver_folder(source) == snapshot  # the driver needs no weights
    with pytest.raises(ConfigError, match="holds only part of its weights"):
        node_folder(source)


class _FakeHub(BaseHTTPRequestHandler):
    """Answers every request as the hub answers for a missing or a gated repo."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        missing = "/absent" in self.path
        self.send_response(404 if missing else 401)
        self.send_header("X-Error-Code", "RepoNotFound" if missing else "GatedRepo")
        self.send_header("X-Error-Message", "nope")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield server
    server.shutdown()


def test_an_unknown_hub_repo_is_one_line(fake_hub, tmp_path, capsys) -> None:
    code, err = _dry_run(tmp_path, "acme/absent", capsys)
    assert (code, err) == (
        2,
        "dtm-ray: error: model acme/absent: no such repo on the hub (or it is private: set "
        "HF_TOKEN)",
    )


def test_a_gated_hub_repo_without_a_token_is_one_line(fake_hub, tmp_path, capsys) -> None:
    code, err = _dry_run(tmp_path, "acme/gated", capsys)
    assert (code, err) == (
        2,
        "dtm-ray: error: model acme/gated is a gated repo on the hub: accept its terms on the "
        "hub, then set HF_TOKEN to a token of that account",
    )


def test_no_network_and_no_cache_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants
    from s3_server import free_port

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # refused
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    code, err = _dry_run(tmp_path, "acme/tiny", capsys)
    assert (code, err) == (
        2,
        "dtm-ray: error: model acme/tiny: the hub cannot be reached and the revision is not in "
        f"the local hub cache ({tmp_path / 'hub'}); download it there first or allow network "
        "access",
    )


def test_a_hub_download_reports_its_bytes_as_they_arrive(tmp_path, monkeypatch) -> None:
    """The hub client writes each file into the repo's blob folder (`*.incomplete` until done);
    the node's fetch reports those bytes against the model's size while it runs."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sources, "REPORT_EVERY_S", 0.05)
    source = sources.ModelSource(HUB, "acme/big", SHA, "digest", bytes=3_000_000)
    repo = tmp_path / "hub" / "models--acme--big"

    def download(
        repo_id: str, revision: str, allow_patterns: list[str] = (), local_files_only: bool = False
    ) -> str:
        from huggingface_hub.errors import LocalEntryNotFoundError

        if local_files_only:  # the cache is asked first: it holds nothing yet
            raise LocalEntryNotFoundError("not in the cache")
        assert (repo_id, revision) == ("acme/big", SHA) and "model*.safetensors" in allow_patterns
        blobs = repo / "blobs"
        blobs.mkdir(parents=True)
        for i in range(3):  # three 1 MB files, each in ten pieces
            part = blobs / f"blob{i}.incomplete"
            for _ in range(10):
                with part.open("ab") as f:
                    f.write(b"x" * 100_000)
                time.sleep(0.02)
            part.rename(blobs / f"blob{i}")
        snapshot = repo / "snapshots" / SHA
        snapshot.mkdir(parents=True)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    said: list[str] = []
    assert node_folder(source, said.append) == repo / "snapshots" / SHA
    done = [float(m.split(": ")[1].split(" MB")[0]) for m in said]
    assert said[0] == f"fetching acme/big@{SHA} from the hub: 0.0 MB of 3.0 MB"
    assert all(m.endswith(" of 3.0 MB") for m in said)
    assert done == sorted(done) and 0 < max(done) <= 3.0 and len(set(done)) >= 3


def test_a_string_that_is_no_source_is_one_line() -> None:
    with pytest.raises(ConfigError, match="neither a local folder nor a known name"):
        sources.kind_of("not a model")


# --- a whole run on the object store ------------------------------------------------------------
@pytest.mark.slow
def test_a_compressing_run_model_and_run_dir_on_s3_with_show_report_export_and_evaluate(
    ray_session, model_store, tiny_llama_dir: Path, node_cache: Path, tmp_path: Path, capsys
) -> None:
    """Model and run dir both on the store: of the two actors on this node one fetches the
    model, the other waits for it and reads the same copy; the run writes its report and export
    into the store (the export shard by shard), lm-eval's worker reads the export from there,
    and `show`, `report` and `export` work on the URI. The export equals one made from a local
    copy of the run. (tests/test_multi_node_models.py checks the FDTs against a local run.)"""
    from dtm_ray.results.export import export_run

    run_uri = model_store.uri("e2e/run")
    job = {
        "model": model_uri(model_store, "tiny"),
        "engine": "hf",
        "prompts": {"source": "pydoc", "count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "compress": {"target_sparsity": 0.5, "step": 0.5, "guide": "uniform"},
        "evaluation": {"text": "pydoc", "count": 2, "tokens": 32},
        "evaluate": {"tasks": ["facts"], "limit": 4},
        "workers": 2,
        "out": run_uri,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    assert cli.main(["run", str(path)]) == 0, capsys.readouterr().err
    print(f"run: {time.monotonic() - started:.1f} s")
    err = capsys.readouterr().err
    base = run_uri.split("?", 1)[0]
    assert f"exported the compressed model to {run_uri.replace('/run?', '/run/export?')}" in err
    assert f"report: {base}/report/report.html" in err

    fs = model_store.filesystem()
    listed = {
        i.path.removeprefix("runs/e2e/run/")
        for i in fs.get_file_info(pafs.FileSelector("runs/e2e/run", recursive=True))
        if i.type == pafs.FileType.File
    }
    assert {"export/model.safetensors", "export/export.json", "report/report.html"} <= listed
    assert "final/tasks/data.parquet" in listed
    assert not any(name.startswith(".") or "/." in name for name in listed)  # no scratch left

    # show and report read the URI; export writes into it again (same files).
    assert cli.main(["show", run_uri]) == 0
    assert "final" in capsys.readouterr().out
    assert cli.main(["report", run_uri]) == 0
    assert capsys.readouterr().out.strip() == f"{base}/report/report.html"
    assert export_run(run_uri) == run_uri.replace("/run?", "/run/export?")

    local = model_store.download("e2e/run", tmp_path / "copy")
    again = Path(export_run(str(local), str(tmp_path / "local-export")))
    for name in ("model.safetensors", "sparsity_map.json", "config.json"):
        assert (local / "export" / name).read_bytes() == (again / name).read_bytes(), name

    run_info = json.loads((local / "run.json").read_text())
    assert run_info["model_source"]["kind"] == STORE
    actors = run_info["actors"][0]["actors"]
    assert sorted(a["model_fetched"] for a in actors) == [False, True]  # one fetch per node

    tasks = pd.read_parquet(local / "final" / "tasks")
    assert list(tasks["task"]) == ["dtm_facts_mc", "dtm_facts_cloze"]
    assert (tasks["examples"] == 4).all()
    # The lm-eval worker materialised the export from the store into its node's cache, beside
    # the driver's config-and-tokenizer copy of the model and the node's whole one.
    copies = [p for p in (node_cache / "models" / "sources").iterdir() if p.is_dir()]
    assert len(copies) == 3
    exported = (local / "export" / "model.safetensors").read_bytes()
    assert any(
        (p / "model.safetensors").is_file() and (p / "model.safetensors").read_bytes() == exported
        for p in copies
    )


# --- the start-up wait --------------------------------------------------------------------------
class SlowFetchActor(EngineActor):
    """An engine actor that spends its first seconds fetching a (pretend) large model."""

    def __init__(self, model, engine_config, index=0, threads=None):  # noqa: ANN001
        StartupReport(index)("fetching s3://models/big: 1.2 of 4.5 GB")
        time.sleep(5)
        super().__init__(model, engine_config, index, threads)


@pytest.mark.slow
def test_the_start_up_wait_says_what_each_actor_is_fetching_and_allows_for_its_bytes(
    ray_session, tiny_llama_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys

    import ray

    from dtm_ray.cluster import pool
    from dtm_ray.job.checks import plan_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.rounds import JobEngines

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(pool, "REPORT_S", 1.0)  # a line every second, not every 15
    job = {"model": str(tiny_llama_dir), "engine": "hf", "out": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    plan = plan_job(load_job(tmp_path / "job.yaml"))
    engines = JobEngines(plan, 1, actor_class=SlowFetchActor)
    try:
        engines.pool  # noqa: B018 - starts the actors and waits for them
    finally:
        engines.close()
    weights = (tiny_llama_dir / "model.safetensors").stat().st_size
    budget = startup_budget_s(600, weights)
    assert budget == 600 + weights / STARTUP_BYTES_PER_S
    err = capsys.readouterr().err
    assert (
        f"engine actor(s): engine-0 on {socket.gethostname()}: fetching s3://models/big: 1.2 of "
        f"4.5 GB; giving up after {budget:.0f} s"
    ) in err, err


def test_a_malformed_hub_id_is_one_line(tmp_path, capsys) -> None:
    code, err = _dry_run(tmp_path, "acme/name..x", capsys)
    assert (code, err) == (
        2,
        "dtm-ray: error: model acme/name..x is not a valid hub id (org/name[@revision]): Cannot "
        "have -- or .. in repo_id: 'acme/name..x'.",
    )
