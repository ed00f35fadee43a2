"""Knowledge-intensive evaluation with lm-eval-harness: what a compression cost on real tasks.

Perplexity and FDT measure how close the compressed model stays to the dense one on text; a
researcher also asks what it costs on the tasks they care about (closed-book QA, cloze probes,
multiple choice). `evaluate_run` runs lm-eval on the dense model and on the run's exported
checkpoint (`RUN/export/`), each as one Ray task holding an engine's resources
(`resources_per_worker`), and writes `final/tasks/`: per task its metric for both models and the
**flips**, the share of examples whose answer changed (Dutta et al. 2024, "Accuracy is not all
you need": equal accuracies can hide many answers that changed in both directions), with the
run's FDT@75 beside them. lm-eval's own per-example files go to `final/lm-eval/{dense,compressed}/`.

Tasks are lm-eval task names, the named sets in `TASK_SETS`, or local task YAML files whose
`dataset_kwargs.data_files` name local JSONL (resolved relative to the YAML), so machines without
a dataset hub run real evaluations. The package ships one such set, `facts`: everyday facts as
multiple choice and as cloze, written for this project.

The lm-eval backend is `hf` (transformers; what CPU machines use) or `vllm` (GPU clusters);
`auto` picks vllm when the workers hold a GPU.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from dtm_ray.errors import ConfigError
from dtm_ray.progress import log
from dtm_ray.store import RunStore

if TYPE_CHECKING:
    from dtm_ray.config import EvaluateConfig

TASK_DIR = Path(__file__).parent / "task_sets"
# The shipped tasks, by name: usable offline like any local YAML.
LOCAL_TASKS = {
    "dtm_facts_mc": TASK_DIR / "facts_mc.yaml",
    "dtm_facts_cloze": TASK_DIR / "facts_cloze.yaml",
}
# Named sets: the shipped offline one, and lm-eval's tasks closest to the benchmarks of the
# compression-and-knowledge papers (LLM-KICK: closed-book factoid QA and MMLU; the parametric
# knowledge study: LAMA-style cloze and the LM-harness suite). These need the dataset hub.
TASK_SETS: dict[str, list[str]] = {
    "facts": ["dtm_facts_mc", "dtm_facts_cloze"],
    "knowledge-qa": ["triviaqa", "nq_open"],
    "knowledge-mc": ["mmlu"],
    "cloze": ["lambada_openai"],
    "harness": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq"],
}
BACKENDS = ("auto", "hf", "vllm")
ANSWERED = ("multiple_choice", "generate_until", "loglikelihood")  # output types with flips
INSTALL_HINT = "install it with: pip install 'dtm-ray[eval]'"


# --- naming and checking tasks (no model, no Ray) ----------------------------------------------
def require_lm_eval() -> None:
    """Raise ConfigError (one line) when lm-eval-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"evaluating tasks needs lm-eval-harness (the lm_eval package); {INSTALL_HINT}"
        ) from None


@functools.cache
def registered_tasks() -> frozenset[str]:
    """Every task, group and tag name lm-eval knows (indexing its YAMLs takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml"))


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task set names replaced by their tasks; order kept, repeats dropped."""
    out: list[str] = []
    for name in names:
        for task in TASK_SETS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def load_task_yaml(path: str | Path) -> dict[str, Any]:
    """A local task YAML as an lm-eval task config, its `data_files` made absolute.

    lm-eval would resolve relative data files against the working directory; here they are
    relative to the YAML, so a task folder works wherever it is run from.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"task file {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ConfigError(f"task file {path} has no 'task' name; it must be an lm-eval task YAML")
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" in kwargs:
        kwargs["data_files"] = _local_files(kwargs["data_files"], path)
    return config


def _local_files(files: Any, task_file: Path) -> Any:
    """`data_files` (a path, a list, or split -> either) with every path absolute and present."""
    if isinstance(files, dict):
        return {split: _local_files(value, task_file) for split, value in files.items()}
    if isinstance(files, list):
        return [_local_files(value, task_file) for value in files]
    local = task_file.parent / str(files)  # an absolute path stays itself
    if not local.is_file():
        raise ConfigError(f"task file {task_file}: data file {local} does not exist")
    return str(local.resolve())


def resolve_tasks(names: Sequence[str]) -> list[str | dict[str, Any]]:
    """What `simple_evaluate(tasks=...)` takes: lm-eval names, and local tasks as configs.

    Raises ConfigError for an unknown name or a missing local file, before any model loads.
    """
    require_lm_eval()
    if isinstance(names, str) or not names:
        raise ConfigError(
            f"evaluate.tasks must be a non-empty list of lm-eval task names, task sets "
            f"({', '.join(TASK_SETS)}) or task YAML files, got {names!r}"
        )
    resolved: list[str | dict[str, Any]] = []
    for name in expand_tasks([str(n) for n in names]):
        if _is_yaml_path(name):
            resolved.append(load_task_yaml(name))
        elif name in LOCAL_TASKS:
            resolved.append(load_task_yaml(LOCAL_TASKS[name]))
        elif name in registered_tasks():
            resolved.append(name)
        else:
            raise ConfigError(
                f"task {name!r} unknown: not an lm-eval task, a task set "
                f"({', '.join(TASK_SETS)}) or a task YAML file (*.yaml)"
            )
    return resolved


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
    model: str,
    backend: str,
    dtype: str,
    resources: Mapping[str, float],
    engine_options: Mapping[str, Any],
    *evaluation: Any,
) -> dict[str, Any]:
    """The Ray task: `evaluate_model` on a model folder, or a known model name materialized on
    this node. `evaluation`: tasks, limit, num_fewshot, batch_size."""
    from dtm_ray.models import resolve_model

    folder = str(resolve_model(model).resolve())
    return evaluate_model(
        *lm_eval_model(backend, folder, dtype, resources, engine_options), *evaluation
    )


def _task_options(resources: Mapping[str, float]) -> dict[str, Any]:
    """Ray task options for an engine-sized task: the engine actors' resources and env."""
    from dtm_ray.actor import engine_actor_options

    actor_only = ("max_restarts", "max_task_retries")
    return {k: v for k, v in engine_actor_options(resources).items() if k not in actor_only}


