"""Knowledge-intensive evaluation with lm-eval-harness: what a compression cost on real tasks.

Perplexity and FDT measure how close the compressed model stays to the dense one on text; a
researcher also asks what it costs on the tasks they care about (closed-book QA, cloze probes,
multiple choice). `evaluate_run` runs lm-eval on the dense model and on the run's exported
checkpoint (`RUN/export/`), each as one Ray task holding an engine's resources
(`resources_per_worker`), and writes `final/tasks/`: per task its metric for both models and the
**flips**, the share of examples whose answer changed (Dutta et al. 2024, "Accuracy is not all
you need": equal accuracies can hide many answers that changed in both directions), with the
run's FDT@75 beside them. lm-eval's own per-example files go to `final/lm-eval/{dense,compressed}/`.

Which tasks a name means (lm-eval names, named sets, local task YAML files) is decided in
`dtm_ray.job.tasks`, before any model loads.

The lm-eval backend is `hf` (transformers; what CPU machines use) or `vllm` (GPU clusters);
`auto` picks vllm when the workers hold a GPU.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dtm_ray.errors import ConfigError, StorageError, UserError, missing_requirement
from dtm_ray.job.tasks import BACKENDS, resolve_tasks
from dtm_ray.log import log
from dtm_ray.records.store import RunStore, check_store_uri, retrying

if TYPE_CHECKING:
    from dtm_ray.engines.sources import ModelSource
    from dtm_ray.job.spec import EvaluateConfig

ANSWERED = ("multiple_choice", "generate_until", "loglikelihood")  # output types with flips


# --- lm-eval model arguments -------------------------------------------------------------------
def choose_backend(backend: str, resources: Mapping[str, float]) -> str:
    """`auto`: vllm when a worker holds a GPU, else hf (transformers on CPU)."""
    if backend != "auto":
        return backend
    return "vllm" if resources.get("GPU", 0) > 0 else "hf"


def lm_eval_model(
    backend: str,
    model_dir: str,
    dtype: str,
    resources: Mapping[str, float],
    engine_options: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """lm-eval's model name and `model_args` for one model folder on one worker."""
    if backend == "hf":
        device = "cuda" if resources.get("GPU", 0) > 0 else "cpu"
        return "hf", {"pretrained": model_dir, "dtype": dtype, "device": device}
    if backend == "vllm":
        args: dict[str, Any] = {
            "pretrained": model_dir,
            "dtype": dtype,
            "tensor_parallel_size": int(engine_options.get("tensor_parallel_size", 1)),
            "gpu_memory_utilization": float(engine_options.get("gpu_memory_utilization", 0.85)),
        }
        if engine_options.get("max_model_len") is not None:
            args["max_model_len"] = int(engine_options["max_model_len"])
        return "vllm", args
    raise ConfigError(f"evaluate.backend {backend!r} unknown; expected one of {list(BACKENDS)}")


# --- answers and flips (pure) ------------------------------------------------------------------
def primary_metric(task_result: Mapping[str, Any]) -> tuple[str, str]:
    """(metric, filter) of a task's first reported metric, e.g. ("acc", "none")."""
    for key in task_result:
        metric, sep, filter_name = key.partition(",")
        if sep and not metric.endswith("_stderr"):
            return metric, filter_name
    raise ValueError(f"lm-eval reported no metric: {sorted(task_result)}")


def answer_of(sample: Mapping[str, Any], output_type: str) -> str:
    """The answer a model gave to one example, from lm-eval's per-sample record.

    multiple_choice: the index of the choice with the highest log-likelihood (what `acc` scores);
    generate_until: the filtered generation (what exact_match compares);
    loglikelihood: whether the target is the greedy continuation.
    """
    responses = sample["filtered_resps"]
    if output_type == "multiple_choice":
        scores = [float(r[0]) for r in responses]
        return str(max(range(len(scores)), key=scores.__getitem__))
    if output_type == "generate_until":
        return str(responses[0])
    if output_type == "loglikelihood":
        return str(responses[0][1])
    raise ValueError(f"lm-eval output_type {output_type!r} gives no answer; expected {ANSWERED}")


