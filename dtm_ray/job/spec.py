"""The job: a YAML file as dataclasses, `--set` overrides, and every check that needs nothing but
the file. No torch, Ray or lm-eval is imported here, so a bad job fails in a fraction of a second;
the checks that read the model are in `checks.py`, the resume rules in `resume.py`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtm_ray.core.components import check_selector
from dtm_ray.core.specs import parse_spec, spec_bits
from dtm_ray.engines.config import EngineConfig, resolve_batch_invariant
from dtm_ray.engines.prompts import check_source
from dtm_ray.errors import ConfigError
from dtm_ray.job.tasks import BACKENDS, TASK_SETS

__all__ = ["ConfigError", "JobConfig", "load_job"]

DEFAULT_PROBE_SPECS = ["magnitude:0.5"]
COMPRESS_METHODS = ("sparsify", "quantize")
CRITERIA = ("magnitude", "wanda")
GUIDES = ("fdt", "nll", "uniform", "fisher", "weight_error")
# Guides that calibrate on text (fisher's forward + backward passes; see docs/guides.md).
TEXT_GUIDES = ("fisher",)
REFERENCES = ("current", "original")
RECOVERY_ENGINES = ("auto", "keep", "release")
RECOVERY_OBJECTIVES = ("lm", "distill")


@dataclass
class PromptsConfig:
    source: str = "self"
    count: int = 32  # the decide prompts: what rounds probe
    prefix_tokens: int = 32
    seed: int = 0
    # A compressing job's validate prompts (what the quantize search and the sparsify floor
    # read), drawn apart from the others; None: as many as `count`.
    validate_count: int | None = None


@dataclass
class ProbeConfig:
    components: Any = "all"  # "all" or a list of selectors (see dtm_ray.core.components.select)
    # Probe-only jobs: the specs to probe every component at (default magnitude:0.5). With a
    # `compress:` section the probes follow from it and `specs` must be left out.
    specs: list[str] | None = None


@dataclass
class RecoveryConfig:
    """Recovery training after sparsify rounds (the DTM paper's Algorithm 1 trains between
    pruning steps): the pruned components' weights are fine-tuned on Ray Train with their zeros
    kept, and the result becomes the base the next rounds prune further (docs/user-guide.md)."""

    every: int = 1  # after every k-th round (and never after the last one)
    steps: int = 200  # optimizer steps per recovery
    learning_rate: float = 1e-5
    weight_decay: float = 0.01  # AdamW's; the mask re-applied after each step keeps zeros zero
    batch_size: int = 8  # sequences per optimizer step, split evenly over the workers
    sequence_tokens: int = 256  # tokens per training sequence
    # Training text, disjoint from the scored prompts and the evaluation text (windows of the
    # same source that overlap them are left out; any overlap left is an error).
    text: str = "pydoc"
    workers: int = 2  # Ray Train workers (gloo on CPU; NCCL + FSDP2 on GPUs)
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    seed: int = 0
    checkpoint_every: int = 25  # steps between Ray Train checkpoints (a killed run resumes there)
    # The engine actors during training: keep them loaded (the workers need room of their own),
    # release them (they load the new base when they restart), or auto: keep when the workers
    # fit beside them now.
    engines: str = "auto"
    # What training minimises: lm (causal-LM loss on the text, the paper's continued training)
    # or distill (KL to the dense model's next-token distribution on the same text).
    objective: str = "lm"


@dataclass
class CompressConfig:
    """Iterative compression of the selected components (docs/user-guide.md).

    Keys of the other method stay None; validation fills in this method's defaults, so run.json
    records every value a run used.
    """

    method: str = "sparsify"  # sparsify | quantize
    guide: str = "fdt"  # what decides: fdt | nll | uniform | fisher | weight_error
    max_rounds: int = 100  # a guard against a schedule that never reaches the target
    # sparsify
    target_sparsity: float | None = None  # parameter-weighted over the selected components
    step: float | None = None  # relative added sparsity per round; the last is cut to the target
    criterion: str | None = None  # which weights a pruning step zeroes: magnitude | wanda
    reference: str | None = None  # what a round measures against: current | original (dense)
    # wanda and guide fisher: calibration sequences, disjoint from every prompt role
    calibration_count: int | None = None
    # quantize
    levels: list[str] | None = None  # precisions, most aggressive first, e.g. [int4-g64, int8]
    min_fdt: float | None = None  # FDT@75 of the combined model against the dense one
    max_params_share: float | None = None  # at most this share of parameters at each level
    # A bits budget: average bits per selected parameter (as bits_per_parameter counts them);
    # every unit ends at one of `levels`, the last one the fallback (see the README).
    target_bits: float | None = None
    # q/k/v of a layer, and gate/up, move between levels together (vLLM fuses them and needs one
    # scheme per fused layer); unset: true when the engine is vllm.
    fused: bool | None = None
    # sparsify: fine-tune between rounds (None: no training)
    recovery: RecoveryConfig | None = None


CALIBRATION_COUNT = 16  # calibration sequences of wanda and of the fisher guide
SPARSIFY_DEFAULTS = {
    "target_sparsity": 0.5,
    "step": 0.1,
    "criterion": "magnitude",
    "reference": "current",
    "calibration_count": CALIBRATION_COUNT,
}
QUANTIZE_DEFAULTS = {
    "levels": None,
    "min_fdt": None,
    "max_params_share": 1.0,
    "fused": None,
    "target_bits": None,
}
# The test prompts of a compressing job by default: this many times prompts.count.
TEST_PROMPTS_FACTOR = 4
# The dense bits per weight of an explicit dtype (`auto` is known once the actors resolve it).
DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}
# Keys both methods take: min_fdt is the quantize search's bound and sparsify's quality floor.
# calibration_count: sparsify's (wanda, fisher), and quantize's with guide fisher.
SHARED_KEYS = ("min_fdt", "calibration_count")


@dataclass
class EvaluationConfig:
    """The final evaluation of a compressing run against the dense model."""

    text: str = "pydoc"  # real text for perplexity: a prompt-source file, hf:..., or pydoc
    count: int = 16  # windows of real text
    tokens: int = 128  # tokens per window
    # The test prompts, from the prompt source apart from the decide and validate ones: read by
    # nothing but the final evaluation. None: 4 x prompts.count.
    prompts: int | None = None


@dataclass
class EvaluateConfig:
    """lm-eval tasks on the dense model and the exported result (`final/tasks/`, see
    dtm_ray.results.tasks): run after the final round of a compressing job, or by
    `dtm-ray evaluate`.

    Its fields are checked when built; the task names (which need lm-eval's index) when the
    job is checked (`dtm_ray.job.checks.check_job`) or evaluated.
    """

    tasks: list[str] = field(default_factory=lambda: ["facts"])  # names, sets, task YAML files
    backend: str = "auto"  # hf | vllm | auto (vllm when resources_per_worker holds a GPU)
    limit: int | None = None  # examples per task (None: all); for smoke tests
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int = 16

    def __post_init__(self) -> None:
        _check_choice(self.backend, "evaluate.backend", BACKENDS)
        if self.limit is not None:
            _check_int(self.limit, "evaluate.limit", 1)
        if self.num_fewshot is not None:
            _check_int(self.num_fewshot, "evaluate.num_fewshot", 0)
        _check_int(self.batch_size, "evaluate.batch_size", 1)
        if isinstance(self.tasks, str) or not isinstance(self.tasks, list) or not self.tasks:
            raise ConfigError(
                f"evaluate.tasks must be a non-empty list of lm-eval task names, task sets "
                f"({', '.join(TASK_SETS)}) or task YAML files, got {self.tasks!r}"
            )


@dataclass
class JobConfig:
    model: str
    engine: str = "vllm"
    dtype: str = "auto"
    # Any other EngineConfig field (dtm_ray.engines.config), e.g. max_model_len, the memory budgets.
    engine_options: dict[str, Any] = field(default_factory=dict)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    new_tokens: int = 64
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    compress: CompressConfig | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    evaluate: EvaluateConfig | None = None  # lm-eval tasks after the final round
    workers: int = 1
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_in_flight_per_worker: int = 2
    max_probe_retries: int = 2  # a probe that raises is run again this often
    max_probe_crashes: int = 2  # a probe whose actor dies under it is run again this often
    # Seconds to wait for the engine actors to be placed and loaded before giving up; the wait is
    # reported every few seconds, naming the missing resources (an autoscaler may add nodes).
    startup_timeout_s: float = 600.0
    out: str = "runs/default"

    def engine_config(self) -> EngineConfig:
        options = dict(self.engine_options)
        wanda = self.compress is not None and self.compress.criterion == "wanda"
        if self.engine == "vllm" and wanda and options.get("enforce_eager") is None:
            # Wanda's calibration hooks see nothing inside CUDA graphs: calibrate eagerly.
            options["enforce_eager"] = True
        return EngineConfig(kind=self.engine, dtype=self.dtype, **options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED = {
    "prompts": PromptsConfig,
    "probe": ProbeConfig,
    "compress": CompressConfig,
    "evaluation": EvaluationConfig,
    "evaluate": EvaluateConfig,
}
ENGINE_OPTION_KEYS = sorted({f.name for f in dataclasses.fields(EngineConfig)} - {"kind", "dtype"})


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the job'} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; expected one of {sorted(known)}")
    kwargs = dict(data)
    if cls is CompressConfig and kwargs.get("recovery") is not None:
        kwargs["recovery"] = _build(RecoveryConfig, kwargs["recovery"], f"{where}recovery.")
    if cls is JobConfig:
        _check_engine_options(kwargs.get("engine_options", {}))
        for key, sub in _NESTED.items():
            if kwargs.get(key) is not None:
                kwargs[key] = _build(sub, kwargs[key], f"{key}.")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where or 'job'}: {err}") from None


def _check_engine_options(options: Any) -> None:
    if not isinstance(options, dict):
        raise ConfigError(f"engine_options must be a mapping, got {options!r}")
    unknown = sorted(set(options) - set(ENGINE_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key 'engine_options.{unknown[0]}'; expected one of {ENGINE_OPTION_KEYS}"
        )


def _check_int(value: Any, name: str, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_fields(job: JobConfig) -> None:
    """Everything that can be checked without reading the model."""
    try:
        job.engine_config()
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
    _check_int(job.new_tokens, "new_tokens", 1)
    _check_int(job.workers, "workers", 1)
    _check_int(job.max_in_flight_per_worker, "max_in_flight_per_worker", 1)
    _check_int(job.max_probe_retries, "max_probe_retries", 0)
    _check_int(job.max_probe_crashes, "max_probe_crashes", 0)
    timeout = job.startup_timeout_s
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"startup_timeout_s must be a number of seconds > 0, got {timeout!r}")
    _check_int(job.prompts.count, "prompts.count", 1)
    _check_int(job.prompts.prefix_tokens, "prompts.prefix_tokens", 1)
    _check_int(job.prompts.seed, "prompts.seed", 0)
    if job.prompts.validate_count is not None:
        _check_int(job.prompts.validate_count, "prompts.validate_count", 1)
    if job.evaluation.prompts is not None:
        _check_int(job.evaluation.prompts, "evaluation.prompts", 1)
    if not isinstance(job.resources_per_worker, dict) or not all(
        isinstance(v, (int, float)) and v >= 0 for v in job.resources_per_worker.values()
    ):
        raise ConfigError(
            f"resources_per_worker must map resource names to amounts >= 0, "
            f"e.g. {{GPU: 1}}, got {job.resources_per_worker!r}"
        )
    _check_gpus(job)
    _check_batch_invariant(job)
    if job.compress is not None and job.probe.specs is not None:
        raise ConfigError(
            "probe.specs is not used with a compress: section (its probes follow from "
            "compress.step and compress.criterion); remove probe.specs"
        )
    specs = job.probe.specs if job.probe.specs is not None else DEFAULT_PROBE_SPECS
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"probe.specs must be a non-empty list of specs, got {specs!r}")
    if job.compress is not None:
        _check_compress(job.compress, job.dtype)
        _check_fisher_engine(job)
        if job.compress.method == "quantize" and job.compress.fused is None:
            job.compress.fused = job.engine == "vllm"  # what vLLM can serve packed
        # A compressing job's held-out roles, recorded in run.json like every other value.
        if job.prompts.validate_count is None:
            job.prompts.validate_count = job.prompts.count
        if job.evaluation.prompts is None:
            job.evaluation.prompts = TEST_PROMPTS_FACTOR * job.prompts.count
    if job.evaluate is not None and job.compress is None:
        raise ConfigError(
            "evaluate: compares the dense model with a run's compressed result; "
            "it needs a compress: section"
        )
    _check_int(job.evaluation.count, "evaluation.count", 1)
    _check_int(job.evaluation.tokens, "evaluation.tokens", 2)
    try:
        check_source(job.evaluation.text, "evaluation.text", text_only=True)
        for spec in specs:
            parse_spec(str(spec))
        if job.probe.components != "all":
            if not isinstance(job.probe.components, list) or not job.probe.components:
                raise ValueError(
                    f"probe.components must be 'all' or a non-empty list of selectors, "
                    f"got {job.probe.components!r}"
                )
            for selector in job.probe.components:
                check_selector(selector)
        check_source(job.prompts.source)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if not isinstance(job.out, str) or not job.out:
        raise ConfigError(f"out must be a run directory (a path or URI), got {job.out!r}")


def _check_fisher_engine(job: JobConfig) -> None:
    """The fisher guide's backward pass runs on the weights one vLLM worker holds: not split
    over tensor-parallel ranks (the engine refuses it inside the actor; found here first)."""
    if job.compress is None or job.compress.guide not in TEXT_GUIDES or job.engine != "vllm":
        return
    tp = job.engine_options.get("tensor_parallel_size", 1)
    if tp != 1:
        raise ConfigError(
            f"compress.guide {job.compress.guide} runs a backward pass over the weights of one "
            f"vLLM worker, and engine_options.tensor_parallel_size is {tp!r}; use "
            "tensor_parallel_size 1 (one GPU per engine actor) or the hf engine"
        )


def _check_gpus(job: JobConfig) -> None:
    """A vllm engine on GPUs runs its tensor-parallel ranks on the GPUs its actor holds, and
    wanda needs eager execution there: both found here, not after the engines start."""
    gpus = job.resources_per_worker.get("GPU", 0)
    if job.engine != "vllm" or not gpus:
        return
    tp = job.engine_options.get("tensor_parallel_size", 1)
    if gpus != tp:
        raise ConfigError(
            f"resources_per_worker GPU: {gpus:g} but engine_options.tensor_parallel_size: {tp}; "
            f"each engine actor runs its {tp} tensor-parallel rank(s) on the GPUs it holds, "
            f"so give it GPU: {tp}"
        )
    wanda = job.compress is not None and job.compress.criterion == "wanda"
    if wanda and job.engine_options.get("enforce_eager") is False:
        raise ConfigError(
            "compress.criterion wanda calibrates with hooks that CUDA graphs skip; remove "
            "engine_options.enforce_eager: false (wanda jobs run vllm eagerly)"
        )


def _check_batch_invariant(job: JobConfig) -> None:
    """`engine_options.batch_invariant: true` on actors that cannot run it, found before Ray: the
    hf engine, or actors with no GPU. A GPU's compute capability is checked where the engine
    starts (the driver may have no GPU)."""
    if job.engine_options.get("batch_invariant") is not True:
        return
    gpus = job.resources_per_worker.get("GPU", 0)
    if job.engine == "vllm" and gpus:
        return
    device = "cuda" if gpus else "CPU (resources_per_worker gives the actors no GPU)"
    try:
        resolve_batch_invariant(True, job.engine, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} {value!r} unknown; expected one of {list(choices)}")


def _check_fraction(value: Any, name: str, low_open: bool, high: float, high_open: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (
        number
        and (value > 0 if low_open else value >= 0)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        interval = f"(0, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a number in {interval}, got {value!r}")


def _fill_defaults(compress: CompressConfig) -> None:
    """This method's defaults for keys left out; a key of the other method is an error."""
    own = SPARSIFY_DEFAULTS if compress.method == "sparsify" else QUANTIZE_DEFAULTS
    other = QUANTIZE_DEFAULTS if compress.method == "sparsify" else SPARSIFY_DEFAULTS
    for key in other:
        if key in SHARED_KEYS:
            continue
        if getattr(compress, key) is not None:
            raise ConfigError(
                f"compress.{key} does not apply to method {compress.method!r}; "
                f"its keys are {sorted(own)}"
            )
    for key, default in own.items():
        if getattr(compress, key) is None:
            setattr(compress, key, default)


def role_counts(job: JobConfig) -> dict[str, int]:
    """How many prompts each role draws: a probe-only job decide prompts alone; a compressing
    job also validate and test prompts (after `check_fields` filled in their defaults)."""
    counts = {"decide": job.prompts.count}
    if job.compress is not None:
        counts["validate"] = job.prompts.validate_count or job.prompts.count
        counts["test"] = job.evaluation.prompts or TEST_PROMPTS_FACTOR * job.prompts.count
    return counts


def _check_compress(compress: CompressConfig, dtype: str) -> None:
    _check_choice(compress.method, "compress.method", COMPRESS_METHODS)
    _fill_defaults(compress)
    _check_choice(compress.guide, "compress.guide", GUIDES)
    _check_int(compress.max_rounds, "compress.max_rounds", 1)
    if compress.method == "sparsify":
        _check_choice(compress.criterion, "compress.criterion", CRITERIA)
        _check_choice(compress.reference, "compress.reference", REFERENCES)
        _check_fraction(compress.target_sparsity, "compress.target_sparsity", True, 1, True)
        _check_fraction(compress.step, "compress.step", True, 1, False)
        _check_int(compress.calibration_count, "compress.calibration_count", 1)
        if compress.min_fdt is not None:
            _check_min_fdt(compress.min_fdt)
        if compress.recovery is not None:
            _check_recovery(compress.recovery)
        return
    if compress.recovery is not None:
        raise ConfigError(
            "compress.recovery trains between sparsify rounds; it does not apply to method "
            "'quantize' (remove it or use method: sparsify)"
        )
    if compress.guide in TEXT_GUIDES:
        if compress.calibration_count is None:
            compress.calibration_count = CALIBRATION_COUNT
        _check_int(compress.calibration_count, "compress.calibration_count", 1)
    elif compress.calibration_count is not None:
        raise ConfigError(
            f"compress.calibration_count does not apply to method 'quantize' with guide "
            f"{compress.guide!r} (only guide fisher calibrates there); remove it"
        )
    levels = compress.levels
    if not isinstance(levels, list) or not levels:
        raise ConfigError(
            f"compress.levels must be a non-empty list of precisions, most aggressive first "
            f"(e.g. [int4-g64, int8]), got {levels!r}"
        )
    for level in levels:
        try:
            spec = parse_spec(str(level))
        except ValueError as err:
            raise ConfigError(f"compress.levels: {err}") from None
        if spec.is_pruning:
            raise ConfigError(
                f"compress.levels holds {level!r}, a pruning spec; "
                "expected int8, int8-tensor, int4-gG or fp8-e4m3"
            )
    compress.levels = [str(parse_spec(str(level))) for level in levels]
    if compress.min_fdt is None and compress.target_bits is None:
        raise ConfigError(
            "method quantize needs compress.min_fdt (a quality floor), compress.target_bits "
            "(a bits budget) or both"
        )
    if compress.min_fdt is not None:
        _check_min_fdt(compress.min_fdt)
    _check_fraction(compress.max_params_share, "compress.max_params_share", True, 1, False)
    if compress.fused is not None and not isinstance(compress.fused, bool):
        raise ConfigError(f"compress.fused must be true or false, got {compress.fused!r}")
    if compress.target_bits is not None:
        check_target_bits(compress, DTYPE_BITS.get(dtype), f"dtype {dtype}")


def check_target_bits(compress: CompressConfig, dense_bits: float | None, dense: str) -> None:
    """`compress.target_bits` against what the levels can reach and the dense weights' bits
    (`dense_bits`, described by `dense`; None: not known yet)."""
    target = compress.target_bits
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not target > 0:
        raise ConfigError(
            f"compress.target_bits must be a number of bits per parameter > 0, got {target!r}"
        )
    bits = [spec_bits(level) for level in compress.levels]
    if any(a > b for a, b in zip(bits, bits[1:], strict=False)):
        listed = ", ".join(f"{level} {b:g}" for level, b in zip(compress.levels, bits, strict=True))
        raise ConfigError(
            f"compress.target_bits needs compress.levels from the fewest bits to the most (the "
            f"last is every unit's fallback); got {listed}"
        )
    if target < bits[0]:
        raise ConfigError(
            f"compress.target_bits {target:g} is below what the levels reach: {bits[0]:g} bits "
            f"per parameter with every selected unit at {compress.levels[0]}"
        )
    if dense_bits is not None and target > dense_bits:
        raise ConfigError(
            f"compress.target_bits {target:g} is above the dense weights' {dense_bits:g} bits "
            f"per parameter ({dense})"
        )
    if compress.max_params_share != 1.0:
        raise ConfigError(
            "compress.max_params_share does not combine with compress.target_bits (the budget "
            "decides how much each level takes); remove one of them"
        )


def _check_min_fdt(min_fdt: Any) -> None:
    if not isinstance(min_fdt, (int, float)) or isinstance(min_fdt, bool) or min_fdt < 0:
        raise ConfigError(f"compress.min_fdt must be a number >= 0 (an FDT@75), got {min_fdt!r}")


def _check_positive(value: Any, name: str, allow_zero: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value < 0 or (value == 0 and not allow_zero):
        relation = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be a number {relation}, got {value!r}")


def _check_recovery(recovery: RecoveryConfig) -> None:
    where = "compress.recovery."
    _check_int(recovery.every, f"{where}every", 1)
    _check_int(recovery.steps, f"{where}steps", 1)
    _check_positive(recovery.learning_rate, f"{where}learning_rate")
    _check_positive(recovery.weight_decay, f"{where}weight_decay", allow_zero=True)
    _check_int(recovery.sequence_tokens, f"{where}sequence_tokens", 2)
    _check_int(recovery.workers, f"{where}workers", 1)
    _check_int(recovery.batch_size, f"{where}batch_size", 1)
    if recovery.batch_size % recovery.workers:
        raise ConfigError(
            f"{where}batch_size {recovery.batch_size} must be a multiple of {where}workers "
            f"{recovery.workers} (each worker trains on the same number of sequences)"
        )
    _check_int(recovery.seed, f"{where}seed", 0)
    _check_int(recovery.checkpoint_every, f"{where}checkpoint_every", 1)
    _check_choice(recovery.engines, f"{where}engines", RECOVERY_ENGINES)
    _check_choice(recovery.objective, f"{where}objective", RECOVERY_OBJECTIVES)
    resources = recovery.resources_per_worker
    if not isinstance(resources, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        for v in resources.values()
    ):
        raise ConfigError(
            f"{where}resources_per_worker must map resource names to amounts >= 0, "
            f"e.g. {{GPU: 1}}, got {resources!r}"
        )
    try:
        check_source(recovery.text, f"{where}text", text_only=True)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None


def _set_dotted(data: dict[str, Any], assignment: str) -> None:
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r} must look like key=value (e.g. workers=2)")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a mapping")
    try:
        node[leaf] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(
            f"--set {assignment!r}: the value is not valid YAML ({problem}); quote strings "
            "that hold YAML syntax"
        ) from None


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"job file {path} must hold a mapping of keys, got {type(data).__name__}")
    if "compare" in data:
        raise ConfigError(
            f"job file {path} is a compare job: run it with `dtm-ray compare --job {path}`"
        )
    for assignment in overrides or []:
        _set_dotted(data, assignment)
    if "model" not in data:
        raise ConfigError(f"job file {path} has no 'model' key (a local HF folder or known name)")
    job = _build(JobConfig, data, "")
    check_fields(job)
    return job
