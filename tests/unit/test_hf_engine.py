"""The hf engine on a tiny random Llama: padding, batching and restore must not change results."""

import ctypes
import json
import resource
import shutil

import numpy as np
import pytest
import torch
from support.checks import weights_digest
from support.transformers_check import full_logit_stats, protocol_drift, protocol_methods

from dtm_ray.core.compress import compress
from dtm_ray.engines.base import keep_freed_memory
from dtm_ray.engines.hf import HFEngine


@torch.inference_mode()
def stepwise_greedy(model, prefixes: np.ndarray, n_new: int) -> np.ndarray:  # noqa: ANN001
    """Greedy decoding by hand, no `generate` (so no EOS handling): n_new full forward passes,
    each appending the argmax of the last position."""
    ids = torch.as_tensor(np.asarray(prefixes), dtype=torch.long)
    for _ in range(n_new):
        next_token = model(input_ids=ids).logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[:, -n_new:].numpy()


HF_ENGINE = {"batch_size": 4}  # the `hf_engine` fixture: the tiny Llama in batches of 4


@pytest.fixture(scope="module")
def prefixes() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 49152, size=(6, 12))


def test_implements_the_protocol_with_its_signatures():
    assert {"generate_greedy", "score", "set_weights", "restore", "close"} <= set(
        protocol_methods()
    )
    assert protocol_drift(HFEngine) == []

    class Drifted(HFEngine):  # the check itself catches a renamed parameter and a missing one
        def score(self, seqs, n_prefix):  # noqa: ANN001, ANN202
            ...

        restore = None

    assert [p.split("(")[0].split(":")[0] for p in protocol_drift(Drifted)] == ["score", "restore"]


def test_generates_exactly_n_greedy_tokens(hf_engine, prefixes):
    out = hf_engine.generate_greedy(prefixes.tolist(), 9)
    assert out.shape == (6, 9) and out.dtype == np.int64
    np.testing.assert_array_equal(out, stepwise_greedy(hf_engine.model, prefixes, 9))


def test_generation_runs_past_the_models_eos(hf_engine, prefixes, tiny_llama_dir, tmp_path):
    """A checkpoint whose EOS is the very first token the model generates for prompt 0: a
    generate that honoured EOS would stop there and pad the rest of that row."""
    reference = stepwise_greedy(hf_engine.model, prefixes, 9)
    eos = int(reference[0, 0])
    model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        config["eos_token_id"] = eos
        (model_dir / name).write_text(json.dumps(config))
    eos_engine = HFEngine(model_dir, batch_size=4)
    try:
        assert eos_engine.model.config.eos_token_id == eos
        out = eos_engine.generate_greedy(prefixes.tolist(), 9)
    finally:
        eos_engine.close()
    assert (out == eos).any()  # the model did emit its EOS ...
    np.testing.assert_array_equal(out, reference)  # ... and went on, token for token


def test_left_padding_does_not_change_generation(hf_engine, prefixes):
    ragged = [prefixes[0][:5].tolist(), prefixes[1].tolist(), prefixes[2][:9].tolist()]
    together = hf_engine.generate_greedy(ragged, 8)
    alone = np.concatenate([hf_engine.generate_greedy([p], 8) for p in ragged])
    np.testing.assert_array_equal(together, alone)


def test_batching_does_not_change_scores(hf_engine, prefixes):
    seqs = np.concatenate([prefixes, hf_engine.generate_greedy(prefixes.tolist(), 8)], axis=1)
    batched = hf_engine.score(seqs.tolist(), 12)
    alone = [hf_engine.score([s], 12) for s in seqs.tolist()]
    np.testing.assert_array_equal(batched.argmax, np.concatenate([a.argmax for a in alone]))
    assert batched.argmax.shape == (6, 8)
    np.testing.assert_allclose(
        batched.ref_logprob, np.concatenate([a.ref_logprob for a in alone]), atol=1e-5
    )
    argmax, margin, ref_logprob = full_logit_stats(hf_engine.model, seqs, 12)
    np.testing.assert_array_equal(batched.argmax, argmax)
    np.testing.assert_allclose(batched.margin, margin, rtol=0, atol=1e-4)
    np.testing.assert_allclose(batched.ref_logprob, ref_logprob, rtol=0, atol=1e-4)


def test_teacher_forced_argmax_reproduces_greedy(hf_engine, prefixes):
    greedy = hf_engine.generate_greedy(prefixes.tolist(), 10)
    scored = hf_engine.score(np.concatenate([prefixes, greedy], axis=1).tolist(), 12)
    np.testing.assert_array_equal(scored.argmax, greedy)
    # The greedy token is the argmax, so its log-probability is the best at every position.
    assert np.all(scored.ref_logprob <= 0)


def test_score_rejects_ragged_sequences(hf_engine):
    with pytest.raises(ValueError, match="one length"):
        hf_engine.score([[1, 2, 3], [1, 2]], 1)


