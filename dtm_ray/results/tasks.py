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
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from dtm_ray.errors import ConfigError
from dtm_ray.job.tasks import BACKENDS, resolve_tasks
from dtm_ray.log import log
from dtm_ray.records.store import RunStore

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
    with tempfile.TemporaryDirectory() as folder:
        tracker = EvaluationTracker(output_path=f"{folder}/results.json")
        tracker.save_results_aggregated(results=results, samples=results["samples"])
        for task in results["configs"]:
            tracker.save_results_samples(task_name=task, samples=results["samples"][task])
        files = {p.name: p.read_text() for p in Path(folder).iterdir() if p.is_file()}
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
    from dtm_ray.engines.sources import node_folder

    folder = str(node_folder(model).resolve())
    return evaluate_model(
        *lm_eval_model(backend, folder, dtype, resources, engine_options), *evaluation
    )


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


def evaluate_run(
    run_dir: str, config: EvaluateConfig, tasks: list[str | dict[str, Any]] | None = None
) -> pa.Table:
    """Evaluate a finished compressing run's dense model and export on `config.tasks` (resolved
    already as `tasks`, or here); write and return `final/tasks/`. Uses the Ray this process is
    connected to, else starts one."""
    import ray

    from dtm_ray.cluster.pool import connect_ray
    from dtm_ray.engines.sources import source_of_run
    from dtm_ray.records.schemas import FINAL_SUMMARY_SCHEMA

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
    started = connect_ray()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            export, meta = _export_source(store, scratch)
            # Both models in the dtype the run measured in, so they differ only by compression.
            dtype = meta["engine_dtype"]
            remote = ray.remote(_evaluate_on_worker).options(**_task_options(resources))
            engine_options = job.get("engine_options") or {}
            refs = [
                remote.remote(
                    m,
                    backend,
                    dtype,
                    resources,
                    engine_options,
                    tasks,
                    config.limit,
                    config.num_fewshot,
                    config.batch_size,
                )
                for m in (dense_model, export)
            ]
            log(f"lm-eval ({backend}) on the dense model and the export: {_names(tasks)}")
            dense, compressed = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    for name, result in (("dense", dense), ("compressed", compressed)):
        store.replace_files(f"final/lm-eval/{name}", result["files"])
    fdt = summary.column("fdt_at_75")[0].as_py()
    test_fdt = summary.column("test_fdt_at_75")[0].as_py()
    table = tasks_table(dense, compressed, fdt, backend, test_fdt)
    store.write_final("tasks", table)
    log(f"tasks evaluated in {max(dense['seconds'], compressed['seconds']):.0f} s")
    return table


def _names(tasks: Sequence[str | dict[str, Any]]) -> str:
    return ", ".join(t if isinstance(t, str) else t["task"] for t in tasks)


def format_run_tasks(table: pa.Table) -> str:
    """A run's `final/tasks/` as a few aligned lines for the terminal, after the run's FDT@75
    (on the held-out test prompts first)."""
    lines = []
    rows = table.to_pylist()
    if rows:
        test, decide = rows[0].get("test_fdt_at_75"), rows[0].get("fdt_at_75")
        fdt = f"{decide} on the prompts the rounds probed"
        if test is not None:
            fdt = (
                f"{test} on the test prompts (held out), {decide} on the decide prompts (in-sample)"
            )
        lines.append(f"the run's FDT@75 against the dense model: {fdt}")
    lines.append(f"{'task':<24} {'metric':<12} {'dense':>7} {'compr.':>7} {'flips':>7}  examples")
    for row in rows:
        lines.append(
            f"{row['task']:<24} {row['metric']:<12} {row['dense']:7.3f} "
            f"{row['compressed']:7.3f} {row['flips']:7.3f}  {row['examples']}"
        )
    return "\n".join(lines)
