"""The engine session without Ray: states replay bit-identically, fail atomically, and probes put
every weight back as the state has it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.checks import weights_digest

from dtm_ray.core.compress import compress
from dtm_ray.core.metrics import first_divergent_token
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.probe import build_reference, run_probe
from dtm_ray.engines.session import EngineBroken, EngineSession

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture()
def reference(fresh_hf_engine: HFEngine):
    prefixes = np.random.default_rng(0).integers(3, 1000, size=(6, 8))
    return build_reference(fresh_hf_engine, prefixes, 12)


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


def test_a_state_that_fails_half_way_leaves_nothing_edited(fresh_hf_engine: HFEngine) -> None:
    session = EngineSession(fresh_hf_engine)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(fresh_hf_engine)
    # The wanda link has no statistics: replaying it fails after the q link would be computed.
    bad = ModelState({Q0: (Link("magnitude:0.5"),), DOWN1: (Link("wanda:0.5"),)})
    with pytest.raises(ValueError, match="input_norm"):
        session.apply_state(bad)
    assert weights_digest(fresh_hf_engine) == before
    assert session.state.specs(Q0) == ["int8"]


@pytest.mark.parametrize("route", ["set_weights", "compress_in_place"])
def test_a_failed_engine_write_puts_the_old_state_back(
    fresh_hf_engine: HFEngine, monkeypatch, route: str
) -> None:
    # set_weights: an fresh_hf_engine that only takes whole tensors; compress_in_place: one that
    # compresses the weights it holds (both engines here).
    target = PlainEngine(fresh_hf_engine) if route == "set_weights" else fresh_hf_engine
    session = EngineSession(target)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(fresh_hf_engine)
    real = getattr(fresh_hf_engine, route)
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(sorted(args[0]))
        real(*args, **kwargs)  # the write gets (half) way ...
        if len(calls) == 1:
            raise RuntimeError("device lost")  # ... then fails

    monkeypatch.setattr(fresh_hf_engine, route, fail_once)
    with pytest.raises(RuntimeError, match="device lost"):
        session.apply_state(ModelState({Q0: (Link("magnitude:0.5"),), UP0: (Link("int8"),)}))
    assert weights_digest(fresh_hf_engine) == before
    assert session.state.specs(Q0) == ["int8"]


def test_a_probe_on_top_of_a_state_compresses_the_current_weight_and_puts_it_back(
    fresh_hf_engine: HFEngine, reference
) -> None:
    session = EngineSession(fresh_hf_engine)
    state = ModelState({Q0: (Link("magnitude:0.3"),)})
    session.apply_state(state)
    before = weights_digest(fresh_hf_engine)
    result = session.probe({Q0: "magnitude:0.6", UP0: "int8"}, reference)
    assert weights_digest(fresh_hf_engine) == before

    # The same model built by hand: Q0 pruned 0.3 then 0.6 from there, UP0 quantized.
    q = compress(compress(fresh_hf_engine.original_weight(Q0), "magnitude:0.3"), "magnitude:0.6")
    fresh_hf_engine.set_weights(
        {Q0: q, UP0: compress(fresh_hf_engine.original_weight(UP0), "int8")}
    )
    by_hand = fresh_hf_engine.score(reference.sequences.tolist(), reference.n_prefix)
    fresh_hf_engine.restore([Q0, UP0])
    np.testing.assert_array_equal(
        result.fdt, first_divergent_token(reference.base_argmax, by_hand.argmax)
    )
    assert result.fdt.min() < reference.n_new  # the probe did change something
    # A one-component probe of the dense model equals the in-process probe.
    session.apply_state(ModelState())
    np.testing.assert_array_equal(
        session.probe({UP0: "int8"}, reference).fdt,
        run_probe(fresh_hf_engine, reference, UP0, "int8").fdt,
    )


def test_a_probe_that_raises_puts_weights_back_and_a_failed_put_back_breaks_the_session(
    fresh_hf_engine: HFEngine, reference, monkeypatch
) -> None:
    session = EngineSession(fresh_hf_engine)
    session.apply_state(ModelState({Q0: (Link("int8"),)}))
    before = weights_digest(fresh_hf_engine)
    monkeypatch.setattr(
        fresh_hf_engine, "score", lambda *a: (_ for _ in ()).throw(RuntimeError("oom"))
    )
    with pytest.raises(RuntimeError, match="oom"):
        session.probe({Q0: "magnitude:0.5"}, reference)
    assert weights_digest(fresh_hf_engine) == before

    gone = lambda *a: (_ for _ in ()).throw(OSError("gone"))  # noqa: E731
    monkeypatch.setattr(fresh_hf_engine, "put_back", gone)
    monkeypatch.setattr(fresh_hf_engine, "restore", gone)
    with pytest.raises(EngineBroken, match="could not put"):
        session.probe({UP0: "magnitude:0.5"}, reference)


def test_zero_shares_measure_the_current_weights(fresh_hf_engine: HFEngine) -> None:
    session = EngineSession(fresh_hf_engine)
    session.apply_state(ModelState({Q0: (Link("magnitude:0.25"),)}))
    shares = session.zero_shares([Q0, UP0])
    numel = 128 * 128
    assert shares[Q0] == (round(0.25 * numel) / numel, numel - round(0.25 * numel))
    assert shares[UP0] == (0.0, 256 * 128)


# --- state changes at scale: incremental, bounded, replays only where they must ---------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_magnitude_chain_replays_as_its_last_link_alone(smollm2_dir: Path, dtype) -> None:
    from safetensors import safe_open

    from dtm_ray.core.compress import replay

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.3.mlp.down_proj.weight").to(dtype)
    chain = tuple(Link(f"magnitude:{s}") for s in (0.1, 0.19, 0.271, 0.3439, 0.5))
    step_by_step = w
    for link in chain:
        step_by_step = compress(step_by_step, link.spec)
    # What every sparsify round does (each link on the last one's weight) is one pass at the
    # last sparsity: the replay that a restarted actor, resume and export run.
    assert torch.equal(step_by_step, compress(w, "magnitude:0.5"))
    assert torch.equal(replay(w, chain), step_by_step)
    # Not when a later link prunes less (the first link's zeros stay): applied in order.
    shrinking = (Link("magnitude:0.5"), Link("magnitude:0.3"))
    assert torch.equal(replay(w, shrinking), compress(w, "magnitude:0.5"))
    assert not torch.equal(replay(w, shrinking), compress(w, "magnitude:0.3"))


class PlainEngine:
    """An engine offering only the `Engine` protocol: it takes whole weights (set_weights) and
    does not compress what it holds itself."""

    def __init__(self, fresh_hf_engine: HFEngine) -> None:
        self.engine = fresh_hf_engine

    def __getattr__(self, name: str):  # noqa: ANN204
        if name in ("compress_in_place", "put_back", "nonzero_counts"):
            raise AttributeError(name)
        return getattr(self.engine, name)


class CountingEngine(PlainEngine):
    """A plain engine that counts the weights each call writes."""

    def __init__(self, fresh_hf_engine: HFEngine) -> None:
        super().__init__(fresh_hf_engine)
        self.writes, self.bytes_per_write = 0, []

    def set_weights(self, weights) -> None:  # noqa: ANN001
        self.writes += len(weights)
        self.bytes_per_write.append(sum(w.nbytes for w in weights.values()))
        self.engine.set_weights(weights)


def test_a_state_change_runs_only_the_new_links_on_the_weights_the_engine_holds(
    tiny_llama_dir: Path, monkeypatch
) -> None:
    norm = np.linspace(0.5, 2.0, 256, dtype=np.float32)
    first = ModelState({Q0: (Link("magnitude:0.2"),), DOWN1: (Link("wanda:0.3", 0, norm),)})
    later = ModelState(
        {
            Q0: (Link("magnitude:0.2"), Link("magnitude:0.36")),
            DOWN1: (Link("wanda:0.3", 0, norm), Link("wanda:0.5", 1, norm[::-1].copy())),
            UP0: (Link("int8"),),
        }
    )
    incremental = EngineSession(HFEngine(tiny_llama_dir))
    incremental.apply_state(first)
    replays = []
    real = incremental.replay
    monkeypatch.setattr(
        incremental, "replay", lambda n, c, *base: replays.append(n) or real(n, c, *base)
    )
    written = []
    monkeypatch.setattr(incremental.engine, "set_weights", lambda w: written.append(w))
    incremental.apply_state(later)
    # Q0 and DOWN1 grew by one link each, run on the weights the engine holds; UP0 was new and
    # compressed from the original the engine holds: nothing replayed or written from here.
    assert replays == [] and written == []
    # The same weights as the chains replayed here on the originals and written whole.
    replayed = EngineSession(PlainEngine(HFEngine(tiny_llama_dir)))
    replayed.apply_state(later)
    assert weights_digest(incremental.engine) == weights_digest(replayed.engine.engine)


def test_a_state_change_writes_in_batches_bounded_by_the_push_budget(tiny_llama_dir: Path) -> None:
    names = [f"model.layers.{i}.mlp.{k}_proj.weight" for i in (0, 1) for k in ("gate", "up")]
    state = ModelState({name: (Link("magnitude:0.5"),) for name in names})
    one_weight = 256 * 128 * 4  # bytes of one float32 [256, 128] matrix
    bounded = CountingEngine(HFEngine(tiny_llama_dir))
    EngineSession(bounded, push_bytes=one_weight + 1).apply_state(state)
    # At most the budget plus one weight per write: here two weights a batch.
    assert bounded.bytes_per_write == [2 * one_weight, 2 * one_weight]
    whole = CountingEngine(HFEngine(tiny_llama_dir))
    EngineSession(whole).apply_state(state)
    assert whole.bytes_per_write == [4 * one_weight]
    assert weights_digest(bounded.engine) == weights_digest(whole.engine)


def test_a_probe_compresses_and_puts_back_the_engines_own_copy_without_replays(
    fresh_hf_engine: HFEngine, reference, monkeypatch
) -> None:
    session = EngineSession(fresh_hf_engine)
    session.apply_state(ModelState({Q0: (Link("magnitude:0.3"), Link("magnitude:0.5"))}))
    before = weights_digest(fresh_hf_engine)
    monkeypatch.setattr(session, "replay", lambda *a: pytest.fail("a probe replayed a chain"))
    probed = session.probe({Q0: "int8", UP0: "magnitude:0.9"}, reference)
    assert weights_digest(fresh_hf_engine) == before
    # The model the probe scored, built by hand from the originals.
    q = compress(compress(fresh_hf_engine.original_weight(Q0), "magnitude:0.5"), "int8")
    fresh_hf_engine.set_weights(
        {Q0: q, UP0: compress(fresh_hf_engine.original_weight(UP0), "magnitude:0.9")}
    )
    by_hand = fresh_hf_engine.score(reference.sequences.tolist(), reference.n_prefix)
    expected = first_divergent_token(reference.base_argmax, by_hand.argmax)
    np.testing.assert_array_equal(probed.fdt, expected)
    assert expected.min() < reference.n_new
