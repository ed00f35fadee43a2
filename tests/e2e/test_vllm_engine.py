"""The vLLM engine against the independent reference (the transformers `HFEngine`), on the real
SmolLM2-135M-Instruct in float32: greedy tokens, probe FDT/SDT, live and exactly reversible edits,
the noise floor, Wanda calibration norms and close(). Each engine loads once per
module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from support.transformers_check import full_logit_stats, protocol_drift  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from dtm_ray.core.compress import compress  # noqa: E402
from dtm_ray.core.metrics import first_divergent_token, share_of_divergent_tokens  # noqa: E402
from dtm_ray.core.state import Link  # noqa: E402
from dtm_ray.engines.prompts import load_prompts  # noqa: E402
from dtm_ray.engines.vllm import VLLMEngine, _full_input_norm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_PROMPTS = 32
N_PREFIX = 32
N_NEW = 64
# Probes cost one scoring pass per engine each; 8 prompts keep CI short, and
# DTM_RAY_ACCEPTANCE=full scores all 32.
N_PROBE_PROMPTS = 32 if os.environ.get("DTM_RAY_ACCEPTANCE") == "full" else 8
N_EDIT_NEW = 24  # generation is the slow path; a shorter continuation still shows the edit
# Wanda calibration: 8 model-written sequences of 48 tokens, rows the probes do not score.
N_CALIBRATION = 8
CALIBRATION_TOKENS = 48
NORM_LAYERS = (0, 21)
NORM_KINDS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
WANDA_PROBES = [  # fused (qkv, gate_up) and plain modules, shallow and deep
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.21.self_attn.v_proj.weight",
    "model.layers.21.mlp.gate_proj.weight",
]

# One probe per kind, across the depth, with every compression family; several must diverge.
PROBES = [
    ("model.layers.0.self_attn.q_proj.weight", "magnitude:0.9"),
    ("model.layers.4.self_attn.k_proj.weight", "int4-g64"),  # 576 inputs: 128 does not divide
    ("model.layers.9.self_attn.v_proj.weight", "magnitude:0.7"),
    ("model.layers.14.self_attn.o_proj.weight", "int8"),
    ("model.layers.18.mlp.gate_proj.weight", "magnitude:0.5"),
    ("model.layers.23.mlp.up_proj.weight", "int8"),
    ("model.layers.29.mlp.down_proj.weight", "magnitude:0.3"),
    ("model.layers.2.mlp.down_proj.weight", "int4-g128"),
    ("model.layers.12.mlp.down_proj.weight", "magnitude:0.9"),
]


# The engine fixtures: SmolLM2 in float32 on both engines (vLLM's is closed after the module, to
# free the model and KV cache for later modules), torch on one thread.
HF_ENGINE = {"model": "smollm2", "dtype": "float32", "batch_size": N_PROMPTS}


@pytest.fixture(scope="module")
def prefixes(vllm_engine, smollm2_dir):
    """Deterministic model-written text: BOS + seeded samples (the data-free `self` source)."""
    return load_prompts("self", smollm2_dir, N_PROMPTS, N_PREFIX, engine=vllm_engine, seed=0)


@pytest.fixture(scope="module")
def greedy(vllm_engine, prefixes):
    return vllm_engine.generate_greedy(prefixes.tolist(), N_NEW)


@pytest.fixture(scope="module")
def sequences(prefixes, greedy):
    return np.concatenate([prefixes, greedy], axis=1)


@pytest.fixture(scope="module")
def base_scores(vllm_engine, hf_engine, sequences):
    seqs = sequences.tolist()
    return vllm_engine.score(seqs, N_PREFIX), hf_engine.score(seqs, N_PREFIX)


def test_greedy_matches_transformers(hf_engine, prefixes, greedy):
    assert greedy.shape == (N_PROMPTS, N_NEW) and greedy.dtype == np.int64
    reference = hf_engine.generate_greedy(prefixes.tolist(), N_NEW)
    same = (greedy == reference).all(axis=1)
    print(f"\ngreedy: {same.sum()}/{N_PROMPTS} prompts identical over {N_NEW} tokens")
    assert same.all(), f"prompts {np.flatnonzero(~same).tolist()} differ"


def test_noise_floor_is_zero_in_fp32(base_scores, greedy, hf_engine, sequences):
    vllm_scores, hf_scores = base_scores
    floor_vllm = int((vllm_scores.argmax != greedy).sum())
    floor_hf = int((hf_scores.argmax != greedy).sum())
    print(
        f"\nnoise floor, positions with a(F) != y out of {greedy.size}: "
        f"vllm {floor_vllm}, hf {floor_hf}"
    )
    assert floor_vllm == 0 and floor_hf == 0
    np.testing.assert_array_equal(vllm_scores.argmax, hf_scores.argmax)
    np.testing.assert_allclose(vllm_scores.ref_logprob, hf_scores.ref_logprob, atol=1e-3)
    np.testing.assert_allclose(vllm_scores.margin, hf_scores.margin, atol=1e-3)
    # Both engines share `token_stats`: check vLLM's margin against one recomputed from the
    # full logits of a plain transformers forward pass (float64 log-softmax, sorted).
    rows = slice(0, N_PROBE_PROMPTS)
    argmax, margin, ref_logprob = full_logit_stats(hf_engine.model, sequences[rows], N_PREFIX)
    np.testing.assert_array_equal(vllm_scores.argmax[rows], argmax)
    np.testing.assert_allclose(vllm_scores.margin[rows], margin, rtol=0, atol=1e-3)
    np.testing.assert_allclose(vllm_scores.ref_logprob[rows], ref_logprob, rtol=0, atol=1e-3)


def _probe(
    engine, name: str, spec: str, seqs: list[list[int]], stats: dict | None = None
) -> np.ndarray:
    """A probe by spec, as the engine session runs it: each engine compresses the weight it
    holds (vLLM inside its worker) and puts back its own copy; no weight is sent to vLLM."""
    link = Link(spec, None, None if stats is None else stats["input_norm"])
    sent = getattr(engine, "weight_bytes_sent", 0)
    engine.compress_in_place({name: (link,)}, keep=True)
    try:
        return engine.score(seqs, N_PREFIX).argmax
    finally:
        engine.put_back([name])
        assert getattr(engine, "weight_bytes_sent", 0) == sent


def test_probe_fdt_sdt_match_transformers(vllm_engine, hf_engine, sequences, base_scores):
    seqs = sequences[:N_PROBE_PROMPTS].tolist()
    base = {
        "vllm": base_scores[0].argmax[:N_PROBE_PROMPTS],
        "hf": base_scores[1].argmax[:N_PROBE_PROMPTS],
    }
    diverging = 0
    for name, spec in PROBES:
        fdt, sdt = {}, {}
        for label, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
            argmax = _probe(engine, name, spec, seqs)
            fdt[label] = first_divergent_token(base[label], argmax)
            sdt[label] = share_of_divergent_tokens(base[label], argmax)
        print(f"\n{name} {spec}: FDT {fdt['vllm'].tolist()} SDT {sdt['vllm'].tolist()}")
        np.testing.assert_array_equal(fdt["vllm"], fdt["hf"], err_msg=f"FDT {name} {spec}")
        np.testing.assert_array_equal(sdt["vllm"], sdt["hf"], err_msg=f"SDT {name} {spec}")
        diverging += bool((fdt["vllm"] < N_NEW).any())
    assert diverging >= 4, f"only {diverging} probes diverge: the comparison is too weak"


def test_layer_skip_is_bit_identical_to_a_full_pass(vllm_engine, sequences):
    """A pass from layer L on the kept residual stream scores exactly like a full pass, through
    vLLM's fused qkv/gate_up weights and its in-place fused add + norm."""
    seqs = sequences[:N_PROBE_PROMPTS].tolist()
    dense = vllm_engine.score(seqs, N_PREFIX, keep_residuals=True)
    changed = 0
    for name, spec in PROBES[1:7]:  # layers 4..23; a layer-0 probe never skips
        layer = vllm_engine.layer_of(name)
        vllm_engine.set_weights({name: compress(vllm_engine.original_weight(name), spec)})
        try:
            full = vllm_engine.score(seqs, N_PREFIX)
            skipped = vllm_engine.score(seqs, N_PREFIX, from_layer=layer)
        finally:
            vllm_engine.restore([name])
        assert vllm_engine.skip_counts == [(1, 0)]  # one model step, and it skipped
        for field in ("argmax", "margin", "ref_logprob"):
            np.testing.assert_array_equal(getattr(full, field), getattr(skipped, field))
        changed += int((full.argmax != dense.argmax).any())
    assert changed >= 3  # the edits changed outputs, so equality is not trivial
    with pytest.raises(ValueError, match="kept for these same sequences"):
        vllm_engine.score(seqs[1:], N_PREFIX, from_layer=3)
    # Probes left the kept stream intact: the unedited model from layer 20 is the dense one.
    again = vllm_engine.score(seqs, N_PREFIX, from_layer=20)
    np.testing.assert_array_equal(again.margin, dense.margin)


