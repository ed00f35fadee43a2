"""What serving engines can load, from component shapes and levels alone (no torch): vLLM's fused
shards, the GPU Marlin kernel's shape limits and the CPU build's int4-only, bf16/fp16-only path."""

from __future__ import annotations

from dtm_ray.core.components import components_from_config
from dtm_ray.core.serving import (
    fused_group_of,
    fused_groups,
    fused_name,
    marlin_problem,
    serving_notes,
)

# SmolLM2-135M's shapes: hidden 576 (not a multiple of 128), 9 heads of 64, 3 KV heads.
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 2,
}
COMPONENTS = components_from_config(SMOLLM2)


def test_fused_groups_follow_vllms_fused_layers():
    groups = fused_groups(COMPONENTS)
    assert list(groups)[:4] == [
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_up_proj",
        "model.layers.0.mlp.down_proj.weight",
    ]
    assert [c.kind for c in groups["model.layers.0.self_attn.qkv_proj"]] == ["q", "k", "v"]
    assert [c.kind for c in groups["model.layers.1.mlp.gate_up_proj"]] == ["gate", "up"]
    assert len(groups) == 2 * 4
    assert fused_name(COMPONENTS[3]) == COMPONENTS[3].name  # o_proj moves alone


def test_a_probe_of_exactly_one_fused_group_is_named_by_it():
    q, k, v, o, gate, up = (c.name for c in COMPONENTS[:6])
    assert fused_group_of([q, k, v]) == "model.layers.0.self_attn.qkv_proj"
    assert fused_group_of([gate, up]) == "model.layers.0.mlp.gate_up_proj"
    other_q = COMPONENTS[7].name  # layer 1's q
    for not_one_group in ([q], [q, k], [q, k, v, o], [q, k, other_q], [o, gate], [gate, up, up]):
        assert fused_group_of(not_one_group) is None, not_one_group


def test_marlin_limits():
    assert marlin_problem((576, 1536), "int4-g64") is None  # down_proj fits
    assert marlin_problem((576, 576), "int4-g64") == "in_features 576 % 128 != 0"
    assert marlin_problem((1536, 576), "int4-g16") == (
        "group 16 not in 32/64/128, in_features 576 % 128 != 0"
    )
    assert marlin_problem((192, 512), "int8") is None
    assert marlin_problem((100, 512), "int8") == "out_features 100 % 64 != 0"
    assert marlin_problem((100, 100), "fp8-e4m3") is None


def test_notes_name_what_each_engine_cannot_load():
    by_kind = {c.name: c for c in COMPONENTS}
    levels = {name: "int4-g64" for name in by_kind}
    notes = serving_notes(COMPONENTS, levels, "bfloat16")
    assert notes["vllm"] == [] and notes["vllm_cpu"] == []
    (marlin,) = notes["vllm_gpu_marlin"]  # everything reading the 576-wide hidden state
    assert marlin.startswith("no Marlin kernel (int4-g64 in_features 576 % 128 != 0): ")
    assert marlin.endswith(" and 8 more") and "down_proj" not in marlin

    levels["model.layers.1.self_attn.k_proj.weight"] = "int8"
    levels["model.layers.0.mlp.up_proj.weight"] = None
    notes = serving_notes(COMPONENTS, levels, "float32")
    assert notes["vllm"] == [
        "model.layers.0.mlp.gate_up_proj: fused shards differ (gate int4-g64, up dense); "
        "vLLM cannot load it",
        "model.layers.1.self_attn.qkv_proj: fused shards differ (q int4-g64, k int8, "
        "v int4-g64); vLLM cannot load it",
    ]
    assert notes["vllm_cpu"] == [
        "no CPU kernel for int8 weight-only (the CPU build runs int4 only)",
        "the CPU build runs quantized weights in bf16/fp16, not float32",
    ]
