"""vLLM's CPU build with tensor_parallel_size 2 against 1, on the tiny Llama (one KV head, so at
TP 2 both ranks hold it whole: the replicated-KV case), and probes by spec inside the worker
ranks against the reference path (the weight computed here with `core.compress` and loaded
through vLLM's own loader).

Each engine starts once (TP 1, then TP 2, never both at once) and every check reads what it
recorded; a TP 2 engine runs two worker processes, one thread each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from dtm_ray.core.components import ARCHITECTURES, KINDS  # noqa: E402
from dtm_ray.core.compress import compress  # noqa: E402
from dtm_ray.core.state import Link, ModelState  # noqa: E402
from dtm_ray.engines.session import EngineSession  # noqa: E402
from dtm_ray.engines.vllm import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = ARCHITECTURES["LlamaForCausalLM"]  # kind -> weight name pattern
NAMES = [LLAMA[kind].format(layer=layer) for layer in (0, 1) for kind in KINDS]
SPECS = ["magnitude:0.5", "wanda:0.5", "int8", "int4-g128"]
N_PREFIX, N_NEW = 8, 16


def _norm(in_features: int) -> np.ndarray:
    return np.random.default_rng(in_features).uniform(0.5, 2.0, in_features).astype(np.float32)


def by_spec_against_reference(engine: VLLMEngine) -> list[str]:
    """Every weight x spec: the digest (per rank) after a probe by spec in the workers equals the
    one after loading the weight computed here, and the restore (from the checkpoint file, read by
    the ranks) and the put-back (from the ranks' copies) give back the dense digest with no weight
    sent. Returns the failures."""
    dense = engine.params_digest()
    failures = []
    for name in NAMES:
        original = engine.original_weight(name)
        norm = _norm(original.shape[1])
        for spec in SPECS:
            link = Link(spec, None, norm if spec.startswith("wanda") else None)
            engine.set_weights({name: compress(original, spec, link.stats)})
            reference = engine.params_digest()
            sent = engine.weight_bytes_sent
            engine.restore([name])  # the ranks read the original themselves
            if engine.params_digest() != dense:
                failures.append(f"{name} {spec}: restore not bit-identical")
            engine.compress_in_place({name: (link,)}, keep=True)
            in_workers = engine.params_digest()
            engine.put_back([name])
            if engine.weight_bytes_sent != sent:
                failures.append(f"{name} {spec}: weights sent")
            if in_workers != reference or reference == dense:
                failures.append(f"{name} {spec}: not the reference weight")
            if engine.params_digest() != dense:
                failures.append(f"{name} {spec}: put-back not bit-identical")
    return failures


def record(model_dir: Path, tp: int) -> dict:
    """What the TP comparison reads, from one engine of `tp` ranks."""
    engine = VLLMEngine(model_dir, dtype="float32", tensor_parallel_size=tp)
    try:
        out: dict = {"by_spec": by_spec_against_reference(engine)}
        session = EngineSession(engine)
        rng = np.random.default_rng(0)
        prefixes = rng.integers(3, 40000, size=(6, N_PREFIX))
        calibration = rng.integers(3, 40000, size=(4, 24))
        out["norms"] = session.input_norms(calibration, NAMES)
        sent = engine.weight_bytes_sent
        for round_ in (0, 1):
            session.apply_state(state_of_round(round_, out["norms"]))
            reference = session.build_reference(prefixes, N_NEW)
            out[round_, "reference"] = reference.continuation, reference.base_argmax
            for name in NAMES:
                for spec in PROBE_SPECS[round_]:
                    result = session.probe({name: spec}, reference, out["norms"])
                    out[round_, name, spec] = result.fdt
            out[round_, "skip"] = engine.skip_counts  # the last probe: layer 1, from layer 1
            out[round_, "zeros"] = session.zero_shares(NAMES)
        out["probe_bytes"] = engine.weight_bytes_sent - sent
        # Layer skip at this TP: a pass from layer 1 on the kept stream equals a full pass.
        seqs = reference.sequences.tolist()
        engine.score(seqs, N_PREFIX, keep_residuals=True)
        engine.compress_in_place({NAMES[-1]: (Link("magnitude:0.9"),)}, keep=True)
        out["full"] = engine.score(seqs, N_PREFIX)
        out["skipped"] = engine.score(seqs, N_PREFIX, from_layer=1)
        engine.put_back([NAMES[-1]])
        return out
    finally:
        engine.close()


def state_of_round(round_: int, norms: dict[str, np.ndarray]) -> ModelState:
    """Round 0: the dense model; round 1: every weight pruned 30 % by magnitude, and layer 1's
    o and down by wanda on top (with the calibration norms), as a 2-round sparsify leaves it."""
    if round_ == 0:
        return ModelState()
    chains = {name: (Link("magnitude:0.3"),) for name in NAMES}
    for name in NAMES[7:]:
        if "o_proj" in name or "down_proj" in name:
            chains[name] += (Link("wanda:0.5", 1, norms[name]),)
    return ModelState(chains)


# What each round probes on every weight (a TP 2 scoring pass costs ~1 s on 2 busy cores).
PROBE_SPECS = [("magnitude:0.5", "int8"), ("wanda:0.5",)]


@pytest.fixture(scope="module")
def runs(tiny_llama_dir: Path, one_thread) -> dict[int, dict]:
    return {tp: record(tiny_llama_dir, tp) for tp in (1, 2)}


@pytest.mark.parametrize("tp", [1, 2])
def test_probes_by_spec_in_the_workers_are_the_reference_weights(runs, tp) -> None:
    assert runs[tp]["by_spec"] == []
    assert runs[tp]["probe_bytes"] == 0  # probes and state changes sent no weight


def test_tensor_parallel_scores_equal_one_rank(runs) -> None:
    one, two = runs[1], runs[2]
    compared = diverging = 0
    for key, value in one.items():
        if isinstance(key, tuple) and len(key) == 3:
            np.testing.assert_array_equal(two[key], value, err_msg=str(key))
            compared += value.size
            diverging += int((value < N_NEW).any())
        elif isinstance(key, tuple) and key[1] in ("reference", "zeros", "skip"):
            if key[1] == "reference":
                for a, b in zip(one[key], two[key], strict=True):
                    np.testing.assert_array_equal(a, b)
            elif key[1] == "zeros":
                assert one[key] == two[key]
            else:  # one model step, skipped, on every rank
                assert one[key] == [(1, 0)] and two[key] == [(1, 0), (1, 0)]
    print(f"\nTP 2 vs 1: FDT equal on {compared} (probe, prompt) pairs; {diverging} probes diverge")
    assert diverging >= 15  # the probes change outputs, so equality is not trivial


def test_tensor_parallel_input_norms_equal_one_rank(runs) -> None:
    worst = 0.0
    for name, norm in runs[1]["norms"].items():
        other = runs[2]["norms"][name]
        np.testing.assert_allclose(other, norm, rtol=1e-5, atol=1e-6, err_msg=name)
        worst = max(worst, float(np.max(np.abs(other - norm) / norm)))
    print(f"\ninput norms TP 2 vs 1: max relative difference {worst:.2e}")


@pytest.mark.parametrize("tp", [1, 2])
def test_layer_skip_under_tensor_parallelism_equals_a_full_pass(runs, tp) -> None:
    full, skipped = runs[tp]["full"], runs[tp]["skipped"]
    for field in ("argmax", "margin", "ref_logprob"):
        np.testing.assert_array_equal(getattr(skipped, field), getattr(full, field))


def test_probes_by_spec_in_bfloat16_are_the_reference_weights(tiny_llama_dir: Path) -> None:
    engine = VLLMEngine(tiny_llama_dir, dtype="bfloat16")
    try:
        assert by_spec_against_reference(engine) == []
        name = NAMES[0]
        engine.compress_in_place({name: (Link("int8"),)})  # a state change: nothing kept
        held = compress(engine.original_weight(name), "int8")
        assert engine.nonzero_counts([name]) == {name: int(torch.count_nonzero(held))}
    finally:
        engine.close()
