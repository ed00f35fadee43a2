"""`compress.guide: fisher` and `weight_error`: a sensitivity round in place of probes feeding the
same decisions. The decision functions against hand-made tables; whole jobs on the tiny Llama
(hf engine, 2 workers) checked against their own sensitivity/ tables and against scores made
independently (one engine, one call, every candidate); resume, plan and show."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.jobs import EVALUATION, tiny_job

from dtm_ray.core.compress import compress
from dtm_ray.core.decisions.quantize import rank_components
from dtm_ray.core.decisions.sparsify import (
    candidates_from_table,
    decide_sparsify,
    probe_points,
)
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import load_job, role_counts
from dtm_ray.loop.estimate import estimate, flop_costs, format_estimate
from dtm_ray.loop.sensitivity import guide_table, shares
from dtm_ray.records.schemas import SENSITIVITY_SCHEMA


# --- pure: the decisions read -score ------------------------------------------------------------
def test_sparsify_decision_reads_a_score_column_as_minus_its_damage() -> None:
    step = 0.2
    a_lo, a_hi = probe_points(step)
    # "a" is hurt 10x more than "b" by any pruning: b must be pruned further.
    probes = pa.table(
        {
            "component": ["a", "a", "b", "b"],
            "added": [a_lo, a_hi, a_lo, a_hi],
            "status": ["ok"] * 4,
            "fisher": [1.0, 4.0, 0.1, 0.4],
        }
    )
    components = pa.table({"component": ["a", "b"], "params": [100, 100], "sparsity": [0.0, 0.0]})
    candidates = candidates_from_table(probes, components, "fisher", math.nan, math.nan, step)
    assert candidates[0].points == ((0.0, 0.0), (a_lo, -1.0), (a_hi, -4.0))
    decision = decide_sparsify(candidates, 0.5, step, "fisher", 16)
    assert decision.added["b"] > decision.added["a"]
    assert decision.overall_after == pytest.approx(step)  # the round's goal, exactly
    # The same table under the nll reading (minus the increase over a base of 0) decides alike.
    as_nll = probes.rename_columns(["component", "added", "status", "nll_mean"])
    same = decide_sparsify(
        candidates_from_table(as_nll, components, "nll", 16.0, 0.0, step), 0.5, step, "nll", 16
    )
    assert same.added == pytest.approx(decision.added)


def test_quantize_ranking_by_a_score_is_ascending_damage_and_a_fused_unit_sums_its_members() -> (
    None
):
    table = pa.Table.from_pylist(
        [
            {"component": c, "spec": "int8", "added": None, "score": s, "call": 0}
            for c, s in [("q", 0.5), ("k", 0.1), ("v", 0.1), ("o", 0.6), ("down", 0.2)]
        ]
    )
    units = {"qkv": ("q", "k", "v"), "o": ("o",), "down": ("down",)}
    params = {"qkv": 30, "o": 10, "down": 10}
    ranked_table = guide_table(table, "weight_error", units, params)
    rows = {r["component"]: r for r in ranked_table.to_pylist()}
    assert rows["qkv"]["weight_error"] == pytest.approx(0.7) and rows["qkv"]["params"] == 30
    assert rank_components(ranked_table, list(units), "weight_error", spec="int8") == [
        "down",
        "o",
        "qkv",
    ]
    # A unit missing a member's score is not ranked by a partial sum: it goes last.
    partial = guide_table(
        table.filter(pa.compute.not_equal(table["component"], "k")), "fisher", units, params
    )
    assert rank_components(partial, list(units), "fisher", spec="int8") == ["down", "o", "qkv"]
    assert "qkv" not in partial.column("component").to_pylist()


def test_components_are_shared_out_in_order_by_the_worker_count() -> None:
    assert shares(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert shares(list("ab"), 4) == [["a"], ["b"]]


# --- whole jobs ----------------------------------------------------------------------------------
def _checked_job(folder: Path, job: dict):
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return check_job(load_job(path))


def _run(folder: Path, job: dict):
    from dtm_ray.loop.driver import run_checked_job

    return run_checked_job(_checked_job(folder, job), print_summary=False)


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def tiny_compress_job(model_dir: Path, out: Path, compress: dict, dtype: str = "auto") -> dict:
    """The tiny Llama's job compressing with `compress`, with a short final evaluation."""
    return tiny_job(model_dir, out, {"compress": compress, "evaluation": EVALUATION}, dtype=dtype)


