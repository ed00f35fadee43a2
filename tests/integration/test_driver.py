"""The driver end to end: real actors, real engines, real Parquet, checked against the
in-process probe; killed drivers and killed actors; resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dtm_ray.core.components import Component
from dtm_ray.core.compress import compress
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.probe import build_reference, run_probe, score_against
from dtm_ray.errors import ConfigError
from dtm_ray.job.checks import Plan, plan_job
from dtm_ray.job.spec import load_job
from dtm_ray.loop.driver import run_plan
from dtm_ray.loop.progress import Streaming
from dtm_ray.records.schemas import probe_keys, reference_from_table
from dtm_ray.records.store import RunStore

JOBS = Path(__file__).resolve().parents[1] / "jobs"
ALL_KINDS = ["q", "k", "v", "o", "gate", "up", "down"]
PROBE_COLUMNS = [
    "round", "component", "layer", "kind", "spec", "params", "fdt", "sdt", "fdt_mean",
    "fdt_at_75", "sdt_mean", "nll_mean", "seconds", "worker", "status", "error",
]  # fmt: skip


def make_plan(tmp_path: Path, job: dict, overrides: list[str] | None = None) -> Plan:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return plan_job(load_job(path, overrides))


def tiny_job(model_dir: Path, out: Path, **changes) -> dict:
    job = {
        "model": str(model_dir),
        "engine": "hf",
        "prompts": {"source": "self", "count": 16, "prefix_tokens": 16},
        "new_tokens": 32,
        "probe": {"components": "all", "specs": ["magnitude:0.5", "int8"]},
        "workers": 2,
        "out": str(out),
    }
    job.update(changes)
    return job


def in_process_values(
    model_dir: Path, run_dir: str, probes: list[tuple[str, str]], n_new: int
) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    """FDT/SDT of each probe from an HFEngine in this process, on the prompts the run stored.

    The reference is rebuilt here from those prompts and must equal the stored one, so the run's
    greedy continuations and base argmax are checked as well as its probes.
    """
    stored = reference_from_table(RunStore(run_dir).read_reference(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each engine actor, so both take the same kernels
    try:
        engine = HFEngine(model_dir, batch_size=16)
        reference = build_reference(engine, stored.prefixes, n_new)
        np.testing.assert_array_equal(reference.continuation, stored.continuation)
        np.testing.assert_array_equal(reference.base_argmax, stored.base_argmax)
        values = {}
        for component, spec in probes:
            result = run_probe(engine, reference, component, spec)
            values[(component, spec)] = (result.fdt.tolist(), result.sdt.tolist())
        return values
    finally:
        torch.set_num_threads(threads)


def table_values(run_dir: str) -> dict[tuple[str, str], tuple[list[int], list[int]]]:
    rows = RunStore(run_dir).read_probes().to_pylist()
    return {(r["component"], r["spec"]): (r["fdt"], r["sdt"]) for r in rows}


def assert_every_probe_exactly_once(run_dir: str, plan: Plan) -> None:
    raw = RunStore(run_dir).read_probes(dedupe=False)
    keys = list(probe_keys(raw))
    assert len(keys) == len(set(keys)), "a probe was written twice"
    assert set(keys) == {(0, c.name, s) for c, s in plan.probes}
    assert set(raw.column("status").to_pylist()) == {"ok"}


def visible_probe_files(run_dir: Path) -> list[Path]:
    folder = run_dir / "probes"
    return (
        [p for p in folder.glob("*.parquet") if not p.name.startswith(".")]
        if folder.is_dir()
        else []
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent_pid(pid)
    return False


def engine_actor_pids() -> list[int]:
    """EngineActor processes of this test session's Ray (workers descend from our raylet)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                title = cmdline.read()
            if title.startswith(b"ray::EngineActor") and _descends_from(int(entry), os.getpid()):
                pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(pids)


