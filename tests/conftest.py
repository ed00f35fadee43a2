"""Shared fixtures: the real SmolLM2 model, a tiny random Llama, one Ray cluster per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

# Keep Ray's token auth off for the whole session, so the local cluster, `ray start` and
# `ray job submit` used by the tests agree with each other.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The local S3 server's credentials, set before the session's Ray cluster starts: its workers
# take their environment from then, and engine actors read models from that server.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from dtm_ray.engines.models import materialize

    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer; head_dim 64 so vLLM's CPU build runs it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (starting one costs ~10 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (bucket `runs`), one per session."""
    from s3_server import S3Server

    server = S3Server()
    yield server
    server.close()


@pytest.fixture(scope="session")
def model_store(s3_server, tiny_llama_dir: Path):
    """The local S3 server with the tiny Llama uploaded under models/tiny (bucket `models`)."""
    import pyarrow.fs as pafs

    s3_server.filesystem(allow_bucket_creation=True).create_dir("models")
    pafs.copy_files(
        str(tiny_llama_dir),
        "models/tiny",
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=s3_server.filesystem(),
    )
    return s3_server


def model_uri(server, path: str) -> str:
    """The URI of `models/<path>` on the local server."""
    return server.uri(path).replace(f"s3://{server.bucket}/", "s3://models/", 1)


def tiny_compress_job(model_dir: Path, out: Path, compress: dict, dtype: str = "auto") -> dict:
    """The small compressing job the end-to-end tests share: every weight of the tiny Llama,
    8 pydoc prompts of 8 tokens, 16 new tokens, 2 hf workers."""
    return {
        "model": str(model_dir),
        "engine": "hf",
        "dtype": dtype,
        "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 8},
        "new_tokens": 16,
        "probe": {"components": "all"},
        "compress": compress,
        "evaluation": {"text": "pydoc", "count": 4, "tokens": 32},
        "workers": 2,
        "out": str(out),
    }


FDT_SPARSIFY = {"target_sparsity": 0.3, "step": 0.1}


@pytest.fixture(scope="session")
def fdt_sparsify_run(ray_session, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The FDT-guided sparsify run to 30 % in steps of 0.1, run once per session and read by the
    compression and export tests: (run dir, the run's outcome). Tests only read it (and
    re-export it, which writes the same export/)."""
    import yaml

    from dtm_ray.job.checks import plan_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import run_plan

    folder = tmp_path_factory.mktemp("fdt-sparsify")
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_compress_job(tiny_llama_dir, folder / "run", FDT_SPARSIFY)))
    outcome = run_plan(plan_job(load_job(path)), print_summary=False)
    return folder / "run", outcome


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: on a busy 2-core box torch's default 2 threads run the
    reference engine ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- checks on finished runs, shared by the failure tests -----------------------------------
def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def final_state(run: Path) -> dict[str, list[str]]:
    states = pd.read_parquet(run / "states")
    last = states[states["round"] == states["round"].max()]
    return {r.component: list(r.chain) for r in last.itertuples()}


def assert_same_result(run: Path, undisturbed: Path) -> None:
    probes = pd.read_parquet(run / "probes")
    assert not probes.duplicated(["round", "component", "spec"]).any()
    expected = pd.read_parquet(undisturbed / "probes")
    assert len(probes) == len(expected)
    assert final_state(run) == final_state(undisturbed)
    final, expected_final = (pd.read_parquet(r / "final" / "prompts") for r in (run, undisturbed))
    pd.testing.assert_frame_equal(final, expected_final)
    for path in visible_files(run):
        if path.suffix == ".parquet":
            pq.read_table(path)  # every visible table file is whole
