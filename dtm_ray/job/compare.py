"""A compare job: Divergent Token Metrics between two checkpoints someone already has (a base and
a candidate: a quantized copy from the hub, an llm-compressor output, a GGUF, a bf16 serving copy,
the same model in another engine), as dataclasses, and every check that runs before Ray.

Given on the command line (`dtm-ray compare BASE CANDIDATE --candidate-engine vllm ...`) or as a
job file (`dtm-ray compare --job FILE`) whose `compare:` section names the two sides:

    compare:
      base: {model: smollm2-135m, engine: hf, dtype: float32}
      candidate: {model: runs/q/export/compressed, engine: vllm, dtype: bfloat16}
    prompts: {source: pydoc, count: 64, prefix_tokens: 32}
    new_tokens: 64

`check_compare` reads both models' config, tokenizer and weight listing (never the weights), and
refuses in one line, before any engine starts: a side it cannot read (no folder, no config.json,
no weights, a quantization its engine cannot load here), two tokenizers that differ, prompts
that do not fit. No torch or Ray is imported by this module; the checks import transformers
(and vLLM, for a quantized candidate on the vllm engine) inside their functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dtm_ray.engines.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from dtm_ray.engines.prompts import check_source
from dtm_ray.engines.sources import (
    FOLDER,
    ModelSource,
    driver_folder,
    resolve_source,
)
from dtm_ray.errors import ConfigError
from dtm_ray.job.checks import check_out
from dtm_ray.job.spec import (
    ENGINE_OPTION_KEYS,
    EvaluationConfig,
    PromptsConfig,
    _build,
    _check_int,
    _set_dotted,
)

SIDES = ("base", "candidate")
# A divergence is a near-tie when both models' top-1 minus top-2 log-probabilities there are
# at most this: each was nearly undecided, so any perturbation (a kernel, a rounding) may flip it.
# 0.25 nats is two bf16 steps of a logit between 16 and 32, where greedy logits of small models sit.
NEAR_TIE = 0.25
# Prompts per chunk the candidate scores: each chunk's result is written as it finishes, so a
# killed compare redoes at most the chunks in flight.
CHUNK_PROMPTS = 16
# What a compare's keys default to when neither the job file nor the command line sets them.
COMPARE_PROMPT_SOURCE = "pydoc"  # real text that ships with Python; `self` samples the base
DEFAULT_OUT = "runs/compare"
# Keys that change how a compare runs, not what it measures: they may differ on resume.
# (`compare.chunk_prompts` may not: the chunk files written so far are cut by it.)
OPERATIONAL_KEYS = (
    "out",
    "workers",
    "resources_per_worker",
    "max_in_flight_per_worker",
    "startup_timeout_s",
)
_OPERATIONAL_OPTIONS = (
    "gpu_memory_utilization",
    "residual_cache_bytes",
    "residual_host_bytes",
    "state_cache_bytes",
    "state_push_bytes",
    "original_cache_bytes",
    "cpu_kv_cache_bytes",
)


@dataclass
class SideConfig:
    """One model of the pair and how it runs. A candidate's unset engine and dtype are the
    base's; its quantization is whatever its checkpoint's config.json says (the engine reads it)."""

    model: str
    engine: str | None = None  # vllm | hf (base default: vllm)
    dtype: str | None = None  # auto | float32 | bfloat16 | float16 (base default: auto)
    engine_options: dict[str, Any] = field(default_factory=dict)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(kind=self.engine, dtype=self.dtype, **self.engine_options)


@dataclass
class CompareSection:
    base: SideConfig
    candidate: SideConfig
    near_tie: float = NEAR_TIE
    chunk_prompts: int = CHUNK_PROMPTS


@dataclass
class CompareJob:
    compare: CompareSection
    prompts: PromptsConfig = field(
        default_factory=lambda: PromptsConfig(source=COMPARE_PROMPT_SOURCE)
    )
    new_tokens: int = 64
    # Real text both models' perplexity is measured on.
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    workers: int = 1  # engine actors per side; the base's are released before the candidate's
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_in_flight_per_worker: int = 2
    startup_timeout_s: float = 600.0
    out: str = DEFAULT_OUT

    @property
    def base(self) -> SideConfig:
        return self.compare.base

    @property
    def candidate(self) -> SideConfig:
        return self.compare.candidate

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- reading a job ---------------------------------------------------------------------------
def is_compare_file(data: Any) -> bool:
    """Whether a job file's mapping is a compare job (it has a `compare:` section)."""
    return isinstance(data, dict) and "compare" in data


