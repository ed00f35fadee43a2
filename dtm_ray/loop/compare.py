"""`dtm-ray compare`: run a checked compare on engine actors, resuming from its run dir.

1. Base phase (its actors load the base as its engine serves it): the prompts are split over
   the actors, each builds its slice of the reference (greedy continuation, then its own
   teacher-forced scoring of it: argmax, margin, log-probability), stored as `reference/`
   round 0; then the base's perplexity on the real-text windows (`compare/text/base`). The base
   actors are then released, so the candidate gets the whole machine.
2. Candidate phase: the prompts are cut into chunks of `compare.chunk_prompts`, fanned out over
   the candidate's actors; each chunk's teacher-forced scores are written as the chunk finishes
   (`compare/chunks/`), so a killed compare resumes without redoing a finished chunk; then the
   candidate's perplexity on the same windows.
3. The tables (`compare/prompts`, `compare/summary`, pure functions of the above), and a report.

A phase whose tables are all written starts no actors, so re-running a finished compare reads
its tables and prints its summary. Neither side's weights are touched: the actors are
`ServedActor`s (the model as its engine serves it, quantized kernels included).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa

from dtm_ray.cluster.logs import ENGINE_LOG, engine_logs, local_log_dir
from dtm_ray.cluster.pool import Outcome, Task
from dtm_ray.cluster.served import ServedActor
from dtm_ray.cluster.startup import Engines, PoolSpec
from dtm_ray.core.state import Reference, concat_references
from dtm_ray.errors import ConfigError, StorageError
from dtm_ray.job.compare import SIDES, CheckedCompare, compare_differences
from dtm_ray.log import log
from dtm_ray.loop.driver import environment_info
from dtm_ray.loop.rounds import source_for_actors
from dtm_ray.records.lease import RunLease
from dtm_ray.records.schemas import (
    COMPARE_CHUNK_SCHEMA,
    COMPARE_PROMPTS_SCHEMA,
    COMPARE_SUMMARY_SCHEMA,
    COMPARE_TABLE_SCHEMAS,
    COMPARE_TEXT_SCHEMA,
    reference_from_table,
    reference_table,
)
from dtm_ray.records.store import RunStore
from dtm_ray.results.compare import (
    KIND,
    PROMPTS,
    SUMMARY,
    candidate_arrays,
    chunk_name,
    chunk_table,
    prompt_table,
    summary_lines,
    summary_table,
    text_name,
    text_table,
)

# A chunk that raises is run again this often; one whose actor dies under it, this often.
CHUNK_RETRIES = 2
CHUNK_CRASHES = 2


@dataclass
class CompareOutcome:
    run_dir: str
    prompts: pa.Table
    summary: pa.Table
    seconds: float  # this invocation's wall time
    chunks_scored: int  # chunks this invocation scored (0: all read back)


def run_compare(
    checked: CheckedCompare, verbose: bool = False, print_summary: bool = True
) -> CompareOutcome:
    """Run (or resume) a validated compare into `checked.job.out`: on the Ray this process is
    connected to, else RAY_ADDRESS's, else a local one for the duration of the call. The engines'
    output goes to the run's `logs/engines.log` (`verbose`: to the terminal too)."""
    with engine_logs(local_log_dir(checked.job.out) / ENGINE_LOG, verbose):
        outcome = _run(checked)
    _report(outcome.run_dir)
    if print_summary:
        print("\n".join(summary_lines(outcome.summary.to_pylist()[0])), flush=True)
    return outcome


def _report(run_dir: str) -> None:
    from dtm_ray.results.compare import write_compare_report

    try:
        log(f"report: {write_compare_report(run_dir)}")
    except Exception as err:  # noqa: BLE001 - the tables are what matters
        log(
            f"warning: the report failed ({type(err).__name__}: {err}); "
            f"retry with `dtm-ray report {run_dir}`"
        )


def _run(checked: CheckedCompare) -> CompareOutcome:
    start = time.monotonic()
    store = RunStore(checked.job.out)
    existed = store.exists()
    stored = store.read_run_info()
    if stored is not None:
        _check_resume(checked, store, stored)  # before the lease: a refusal writes nothing
    lease = RunLease(store).acquire()
    created = False
    try:
        created = _open_run(checked, store)
        log(f"run dir {store.location}")
        prompts = store.read_table(PROMPTS, COMPARE_PROMPTS_SCHEMA)
        summary = store.read_table(SUMMARY, COMPARE_SUMMARY_SCHEMA)
        scored = 0
        if summary is None:
            prompts, summary, scored = _compare(checked, store)
    finally:
        lease.release()
        _remove_if_empty(store, created, existed)
    return CompareOutcome(store.uri, prompts, summary, time.monotonic() - start, scored)


