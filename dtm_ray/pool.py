"""A pool of engine actors: broadcast a call, split work across actors, and fan out many small
tasks with a bounded number in flight per actor and retries for tasks that fail on their own.
`Engines` starts a job's pool on first use, so work read back from a run directory starts none.

A task that raises inside the actor (a `RayTaskError`) is the task's own failure: it is retried
up to `max_retries` times, then reported failed with the error. An actor that dies is not the
task's fault: Ray restarts the actor and re-runs its queued calls (`max_task_retries=-1`), so the
pool sees nothing. Only an actor gone for good (its node removed) stops the fan-out.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError, RayTaskError

from dtm_ray.actor import start_engine_actors
from dtm_ray.config import Plan
from dtm_ray.logs import take_over_ray_output
from dtm_ray.models import is_known
from dtm_ray.progress import log


@dataclass
class Task:
    key: Hashable
    args: tuple  # positional arguments of the actor method
    attempts: int = 0


@dataclass
class Outcome:
    task: Task
    value: Any = None  # the method's return value when ok
    error: str | None = None  # the error text when the task failed for good


def error_text(err: RayTaskError) -> str:
    cause = getattr(err, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


@dataclass
class EnginePool:
    actors: list[Any]
    max_in_flight: int = 2
    max_retries: int = 2

    def call(self, method: str, *args: Any) -> Any:
        """One call on the first actor."""
        return ray.get(getattr(self.actors[0], method).remote(*args))

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def split(self, method: str, items: np.ndarray, *args: Any) -> list[Any]:
        """`items` cut into one chunk per actor, in order, each chunk the method's first
        argument; returns the per-chunk results in order."""
        chunks = [c for c in np.array_split(items, len(self.actors)) if len(c)]
        calls = [
            getattr(actor, method).remote(chunk, *args)
            for actor, chunk in zip(self.actors, chunks, strict=False)
        ]
        return ray.get(calls)

    def spread(self, calls: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Independent calls (method, args) spread over the actors round-robin, in parallel."""
        refs = [
            getattr(self.actors[i % len(self.actors)], method).remote(*args)
            for i, (method, args) in enumerate(calls)
        ]
        return ray.get(refs)

    def run(
        self,
        method: str,
        tasks: Sequence[Task],
        on_outcome: Callable[[Outcome], None],
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Every task once (retrying its own failures); `on_outcome` as each finishes.

        `tick` runs about once a second while tasks are in flight (e.g. a timed flush).
        """
        queue = deque(tasks)
        in_flight: dict[ray.ObjectRef, tuple[int, Task]] = {}
        load = [0] * len(self.actors)

        def fill() -> None:
            for index, actor in enumerate(self.actors):
                while queue and load[index] < self.max_in_flight:
                    task = queue.popleft()
                    task.attempts += 1
                    in_flight[getattr(actor, method).remote(*task.args)] = (index, task)
                    load[index] += 1

        fill()
        while in_flight:
            done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done:
                index, task = in_flight.pop(ref)
                load[index] -= 1
                outcome = self._collect(ref, task, queue)
                if outcome is not None:
                    on_outcome(outcome)
            if tick is not None:
                tick()
            fill()

    def _collect(self, ref: ray.ObjectRef, task: Task, queue: deque[Task]) -> Outcome | None:
        try:
            return Outcome(task, value=ray.get(ref))
        except RayTaskError as err:  # the task itself raised
            if task.attempts <= self.max_retries:
                queue.appendleft(task)
                return None
            return Outcome(task, error=error_text(err))
        except RayError as err:  # the actor is gone for good (its node died, or it was removed)
            raise RuntimeError(f"engine actor lost while running {task.key}: {err}") from err

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


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
            take_over_ray_output()  # engine chatter to the run's log file (dtm_ray.logs)
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
            ray.shutdown()
            self._started_ray = False
