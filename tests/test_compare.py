"""`dtm-ray compare BASE CANDIDATE`: FDT between two checkpoints made outside dtm_ray.

The per-prompt FDT of a compare equals the first difference of the two models' free-running
greedy text in plain transformers; a pair that cannot be compared (tokenizers differ, a candidate
that cannot be read or loaded here) ends in one line, exit 2, before Ray is imported; a killed
compare resumes with the chunks it had not written; `show` and `report` read a compare run; the
tables are pure functions checked against a loop written here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers_check import first_divergence, free_running_greedy

from dtm_ray.core.state import Reference
from dtm_ray.job.compare import build_compare, plan_compare
from dtm_ray.results.compare import prompt_table, summary_table, text_table

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 24


# --- candidates made with plain torch, outside dtm_ray --------------------------------------------
def _folder_like(model_dir: Path, out: Path, weights: dict[str, torch.Tensor] | None) -> Path:
    """A copy of `model_dir` (its small files copied, its weights linked) with `weights` saved
    instead when given."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            if weights is None:
                (out / path.name).symlink_to(path)
        else:
            shutil.copy(path, out / path.name)
    if weights is not None:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


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
    return _folder_like(smollm2_dir, tmp_path_factory.mktemp("noised") / "model", weights)


# --- the tables, against a loop written here ---------------------------------------------------
def test_prompt_table_finds_the_first_divergence_and_its_margins():
    rng = np.random.default_rng(0)
    prompts, n_new = 6, 5
    base_argmax = rng.integers(0, 50, size=(prompts, n_new))
    candidate = base_argmax.copy()
    candidate[1, 3] += 1  # one late divergence
    candidate[2, 0] += 1  # one at the first token, and a later one
    candidate[2, 4] += 1
    candidate[4, 2] += 1
    base_margin = rng.uniform(0, 1, size=(prompts, n_new)).astype(np.float32)
    candidate_margin = rng.uniform(0, 1, size=(prompts, n_new)).astype(np.float32)
    base_margin[4, 2], candidate_margin[4, 2] = 0.01, 0.02  # a near-tie
    base_margin[2, 0], candidate_margin[2, 0] = 0.01, 0.9  # the candidate is sure: clear
    reference = Reference(
        prefixes=rng.integers(0, 50, size=(prompts, 3)),
        continuation=base_argmax.copy(),
        base_argmax=base_argmax,
        base_margin=base_margin,
        base_logprob=-rng.uniform(0, 2, size=(prompts, n_new)).astype(np.float32),
    )
    logprob = -rng.uniform(0, 2, size=(prompts, n_new)).astype(np.float32)
    scored = {"argmax": candidate, "margin": candidate_margin, "logprob": logprob}
    table = prompt_table(reference, scored, near_tie=0.25).to_pandas()

    for p in range(prompts):
        row = table.iloc[p]
        where = [i for i in range(n_new) if candidate[p, i] != base_argmax[p, i]]
        assert row["fdt"] == (where[0] if where else n_new)
        assert row["sdt"] == len(where)
        assert row["nll"] == pytest.approx(-logprob[p].astype(np.float64).mean())
        if where:
            assert row["base_token"] == base_argmax[p, where[0]]
            assert row["candidate_token"] == candidate[p, where[0]]
            assert row["base_margin"] == pytest.approx(base_margin[p, where[0]])
            assert row["candidate_margin"] == pytest.approx(candidate_margin[p, where[0]])
        else:
            assert pd.isna(row["base_token"]) and row["near_tie"] is None
    assert table["near_tie"].tolist() == [None, False, False, None, True, None]

    text = text_table("base", np.full((2, 4), 1.0))
    facts = {
        "base": "b", "candidate": "c", "base_engine": "hf", "candidate_engine": "hf",
        "base_dtype": "float32", "candidate_dtype": "float32", "new_tokens": n_new,
        "near_tie": 0.25, "text_source": "pydoc", "base_seconds": 1.0, "candidate_seconds": 2.0,
    }  # fmt: skip
    summary = summary_table(prompt_table(reference, scored, 0.25), text, text, facts)
    s = summary.to_pylist()[0]
    # FDT sorted: 0, 2, 3, 5, 5, 5; 75 % of 6 prompts = 5 of them reach 2.
    assert (s["fdt_at_75"], s["diverged"], s["near_ties"]) == (2, 3, 1)
    assert s["near_tie_share"] == pytest.approx(1 / 3)
    assert s["ppl_text"] == pytest.approx(np.e) and s["text_tokens"] == 8


