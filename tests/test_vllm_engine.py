"""The vLLM engine against the independent reference (the transformers `HFEngine`), on the real
SmolLM2-135M-Instruct in float32: greedy tokens, probe FDT/SDT, live and exactly reversible edits,
and the noise floor (DESIGN §1.6). Each engine loads once per module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from dtm_ray.compress import compress  # noqa: E402
from dtm_ray.engines.hf import HFEngine  # noqa: E402
from dtm_ray.engines.vllm import VLLMEngine  # noqa: E402
from dtm_ray.metrics import first_divergent_token, share_of_divergent_tokens  # noqa: E402
from dtm_ray.prompts import load_prompts  # noqa: E402

pytestmark = pytest.mark.slow

N_PROMPTS = 32
N_PREFIX = 32
N_NEW = 64
# Probes cost one scoring pass per engine each; 8 prompts keep CI short, and
# DTM_RAY_ACCEPTANCE=full scores all 32.
N_PROBE_PROMPTS = 32 if os.environ.get("DTM_RAY_ACCEPTANCE") == "full" else 8
N_EDIT_NEW = 24  # generation is the slow path; a shorter continuation still shows the edit

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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On this busy 2-core box torch's default 2 threads run the reference engine ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vllm_engine(smollm2_dir, one_thread):
    return VLLMEngine(smollm2_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf_engine(smollm2_dir, one_thread):
    return HFEngine(smollm2_dir, dtype="float32", batch_size=N_PROMPTS)


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


def test_noise_floor_is_zero_in_fp32(base_scores, greedy):
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
    assert (vllm_scores.margin >= 0).all()


def _probe(engine, name: str, spec: str, seqs: list[list[int]]) -> np.ndarray:
    engine.set_weights({name: compress(engine.original_weight(name), spec)})
    try:
        return engine.score(seqs, N_PREFIX).argmax
    finally:
        engine.restore([name])


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