def read_compare_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"job file {path} is not valid YAML: {err}") from None
    if not is_compare_file(data):
        raise ConfigError(
            f"job file {path} has no compare: section (compare: {{base: ..., candidate: ...}}); "
            "a job that compresses runs with `dtm-ray run`"
        )
    return data


def spell_out_sides(data: dict[str, Any]) -> None:
    """`base: smollm2-135m` is short for `base: {model: smollm2-135m}`: spelled out in place."""
    section = data.get("compare")
    if not isinstance(section, dict):
        raise ConfigError(f"compare must be a mapping with base: and candidate:, got {section!r}")
    for side in SIDES:
        if isinstance(section.get(side), str):
            section[side] = {"model": section[side]}


def build_compare(data: dict[str, Any], overrides: list[str] | None = None) -> CompareJob:
    """A validated CompareJob from a job file's mapping (or one the CLI built), with `--set`
    overrides applied first; one-line ConfigError for anything wrong."""
    spell_out_sides(data)
    for assignment in overrides or []:
        _set_dotted(data, assignment)
    section = data["compare"]
    for side in SIDES:
        value = section.get(side)
        if not isinstance(value, dict) or "model" not in value:
            raise ConfigError(f"compare.{side} must name a model (compare.{side}.model)")
    fields = dict(data)
    built = {side: _build(SideConfig, section[side], f"compare.{side}.") for side in SIDES}
    rest = {k: v for k, v in section.items() if k not in SIDES}
    fields["compare"] = _build(CompareSection, {**rest, **built}, "compare.")
    if "prompts" in fields:
        prompts = {"source": COMPARE_PROMPT_SOURCE, **(fields["prompts"] or {})}
        fields["prompts"] = _build(PromptsConfig, prompts, "prompts.")
    if "evaluation" in fields:
        fields["evaluation"] = _build(EvaluationConfig, fields["evaluation"], "evaluation.")
    job = _build(CompareJob, fields, "")
    check_compare_fields(job)
    return job


def check_compare_fields(job: CompareJob) -> None:
    """Everything that can be checked without reading a model; fills each side's defaults."""
    base, candidate = job.base, job.candidate
    base.engine = base.engine or "vllm"
    base.dtype = base.dtype or "auto"
    candidate.engine = candidate.engine or base.engine
    candidate.dtype = candidate.dtype or base.dtype
    for side in SIDES:
        config = getattr(job.compare, side)
        if not isinstance(config.model, str) or not config.model:
            raise ConfigError(f"compare.{side}.model must name a model, got {config.model!r}")
        options = config.engine_options
        if not isinstance(options, dict):
            raise ConfigError(f"compare.{side}.engine_options must be a mapping, got {options!r}")
        unknown = sorted(set(options) - set(ENGINE_OPTION_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key 'compare.{side}.engine_options.{unknown[0]}'; expected one of "
                f"{ENGINE_OPTION_KEYS}"
            )
        try:
            config.engine_config()
        except (TypeError, ValueError) as err:
            raise ConfigError(f"compare.{side}: {err}") from None
    near_tie = job.compare.near_tie
    if not isinstance(near_tie, (int, float)) or isinstance(near_tie, bool) or near_tie < 0:
        raise ConfigError(
            f"compare.near_tie must be a log-probability margin >= 0, got {near_tie!r}"
        )
    _check_int(job.compare.chunk_prompts, "compare.chunk_prompts", 1)
    _check_int(job.new_tokens, "new_tokens", 1)
    _check_int(job.workers, "workers", 1)
    _check_int(job.max_in_flight_per_worker, "max_in_flight_per_worker", 1)
    _check_int(job.prompts.count, "prompts.count", 1)
    _check_int(job.prompts.prefix_tokens, "prompts.prefix_tokens", 1)
    _check_int(job.prompts.seed, "prompts.seed", 0)
    _check_int(job.evaluation.count, "evaluation.count", 1)
    _check_int(job.evaluation.tokens, "evaluation.tokens", 2)
    timeout = job.startup_timeout_s
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(f"startup_timeout_s must be a number of seconds > 0, got {timeout!r}")
    resources = job.resources_per_worker
    if not isinstance(resources, dict) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        for v in resources.values()
    ):
        raise ConfigError(
            f"resources_per_worker must map resource names to amounts >= 0, e.g. {{GPU: 1}}, "
            f"got {resources!r}"
        )
    try:
        check_source(job.prompts.source)
        check_source(job.evaluation.text, "evaluation.text", text_only=True)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    if not isinstance(job.out, str) or not job.out:
        raise ConfigError(f"out must be a run directory (a path or URI), got {job.out!r}")


