"""One round on a pool of engine actors: its reference, its calibration and its probes, each
read back from the run directory when a previous invocation already wrote it (resume).

Nothing here decides anything: the loops hand in the state and the probes to run, and get
tables back. Engine actors start only when something is left to compute (`Engines.pool`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from dtm_ray.cluster.actor import EngineActor, RoundContext
from dtm_ray.cluster.pool import Outcome, Task
from dtm_ray.cluster.startup import Engines, PoolSpec
from dtm_ray.core.components import Component
from dtm_ray.core.metrics import fdt_at
from dtm_ray.core.state import ModelState, Reference, concat_references
from dtm_ray.engines.prompts import role_seed
from dtm_ray.job.checks import CheckedJob
from dtm_ray.job.spec import JobConfig, role_counts
from dtm_ray.log import log
from dtm_ray.loop.progress import ProbeWriter, Progress, Streaming
from dtm_ray.records.schemas import (
    CALIBRATION_SCHEMA,
    NOISE_SCHEMA,
    calibration_from_table,
    calibration_table,
    noise_table,
    probe_failed_row,
    probe_ok_row,
    reference_from_table,
    reference_table,
)
from dtm_ray.records.store import RunStore


class JobEngines(Engines):
    """A job's engine pool: actors started with the job's settings, and the checked job beside
    them for the rounds that run on it."""

    def __init__(self, checked: CheckedJob, workers: int, actor_class: type = EngineActor) -> None:
        job = checked.job
        spec = PoolSpec(
            model=checked.model_source,
            engine=job.engine_config(),
            resources=job.resources_per_worker,
            max_in_flight=job.max_in_flight_per_worker,
            max_retries=job.max_probe_retries,
            max_crashes=job.max_probe_crashes,
            startup_timeout_s=job.startup_timeout_s,
        )
        super().__init__(spec, workers, actor_class)
        self.checked = checked


@dataclass(frozen=True)
class Probe:
    """One probe of a round: `spec` applied on top of the round's state to `component`, or to
    every component of `delta` when given (a candidate set; `component` is its last member)."""

    component: Component
    spec: str
    added: float | None = None  # the added sparsity, for sparsify probes
    delta: tuple[str, ...] | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.component.name, self.spec

    @property
    def names(self) -> tuple[str, ...]:
        return self.delta if self.delta is not None else (self.component.name,)


@dataclass
class RoundReference:
    reference: Reference
    current_fdt: np.ndarray  # the round's current model against the reference, per prompt
    current_nll: np.ndarray
    current_sdt: np.ndarray | None = None  # None: all 0 (the reference is the model's own)

    @property
    def base_fdt(self) -> float:
        return float(fdt_at(self.current_fdt, 75))

    @property
    def base_nll(self) -> float:
        return float(np.mean(self.current_nll))

    @property
    def expected(self) -> tuple[np.ndarray, np.ndarray]:
        """(FDT, SDT) per prompt of the round's model against the reference, as stored."""
        sdt = self.current_sdt
        return self.current_fdt, sdt if sdt is not None else np.zeros_like(self.current_fdt)


def source_for_actors(source: str) -> str:
    # Actors may run in another working directory; a local file is passed by absolute path.
    path = Path(source)
    return str(path.resolve()) if path.is_file() else source


def _read_round_reference(
    store: RunStore, round_: int, role: str = "decide"
) -> RoundReference | None:
    table = store.read_reference(round_, role)
    if table is None:
        return None
    return RoundReference(
        reference_from_table(table),
        np.asarray(table.column("current_fdt").to_pylist()),
        np.asarray(table.column("current_nll").to_pylist(), dtype=np.float64),
        np.asarray(table.column("current_sdt").to_pylist()),
    )


def scored_prefixes(engines: JobEngines) -> np.ndarray:
    """The job's prompt prefixes: cut on the driver when the job was checked; only `self` (the
    model's own samples) needs an engine to draw them."""
    if engines.checked.prefixes is not None:
        return engines.checked.prefixes
    p = engines.checked.job.prompts
    source = source_for_actors(p.source)
    return engines.pool.call("load_prompts", source, p.count, p.prefix_tokens, p.seed)