def _open_run(checked: CheckedCompare, store: RunStore) -> bool:
    """Create run.json, or check the stored one against this compare; True when created."""
    stored = store.read_run_info()
    if stored is not None:
        _check_resume(checked, store, stored)
        return False
    sources = {side: dataclasses.asdict(checked.sources[side]) for side in SIDES}
    info = {
        "kind": KIND,
        "config": checked.job.to_dict(),
        "model_sources": sources,
        **environment_info(),
    }
    store.write_json("run.json", info)
    return True


def _check_resume(checked: CheckedCompare, store: RunStore, stored: dict[str, Any]) -> None:
    """The run dir holds this compare of these two models, and only files it can read."""
    if stored.get("kind") != KIND:
        raise ConfigError(
            f"run dir {store.uri} holds a dtm-ray run, not a compare; choose another --out"
        )
    keys = compare_differences(stored["config"], checked.job.to_dict())
    if keys:
        raise ConfigError(
            f"run dir {store.uri} holds a compare with other settings ({', '.join(keys)}); "
            "resume with the original settings or choose another --out"
        )
    for side in SIDES:
        before = (stored.get("model_sources") or {}).get(side, {}).get("digest")
        now = checked.sources[side].digest
        if before is not None and before != now:
            raise ConfigError(
                f"run dir {store.uri} compared another {side} model (digest {before}, now {now}: "
                "its config.json or weights changed); choose another --out"
            )
    store.check_files(COMPARE_TABLE_SCHEMAS)


def _remove_if_empty(store: RunStore, created: bool, existed: bool) -> None:
    """A compare that measured nothing (its actors never started) leaves nothing behind."""
    try:
        if store.holds_results():
            return
        if created:
            store.delete("run.json")
        if not existed:
            store.remove_logs()
            store.remove_root_if_empty()
    except (StorageError, OSError) as err:
        log(f"warning: could not tidy up {store.location}: {err}")


def _engines(checked: CheckedCompare, store: RunStore, side: str) -> Engines:
    job = checked.job
    config = getattr(job.compare, side)
    spec = PoolSpec(
        model=checked.sources[side],
        engine=config.engine_config(),
        resources=job.resources_per_worker,
        max_in_flight=job.max_in_flight_per_worker,
        max_retries=CHUNK_RETRIES,
        max_crashes=CHUNK_CRASHES,
        startup_timeout_s=job.startup_timeout_s,
    )
    engines = Engines(spec, job.workers, ServedActor)
    engines.on_start = lambda infos: _record_actors(store, side, infos)
    return engines


def _record_actors(store: RunStore, side: str, infos: list[dict[str, Any]]) -> None:
    run = store.read_run_info() or {}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.setdefault("actors", []).append({"side": side, "started": started, "actors": infos})
    store.write_json("run.json", run)


def _add_seconds(store: RunStore, side: str, seconds: float) -> float:
    """Add a phase's wall time to run.json (a resumed phase adds to it); the total so far."""
    run = store.read_run_info() or {}
    phases = run.setdefault("seconds", {})
    phases[side] = float(phases.get(side, 0.0)) + seconds
    store.write_json("run.json", run)
    return phases[side]


def _seconds(store: RunStore, side: str) -> float:
    return float(((store.read_run_info() or {}).get("seconds") or {}).get(side, 0.0))


def _compare(checked: CheckedCompare, store: RunStore) -> tuple[pa.Table, pa.Table, int]:
    base = _engines(checked, store, "base")
    candidate = _engines(checked, store, "candidate")
    try:
        started = time.monotonic()
        reference, base_text, worked = _base_phase(checked, store, base)
        base.release()  # the candidate gets the whole machine
        if worked:
            _add_seconds(store, "base", time.monotonic() - started)
        started = time.monotonic()
        candidate_text, scored = _candidate_phase(checked, store, candidate, reference)
        candidate.release()
        if scored or candidate_text[1]:
            _add_seconds(store, "candidate", time.monotonic() - started)
    finally:
        candidate.close()
        base.close()  # shuts down a Ray it started, last
    chunks = store.read_folder("compare/chunks", COMPARE_CHUNK_SCHEMA)
    prompts = prompt_table(
        reference, candidate_arrays(chunks, reference.prompts), checked.job.compare.near_tie
    )
    store.write_table(PROMPTS, prompts)
    job = checked.job
    facts = {
        **{side: checked.sources[side].name for side in SIDES},
        **{f"{side}_engine": getattr(job.compare, side).engine for side in SIDES},
        **{f"{side}_dtype": _dtype_of(store, side, job) for side in SIDES},
        "new_tokens": job.new_tokens,
        "near_tie": job.compare.near_tie,
        "text_source": job.evaluation.text,
        "base_seconds": _seconds(store, "base"),
        "candidate_seconds": _seconds(store, "candidate"),
    }
    summary = summary_table(prompts, base_text, candidate_text[0], facts)
    store.write_table(SUMMARY, summary)  # last: its presence marks the compare complete
    return prompts, summary, scored