# --- the checked compare: both models read, before Ray ---------------------------------------
@dataclass
class CheckedCompare:
    """A validated compare: each side's source (what every node loads) and the driver's folder
    of it, the prompts and the real-text windows (cut with the base's tokenizer)."""

    job: CompareJob
    sources: dict[str, ModelSource]
    folders: dict[str, Path]
    prefixes: np.ndarray | None  # None for `self`: the base's actors sample them
    windows: np.ndarray

    @property
    def chunks(self) -> list[tuple[int, int]]:
        """(first prompt, one past the last) of each chunk the candidate scores."""
        count, size = self.job.prompts.count, self.job.compare.chunk_prompts
        return [(start, min(start + size, count)) for start in range(0, count, size)]


def check_compare(job: CompareJob) -> CheckedCompare:
    """Read both models (config, tokenizer, weight listing: never the weights), check they can
    be compared as configured, and cut the prompts; ConfigError (one line) when they cannot."""
    from dtm_ray.engines.models import read_model_config
    from dtm_ray.engines.prompts import load_prompts
    from dtm_ray.engines.tokenizers import load_tokenizer, tokenizer_difference

    check_compare_fields(job)
    check_out(job.out)
    sources, folders, configs = {}, {}, {}
    for side in SIDES:
        config = getattr(job.compare, side)
        sources[side], folders[side] = side_source(side, config.model)
        configs[side] = read_model_config(folders[side])
        check_quantization(side, config, configs[side], job.resources_per_worker)
    tokenizers = {}
    for side in SIDES:
        try:
            tokenizers[side] = load_tokenizer(folders[side])
        except Exception as err:  # transformers raises many kinds; each means "unreadable"
            raise ConfigError(
                f"{side} model {sources[side].name}: its tokenizer cannot be loaded "
                f"({_first_line(err)})"
            ) from None
    difference = tokenizer_difference(tokenizers["base"], tokenizers["candidate"])
    if difference is not None:
        raise ConfigError(
            f"{sources['base'].name} and {sources['candidate'].name} do not share a tokenizer, "
            f"so their tokens cannot be compared: {difference}"
        )
    for side in SIDES:
        check_budget(side, getattr(job.compare, side), configs[side], job)
    p, e = job.prompts, job.evaluation
    try:
        prefixes = None
        if p.source != "self":
            prefixes = load_prompts(
                p.source, folders["base"], p.count, p.prefix_tokens, seed=p.seed
            )
        windows = load_prompts(e.text, folders["base"], e.count, e.tokens, seed=0)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return CheckedCompare(job, sources, folders, prefixes, windows)


def side_source(side: str, model: str) -> tuple[ModelSource, Path]:
    """A side's model as a source every node can load and the driver's folder of it (config,
    tokenizer, weight index); one line naming the side when it cannot be read. A `.gguf` file is
    converted by transformers into a folder in the model cache first."""
    where = f"{side} model {model}"
    try:
        if model.endswith(".gguf"):
            from dtm_ray.engines.models import gguf_folder

            model = str(gguf_folder(model))
        elif _missing_local_path(model):
            raise ConfigError("no such folder")
        source = resolve_source(model)
        folder = driver_folder(source)
    except ConfigError as err:
        raise ConfigError(f"{where}: {_without(str(err), model)}") from None
    names = [p.name for p in folder.iterdir()] if source.kind == FOLDER else []
    has_bin = any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names)
    if source.bytes == 0 and not has_bin:
        raise ConfigError(f"{where}: no weights (no *.safetensors or pytorch_model*.bin files)")
    return source, folder


def _missing_local_path(model: str) -> bool:
    """A name that reads as a path on this machine but is not a folder: starts like a path, or
    its first part is a local folder (runs/x/export, where runs/ is here). A hub id's first part
    is an organisation, never a folder in the working directory."""
    path = Path(model).expanduser()
    if path.is_dir() or model.startswith(("s3://", "gs://", "gcs://")):
        return False
    if model.startswith(("/", "./", "../", "~")):
        return True
    return "/" in model and Path(model.split("/", 1)[0]).is_dir()


