"""The anchors' sensitivity signals (fisher: ModelOpt's gradient score; weight_error: NNCF's
data-free criterion and the per-spec weight error) against independent computations: numpy for
the pure math, autograd on a separately loaded transformers model for the engine's pass, and the
hf and vllm engines against each other on one model state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from support.checks import weights_digest
from support.fakes import ADDED, Q0, S0, calibration, candidates, chained_state

from dtm_ray.core.compress import compress, replay
from dtm_ray.core.decisions.sparsify import absolute_sparsity
from dtm_ray.core.sensitivity import (
    delta_weight,
    fisher_score,
    nncf_int8_asym,
    nncf_sensitivity,
    weight_error,
)
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.session import EngineSession


# --- pure math ------------------------------------------------------------------------------
def test_fisher_score_is_the_sum_of_squared_gradient_times_output_change() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 7, 16)).astype(np.float32)  # [batch, tokens, in]
    g = rng.normal(size=(3, 7, 10)).astype(np.float32)  # [batch, tokens, out]
    dw = rng.normal(size=(10, 16)).astype(np.float32)
    expected = 0.0
    for b in range(3):
        for t in range(7):
            for o in range(10):
                expected += (
                    float(g[b, t, o]) * float(np.dot(x[b, t].astype(np.float64), dw[o]))
                ) ** 2
    args = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(dw)
    assert fisher_score(*args) == pytest.approx(expected, rel=1e-5)
    # Chunks of one token give the same sum: memory is bounded without changing the score.
    assert fisher_score(*args, chunk_elements=1) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        fisher_score(torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(dw.T.copy()))


def test_fisher_score_clamps_each_product_as_modelopt_does() -> None:
    x = torch.tensor([[1e6]])
    g = torch.tensor([[1e6]])
    assert fisher_score(x, g, torch.tensor([[1e3]])) == pytest.approx(1e20)  # 1e15 -> 1e10


def test_weight_error_reductions_against_numpy() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(12, 32)).astype(np.float32)
    c = w + rng.normal(scale=0.01, size=w.shape).astype(np.float32)
    d = c.astype(np.float64) - w.astype(np.float64)
    tw, tc = torch.from_numpy(w), torch.from_numpy(c)
    assert weight_error(tw, tc) == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w), rel=1e-5)
    assert weight_error(tw, tc, "frobenius") == pytest.approx(np.linalg.norm(d), rel=1e-5)
    assert weight_error(tw, tc, "max_mean") == pytest.approx((d**2).mean(axis=1).max(), rel=1e-4)
    zero = torch.zeros(2, 4)
    assert weight_error(zero, zero) == 0.0
    assert weight_error(zero, torch.ones(2, 4)) == float("inf")
    with pytest.raises(ValueError, match="unknown reduction"):
        weight_error(tw, tc, "mean")


def _nncf_int8_asym_numpy(w: np.ndarray) -> np.ndarray:
    """NNCF's reference path (calculate_integer_quantization_params with INT8_ASYM,
    calculate_scale_zero_point, _calculate_integer_quantized_weight, do_integer_dequantization)
    written out in numpy, per output row."""
    w = w.astype(np.float32)
    low = w.min(axis=1, keepdims=True)
    high = w.max(axis=1, keepdims=True)
    scale = ((high - low) / np.float32(255)).astype(np.float32)
    eps = np.finfo(np.float32).eps
    scale = np.where(np.abs(scale) < eps, eps, scale).astype(np.float32)
    zero_point = np.clip((0 - np.round(low / scale)).astype(np.int32), 0, 255)
    q = np.clip(np.round(w / scale + zero_point.astype(np.float32)), 0, 255).astype(np.uint8)
    return (q.astype(np.int32) - zero_point).astype(np.float32) * scale


def test_nncf_sensitivity_is_the_inverted_int8_asym_error_with_the_weights_eps() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(scale=0.05, size=(16, 64)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale eps, no division by zero
    w[5, 7] = 0.9  # an outlier widens one row's range
    reference = _nncf_int8_asym_numpy(w)
    ours = nncf_int8_asym(torch.from_numpy(w)).numpy()
    assert np.allclose(ours, reference, rtol=0, atol=1e-7)
    error = ((reference.astype(np.float64) - w) ** 2).mean(axis=1).max()
    eps32 = float(np.finfo(np.float32).eps)
    assert nncf_sensitivity(torch.from_numpy(w)) == pytest.approx(1 / (error + eps32), rel=1e-4)
    # The eps is the weight's own dtype's: in bf16 it dominates an error this small.
    bf16 = torch.from_numpy(w).to(torch.bfloat16)
    bf16_error = weight_error(bf16, nncf_int8_asym(bf16), "max_mean")
    assert nncf_sensitivity(bf16) == pytest.approx(1 / (bf16_error + 2**-7), rel=1e-6)


def test_delta_weight_of_a_pruning_probe_on_a_chain_removes_only_the_new_weights() -> None:
    w = torch.from_numpy(np.random.default_rng(4).normal(size=(32, 64)).astype(np.float32))
    current = compress(w, f"magnitude:{S0}")
    target = absolute_sparsity(S0, ADDED)
    delta = delta_weight(current, f"magnitude:{target}")
    removed = delta != 0
    assert int(removed.sum()) == round(target * w.numel()) - round(S0 * w.numel())
    assert not bool((removed & (current == 0)).any())  # earlier zeros stay zeros
    assert torch.equal(delta[removed], -current[removed])


# --- the pass on an engine, against autograd on a separate transformers model ----------------
def _brute_force_fisher(
    model_dir: Path, state: ModelState, cands: dict[str, list[str]], sequences, batch_size: int
) -> dict[tuple[str, str], float]:
    """ModelOpt's procedure literally: a fresh transformers model holding the state (chains
    replayed with `core.compress.replay`), parameters left trainable, the outputs Y of every
    candidate's linear kept with retain_grad; per batch the HF causal-LM loss (labels = the
    tokens), backward, then for every spec Y_q − Y from running the linear with the compressed
    weight on the same input, and Σ (∂L/∂Y · (Y_q − Y))²."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, chain in state.chains.items():
            params[name].copy_(replay(params[name].detach().clone(), chain))
    modules = dict(model.named_modules())
    scores = {(n, s): 0.0 for n, specs in cands.items() for s in specs}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(module, args, out, name):
        out.retain_grad()
        seen[name] = (args[0].detach(), out)

    for start in range(0, len(sequences), batch_size):
        ids = torch.as_tensor(np.asarray(sequences[start : start + batch_size]))

        hooks = [
            modules[n.removesuffix(".weight")].register_forward_hook(
                lambda m, a, o, n=n: keep(m, a, o, n)
            )
            for n in cands
        ]
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, specs in cands.items():
                x, y = seen[name]
                module = modules[name.removesuffix(".weight")]
                for spec in specs:
                    y_q = torch.nn.functional.linear(x, compress(module.weight, spec), module.bias)
                    term = (y.grad.double() * (y_q.double() - y.double())).square().sum()
                    scores[(name, spec)] += float(term)
    return scores