def _dtype_of(store: RunStore, side: str, job: Any) -> str:
    """The dtype the side's actors ran in (`auto` resolved on their device), from run.json."""
    for start in (store.read_run_info() or {}).get("actors", []):
        if start.get("side") == side and start.get("actors"):
            return str(start["actors"][0]["dtype"])
    return getattr(job.compare, side).dtype


def _base_phase(
    checked: CheckedCompare, store: RunStore, engines: Engines
) -> tuple[Reference, pa.Table, bool]:
    """The base's reference and its text NLL: read back, or computed on the base's actors."""
    job, worked = checked.job, False
    table = store.read_reference(0)
    if table is None:
        pool = engines.pool
        prefixes = checked.prefixes
        if prefixes is None:  # `self`: the base samples its own prompts
            p = job.prompts
            source = source_for_actors(p.source)
            prefixes = pool.call("load_prompts", source, p.count, p.prefix_tokens, p.seed)
        log(f"base: building the reference: {len(prefixes)} prompts, {job.new_tokens} tokens")
        parts = pool.split("reference", np.asarray(prefixes), job.new_tokens)
        reference = concat_references([part for part, _ in parts])
        built_by = [who for part, who in parts for _ in range(part.prompts)]
        store.write_reference(reference_table(reference, 0, built_by=built_by), 0)
        table = store.read_reference(0)
        worked = True
    reference = reference_from_table(table)
    text = store.read_table(text_name("base"), COMPARE_TEXT_SCHEMA)
    if text is None:
        log(f"base: perplexity on {len(checked.windows)} windows of {job.evaluation.text}")
        nll = np.concatenate(engines.pool.split("window_nll", checked.windows))
        text = text_table("base", nll)
        store.write_table(text_name("base"), text)
        worked = True
    return reference, text, worked


def _candidate_phase(
    checked: CheckedCompare, store: RunStore, engines: Engines, reference: Reference
) -> tuple[tuple[pa.Table, bool], int]:
    """The candidate's chunks and text NLL: read back, or computed on the candidate's actors.
    Returns ((text table, computed now), chunks scored now)."""
    done = set(store.table_names("compare/chunks"))
    chunks = checked.chunks
    pending = [k for k in range(len(chunks)) if chunk_name(k).rpartition("/")[2] not in done]
    log(
        f"candidate: scoring the reference: {len(pending)} of {len(chunks)} chunk(s) to run, "
        f"{len(chunks) - len(pending)} done before"
    )
    failures: list[str] = []

    def on_outcome(outcome: Outcome) -> None:
        chunk = outcome.task.key
        if outcome.error is not None:
            failures.append(f"chunk {chunk}: {outcome.error}")
            return
        first, _ = chunks[chunk]
        store.write_table(chunk_name(chunk), chunk_table(chunk, first, outcome.value))

    if pending:
        pool = engines.pool
        sequences, n_prefix = reference.sequences, reference.n_prefix
        tasks = [Task(k, (sequences[slice(*chunks[k])], n_prefix)) for k in pending]
        pool.run("score_chunk", tasks, on_outcome)
    if failures:
        raise RuntimeError(
            f"the candidate failed to score {len(failures)} chunk(s) after retries "
            f"({failures[0]}); the chunks written are kept: run the same command again"
        )
    text = store.read_table(text_name("candidate"), COMPARE_TEXT_SCHEMA)
    computed = False
    if text is None:
        windows = checked.windows
        log(f"candidate: perplexity on {len(windows)} windows of {checked.job.evaluation.text}")
        nll = np.concatenate(engines.pool.split("window_nll", windows))
        text = text_table("candidate", nll)
        store.write_table(text_name("candidate"), text)
        computed = True
    return (text, computed), len(pending)