def _without(message: str, model: str) -> str:
    """A source error's message without its own 'model X' prefix (the side names it)."""
    for prefix in (f"model {model}: ", f"model folder {model} ", f"model {model} "):
        if message.startswith(prefix):
            return message[len(prefix) :].removeprefix("has ")
    return message


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def check_quantization(
    side: str, config: SideConfig, model_config: dict[str, Any], resources: dict[str, float]
) -> None:
    """A quantized checkpoint its engine cannot load here, in one line: a method the engine does
    not know, the libraries transformers needs for it, or what vLLM's CPU build lacks."""
    quantization = model_config.get("quantization_config")
    if not isinstance(quantization, dict):
        return
    method = str(quantization.get("quant_method", "")).lower()
    where = f"{side} model {config.model} is quantized with {method or 'an unnamed method'}"
    if config.engine == "hf":
        problem = _transformers_problem(quantization, config.dtype)
        if problem:
            raise ConfigError(f"{where}, which the hf engine cannot load here: {problem}")
        return
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"{where}, which vLLM does not know (it knows {QUANTIZATION_METHODS})")
    if resources.get("GPU", 0) > 0:
        return  # which kernel a GPU runs is decided where the engine starts
    flag = "--candidate-dtype" if side == "candidate" else "--dtype"
    problem = _vllm_cpu_problem(method, quantization, config.dtype, flag)
    if problem:
        raise ConfigError(f"{where}; vLLM's CPU build (the actors have no GPU) {problem}")


def _transformers_problem(quantization: dict[str, Any], dtype: str) -> str | None:
    """transformers' own check that it can load this quantization on this machine (its
    libraries, its device), or None."""
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer

    try:
        quantizer = AutoHfQuantizer.from_config(dict(quantization))
        torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
        quantizer.validate_environment(device_map=None, dtype=torch_dtype)
    except (ImportError, ValueError, RuntimeError, TypeError, KeyError) as err:
        return _first_line(err)
    return None


# The dtypes the CPU build runs its 4-bit kernels in (W4A16, or W4A8 on CPUs with AMX).
_VLLM_CPU_DTYPES = ("bfloat16", "float16")


def _vllm_cpu_problem(
    method: str, quantization: dict[str, Any], dtype: str, flag: str
) -> str | None:
    bits = set()
    if method == "compressed-tensors":
        for group in (quantization.get("config_groups") or {}).values():
            weights = (group or {}).get("weights") or {}
            bits.add((weights.get("type", "int"), weights.get("num_bits")))
    elif method in ("gptq", "awq", "auto_gptq", "auto_awq", "gptq_marlin", "awq_marlin"):
        bits.add(("int", quantization.get("bits", quantization.get("w_bit"))))
    else:
        return None  # nothing known against it; the engine says at start-up
    other = sorted(f"{kind}{n}" for kind, n in bits if (kind, n) != ("int", 4))
    if other:
        held = ", ".join(other)
        return f"runs 4-bit integer weights only; this checkpoint holds {held}"
    if dtype not in _VLLM_CPU_DTYPES:
        return f"runs quantized weights in bf16 or fp16 only, not {dtype}: {flag} bfloat16"
    return None


def check_budget(
    side: str, config: SideConfig, model_config: dict[str, Any], job: CompareJob
) -> None:
    """The longest sequence each engine sees must fit its context."""
    needs = {
        "prompts.prefix_tokens + new_tokens": job.prompts.prefix_tokens + job.new_tokens,
        "evaluation.tokens": job.evaluation.tokens,
    }
    model_max = model_config.get("max_position_embeddings")
    asked = config.engine_options.get("max_model_len")
    if asked is not None:
        limit, what = asked, f"compare.{side}.engine_options.max_model_len"
    elif config.engine == "vllm" and (not model_max or model_max > DEFAULT_MAX_MODEL_LEN):
        limit, what = DEFAULT_MAX_MODEL_LEN, "the vllm engine's default max_model_len"
    elif model_max:
        limit, what = model_max, f"the {side} model's max_position_embeddings"
    else:
        return
    for key, need in needs.items():
        if need > limit:
            raise ConfigError(f"{key} = {need} tokens exceed {limit}, {what}")


# --- resume ------------------------------------------------------------------------------------
def compare_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two compare configs, operational ones aside."""
    import json

    from dtm_ray.job.resume import flatten_config

    old, new = (flatten_config(json.loads(json.dumps(c))) for c in (stored, current))
    keys = sorted(set(old) | set(new))

    def operational(key: str) -> bool:
        if key.startswith(OPERATIONAL_KEYS):
            return True
        return ".engine_options." in key and key.rsplit(".", 1)[1] in _OPERATIONAL_OPTIONS

    return [k for k in keys if not operational(k) and old.get(k) != new.get(k)]