def test_fisher_on_the_hf_engine_matches_autograd_and_leaves_the_model_as_it_was(
    tiny_llama_dir: Path,
) -> None:
    engine = HFEngine(tiny_llama_dir)
    session = EngineSession(engine)
    state = chained_state()
    session.apply_state(state)
    before = weights_digest(engine.model)
    flags = [p.requires_grad for p in engine.model.parameters()]
    sequences = calibration()
    result = session.sensitivity("fisher", candidates(), sequences, batch_size=4)
    expected = _brute_force_fisher(tiny_llama_dir, state, candidates(), sequences, 4)
    got = {(row["component"], row["spec"]): row["fisher"] for row in result.rows}
    assert list(got) == list(expected)  # every candidate, in the candidates' order
    for key, value in expected.items():
        assert value > 0
        assert got[key] == pytest.approx(value, rel=1e-4), key
    assert result.passes == 2 and result.tokens == sequences.size  # 6 sequences, batches of 4
    assert weights_digest(engine.model) == before
    assert [p.requires_grad for p in engine.model.parameters()] == flags
    assert not engine.model.training

    # A budget that fits one candidate's ΔW at a time: more passes, the same scores.
    links = {name: [Link(spec) for spec in specs] for name, specs in candidates().items()}
    split = engine.fisher_scores(sequences.tolist(), links, batch_size=4, delta_bytes=1)
    assert split.passes == 2 * sum(len(specs) for specs in candidates().values())
    for key, value in got.items():
        assert split.values[key]["fisher"] == pytest.approx(value, rel=1e-9)


