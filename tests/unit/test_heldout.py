"""Held-out prompts in a job: checking it draws the three roles (decide, validate, test) apart, a
run directory as prompt source hands over its own roles, `plan` says how wide FDT@75's interval
will be, and the bits budget (`compress.target_bits`) of a quantize run lands where its rule
says, checked against the run's own tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.jobs import EVALUATION, checked_job, tiny_job

from dtm_ray.core.state import Reference
from dtm_ray.errors import ConfigError
from dtm_ray.loop.estimate import estimate, flop_costs, format_estimate
from dtm_ray.records.schemas import reference_table
from dtm_ray.records.store import RunStore


def _quantize_job(model_dir: Path, out: Path, **compress) -> dict:
    compress = {"method": "quantize", "levels": ["int4-g64", "int8"], **compress}
    return tiny_job(model_dir, out, compress=compress, evaluation=EVALUATION)


def test_a_compressing_plan_draws_three_disjoint_roles_and_a_probe_only_plan_one(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = _quantize_job(tiny_llama_dir, tmp_path / "run", min_fdt=8)
    checked = checked_job(tmp_path, job)
    assert checked.job.prompts.validate_count == 8 and checked.job.evaluation.prompts == 32
    assert {r: a.shape for r, a in checked.heldout.items()} == {"validate": (8, 8), "test": (32, 8)}
    windows = {role: {tuple(w) for w in r["windows"]} for role, r in checked.roles.items()}
    assert sorted(windows) == ["decide", "test", "validate"]
    spans = [(role, w) for role, ws in windows.items() for w in ws]
    for role, (t, a, b) in spans:  # no window of one role overlaps one of another
        for other, (u, c, d) in spans:
            assert other == role or t != u or b <= c or d <= a, (role, other)
    # The decide prompts are the ones the job drew before the roles existed.
    probe_only = dict(job, compress=None, probe={"components": "all", "specs": ["int8"]})
    alone = checked_job(tmp_path, probe_only, name="probe.yaml")
    np.testing.assert_array_equal(alone.prefixes, checked.prefixes)
    assert alone.heldout == {} and list(alone.roles) == ["decide"]
    assert alone.job.prompts.validate_count is None and alone.job.evaluation.prompts is None


def _earlier_run(folder: Path, roles: dict[str, int]) -> dict[str, np.ndarray]:
    """A run directory whose dense references hold `roles` prompts of 8 tokens each."""
    store = RunStore(str(folder))
    store.write_json("run.json", {"config": {"model": "x"}})
    prefixes = {}
    for offset, (role, count) in enumerate(roles.items()):
        prefixes[role] = np.arange(count * 8, dtype=np.int64).reshape(count, 8) + 100 * offset
        zeros = np.zeros((count, 8), dtype=np.int64)
        reference = Reference(prefixes[role], zeros, zeros, np.ones((count, 8), dtype=np.float32))
        store.write_reference(reference_table(reference, 0), 0, role)
    return prefixes


def test_a_run_dir_as_source_hands_over_each_of_its_roles(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first"
    prefixes = _earlier_run(first, {"decide": 4, "validate": 4, "test": 16})
    job = tiny_job(
        tiny_llama_dir,
        tmp_path / "second",
        compress={"target_sparsity": 0.2},
        evaluation=EVALUATION,
    )
    job["prompts"] = {"source": f"run:{first}", "count": 3, "prefix_tokens": 6}
    job["evaluation"]["prompts"] = 10
    checked = checked_job(tmp_path, job)
    np.testing.assert_array_equal(checked.prefixes, prefixes["decide"][:3, :6])
    np.testing.assert_array_equal(checked.heldout["validate"], prefixes["validate"][:3, :6])
    np.testing.assert_array_equal(checked.heldout["test"], prefixes["test"][:10, :6])
    job["evaluation"]["prompts"] = 17
    with pytest.raises(ConfigError, match=r"holds 16 test prefixes .* evaluation.prompts \(17\)"):
        checked_job(tmp_path, job)


def _format(tmp_path: Path, job: dict) -> str:
    checked = checked_job(tmp_path, job)
    return format_estimate(checked, estimate(checked, flop_costs(checked)))


def test_plan_prints_each_roles_interval_width_and_warns_when_the_floor_cannot_be_resolved(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = _quantize_job(tiny_llama_dir, tmp_path / "run", min_fdt=8)
    text = _format(tmp_path, job)
    # N = 16: 2 * 1.645 * sqrt(0.1875 / P) * 16 = 8.1 tokens for 8 prompts, 4.0 for 32.
    assert "decide 8 prompts: 8.1 tokens, validate 8 prompts: 8.1 tokens, test 32" in text
    assert "test 32 prompts: 4.0 tokens" in text
    assert "warning: on 8 validate prompts FDT@75's interval is about 8.1 tokens wide" in text
    assert "about 33 validate prompts would" in text  # 8.1^2 * 8 / 4^2
    job["prompts"]["validate_count"] = 33
    assert "warning" not in _format(tmp_path, job)


# --- the bits budget, end to end ------------------------------------------------------------------


def test_the_summary_quotes_the_test_prompts_first_and_labels_the_decide_ones_in_sample() -> None:
    from dtm_ray.results.roles import fdt_lines, role_numbers

    decide = {
        "prompts": 16,
        "fdt_at_75": 20,
        "fdt_at_75_low": 20,
        "fdt_at_75_high": 29,
        "fdt_mean": 25.2,
        "sdt_share": 0.02,
    }
    summary = {**decide}
    for role, value in (("test", 4), ("validate", 17)):
        summary.update({f"{role}_{k}": v for k, v in decide.items()})
        summary.update(
            {f"{role}_prompts": 64 if role == "test" else 16, f"{role}_fdt_at_75": value}
        )
    lines = fdt_lines(summary)
    assert [r for r, _ in role_numbers(summary)] == ["test", "validate", "decide"]
    assert lines[0].startswith("on 64 test prompts (held out: no decision read them): FDT@75 4 ")
    assert lines[2].startswith(
        "on 16 decide prompts (in-sample: the rounds probed them): FDT@75 20"
    )
    # A run from before the roles: its numbers, said to be on the prompts the rounds probed.
    older = {**decide, "test_fdt_at_75": float("nan"), "validate_fdt_at_75": None}
    (line,) = fdt_lines(older)
    assert line.startswith("on 16 prompts (the ones the rounds probed: in-sample): FDT@75 20 ")


def test_a_finished_run_from_before_the_roles_still_shows_and_reports(tmp_path: Path) -> None:
    """final/ tables written without the roles' columns read back (nulls), and show and the
    report's key numbers quote their numbers as what they are: the probed prompts'."""
    import pyarrow as pa

    from dtm_ray.records.schemas import FINAL_PROMPTS_SCHEMA, FINAL_SUMMARY_SCHEMA
    from dtm_ray.results.report import key_numbers
    from dtm_ray.results.show import format_show, load_run

    store = RunStore(str(tmp_path / "old"))
    config = {"model": "m", "new_tokens": 8, "compress": {"method": "sparsify"}}
    store.write_json("run.json", {"config": config})
    new = {f"test_{n}" for n in ("prompts", "fdt_at_75")} | {"role", "target_bits"}
    old_summary = pa.schema(
        [
            f
            for f in FINAL_SUMMARY_SCHEMA
            if not f.name.startswith(("test_", "validate_")) and f.name != "target_bits"
        ]
    )
    row = {f.name: (0.5 if pa.types.is_floating(f.type) else 1) for f in old_summary}
    row.update({"text_source": "pydoc", "fdt_at_75": 5, "prompts": 4})
    store.write_final("summary", pa.Table.from_pylist([row], schema=old_summary))
    old_prompts = pa.schema([f for f in FINAL_PROMPTS_SCHEMA if f.name not in new])
    store.write_final("prompts", old_prompts.empty_table())
    run = load_run(str(tmp_path / "old"))
    assert run.final["summary"]["test_fdt_at_75"].isna().all()
    shown = format_show(run)
    assert "on 4 prompts (the ones the rounds probed: in-sample): FDT@75 5 " in shown
    assert "test" not in str(key_numbers(run).iloc[:, 0].tolist())
