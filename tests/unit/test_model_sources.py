"""Model sources: a job's `model` named as an object-store URI or a hub id is resolved once on the
driver (pinned, digested), read there only for config and tokenizer, and materialised once per
node from the source itself; each bad source is one line, exit 2, before Ray starts."""

from __future__ import annotations

import dataclasses
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from support.hub import SHA, lay_out_hub_cache

from dtm_ray import cli
from dtm_ray.engines import hub_source, sources
from dtm_ray.engines.sources import (
    HUB,
    driver_folder,
    node_folder,
    resolve_source,
)
from dtm_ray.errors import ConfigError

# --- object stores -----------------------------------------------------------------------------


# --- the model hub -----------------------------------------------------------------------------
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

    snapshot = lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
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
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import _check_resume
    from dtm_ray.records.store import RunStore

    lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
    started = resolve_source("acme/tiny")
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    root = offline_hub / "models--acme--tiny"
    (root / "snapshots" / SHA).rename(root / "snapshots" / newer)
    (root / "snapshots" / newer / "model.safetensors").unlink()  # different weights now
    (root / "snapshots" / newer / "model.safetensors").write_bytes(b"x" * 100)
    lay_out_hub_cache(tmp_path / "old", "acme/tiny", tiny_llama_dir)  # the old commit again
    (tmp_path / "old" / "models--acme--tiny" / "snapshots" / SHA).rename(root / "snapshots" / SHA)
    (root / "refs" / "main").write_text(newer)

    job = {"model": "acme/tiny", "engine": "hf", "out": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    checked = check_job(load_job(tmp_path / "job.yaml"))
    assert checked.model_source.revision == newer
    stored = {
        "config": checked.job.to_dict(),
        "model_digest": started.digest,
        "model_source": dataclasses.asdict(started),
    }
    _check_resume(checked, RunStore(str(tmp_path / "run")), stored)
    assert checked.model_source == started
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
    lay_out_hub_cache(offline_hub, "acme/tiny", tiny_llama_dir)
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
    snapshot = lay_out_hub_cache(offline_hub, "acme/partial", tiny_llama_dir)
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
    from support.s3_server import free_port

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
    monkeypatch.setattr(hub_source, "REPORT_EVERY_S", 0.05)  # where the hub fetch reads it
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


# --- the start-up wait --------------------------------------------------------------------------


def test_a_malformed_hub_id_is_one_line(tmp_path, capsys) -> None:
    code, err = _dry_run(tmp_path, "acme/name..x", capsys)
    assert (code, err) == (
        2,
        "dtm-ray: error: model acme/name..x is not a valid hub id (org/name[@revision]): Cannot "
        "have -- or .. in repo_id: 'acme/name..x'.",
    )
