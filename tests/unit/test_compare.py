"""DTM between two checkpoints, in this process: the prompt table against a loop written here, what
a resume may change, and the command's help. (The command and whole compares:
tests/integration/test_compare.py.)"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dtm_ray.core.state import Reference
from dtm_ray.job.compare import build_compare
from dtm_ray.results.compare import prompt_table, summary_table, text_table


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


def test_compare_explains_itself(capsys):
    from dtm_ray import cli

    with pytest.raises(SystemExit) as exit_:
        cli.main(["compare", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "usage: dtm-ray compare" in text and "--candidate-engine" in text and "--job" in text