def build_heldout(engines: JobEngines, store: RunStore, role: str) -> RoundReference:
    """The dense model's reference on a compressing job's `role` prompts (validate or test):
    stored in `validate/` or `test/`, or built once (split over the actors) and stored."""
    stored = _read_round_reference(store, 0, role)
    if stored is not None:
        return stored
    checked, job = engines.checked, engines.checked.job
    pool = engines.pool  # started here when nothing started it yet: not part of the time below
    prefixes = checked.role_prefixes(role)
    if prefixes is None:  # `self`: each role samples from its own sampler seeds
        p = job.prompts
        count = role_counts(job)[role]
        seed = role_seed(p.seed, role)
        prefixes = pool.call(
            "load_prompts", source_for_actors(p.source), count, p.prefix_tokens, seed
        )
    started = time.monotonic()
    parts = pool.split("build_reference", prefixes, ModelState(), job.new_tokens)
    reference = concat_references(parts)
    built_by = [
        info
        for info, part in zip(engines.infos, parts, strict=False)
        for _ in range(len(part.prefixes))
    ]
    store.write_reference(reference_table(reference, 0, built_by=built_by), 0, role)
    log(
        f"the dense reference on the {len(prefixes)} {role} prompts: built in "
        f"{time.monotonic() - started:.1f} s"
    )
    return _read_round_reference(store, 0, role)


def build_reference(
    engines: JobEngines, store: RunStore, job: JobConfig, round_: int, state: ModelState
) -> RoundReference:
    """The round's reference from its current model: stored, or built and stored.

    Round 0 draws the prompts; later rounds reuse round 0's prompts with the current model's own
    greedy continuation.
    """
    stored = _read_round_reference(store, round_)
    if stored is not None:
        return stored
    pool = engines.pool
    if round_ == 0:
        log(f"building the reference: {job.prompts.count} prompts, {job.new_tokens} tokens")
        prefixes = scored_prefixes(engines)
    else:
        log(f"round {round_}: rebuilding the reference with the current model")
        prefixes = reference_of(store, 0).prefixes
    started = time.monotonic()
    parts = pool.split("build_reference", prefixes, state, job.new_tokens)
    reference = concat_references(parts)
    # pool.split gives actor i the i-th chunk; each prompt row names the actor that built it.
    built_by = [
        info
        for info, part in zip(engines.infos, parts, strict=False)
        for _ in range(len(part.prefixes))
    ]
    table = reference_table(reference, round_, built_by=built_by)
    store.write_reference(table, round_)
    log(f"round {round_}: reference built in {time.monotonic() - started:.1f} s")
    return _read_round_reference(store, round_)


def reuse_reference(
    engines: JobEngines, store: RunStore, round_: int, state: ModelState
) -> RoundReference:
    """Round `round_` measured against the dense model's reference (`reference: original`): the
    round-0 reference, with the current model's own scores against it."""
    stored = _read_round_reference(store, round_)
    if stored is not None:
        return stored
    dense = reference_of(store, 0)
    current = engines.pool.call("score", state, dense)
    table = reference_table(
        dense, round_, current.fdt.tolist(), current.sdt.tolist(), current.nll.tolist()
    )
    store.write_reference(table, round_)
    return _read_round_reference(store, round_)


def noise_floor(
    engines: JobEngines,
    store: RunStore,
    round_: int,
    state: ModelState,
    reference: Reference,
    expected: tuple[np.ndarray, np.ndarray] | None = None,
    needed: bool = True,
) -> pa.Table | None:
    """The round's noise floor per engine actor: stored, or measured and stored (`noise/`,
    one file per round, so a resumed round reads it back and never adds rows).

    Every actor scores the round's model, unmodified, against the round's reference (a null
    probe), before the round's probes are read. `expected` is (FDT, SDT) per prompt of that
    model as the run stored it (`RoundReference.expected`); None: the first actor's own result
    (a quantize round's model against the dense reference, which the run scores nowhere else).

    Cost per round: one scoring pass per actor, all actors at once, over the P prompts x
    (prefix + N) tokens -- the time of one probe without layer skip, no decoding: about
    1 / (probes per actor) of a round. `needed=False` only reads (a round whose probes are all
    done: a finished run from before this table starts no engine to fill it in)."""
    stored = store.read_round_table("noise", NOISE_SCHEMA, round_)
    if stored is not None or not needed:
        return stored
    import ray

    # The pool first: it joins or starts Ray (and shuts down what it started); `ray.put` before
    # it would start a Ray of its own, left running past the run with dtm-ray's printer bound.
    pool = engines.pool
    context = ray.put(RoundContext(round_, state, reference))
    measured = pool.broadcast("null_probe", context)
    fdt, sdt = expected if expected is not None else (measured[0]["fdt"], measured[0]["sdt"])
    table = noise_table(round_, measured, reference.n_new, fdt, sdt)
    store.write_round_table("noise", round_, table)
    rows = table.to_pylist()
    worst = max(rows, key=lambda r: (r["noise_positions"], r["noise_prompts"]))
    seconds = max(r["seconds"] for r in rows)
    if worst["noise_positions"] or worst["noise_prompts"]:
        on = sum(r["batch_invariant"] for r in rows)
        log(
            f"round {round_}: noise floor: {worst['worker']} departs from the reference on "
            f"{worst['noise_prompts']} of {worst['prompts']} prompts "
            f"({worst['noise_positions']} positions; batch-invariant on {on} of "
            f"{len(rows)} actor(s)): its probes read damage the model does not have"
        )
    else:
        log(f"round {round_}: noise floor 0 on all {len(rows)} actor(s) ({seconds:.1f} s)")
    return table


