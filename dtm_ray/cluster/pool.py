"""A pool of engine actors: broadcast a call, split work across actors, and fan out many small
tasks with a bounded number in flight per actor and retries for tasks that fail on their own.
Starting the pool and waiting for its actors is `dtm_ray.cluster.startup`.

A task that raises inside the actor (a `RayTaskError`) is the task's own failure: it is retried
up to `max_retries` times, then reported failed with the error. When an actor dies under a fan-out
task, Ray restarts the actor and the pool runs the task again, up to `max_crashes` times: a probe
that kills its actor every time (a poison probe) is then reported failed and the others go on.
The calls queued behind it on the same actor were not run and are resubmitted without blame.

A crashed actor is marked down and gets no work until it answers again: its restart may take
a while (a lost node is declared dead after some seconds, then the actor waits for room on
another node, then loads the model), and a call sent to it meanwhile fails at once without
running. The pool asks it `info()` with growing pauses; its work goes to the other actors;
when every actor is down the pool waits, saying what holds the restart up, and gives up after
`restart_timeout_s`. Broadcasts and other calls outside the fan-out wait for the actors they
need the same way and run again when an actor dies under them (they are idempotent: each
carries the state it needs).
"""

from __future__ import annotations

import itertools
import re
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError, RayTaskError

from dtm_ray.cluster.actor import clear_startup_reports
from dtm_ray.cluster.placement import FIRST_REPORT_S, RELOADING, REPORT_S, restart_holdup, said_by
from dtm_ray.errors import StartupError, UserError, missing_requirement
from dtm_ray.log import log

# A crashed actor is asked whether it is back after these pauses (the last one repeats).
CHECK_DELAYS_S = (0.5, 1.0, 2.0, 4.0)
# A fan-out over at least GATHER_FROM calls in flight, once the driver has caught up, takes the
# first call to finish and those that finish within a short window after it, so that one pass
# over the calls in flight (ray.wait's cost grows with their number) serves many completions. The
# window is GATHER_SHARE of the shortest call seen so far (GATHER_SHARE_ALONE when each actor
# runs one call at a time and so idles until it is refilled), and at most GATHER_MAX_S.
GATHER_FROM = 32
GATHER_SHARE = 0.1  # a freed actor still runs a queued call, at least this long
GATHER_SHARE_ALONE = 0.01
GATHER_MAX_S = 0.2


@dataclass
class Task:
    key: Hashable
    args: tuple  # positional arguments of the actor method
    attempts: int = 0  # tries that ran in this call, retries and crashes included
    crashes: int = 0  # tries whose actor died under them
    earlier: int = 0  # tries spent by earlier runs (a failed probe run again on resume)

    @property
    def tries(self) -> int:
        return self.earlier + self.attempts


@dataclass
class Outcome:
    task: Task
    value: Any = None  # the method's return value when ok
    error: str | None = None  # the error text when the task failed for good


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# What Python says of a module it cannot find, also inside Ray's text of a failed actor.
_NO_MODULE = re.compile(r"No module named '([^']+)'")
# The last line of a remote traceback that ends in one of dtm_ray's errors.
_OUR_ERROR = re.compile(r"^dtm_ray\.errors\.\w+: (.+)$")


