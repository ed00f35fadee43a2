"""Sensitivity calls on real engines: the vLLM and HF engines agree and leave their weights bit-
identical; the engine actor answers on its state. (The maths alone:
tests/unit/test_sensitivity.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.checks import weights_digest
from support.fakes import calibration, candidates, chained_state

from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.session import EngineSession


@pytest.mark.parametrize("model", ["smollm2", "biased_llama"])
def test_the_vllm_and_hf_engines_agree_and_leave_their_weights_bit_identical(
    model: str, request: pytest.FixtureRequest, one_thread
) -> None:
    pytest.importorskip("vllm")
    from dtm_ray.engines.vllm import VLLMEngine

    model_dir = request.getfixturevalue(f"{model}_dir")
    state = chained_state()
    cands = candidates()
    sequences = calibration(count=4, length=32)
    results = {}
    for kind in ("hf", "vllm"):
        engine = HFEngine(model_dir) if kind == "hf" else VLLMEngine(model_dir, dtype="float32")
        try:
            session = EngineSession(engine)
            session.apply_state(state)
            before = weights_digest(engine.model) if kind == "hf" else engine.params_digest()
            results[kind] = {
                guide: session.sensitivity(guide, cands, sequences, batch_size=2)
                for guide in ("fisher", "weight_error")
            }
            after = weights_digest(engine.model) if kind == "hf" else engine.params_digest()
            assert after == before
        finally:
            engine.close()
    for guide, columns in (("fisher", ["fisher"]), ("weight_error", ["weight_error"])):
        hf, vllm = results["hf"][guide], results["vllm"][guide]
        assert [(r["component"], r["spec"]) for r in hf.rows] == [
            (r["component"], r["spec"]) for r in vllm.rows
        ]
        assert hf.passes == vllm.passes
        for a, b in zip(hf.rows, vllm.rows, strict=True):
            for column in columns:
                assert a[column] > 0
                assert b[column] == pytest.approx(a[column], rel=1e-4), (a, b)


def test_the_engine_actor_answers_sensitivity_calls_on_its_state(
    ray_session, tiny_llama_dir: Path
) -> None:
    from dtm_ray.cluster.actor import start_engine_actors
    from dtm_ray.engines import EngineConfig

    state = chained_state()
    sequences = calibration(count=4)
    local = EngineSession(HFEngine(tiny_llama_dir))
    local.apply_state(state)
    (actor,) = start_engine_actors(str(tiny_llama_dir), EngineConfig(kind="hf"), 1, {"CPU": 1})
    try:
        for guide in ("weight_error", "fisher"):
            remote = ray_session.get(
                actor.sensitivity.remote(state, guide, candidates(), sequences, None, 2)
            )
            expected = local.sensitivity(guide, candidates(), sequences, batch_size=2)
            assert remote.guide == guide and remote.worker.startswith("engine-0@")
            assert remote.passes == expected.passes and remote.seconds > 0
            assert len(remote.rows) == len(expected.rows) == 6
            for got, want in zip(remote.rows, expected.rows, strict=True):
                assert got[guide] == pytest.approx(want[guide], rel=1e-6)
    finally:
        ray_session.kill(actor)


@pytest.fixture(scope="module")
def biased_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama with q/k/v biases (as Qwen2 has), which vLLM fuses into qkv_proj."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("biased-llama")
    config = LlamaConfig.from_pretrained(tiny_llama_dir)
    config.attention_bias = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # initialised to zero: make them matter
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, out / name)
    return out