def test_edits_are_live_and_restore_is_bit_identical(hf_engine, prefixes):
    before = weights_digest(hf_engine)
    seqs = np.concatenate([prefixes, hf_engine.generate_greedy(prefixes.tolist(), 8)], axis=1)
    base = hf_engine.score(seqs.tolist(), 12)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    edits = {n: compress(hf_engine.original_weight(n), "magnitude:0.9") for n in names}
    hf_engine.set_weights(edits)
    hf_engine.set_weights(edits)  # applying twice is the same as once
    edited = hf_engine.score(seqs.tolist(), 12)
    assert weights_digest(hf_engine) != before
    assert not np.allclose(edited.ref_logprob, base.ref_logprob)
    torch.testing.assert_close(
        hf_engine.original_weight(names[0]), hf_engine.original_weight(names[0])
    )
    hf_engine.restore(names)
    assert weights_digest(hf_engine) == before
    restored = hf_engine.score(seqs.tolist(), 12)
    np.testing.assert_array_equal(restored.ref_logprob, base.ref_logprob)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_edited_weights_come_back_from_the_checkpoint_not_from_copies(tiny_llama_dir, dtype):
    from safetensors import safe_open

    engine = HFEngine(tiny_llama_dir, dtype=dtype)
    before = weights_digest(engine)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    engine.set_weights({n: torch.zeros_like(engine.original_weight(n)) for n in names})
    # No copy of what was overwritten: the originals are the checkpoint's tensors, as loaded.
    assert engine._originals == {}
    with safe_open(tiny_llama_dir / "model.safetensors", "pt") as f:
        stored = f.get_tensor(names[0]).to(getattr(torch, dtype))
    assert torch.equal(engine.original_weight(names[0]), stored)
    engine.restore(names)
    assert weights_digest(engine) == before


def test_bad_weight_edits(hf_engine):
    with pytest.raises(KeyError, match="no weight named"):
        hf_engine.set_weights({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        hf_engine.set_weights({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})


def test_sampling_is_seeded(hf_engine):
    a = hf_engine.sample([[1]] * 3, 6, seed=7)
    b = hf_engine.sample([[1]] * 3, 6, seed=7)
    c = hf_engine.sample([[1]] * 3, 6, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_input_norms_match_a_manual_computation(hf_engine, prefixes):
    name = "model.layers.1.mlp.down_proj.weight"
    norms = hf_engine.input_norms(prefixes.tolist(), [name])[name]
    captured = []
    module = dict(hf_engine.model.named_modules())["model.layers.1.mlp.down_proj"]
    handle = module.register_forward_hook(lambda m, a, o: captured.append(a[0].detach()))
    with torch.no_grad():
        hf_engine.model(input_ids=torch.as_tensor(prefixes))
    handle.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1]).float()
    torch.testing.assert_close(norms, x.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_input_norms_errors_leave_no_hooks(hf_engine, prefixes):
    name = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(KeyError, match="no weight named"):
        hf_engine.input_norms(prefixes.tolist(), ["model.layers.1.mlp.nope.weight"])
    with pytest.raises(ValueError, match="not the weight of a linear layer"):
        hf_engine.input_norms(prefixes.tolist(), [name, "model.norm.weight"])
    # A pass that fails after the hooks are in place: ragged rows make no batch.
    with pytest.raises(ValueError, match="inhomogeneous"):
        hf_engine.input_norms([[1, 2, 3], [1, 2]], [name])
    assert not any(m._forward_hooks for m in hf_engine.model.modules())
    before = hf_engine.input_norms(prefixes.tolist(), [name])[name]
    torch.testing.assert_close(hf_engine.input_norms(prefixes.tolist(), [name])[name], before)


def test_close_is_idempotent_and_final(tiny_llama_dir):
    engine = HFEngine(tiny_llama_dir)  # its own: the module's engine stays open
    name = "model.layers.0.mlp.up_proj.weight"
    engine.close()
    engine.close()
    calls = [
        lambda: engine.generate_greedy([[1, 2]], 2),
        lambda: engine.sample([[1, 2]], 2, seed=0),
        lambda: engine.score([[1, 2, 3]], 1),
        lambda: engine.original_weight(name),
        lambda: engine.set_weights({name: torch.zeros(1)}),
        lambda: engine.restore([name]),
        lambda: engine.input_norms([[1, 2, 3]], [name]),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallopt"), reason="mallopt is glibc's; elsewhere a no-op"
)
def test_keep_freed_memory_reuses_large_blocks_warm():
    """After keep_freed_memory (which CPU engines call), a large tensor freed and allocated again
    reuses warm memory instead of page-faulting a fresh mapping: 64 MiB is 16,384 pages, which
    glibc's defaults fault in again for every such block, however many came before. With the
    setting the heap first grows (a handful of blocks land on fresh pages until freed ones
    coalesce); from then on every block comes warm."""

    def page_faults_of_one_block() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # 64 MiB of float32, written, then freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    keep_freed_memory()
    faults = [page_faults_of_one_block() for _ in range(24)]
    assert max(faults[-8:]) < 1_000, faults