# --- one line, exit 2, before Ray ----------------------------------------------------------------
CLI = """
import json, sys
from dtm_ray import cli
code = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "ray": "ray" in sys.modules, "vllm": "vllm" in sys.modules}))
"""


def compare_cli(*args: str) -> tuple[dict, str]:
    """`dtm-ray compare ARGS` in a fresh process: its exit code, whether it imported Ray, and
    its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CLI, json.dumps(["compare", *args])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _swapped_tokenizer(smollm2_dir: Path, out: Path) -> Path:
    """SmolLM2 whose tokenizer gives two tokens each other's ids."""
    folder = _folder_like(smollm2_dir, out, None)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_unusable_pairs_end_in_one_line_before_ray(smollm2_dir: Path, tmp_path: Path):
    swapped = _swapped_tokenizer(smollm2_dir, tmp_path / "swapped")
    no_config = _folder_like(smollm2_dir, tmp_path / "no-config", None)
    (no_config / "config.json").unlink()
    no_weights = _folder_like(smollm2_dir, tmp_path / "no-weights", None)
    (no_weights / "model.safetensors").unlink()
    gptq = _folder_like(smollm2_dir, tmp_path / "gptq", None)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (gptq / "config.json").write_text(json.dumps(config))
    unknown = _folder_like(smollm2_dir, tmp_path / "unknown", None)
    config["quantization_config"] = {"quant_method": "made-up"}
    (unknown / "config.json").write_text(json.dumps(config))
    int8 = _folder_like(smollm2_dir, tmp_path / "int8", None)
    weights = {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "channel"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }
    (int8 / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    hf = ["--engine", "hf", "--out", str(out)]
    cases = {
        "tokenizers": ([str(swapped), *hf], "do not share a tokenizer"),
        "missing": ([str(tmp_path / "nowhere"), *hf], "no such folder"),
        "no config": ([str(no_config), *hf], "no config.json"),
        "no weights": ([str(no_weights), *hf], "no weights"),
        "gptq on hf": ([str(gptq), *hf], "requires optimum"),
        "unknown on vllm": (
            [str(unknown), "--engine", "vllm", "--out", str(out)],
            "which vLLM does not know",
        ),
        "int8 on vllm's cpu build": (
            [str(int8), "--engine", "vllm", "--dtype", "bfloat16", "--out", str(out)],
            "runs 4-bit integer weights only; this checkpoint holds int8",
        ),
    }
    for name, (args, words) in cases.items():
        result, stderr = compare_cli(str(smollm2_dir), *args)
        lines = stderr.strip().splitlines()
        assert result["code"] == 2 and not result["ray"], (name, result, stderr)
        assert len(lines) == 1 and lines[0].startswith("dtm-ray: error: "), (name, stderr)
        assert words in lines[0], (name, lines[0])
        if name == "tokenizers":  # sizes agree; the line names the first differing id
            the = json.loads((smollm2_dir / "tokenizer.json").read_text())["model"]["vocab"]
            first = min(the["the"], the["and"])
            assert f"id {first} is " in lines[0] and "49152 tokens" in lines[0], lines[0]
        if "vllm" not in name:
            assert not result["vllm"], name
        assert not out.exists(), name


def test_a_job_file_with_compare_runs_through_compare(smollm2_dir: Path, tmp_path: Path):
    job = tmp_path / "compare.yaml"
    job.write_text(
        "compare:\n"
        f"  base: {{model: {smollm2_dir}, engine: hf, dtype: float32}}\n"
        f"  candidate: {smollm2_dir}\n"
        "prompts: {count: 4, prefix_tokens: 8}\n"
        "new_tokens: 8\n"
        f"out: {tmp_path / 'run'}\n"
    )
    result, stderr = compare_cli("--job", str(job), "--count", "3", "--dry-run")
    assert result == {"code": 0, "ray": False, "vllm": False}, stderr
    built = build_compare(
        {"compare": {"base": {"model": "a", "dtype": "float32"}, "candidate": "b"}}
    )
    assert (built.candidate.engine, built.candidate.dtype) == ("vllm", "float32")  # the base's
    from dtm_ray import cli

    assert cli.main(["run", str(job)]) == 2  # a compressing job's command names the right one


def test_a_resume_may_change_how_a_compare_runs_but_not_what_it_measures():
    from dtm_ray.job.compare import compare_differences

    def job(**changes) -> dict:
        data = {"compare": {"base": {"model": "a", "engine": "hf"}, "candidate": {"model": "b"}}}
        for key, value in changes.items():
            *parents, leaf = key.split("__")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return build_compare(data).to_dict()

    stored = job()
    assert compare_differences(stored, job(workers=4, out="elsewhere")) == []
    options = {"cpu_kv_cache_bytes": 1 << 20}
    assert compare_differences(stored, job(compare__candidate__engine_options=options)) == []
    assert compare_differences(stored, job(compare__near_tie=0.5)) == ["compare.near_tie"]
    assert compare_differences(stored, job(compare__chunk_prompts=4)) == ["compare.chunk_prompts"]
    assert compare_differences(stored, job(compare__candidate__dtype="bfloat16")) == [
        "compare.candidate.dtype"
    ]


def test_a_side_in_an_object_store_is_read_on_the_driver_without_its_weights(
    model_store, tiny_llama_dir: Path, tmp_path: Path, monkeypatch
):
    from conftest import model_uri

    monkeypatch.setenv("DTM_RAY_CACHE", str(tmp_path / "cache"))
    uri = model_uri(model_store, "tiny")
    job = build_compare(
        {
            "compare": {"base": {"model": str(tiny_llama_dir), "engine": "hf"}, "candidate": uri},
            "prompts": {"count": 4, "prefix_tokens": 8},
            "new_tokens": 8,
            "out": str(tmp_path / "run"),
        }
    )
    plan = plan_compare(job)
    assert plan.sources["candidate"].kind == "store" and plan.sources["candidate"].id == uri
    assert not list(plan.folders["candidate"].glob("*.safetensors"))  # the actors fetch them
    assert plan.prefixes.shape == (4, 8) and not (tmp_path / "run").exists()


def test_compare_explains_itself(capsys):
    from dtm_ray import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: dtm-ray compare" in text and "--candidate-engine" in text and "--job" in text


# --- end to end, against plain transformers ----------------------------------------------------
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

    return run_compare(plan_compare(job), print_summary=False)


@pytest.fixture(scope="module")
def noised_compare(ray_session, smollm2_dir: Path, noised_dir: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    return out, _compare(smollm2_dir, noised_dir, out)


@pytest.mark.slow
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


@pytest.mark.slow
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
    again = run_compare(plan_compare(rebuild(info["config"])), print_summary=False)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_vllm_as_served_scores_like_transformers_and_edits_nothing(
    tiny_llama_dir: Path, one_thread
):
    """A compare's vLLM engine (`edits=False`): no dtm_ray worker extension between the
    checkpoint and vLLM's kernels, scores from vLLM's prompt_logprobs that agree with a plain
    transformers pass, and every weight edit refused in one line."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    from transformers_check import full_logit_stats

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
