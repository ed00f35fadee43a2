"""The memory plan (`dtm_ray.job.memory`): its formulas on the shapes of real models, its warnings
where layer skip cannot work, and the one-line refusal of a job that cannot fit what it declares.
No torch, no engine: the plan runs before either exists."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from dtm_ray.core.components import components_from_config
from dtm_ray.engines.config import residual_stride
from dtm_ray.job.memory import GIB, PROCESS_BYTES, memory_plan, model_weights
from dtm_ray.job.spec import JobConfig, PromptsConfig

LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "num_hidden_layers": 40,
    "vocab_size": 32000,
}
LLAMA2_70B = {
    **LLAMA2_13B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
}


def job(**changes) -> JobConfig:
    base = dict(
        model="m",
        engine="vllm",
        dtype="bfloat16",
        prompts=PromptsConfig(count=512, prefix_tokens=32),
        new_tokens=256,
        workers=8,
        resources_per_worker={"GPU": 1},
    )
    return JobConfig(**{**base, **changes})


def items(pairs) -> dict[str, int]:
    return dict(pairs or [])


def test_model_size_is_the_published_parameter_count() -> None:
    every = components_from_config(LLAMA2_13B)
    assert model_weights(LLAMA2_13B, every) == pytest.approx(13.016e9, rel=1e-3)
    every = components_from_config(LLAMA2_70B)
    assert model_weights(LLAMA2_70B, every) == pytest.approx(68.977e9, rel=1e-3)


def test_the_model_term_is_the_checkpoints_size(tiny_llama_dir: Path) -> None:
    """Against the stored tensors themselves: every value of the checkpoint at 4 bytes."""
    import json

    with safe_open(tiny_llama_dir / "model.safetensors", "pt") as f:
        stored = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    every = components_from_config(config)
    cpu = job(engine="hf", dtype="float32", resources_per_worker={"CPU": 1})
    assert items(memory_plan(config, cpu, every, every).host)["weights"] == 4 * stored


def test_13b_on_one_gpu_per_actor() -> None:
    every = components_from_config(LLAMA2_13B)
    plan = memory_plan(
        LLAMA2_13B, job(engine_options={"enforce_eager": True}), every, every, gpu_bytes=80 * GIB
    )
    device = items(plan.device)
    assert device["weights"] == model_weights(LLAMA2_13B, every) * 2
    # vLLM keeps hidden and residual: 2 x 512 x 288 x 5120 x 2 bytes = 2.8 GiB per layer, more
    # than the 2 GiB GPU budget; pinned host memory (32 GiB) keeps every 4th layer's, 10 of 40,
    # as the engine itself would decide with the same budgets.
    per_layer = 2 * 512 * 288 * 5120 * 2
    assert residual_stride(per_layer, 40, 2 * GIB) >= 40
    assert residual_stride(per_layer, 40, 32 * GIB) == 4
    assert device["kept residual stream"] == 0
    assert items(plan.host)["kept residual stream, pinned"] == 10 * per_layer
    assert any("keeps one layer input in 4 (10 of 40)" in w for w in plan.warnings)
    # Without the host budget only layer 0's input fits: layer skip is inactive.
    options = {"enforce_eager": True, "residual_host_bytes": 0}
    no_host = memory_plan(LLAMA2_13B, job(engine_options=options), every, every)
    assert items(no_host.device)["kept residual stream"] == per_layer
    assert any("layer skip is inactive" in w for w in no_host.warnings)
    # The largest 13B weight (an MLP matrix, 5120 x 13824): gathered, its copy, float32 temporaries.
    w = 5120 * 13824
    assert device["an edit in place (weight, copy, temporaries)"] == 2 * w + 2 * w + 3 * w * 4
    host = items(plan.host)
    assert host["processes (Python, torch, vLLM)"] == 2 * PROCESS_BYTES
    assert host["originals read back"] == 2 * GIB  # the budget; every weight is 24 GiB
    assert plan.actors_per_node == 8
    assert plan.node_host == 8 * plan.host_total
    assert plan.problems == []  # 80 GB x 0.85 holds 26 GB of weights and the rest


def test_cuda_graphs_turn_layer_skip_off_and_a_big_budget_keeps_every_layer() -> None:
    every = components_from_config(LLAMA2_13B)
    graphs = memory_plan(LLAMA2_13B, job(), every, every)
    assert items(graphs.device)["kept residual stream"] == 0
    assert any("CUDA graphs" in w for w in graphs.warnings)
    budget = 120 * GIB
    eager = job(engine_options={"enforce_eager": True, "residual_cache_bytes": budget})
    kept = memory_plan(LLAMA2_13B, eager, every, every, gpu_bytes=80 * GIB)
    assert items(kept.device)["kept residual stream"] == 40 * 2 * 512 * 288 * 5120 * 2
    assert not any("layer skip" in w for w in kept.warnings)
    # ... which no 80 GB GPU holds: the plan says so, naming both sizes.
    assert kept.problems and "each GPU needs about" in kept.problems[0]
    assert "(0.85 of 80.0 GiB)" in kept.problems[0]


def test_70b_with_tensor_parallelism_splits_the_weights_not_the_host_copies() -> None:
    every = components_from_config(LLAMA2_70B)
    four = job(
        engine_options={"tensor_parallel_size": 4}, resources_per_worker={"GPU": 4}, workers=2
    )
    plan = memory_plan(LLAMA2_70B, four, every, every, gpu_bytes=80 * GIB)
    assert items(plan.device)["weights"] == model_weights(LLAMA2_70B, every) * 2 // 4
    assert plan.actors_per_node == 2  # 8 GPUs per node, 4 per actor
    host = items(plan.host)
    assert host["processes (Python, torch, vLLM)"] == (2 + 4) * PROCESS_BYTES
    # A rank gathers the whole weight but keeps a copy of its own quarter only.
    w = 8192 * 28672
    assert items(plan.device)["an edit in place (weight, copy, temporaries)"] == (
        2 * w + 2 * w // 4 + 3 * w * 4
    )
    assert plan.problems == []  # 34.5 GB of weights per GPU


def test_a_cpu_engine_holds_everything_in_host_memory_and_the_declared_memory_is_checked() -> None:
    every = components_from_config(LLAMA2_13B)[:7]  # one layer's worth of components
    cpu = job(
        engine="hf",
        dtype="float32",
        resources_per_worker={"CPU": 2, "memory": 4 * GIB},
        prompts=PromptsConfig(count=16, prefix_tokens=16),
        new_tokens=32,
        workers=2,
    )
    plan = memory_plan(LLAMA2_13B, cpu, every, every)
    assert plan.device is None
    host = items(plan.host)
    assert host["weights"] == model_weights(LLAMA2_13B, every) * 4
    # batch_size 16 of the hf engine: float32 logits and their log-softmax at the 32 new tokens,
    # or the MLP's activations over all 48 tokens, whichever is larger (here the activations).
    logits, activations = 16 * 32 * 32000 * 8, 16 * 48 * (2 * 13824 + 4 * 5120) * 4
    assert host["logits or activations of one step"] == max(logits, activations) == activations
    assert plan.node_host == 2 * plan.host_total  # CPU workers share the machine
    assert plan.problems == [
        f"each engine actor needs about {plan.host_total / GIB:.1f} GiB of host memory and "
        "resources_per_worker.memory declares 4.0 GiB"
    ]


@pytest.mark.parametrize("prompts, new_tokens, measured_gib", [(64, 64, 4.3), (512, 256, 43.5)])
def test_the_plan_matches_the_gpu_peak_measured_on_an_h100(prompts, new_tokens, measured_gib):
    """bench/checks/gpu_check.py on one H100 (1.1 B random Llama, bf16, hf engine, all prompts in
    one batch, probes of q and down in layers 1/11/21) measured these peaks of allocated memory."""
    config = {
        **LLAMA2_13B,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_hidden_layers": 22,
    }
    every = components_from_config(config)
    probed = [c for c in every if c.kind in ("q", "down") and c.layer in (1, 11, 21)]
    gpu = job(
        engine="hf",
        prompts=PromptsConfig(count=prompts, prefix_tokens=32),
        new_tokens=new_tokens,
        engine_options={"batch_size": prompts, "residual_host_bytes": 0},
    )
    plan = memory_plan(config, gpu, probed, every, gpu_bytes=80 * GIB)
    assert plan.device_total / GIB == pytest.approx(measured_gib, rel=0.1)


def test_the_hf_engine_on_a_gpu_keeps_a_large_stream_in_pinned_host_memory() -> None:
    every = components_from_config(LLAMA2_13B)
    hf = job(engine="hf", engine_options={"batch_size": 32})
    plan = memory_plan(LLAMA2_13B, hf, every, every, gpu_bytes=80 * GIB)
    per_layer = 512 * 288 * 5120 * 2  # 1.4 GiB: the 2 GiB GPU budget keeps 1 layer in 40
    assert items(plan.device)["kept residual stream"] == 0
    # 32 GiB of pinned host memory keep every 2nd layer.
    assert items(plan.host)["kept residual stream, pinned"] == 20 * per_layer
    assert any("keeps one layer input in 2 (20 of 40)" in w for w in plan.warnings)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fisher_pass_is_counted_and_bounds_the_memory_it_takes(smollm2_dir: Path, dtype):
    """The plan's fisher line against the tensor memory of the real forward + backward pass
    (`fisher_values`' own pass, every linear weight hooked) on SmolLM2, measured op by op."""
    import json

    import torch
    from support.torch_memory import PeakMemory
    from transformers import AutoModelForCausalLM

    from dtm_ray.engines.sensitivity import _linears, _one_pass
    from dtm_ray.job.memory import fisher_pass_bytes
    from dtm_ray.job.spec import CompressConfig

    config = json.loads((smollm2_dir / "config.json").read_text())
    every = components_from_config(config)
    fisher = job(
        engine="hf",
        dtype=dtype,
        prompts=PromptsConfig(count=16, prefix_tokens=16),
        new_tokens=32,
        resources_per_worker={"CPU": 1},
        workers=1,
        compress=CompressConfig(method="sparsify", guide="fisher", calibration_count=16),
    )
    plan = items(memory_plan(config, fisher, every, every).host)
    predicted = fisher_pass_bytes(config, fisher, every, 4 if dtype == "float32" else 2)
    assert plan["fisher's backward pass (one calibration batch)"] == predicted

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=getattr(torch, dtype))
    model.requires_grad_(False).eval()
    names = [f"{c.name}" for c in every]
    linears = _linears(model, names)
    ids = torch.randint(0, 1000, (8, 48))  # the batch the plan assumes: 8 sequences of 16 + 32
    with PeakMemory([*model.parameters(), *model.buffers()]) as measured:
        _one_pass(model, ids, linears, {name: [] for name in names}, {})
    # The candidates' float32 ΔW, made before the pass: all of them fit SENSITIVITY_DELTA_BYTES.
    deltas = 4 * sum(c.params for c in every)
    assert deltas < 1 << 30
    assert measured.peak <= predicted - deltas <= 1.25 * measured.peak, (measured.peak, predicted)
