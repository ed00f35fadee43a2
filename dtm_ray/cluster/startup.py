"""Starting a job's engine pool: join Ray, start the engine actors, and wait until each has
loaded the model. `Engines` starts the pool on first use, so work read back from a run directory
starts none.

Starting actors is watched: while they wait to be placed the wait says which resources are
missing and what the cluster offers (`dtm_ray.cluster.placement`), and gives up after
`startup_timeout_s` plus the time to fetch and load the model's bytes; an actor that cannot
start (its constructor raised: the model does not fit, or is missing) ends the run with one line
naming the actor, its node and the cause (`StartupError`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from dtm_ray.cluster.actor import EngineActor, clear_startup_reports, start_engine_actors
from dtm_ray.cluster.logs import take_over_ray_output
from dtm_ray.cluster.placement import FIRST_REPORT_S, LOADING, REPORT_S, said_by, start_holdup
from dtm_ray.cluster.pool import EnginePool, actor_failure
from dtm_ray.engines.config import EngineConfig
from dtm_ray.engines.sources import ModelSource
from dtm_ray.errors import StartupError
from dtm_ray.log import log

# Start-up time allowed per byte of weights beyond `startup_timeout_s`: a node fetches them once
# and each actor reads them, at no less than this rate (a slow object store or disk).
STARTUP_BYTES_PER_S = 50e6


def startup_budget_s(timeout_s: float, model_bytes: int) -> float:
    """How long actors may take to start: `startup_timeout_s` plus the time to fetch and load a
    model of `model_bytes` at STARTUP_BYTES_PER_S (16 actors loading 138 GB need far more than
    a fixed 600 s)."""
    return timeout_s + model_bytes / STARTUP_BYTES_PER_S


def connect_ray() -> bool:
    """Join the Ray the caller set up: an initialized one, RAY_ADDRESS, or a fresh local one.

    Returns True when this call started or joined Ray (and so the caller should shut it down).
    """
    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler, which aborts the process; keep the caller's
    # (the CLI stops cleanly on SIGTERM: actors killed, Ray shut down, the lease released).
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # joins the cluster RAY_ADDRESS names (set by `ray job submit`)
    else:
        ray.init(include_dashboard=False)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    return True


@dataclass(frozen=True)
class PoolSpec:
    """What a pool needs to start its engine actors and drive them; nothing about the job."""

    model: ModelSource | str  # what each node materialises and loads (never a driver's path)
    engine: EngineConfig
    resources: dict[str, float]  # Ray resources of one actor
    max_in_flight: int  # calls queued per actor
    max_retries: int  # a task that raises is run again this often
    max_crashes: int  # a task whose actor dies under it is run again this often
    startup_timeout_s: float


class Engines:
    """The engine pool, started on first use (a finished run directory needs no actors)."""

    def __init__(self, spec: PoolSpec, workers: int, actor_class: type = EngineActor) -> None:
        self.spec, self.workers = spec, workers
        self.actor_class = actor_class
        self.infos: list[dict[str, Any]] = []  # each actor's `info()` once started
        self.on_start: Callable[[list[dict[str, Any]]], None] | None = None
        self._pool: EnginePool | None = None
        self._started_ray = False

    @property
    def pool(self) -> EnginePool:
        if self._pool is None:
            spec = self.spec
            self._started_ray = connect_ray()
            take_over_ray_output()  # engine chatter to the run's log file (dtm_ray.cluster.logs)
            resources = spec.resources
            log(f"starting {self.workers} engine actor(s) ({spec.engine.kind}, {resources})")
            actors = start_engine_actors(
                spec.model,
                spec.engine,
                self.workers,
                resources,
                self.actor_class,
            )
            self._pool = EnginePool(
                actors,
                spec.max_in_flight,
                spec.max_retries,
                spec.max_crashes,
                resources=dict(resources),
                # A restart loads the model again, so it may take as long as the start did.
                restart_timeout_s=spec.startup_timeout_s,
            )
            # Wait until every actor has loaded the model: a model that cannot load fails here,
            # once, rather than inside the first round's calls.
            size = spec.model.bytes if isinstance(spec.model, ModelSource) else 0
            budget = startup_budget_s(spec.startup_timeout_s, size)
            self.infos = wait_for_actors(actors, resources, budget)
            self._pool.names = [info["worker"] for info in self.infos]
            log(f"engines ready: {', '.join(self._pool.names)}")
            if self.on_start is not None:
                self.on_start(self.infos)
        return self._pool

    def release(self) -> None:
        """Kill the engine actors (the next use of `pool` starts new ones); Ray stays up."""
        if self._pool is not None:
            self._pool.kill()
            self._pool = None

    def close(self) -> None:
        self.release()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False


def wait_for_actors(
    actors: Sequence[Any], resources: dict[str, float], timeout_s: float
) -> list[dict[str, Any]]:
    """Each actor's `info()`, once all have started; while they wait, say every few seconds what
    holds them up (missing resources, or loading the model); StartupError after `timeout_s`."""
    # No retries: an actor that cannot start is reported once, not retried behind the scenes.
    calls = [actor.info.options(max_task_retries=0).remote() for actor in actors]
    pending = {ref: index for index, ref in enumerate(calls)}
    infos: list[dict[str, Any]] = [{} for _ in actors]
    start = time.monotonic()
    next_report = start + FIRST_REPORT_S
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in done:
            index = pending.pop(ref)
            try:
                infos[index] = ray.get(ref)
            except RayActorError as err:
                raise StartupError(actor_failure(err, f"engine-{index}", starting=True)) from err
        now = time.monotonic()
        if not pending:
            break
        waited = now - start
        if waited >= timeout_s:
            holdup = start_holdup(resources, len(actors))
            raise StartupError(
                f"gave up after {waited:.0f} s (startup_timeout_s): {len(pending)} of "
                f"{len(actors)} engine actor(s) never started; {holdup}"
            )
        if now >= next_report:
            holdup = start_holdup(resources, len(actors))
            if holdup == LOADING:  # what each says it is doing, in its own words
                holdup = said_by(sorted(pending.values())) or holdup
            log(
                f"waiting {waited:.0f} s for {len(pending)} engine actor(s): "
                f"{holdup}; giving up after {timeout_s:.0f} s"
            )
            next_report = now + REPORT_S
    clear_startup_reports()
    return infos
