"""Job configuration: a YAML file, validated completely before any model loads or actor starts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dtm_ray.components import Component, check_selector, load_components, select
from dtm_ray.compress import check_applicable, parse_spec
from dtm_ray.engines import EngineConfig
from dtm_ray.models import resolve_model
from dtm_ray.prompts import check_source


class ConfigError(ValueError):
    """A problem with the job file, reported as one line, before anything heavy starts."""


@dataclass
class PromptsConfig:
    source: str = "self"
    count: int = 32
    prefix_tokens: int = 32
    seed: int = 0


@dataclass
class ProbeConfig:
    components: Any = "all"  # "all" or a list of selectors (see dtm_ray.components.select)
    specs: list[str] = field(default_factory=lambda: ["magnitude:0.5"])


@dataclass
class JobConfig:
    model: str
    engine: str = "vllm"
    dtype: str = "auto"
    # Further EngineConfig fields: max_model_len, gpu_memory_utilization, tensor_parallel_size,
    # enforce_eager, batch_size.
    engine_options: dict[str, Any] = field(default_factory=dict)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    new_tokens: int = 64
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    workers: int = 1
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    max_in_flight_per_worker: int = 2
    max_probe_retries: int = 2
    out: str = "runs/default"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(kind=self.engine, dtype=self.dtype, **self.engine_options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_NESTED = {"prompts": PromptsConfig, "probe": ProbeConfig}
ENGINE_OPTION_KEYS = sorted({f.name for f in dataclasses.fields(EngineConfig)} - {"kind", "dtype"})


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the job'} must be a mapping, got {data!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]!r}; expected one of {sorted(known)}")
    kwargs = dict(data)
    if cls is JobConfig:
        _check_engine_options(kwargs.get("engine_options", {}))
        for key, sub in _NESTED.items():
            if key in kwargs:
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
    _check_int(job.prompts.count, "prompts.count", 1)
    _check_int(job.prompts.prefix_tokens, "prompts.prefix_tokens", 1)
    _check_int(job.prompts.seed, "prompts.seed", 0)
    if not isinstance(job.resources_per_worker, dict) or not all(
        isinstance(v, (int, float)) and v >= 0 for v in job.resources_per_worker.values()
    ):
        raise ConfigError(
            f"resources_per_worker must map resource names to amounts >= 0, "
            f"e.g. {{GPU: 1}}, got {job.resources_per_worker!r}"
        )
    if not isinstance(job.probe.specs, list) or not job.probe.specs:
        raise ConfigError(f"probe.specs must be a non-empty list of specs, got {job.probe.specs!r}")
    try:
        for spec in job.probe.specs:
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


@dataclass
class Plan:
    """A validated job: the model folder and the probes to run, in a fixed order."""

    job: JobConfig
    model_dir: Path
    components: list[Component]
    specs: list[str]

    @property
    def probes(self) -> list[tuple[Component, str]]:
        return [(c, s) for c in self.components for s in self.specs]


def plan_job(job: JobConfig) -> Plan:
    """Validate the whole job against the model's config.json; raises ConfigError."""
    check_fields(job)
    try:
        model_dir = resolve_model(job.model)
        components = select(load_components(model_dir), job.probe.components)
        specs = [str(parse_spec(str(s))) for s in job.probe.specs]
        for spec in specs:
            if parse_spec(spec).needs_stats and job.engine != "hf":
                raise ValueError(
                    f"{spec!r} needs calibration activations, which only engine 'hf' collects"
                )
            for component in components:
                try:
                    check_applicable(spec, component.shape, has_stats=True)
                except ValueError as err:
                    raise ValueError(f"{component.name}: {err}") from None
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return Plan(job, model_dir, components, specs)


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
    node[leaf] = yaml.safe_load(raw)


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
    for assignment in overrides or []:
        _set_dotted(data, assignment)
    if "model" not in data:
        raise ConfigError(f"job file {path} has no 'model' key (a local HF folder or known name)")
    job = _build(JobConfig, data, "")
    check_fields(job)
    return job
