import pytest

from dtm_ray.core.components import (
    KINDS,
    UnsupportedArchitecture,
    components_from_config,
    select,
)
from dtm_ray.engines.models import load_components

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
}


def test_llama_7b_table_counts_params():
    comps = components_from_config(LLAMA_7B)
    assert len(comps) == 32 * 7
    by_name = {c.name: c for c in comps}
    q = by_name["model.layers.12.self_attn.q_proj.weight"]
    assert (q.layer, q.kind, q.shape) == (12, "q", (4096, 4096))
    down = by_name["model.layers.0.mlp.down_proj.weight"]
    assert down.shape == (4096, 11008)
    # Llama-2-7B: 6.48 B parameters in its linear layers (7B minus embeddings and norms).
    assert sum(c.params for c in comps) == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)


def test_gqa_shapes_for_smollm2(smollm2_dir):
    comps = load_components(smollm2_dir)
    assert len(comps) == 30 * 7
    shapes = {c.kind: c.shape for c in comps if c.layer == 0}
    assert shapes == {
        "q": (576, 576),
        "k": (192, 576),
        "v": (192, 576),
        "o": (576, 576),
        "gate": (1536, 576),
        "up": (1536, 576),
        "down": (576, 1536),
    }


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
def test_other_llama_family_architectures(arch):
    comps = components_from_config({**LLAMA_7B, "architectures": [arch], "num_key_value_heads": 8})
    assert comps[1].shape == (1024, 4096)  # k with 8 KV heads of 128


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitecture, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        components_from_config({**LLAMA_7B, "architectures": ["GPT2LMHeadModel"]})


def test_select_by_kind_layers_regex_and_name():
    comps = components_from_config(LLAMA_7B)
    assert len(select(comps, "all")) == 224
    chosen = select(comps, [{"kinds": ["q", "down"], "layers": [0, 1, 2]}])
    assert [(c.layer, c.kind) for c in chosen] == [
        (layer, kind) for layer in (0, 1, 2) for kind in ("q", "down")
    ]
    assert len(select(comps, [{"kinds": ["o"]}])) == 32
    assert len(select(comps, [{"layers": [31]}])) == 7
    regex = select(comps, ["re:model\\.layers\\.1\\d\\.mlp\\..*"])
    assert len(regex) == 30 and {c.kind for c in regex} == {"gate", "up", "down"}
    exact = select(comps, ["model.layers.5.self_attn.v_proj.weight"])
    assert [(c.layer, c.kind) for c in exact] == [(5, "v")]
    # Overlapping selectors give each component once, in model order.
    both = select(comps, [{"layers": [3]}, "model.layers.3.self_attn.q_proj.weight"])
    assert [c.kind for c in both] == list(KINDS)


@pytest.mark.parametrize(
    "selector, message",
    [
        ({"layers": [99]}, "matches no component"),
        ("model.layers.0.attn.q.weight", "matches no component"),
        ({"kinds": ["qkv"]}, "unknown kinds"),
        ({"layer": [1]}, "unknown"),
        ("re:([", "bad regex"),
        (3, "must be a weight name"),
    ],
)
def test_bad_selectors(selector, message):
    with pytest.raises(ValueError, match=message):
        select(components_from_config(LLAMA_7B), [selector])
