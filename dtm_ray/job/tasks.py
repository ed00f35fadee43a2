"""Which lm-eval tasks a job or `dtm-ray evaluate` names: lm-eval task names, the named sets in
`TASK_SETS`, or local task YAML files whose `dataset_kwargs.data_files` name local JSONL (resolved
relative to the YAML), so machines without a dataset hub run real evaluations. The package ships
one such set, `facts`: everyday facts as multiple choice and as cloze, written for this project.

Checked before any model loads. lm-eval is imported only when a job names tasks, inside
`resolve_tasks` (indexing its task YAMLs takes ~10 s), never when this module is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from dtm_ray.errors import ConfigError

TASK_DIR = Path(__file__).resolve().parent / "task_sets"
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