def tasks_table(
    dense: Mapping[str, Any], compressed: Mapping[str, Any], fdt_at_75: int | None, backend: str
) -> pa.Table:
    """`final/tasks/` rows from the two models' `evaluate_model` results."""
    from dtm_ray.schemas import FINAL_TASKS_SCHEMA

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
                "fdt_at_75": fdt_at_75,
                "backend": backend,
            }
        )
    return pa.Table.from_pylist(rows, schema=FINAL_TASKS_SCHEMA)


# --- a finished run ------------------------------------------------------------------------------
def _export_folder(store: RunStore, scratch: str) -> Path:
    """The run's export: `RUN/export/` of a local run (written now if missing), else a scratch
    copy (a remote run dir cannot hold a model folder the workers load from)."""
    from dtm_ray.export import export_run

    if "://" not in store.uri:
        target = Path(store.root) / "export"
        if not (target / "export.json").is_file():
            log(f"exporting the compressed model to {target}")
            export_run(store.root, str(target))
        return target
    log(f"run dir {store.uri} is not local: exporting into a scratch folder")
    return export_run(store.uri, f"{scratch}/export")


def evaluate_run(run_dir: str, config: EvaluateConfig) -> pa.Table:
    """Evaluate a finished compressing run's dense model and export on `config.tasks`; write and
    return `final/tasks/`. Uses the Ray this process is connected to, else starts one."""
    import ray

    from dtm_ray.models import is_known, resolve_model
    from dtm_ray.pool import connect_ray
    from dtm_ray.schemas import FINAL_SUMMARY_SCHEMA

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
    tasks = resolve_tasks(config.tasks)
    resources = job.get("resources_per_worker") or {"CPU": 1}
    backend = choose_backend(config.backend, resources)
    # A known model name is materialized by each worker on its own node; a folder must be
    # readable there (so must the export: local runs, or a filesystem the nodes share).
    model = job["model"]
    local = not is_known(model) or Path(model).is_dir()
    dense_model = str(resolve_model(model).resolve()) if local else model
    started = connect_ray()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            export_dir = _export_folder(store, scratch)
            # Both models in the dtype the run measured in, so they differ only by compression.
            dtype = json.loads((export_dir / "export.json").read_text())["engine_dtype"]
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
                for m in (dense_model, str(export_dir.resolve()))
            ]
            log(f"lm-eval ({backend}) on the dense model and the export: {_names(tasks)}")
            dense, compressed = ray.get(refs)
    finally:
        if started:
            ray.shutdown()
    for name, result in (("dense", dense), ("compressed", compressed)):
        store.replace_files(f"final/lm-eval/{name}", result["files"])
    fdt = summary.column("fdt_at_75")[0].as_py()
    table = tasks_table(dense, compressed, fdt, backend)
    store.write_final("tasks", table)
    log(f"tasks evaluated in {max(dense['seconds'], compressed['seconds']):.0f} s")
    return table


def _names(tasks: Sequence[str | dict[str, Any]]) -> str:
    return ", ".join(t if isinstance(t, str) else t["task"] for t in tasks)


def format_run_tasks(table: pa.Table) -> str:
    """A run's `final/tasks/` as a few aligned lines for the terminal."""
    lines = [f"{'task':<24} {'metric':<12} {'dense':>7} {'compr.':>7} {'flips':>7}  examples"]
    for row in table.to_pylist():
        lines.append(
            f"{row['task']:<24} {row['metric']:<12} {row['dense']:7.3f} "
            f"{row['compressed']:7.3f} {row['flips']:7.3f}  {row['examples']}"
        )
    return "\n".join(lines)


