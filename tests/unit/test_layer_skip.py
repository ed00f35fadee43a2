"""Layer skip in the hf engine and the session: a probe on layer L that starts from the kept
residual stream at L scores bit-identically to a full pass, on the real SmolLM2 (30 layers), and
the session never uses a stream kept for another state or reference."""

from __future__ import annotations

import numpy as np
import pytest

from dtm_ray.core.compress import compress
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.probe import build_reference
from dtm_ray.engines.session import EngineSession

pytestmark = pytest.mark.usefixtures("one_thread")

PROBES = [  # layer, weight, spec: shallow to deep, attention and MLP
    (1, "model.layers.1.mlp.down_proj.weight", "magnitude:0.9"),
    (7, "model.layers.7.self_attn.k_proj.weight", "int4-g64"),
    (15, "model.layers.15.self_attn.q_proj.weight", "magnitude:0.8"),
    (29, "model.layers.29.mlp.up_proj.weight", "magnitude:0.9"),
]


def fields(scored) -> tuple[np.ndarray, ...]:
    return scored.argmax, scored.margin, scored.ref_logprob


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    return np.random.default_rng(0).integers(3, 49000, size=(5, 24)).tolist()


# The `hf_engine` fixture: SmolLM2 in batches of 2. Over 5 sequences: the kept stream is per
# batch, the last one ragged.
HF_ENGINE = {"model": "smollm2", "batch_size": 2}


def test_a_pass_from_layer_l_is_bit_identical_to_a_full_pass(hf_engine, sequences) -> None:
    dense = hf_engine.score(sequences, 8, keep_residuals=True)
    diverged = 0
    for layer, name, spec in PROBES:
        hf_engine.set_weights({name: compress(hf_engine.original_weight(name), spec)})
        full = hf_engine.score(sequences, 8)
        skipped = hf_engine.score(sequences, 8, from_layer=layer)
        hf_engine.restore([name])
        for a, b in zip(fields(full), fields(skipped), strict=True):
            np.testing.assert_array_equal(a, b)
        diverged += int((full.argmax != dense.argmax).any())
    assert diverged >= 2  # the edits changed outputs, so equality is not trivial
    # The kept stream survives the probes: the unedited model from layer 20 is the dense model.
    for a, b in zip(
        fields(dense), fields(hf_engine.score(sequences, 8, from_layer=20)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_a_small_budget_keeps_every_kth_layer_and_stays_exact(smollm2_dir, sequences) -> None:
    per_layer = 5 * 24 * 576 * 4  # sequences x tokens x hidden x float32
    engine = HFEngine(smollm2_dir, batch_size=5, residual_cache_bytes=per_layer * 6)
    engine.score(sequences, 8, keep_residuals=True)
    assert engine._residuals.layers == [0, 5, 10, 15, 20, 25]
    layer, name, spec = PROBES[2]
    engine.set_weights({name: compress(engine.original_weight(name), spec)})
    full, skipped = engine.score(sequences, 8), engine.score(sequences, 8, from_layer=layer)
    for a, b in zip(fields(full), fields(skipped), strict=True):
        np.testing.assert_array_equal(a, b)


def test_from_layer_refuses_sequences_it_kept_nothing_for(hf_engine, sequences) -> None:
    hf_engine.score(sequences, 8, keep_residuals=True)
    other = [row[::-1] for row in sequences]
    with pytest.raises(ValueError, match="residual stream kept for these same sequences"):
        hf_engine.score(other, 8, from_layer=3)
    off = HFEngine.__new__(HFEngine)
    off.residual_cache_bytes, off._layer_of = 0, {"model.layers.3.mlp.up_proj.weight": 3}
    assert off.layer_of("model.layers.3.mlp.up_proj.weight") is None  # budget 0: skip off


def test_session_probes_with_layer_skip_equal_probes_without(smollm2_dir) -> None:
    """Across state changes and two references, as a round's actor sees them."""
    skipping = EngineSession(HFEngine(smollm2_dir, batch_size=4))
    plain = EngineSession(HFEngine(smollm2_dir, batch_size=4, residual_cache_bytes=0))
    prefixes = np.random.default_rng(1).integers(3, 49000, size=(4, 8))
    references = [build_reference(plain.engine, prefixes, 12)]
    states = [
        ModelState(),
        # A state that changes layer 5: a stream kept before it must not serve probes after it.
        ModelState({"model.layers.5.mlp.down_proj.weight": (Link("magnitude:0.9"),)}),
    ]
    plain.apply_state(states[1])
    references.append(plain.build_reference(prefixes, 12))  # the pruned model's own text
    compared = 0
    for state in states:
        for reference in references:
            for session in (skipping, plain):
                session.apply_state(state)
            for _, name, spec in PROBES[1:]:
                a = skipping.probe({name: spec}, reference)
                b = plain.probe({name: spec}, reference)
                np.testing.assert_array_equal(a.fdt, b.fdt)
                np.testing.assert_array_equal(a.sdt, b.sdt)
                np.testing.assert_array_equal(a.margin, b.margin)
                compared += 1
    assert compared == 12
    assert skipping.engine._residuals is not None and plain.engine._residuals is None
