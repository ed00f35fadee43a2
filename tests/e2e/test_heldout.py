"""Held-out prompts in whole quantize runs: a bits budget alone fills the first level in rank order
to the target; with a floor the search stops once the budget is met. (The roles, plans and
summaries alone: tests/unit/test_heldout.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from support.jobs import EVALUATION, run_job, tiny_job

from dtm_ray.core.decisions.quantize import spec_bits


def _quantize_job(model_dir: Path, out: Path, **compress) -> dict:
    compress = {"method": "quantize", "levels": ["int4-g64", "int8"], **compress}
    return tiny_job(model_dir, out, compress=compress, evaluation=EVALUATION)


def _read(run: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(run / table)


def _bits(final: pd.DataFrame) -> float:
    """Bits per parameter from final/components' precisions (plain arithmetic, not the code's)."""
    bits = final["precision"].map(lambda p: spec_bits(p) if p != "float32" else 32.0)
    return float((bits * final["params"]).sum() / final["params"].sum())


def test_a_bits_budget_alone_fills_the_first_level_in_rank_order_to_the_target(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:

    run = tmp_path / "run"
    job = _quantize_job(tiny_llama_dir, run, target_bits=6)
    outcome = run_job(tmp_path, job)
    assert outcome.final is not None
    final = _read(run, "final/components")
    summary = _read(run, "final/summary").iloc[0]
    # Every selected weight ends at one of the levels; the average is at the target or below.
    assert set(final["precision"]) == {"int4-g64", "int8"}
    assert summary["bits_per_param"] == pytest.approx(_bits(final))
    assert summary["bits_per_param"] <= 6 and summary["target_bits"] == 6
    # ... and only just: without the last component taken at int4, the average is above 6.
    decisions = _read(run, "decisions")
    ranks = decisions[decisions["round"] == 0]
    rank = ranks["reason"].str.extract(r"rank (\d+) of")[0].astype(int)
    order = list(ranks.assign(rank=rank).sort_values("rank")["component"])
    at_int4 = set(final.loc[final["precision"] == "int4-g64", "component"])
    assert set(order[: len(at_int4)]) == at_int4  # a prefix of the rank order
    last = order[len(at_int4) - 1]
    params = final.set_index("component")["params"]
    undone = final["precision"].where(final["component"] != last, "int8")
    assert _bits(final.assign(precision=undone)) > 6
    taken = ranks[ranks["to_spec"] == "int4-g64"]
    assert set(taken["statistic"]) == {"bits_per_param"} and (taken["threshold"] == 6).all()
    assert taken["value"].min() == pytest.approx(summary["bits_per_param"])
    fallback = decisions[decisions["to_spec"] == "int8"]
    assert set(fallback["component"]) == set(final["component"]) - at_int4
    assert params.sum() == summary["selected_params"]
    # One rank round (decide prompts) and one fallback round; no search, no validate probes.
    probes = _read(run, "probes")
    assert set(probes["round"]) == {0} and set(probes["fdt"].map(len)) == {8}
    assert json.loads((run / "run.json").read_text())["config"]["compress"]["target_bits"] == 6


def test_a_bits_budget_with_a_floor_stops_the_search_once_the_budget_is_met(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:

    run = tmp_path / "run"
    job = _quantize_job(tiny_llama_dir, run, target_bits=7, min_fdt=4)
    run_job(tmp_path, job)
    final = _read(run, "final/components")
    summary = _read(run, "final/summary").iloc[0]
    assert set(final["precision"]) <= {"int4-g64", "int8"}
    assert "float32" not in set(final["precision"])  # the fallback takes every unit left
    decisions = _read(run, "decisions")
    searched = decisions[decisions["statistic"] == "validate fdt_at_75_low"]
    accepted = searched[searched["reason"].str.endswith("accepted")]
    assert len(accepted) > 0
    # The search stopped adding at the budget: the average is <= 7 only with its last unit.
    assert summary["bits_per_param"] == pytest.approx(_bits(final))
    if summary["bits_per_param"] <= 7:
        last = accepted.sort_values("round").iloc[-1]["component"]
        undone = final["precision"].where(final["component"] != last, "int8")
        assert _bits(final.assign(precision=undone)) > 7
    # Search probes ran on the 8 validate prompts, each accepted one passing on its lower end.
    probes = _read(run, "probes").set_index(["round", "component"])
    for row in accepted.itertuples():
        probe = probes.loc[(row.round, row.component)]
        assert len(probe["fdt"]) == 8 and probe["fdt_at_75_low"] >= 4
