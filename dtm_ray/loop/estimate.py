"""`dtm-ray plan JOB.yaml`: what a job will cost, before it runs.

The schedule (rounds, probes per round, tokens scored) follows from the job alone. Its time comes
from one of two cost models:

- calibrated (the default): start one engine actor, build the reference for all prompts on it
  and time a probe; a round then takes  reference / workers + ceil(probes / workers) x probe,
  plus one probe's time for the noise floor when it probes (every actor scores the round's
  model once, all at the same time: `workers` x P x (prefix + N) more tokens).
- FLOPs (`--no-calibrate`, and `dtm-ray run --dry-run`): 2 x model parameters FLOPs per token,
  over the tokens generated and scored, divided by a stated per-worker throughput. Generation is
  memory-bound on GPUs, so this is a floor there, not a forecast.

The schedule of a quantize search depends on what passes; the plan counts the fewest search
rounds (every candidate passes), and each skipped component adds one more.

Guides fisher and weight_error score candidates in a sensitivity round instead of probing them
(`dtm_ray.loop.sensitivity`): weight_error reads no data (counted as free: one compression per
candidate, well under one probe); fisher makes, on every actor at once, one forward + backward
pass over all `calibration_count` sequences for its share of the components, which costs about
FISHER_PASS_FACTOR forward passes over those tokens (measured 2.3-2.7 on SmolLM2 on both
engines, docs/guides.md), whatever the number of candidates while their weight changes fit the
engine's budget. So a fisher round costs about
    FISHER_PASS_FACTOR x calibration_count x (prefix + N) tokens per actor,
timed as FISHER_PASS_FACTOR x (calibration_count / prompts.count) probes (a probe being about one
forward pass over the decide prompts).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from dtm_ray.core.decisions.sparsify import TARGET_TOLERANCE, probe_points, round_step
from dtm_ray.core.metrics import expected_interval_width, prompts_for_interval_width
from dtm_ray.core.sensitivity import FISHER, SIGNALS
from dtm_ray.core.serving import fused_groups, serving_notes
from dtm_ray.core.state import concat_references
from dtm_ray.engines.config import describe_batch_invariance
from dtm_ray.engines.models import load_components
from dtm_ray.job.checks import CheckedJob
from dtm_ray.job.memory import MemoryPlan, format_memory, memory_plan
from dtm_ray.job.spec import DEFAULT_PROBE_SPECS, role_counts

# Throughput per worker assumed by the FLOP estimate (FLOP/s), per unit of its resources.
CPU_FLOPS_PER_CORE = 50e9  # fp32 matmul on one AVX2 core, about what the demo sees
GPU_FLOPS_PER_GPU = 100e12  # bf16 prefill on an A100/H100-class GPU at moderate utilization
REPORT_SECONDS = 3.0  # the plots and pages at the end of a run
# Replaying chains and writing safetensors on local disk: measured 400 MB/s replaying on an H100,
# 100-120 MB/s on 16 CPU cores (bench/export_speed.py); the plan assumes between.
EXPORT_BYTES_PER_SECOND = 200e6
# A fisher pass (forward + backward + the scores) in forward passes over the same tokens.
FISHER_PASS_FACTOR = 2.6


@dataclass
class RoundPlan:
    label: str  # "held-out", "0", "1", ... or "final"
    probes: int
    reference: str  # "new": generated and scored; "reused": the dense one, scored once; "-"
    note: str = ""
    # The prompt role the round's probes (and its new reference) run on: decide, or validate
    # for a quantize search round; "held-out" builds the validate and test references.
    role: str = "decide"
    scored: int = 0  # candidates of a sensitivity round (guides fisher, weight_error)


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


def schedule(checked: CheckedJob) -> list[RoundPlan]:
    """The rounds a job will run, and the final evaluation of a compressing job."""
    components = len(checked.components)
    compress = checked.compress
    if compress is None:
        specs = checked.specs or DEFAULT_PROBE_SPECS
        return [
            RoundPlan("0", components * len(specs), "new", f"specs {', '.join(specs)}"),
            RoundPlan("finish", 0, "-", "report"),
        ]
    counts = role_counts(checked.job)
    rounds: list[RoundPlan] = [
        RoundPlan(
            "held-out",
            0,
            "new",
            f"dense reference on {counts['validate']} validate + {counts['test']} test prompts",
            role="held-out",
        )
    ]
    scores = compress.guide in SIGNALS
    if compress.method == "sparsify":
        if compress.guide == "uniform":
            rounds.append(
                RoundPlan("0", 0, "new", f"every component to {compress.target_sparsity}")
            )
        else:
            for index, t in enumerate(sparsify_steps(compress.target_sparsity, compress.step)):
                lo, hi = probe_points(t)
                if scores:  # scored, not probed; only round 0 builds a reference (the dense one)
                    rounds.append(
                        RoundPlan(
                            str(index),
                            0,
                            "new" if index == 0 else "-",
                            f"{compress.guide}: {2 * components} candidates at added "
                            f"{lo:.3f}, {hi:.3f}",
                            scored=2 * components,
                        )
                    )
                    continue
                reference = "new" if index == 0 or compress.reference == "current" else "reused"
                rounds.append(
                    RoundPlan(str(index), 2 * components, reference, f"added {lo:.3f}, {hi:.3f}")
                )
    else:
        workers = checked.job.workers
        index = 0
        if compress.fused:  # the units probed and searched are the fused groups
            components = len(fused_groups(checked.components))
        unit = "unit" if compress.fused else "component"
        budget = compress.target_bits is not None
        # With a bits budget the last level is the fallback: it takes what is left, unprobed.
        for level in compress.levels[:-1] if budget else compress.levels:
            if compress.guide == "uniform":
                rounds.append(RoundPlan(str(index), 0, "new" if index == 0 else "-", level))
                index += 1
                continue
            what = f"{level}: rank every {unit}" + (", fill to the budget" if budget else "")
            if scores:  # every member scored alone; a unit's score is its members' sum
                what = f"{level}: {compress.guide} scores every component, ranks every {unit}"
                what += ", fill to the budget" if budget else ""
            rounds.append(
                RoundPlan(
                    str(index),
                    0 if scores else components,
                    "new" if index == 0 else "-",
                    what,
                    scored=len(checked.components) if scores else 0,
                )
            )
            index += 1
            if compress.min_fdt is None:
                continue
            searches = math.ceil(components / workers)
            for _ in range(searches):
                rounds.append(
                    RoundPlan(
                        str(index), workers, "-", f"{level}: search (validate)", role="validate"
                    )
                )
                index += 1
        if budget:
            fallback = f"{compress.levels[-1]}: every {unit} left (the budget's fallback)"
            rounds.append(RoundPlan(str(index), 0, "new" if index == 0 else "-", fallback))
    rounds.append(
        RoundPlan(
            "final", 0, "-", "scored against the dense model on every role, perplexity on text"
        )
    )
    rounds.append(RoundPlan("finish", 0, "-", "export and report"))
    return rounds


def _round_prompts(checked: CheckedJob, round_: RoundPlan) -> int:
    counts = role_counts(checked.job)
    if round_.role == "held-out":
        return counts["validate"] + counts["test"]
    return counts[round_.role]


def tokens_scored(checked: CheckedJob, round_: RoundPlan) -> int:
    """Tokens run through the model in a round: prefill of every probe and the reference."""
    job = checked.job
    sequence = job.prompts.prefix_tokens + job.new_tokens
    prompts = _round_prompts(checked, round_)
    tokens = round_.probes * prompts * sequence
    if round_.probes:  # the noise floor: the round's model scored once on every actor
        tokens += job.workers * prompts * sequence
    if round_.reference == "new":
        tokens += prompts * (sequence + job.new_tokens)  # scored, plus generated one by one
    elif round_.reference == "reused":
        tokens += prompts * sequence
    tokens += sensitivity_tokens(checked, round_)
    if round_.label == "final":
        # the result against the dense reference on every role's prompts
        tokens += sum(role_counts(job).values()) * sequence
        tokens += 2 * job.evaluation.count * job.evaluation.tokens  # dense and compressed text
    return tokens


def sensitivity_tokens(checked: CheckedJob, round_: RoundPlan) -> int:
    """Forward-pass-equivalent tokens of a sensitivity round (see the module docstring): fisher's
    passes over the calibration text on each actor that scores a share; weight_error none."""
    compress = checked.compress
    if not round_.scored or compress is None or compress.guide != FISHER:
        return 0
    job = checked.job
    sequence = job.prompts.prefix_tokens + job.new_tokens
    actors = min(job.workers, round_.scored)
    return math.ceil(FISHER_PASS_FACTOR * compress.calibration_count * sequence * actors)


# --- costs ---------------------------------------------------------------------------------------
def model_parameters(checked: CheckedJob) -> int:
    """Parameters of every linear weight plus the output embedding: what a token multiplies."""
    config = json.loads((checked.model_dir / "config.json").read_text())
    linear = sum(c.params for c in load_components(checked.model_dir))
    return linear + int(config.get("vocab_size", 0)) * int(config.get("hidden_size", 0))


def _bytes_per_value(checked: CheckedJob) -> int:
    dtype = checked.job.dtype
    if dtype == "auto":
        return 2 if checked.job.resources_per_worker.get("GPU", 0) > 0 else 4
    return 4 if dtype == "float32" else 2


def worker_flops(checked: CheckedJob) -> float:
    resources = checked.job.resources_per_worker
    if resources.get("GPU", 0) > 0:
        return GPU_FLOPS_PER_GPU * resources["GPU"]
    return CPU_FLOPS_PER_CORE * max(1.0, resources.get("CPU", 1))


def flop_costs(checked: CheckedJob, flops: float | None = None) -> Costs:
    flops = flops or worker_flops(checked)
    per_token = 2.0 * model_parameters(checked)
    job = checked.job
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


def calibration_actors(checked: CheckedJob) -> int:
    """Engines to calibrate on: one when each has its own GPU; all of the job's when they share
    a machine's CPUs, because there each probe slows down the others (cores, memory bandwidth)."""
    if checked.job.resources_per_worker.get("GPU", 0) > 0:
        return 1
    return min(checked.job.workers, len(checked.components))