def error_text(err: Exception) -> str:
    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):  # its message is the whole story (a missing requirement)
        return str(cause)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = _ANSI.sub("", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ours = _OUR_ERROR.match(lines[-1]) if lines else None
    if ours:  # one of dtm_ray's one-line errors, raised in the actor (a missing requirement)
        return ours[1]
    missing = _NO_MODULE.search(text)
    if missing:
        # The actor's module could not be imported on its node (Ray's worker lacks a requirement).
        error = ModuleNotFoundError(missing[0], name=missing[1])
        found = missing_requirement(error, python="the Python of Ray's workers on that node")
        if found is not None:
            return str(found)
    return lines[-1] if lines else type(err).__name__


def actor_failure(err: RayActorError, name: str, starting: bool = False) -> str:
    """One line: which actor, on which node, and why (the last line of its traceback)."""
    text = _ANSI.sub("", str(err))
    node = re.search(r"\bip=([0-9a-fA-F.:]+)", text)
    where = f" on node {node[1]}" if node else ""
    if getattr(err, "actor_init_failed", False):
        return f"engine actor {name}{where} could not start: {error_text(err)}"
    if starting:  # its process died while loading: out of memory, most often
        return f"engine actor {name}{where} died while loading the model: {error_text(err)}"
    return f"engine actor {name}{where} is gone and cannot be restarted: {error_text(err)}"


@dataclass
class EnginePool:
    actors: list[Any]
    max_in_flight: int = 2
    max_retries: int = 2
    max_crashes: int = 2
    names: list[str] | None = None  # the actors' worker names, for messages
    resources: dict[str, float] = field(default_factory=dict)  # of one actor, for messages
    restart_timeout_s: float = 600.0  # how long a crashed actor may take to come back
    # Actors that crashed and have not answered since: index -> when (time.monotonic()).
    down: dict[int, float] = field(default_factory=dict)

    def name(self, index: int) -> str:
        return self.names[index] if self.names else f"engine-{index}"

    def _index_of(self, err: RayActorError) -> int | None:
        for index, actor in enumerate(self.actors):
            if actor._actor_id.hex() == getattr(err, "actor_id", None):
                return index
        return None

    # --- crashed actors: down until they answer again -----------------------------------------
    def ping(self, index: int) -> ray.ObjectRef:
        return self.actors[index].info.options(max_task_retries=0).remote()

    def mark_down(self, index: int) -> None:
        self.down.setdefault(index, time.monotonic())

    def mark_up(self, index: int, info: dict[str, Any]) -> None:
        since = self.down.pop(index, None)
        if since is None:
            return
        clear_startup_reports(index)
        old = self.name(index)
        if self.names:
            self.names[index] = info["worker"]
        log(f"{old} is back after {time.monotonic() - since:.0f} s as {info['worker']}")

    def answered(self, index: int, ref: ray.ObjectRef, timeout: float | None = None) -> bool:
        """Whether a down actor answered the ping `ref` (and is up again); an actor that is gone
        for good (its restarts used up, or its constructor failed) ends the run in one line."""
        try:
            info = ray.get(ref, timeout=timeout)
        except ActorDiedError as err:
            raise StartupError(actor_failure(err, self.name(index))) from err
        except (RayActorError, GetTimeoutError):
            return False  # still restarting
        self.mark_up(index, info)
        return True

    def waiting(self, started: float) -> str:
        """How long the down actors have been restarting, and what holds them up."""
        names = ", ".join(self.name(i) for i in sorted(self.down))
        holdup = restart_holdup(self.resources)
        if holdup == RELOADING:  # what each says it is doing (fetching on a new node, loading)
            holdup = said_by(sorted(self.down)) or holdup
        return f"waiting {time.monotonic() - started:.0f} s for {names} to restart: {holdup}"

    def give_up(self, started: float) -> StartupError:
        names = ", ".join(self.name(i) for i in sorted(self.down))
        return StartupError(
            f"gave up after {time.monotonic() - started:.0f} s (startup_timeout_s): {names} "
            f"crashed and did not restart; {restart_holdup(self.resources)}"
        )

    def wait_until_up(self, need_all: bool) -> list[int]:
        """The indexes of the actors that are up, once all are (`need_all`) or at least one is;
        meanwhile the down ones are pinged with growing pauses and the wait is reported."""
        start = min(self.down.values(), default=time.monotonic())
        next_report = time.monotonic() + FIRST_REPORT_S
        pauses = itertools.chain(CHECK_DELAYS_S, itertools.repeat(CHECK_DELAYS_S[-1]))
        while True:
            for index in sorted(self.down):
                self.answered(index, self.ping(index), timeout=30.0)
            up = [i for i in range(len(self.actors)) if i not in self.down]
            if up and (not need_all or not self.down):
                return up
            now = time.monotonic()
            if now - start >= self.restart_timeout_s:
                raise self.give_up(start)
            if now >= next_report:
                log(self.waiting(start))
                next_report = now + REPORT_S
            time.sleep(next(pauses))

    # --- calls outside the fan-out ------------------------------------------------------------
    def _settled(
        self, what: str, submit: Callable[[list[int]], list[ray.ObjectRef]], need_all: bool
    ) -> list[Any]:
        """ray.get of the calls `submit(up actors)` makes; when an actor dies under them, wait
        until it is back and make them again (at most `max_crashes` times)."""
        for attempt in itertools.count(1):
            refs = submit(self.wait_until_up(need_all))
            try:
                return ray.get(refs)
            except ActorDiedError as err:  # gone for good
                index = self._index_of(err)
                name = self.name(index) if index is not None else "engine"
                raise StartupError(actor_failure(err, name)) from err
            except RayActorError as err:  # it died and Ray is restarting it
                index = self._index_of(err)
                name = self.name(index) if index is not None else "an engine actor"
                if attempt > self.max_crashes:
                    raise StartupError(
                        f"{name} died under {what} {attempt} times (killed or crashed: out of "
                        f"memory, a signal or a native fault): {error_text(err)}"
                    ) from err
                log(f"{name} died under {what}; it runs again once the actor is back")
                for i in [index] if index is not None else range(len(self.actors)):
                    self.mark_down(i)
        raise AssertionError("unreachable")

    def _submit(self, index: int, method: str, *args: Any) -> ray.ObjectRef:
        # No retries by Ray: `_settled` waits for a restarted actor and runs the call again.
        return getattr(self.actors[index], method).options(max_task_retries=0).remote(*args)

    def call(self, method: str, *args: Any) -> Any:
        """One call on the first actor that is up."""
        return self._settled(method, lambda up: [self._submit(up[0], method, *args)], False)[0]

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        every = range(len(self.actors))
        return self._settled(
            method, lambda _: [self._submit(i, method, *args) for i in every], True
        )

    def split(self, method: str, items: np.ndarray, *args: Any) -> list[Any]:
        """`items` cut into one chunk per actor, in order, each chunk the method's first
        argument; returns the per-chunk results in order. The chunks do not depend on which
        actors are up (an actor that is down has its chunk run by another), so neither do the
        results."""
        chunks = [c for c in np.array_split(items, len(self.actors)) if len(c)]

        def submit(up: list[int]) -> list[ray.ObjectRef]:
            return [
                self._submit(up[k % len(up)], method, chunk, *args)
                for k, chunk in enumerate(chunks)
            ]

        return self._settled(method, submit, False)

    def spread(self, calls: Sequence[tuple[str, tuple]]) -> list[Any]:
        """Independent calls (method, args) spread over the actors round-robin, in parallel."""

        def submit(up: list[int]) -> list[ray.ObjectRef]:
            return [
                self._submit(up[k % len(up)], method, *args)
                for k, (method, args) in enumerate(calls)
            ]

        what = ", ".join(sorted({method for method, _ in calls}))
        return self._settled(what, submit, False)

    def run(
        self,
        method: str,
        tasks: Sequence[Task],
        on_outcome: Callable[[Outcome], None],
        tick: Callable[[], None] | None = None,
    ) -> None:
        """Every task once (retrying its own failures and its actor's crashes, both bounded);
        `on_outcome` as each finishes.

        `tick` runs about once a second while tasks are in flight or wait (e.g. a timed flush).
        """
        fan_out = _FanOut(self, method, tasks)
        fan_out.fill()
        while fan_out.in_flight or fan_out.queue:
            waits = [*fan_out.in_flight, *fan_out.checks]
            if waits:
                # Every call finished by now, then (when none has) the first to finish and, with
                # many in flight, those that finish soon after it: one pass over the calls in
                # flight serves all the completions it finds, so with hundreds of actors the
                # driver does not scan them all once per completion.
                done = ray.wait(waits, num_returns=len(waits), timeout=0)[0]
                if not done:
                    done = ray.wait(waits, num_returns=1, timeout=1.0)[0]
                    window = fan_out.gather_window(len(waits)) if done else 0.0
                    if window > 0:
                        done = ray.wait(waits, num_returns=len(waits), timeout=window)[0]
            else:
                done = []
                time.sleep(0.2)  # every actor is down and its next ping is not due yet
            for ref in done:
                if ref in fan_out.checks:
                    fan_out.checked(ref)
                elif ref in fan_out.in_flight:  # a crash may have settled it already
                    outcome = fan_out.settle(ref)
                    if outcome is not None:
                        on_outcome(outcome)
            fan_out.check_down()
            if tick is not None:
                tick()
            fan_out.fill()

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


class _FanOut:
    """The bookkeeping of one `EnginePool.run`: what waits, what runs where, in which order."""

    def __init__(self, pool: EnginePool, method: str, tasks: Sequence[Task]) -> None:
        self.pool, self.method = pool, method
        self.queue = deque(tasks)
        # ref -> (actor index, submission number, task); an actor runs its calls in that order.
        self.in_flight: dict[ray.ObjectRef, tuple[int, int, Task]] = {}
        self.sent_at: dict[ray.ObjectRef, float] = {}  # ref -> when it was submitted
        self.shortest = float("inf")  # the shortest call so far, submission to completion
        self.load = [0] * len(pool.actors)
        # The actors that are up and have room for another call (an ordered set): `fill` visits
        # these only, not every actor, after each completion.
        up = [i for i in range(len(pool.actors)) if i not in pool.down]
        self.free: dict[int, None] = dict.fromkeys(up)
        self.numbers = itertools.count()
        # Per actor, the last submission number its latest crash took down: a call numbered at
        # or below it that failed with the actor was queued behind the crashing one, not run.
        self.crashed_upto = [-1] * len(pool.actors)
        # Pings to down actors (ref -> actor index), and when each down actor is pinged next.
        self.checks: dict[ray.ObjectRef, int] = {}
        self.next_check: dict[int, tuple[float, int]] = {}  # index -> (time, pauses so far)
        self.next_report = 0.0

    def _room(self, index: int) -> None:
        """Note whether actor `index` can take another call now."""
        if index not in self.pool.down and self.load[index] < self.pool.max_in_flight:
            self.free[index] = None
        else:
            self.free.pop(index, None)  # calls sent to a down actor would fail without running

    def gather_window(self, waiting: int) -> float:
        """How long to collect completions after the first, with `waiting` refs in flight."""
        if waiting < GATHER_FROM or self.shortest == float("inf"):
            return 0.0
        share = GATHER_SHARE if self.pool.max_in_flight > 1 else GATHER_SHARE_ALONE
        return min(GATHER_MAX_S, share * self.shortest)

    def fill(self) -> None:
        for index in sorted(self.free) if self.queue else ():
            actor = self.pool.actors[index]
            while self.queue and self.load[index] < self.pool.max_in_flight:
                task = self.queue.popleft()
                task.attempts += 1
                # No retries by Ray: the pool itself counts a crash against the call that ran.
                call = getattr(actor, self.method).options(max_task_retries=0)
                ref = call.remote(*task.args)
                self.in_flight[ref] = (index, next(self.numbers), task)
                self.sent_at[ref] = time.monotonic()
                self.load[index] += 1
            self._room(index)

    # --- down actors ----------------------------------------------------------------------------
    def check_down(self) -> None:
        """Ping the down actors whose pause is over; report the wait now and then, and give up
        when every actor has been down longer than the pool's `restart_timeout_s`."""
        pool, now = self.pool, time.monotonic()
        if not pool.down:
            return
        pinged = set(self.checks.values())
        for index in pool.down:
            at, pauses = self.next_check.get(index, (now, 0))
            if index not in pinged and now >= at:
                self.checks[pool.ping(index)] = index
                pause = CHECK_DELAYS_S[min(pauses, len(CHECK_DELAYS_S) - 1)]
                self.next_check[index] = (now + pause, pauses + 1)
        if not self.queue:
            return  # nothing waits for them; the calls in flight finish on the others
        started = min(pool.down.values())
        if len(pool.down) == len(pool.actors) and now - started >= pool.restart_timeout_s:
            raise pool.give_up(started)
        if now >= self.next_report:
            if now - started >= FIRST_REPORT_S:
                log(f"{pool.waiting(started)}; {len(self.queue)} call(s) wait")
                self.next_report = now + REPORT_S

    def checked(self, ref: ray.ObjectRef) -> None:
        index = self.checks.pop(ref)
        if self.pool.answered(index, ref):
            self.next_check.pop(index, None)
            self._room(index)

    def _take(self, ref: ray.ObjectRef) -> tuple[int, int, Task]:
        index, number, task = self.in_flight.pop(ref)
        self.shortest = min(self.shortest, time.monotonic() - self.sent_at.pop(ref))
        self.load[index] -= 1
        self._room(index)
        return index, number, task

    def _again(self, task: Task, ran: bool) -> None:
        if not ran:
            task.attempts -= 1
        self.queue.appendleft(task)

    def settle(self, ref: ray.ObjectRef) -> Outcome | None:
        """The outcome of a finished call, or None when its task was queued to run again."""
        index, number, task = self._take(ref)
        try:
            return Outcome(task, value=ray.get(ref))
        except RayTaskError as err:  # the task itself raised
            if task.attempts <= self.pool.max_retries:
                self._again(task, ran=True)
                return None
            return Outcome(task, error=error_text(err))
        except ActorDiedError as err:  # gone for good: restarts used up, or it cannot start
            raise StartupError(actor_failure(err, self.pool.name(index))) from err
        except RayActorError as err:  # the actor died (or its node) and Ray is restarting it
            if number <= self.crashed_upto[index]:
                self._again(task, ran=False)  # queued behind the call that crashed
                return None
            return self._crashed(index, number, task, err)

    def _crashed(self, index: int, number: int, task: Task, err: RayActorError) -> Outcome | None:
        """The actor died under one of its calls: blame the earliest submitted one that failed
        (the one it was running), requeue the rest, and record the blamed task failed once it
        has taken its actor down more than `max_crashes` times."""
        mine = sorted((n, ref) for ref, (i, n, _) in self.in_flight.items() if i == index)
        self.crashed_upto[index] = max([number, *(n for n, _ in mine)])
        suspect = task
        earlier = [ref for n, ref in mine if n < number]
        if earlier:
            # Calls submitted before this one either finished before the crash or died with it.
            ray.wait(earlier, num_returns=len(earlier), timeout=5.0)
            for ref in earlier:
                try:
                    ray.get(ref, timeout=0)
                except RayActorError:
                    suspect = self._take(ref)[2]
                    self._again(task, ran=False)  # this call was queued behind the suspect
                    break
                except Exception:  # noqa: BLE001 - it finished (or raised) on its own
                    continue
        suspect.crashes += 1
        what = getattr(suspect.key, "key", suspect.key)  # a probe's (component, spec)
        log(
            f"{self.pool.name(index)} died while running {what} (crash {suspect.crashes} of "
            f"at most {self.pool.max_crashes + 1}); Ray restarts it"
        )
        self.pool.mark_down(index)
        self._room(index)
        if suspect.crashes > self.pool.max_crashes:
            text = (
                f"its engine actor died under it {suspect.crashes} times (killed or crashed: "
                f"out of memory, a signal or a native fault; {type(err).__name__})"
            )
            return Outcome(suspect, error=text)
        self._again(suspect, ran=True)
        return None