# --- the round on the tiny model ---------------------------------------------------------------
def test_tiny_run_matches_the_in_process_probe_and_resumes(
    ray_session, tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    plan = make_plan(tmp_path, tiny_job(tiny_llama_dir, out))
    assert len(plan.probes) == 28

    outcome = run_plan(plan)
    assert outcome.ran == 28
    assert_every_probe_exactly_once(str(out), plan)
    table = outcome.probes
    assert set(PROBE_COLUMNS) <= set(table.column_names)
    assert set(table.column("params").to_pylist()) == {128 * 128, 64 * 128, 256 * 128}
    assert len(set(table.column("worker").to_pylist())) == 2  # both actors served probes

    expected = in_process_values(
        tiny_llama_dir, str(out), [(c.name, s) for c, s in plan.probes], 32
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
    again = run_plan(make_plan(tmp_path, tiny_job(tiny_llama_dir, out, workers=1)))
    assert again.ran == 0
    assert (out / "reference" / "round-000.parquet").stat().st_mtime_ns == reference_mtime

    # Lose the last rows, as if the driver had died before writing them: only those are redone.
    compacted = out / "probes" / "round-000.parquet"
    rows = pq.read_table(compacted)
    pq.write_table(rows.slice(0, rows.num_rows - 5), compacted)
    lost = set(probe_keys(rows)) - set(probe_keys(RunStore(str(out)).read_probes()))
    assert len(lost) == 5
    partial = run_plan(make_plan(tmp_path, tiny_job(tiny_llama_dir, out, workers=1)))
    assert partial.ran == len(lost)
    assert_every_probe_exactly_once(str(out), plan)
    assert table_values(str(out)) == expected

    with pytest.raises(ConfigError, match="new_tokens: 32 in the run, 16 now"):
        run_plan(make_plan(tmp_path, tiny_job(tiny_llama_dir, out, new_tokens=16)))


def test_a_probe_that_raises_is_recorded_as_failed_after_its_retries(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job = tiny_job(tiny_llama_dir, out, max_probe_retries=1, workers=1)
    job["probe"] = {"components": [{"kinds": ["q"], "layers": [0]}], "specs": ["int8"]}
    plan = make_plan(tmp_path, job)
    # A component the model lacks makes the probe itself raise inside the actor.
    plan.components.append(Component("model.layers.9.self_attn.q_proj.weight", 9, "q", (128, 128)))
    run_plan(plan, print_summary=False)
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


# --- crashes ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_engine_actor_is_restarted_and_no_probe_is_lost(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    # One actor: after the kill every probe left must wait for its restart, so the restarted
    # actor serves probes whatever the machine's speed (with two, the survivor could finish
    # them all before the restart is up).
    plan = make_plan(tmp_path, tiny_job(tiny_llama_dir, out, workers=1))
    killed: list[int] = []
    others = set(engine_actor_pids())  # actors other tests of this session may still hold

    def kill_one_actor_mid_run() -> None:
        wait_for(lambda: visible_probe_files(out), 600, "the first probe file")
        victim = min(set(engine_actor_pids()) - others)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    run_plan(plan, Streaming(flush_every=2), print_summary=False)
    killer.join(timeout=5)

    assert killed, "no actor was killed"
    assert_every_probe_exactly_once(str(out), plan)
    workers = set(RunStore(str(out)).read_probes().column("worker").to_pylist())
    pids = {int(w.rpartition(":")[2]) for w in workers}
    assert killed[0] in pids and len(pids) >= 2, f"the restarted actor served no probe: {workers}"
    # Had any probe been scored on a half-patched model, its FDT/SDT would differ here.
    expected = in_process_values(
        tiny_llama_dir, str(out), [(c.name, s) for c, s in plan.probes], 32
    )
    assert table_values(str(out)) == expected


@pytest.mark.slow
def test_a_killed_driver_resumes_with_every_probe_exactly_once(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    job = tiny_job(tiny_llama_dir, out)
    job["probe"]["specs"] = ["magnitude:0.3", "magnitude:0.6", "nm:2:4"]
    plan = make_plan(tmp_path, job)
    job_file = tmp_path / "job.yaml"
    # The driver joins this session's cluster, so killing it leaves no Ray processes behind:
    # Ray removes a dead driver's actors itself.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    # Probe rows in files of 4 (the default is hundreds), so the kill finds part of them written.
    faults = Path(__file__).resolve().parent / "driver_with_faults.py"
    command = [sys.executable, str(faults), str(job_file), "--flush-every", "4"]

    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: visible_probe_files(out) or driver.poll() is not None, 600, "probes")
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    survived_rows = RunStore(str(out)).read_probes(dedupe=False)
    survived = survived_rows.num_rows
    assert 0 < survived < len(plan.probes), (tmp_path / "first.log").read_text()[-2000:]

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert f"probing: {len(plan.probes) - survived} to run, {survived} done before" in second.stderr
    assert "taking over the lease of the driver" in second.stderr  # its process is gone
    takeover = next(ln for ln in second.stderr.splitlines() if "taking over the lease" in ln)
    print(f"\nkilled driver: {survived} of {len(plan.probes)} rows survived; {takeover}")
    assert_every_probe_exactly_once(str(out), plan)
    # The rows the killed driver wrote were kept as they were, not redone.
    final = {(r["component"], r["spec"]): r for r in RunStore(str(out)).read_probes().to_pylist()}
    for row in survived_rows.to_pylist():
        kept = final[(row["component"], row["spec"])]
        assert (kept["worker"], kept["fdt"]) == (row["worker"], row["fdt"])


# --- SmolLM2 acceptance -----------------------------------------------------------------------
FULL = os.environ.get("DTM_RAY_ACCEPTANCE") == "full"


@pytest.mark.slow
def test_smollm2_round_matches_the_in_process_probe(
    ray_session, smollm2_dir: Path, tmp_path: Path
) -> None:
    """The demo job on 2 workers. CI runs a cut-down copy (14 probes, 8 prompts x 16+32 tokens);
    DTM_RAY_ACCEPTANCE=full runs its prompts on 4 layers: 56 probes, 32 prompts x 32+64 tokens.
    """
    out = tmp_path / "run"
    overrides = ["engine=hf", "workers=2", f"out={out}"]
    if FULL:
        overrides += [
            "probe.components=[{kinds: [q, k, v, o, gate, up, down], layers: [0, 10, 20, 29]}]"
        ]
    else:
        overrides += [
            "prompts.count=8",
            "prompts.prefix_tokens=16",
            "new_tokens=32",
            "probe.components=[{kinds: [q, k, v, o, gate, up, down], layers: [3]}]",
        ]
    plan = plan_job(load_job(JOBS / "smollm2-demo.yaml", overrides))
    assert {c.kind for c in plan.components} == set(ALL_KINDS) and len(plan.specs) >= 2
    start = time.monotonic()
    outcome = run_plan(plan)
    wall = time.monotonic() - start
    assert_every_probe_exactly_once(str(out), plan)

    n_new = plan.job.new_tokens
    expected = in_process_values(
        smollm2_dir, str(out), [(c.name, s) for c, s in plan.probes], n_new
    )
    got = table_values(str(out))
    equal = sum(got[key] == expected[key] for key in expected)
    print(
        f"\nSmolLM2: {len(plan.probes)} probes x {plan.job.prompts.count} prompts on 2 workers "
        f"in {wall:.0f}s; FDT/SDT equal to the in-process probe for {equal}/{len(expected)}"
    )
    assert equal == len(expected)
    fdt75 = outcome.probes.column("fdt_at_75").to_pylist()
    assert min(fdt75) < n_new  # magnitude pruning must hurt somewhere
