"""The driver end to end: real actors, real engines, real Parquet, checked against the
in-process probe; resume. (Killed drivers and actors: tests/e2e/test_disturbances.py; SmolLM2's
round: tests/e2e/test_smollm2_round.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support.checks import (
    assert_every_probe_exactly_once,
    in_process_values,
    table_values,
    visible_probe_files,
)
from support.jobs import checked_job, tiny_job

from dtm_ray.core.components import Component
from dtm_ray.core.compress import compress
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.probe import build_reference, score_against
from dtm_ray.errors import ConfigError
from dtm_ray.job.checks import CheckedJob
from dtm_ray.loop.driver import run_checked_job
from dtm_ray.records.schemas import probe_keys
from dtm_ray.records.store import RunStore

PROBE_COLUMNS = [
    "round", "component", "layer", "kind", "spec", "params", "fdt", "sdt", "fdt_mean",
    "fdt_at_75", "sdt_mean", "nll_mean", "seconds", "worker", "status", "error",
]  # fmt: skip


# The driver tests' job: 16 of the model's own prompts of 16 tokens, 32 new tokens, two specs.
DRIVER = {
    "prompts": {"source": "self", "count": 16, "prefix_tokens": 16},
    "new_tokens": 32,
    "probe": {"specs": ["magnitude:0.5", "int8"]},
}


def make_checked_job(tmp_path: Path, job: dict, overrides: list[str] | None = None) -> CheckedJob:
    return checked_job(tmp_path, job, overrides)


def driver_job(model_dir: Path, out: Path, **changes) -> dict:
    return tiny_job(model_dir, out, **{**DRIVER, **changes})


# --- the round on the tiny model ---------------------------------------------------------------
def test_tiny_run_matches_the_in_process_probe_and_resumes(
    ray_session, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    checked = make_checked_job(tmp_path, driver_job(tiny_llama_dir, out))
    assert len(checked.probes) == 28

    outcome = run_checked_job(checked)
    assert outcome.ran == 28
    assert_every_probe_exactly_once(str(out), checked)
    table = outcome.probes
    assert set(PROBE_COLUMNS) <= set(table.column_names)
    assert set(table.column("params").to_pylist()) == {128 * 128, 64 * 128, 256 * 128}
    assert len(set(table.column("worker").to_pylist())) == 2  # both actors served probes

    expected = in_process_values(
        tiny_llama_dir, str(out), [(c.name, s) for c, s in checked.probes], 32
    )
    assert table_values(str(out)) == expected
    assert any(fdt != [32] * 16 for fdt, _ in expected.values())  # something diverged at all

    reference = RunStore(str(out)).read_reference(0)
    assert reference.column("prompt_id").to_pylist() == list(range(16))
    assert len(reference.column("prefix_ids")[0].as_py()) == 16
    assert {"noise_positions", "min_margin", "base_argmax"} <= set(reference.column_names)
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["prompts"]["count"] == 16
    assert {"python", "torch", "transformers", "ray", "dtm_ray"} <= set(info["versions"])
    assert info["hardware"]["cpu_count"] >= 1 and "created" in info
    summary = capsys.readouterr().out
    assert "28 probes (28 ok, 0 failed) over 16 prompts x 32 tokens" in summary
    assert "noise floor:" in summary and "magnitude:0.5: 5 most robust by FDT@75" in summary

    # The round's per-flush files were compacted into one file when it ended.
    assert [p.name for p in visible_probe_files(out)] == ["round-000.parquet"]

    # Resume: nothing left to run; the reference is reused, not regenerated.
    reference_mtime = (out / "reference" / "round-000.parquet").stat().st_mtime_ns
    again = run_checked_job(make_checked_job(tmp_path, driver_job(tiny_llama_dir, out, workers=1)))
    assert again.ran == 0
    assert (out / "reference" / "round-000.parquet").stat().st_mtime_ns == reference_mtime

    # Lose the last rows, as if the driver had died before writing them: only those are redone.
    compacted = out / "probes" / "round-000.parquet"
    rows = pq.read_table(compacted)
    pq.write_table(rows.slice(0, rows.num_rows - 5), compacted)
    lost = set(probe_keys(rows)) - set(probe_keys(RunStore(str(out)).read_probes()))
    assert len(lost) == 5
    partial = run_checked_job(
        make_checked_job(tmp_path, driver_job(tiny_llama_dir, out, workers=1))
    )
    assert partial.ran == len(lost)
    assert_every_probe_exactly_once(str(out), checked)
    assert table_values(str(out)) == expected

    with pytest.raises(ConfigError, match="new_tokens: 32 in the run, 16 now"):
        run_checked_job(make_checked_job(tmp_path, driver_job(tiny_llama_dir, out, new_tokens=16)))


def test_a_probe_that_raises_is_recorded_as_failed_after_its_retries(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job = driver_job(tiny_llama_dir, out, max_probe_retries=1, workers=1)
    job["probe"] = {"components": [{"kinds": ["q"], "layers": [0]}], "specs": ["int8"]}
    checked = make_checked_job(tmp_path, job)
    # A component the model lacks makes the probe itself raise inside the actor.
    checked.components.append(
        Component("model.layers.9.self_attn.q_proj.weight", 9, "q", (128, 128))
    )
    run_checked_job(checked, print_summary=False)
    rows = {r["component"]: r for r in RunStore(str(out)).read_probes(dedupe=False).to_pylist()}
    assert len(rows) == 2
    bad = rows["model.layers.9.self_attn.q_proj.weight"]
    assert bad["status"] == "failed" and bad["attempts"] == 2 and bad["fdt"] is None
    assert bad["error"].startswith("KeyError: ") and "no weight named" in bad["error"]
    good = rows["model.layers.0.self_attn.q_proj.weight"]
    assert good["status"] == "ok" and good["attempts"] == 1
    # The failed probe left the engine clean: the good probe equals the in-process one.
    expected = in_process_values(tiny_llama_dir, str(out), [(good["component"], "int8")], 32)
    assert (good["fdt"], good["sdt"]) == expected[(good["component"], "int8")]


def test_an_actor_scores_against_the_reference_each_call_brings(
    ray_session, tiny_llama_dir: Path
) -> None:
    """Same round, same state, another reference (a resumed round, or reference: original):
    the actor must score against the new one, not a reference it saw before."""
    import ray

    from dtm_ray.cluster.actor import RoundContext, start_engine_actors
    from dtm_ray.core.state import Link, ModelState
    from dtm_ray.engines import EngineConfig

    q0 = "model.layers.0.self_attn.q_proj.weight"
    down1 = "model.layers.1.mlp.down_proj.weight"
    state = ModelState({q0: (Link("magnitude:0.3"),)})
    engine = HFEngine(tiny_llama_dir)
    rng = np.random.default_rng(1)
    references = [build_reference(engine, rng.integers(3, 900, (4, 8)), 12) for _ in range(2)]
    (actor,) = start_engine_actors(str(tiny_llama_dir), EngineConfig(kind="hf"), 1, {"CPU": 1})
    try:
        got = [
            ray.get(actor.probe.remote({down1: "magnitude:0.9"}, RoundContext(3, state, ref)))
            for ref in references
        ]
    finally:
        ray.kill(actor)
    engine.set_weights(
        {
            q0: compress(engine.original_weight(q0), "magnitude:0.3"),
            down1: compress(engine.original_weight(down1), "magnitude:0.9"),
        }
    )
    expected = [score_against(engine, reference) for reference in references]
    # A stale reference would show: the two references give different answers.
    assert (expected[0].fdt.tolist(), expected[0].sdt.tolist()) != (
        expected[1].fdt.tolist(),
        expected[1].sdt.tolist(),
    )
    for scored, want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(scored.result.fdt, want.fdt)
        np.testing.assert_array_equal(scored.result.sdt, want.sdt)
