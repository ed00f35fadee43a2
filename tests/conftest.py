"""The tests' fixtures: the real SmolLM2 model, a tiny random Llama, the engines, one Ray cluster
and one local S3 server per session, and the undisturbed compressing run. Plain helpers live in
tests/support (importable as `support`); no test imports this file.

Tiers: a test under tests/unit, tests/integration or tests/e2e carries that marker. A test file
still directly under tests/ counts as integration (as e2e when marked `slow`) until it is placed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from support.jobs import SPARSIFY, run_job, tiny_job

TIERS = ("unit", "integration", "e2e")

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier, from the folder it is in."""
    here = Path(__file__).resolve().parent
    for item in items:
        parts = item.path.resolve().relative_to(here).parts
        tier = parts[0] if parts[0] in TIERS else None
        if tier is None:
            tier = "e2e" if item.get_closest_marker("slow") else "integration"
        item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session", autouse=True)
def threads_per_worker() -> None:
    """Under pytest-xdist (`-n N`), torch in each test process on its share of the cores: N
    processes each on torch's default of every core oversubscribe the machine several times over
    (Ray's actors set their own)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


# --- models --------------------------------------------------------------------------------------
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


# --- engines -------------------------------------------------------------------------------------
def _engine_options(request: pytest.FixtureRequest, name: str, default_model: str) -> dict:
    """The engine a test module asks for in its module-level dict `name` (HF_ENGINE,
    VLLM_ENGINE): `model` ("tiny_llama" or "smollm2") and the engine's own arguments."""
    options = dict(getattr(request.module, name, {}))
    model = options.pop("model", default_model)
    return {"model_dir": request.getfixturevalue(f"{model}_dir"), **options}


@pytest.fixture(scope="module")
def hf_engine(request: pytest.FixtureRequest):
    """One HFEngine per module, as its HF_ENGINE says (default: the tiny Llama, batches of 8);
    the module's tests put back what they edit."""
    from dtm_ray.engines.hf import HFEngine

    return HFEngine(**{"batch_size": 8, **_engine_options(request, "HF_ENGINE", "tiny_llama")})


@pytest.fixture
def fresh_hf_engine(request: pytest.FixtureRequest):
    """An HFEngine of its own for a test that may leave it broken (as HF_ENGINE says)."""
    from dtm_ray.engines.hf import HFEngine

    return HFEngine(**{"batch_size": 8, **_engine_options(request, "HF_ENGINE", "tiny_llama")})


@pytest.fixture(scope="module")
def vllm_engine(request: pytest.FixtureRequest, one_thread):
    """One VLLMEngine per module, as its VLLM_ENGINE says (default: SmolLM2 in float32), closed
    after the module to free the model and KV cache for later modules."""
    pytest.importorskip("vllm")
    from dtm_ray.engines.vllm import VLLMEngine

    engine = VLLMEngine(
        **{"dtype": "float32", **_engine_options(request, "VLLM_ENGINE", "smollm2")}
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: on a busy 2-core box torch's default 2 threads run the
    reference engine ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the test cluster and the local S3 server ----------------------------------------------------
@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session, dashboard off."""
    from support.cluster import start_session_ray

    ray = start_session_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (bucket `runs`), one per session."""
    from support.s3_server import S3Server

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


@pytest.fixture
def node_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's node-local model cache (actors started now get it too)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DTM_RAY_CACHE", str(cache))
    return cache


# --- Ray's notices, threads and planted secrets -----------------------------------------------
@pytest.fixture
def ray_printers(monkeypatch: pytest.MonkeyPatch):
    """Ray's notice printer replaced by one that records what it is given, and the dispatcher's
    handlers restored afterwards; yields the record (the notices' first lines)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from dtm_ray.cluster import logs

    printed: list[str] = []

    def ray_printer(data: dict, ignore_prefix: bool) -> None:
        printed.append(data["lines"][0])

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_printer)
    monkeypatch.setattr(logs, "_ray_notices", None)
    monkeypatch.setattr(logs, "_ray_printer", None)
    handlers = list(dispatcher.handlers)
    yield printed
    dispatcher.handlers = handlers


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that end a thread, as Python's thread excepthook sees them."""
    import threading

    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """support.fakes' planted secrets in the environment (a token, a key, a password)."""
    from support.fakes import AWS_SECRET, DB_PASSWORD, HF_TOKEN

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("ANALYTICS_DB_PASSWORD", DB_PASSWORD)


# --- the undisturbed run -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fdt_sparsify_run(ray_session, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The FDT-guided sparsify run to 30 % in steps of 0.1 (support.jobs.SPARSIFY), run once per
    session and read by the compression, export and disturbance tests: (run dir, the run's
    outcome). Tests only read it (and re-export it, which writes the same export/)."""
    folder = tmp_path_factory.mktemp("fdt-sparsify")
    outcome = run_job(folder, tiny_job(tiny_llama_dir, folder / "run", **SPARSIFY))
    return folder / "run", outcome
