"""`dtm-ray plan JOB.yaml`: what a job will cost, before it runs.

The schedule (rounds, probes per round, tokens scored) follows from the job alone. Its time comes
from one of two cost models:

- calibrated (the default): start one engine actor, build the reference for all prompts on it
  and time a probe; a round then takes  reference / workers + ceil(probes / workers) x probe.
- FLOPs (`--no-calibrate`, and `dtm-ray run --dry-run`): 2 x model parameters FLOPs per token,
  over the tokens generated and scored, divided by a stated per-worker throughput. Generation is
  memory-bound on GPUs, so this is a floor there, not a forecast.

The schedule of a quantize search depends on what passes; the plan counts the fewest search
rounds (every candidate passes), and each skipped component adds one more.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from dtm_ray.core.decisions.sparsify import TARGET_TOLERANCE, probe_points, round_step
from dtm_ray.core.serving import fused_groups, serving_notes
from dtm_ray.core.state import concat_references
from dtm_ray.engines.config import residual_stride
from dtm_ray.engines.models import load_components
from dtm_ray.job.checks import Plan
from dtm_ray.job.spec import DEFAULT_PROBE_SPECS, ConfigError

# Throughput per worker assumed by the FLOP estimate (FLOP/s), per unit of its resources.
CPU_FLOPS_PER_CORE = 50e9  # fp32 matmul on one AVX2 core, about what the demo sees
GPU_FLOPS_PER_GPU = 100e12  # bf16 prefill on an A100/H100-class GPU at moderate utilization
REPORT_SECONDS = 3.0  # the plots and pages at the end of a run
EXPORT_BYTES_PER_SECOND = 200e6  # replaying chains and writing safetensors, on local disk


@dataclass
class RoundPlan:
    label: str  # "0", "1", ... or "final"
    probes: int
    reference: str  # "new": generated and scored; "reused": the dense one, scored once; "-"
    note: str = ""


@dataclass
class Costs:
    """Seconds on one engine actor."""

    startup: float  # Ray and one engine actor up, model loaded
    reference: float  # generate and score the reference of all prompts
    probe: float  # one probe (compress, score all prompts, restore)
    source: str  # how they were found


@dataclass
class Estimate:
    rounds: list[RoundPlan]
    costs: Costs
    workers: int
    seconds: list[float] = field(default_factory=list)  # per entry of `rounds`

    @property
    def total(self) -> float:
        return self.costs.startup + sum(self.seconds)


# --- the schedule --------------------------------------------------------------------------------
def sparsify_steps(target: float, step: float, start: float = 0.0) -> list[float]:
    """The relative step of each round from `start` sparsity to the target."""
    steps, overall = [], start
    while overall < target - TARGET_TOLERANCE:
        t = round_step(overall, target, step)
        steps.append(t)
        overall += t * (1.0 - overall)
    return steps


def schedule(plan: Plan) -> list[RoundPlan]:
    """The rounds a job will run, and the final evaluation of a compressing job."""
    components = len(plan.components)
    compress = plan.compress
    if compress is None:
        specs = plan.specs or DEFAULT_PROBE_SPECS
        return [
            RoundPlan("0", components * len(specs), "new", f"specs {', '.join(specs)}"),
            RoundPlan("finish", 0, "-", "report"),
        ]
    rounds: list[RoundPlan] = []
    if compress.method == "sparsify":
        if compress.guide == "uniform":
            rounds.append(
                RoundPlan("0", 0, "new", f"every component to {compress.target_sparsity}")
            )
        else:
            for index, t in enumerate(sparsify_steps(compress.target_sparsity, compress.step)):
                lo, hi = probe_points(t)
                reference = "new" if index == 0 or compress.reference == "current" else "reused"
                rounds.append(
                    RoundPlan(str(index), 2 * components, reference, f"added {lo:.3f}, {hi:.3f}")
                )
    else:
        workers = plan.job.workers
        index = 0
        if compress.fused:  # the units probed and searched are the fused groups
            components = len(fused_groups(plan.components))
        unit = "unit" if compress.fused else "component"
        for level in compress.levels:
            if compress.guide == "uniform":
                rounds.append(RoundPlan(str(index), 0, "new" if index == 0 else "-", level))
                index += 1
                continue
            rounds.append(
                RoundPlan(
                    str(index),
                    components,
                    "new" if index == 0 else "-",
                    f"{level}: rank every {unit}",
                )
            )
            index += 1
            searches = math.ceil(components / workers)
            for _ in range(searches):
                rounds.append(RoundPlan(str(index), workers, "-", f"{level}: search"))
                index += 1
    rounds.append(RoundPlan("final", 0, "-", "scored against the dense model, perplexity on text"))
    rounds.append(RoundPlan("finish", 0, "-", "export and report"))
    return rounds


def tokens_scored(plan: Plan, round_: RoundPlan) -> int:
    """Tokens run through the model in a round: prefill of every probe and the reference."""
    job = plan.job
    sequence = job.prompts.prefix_tokens + job.new_tokens
    prompts = job.prompts.count
    tokens = round_.probes * prompts * sequence
    if round_.reference == "new":
        tokens += prompts * (sequence + job.new_tokens)  # scored, plus generated one by one
    elif round_.reference == "reused":
        tokens += prompts * sequence
    if round_.label == "final":
        tokens += prompts * sequence  # the result against the dense reference
        tokens += 2 * job.evaluation.count * job.evaluation.tokens  # dense and compressed text
    return tokens


# --- costs ---------------------------------------------------------------------------------------
def model_parameters(plan: Plan) -> int:
    """Parameters of every linear weight plus the output embedding: what a token multiplies."""
    config = json.loads((plan.model_dir / "config.json").read_text())
    linear = sum(c.params for c in load_components(plan.model_dir))
    return linear + int(config.get("vocab_size", 0)) * int(config.get("hidden_size", 0))


def _bytes_per_value(plan: Plan) -> int:
    dtype = plan.job.dtype
    if dtype == "auto":
        return 2 if plan.job.resources_per_worker.get("GPU", 0) > 0 else 4
    return 4 if dtype == "float32" else 2


def worker_flops(plan: Plan) -> float:
    resources = plan.job.resources_per_worker
    if resources.get("GPU", 0) > 0:
        return GPU_FLOPS_PER_GPU * resources["GPU"]
    return CPU_FLOPS_PER_CORE * max(1.0, resources.get("CPU", 1))


def flop_costs(plan: Plan, flops: float | None = None) -> Costs:
    flops = flops or worker_flops(plan)
    per_token = 2.0 * model_parameters(plan)
    job = plan.job
    sequence = job.prompts.prefix_tokens + job.new_tokens
    probe_tokens = job.prompts.count * sequence
    reference_tokens = job.prompts.count * (sequence + job.new_tokens)
    return Costs(
        startup=0.0,
        reference=reference_tokens * per_token / flops,
        probe=probe_tokens * per_token / flops,
        source=f"FLOPs: {per_token / 1e9:.3g} GFLOP per token at {flops / 1e12:.3g} TFLOP/s "
        "per worker (engine start-up not included)",
    )


def calibration_actors(plan: Plan) -> int:
    """Engines to calibrate on: one when each has its own GPU; all of the job's when they share
    a machine's CPUs, because there each probe slows down the others (cores, memory bandwidth)."""
    if plan.job.resources_per_worker.get("GPU", 0) > 0:
        return 1
    return min(plan.job.workers, len(plan.components))