def calibrate(checked: CheckedJob) -> Costs:
    """Time start-up, the reference and a probe per actor on `calibration_actors` engines."""
    import ray

    from dtm_ray.cluster.actor import RoundContext
    from dtm_ray.core.state import ModelState
    from dtm_ray.loop.rounds import JobEngines, scored_prefixes

    job = checked.job
    actors = calibration_actors(checked)
    start = time.monotonic()
    engines = JobEngines(checked, actors)
    try:
        pool = engines.pool
        startup = time.monotonic() - start
        prefixes = scored_prefixes(engines)
        began = time.monotonic()
        parts = pool.split("build_reference", prefixes, ModelState(), job.new_tokens)
        reference_s = time.monotonic() - began
        reference = concat_references(parts)
        context = ray.put(RoundContext(0, ModelState(), reference))
        spec = _calibration_spec(checked)
        # Components from across the selection: a probe's cost falls with its layer (a probe
        # on layer L starts at L where the engine can), so the middle stands for the mean.
        n = len(checked.components)
        spread = [checked.components[(2 * i + 1) * n // (2 * actors)] for i in range(actors)]
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


def _calibration_spec(checked: CheckedJob) -> str:
    compress = checked.compress
    if compress is None:
        return (checked.specs or DEFAULT_PROBE_SPECS)[0]
    if compress.method == "quantize":
        return compress.levels[0]
    return "magnitude:0.5"  # timing only: wanda's scoring costs the same


def estimate(checked: CheckedJob, costs: Costs) -> Estimate:
    workers = checked.job.workers
    rounds = schedule(checked)
    seconds = []
    decide = checked.job.prompts.count
    for round_ in rounds:
        # Costs were measured on the decide prompts; other roles scale with their count.
        scale = _round_prompts(checked, round_) / decide
        s = math.ceil(round_.probes / workers) * costs.probe * scale
        if round_.probes:  # the noise floor: one null probe per actor, all at once
            s += costs.probe * scale
        if round_.scored and checked.compress.guide == FISHER:  # the actors' passes, all at once
            s += FISHER_PASS_FACTOR * costs.probe * checked.compress.calibration_count / decide
        if round_.reference == "new":
            prompts = _round_prompts(checked, round_)
            s += costs.reference * scale / min(workers, prompts)
        elif round_.reference == "reused":
            s += costs.probe
        if round_.label == "final":
            # Scoring against the dense reference on every role, plus perplexity on text, the
            # calls spread over the actors.
            job = checked.job
            text = job.evaluation.count * job.evaluation.tokens
            scored = decide * (job.prompts.prefix_tokens + job.new_tokens)
            every = sum(role_counts(job).values()) / decide
            s += costs.probe * (every + 2 * text / scored) / min(workers, 5)
        if round_.label == "finish":
            s += REPORT_SECONDS
            if checked.compress is not None:  # writing the checkpoint
                s += model_parameters(checked) * _bytes_per_value(checked) / EXPORT_BYTES_PER_SECOND
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


def job_memory(
    checked: CheckedJob, gpu_bytes: int | None = None, node_gpus: int | None = None
) -> MemoryPlan:
    """The job's memory per actor and per node (`dtm_ray.job.memory`), on its model."""
    config = json.loads((checked.model_dir / "config.json").read_text())
    every = load_components(checked.model_dir)
    return memory_plan(config, checked.job, checked.components, every, gpu_bytes, node_gpus)


def format_estimate(checked: CheckedJob, result: Estimate, memory: MemoryPlan | None = None) -> str:
    job = checked.job
    params = model_parameters(checked)
    selected = sum(c.params for c in checked.components)
    compress = checked.compress
    what = "probe-only" if compress is None else f"{compress.method} (guide {compress.guide})"
    lines = [
        f"model {job.model}: {params / 1e6:,.1f} M parameters in linear weights and the output "
        f"embedding; {len(checked.components)} components selected ({selected / 1e6:,.1f} M)",
        f"job: {what}, engine {job.engine} ({job.dtype}), {job.workers} worker(s) of "
        f"{job.resources_per_worker}; {_prompt_counts(checked)} x "
        f"({job.prompts.prefix_tokens} + {job.new_tokens}) tokens",
        describe_batch_invariance(
            job.engine_options.get("batch_invariant"),
            job.engine,
            job.resources_per_worker.get("GPU", 0),
        ),
        *interval_lines(checked),
        "",
        f"{'round':>8} {'probes':>7} {'reference':>9} {'tokens':>12} {'time':>12}  what",
    ]
    for round_, seconds in zip(result.rounds, result.seconds, strict=True):
        lines.append(
            f"{round_.label:>8} {round_.probes:>7} {round_.reference:>9} "
            f"{tokens_scored(checked, round_):>12,} {_duration(seconds):>12}  {round_.note}"
        )
    rounds = [r for r in result.rounds if r.label not in ("held-out", "final", "finish")]
    probes = sum(r.probes for r in result.rounds)
    tokens = sum(tokens_scored(checked, r) for r in result.rounds)
    scored = sum(r.scored for r in result.rounds)
    c = result.costs
    if scored:
        guide = compress.guide
        passes = (
            f", {sum(1 for r in result.rounds if r.scored)} round(s) of forward + backward "
            f"passes over {compress.calibration_count} calibration sequences on each actor "
            f"(about {FISHER_PASS_FACTOR:g} forward passes each)"
            if guide == FISHER
            else " (data-free)"
        )
        scored_text = f", {scored} candidates scored by {guide}{passes}"
    else:
        scored_text = ""
    lines += [
        "",
        f"{len(rounds)} round(s), {probes} probes{scored_text}, {tokens:,} tokens through the "
        "model",
        f"costs: {c.source}: "
        + (f"start-up {c.startup:.1f} s, " if c.startup else "")
        + f"reference {c.reference:.2f} s on one actor, one probe {c.probe:.2f} s",
        f"estimated total: {_duration(result.total)} on {job.workers} worker(s)",
    ]
    if compress is not None and compress.method == "quantize" and compress.guide != "uniform":
        lines.append("(search rounds: the fewest, when every candidate passes; each skip adds one)")
    if compress is not None and compress.method == "quantize":
        lines += ["", *serving_lines(checked)]
    lines += ["", *format_memory(memory or job_memory(checked))]
    return "\n".join(lines)


def _prompt_counts(checked: CheckedJob) -> str:
    counts = role_counts(checked.job)
    if len(counts) == 1:
        return f"{counts['decide']} prompts"
    return " + ".join(f"{n} {role}" for role, n in counts.items()) + " prompts"


def interval_lines(checked: CheckedJob) -> list[str]:
    """How sure FDT@75 will be on each role's prompts: the expected width of its 90 % interval
    (`expected_interval_width`: order statistics, FDT spread evenly over 0..N, the wide case),
    and a warning when the validate interval is wider than min_fdt / 2, too wide for the floor
    to be told apart from noise."""
    job = checked.job
    n_new = job.new_tokens
    counts = role_counts(job)
    widths = {role: expected_interval_width(count, n_new) for role, count in counts.items()}
    shown = ", ".join(
        f"{role} {counts[role]} prompts: {width:.1f} tokens" for role, width in widths.items()
    )
    lines = [
        f"FDT@75's 90% interval, expected width (of N = {n_new}; order statistics, FDT spread "
        f"evenly over 0..N): {shown}"
    ]
    compress = checked.compress
    min_fdt = compress.min_fdt if compress is not None else None
    if min_fdt and widths["validate"] > min_fdt / 2:
        enough = prompts_for_interval_width(min_fdt / 2, n_new)
        lines.append(
            f"warning: on {counts['validate']} validate prompts FDT@75's interval is about "
            f"{widths['validate']:.1f} tokens wide, more than min_fdt / 2 = {min_fdt / 2:g}: the "
            f"floor cannot be resolved from noise; about {enough} validate prompts would "
            f"(prompts.validate_count)"
        )
    return lines


def serving_lines(checked: CheckedJob) -> list[str]:
    """What the export can be served on, for a quantize job: per level, as if every selected
    component took it (the search decides which do)."""
    compress = checked.compress
    lines = ["serving the export (if every selected component took the level):"]
    if not compress.fused:
        lines.append(
            "  fused: false: q/k/v or gate/up of a layer may get different levels, which vLLM "
            "cannot load packed"
        )
    # `auto` resolves on the machine that runs the job; only an explicit dtype is checked.
    dtype = checked.job.dtype if checked.job.dtype != "auto" else "bfloat16"
    for level in compress.levels:
        notes = serving_notes(
            checked.components, {c.name: level for c in checked.components}, dtype
        )
        found = notes["vllm_gpu_marlin"] + notes["vllm_cpu"]
        lines += [f"  {level}: {note}" for note in found] or [f"  {level}: no known limit"]
    return lines
