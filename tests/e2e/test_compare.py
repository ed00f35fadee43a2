"""Whole compares on Ray, SmolLM2 against a noised copy, checked against plain transformers: the
FDT is the free-running greedy divergence, a killed compare resumes with the chunks left, show
and report read it, evaluate runs lm-eval on both sides. (The command's refusals and the served
vLLM engine: tests/integration/test_compare.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.fakes import folder_like
from support.transformers_check import first_divergence, free_running_greedy

from dtm_ray.job.compare import build_compare, check_compare

N_NEW = 24


@pytest.fixture(scope="module")
def noised_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with Gaussian noise (3 % of each matrix's std) on every decoder weight matrix."""
    from safetensors.torch import load_file

    weights = load_file(smollm2_dir / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.startswith("model.layers.") and tensor.ndim == 2:
            noise = torch.randn(tensor.shape, generator=generator)
            weights[name] = tensor + 0.03 * tensor.std() * noise
    return folder_like(smollm2_dir, tmp_path_factory.mktemp("noised") / "model", weights)


def _compare(base: Path, candidate: Path, out: Path, **settings):
    job = build_compare(
        {
            "compare": {
                "base": {"model": str(base), "engine": "hf", "dtype": "float32"},
                "candidate": {"model": str(candidate)},
                "chunk_prompts": 3,
            },
            "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 16},
            "new_tokens": N_NEW,
            "evaluation": {"count": 2, "tokens": 64},
            "workers": 2,
            "out": str(out),
            **settings,
        }
    )
    from dtm_ray.loop.compare import run_compare

    return run_compare(check_compare(job), print_summary=False)


@pytest.fixture(scope="module")
def noised_compare(ray_session, smollm2_dir: Path, noised_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    return out, _compare(smollm2_dir, noised_dir, out)


def test_compare_fdt_is_the_free_running_greedy_divergence(
    noised_compare, smollm2_dir: Path, noised_dir: Path, one_thread
):
    from transformers import AutoModelForCausalLM

    run, outcome = noised_compare
    reference = pd.read_parquet(run / "reference").sort_values("prompt_id")
    prefixes = np.stack(reference["prefix_ids"].to_numpy())
    greedy = {
        name: free_running_greedy(
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
            prefixes,
            N_NEW,
        )
        for name, folder in (("base", smollm2_dir), ("candidate", noised_dir))
    }
    expected = first_divergence(greedy["base"], greedy["candidate"])
    fdt = outcome.prompts.to_pandas().sort_values("prompt_id")["fdt"].to_numpy()
    assert (fdt < N_NEW).sum() >= 2  # the noise changed some text: not a vacuous check
    assert (fdt != expected).sum() <= 1, (fdt, expected)
    # The base's own greedy continuation is the reference the candidate was scored on.
    np.testing.assert_array_equal(np.stack(reference["continuation_ids"]), greedy["base"])
    summary = outcome.summary.to_pylist()[0]
    assert summary["prompts"] == 8 and summary["fdt_mean"] == pytest.approx(fdt.mean())


def test_a_killed_compare_resumes_with_the_chunks_left(noised_compare, capfd):
    run, outcome = noised_compare
    chunks = sorted((run / "compare" / "chunks").glob("*.parquet"))
    assert len(chunks) == 3  # 8 prompts in chunks of 3
    before = {p.name: p.stat().st_mtime_ns for p in chunks}
    reference = next((run / "reference").glob("*.parquet")).stat().st_mtime_ns
    # What a kill during the candidate's second chunk leaves: no summary, one chunk missing.
    shutil.rmtree(run / "compare" / "summary")
    shutil.rmtree(run / "compare" / "prompts")
    chunks[1].unlink()
    capfd.readouterr()
    from dtm_ray.job.compare import build_compare as rebuild
    from dtm_ray.loop.compare import run_compare

    info = json.loads((run / "run.json").read_text())
    again = run_compare(check_compare(rebuild(info["config"])), print_summary=False)
    log = capfd.readouterr().err
    assert again.chunks_scored == 1
    assert "1 of 3 chunk(s) to run, 2 done before" in log
    assert "building the reference" not in log
    assert log.count("dtm-ray: starting ") == 1  # only the candidate's actors started
    after = {p.name: p.stat().st_mtime_ns for p in (run / "compare" / "chunks").glob("*")}
    assert {k: v for k, v in after.items() if k != chunks[1].name} == {
        k: v for k, v in before.items() if k != chunks[1].name
    }
    assert next((run / "reference").glob("*.parquet")).stat().st_mtime_ns == reference
    pd.testing.assert_frame_equal(again.prompts.to_pandas(), outcome.prompts.to_pandas())


def test_show_and_report_read_a_compare_run(noised_compare, capsys):
    from dtm_ray import cli

    run, outcome = noised_compare
    assert cli.main(["show", str(run)]) == 0
    text = capsys.readouterr().out
    summary = outcome.summary.to_pylist()[0]
    assert f"FDT@75 {summary['fdt_at_75']} of {N_NEW}" in text
    assert "prompts by first divergence" in text
    assert cli.main(["report", str(run), "--out", str(run / "report2")]) == 0
    names = {p.name for p in (run / "report2").iterdir()}
    assert {"report.html", "report.md", "fdt.png", "positions.png"} <= names
    assert "near-tie" in (run / "report2" / "report.md").read_text()


def test_evaluate_runs_lm_eval_on_both_sides_with_flips(noised_compare, capsys):
    from dtm_ray import cli

    run, outcome = noised_compare
    assert cli.main(["evaluate", str(run), "--limit", "8"]) == 0
    assert "base" in capsys.readouterr().out
    table = pd.read_parquet(run / "final" / "tasks").set_index("task")
    assert list(table.index) == ["dtm_facts_mc", "dtm_facts_cloze"]
    assert (table["fdt_at_75"] == outcome.summary.to_pylist()[0]["fdt_at_75"]).all()
    for task, row in table.iterrows():
        answers = {}
        for side, column in (("base", "dense"), ("candidate", "compressed")):
            (path,) = (run / "final" / "lm-eval" / side).glob(f"samples_{task}_*.jsonl")
            samples = [json.loads(line) for line in path.read_text().splitlines()]
            metric = [s[row["metric"]] for s in samples]
            assert row[column] == pytest.approx(sum(metric) / len(metric))
            answers[side] = {
                s["doc_id"]: (
                    int(np.argmax([float(r[0]) for r in s["filtered_resps"]]))
                    if row["metric"] == "acc"
                    else s["filtered_resps"][0]
                )
                for s in samples
            }
        changed = sum(answers["base"][i] != answers["candidate"][i] for i in answers["base"])
        assert row["flipped"] == changed and row["examples"] == 8


def test_vllm_as_served_scores_like_transformers_and_edits_nothing(
    tiny_llama_dir: Path, one_thread
):
    """A compare's vLLM engine (`edits=False`): no dtm_ray worker extension between the
    checkpoint and vLLM's kernels, scores from vLLM's prompt_logprobs that agree with a plain
    transformers pass, and every weight edit refused in one line."""
    pytest.importorskip("vllm")
    from support.transformers_check import full_logit_stats
    from transformers import AutoModelForCausalLM

    from dtm_ray.engines.vllm import VLLMEngine

    prefixes = np.random.default_rng(1).integers(3, 49000, size=(4, 8))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    expected = free_running_greedy(model, prefixes, 8)
    engine = VLLMEngine(tiny_llama_dir, dtype="float32", edits=False)
    try:
        assert not engine.llm.llm_engine.vllm_config.parallel_config.worker_extension_cls
        np.testing.assert_array_equal(engine.generate_greedy(prefixes.tolist(), 8), expected)
        sequences = np.concatenate([prefixes, expected], axis=1)
        scored = engine.score(sequences.tolist(), 8)
        argmax, margin, own = full_logit_stats(model, sequences, 8)
        np.testing.assert_array_equal(scored.argmax, argmax)
        np.testing.assert_allclose(scored.ref_logprob, own, atol=1e-4)
        np.testing.assert_allclose(scored.margin, margin, atol=1e-4)
        name = "model.layers.0.mlp.up_proj.weight"
        for edit in (
            lambda: engine.compress_in_place({name: ()}),
            lambda: engine.set_weights({name: torch.zeros(256, 128)}),
            lambda: engine.original_weight(name),
        ):
            with pytest.raises(RuntimeError, match="loaded as served"):
                edit()
    finally:
        engine.close()