def calibrate(plan: Plan) -> Costs:
    """Time start-up, the reference and a probe per actor on `calibration_actors` engines."""
    import ray

    from dtm_ray.cluster.actor import RoundContext
    from dtm_ray.core.state import ModelState
    from dtm_ray.loop.rounds import JobEngines, scored_prefixes

    job = plan.job
    actors = calibration_actors(plan)
    start = time.monotonic()
    engines = JobEngines(plan, actors)
    try:
        pool = engines.pool
        startup = time.monotonic() - start
        prefixes = scored_prefixes(engines)
        began = time.monotonic()
        parts = pool.split("build_reference", prefixes, ModelState(), job.new_tokens)
        reference_s = time.monotonic() - began
        reference = concat_references(parts)
        context = ray.put(RoundContext(0, ModelState(), reference))
        spec = _calibration_spec(plan)
        # Components from across the selection: a probe's cost falls with its layer (a probe
        # on layer L starts at L where the engine can), so the middle stands for the mean.
        n = len(plan.components)
        spread = [plan.components[(2 * i + 1) * n // (2 * actors)] for i in range(actors)]
        waves = []
        for _ in range(2):  # the first probe of an engine may pay one-time costs
            began = time.monotonic()
            ray.get(
                [
                    actor.probe.remote({component.name: spec}, context)
                    for actor, component in zip(pool.actors, spread, strict=False)
                ]
            )
            waves.append(time.monotonic() - began)
    finally:
        engines.close()
    where = "one" if actors == 1 else f"{actors} concurrent"
    return Costs(
        startup,
        reference_s * actors,  # as if on one actor; `estimate` divides by the workers
        min(waves),
        f"calibrated on {where} {job.engine} actor(s) ({job.resources_per_worker})",
    )


def _calibration_spec(plan: Plan) -> str:
    compress = plan.compress
    if compress is None:
        return (plan.specs or DEFAULT_PROBE_SPECS)[0]
    if compress.method == "quantize":
        return compress.levels[0]
    return "magnitude:0.5"  # timing only: wanda's scoring costs the same


def estimate(plan: Plan, costs: Costs) -> Estimate:
    workers = plan.job.workers
    rounds = schedule(plan)
    seconds = []
    for round_ in rounds:
        s = math.ceil(round_.probes / workers) * costs.probe
        if round_.reference == "new":
            s += costs.reference / min(workers, plan.job.prompts.count)
        elif round_.reference == "reused":
            s += costs.probe
        if round_.label == "final":
            # Scoring against the dense reference, plus perplexity on text by two actors at once.
            job = plan.job
            text = job.evaluation.count * job.evaluation.tokens
            scored = job.prompts.count * (job.prompts.prefix_tokens + job.new_tokens)
            s += costs.probe * (1 + text / scored * (1 if workers > 1 else 2))
        if round_.label == "finish":
            s += REPORT_SECONDS
            if plan.compress is not None:  # writing the checkpoint
                s += model_parameters(plan) * _bytes_per_value(plan) / EXPORT_BYTES_PER_SECOND
        seconds.append(s)
    return Estimate(rounds, costs, workers, seconds)


# --- text -------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def format_estimate(plan: Plan, result: Estimate) -> str:
    job = plan.job
    params = model_parameters(plan)
    selected = sum(c.params for c in plan.components)
    compress = plan.compress
    what = "probe-only" if compress is None else f"{compress.method} (guide {compress.guide})"
    lines = [
        f"model {job.model}: {params / 1e6:,.1f} M parameters in linear weights and the output "
        f"embedding; {len(plan.components)} components selected ({selected / 1e6:,.1f} M)",
        f"job: {what}, engine {job.engine} ({job.dtype}), {job.workers} worker(s) of "
        f"{job.resources_per_worker}; {job.prompts.count} prompts x "
        f"({job.prompts.prefix_tokens} + {job.new_tokens}) tokens",
        "",
        f"{'round':>6} {'probes':>7} {'reference':>9} {'tokens':>12} {'time':>12}  what",
    ]
    for round_, seconds in zip(result.rounds, result.seconds, strict=True):
        lines.append(
            f"{round_.label:>6} {round_.probes:>7} {round_.reference:>9} "
            f"{tokens_scored(plan, round_):>12,} {_duration(seconds):>12}  {round_.note}"
        )
    rounds = [r for r in result.rounds if r.label not in ("final", "finish")]
    probes = sum(r.probes for r in result.rounds)
    tokens = sum(tokens_scored(plan, r) for r in result.rounds)
    c = result.costs
    lines += [
        "",
        f"{len(rounds)} round(s), {probes} probes, {tokens:,} tokens through the model",
        f"costs: {c.source}: "
        + (f"start-up {c.startup:.1f} s, " if c.startup else "")
        + f"reference {c.reference:.2f} s on one actor, one probe {c.probe:.2f} s",
        f"estimated total: {_duration(result.total)} on {job.workers} worker(s)",
    ]
    if compress is not None and compress.method == "quantize" and compress.guide != "uniform":
        lines.append("(search rounds: the fewest, when every candidate passes; each skip adds one)")
    if compress is not None and compress.method == "quantize":
        lines += ["", *serving_lines(plan)]
    return "\n".join(lines)


def serving_lines(plan: Plan) -> list[str]:
    """What the export can be served on, for a quantize job: per level, as if every selected
    component took it (the search decides which do)."""
    compress = plan.compress
    lines = ["serving the export (if every selected component took the level):"]
    if not compress.fused:
        lines.append(
            "  fused: false: q/k/v or gate/up of a layer may get different levels, which vLLM "
            "cannot load packed"
        )
    # `auto` resolves on the machine that runs the job; only an explicit dtype is checked.
    dtype = plan.job.dtype if plan.job.dtype != "auto" else "bfloat16"
    for level in compress.levels:
        notes = serving_notes(plan.components, {c.name: level for c in plan.components}, dtype)
        found = notes["vllm_gpu_marlin"] + notes["vllm_cpu"]
        lines += [f"  {level}: {note}" for note in found] or [f"  {level}: no known limit"]
    return lines


# --- memory --------------------------------------------------------------------------------------
# Where a job's memory goes, per engine actor (on each tensor-parallel rank's device, and on the
# actor's host) and per node, from the model's config.json and the job alone: the formulas below
# follow what the engines allocate (dtm_ray.engines). An edit (a probe, or one link of a state
# change) works on one weight at a time where the weight lives, so no term grows with the rounds.
_GIB = 1 << 30
GPU_BYTES = 80 * _GIB  # per GPU, unless the plan is told otherwise (an H100 80 GB)
NODE_GPUS = 8  # GPUs per node, for the per-node host memory of a GPU job
PROCESS_HOST_BYTES = 3 * _GIB  # one engine process: Python, torch, vLLM, a CUDA context
MAX_STEP_TOKENS = 8192  # vLLM's tokens per model step (chunked prefill) by default
COMPRESS_TEMPORARIES = 3  # float32 copies of a weight that compress() holds at once (abs, masks)


@dataclass
class MemoryPlan:
    """Bytes per item: `device` on each tensor-parallel rank's device (GPU memory, or the host's
    on CPU), `host` per actor besides; `layer_skip` says why layer skip is inactive (None: it is
    active); limits are what the declared resources allow (None: not declared)."""

    on_gpu: bool
    ranks: int
    device: dict[str, int]
    host: dict[str, int]
    actors_per_node: int
    layer_skip: str | None
    device_limit: int | None
    host_limit: int | None

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        """Host memory of one actor: its own, plus its ranks' device memory when on CPU."""
        return sum(self.host.values()) + (0 if self.on_gpu else self.ranks * self.device_total)

    @property
    def node_total(self) -> int:
        return self.actors_per_node * self.host_total


def memory_plan(
    config: dict, components: list, job: Any, gpu_bytes: int = GPU_BYTES, node_gpus: int = NODE_GPUS
) -> MemoryPlan:
    """The memory `job` needs with the model of `config` (config.json) and its `components`."""
    options = job.engine_config()
    resources = job.resources_per_worker
    gpus = resources.get("GPU", 0)
    on_gpu = gpus > 0
    dtype = job.dtype if job.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    value = 4 if dtype == "float32" else 2
    vllm = job.engine == "vllm"
    ranks = options.tensor_parallel_size if vllm else 1
    hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
    vocab = int(config.get("vocab_size", 0))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    params = sum(c.params for c in components_all(config)) + embeddings
    largest = max(c.params for c in components)
    prompts, new = job.prompts.count, job.new_tokens
    sequence = job.prompts.prefix_tokens + new
    kv_per_token = 2 * layers * kv_heads * head_dim * value

    eager = options.enforce_eager if options.enforce_eager is not None else not on_gpu
    per_layer = 2 * prompts * sequence * hidden * value  # hidden states and residual
    budget = options.residual_cache_bytes
    stride = residual_stride(per_layer, layers, budget) if budget > 0 else layers
    layer_skip = None
    if budget == 0:
        layer_skip = "residual_cache_bytes is 0"
    elif vllm and not eager:
        layer_skip = "CUDA graphs replay recorded kernels (engine_options.enforce_eager: true)"
    elif stride >= layers:
        every_4th = per_layer * math.ceil(layers / 4)
        layer_skip = (
            f"the stream of {prompts} prompts x {sequence} tokens takes {_gib(per_layer)} per "
            f"layer, so residual_cache_bytes {_gib(budget)} keeps layer 0 only "
            f"({_gib(every_4th)} keeps every 4th layer)"
        )
    kept = 0 if budget == 0 or (vllm and not eager) else per_layer * len(range(0, layers, stride))

    if vllm:
        step = min(prompts * (new if eager else sequence), MAX_STEP_TOKENS)
        activations = min(prompts * sequence, MAX_STEP_TOKENS) * 8 * hidden * value
        logits = step * vocab * 4 * (3 if eager else 2)  # float32 logits, log-softmax, top-k
    else:
        activations = options.batch_size * sequence * 8 * hidden * value
        logits = options.batch_size * new * vocab * 4 * 3
    if vllm and on_gpu:
        cache = 2 * min(options.max_model_len or 2048, 2048) * kv_per_token // ranks  # at least
        cache_label = "KV cache (vLLM: at least; it takes the rest of gpu_memory_utilization)"
    elif vllm:
        cache = max(options.cpu_kv_cache_bytes, 2 * (options.max_model_len or 2048) * kv_per_token)
        cache //= ranks
        cache_label = "KV cache (cpu_kv_cache_bytes)"
    else:
        cache = options.batch_size * sequence * kv_per_token
        cache_label = "KV cache of a batch"
    # An edit: the weight gathered whole, the copy a probe puts back, compress()'s temporaries.
    edit = largest * value + largest * value // ranks + COMPRESS_TEMPORARIES * largest * 4
    device = {
        "model weights": params * value // ranks,
        cache_label: cache,
        "residual stream kept for layer skip": kept,
        "logits per step": logits,
        "activations per step": activations,
        "an edit in place (probe, state change)": edit,
    }
    processes = (1 if not on_gpu else 2) + (ranks if ranks > 1 else 0) if vllm else 1
    host = {
        f"engine processes ({processes})": processes * PROCESS_HOST_BYTES,
        "checkpoint originals (original_cache_bytes)": options.original_cache_bytes,
        "one original read back (a restore)": largest * value,
    }
    if on_gpu:
        actors_per_node = max(1, int(node_gpus // gpus))
    else:
        actors_per_node = job.workers
    device_limit = int(options.gpu_memory_utilization * gpu_bytes) if on_gpu else None
    host_limit = int(resources["memory"]) if "memory" in resources else None
    return MemoryPlan(
        on_gpu, ranks, device, host, actors_per_node, layer_skip, device_limit, host_limit
    )


def components_all(config: dict) -> list:
    from dtm_ray.core.components import components_from_config

    return components_from_config(config)


def _gib(n: float) -> str:
    return f"{n / _GIB:,.2f} GiB"


def plan_memory(plan: Plan, gpu_bytes: int = GPU_BYTES) -> MemoryPlan:
    config = json.loads((plan.model_dir / "config.json").read_text())
    return memory_plan(config, plan.components, plan.job, gpu_bytes)


def check_memory(memory: MemoryPlan) -> None:
    """Refuse, in one line, a job whose declared resources cannot hold what it needs."""
    if memory.device_limit is not None and memory.device_total > memory.device_limit:
        biggest = max(memory.device, key=memory.device.get)
        raise ConfigError(
            f"each GPU needs {_gib(memory.device_total)} ({biggest} "
            f"{_gib(memory.device[biggest])}) but gpu_memory_utilization allows "
            f"{_gib(memory.device_limit)}; raise tensor_parallel_size, or lower the prompts or "
            "the engine's memory budgets"
        )
    if memory.host_limit is not None and memory.host_total > memory.host_limit:
        raise ConfigError(
            f"each engine actor needs {_gib(memory.host_total)} of host memory but "
            f"resources_per_worker memory is {_gib(memory.host_limit)}; raise it, or lower the "
            "engine's memory budgets"
        )


def format_memory(memory: MemoryPlan) -> list[str]:
    where = "each GPU" if memory.on_gpu else "the host"
    rank = f" (x {memory.ranks} tensor-parallel ranks)" if memory.ranks > 1 else ""
    lines = [f"memory per actor, on {where}{rank}:"]
    lines += [f"  {_gib(v):>12}  {k}" for k, v in memory.device.items()]
    limit = f" of {_gib(memory.device_limit)} allowed" if memory.device_limit else ""
    lines.append(f"  {_gib(memory.device_total):>12}  in all{limit}")
    lines.append("memory per actor, on the host" + (" besides:" if not memory.on_gpu else ":"))
    lines += [f"  {_gib(v):>12}  {k}" for k, v in memory.host.items()]
    limit = f" of {_gib(memory.host_limit)} declared" if memory.host_limit else ""
    lines.append(f"  {_gib(memory.host_total):>12}  in all{limit}")
    node = f"{memory.actors_per_node} actor(s)"
    lines.append(f"host memory per node ({node}): {_gib(memory.node_total)}")
    if memory.layer_skip:
        lines.append(f"warning: layer skip will be inactive: {memory.layer_skip}")
    return lines
