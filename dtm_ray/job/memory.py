"""The memory a job needs, per engine actor (on its GPU and in host memory) and per node, from the
model's config.json and the job alone: what `dtm-ray plan` prints before anything starts, and
what refuses a job that cannot fit the resources it declares.

Every figure is an upper bound from these formulas (b = bytes per value of the engine dtype;
P prompts of S = prefix + N tokens, T = P x S; H hidden size, L layers, V vocabulary; W the
model's parameters; TP the tensor-parallel size):

- weights: W x b / TP per GPU (on a CPU engine, in host memory).
- kept residual stream (layer skip): one layer's input is T x H x b (the hf engine; vLLM keeps
  hidden and residual, twice that); every layer's when L of them fit `residual_cache_bytes`,
  else every k-th, k = ceil(L x layer / budget). With k >= L only layer 0's input is kept and a
  probe always runs the whole model: layer skip is inactive. On a GPU a stream too large for
  that budget goes to pinned host memory (`residual_host_bytes`) instead; every vLLM rank keeps
  the whole stream there, so TP ranks share that budget and an actor holds TP copies.
- one step, the larger of (activations are freed before the lm_head runs):
  its logits in the model's dtype, in float32 and their log-softmax: B x N x V x (8 + b, or 8 in
  float32) for hf (B = min(P, `batch_size`)); vLLM's scoring hook holds the sequences of one
  scheduler step (about 8192 tokens) instead of B;
  its activations: tokens of the step x (2 x intermediate + 4 x H) x b;
  with `compress.guide: fisher`, a guide round's forward + backward pass over one calibration
  batch instead (C = min(calibration_count, 8) sequences of S tokens): what autograd saves per
  layer and token, (4 x intermediate + 9 x H) x b, times L x C x S, plus the loss's logits,
  C x S x V x 12 bytes (measured on SmolLM2 in float32 and bfloat16: 4.0 x intermediate + 6.7 x H
  and 11.6 x H values per layer, 12.0 bytes per logit), and the candidates' float32 weight
  changes up to `SENSITIVITY_DELTA_BYTES` (at least the largest weight's).
- an edit in place (a probe, or one link of a state change; no weight crosses a process): the
  weight gathered whole from the ranks, the copy of the rank's shard it puts back, and
  compression's float32 temporaries: w x b + w x b / TP + 3 x w x 4 (w the largest component).
- originals read back from the checkpoint when a chain changes otherwise than by one link
  (`original_cache_bytes`, host), at most the selected components' bytes.
- per process (Python, torch, vLLM, CUDA context): about 1 GiB of host memory; a vLLM actor runs
  2 processes at TP = 1 (actor, engine core), 2 + TP above.
- vLLM on a GPU reserves `gpu_memory_utilization` of the GPU (weights, activations and its KV
  cache inside it); what dtm_ray keeps there (residual stream, copies, push batch) must fit in
  the rest of that reservation beside the weights.

No Ray, no torch: the driver computes this before any engine exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtm_ray.core.components import Component
from dtm_ray.engines.config import FISHER_BATCH_SIZE, SENSITIVITY_DELTA_BYTES, residual_keep
from dtm_ray.errors import ConfigError
from dtm_ray.job.spec import JobConfig

GIB = 1 << 30
PROCESS_BYTES = 1 * GIB  # host memory of one Python process with torch (and vLLM) loaded
VLLM_STEP_TOKENS = 8192  # tokens vLLM's scheduler puts in one step by default
# GPU memory by Ray's accelerator_type resource name (the job may declare one).
GPU_BYTES = {
    "A100-40G": 40 * GIB,
    "A100-80G": 80 * GIB,
    "A10G": 24 * GIB,
    "L4": 24 * GIB,
    "L40S": 48 * GIB,
    "H100": 80 * GIB,
    "H200": 141 * GIB,
}
DEFAULT_NODE_GPUS = 8  # GPUs per node when the job does not say: an 8-GPU node


@dataclass
class MemoryPlan:
    """Bytes per item: `device` per GPU of one actor (None on CPU engines), `host` per actor."""

    device: list[tuple[str, int]] | None
    host: list[tuple[str, int]]
    actors_per_node: int
    gpu_bytes: int | None  # one GPU's memory, when known
    gpu_reserved: float | None  # vLLM's share of the GPU; None: the engine takes what it needs
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why the job cannot fit what it declares

    @property
    def device_total(self) -> int:
        return sum(b for _, b in self.device or [])

    @property
    def host_total(self) -> int:
        return sum(b for _, b in self.host)

    @property
    def node_host(self) -> int:
        return self.actors_per_node * self.host_total


def _dtype_bytes(job: JobConfig, on_gpu: bool) -> int:
    dtype = job.dtype if job.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    return 4 if dtype == "float32" else 2


def model_weights(config: Mapping[str, Any], linear: Sequence[Component]) -> int:
    """Parameters of the whole model: its linear weights (`linear`: every one, selected or not),
    the embeddings (one matrix when tied), the norms."""
    hidden, vocab = int(config["hidden_size"]), int(config.get("vocab_size", 0))
    layers = int(config["num_hidden_layers"])
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return sum(c.params for c in linear) + embeddings + (2 * layers + 1) * hidden


def memory_plan(
    config: Mapping[str, Any],
    job: JobConfig,
    selected: Sequence[Component],
    every: Sequence[Component],
    gpu_bytes: int | None = None,
    node_gpus: int | None = None,
) -> MemoryPlan:
    """The memory `job` needs on the model of `config`: `selected` are its components, `every`
    the model's linear weights (for the model's size). `gpu_bytes`: one GPU's memory, else read
    from an `accelerator_type:` resource the job declares. `node_gpus`: GPUs per node."""
    engine = job.engine_config()
    gpus = float(job.resources_per_worker.get("GPU", 0))
    on_gpu = gpus > 0
    tp = engine.tensor_parallel_size
    b = _dtype_bytes(job, on_gpu)
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    vocab = int(config.get("vocab_size", 0))
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    n_new = job.new_tokens
    sequence = job.prompts.prefix_tokens + n_new
    tokens = job.prompts.count * sequence
    vllm = engine.kind == "vllm"
    warnings: list[str] = []

    weights = model_weights(config, every) * b
    largest = max((c.params for c in selected), default=0)  # values of the largest weight
    selected_bytes = sum(c.params for c in selected) * b

    # The residual stream layer skip keeps.
    eager = engine.enforce_eager if engine.enforce_eager is not None else not on_gpu
    per_layer = (2 if vllm else 1) * tokens * hidden * b
    residual, residual_on_host = 0, False
    if engine.residual_cache_bytes <= 0:
        warnings.append("layer skip is off (residual_cache_bytes: 0): every probe runs all layers")
    elif vllm and not eager:
        warnings.append(
            "layer skip is off: vLLM runs CUDA graphs (set engine_options.enforce_eager: true "
            "to keep the residual stream; graphs may still be faster, measure both)"
        )
    else:
        # A stream too large for the GPU budget is kept in pinned host memory; every vLLM rank
        # keeps the whole stream, so an actor's ranks share the host budget.
        host_budget = engine.residual_host_bytes // (tp if vllm else 1) if on_gpu else 0
        stride, residual_on_host = residual_keep(
            per_layer, layers, engine.residual_cache_bytes, host_budget
        )
        kept = math.ceil(layers / stride)
        residual = kept * per_layer
        if stride >= layers:
            warnings.append(
                f"layer skip is inactive: one layer's residual stream ({_gib(per_layer)}) is "
                f"more than its budget, so only layer 0's input is kept; "
                f"{_gib(per_layer * layers)} would keep every layer"
            )
        elif stride > 1:
            warnings.append(
                f"layer skip keeps one layer input in {stride} ({kept} of {layers}): "
                f"a budget of {_gib(per_layer * layers)} would keep them all"
            )

    batch = min(job.prompts.count, engine.batch_size)
    step_tokens = min(tokens, VLLM_STEP_TOKENS) if vllm else batch * sequence
    step_sequences = max(1, step_tokens // sequence)
    logits = step_sequences * n_new * vocab * (8 if b == 4 else 8 + b)
    activations = step_tokens * (2 * intermediate + 4 * hidden) * b
    step = ("logits or activations of one step", max(logits, activations))
    compress = job.compress
    if compress is not None and compress.guide == "fisher":
        fisher = fisher_pass_bytes(config, job, selected, b)
        if fisher > step[1]:
            step = ("fisher's backward pass (one calibration batch)", fisher)
    originals = min(engine.original_cache_bytes, selected_bytes)
    edit = largest * b + largest * b // tp + 3 * largest * 4

    engine_side = [
        ("weights", weights // tp),
        ("kept residual stream", 0 if residual_on_host else residual),
        step,
        ("an edit in place (weight, copy, temporaries)", edit),
    ]
    processes = (2 + (tp if tp > 1 else 0)) if vllm else 1
    host = [("processes (Python, torch" + (", vLLM)" if vllm else ")"), processes * PROCESS_BYTES)]
    host.append(("originals read back", originals))
    if vllm and not on_gpu:
        host.append(("KV cache", engine.cpu_kv_cache_bytes))
    if residual_on_host:
        host.append(("kept residual stream, pinned", residual * (tp if vllm else 1)))

    if on_gpu:
        device = engine_side
    else:
        device = None
        host = engine_side + host

    gpu_bytes = gpu_bytes or _declared_gpu_bytes(job.resources_per_worker)
    per_node = (node_gpus or DEFAULT_NODE_GPUS) // max(1, math.ceil(gpus)) if on_gpu else 1
    plan = MemoryPlan(
        device=device,
        host=host,
        actors_per_node=max(1, min(per_node, job.workers)) if on_gpu else job.workers,
        gpu_bytes=gpu_bytes,
        gpu_reserved=engine.gpu_memory_utilization if vllm and on_gpu else None,
        warnings=warnings,
    )
    plan.problems = _problems(plan, job)
    return plan


def fisher_pass_bytes(
    config: Mapping[str, Any], job: JobConfig, selected: Sequence[Component], b: int
) -> int:
    """The memory of the fisher guide's forward + backward pass over one calibration batch:
    what autograd saves, the loss's logits and the candidates' weight changes (formula in the
    module docstring)."""
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    intermediate = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 0))
    count = job.compress.calibration_count if job.compress else None
    tokens = min(count or FISHER_BATCH_SIZE, FISHER_BATCH_SIZE) * (
        job.prompts.prefix_tokens + job.new_tokens
    )
    saved = tokens * layers * (4 * intermediate + 9 * hidden) * b
    logits = tokens * vocab * 12
    largest = max((c.params for c in selected), default=0)
    deltas = max(4 * largest, min(SENSITIVITY_DELTA_BYTES, 4 * sum(c.params for c in selected)))
    return saved + logits + deltas


def _declared_gpu_bytes(resources: Mapping[str, float]) -> int | None:
    for key in resources:
        if key.startswith("accelerator_type:"):
            return GPU_BYTES.get(key.partition(":")[2])
    return None


def _problems(plan: MemoryPlan, job: JobConfig) -> list[str]:
    problems = []
    declared = job.resources_per_worker.get("memory")
    if declared and plan.host_total > declared:
        problems.append(
            f"each engine actor needs about {_gib(plan.host_total)} of host memory and "
            f"resources_per_worker.memory declares {_gib(int(declared))}"
        )
    if plan.device is not None and plan.gpu_bytes:
        usable = plan.gpu_bytes * (plan.gpu_reserved or 1.0)
        if plan.device_total > usable:
            share = f"{plan.gpu_reserved:.2f} of " if plan.gpu_reserved else ""
            problems.append(
                f"each GPU needs about {_gib(plan.device_total)} and has {_gib(int(usable))} "
                f"({share}{_gib(plan.gpu_bytes)})"
            )
    return problems


def _gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def format_memory(plan: MemoryPlan) -> list[str]:
    """The plan as the lines `dtm-ray plan` prints."""
    lines = []
    if plan.device is not None:
        gpu = f" of {_gib(plan.gpu_bytes)}" if plan.gpu_bytes else ""
        lines.append(f"memory per GPU of an engine actor: {_gib(plan.device_total)}{gpu}")
        lines += [f"  {name:<40} {_gib(n):>10}" for name, n in plan.device if n]
        if plan.gpu_reserved:
            lines.append(
                f"  (vLLM reserves {plan.gpu_reserved:.2f} of the GPU and fills the rest of its "
                "share with KV cache)"
            )
    lines.append(f"host memory per engine actor: {_gib(plan.host_total)}")
    lines += [f"  {name:<40} {_gib(n):>10}" for name, n in plan.host if n]
    lines.append(
        f"host memory per node: {_gib(plan.node_host)} ({plan.actors_per_node} actor(s) per node)"
    )
    lines += [f"warning: {w}" for w in plan.warnings]
    return lines


def refuse_unless_fits(plan: MemoryPlan) -> None:
    """Raise ConfigError (one line) when the plan does not fit the memory declared for it."""
    if plan.problems:
        raise ConfigError(
            "; ".join(plan.problems) + " (see `dtm-ray plan`; lower engine_options budgets, or "
            "declare more)"
        )


def check_memory(
    job: JobConfig,
    config: Mapping[str, Any],
    selected: Sequence[Component],
    every: Sequence[Component],
) -> None:
    """Refuse, in one line, a job that cannot fit the memory its resources declare."""
    refuse_unless_fits(memory_plan(config, job, selected, every))