def reference_of(store: RunStore, round_: int, role: str = "decide") -> Reference:
    table = store.read_reference(round_, role)
    if table is None:
        what = f"round {round_}" if role == "decide" else f"the {role} prompts"
        raise RuntimeError(f"the run has no reference for {what}")
    return reference_from_table(table)


def calibrate(
    engines: JobEngines,
    store: RunStore,
    job: JobConfig,
    round_: int,
    state: ModelState,
    names: Sequence[str],
    count: int,
) -> dict[str, np.ndarray]:
    """Wanda's input norms of the round's current model on calibration sequences that overlap
    none of the scored prompts of any role; stored per round so every replay uses exactly
    these."""
    stored = store.read_round_table("calibration", CALIBRATION_SCHEMA, round_)
    if stored is not None:
        return calibration_from_table(stored)
    sequences = calibration_sequences(engines, job, count)
    norms = engines.pool.call("input_norms", state, sequences, list(names))
    store.write_round_table("calibration", round_, calibration_table(round_, norms))
    return norms


def calibration_sequences(engines: JobEngines, job: JobConfig, count: int) -> np.ndarray:
    """`count` calibration sequences of prefix + new tokens from the prompt source, overlapping
    none of the scored prompts of any role (the same draw for the same job: seeded)."""
    p = job.prompts
    return engines.pool.call(
        "load_calibration",
        source_for_actors(p.source),
        count,
        p.prefix_tokens + job.new_tokens,
        (role_counts(job), p.prefix_tokens),
        p.seed,
    )


def read_calibration(store: RunStore) -> dict[int, dict[str, np.ndarray]]:
    """Every round's calibration norms: round -> component -> norm."""
    out: dict[int, dict[str, np.ndarray]] = {}
    for round_ in store.rounds_written("calibration"):
        table = store.read_round_table("calibration", CALIBRATION_SCHEMA, round_)
        out[round_] = calibration_from_table(table)
    return out


def run_probes(
    engines: JobEngines,
    store: RunStore,
    context: RoundContext,
    probes: Sequence[Probe],
    streaming: Streaming,
) -> int:
    """Run the probes of the round not yet in the run directory, streaming rows as they finish;
    compact the round's files at the end. Returns how many ran."""
    import ray

    round_ = context.round
    retry_failed = engines.checked.retry_failed
    done = store.finished_probes(round_, failed=not retry_failed)
    pending = [p for p in probes if p.key not in done]
    # A failed probe tried again keeps counting its tries from where the last run left it.
    spent = store.failed_attempts(round_) if retry_failed else {}
    log(f"round {round_}: probing: {len(pending)} to run, {len(probes) - len(pending)} done before")
    writer = ProbeWriter(store, round_, streaming.flush_every, streaming.flush_seconds)
    progress = Progress(len(probes), len(probes) - len(pending), streaming.progress_interval)
    ran = 0

    def on_outcome(outcome: Outcome) -> None:
        nonlocal ran
        probe: Probe = outcome.task.key
        attempts = outcome.task.tries
        if outcome.error is None:
            scored = outcome.value
            row = probe_ok_row(
                round_,
                probe.component,
                probe.spec,
                probe.added,
                probe.names,
                scored.result,
                scored.worker,
                attempts,
            )
        else:
            row = probe_failed_row(
                round_,
                probe.component,
                probe.spec,
                probe.added,
                probe.names,
                outcome.error,
                attempts,
            )
        writer.add(row)
        progress.advance()
        ran += 1

    try:
        if pending:
            pool = engines.pool
            context_ref = ray.put(context)
            tasks = [
                Task(p, (dict.fromkeys(p.names, p.spec), context_ref), earlier=spent.get(p.key, 0))
                for p in pending
            ]
            pool.run("probe", tasks, on_outcome, tick=writer.flush_if_due)
    finally:
        # Rows in the buffer are complete results; keep them even when the round is interrupted
        # (close waits for the writer thread to write every one).
        try:
            writer.close()
        finally:
            progress.close()
    store.compact_probes(round_)
    return ran
