"""lm-eval tasks on the dense model and a run's export (`dtm_ray.results.tasks`, `final/tasks/`).

The end-to-end test runs a real compressing job with an `evaluate:` section (real Ray, real
lm-eval, the shipped task set) and recomputes the flips from the per-example files lm-eval wrote.
The rest checks what is decided before any model loads: task names, local files, backends.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from dtm_ray.cli import main
from dtm_ray.errors import ConfigError
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import EvaluateConfig, load_job
from dtm_ray.job.tasks import (
    LOCAL_TASKS,
    TASK_DIR,
    TASK_SETS,
    expand_tasks,
    load_task_yaml,
    registered_tasks,
    resolve_tasks,
)
from dtm_ray.results.tasks import choose_backend, flips, lm_eval_model


# --- task names and local files ----------------------------------------------------------------
def test_task_sets_expand_in_order_without_repeats():
    assert expand_tasks(["facts", "dtm_facts_cloze", "arc_easy", "facts"]) == [
        "dtm_facts_mc",
        "dtm_facts_cloze",
        "arc_easy",
    ]


def test_shipped_task_set_is_sizeable_and_well_formed():
    for name, path in LOCAL_TASKS.items():
        config = load_task_yaml(path)
        assert config["task"] == name
        rows = [json.loads(line) for line in open(config["dataset_kwargs"]["data_files"]["test"])]
        assert 50 <= len(rows) <= 100
        if name == "dtm_facts_mc":
            assert all(len(r["choices"]) == 4 and 0 <= r["answer"] < 4 for r in rows)
            assert len({r["answer"] for r in rows}) == 4  # the right answer is not always first
        else:
            assert all(r["answer"].isalpha() for r in rows)  # one word: what the filter keeps


def test_local_yaml_data_files_resolve_next_to_the_yaml(tmp_path: Path, monkeypatch):
    folder = tmp_path / "mine"
    shutil.copytree(TASK_DIR, folder)
    monkeypatch.chdir(tmp_path)  # not the YAML's folder
    config = load_task_yaml("mine/facts_mc.yaml")
    assert config["dataset_kwargs"]["data_files"] == {"test": str(folder / "facts_mc.jsonl")}
    (folder / "facts_mc.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"data file .*facts_mc.jsonl does not exist"):
        resolve_tasks(["mine/facts_mc.yaml"])
    with pytest.raises(ConfigError, match="task file nowhere.yaml does not exist"):
        resolve_tasks(["nowhere.yaml"])


def test_lm_eval_task_names_are_checked_against_its_registry():
    resolved = resolve_tasks(["arc_easy", "facts"])
    assert resolved[0] == "arc_easy"
    assert [t["task"] for t in resolved[1:]] == ["dtm_facts_mc", "dtm_facts_cloze"]
    with pytest.raises(ConfigError, match="task 'arc_eazy' unknown"):
        resolve_tasks(["arc_eazy"])
    # Every named set resolves (its lm-eval tasks exist in this lm-eval) and shadows no task.
    assert len(resolve_tasks(list(TASK_SETS))) == sum(len(t) for t in TASK_SETS.values())
    assert not set(TASK_SETS) & registered_tasks()


def test_a_missing_lm_eval_is_one_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` sees uninstalled
    with pytest.raises(ConfigError, match=r"needs lm-eval-harness .*pip install 'dtm-ray\[eval\]'"):
        resolve_tasks(["facts"])


def test_job_and_cli_report_task_mistakes_in_one_line(tmp_path: Path, capsys):
    job = tmp_path / "job.yaml"
    base = {"model": "smollm2-135m", "compress": {"target_sparsity": 0.2}}
    job.write_text(yaml.safe_dump({**base, "evaluate": {"tasks": ["facts", "no_such_task"]}}))
    with pytest.raises(ConfigError, match="task 'no_such_task' unknown"):
        check_job(load_job(job))  # task names are checked with the model, before any actor
    job.write_text(yaml.safe_dump({"model": "smollm2-135m", "evaluate": {}}))
    with pytest.raises(ConfigError, match="needs a compress: section"):
        load_job(job)
    job.write_text(yaml.safe_dump({**base, "evaluate": {"backend": "tgi"}}))
    with pytest.raises(ConfigError, match="evaluate.backend 'tgi' unknown"):
        load_job(job)
    with pytest.raises(ConfigError, match="evaluate.tasks must be a non-empty list"):
        EvaluateConfig(tasks=[])

    assert main(["evaluate", str(tmp_path), "--tasks", "missing.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "dtm-ray: error: task file missing.yaml does not exist\n"
    assert main(["evaluate", str(tmp_path), "--tasks", "facts", "--limit", "2"]) == 2
    assert "is not a run directory (no run.json)" in capsys.readouterr().err


# --- backends: HF on CPU, vLLM on GPU clusters (arguments only; vLLM cannot run here) ----------
def test_backend_follows_the_workers_resources_unless_set():
    assert choose_backend("auto", {"CPU": 1}) == "hf"
    assert choose_backend("auto", {"GPU": 1}) == "vllm"
    assert choose_backend("hf", {"GPU": 1}) == "hf"
    assert lm_eval_model("hf", "/m", "float32", {"CPU": 2}, {}) == (
        "hf",
        {"pretrained": "/m", "dtype": "float32", "device": "cpu"},
    )
    assert lm_eval_model("hf", "/m", "bfloat16", {"GPU": 1}, {})[1]["device"] == "cuda"
    options = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.6, "max_model_len": 2048}
    assert lm_eval_model("vllm", "/m", "bfloat16", {"GPU": 2}, options) == (
        "vllm",
        {
            "pretrained": "/m",
            "dtype": "bfloat16",
            "tensor_parallel_size": 2,
            "gpu_memory_utilization": 0.6,
            "max_model_len": 2048,
        },
    )


def test_flips_count_changed_answers_over_the_common_examples():
    dense = {0: "1", 1: "2", 2: "Paris", 3: "0"}
    compressed = {0: "1", 1: "3", 2: "paris", 4: "2"}
    assert flips(dense, compressed) == (2 / 3, 2, 3)


# --- end to end ----------------------------------------------------------------------------------
