"""Models from an object store (the local S3 server): listed on the driver, fetched once per node, a
changed object a new copy, missing ones one line; the start-up wait says what each actor fetches."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from support.s3_server import model_uri

from dtm_ray.cluster.actor import EngineActor, StartupReport
from dtm_ray.cluster.startup import STARTUP_BYTES_PER_S, startup_budget_s
from dtm_ray.engines.sources import (
    STORE,
    driver_folder,
    evict,
    node_folder,
    resolve_source,
)
from dtm_ray.errors import ConfigError


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


class SlowFetchActor(EngineActor):
    """An engine actor that spends its first seconds fetching a (pretend) large model."""

    def __init__(self, model, engine_config, index=0, threads=None):  # noqa: ANN001
        StartupReport(index)("fetching s3://models/big: 1.2 of 4.5 GB")
        time.sleep(5)
        super().__init__(model, engine_config, index, threads)


def test_the_start_up_wait_says_what_each_actor_is_fetching_and_allows_for_its_bytes(
    ray_session, tiny_llama_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys

    import ray

    from dtm_ray.cluster import startup
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.rounds import JobEngines

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setattr(startup, "REPORT_S", 1.0)  # a line every second, not every 15
    job = {"model": str(tiny_llama_dir), "engine": "hf", "out": str(tmp_path / "run")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    checked = check_job(load_job(tmp_path / "job.yaml"))
    engines = JobEngines(checked, 1, actor_class=SlowFetchActor)
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
