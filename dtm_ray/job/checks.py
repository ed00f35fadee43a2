"""The checks that read the model: a job against the model's config.json, its prompt sources cut
with the model's tokenizer, the token budget, the task names and a writable `out`. What passes
becomes a `CheckedJob`, the validated job everything after this layer runs from. Nothing is
created."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtm_ray.core.components import Component, select
from dtm_ray.core.specs import Spec, check_applicable, parse_spec
from dtm_ray.engines.config import DEFAULT_MAX_MODEL_LEN
from dtm_ray.engines.models import load_components, read_model_config
from dtm_ray.engines.prompts import (
    RUN_PREFIX,
    DrawnRoles,
    load_calibration,
    load_prompts,
    load_roles,
    load_training,
    overlapping,
    roles_record,
)
from dtm_ray.engines.sources import ModelSource, driver_folder, resolve_source
from dtm_ray.errors import ConfigError
from dtm_ray.job.memory import check_memory
from dtm_ray.job.spec import (
    DEFAULT_PROBE_SPECS,
    DTYPE_BITS,
    TEXT_GUIDES,
    CompressConfig,
    JobConfig,
    check_fields,
    check_target_bits,
    role_counts,
)
from dtm_ray.job.tasks import resolve_tasks


@dataclass
class CheckedJob:
    """A validated job: the model's source (what every node loads), the driver's folder of it
    (config, tokenizer, weight index), the selected components and, for probe-only jobs, the
    probes to run, in a fixed order."""

    job: JobConfig
    model_dir: Path
    components: list[Component]
    specs: list[str]
    # The decide prompts (what rounds probe), cut on the driver; None for `self`, which only an
    # engine can sample.
    prefixes: np.ndarray | None = None
    retry_failed: bool = True  # probe again, on resume, the probes a previous run recorded failed
    # The job's lm-eval tasks as `simple_evaluate` takes them (None: the job evaluates none).
    tasks: list[str | dict[str, Any]] | None = None
    source: ModelSource | None = None  # None only for a CheckedJob made by hand around a folder

    @property
    def model_source(self) -> ModelSource:
        return self.source if self.source is not None else resolve_source(str(self.model_dir))

    # Recovery training sequences [W, sequence_tokens], disjoint from the scored prompts and the
    # evaluation text (None: the job trains nothing).
    training: np.ndarray | None = None
    # A compressing job's held-out prompts: role (validate, test) -> prefixes, cut on the driver
    # like `prefixes` (empty for `self`, and for a probe-only job, which draws none).
    heldout: dict[str, np.ndarray] = field(default_factory=dict)
    # What run.json records of each role (`dtm_ray.engines.prompts.roles_record`).
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def role_prefixes(self, role: str) -> np.ndarray | None:
        """The prompts of a role as cut on the driver (None: an engine samples them)."""
        return self.prefixes if role == "decide" else self.heldout.get(role)

    @property
    def probes(self) -> list[tuple[Component, str]]:
        return [(c, s) for c in self.components for s in self.specs]

    @property
    def compress(self) -> CompressConfig | None:
        return self.job.compress


def check_job(job: JobConfig, read_hub: bool = True) -> CheckedJob:
    """Validate the whole job against the model's config.json, read and cut its prompts, and check
    that `out` can be written; raises ConfigError. Nothing is created anywhere.

    `read_hub=False` leaves `hf:` text sources unread (a dry run on a machine without the hub);
    a run reads them here, so a bad one still fails before any actor starts.
    """
    check_fields(job)
    check_out(job.out)
    source = resolve_source(job.model)
    try:
        model_dir = driver_folder(source)
        model_config = read_model_config(model_dir)
        every = load_components(model_dir)
        components = select(every, job.probe.components)
        if job.compress is None:
            specs = [str(parse_spec(str(s))) for s in job.probe.specs or DEFAULT_PROBE_SPECS]
            checked = specs
        elif job.compress.method == "sparsify":
            specs = []  # a compressing run derives its probes round by round
            checked = [str(Spec(job.compress.criterion, sparsity=0.5))]
            _check_min_fdt(job)
        else:
            specs = []
            checked = list(job.compress.levels)
            _check_min_fdt(job)
        for spec in checked:
            for component in components:
                try:
                    check_applicable(spec, component.shape, has_stats=True)
                except ValueError as err:
                    raise ValueError(f"{component.name}: {err}") from None
        check_token_budget(job, model_config)
        check_memory(job, model_config, components, every)
        drawn = _prepare_prompts(job, model_dir, model_config, read_hub)
        training = _training_text(job, model_dir, drawn)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    # lm-eval's task index is read once, here, and the result kept for the run.
    tasks = resolve_tasks(job.evaluate.tasks) if job.evaluate is not None else None
    p = job.prompts
    return CheckedJob(
        job,
        model_dir,
        components,
        specs,
        None if drawn is None else drawn.prefixes["decide"],
        tasks=tasks,
        training=training,
        source=source,
        heldout={} if drawn is None else {r: a for r, a in drawn.prefixes.items() if r != "decide"},
        roles=roles_record(p.source, role_counts(job), p.prefix_tokens, p.seed, drawn),
    )


def _check_min_fdt(job: JobConfig) -> None:
    min_fdt = job.compress.min_fdt
    if min_fdt is not None and min_fdt > job.new_tokens:
        raise ValueError(
            f"compress.min_fdt {min_fdt} exceeds new_tokens {job.new_tokens}, the largest FDT "
            "there is"
        )
    if job.compress.target_bits is not None and job.dtype == "auto":
        # What `auto` will resolve to on the job's actors: bfloat16 on a GPU, float32 elsewhere.
        gpu = job.resources_per_worker.get("GPU", 0) > 0
        dtype = "bfloat16" if gpu else "float32"
        check_target_bits(job.compress, DTYPE_BITS[dtype], f"dtype auto, {dtype} on these actors")


# Evaluation windows share no run of this many tokens with a training sequence.
EVALUATION_OVERLAP_TOKENS = 32


def _training_text(job: JobConfig, model_dir: Path, drawn: DrawnRoles | None) -> np.ndarray | None:
    """The recovery training sequences: windows of `compress.recovery.text` that overlap neither
    the scored prompts of any role (decide, validate, test) nor the evaluation windows. Where the
    training text is the prompts' or the evaluation's own source, the windows that overlap them
    (or repeat a whole scored prompt, or 32 tokens of an evaluation window, elsewhere) are left
    out; another source that holds them is an error: the measurements would reward memorising
    them."""
    compress = job.compress
    if compress is None or compress.method != "sparsify" or compress.recovery is None:
        return None
    recovery, p, e = compress.recovery, job.prompts, job.evaluation
    where = f"compress.recovery.text {recovery.text}"
    avoid = [(p.source, role_counts(job), p.prefix_tokens, p.seed), (e.text, e.count, e.tokens, 0)]
    try:
        windows = load_training(recovery.text, model_dir, recovery.sequence_tokens, avoid)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    evaluation = load_prompts(e.text, model_dir, e.count, e.tokens, seed=0)
    checks = [(evaluation, EVALUATION_OVERLAP_TOKENS, e.text, "the evaluation text")]
    if drawn is not None:
        prefixes = np.concatenate(list(drawn.prefixes.values()))
        checks.insert(0, (prefixes, p.prefix_tokens, p.source, "the scored prompts"))
    for others, k, source, what in checks:
        hits = overlapping(windows, others, k)
        if source == recovery.text:
            windows = windows[~hits]
        elif hits.any():
            raise ValueError(
                f"{where} shares {min(k, others.shape[1])} consecutive tokens with {what} "
                f"(training window {int(np.argmax(hits))}); train on text disjoint from {source}"
            )
    if len(windows) == 0:
        raise ValueError(f"{where}: no window is left apart from the prompts and evaluation")
    return windows


def check_token_budget(job: JobConfig, model_config: Mapping[str, Any]) -> None:
    """The longest sequence an engine sees must fit its context, for both engines alike (hf has
    no limit of its own and would run past the model's positions)."""
    needs = {"prompts.prefix_tokens + new_tokens": job.prompts.prefix_tokens + job.new_tokens}
    if job.compress is not None:
        needs["evaluation.tokens"] = job.evaluation.tokens
        if job.compress.recovery is not None:
            needs["compress.recovery.sequence_tokens"] = job.compress.recovery.sequence_tokens
    model_max = model_config.get("max_position_embeddings")
    asked = job.engine_options.get("max_model_len")
    if asked is not None:
        if model_max and asked > model_max:
            raise ValueError(
                f"engine_options.max_model_len {asked} exceeds the model's "
                f"max_position_embeddings {model_max}"
            )
        limit, where = asked, "engine_options.max_model_len"
    elif job.engine == "vllm" and (not model_max or model_max > DEFAULT_MAX_MODEL_LEN):
        limit = DEFAULT_MAX_MODEL_LEN
        where = "the vllm engine's default max_model_len (raise engine_options.max_model_len)"
    elif model_max:
        limit, where = model_max, "the model's max_position_embeddings"
    else:
        return
    for what, need in needs.items():
        if need > limit:
            raise ValueError(f"{what} = {need} tokens exceed {limit}, {where}")


def _prepare_prompts(
    job: JobConfig, model_dir: Path, model_config: Mapping[str, Any], read_hub: bool = True
) -> DrawnRoles | None:
    """Every role's prefixes from the prompt source (decide alone for a probe-only job; None for
    `self`, which an engine samples), and a check that the calibration and evaluation texts are
    there too: a bad source is found here, not inside an actor."""

    def unread(source: str) -> bool:
        return source == "self" or (not read_hub and source.startswith("hf:"))

    p, compress = job.prompts, job.compress
    wanda = compress is not None and compress.method == "sparsify" and compress.criterion == "wanda"
    if wanda and p.source.startswith(RUN_PREFIX):
        raise ValueError(
            f"compress.criterion wanda calibrates on text, and prompt source {p.source} "
            "holds only token prefixes; use a text source or criterion magnitude"
        )
    fisher = compress is not None and compress.guide in TEXT_GUIDES
    if fisher and p.source.startswith(RUN_PREFIX):
        raise ValueError(
            f"compress.guide {compress.guide} calibrates on text, and prompt source {p.source} "
            "holds only token prefixes; use a text source or guide weight_error"
        )
    calibrates = wanda or fisher
    counts = role_counts(job)
    drawn = None
    if not unread(p.source):
        drawn = load_roles(p.source, model_dir, counts, p.prefix_tokens, seed=p.seed)
        vocab = model_config.get("vocab_size")
        largest = max(int(a.max()) for a in drawn.prefixes.values())
        if vocab and largest >= vocab:
            raise ValueError(
                f"prompt source {p.source} holds token id {largest}, beyond this "
                f"model's vocabulary of {vocab}: it was made with another tokenizer"
            )
    if compress is None:
        return drawn
    if calibrates and not unread(p.source):
        length = p.prefix_tokens + job.new_tokens
        load_calibration(
            p.source,
            model_dir,
            compress.calibration_count,
            length,
            counts,
            p.prefix_tokens,
            seed=p.seed,
        )
    e = job.evaluation
    if not unread(e.text):
        load_prompts(e.text, model_dir, e.count, e.tokens, seed=0)
    return drawn


def check_out(out: str) -> None:
    """A local run directory must be creatable and writable; a URI must have a store URI's
    shape (scheme, bucket, prefix; no client is made: what the store holds is read when the
    run opens it)."""
    if "://" in out:
        from dtm_ray.records.store import check_store_uri

        check_store_uri(out, "out")
    if "://" in out and not out.startswith("file://"):
        return
    path = Path(out.removeprefix("file://")).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out {out} is a file, not a directory; choose another --out")
    existing = path
    while not existing.exists():  # the nearest ancestor there is (/ at worst)
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"out {out} cannot be created: {existing} is a file, not a directory")
    try:  # the only sure test of writability (a root user passes os.access even under /proc)
        handle, probe = tempfile.mkstemp(prefix=".dtm-ray-write-check-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(
            f"out {out} is not writable: cannot create files in {existing} ({err.strerror})"
        ) from None