def test_edit_is_live_and_restore_is_bit_identical(vllm_engine, sequences, base_scores):
    seqs = sequences[:N_PROBE_PROMPTS].tolist()
    prefixes = sequences[:N_PROBE_PROMPTS, :N_PREFIX].tolist()
    names = [
        "model.layers.5.self_attn.k_proj.weight",  # middle slice of the fused qkv_proj
        "model.layers.5.mlp.up_proj.weight",  # second half of the fused gate_up_proj
    ]
    digest = vllm_engine.params_digest()
    greedy = vllm_engine.generate_greedy(prefixes, N_EDIT_NEW)
    vllm_engine.set_weights(
        {n: compress(vllm_engine.original_weight(n), "magnitude:0.9") for n in names}
    )
    assert vllm_engine.params_digest() != digest
    edited = vllm_engine.score(seqs, N_PREFIX)
    assert (edited.argmax != base_scores[0].argmax[:N_PROBE_PROMPTS]).any()
    assert not np.array_equal(edited.ref_logprob, base_scores[0].ref_logprob[:N_PROBE_PROMPTS])
    assert (vllm_engine.generate_greedy(prefixes, N_EDIT_NEW) != greedy).any()

    vllm_engine.restore(names)
    assert vllm_engine.params_digest() == digest
    restored = vllm_engine.score(seqs, N_PREFIX)
    for field in ("argmax", "margin", "ref_logprob"):
        expected = getattr(base_scores[0], field)[:N_PROBE_PROMPTS]
        np.testing.assert_array_equal(getattr(restored, field), expected, err_msg=field)
    np.testing.assert_array_equal(vllm_engine.generate_greedy(prefixes, N_EDIT_NEW), greedy)


