"""lm-eval tasks end to end: a job with evaluate writes tasks whose flips match lm-eval's samples;
SmolLM2 answers the shipped facts often. (The tasks alone: tests/unit/test_tasks.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from support.jobs import SHORT, UNIFORM_HALF, tiny_job

from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job
from dtm_ray.job.tasks import (
    resolve_tasks,
)
from dtm_ray.loop.driver import run_checked_job
from dtm_ray.results.task_compare import plot_tasks, tasks_markdown
from dtm_ray.results.tasks import lm_eval_model


def answers_from_samples_file(path: Path) -> dict[int, str]:
    """Per-example answers read straight from lm-eval's samples JSONL (all values as strings)."""
    answers = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        responses = sample["filtered_resps"]
        if "dtm_facts_mc" in path.name:  # [[loglikelihood, is_greedy], ...] per choice
            scores = [float(r[0]) for r in responses]
            answers[sample["doc_id"]] = str(scores.index(max(scores)))
        else:  # [the filtered generation]
            answers[sample["doc_id"]] = responses[0]
    return answers


def test_a_job_with_evaluate_writes_tasks_whose_flips_match_lm_evals_samples(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
):
    run = tmp_path / "run"
    job = tiny_job(
        tiny_llama_dir, run, SHORT, UNIFORM_HALF, evaluate={"tasks": ["facts"], "limit": 12}
    )
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    outcome = run_checked_job(check_job(load_job(tmp_path / "job.yaml")), print_summary=False)

    table = pd.read_parquet(run / "final" / "tasks").set_index("task")
    assert outcome.final["tasks"].to_pandas().set_index("task").equals(table)
    assert list(table.index) == ["dtm_facts_mc", "dtm_facts_cloze"]
    assert list(table["metric"]) == ["acc", "exact_match"]
    assert (table["examples"] == 12).all() and (table["backend"] == "hf").all()
    summary = pd.read_parquet(run / "final" / "summary").iloc[0]
    assert (table["fdt_at_75"] == summary["fdt_at_75"]).all()
    assert (table["test_fdt_at_75"] == summary["test_fdt_at_75"]).all()
    for task, row in table.iterrows():
        per_model = {}
        for model in ("dense", "compressed"):
            (path,) = (run / "final" / "lm-eval" / model).glob(f"samples_{task}_*.jsonl")
            per_model[model] = answers_from_samples_file(path)
            metric = [json.loads(line)[row["metric"]] for line in path.read_text().splitlines()]
            assert row[model] == pytest.approx(sum(metric) / len(metric))
        dense, compressed = per_model["dense"], per_model["compressed"]
        changed = sum(dense[i] != compressed[i] for i in dense)
        assert (row["flipped"], row["flips"]) == (changed, pytest.approx(changed / len(dense)))
    # Half the weights of a random model gone: some answers must have changed.
    assert table["flipped"].sum() > 0

    # The report's table and plot over runs; a second identical run stands in for another guide.
    other = tmp_path / "other"
    shutil.copytree(run, other)
    markdown = tasks_markdown([str(run), str(other)])
    assert markdown.count("| dense |") == 2 and markdown.count("| uniform |") == 4
    png = plot_tasks([str(run), str(other)], tmp_path / "tasks.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-running the finished job reads final/tasks back instead of evaluating again.
    stamp = (run / "final" / "tasks" / "data.parquet").stat().st_mtime_ns
    run_checked_job(check_job(load_job(tmp_path / "job.yaml")), print_summary=False)
    assert (run / "final" / "tasks" / "data.parquet").stat().st_mtime_ns == stamp


def test_smollm2_answers_the_shipped_facts_often(smollm2_dir: Path):
    """The shipped set is informative for a 135M model: well above chance, below perfect."""
    from dtm_ray.results.tasks import evaluate_model

    model, args = lm_eval_model("hf", str(smollm2_dir), "float32", {"CPU": 1}, {})
    result = evaluate_model(model, args, resolve_tasks(["facts"]), 12, None, 16)
    mc, cloze = (result["tasks"][t]["value"] for t in ("dtm_facts_mc", "dtm_facts_cloze"))
    assert 0.5 <= mc < 1 and 0.4 <= cloze < 1  # chance: 0.25 for the four choices, ~0 for cloze
    assert any(name.startswith("samples_dtm_facts_mc_") for name in result["files"])