def test_fisher_depends_on_the_state_it_is_measured_on(tiny_llama_dir: Path) -> None:
    session = EngineSession(HFEngine(tiny_llama_dir))
    sequences = calibration(count=4)
    spec = "int4-g64"
    dense = session.sensitivity("fisher", {Q0: [spec]}, sequences).rows[0]["fisher"]
    session.apply_state(chained_state())
    chained = session.sensitivity("fisher", {Q0: [spec]}, sequences).rows[0]["fisher"]
    assert dense > 0 and chained > 0 and dense != pytest.approx(chained, rel=1e-3)


def test_weight_error_on_a_state_measures_the_spec_on_the_current_weight(
    tiny_llama_dir: Path,
) -> None:
    engine = HFEngine(tiny_llama_dir)
    session = EngineSession(engine)
    state = chained_state()
    session.apply_state(state)
    result = session.sensitivity("weight_error", candidates())
    assert result.passes == 0 and len(result.rows) == 6
    for row in result.rows:
        name, spec = row["component"], row["spec"]
        current = replay(engine.original_weight(name), state.chain(name))
        compressed = compress(current, spec)
        assert row["weight_error"] == pytest.approx(weight_error(current, compressed), rel=1e-6)
        assert row["weight_mse_max"] == pytest.approx(
            weight_error(current, compressed, "max_mean"), rel=1e-6
        )
        assert row["nncf_sensitivity"] == pytest.approx(nncf_sensitivity(current), rel=1e-6)
    q0 = [row for row in result.rows if row["component"] == Q0]
    # The pruning probe removes (s - s0) / (1 - s0) = ADDED of the remaining weights.
    assert q0[0]["spec"] == f"magnitude:{absolute_sparsity(S0, ADDED)}"
    assert 0 < q0[1]["weight_error"] < q0[0]["weight_error"]  # int8 hurts less than pruning


def test_bad_sensitivity_calls_fail_before_the_engine_is_asked(tiny_llama_dir: Path) -> None:
    session = EngineSession(HFEngine(tiny_llama_dir))
    with pytest.raises(ValueError, match="unknown sensitivity guide"):
        session.sensitivity("hessian", {Q0: ["int8"]})
    with pytest.raises(ValueError, match="needs calibration sequences"):
        session.sensitivity("fisher", {Q0: ["int8"]})
    with pytest.raises(ValueError, match="needs calibration input norms"):
        session.sensitivity("weight_error", {Q0: ["wanda:0.5"]})
    with pytest.raises(ValueError, match="not divisible"):
        session.sensitivity("weight_error", {Q0: ["int4-g96"]})
    with pytest.raises(ValueError, match="one length"):
        session.engine.fisher_scores([[1, 2, 3], [4, 5]], {Q0: [Link("int8")]})


def test_wanda_candidates_use_the_given_input_norms(tiny_llama_dir: Path) -> None:
    engine = HFEngine(tiny_llama_dir)
    session = EngineSession(engine)
    norm = np.linspace(0.1, 3.0, 128, dtype=np.float32)
    row = session.sensitivity("weight_error", {Q0: ["wanda:0.5"]}, stats={Q0: norm}).rows[0]
    weight = engine.original_weight(Q0)
    expected = compress(weight, "wanda:0.5", {"input_norm": norm})
    assert row["weight_error"] == pytest.approx(weight_error(weight, expected), rel=1e-6)


def test_both_engines_offer_the_sensitivity_calls_with_the_protocols_signatures() -> None:
    import inspect

    from dtm_ray.engines.base import MeasuresSensitivity

    pytest.importorskip("vllm")
    from dtm_ray.engines.vllm import VLLMEngine

    for cls in (HFEngine, VLLMEngine):
        for name in ("weight_errors", "fisher_scores"):
            want = list(inspect.signature(getattr(MeasuresSensitivity, name)).parameters)
            have = list(inspect.signature(getattr(cls, name)).parameters)
            assert have[: len(want)] == want, (cls.__name__, name, have)