def test_original_weight_and_no_op_edits(vllm_engine, hf_engine):
    name = "model.layers.7.self_attn.v_proj.weight"
    assert torch.equal(vllm_engine.original_weight(name), hf_engine.original_weight(name))
    digest = vllm_engine.params_digest()
    vllm_engine.set_weights({name: vllm_engine.original_weight(name)})  # a no-op edit
    assert vllm_engine.params_digest() == digest
    vllm_engine.restore([name, "model.layers.8.self_attn.v_proj.weight"])  # 2nd never edited
    assert vllm_engine.params_digest() == digest


def test_sample_is_seeded(vllm_engine, prefixes):
    rows = prefixes[:4].tolist()
    first = vllm_engine.sample(rows, 8, seed=3)
    assert first.shape == (4, 8) and first.dtype == np.int64
    np.testing.assert_array_equal(vllm_engine.sample(rows, 8, seed=3), first)
    np.testing.assert_array_equal(vllm_engine.sample(rows[1:2], 8, seed=4), first[1:2])
    assert (vllm_engine.sample(rows, 8, seed=100) != first).any()


def test_clear_errors(vllm_engine):
    with pytest.raises(ValueError, match="one length"):
        vllm_engine.score([[1, 2, 3], [1, 2]], 1)
    with pytest.raises(ValueError, match="n_prefix"):
        vllm_engine.score([[1, 2, 3]], 3)
    with pytest.raises(KeyError, match="no weight named"):
        vllm_engine.set_weights({"model.layers.0.nope.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        vllm_engine.set_weights({"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_engine.generate_greedy([[1] * 10], vllm_engine.max_model_len)


def test_engine_leaves_process_state_alone(vllm_engine):
    # vLLM's CPU start-up disables torch.set_num_threads and sets LD_PRELOAD process-wide.
    assert torch.set_num_threads is torch._C.set_num_threads
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    assert torch.get_num_threads() == before + 1
    torch.set_num_threads(before)
    assert "vllm" not in os.environ.get("LD_PRELOAD", "")


def test_implements_the_protocol_with_its_signatures():
    assert protocol_drift(VLLMEngine) == []


# --- Wanda calibration ----------------------------------------------------------------------------
def _norm_name(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.{NORM_KINDS[kind]}.weight"


@pytest.fixture(scope="module")
def calibration(sequences):
    rows = slice(N_PROBE_PROMPTS, N_PROBE_PROMPTS + N_CALIBRATION)
    return sequences[rows, :CALIBRATION_TOKENS].tolist()


@pytest.fixture(scope="module")
def norms(vllm_engine, hf_engine, calibration):
    names = [_norm_name(layer, kind) for layer in NORM_LAYERS for kind in NORM_KINDS]
    return vllm_engine.input_norms(calibration, names), hf_engine.input_norms(calibration, names)


def test_input_norms_match_transformers(vllm_engine, norms):
    vllm_norms, hf_norms = norms
    assert vllm_norms.keys() == hf_norms.keys()
    worst = 0.0
    for name, norm in vllm_norms.items():
        in_features = vllm_engine.original_weight(name).shape[1]
        assert norm.shape == (in_features,) and norm.dtype == torch.float32
        assert norm.device.type == "cpu" and (norm > 0).all()
        torch.testing.assert_close(norm, hf_norms[name], rtol=1e-4, atol=1e-6, msg=name)
        worst = max(worst, ((norm - hf_norms[name]).abs() / hf_norms[name]).max().item())
    print(f"\ninput norms, {len(vllm_norms)} weights: max relative difference vllm/hf {worst:.2e}")
    for layer in NORM_LAYERS:
        # q/k/v read the one input of the fused qkv_proj, gate/up that of gate_up_proj.
        q = vllm_norms[_norm_name(layer, "q")]
        assert torch.equal(q, vllm_norms[_norm_name(layer, "k")])
        assert torch.equal(q, vllm_norms[_norm_name(layer, "v")])
        assert torch.equal(
            vllm_norms[_norm_name(layer, "gate")], vllm_norms[_norm_name(layer, "up")]
        )


def test_wanda_probe_fdt_matches_transformers(
    vllm_engine, hf_engine, sequences, base_scores, norms
):
    seqs = sequences[:N_PROBE_PROMPTS].tolist()
    engines = {
        "vllm": (vllm_engine, base_scores[0], norms[0]),
        "hf": (hf_engine, base_scores[1], norms[1]),
    }
    same = diverging = 0
    for name in WANDA_PROBES:
        fdt = {}
        for label, (engine, base, engine_norms) in engines.items():
            argmax = _probe(engine, name, "wanda:0.5", seqs, {"input_norm": engine_norms[name]})
            fdt[label] = first_divergent_token(base.argmax[:N_PROBE_PROMPTS], argmax)
        print(f"\n{name} wanda:0.5: FDT vllm {fdt['vllm'].tolist()} hf {fdt['hf'].tolist()}")
        same += int((fdt["vllm"] == fdt["hf"]).sum())
        np.testing.assert_array_equal(fdt["vllm"], fdt["hf"], err_msg=name)
        diverging += bool((fdt["vllm"] < N_NEW).any())
    print(f"wanda FDT equal for {same}/{len(WANDA_PROBES) * N_PROBE_PROMPTS} (probe, prompt)")
    assert diverging >= 2, f"only {diverging} wanda probes diverge: the comparison is too weak"


def test_input_norms_errors_leave_no_hooks(vllm_engine, calibration, norms):
    def hooks() -> list[int]:  # forward hooks on the model, per worker rank
        return vllm_engine.llm.apply_model(
            lambda m: sum(len(x._forward_hooks) for x in m.modules())
        )

    name = _norm_name(0, "down")
    with pytest.raises(KeyError, match="no weight named"):
        vllm_engine.input_norms(calibration, ["model.layers.0.nope.weight"])
    with pytest.raises(ValueError, match="not the weight of a linear layer"):
        vllm_engine.input_norms(calibration, [name, "model.norm.weight"])
    # A pass that fails after the hooks are in place: vLLM rejects a token id past the vocabulary.
    with pytest.raises(VLLMValidationError, match="out of vocabulary"):
        vllm_engine.input_norms([[10**9] * 4], [name])
    assert hooks() == [0]
    torch.testing.assert_close(vllm_engine.input_norms(calibration, [name])[name], norms[0][name])


def test_rank_sums_combine_like_tensor_parallel_shards():
    a, b = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 16.0])
    # Column-parallel: every rank saw the whole input; rank 0's sums are the answer.
    torch.testing.assert_close(
        _full_input_norm("w", [(a, 5, False), (a, 5, False)], 2, 5), a.sqrt()
    )
    # Row-parallel: each rank saw its slice of the input dimension, in rank order.
    expected = torch.tensor([1.0, 2.0, 3.0, 4.0])
    torch.testing.assert_close(_full_input_norm("w", [(a, 5, True), (b, 5, True)], 4, 5), expected)
    with pytest.raises(RuntimeError, match="in_features=3"):
        _full_input_norm("w", [(a, 5, True), (b, 5, True)], 3, 5)
    # Hooks that never fired (compiled graphs) or saw padded batches (CUDA graphs).
    for rows in (0, 8):
        with pytest.raises(RuntimeError, match="enforce_eager: true"):
            _full_input_norm("w", [(a, rows, False)], 2, 5)


# Must stay the last test: closing tears down the module's engine (and, in-process, vLLM's
# process-wide distributed state), so no later test could use it.
def test_close_is_idempotent_and_final(vllm_engine, sequences):
    seqs = sequences[:2].tolist()
    name = _norm_name(0, "q")
    vllm_engine.close()
    vllm_engine.close()
    calls = [
        lambda: vllm_engine.generate_greedy(seqs, 2),
        lambda: vllm_engine.sample(seqs, 2, seed=0),
        lambda: vllm_engine.score(seqs, N_PREFIX),
        lambda: vllm_engine.original_weight(name),
        lambda: vllm_engine.set_weights({name: torch.zeros(1)}),
        lambda: vllm_engine.restore([name]),
        lambda: vllm_engine.input_norms(seqs, [name]),
        vllm_engine.params_digest,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_compiled_execution_scores_through_the_hook_and_falls_back_when_it_misses(
    tiny_llama_dir, monkeypatch, one_thread
):
    """With `enforce_eager: false` (torch.compile on this CPU build) the scoring hook on the
    whole model still sees every position and gives what `prompt_logprobs` gives; a pass where
    it misses positions moves the engine to `prompt_logprobs` for good, that pass included."""
    import dtm_ray.engines.vllm as vllm_module

    engine = VLLMEngine(tiny_llama_dir, dtype="float32", enforce_eager=False)
    try:
        assert not engine._eager
        seqs = np.random.default_rng(5).integers(3, 40000, size=(6, 24)).tolist()
        by_logprobs = engine._score_by_prompt_logprobs(seqs, 8)
        by_hook = engine.score(seqs, 8)
        assert engine._hook_scoring
        for field in ("argmax", "margin", "ref_logprob"):
            expected = getattr(by_logprobs, field)
            np.testing.assert_array_equal(getattr(by_hook, field), expected, err_msg=field)

        missed = []

        def missing(ranks, positions):
            missed.append(positions)
            raise RuntimeError("the hook saw 0 positions")

        monkeypatch.setattr(vllm_module, "_hook_scores", missing)
        fallback = engine.score(seqs, 8)
        assert missed == [6 * 16] and not engine._hook_scoring
        np.testing.assert_array_equal(fallback.argmax, by_logprobs.argmax)
        engine.score(seqs, 8)  # no hook from now on
        assert missed == [6 * 16]
    finally:
        engine.close()


def test_a_stream_too_large_for_the_gpu_budget_is_kept_in_pinned_host_memory():
    """The kept layers the engine sends its ranks: on a GPU a stream over `residual_cache_bytes`
    goes to pinned host memory when `residual_host_bytes` keeps more layers, the ranks of one
    actor sharing that budget; on CPU host memory is the device, so nothing changes."""
    from types import SimpleNamespace

    # 13B at 512 prompts x 288 tokens: hidden + residual, 2.8 GiB per layer, 40 layers.
    prompts = [[1] * 288] * 512
    gib = 1 << 30

    def kept(on_cpu: bool, tp: int = 1, host: int = 32 * gib) -> tuple[int, bool]:
        engine = SimpleNamespace(
            _hidden_size=5120,
            _num_layers=40,
            dtype="bfloat16",
            on_cpu=on_cpu,
            residual_cache_bytes=2 * gib,
            residual_host_bytes=host,
            tensor_parallel_size=tp,
        )
        return VLLMEngine._kept_layers(engine, prompts)

    assert kept(on_cpu=False) == (4, True)  # 10 of 40 layers in 28 GiB of pinned memory
    assert kept(on_cpu=False, tp=4) == (15, True)  # 8 GiB a rank: layers 0, 15, 30
    stride, on_host = kept(on_cpu=False, host=0)
    assert stride >= 40 and not on_host  # only layer 0's input: layer skip inactive
    stride, on_host = kept(on_cpu=True)
    assert stride >= 40 and not on_host
    small = [[1] * 24] * 8
    engine = SimpleNamespace(
        _hidden_size=5120,
        _num_layers=40,
        dtype="bfloat16",
        on_cpu=False,
        residual_cache_bytes=2 * gib,
        residual_host_bytes=32 * gib,
        tensor_parallel_size=1,
    )
    assert VLLMEngine._kept_layers(engine, small) == (1, False)  # fits the GPU budget
