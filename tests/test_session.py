"""The engine session without Ray: states replay bit-identically, fail atomically, and probes put
every weight back as the state has it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dtm_ray.core.compress import compress
from dtm_ray.core.metrics import first_divergent_token
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.probe import build_reference, run_probe
from dtm_ray.engines.session import EngineBroken, EngineSession

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


def weights_digest(engine: HFEngine) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(engine.model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@pytest.fixture()
def engine(tiny_llama_dir: Path) -> HFEngine:
    return HFEngine(tiny_llama_dir, batch_size=8)


@pytest.fixture()
def reference(engine: HFEngine):
    prefixes = np.random.default_rng(0).integers(3, 1000, size=(6, 8))
    return build_reference(engine, prefixes, 12)


def chained_state() -> ModelState:
    norm = np.linspace(0.5, 2.0, 256, dtype=np.float32)  # down_proj takes 256 inputs
    return ModelState(
        {
            Q0: (Link("magnitude:0.2"), Link("magnitude:0.36")),
            DOWN1: (Link("wanda:0.5", 0, norm),),
        }
    )


def test_a_state_replays_bit_identically_on_any_session(tiny_llama_dir: Path) -> None:
    first, second = HFEngine(tiny_llama_dir), HFEngine(tiny_llama_dir)
    dense = weights_digest(first)
    a, b = EngineSession(first), EngineSession(second)
    state = chained_state()
    a.apply_state(state)
    # The second session gets there another way: an unrelated state first, then this one.
    b.apply_state(ModelState({UP0: (Link("int8"),)}))
    b.apply_state(state)
    assert weights_digest(first) == weights_digest(second) != dense
    # The chain keeps the first link's zeros and lands on the absolute sparsity of the last.
    q = first.model.get_parameter(Q0).detach()
    expected = compress(compress(first.original_weight(Q0), "magnitude:0.2"), "magnitude:0.36")
    assert torch.equal(q, expected)
    assert (q == 0).float().mean().item() == pytest.approx(0.36, abs=1 / q.numel())
    # Back to no state: every weight is the checkpoint's again, bit for bit.
    a.apply_state(ModelState())
    assert weights_digest(first) == dense


def test_a_state_that_fails_half_way_leaves_nothing_edited(engine: HFEngine) -> None:
    session = EngineSession(engine)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(engine)
    # The wanda link has no statistics: replaying it fails after the q link would be computed.
    bad = ModelState({Q0: (Link("magnitude:0.5"),), DOWN1: (Link("wanda:0.5"),)})
    with pytest.raises(ValueError, match="input_norm"):
        session.apply_state(bad)
    assert weights_digest(engine) == before
    assert session.state.specs(Q0) == ["int8"]


def test_a_failed_engine_write_puts_the_old_state_back(engine: HFEngine, monkeypatch) -> None:
    session = EngineSession(engine)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(engine)
    real = engine.set_weights
    calls = []

    def fail_once(weights):
        calls.append(sorted(weights))
        if len(calls) == 1:
            real(weights)  # the write gets half way ...
            raise RuntimeError("device lost")  # ... then fails
        real(weights)

    monkeypatch.setattr(engine, "set_weights", fail_once)
    with pytest.raises(RuntimeError, match="device lost"):
        session.apply_state(ModelState({Q0: (Link("magnitude:0.5"),), UP0: (Link("int8"),)}))
    assert weights_digest(engine) == before
    assert session.state.specs(Q0) == ["int8"]


def test_a_probe_on_top_of_a_state_compresses_the_current_weight_and_puts_it_back(
    engine: HFEngine, reference
) -> None:
    session = EngineSession(engine)
    state = ModelState({Q0: (Link("magnitude:0.3"),)})
    session.apply_state(state)
    before = weights_digest(engine)
    result = session.probe({Q0: "magnitude:0.6", UP0: "int8"}, reference)
    assert weights_digest(engine) == before

    # The same model built by hand: Q0 pruned 0.3 then 0.6 from there, UP0 quantized.
    q = compress(compress(engine.original_weight(Q0), "magnitude:0.3"), "magnitude:0.6")
    engine.set_weights({Q0: q, UP0: compress(engine.original_weight(UP0), "int8")})
    by_hand = engine.score(reference.sequences.tolist(), reference.n_prefix)
    engine.restore([Q0, UP0])
    np.testing.assert_array_equal(
        result.fdt, first_divergent_token(reference.base_argmax, by_hand.argmax)
    )
    assert result.fdt.min() < reference.n_new  # the probe did change something
    # A one-component probe of the dense model equals the in-process probe.
    session.apply_state(ModelState())
    np.testing.assert_array_equal(
        session.probe({UP0: "int8"}, reference).fdt, run_probe(engine, reference, UP0, "int8").fdt
    )


def test_a_probe_that_raises_puts_weights_back_and_a_failed_put_back_breaks_the_session(
    engine: HFEngine, reference, monkeypatch
) -> None:
    session = EngineSession(engine)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(engine)
    monkeypatch.setattr(engine, "score", lambda *a: (_ for _ in ()).throw(RuntimeError("oom")))
    with pytest.raises(RuntimeError, match="oom"):
        session.probe({Q0: "magnitude:0.5"}, reference)
    assert weights_digest(engine) == before

    monkeypatch.setattr(engine, "restore", lambda names: (_ for _ in ()).throw(OSError("gone")))
    with pytest.raises(EngineBroken, match="could not put"):
        session.probe({UP0: "magnitude:0.5"}, reference)


def test_zero_shares_measure_the_current_weights(engine: HFEngine) -> None:
    session = EngineSession(engine)
    session.apply_state(ModelState({Q0: (Link("magnitude:0.25"),)}))
    shares = session.zero_shares([Q0, UP0])
    numel = 128 * 128
    assert shares[Q0] == (round(0.25 * numel) / numel, numel - round(0.25 * numel))
    assert shares[UP0] == (0.0, 256 * 128)
