"""The export's replay at scale: shard by shard, on all cores or a GPU, the same bytes whatever
the thread count, device or shard layout; a device the machine lacks is refused in one line."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dtm_ray.core import compress as compress_module
from dtm_ray.core.compress import replay
from dtm_ray.core.state import Link, ModelState
from dtm_ray.results.export_compressed import write_compressed
from dtm_ray.results.export_dense import available_cores, torch_threads, write_dense


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in several shards (with an index), as large checkpoints come."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2MB")
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


def state_of(model_dir: Path) -> ModelState:
    """Magnitude over two rounds, magnitude then int8, int4 alone, wanda with its norms."""
    norm = np.random.default_rng(0).uniform(0.5, 2.0, 128).astype("f4")
    return ModelState(
        {
            "model.layers.0.self_attn.q_proj.weight": (
                Link("magnitude:0.2"),
                Link("magnitude:0.4"),
            ),
            "model.layers.0.mlp.up_proj.weight": (Link("magnitude:0.3"), Link("int8")),
            "model.layers.1.mlp.down_proj.weight": (Link("int4-g64"),),
            "model.layers.1.self_attn.k_proj.weight": (Link("wanda:0.5", 1, norm),),
            "model.layers.1.self_attn.o_proj.weight": (Link("int8"),),
        }
    )


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


@pytest.mark.parametrize("engine_dtype", [torch.float32, torch.bfloat16])
def test_dense_export_is_the_same_bytes_on_one_and_two_threads_and_as_whole_shard_replay(
    sharded_llama: Path, tmp_path: Path, monkeypatch, engine_dtype: torch.dtype
) -> None:
    state = state_of(sharded_llama)
    threads_seen: list[int] = []

    def counting(original, chain):
        threads_seen.append(torch.get_num_threads())
        return replay(original, chain)

    monkeypatch.setattr(compress_module, "replay", counting)
    hashes = {}
    for threads in (1, 2):
        out = tmp_path / f"threads-{threads}"
        out.mkdir()
        threads_seen.clear()
        with torch_threads(threads):
            saved = write_dense(sharded_llama, out, state, engine_dtype)
        assert set(threads_seen) == {threads} and len(threads_seen) == len(state.chains)
        hashes[threads] = digests(out)
    assert hashes[1] == hashes[2]
    assert len(hashes[1]) == len(list(sharded_llama.glob("*.safetensors")))

    # The reference: each whole shard loaded, every chain replayed, saved in one call.
    reference = tmp_path / "reference"
    reference.mkdir()
    for shard in sorted(sharded_llama.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(shard)
        for name in tensors.keys() & set(state.chains):
            replayed = replay(tensors[name].to(engine_dtype), state.chain(name))
            tensors[name] = replayed.to(tensors[name].dtype).contiguous()
        save_file(tensors, reference / shard.name, metadata=metadata)
    assert digests(reference) == hashes[1]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert saved[name][0] == pytest.approx(0.4, abs=1e-3)


def test_compressed_export_is_the_same_bytes_on_one_and_two_threads(
    sharded_llama: Path, tmp_path: Path
) -> None:
    pytest.importorskip("compressed_tensors")
    import json

    from dtm_ray.core.components import components_from_config

    state = state_of(sharded_llama)
    linears = components_from_config(json.loads((sharded_llama / "config.json").read_text()))
    hashes = {}
    for threads in (1, 2):
        out = tmp_path / f"threads-{threads}"
        out.mkdir()
        with torch_threads(threads):
            levels = write_compressed(sharded_llama, out, state, "bfloat16", linears)
        hashes[threads] = digests(out)
        hashes[threads]["config.json"] = (out / "config.json").read_text()
    assert hashes[1] == hashes[2]
    assert levels["model.layers.1.mlp.down_proj.weight"] == "int4-g64"
    assert levels["model.layers.0.self_attn.q_proj.weight"] is None


def test_replay_threads_default_to_every_core_the_process_may_use() -> None:
    before = torch.get_num_threads()
    with torch_threads(None) as used:
        assert used == available_cores() == len(os.sched_getaffinity(0))
        assert torch.get_num_threads() == used
    assert torch.get_num_threads() == before


def test_an_unknown_device_names_the_choices(tmp_path: Path, capsys) -> None:
    from dtm_ray import cli

    assert cli.main(["export", str(tmp_path), "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err == "dtm-ray: error: --device 'gpu' is not one of auto, cpu, cuda, cuda:N\n"


def test_a_gpu_index_the_machine_lacks_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    from dtm_ray import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main(["export", str(tmp_path), "--device", "cuda:2"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "dtm-ray: error: --device cuda:2: this machine has 2 CUDA GPU(s); "
        "use --device auto or cpu\n"
    )