SPARSIFY = {"method": "sparsify", "target_sparsity": 0.3, "step": 0.15, "guide": "fisher"}


@pytest.fixture(scope="module")
def fisher_sparsify(ray_session, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fisher-sparsify")
    job = tiny_compress_job(tiny_llama_dir, folder / "run", SPARSIFY)
    outcome = _run(folder, job)
    return folder, job, outcome


@pytest.mark.slow
def test_a_fisher_sparsify_run_decides_from_its_scores_and_reaches_the_target(
    fisher_sparsify, tiny_llama_dir: Path
) -> None:
    folder, job, outcome = fisher_sparsify
    run = folder / "run"
    assert outcome.final is not None
    scores = pd.read_parquet(run / "sensitivity")
    decisions = pd.read_parquet(run / "decisions")
    assert not (run / "probes").exists() or pd.read_parquet(run / "probes").empty
    assert set(scores["guide"]) == {"fisher"} and (scores["score"] > 0).all()
    assert set(scores["round"]) == set(decisions["round"]) == {0, 1}
    # Every component twice a round (the two probe points), shared over both actors.
    assert scores.groupby("round").size().tolist() == [28, 28]
    assert scores.groupby("round")["worker"].nunique().tolist() == [2, 2]
    assert (scores["passes"] > 0).all()
    # Each decision's value is the component's curve through (0, 0) and (a, -score), where it
    # landed (plain numpy interpolation), and no pruned component lies below the threshold.
    for round_, rows in decisions.groupby("round"):
        table = scores[scores["round"] == round_]
        a_lo, a_hi = sorted(set(table["added"].round(9)))
        for row in rows.itertuples():
            own = table[table["component"] == row.component].sort_values("added")
            curve = [0.0, *(-own["score"]).tolist()]
            assert row.value == pytest.approx(np.interp(row.added, [0, a_lo, a_hi], curve))
            assert row.statistic == "fisher"
        pruned = rows[rows["added"] > 0]
        assert (pruned["value"] >= pruned["threshold"] - 1e-12).all()
    summary = pd.read_parquet(run / "final" / "summary").iloc[0]
    assert summary["sparsity"] == pytest.approx(0.3, abs=1e-5)


@pytest.mark.slow
def test_fisher_scores_of_the_run_equal_one_engine_scoring_every_candidate_at_once(
    fisher_sparsify, tiny_llama_dir: Path
) -> None:
    """The fan-out over the actors and the calibration draw, against one in-process engine
    scoring all of round 0's candidates in one call on calibration drawn here."""
    from dtm_ray.engines.hf import HFEngine
    from dtm_ray.engines.prompts import load_calibration
    from dtm_ray.engines.session import EngineSession

    folder, job, _ = fisher_sparsify
    scores = pd.read_parquet(folder / "run" / "sensitivity")
    first = scores[scores["round"] == 0]
    counts = role_counts(load_job(folder / "job.yaml"))  # decide 8, validate 8, test 32
    sequences = load_calibration("pydoc", tiny_llama_dir, 16, 8 + 16, counts, 8, seed=0)
    session = EngineSession(HFEngine(tiny_llama_dir))
    candidates: dict[str, list[str]] = {}
    for row in first.itertuples():
        candidates.setdefault(row.component, []).append(row.spec)
    result = session.sensitivity("fisher", candidates, sequences)
    expected = {(r["component"], r["spec"]): r["fisher"] for r in result.rows}
    for row in first.itertuples():
        assert row.score == pytest.approx(expected[(row.component, row.spec)], rel=1e-4)


@pytest.mark.slow
def test_a_second_run_reads_the_sensitivity_tables_back_and_changes_nothing(
    fisher_sparsify,
) -> None:
    folder, job, _ = fisher_sparsify
    run = folder / "run"
    before = _digests(run / "sensitivity"), _digests(run / "states"), _digests(run / "decisions")
    _run(folder, job)
    after = _digests(run / "sensitivity"), _digests(run / "states"), _digests(run / "decisions")
    assert after == before


@pytest.mark.slow
def test_show_lists_a_sensitivity_round_by_its_scores(fisher_sparsify, capsys) -> None:
    from dtm_ray.results.show import format_show, load_run

    folder, _, _ = fisher_sparsify
    text = format_show(load_run(str(folder / "run")), rows=3)
    assert "guide fisher" in text
    assert "round 1, fisher score (damage: larger is more sensitive) at +0.07, +0.22" in text
    scores = pd.read_parquet(folder / "run" / "sensitivity")
    last = scores[(scores["round"] == 1)].sort_values("score", ascending=False)
    top = last.iloc[0]["component"]  # the most sensitive component's row comes first
    layer, kind = top.split(".")[2], top.split(".")[-2].removesuffix("_proj")
    listing = text.split("most sensitive first:\n")[1].splitlines()
    assert listing[1].split()[:2] == [layer, kind]
    assert "... 8 more ..." in text  # 14 components, 3 from each end
    header = text.split("rounds:\n")[1].splitlines()[0]
    assert "scored" in header and "score_s" in header


def _relative_error(weight: torch.Tensor, spec: str) -> float:
    w = weight.float()
    return float(torch.linalg.norm(compress(w, spec) - w) / torch.linalg.norm(w))


@pytest.mark.slow
def test_a_weight_error_quantize_run_ranks_fused_units_by_their_summed_errors(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    compress_ = {
        "method": "quantize",
        "levels": ["int4-g64", "int8"],
        "target_bits": 6,
        "guide": "weight_error",
        "fused": True,
    }
    job = tiny_compress_job(tiny_llama_dir, tmp_path / "run", compress_, dtype="float32")
    outcome = _run(tmp_path, job)
    assert outcome.final is not None
    run = tmp_path / "run"
    scores = pd.read_parquet(run / "sensitivity")
    assert set(scores["round"]) == {0} and len(scores) == 14 and (scores["passes"] == 0).all()
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    # The scores, against plain torch on the checkpoint's weights.
    for row in scores.itertuples():
        assert row.score == pytest.approx(_relative_error(weights[row.component], "int4-g64"))
    # The rank order: units (fused q/k/v, gate/up) by the sum of their members' errors.
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
    fused |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}

    def unit(name: str) -> str:
        *path, kind, _ = name.split(".")
        return ".".join([*path, fused.get(kind, kind)])

    summed = scores.assign(unit=scores["component"].map(unit)).groupby("unit")["score"].sum()
    assert len(summed) == 8  # 2 layers x (qkv, o, gate_up, down)
    decisions = pd.read_parquet(run / "decisions")
    ranks = decisions[decisions["round"] == 0]
    rank = ranks["reason"].str.extract(r"rank (\d+) of")[0].astype(int)
    order = [
        u.removesuffix(".weight") for u in ranks.assign(rank=rank).sort_values("rank")["component"]
    ]
    assert list(summed.loc[order]) == sorted(summed)
    summary = pd.read_parquet(run / "final" / "summary").iloc[0]
    assert summary["bits_per_param"] <= 6


@pytest.mark.slow
def test_a_fisher_quantize_search_ranks_by_score_and_checks_combined_models_on_validate(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    compress_ = {
        "method": "quantize",
        "levels": ["int4-g64", "int8"],
        "min_fdt": 2,
        "target_bits": 7,
        "guide": "fisher",
        "calibration_count": 8,
    }
    job = tiny_compress_job(tiny_llama_dir, tmp_path / "run", compress_, dtype="float32")
    outcome = _run(tmp_path, job)
    assert outcome.final is not None
    run = tmp_path / "run"
    scores = pd.read_parquet(run / "sensitivity")
    assert set(scores["round"]) == {0} and len(scores) == 14 and (scores["score"] > 0).all()
    decisions = pd.read_parquet(run / "decisions")
    ranks = decisions[decisions["round"] == 0]
    rank = ranks["reason"].str.extract(r"rank (\d+) of")[0].astype(int)
    order = list(ranks.assign(rank=rank).sort_values("rank")["component"])
    by_score = scores.set_index("component")["score"]
    assert list(by_score.loc[order]) == sorted(by_score)  # least damage first
    # The search scored combined models on the validate prompts (8), in later rounds.
    probes = pd.read_parquet(run / "probes")
    assert len(probes) and 0 not in set(probes["round"])
    assert set(probes["fdt"].map(len)) == {8}
    assert set(decisions.loc[decisions["round"] > 0, "statistic"]) >= {"validate fdt_at_75_low"}


def test_plan_counts_sensitivity_rounds_instead_of_probes(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = tiny_compress_job(tiny_llama_dir, tmp_path / "run", SPARSIFY)
    checked = _checked_job(tmp_path, job)
    text = format_estimate(checked, estimate(checked, flop_costs(checked)))
    rows = [line.split() for line in text.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert rows and all(r[1] == "0" for r in rows)  # no probes in a fisher round
    assert "fisher: 28 candidates at added" in text
    # 2 rounds (and one for the tolerance), 16 sequences of 8 + 16 tokens, 2 actors, x 2.6.
    rounds = sum(1 for line in text.splitlines() if "fisher: 28 candidates" in line)
    assert f"{28 * rounds} candidates scored by fisher" in text
    fisher_round = [line for line in text.splitlines() if "fisher: 28 candidates" in line][1]
    assert int(fisher_round.split()[3].replace(",", "")) == math.ceil(2.6 * 16 * 24 * 2)
    job["compress"]["guide"] = "weight_error"
    text = format_estimate(
        _checked_job(tmp_path, job),
        estimate(_checked_job(tmp_path, job), flop_costs(_checked_job(tmp_path, job))),
    )
    assert "candidates scored by weight_error (data-free)" in text


def test_the_sensitivity_schema_has_one_home() -> None:
    from dtm_ray.records.schemas import TABLE_SCHEMAS

    assert TABLE_SCHEMAS["sensitivity"] is SENSITIVITY_SCHEMA


@pytest.mark.slow
def test_a_weight_error_wanda_run_scores_with_each_rounds_calibration(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """weight_error on wanda specs: each actor gets the input norms of its share of the
    components; a score is the relative error of the wanda-pruned current weight."""
    compress_ = {
        "method": "sparsify",
        "target_sparsity": 0.2,
        "step": 0.2,
        "criterion": "wanda",
        "guide": "weight_error",
    }
    job = tiny_compress_job(tiny_llama_dir, tmp_path / "run", compress_, dtype="float32")
    outcome = _run(tmp_path, job)
    assert outcome.final is not None
    run = tmp_path / "run"
    scores = pd.read_parquet(run / "sensitivity")
    assert set(scores["round"]) == {0} and len(scores) == 28
    norms = pd.read_parquet(run / "calibration").set_index("component")["input_norm"]
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    for row in scores.itertuples():
        w = weights[row.component].float()
        pruned = compress(w, row.spec, {"input_norm": torch.tensor(norms[row.component])})
        expected = float(torch.linalg.norm(pruned - w) / torch.linalg.norm(w))
        assert row.score == pytest.approx(expected, rel=1e-5)
    summary = pd.read_parquet(run / "final" / "summary").iloc[0]
    assert summary["sparsity"] == pytest.approx(0.2, abs=0.005)  # wanda prunes per row


@pytest.mark.slow
def test_a_fisher_quantize_run_on_the_vllm_engine_scores_as_the_hf_engine_does(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """vLLM's CPU build, one actor, fused units (vLLM's default): the run's fisher scores
    against the hf engine's on the same calibration draw, and every unit at one level."""
    pytest.importorskip("vllm")
    from dtm_ray.engines.hf import HFEngine
    from dtm_ray.engines.prompts import load_calibration
    from dtm_ray.engines.session import EngineSession

    compress_ = {
        "method": "quantize",
        "levels": ["int4-g64", "int8"],
        "target_bits": 6,
        "guide": "fisher",
        "calibration_count": 4,
    }
    job = tiny_compress_job(tiny_llama_dir, tmp_path / "run", compress_, dtype="float32")
    job.update(engine="vllm", workers=1)
    outcome = _run(tmp_path, job)
    assert outcome.final is not None
    run = tmp_path / "run"
    scores = pd.read_parquet(run / "sensitivity")
    assert len(scores) == 14 and set(scores["spec"]) == {"int4-g64"}
    counts = role_counts(load_job(tmp_path / "job.yaml"))
    sequences = load_calibration("pydoc", tiny_llama_dir, 4, 8 + 16, counts, 8, seed=0)
    session = EngineSession(HFEngine(tiny_llama_dir, dtype="float32"))
    names = list(scores["component"])
    result = session.sensitivity("fisher", {n: ["int4-g64"] for n in names}, sequences)
    expected = {r["component"]: r["fisher"] for r in result.rows}
    for row in scores.itertuples():
        assert row.score == pytest.approx(expected[row.component], rel=1e-4)
    final = pd.read_parquet(run / "final" / "components")
    members = final.assign(layer=final["component"].str.split(".").str[2])
    for kinds in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        group = members[members["component"].str.split(".").str[-2].isin(kinds)]
        assert (group.groupby("layer")["precision"].nunique() == 1).all()