def flips(dense: Mapping[int, str], compressed: Mapping[int, str]) -> tuple[float, int, int]:
    """(share of examples whose answer changed, changed, examples) over the common examples."""
    common = sorted(set(dense) & set(compressed))
    if not common:
        return float("nan"), 0, 0
    changed = sum(dense[i] != compressed[i] for i in common)
    return changed / len(common), changed, len(common)


# --- one model, one Ray task ---------------------------------------------------------------------
def evaluate_model(
    model: str,
    model_args: dict[str, Any],
    tasks: list[str | dict[str, Any]],
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """Run lm-eval on one model. Returns per task its primary metric, value and per-example
    answers, and lm-eval's own output files (results JSON, samples JSONL) as text."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    start = time.monotonic()
    # Tasks given as configs need no index of lm-eval's own; names do.
    manager = TaskManager(include_defaults=any(isinstance(t, str) for t in tasks))
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        log_samples=True,
        task_manager=manager,
        bootstrap_iters=0,
    )
    summary: dict[str, Any] = {}
    for task, samples in results["samples"].items():
        metric, filter_name = primary_metric(results["results"][task])
        output_type = results["configs"][task]["output_type"]
        # A perplexity task (loglikelihood_rolling) has no answer to flip: no answers, NaN flips.
        answers = {
            int(s["doc_id"]): answer_of(s, output_type)
            for s in samples
            if s["filter"] == filter_name and output_type in ANSWERED
        }
        summary[task] = {
            "metric": metric,
            "value": float(results["results"][task][f"{metric},{filter_name}"]),
            "answers": answers,
        }

    # lm-eval writes its files last: writing sanitizes the samples in place.
    def write_files() -> dict[str, str]:
        with tempfile.TemporaryDirectory() as folder:
            tracker = EvaluationTracker(output_path=f"{folder}/results.json")
            tracker.save_results_aggregated(results=results, samples=results["samples"])
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=results["samples"][task])
            return {p.name: p.read_text() for p in Path(folder).iterdir() if p.is_file()}

    where = f"lm-eval's output files in {tempfile.gettempdir()} on {socket.gethostname()}"
    files = retrying("write", where, write_files)
    return {"tasks": summary, "files": files, "seconds": time.monotonic() - start}


def _evaluate_on_worker(
    model: ModelSource | str,
    backend: str,
    dtype: str,
    resources: Mapping[str, float],
    engine_options: Mapping[str, Any],
    *evaluation: Any,
) -> dict[str, Any]:
    """The Ray task: `evaluate_model` on a model source materialised on this node (once per
    node), or a folder. `evaluation`: tasks, limit, num_fewshot, batch_size."""
    try:
        from dtm_ray.engines.sources import node_folder

        folder = str(node_folder(model).resolve())
        return evaluate_model(
            *lm_eval_model(backend, folder, dtype, resources, engine_options), *evaluation
        )
    except ModuleNotFoundError as err:  # this node's Python lacks a requirement: say which
        missing = missing_requirement(err, f"node {socket.gethostname()}")
        if missing is None:
            raise
        raise missing from None


def _task_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray task options for an engine-sized task: the engine actors' resources and env."""
    from dtm_ray.cluster.actor import engine_actor_options

    actor_only = ("max_restarts", "max_task_retries")
    return {k: v for k, v in engine_actor_options(resources).items() if k not in actor_only}


def tasks_table(
    dense: Mapping[str, Any],
    compressed: Mapping[str, Any],
    fdt_at_75: int | None,
    backend: str,
    test_fdt_at_75: int | None = None,
) -> pa.Table:
    """`final/tasks/` rows from the two models' `evaluate_model` results; the run's FDT@75 on
    the decide prompts (in-sample) and on the test prompts (held out) beside them."""
    from dtm_ray.records.schemas import FINAL_TASKS_SCHEMA

    rows = []
    for task, ours in dense["tasks"].items():
        theirs = compressed["tasks"][task]
        share, changed, examples = flips(ours["answers"], theirs["answers"])
        rows.append(
            {
                "task": task,
                "metric": ours["metric"],
                "examples": examples,
                "dense": ours["value"],
                "compressed": theirs["value"],
                "flips": share,
                "flipped": changed,
                "test_fdt_at_75": test_fdt_at_75,
                "fdt_at_75": fdt_at_75,
                "backend": backend,
            }
        )
    return pa.Table.from_pylist(rows, schema=FINAL_TASKS_SCHEMA)


# --- a finished run ------------------------------------------------------------------------------
def _export_source(store: RunStore, scratch: str) -> tuple[ModelSource, dict[str, Any]]:
    """The run's dense export as a model source the workers materialise on their nodes, and its
    export.json: `RUN/export/` wherever the run lives (written now if missing). A local export
    without dense weights (--format compressed) gets a dense one in a scratch folder."""
    from dtm_ray.engines.sources import resolve_source
    from dtm_ray.results.export import export_run

    meta = store.read_json("export/export.json")
    if meta is None:
        log(f"exporting the compressed model to {store.child_uri('export').split('?', 1)[0]}")
        export_run(store.uri)
        meta = store.read_json("export/export.json") or {}
    checkpoints = meta.get("checkpoints")
    if checkpoints is None or "dense" in checkpoints:  # older exports are all dense
        return resolve_source(store.child_uri("export")), meta
    if not store.is_local:
        raise ConfigError(
            f"the export in {store.child_uri('export').split('?', 1)[0]} holds no dense "
            f"checkpoint (--format compressed); run `dtm-ray export {store.uri} --format both`"
        )
    log(f"{store.root}/export holds no dense checkpoint (--format compressed): exporting one")
    folder = export_run(store.uri, f"{scratch}/export", fmt="dense")
    return resolve_source(str(folder)), json.loads((Path(folder) / "export.json").read_text())


def evaluate_models(
    models: Sequence[tuple[ModelSource | str, str, Mapping[str, Any]]],
    backend: str,
    resources: Mapping[str, float],
    tasks: list[str | dict[str, Any]],
    config: EvaluateConfig,
) -> list[dict[str, Any]]:
    """lm-eval on each (model source, dtype, engine options), one Ray task each, in parallel,
    each holding an engine's `resources`; the `evaluate_model` results in order. Uses the Ray
    this process is connected to, else starts one."""
    import ray
    from ray.exceptions import RayTaskError

    from dtm_ray.cluster.startup import connect_ray

    started = connect_ray()
    try:
        remote = ray.remote(_evaluate_on_worker).options(**_task_options(resources))
        refs = [
            remote.remote(
                model,
                backend,
                dtype,
                resources,
                options,
                tasks,
                config.limit,
                config.num_fewshot,
                config.batch_size,
            )
            for model, dtype, options in models
        ]
        try:
            return ray.get(refs)
        except RayTaskError as err:
            # A storage failure or a missing requirement on the worker: its own line.
            if isinstance(err.cause, (StorageError, UserError)):
                raise err.cause from None
            raise
    finally:
        if started:
            ray.shutdown()


def evaluate_run(
    run_dir: str, config: EvaluateConfig, tasks: list[str | dict[str, Any]] | None = None
) -> pa.Table:
    """Evaluate a finished compressing run's dense model and export on `config.tasks` (resolved
    already as `tasks`, or here); write and return `final/tasks/`. Uses the Ray this process is
    connected to, else starts one."""
    from dtm_ray.engines.sources import source_of_run
    from dtm_ray.records.schemas import FINAL_SUMMARY_SCHEMA

    check_store_uri(run_dir)  # its shape first: no client, no lm-eval index for a bad URI
    tasks = tasks if tasks is not None else resolve_tasks(config.tasks)  # before any I/O
    store = RunStore(run_dir)
    info = store.read_run_info()
    if info is None:
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    summary = store.read_final("summary", FINAL_SUMMARY_SCHEMA)
    if summary is None:
        raise ConfigError(
            f"run {run_dir} has no final evaluation yet; finish it with `dtm-ray run` first"
        )
    job = info["config"]
    resources = job.get("resources_per_worker") or {"CPU": 1}
    backend = choose_backend(config.backend, resources)
    # Each worker's node materialises the model the run measured (the same revision).
    dense_model = source_of_run(info)
    with tempfile.TemporaryDirectory() as scratch:
        export, meta = _export_source(store, scratch)
        # Both models in the dtype the run measured in, so they differ only by compression.
        dtype = meta["engine_dtype"]
        options = job.get("engine_options") or {}
        log(f"lm-eval ({backend}) on the dense model and the export: {_names(tasks)}")
        dense, compressed = evaluate_models(
            [(dense_model, dtype, options), (export, dtype, options)],
            backend,
            resources,
            tasks,
            config,
        )
    fdt = summary.column("fdt_at_75")[0].as_py()
    # Runs from before the prompt roles have no test numbers.
    test_fdt = (
        summary.column("test_fdt_at_75")[0].as_py()
        if "test_fdt_at_75" in summary.column_names
        else None
    )
    return _write_tasks(store, ("dense", "compressed"), dense, compressed, fdt, backend, test_fdt)


def _write_tasks(
    store: RunStore,
    names: tuple[str, str],
    first: dict[str, Any],
    second: dict[str, Any],
    fdt: int | None,
    backend: str,
    test_fdt: int | None = None,
) -> pa.Table:
    """lm-eval's own files to `final/lm-eval/<name>/`, the task rows to `final/tasks/`."""
    for name, result in zip(names, (first, second), strict=True):
        store.replace_files(f"final/lm-eval/{name}", result["files"])
    table = tasks_table(first, second, fdt, backend, test_fdt)
    store.write_final("tasks", table)
    log(f"tasks evaluated in {max(first['seconds'], second['seconds']):.0f} s")
    return table


def evaluate_compare(
    run_dir: str, config: EvaluateConfig, tasks: list[str | dict[str, Any]] | None = None
) -> pa.Table:
    """lm-eval tasks on a finished compare run's two models: `final/tasks/` with the base in the
    `dense` column and the candidate in `compressed`, the flips between them and the compare's
    FDT@75; lm-eval's files in `final/lm-eval/{base,candidate}/`. Each model runs in the dtype
    its compare actors ran in, with its side's engine options."""
    from dtm_ray.engines.sources import ModelSource
    from dtm_ray.records.schemas import COMPARE_SUMMARY_SCHEMA

    check_store_uri(run_dir)  # its shape first: no client, no lm-eval index for a bad URI
    tasks = tasks if tasks is not None else resolve_tasks(config.tasks)
    store = RunStore(run_dir)
    info = store.read_run_info() or {}
    summary = store.read_table("compare/summary/data.parquet", COMPARE_SUMMARY_SCHEMA)
    if summary is None:
        raise ConfigError(
            f"compare {run_dir} is not finished; run the same `dtm-ray compare` command first"
        )
    row = summary.to_pylist()[0]
    job = info["config"]
    resources = job.get("resources_per_worker") or {"CPU": 1}
    backend = choose_backend(config.backend, resources)
    models = [
        (
            ModelSource(**info["model_sources"][side]),
            row[f"{side}_dtype"],
            job["compare"][side].get("engine_options") or {},
        )
        for side in ("base", "candidate")
    ]
    log(f"lm-eval ({backend}) on the base and the candidate: {_names(tasks)}")
    base, candidate = evaluate_models(models, backend, resources, tasks, config)
    return _write_tasks(store, ("base", "candidate"), base, candidate, row["fdt_at_75"], backend)


def _names(tasks: Sequence[str | dict[str, Any]]) -> str:
    return ", ".join(t if isinstance(t, str) else t["task"] for t in tasks)


def format_run_tasks(table: pa.Table, labels: tuple[str, str] = ("dense", "compr.")) -> str:
    """A run's `final/tasks/` as a few aligned lines for the terminal, after the run's FDT@75
    (on the held-out test prompts first); `labels` name the two models' columns (a compare's:
    base and candidate)."""
    lines = []
    rows = table.to_pylist()
    if rows and rows[0].get("test_fdt_at_75") is not None:
        test, decide = rows[0]["test_fdt_at_75"], rows[0]["fdt_at_75"]
        lines.append(
            f"the run's FDT@75 against the dense model: {test} on the test prompts (held out), "
            f"{decide} on the decide prompts (in-sample)"
        )
    first, second = (label[:9] for label in labels)
    lines.append(f"{'task':<24} {'metric':<12} {first:>9} {second:>9} {'flips':>7}  examples")
    for row in rows:
        lines.append(
            f"{row['task']:<24} {row['metric']:<12} {row['dense']:9.3f} "
            f"{row['compressed']:9.3f} {row['flips']:7.3f}  {row['examples']}"
        )
    return "\n".join(lines)