# --- across runs: the report's table and plot --------------------------------------------------
def runs_tasks(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """`final/tasks/` rows of several runs, each with its run's guide, sparsity, FDT@75 and
    perplexity on real text (from `final/summary/`)."""
    from dtm_ray.schemas import FINAL_SUMMARY_SCHEMA, FINAL_TASKS_SCHEMA

    rows = []
    for run_dir in run_dirs:
        store = RunStore(run_dir)
        summary = store.read_final("summary", FINAL_SUMMARY_SCHEMA)
        tasks = store.read_final("tasks", FINAL_TASKS_SCHEMA)
        if summary is None or tasks is None:
            raise ConfigError(f"run {run_dir} has no final/tasks; run `dtm-ray evaluate` on it")
        compress = (store.read_run_info() or {}).get("config", {}).get("compress") or {}
        s = summary.to_pylist()[0]
        for row in tasks.to_pylist():
            rows.append(
                {
                    **row,
                    "run": run_dir,
                    "guide": compress.get("guide", "?"),
                    "sparsity": s["sparsity"],
                    "fdt_mean": s["fdt_mean"],
                    "ppl_text": s["ppl_text"],
                    "dense_ppl_text": s["dense_ppl_text"],
                }
            )
    return rows


def tasks_markdown(run_dirs: Sequence[str]) -> str:
    """A Markdown table: per task the dense model, then each run (labelled by its guide) with
    its metric, flips against the dense model, FDT@75 and perplexity on real text."""
    rows = runs_tasks(run_dirs)
    lines = [
        "| model | sparsity | FDT@75 | mean FDT | ppl (text) | task | metric | value | flips |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        of_task = [r for r in rows if r["task"] == task]
        first = of_task[0]  # every run evaluated the same dense model
        lines.append(
            f"| dense | 0 | – | – | {first['dense_ppl_text']:.2f} | {task} | {first['metric']} "
            f"| {first['dense']:.3f} | – |"
        )
        for r in of_task:
            lines.append(
                f"| {r['guide']} | {r['sparsity']:.2f} | {r['fdt_at_75']} | {r['fdt_mean']:.2f} "
                f"| {r['ppl_text']:.2f} "
                f"| {task} | {r['metric']} | {r['compressed']:.3f} "
                f"| {r['flips']:.3f} ({r['flipped']}/{r['examples']}) |"
            )
    return "\n".join(lines)


def plot_tasks(run_dirs: Sequence[str], path: str | Path) -> Path:
    """Draw task metric and flips against FDT@75, mean FDT and text perplexity, one marker per
    guide and one colour per task, into the PNG `path`. Does FDT tell knowledge loss better
    than perplexity? Flips that fall as FDT rises, more cleanly than they rise with perplexity,
    say yes. (FDT@75 is often 0 for every run at high sparsity; mean FDT still separates them.)"""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows = runs_tasks(run_dirs)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    markers = {g: "osD^v<>p*h"[i % 10] for i, g in enumerate(guides)}
    columns = [
        ("fdt_at_75", "FDT@75 vs the dense model\n(higher: closer)"),
        ("fdt_mean", "mean FDT vs the dense model\n(higher: closer)"),
        ("ppl_text", "perplexity on real text\n(lower: better; dotted: dense)"),
    ]
    fig, axes = plt.subplots(
        2, len(columns), figsize=(13, 7.5), sharey="row", sharex="col", constrained_layout=True
    )
    for col, (x_key, x_label) in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        for r in rows:
            style = {"color": colors[r["task"]], "marker": markers[r["guide"]], "s": 70}
            top.scatter(r[x_key], r["compressed"], alpha=0.85, **style)
            bottom.scatter(r[x_key], r["flips"], alpha=0.85, **style)
        for task in tasks:  # the dense model's value, as a dashed line per task
            first = next(r for r in rows if r["task"] == task)
            top.axhline(first["dense"], color=colors[task], linestyle="--", linewidth=1)
        if x_key == "ppl_text":
            for ax in (top, bottom):
                ax.axvline(rows[0]["dense_ppl_text"], color="grey", linestyle=":")
        else:
            locator = MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=x_key == "fdt_at_75")
            bottom.xaxis.set_major_locator(locator)
            low = min(r[x_key] for r in rows)
            high = max(r[x_key] for r in rows)
            pad = max(1.0, 0.1 * (high - low))  # a single value still gets a readable axis
            bottom.set_xlim(max(-0.5, low - pad), high + pad)
        bottom.set_xlabel(x_label)
    axes[0, 0].set_ylabel("task metric of the compressed model\n(dashed: dense model)")
    axes[1, 0].set_ylabel("flips: share of answers changed\nvs the dense model")
    for ax in axes.flat:
        ax.set_ylim(-0.02, 1.02)  # both rows are shares of the examples
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[t], linewidth=6, label=t) for t in tasks]
    handles += [
        Line2D([], [], color="black", marker=markers[g], linestyle="", label=f"guide {g}")
        for g in guides
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    fig.suptitle("lm-eval tasks: each compressed run against the dense model")
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
