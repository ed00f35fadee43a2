"""Recovery training on Ray Train end to end: between rounds with the masks kept, the quality
floor, and a driver killed during training. (The settings and the steps alone:
tests/unit/test_recovery.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.jobs import checked_job, recovery_job

from dtm_ray.core.compress import replay
from dtm_ray.core.state import Link
from dtm_ray.engines.checkpoint import BASE_FILE


def _run(tmp_path: Path, job: dict) -> Path:
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import run_checked_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_checked_job(check_job(load_job(path)), print_summary=False)
    return Path(job["out"])


def read(run: Path, table: str) -> pd.DataFrame:
    return pd.read_parquet(run / table)


@pytest.fixture(scope="module")
def recovery_run(ray_session, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Two rounds to 20 % with 4 recovery steps on 2 Ray Train workers after each."""
    folder = tmp_path_factory.mktemp("recovery")
    return _run(folder, recovery_job(tiny_llama_dir, folder / "run"))


def rebuild_final_weights(run: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights from the run directory alone: the last round's base tensors (plain
    safetensors) with the last states/ chains replayed on them (or on the model's originals)."""
    states = read(run, "states")
    last = states[states["round"] == states["round"].max()]
    original = load_file(model_dir / "model.safetensors")
    rounds = int(last["round"].iloc[0])
    recovered = (run / "recovery" / f"round-{rounds:03d}.parquet").exists()
    base_round = rounds if recovered else last["base_round"].iloc[0]
    base = {}
    if not pd.isna(base_round):
        base = load_file(run / "base" / f"round-{int(base_round):03d}" / BASE_FILE)
    weights = {}
    for row in last.itertuples():
        start = base.get(row.component, original[row.component])
        chain = () if recovered else tuple(Link(spec) for spec in row.chain)
        weights[row.component] = replay(start, chain)
    return weights


def transformers_fdt(model_dir: Path, weights: dict[str, torch.Tensor], run: Path) -> np.ndarray:
    """FDT of the rebuilt model against the run's dense reference with transformers' own greedy
    generation, prompt by prompt (no dtm_ray engine involved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.load_state_dict(weights, strict=False)
    model.generation_config.eos_token_id = None
    reference = read(run, "reference")
    dense = reference[reference["round"] == 0].sort_values("prompt_id")
    fdt = []
    with torch.no_grad():
        pairs = zip(dense["prefix_ids"], dense["continuation_ids"], strict=True)
        for prefix, continuation in pairs:
            ids = torch.as_tensor([list(prefix)])
            out = model.generate(
                ids,
                max_new_tokens=len(continuation),
                do_sample=False,
                eos_token_id=None,
                pad_token_id=2,
            )[0, ids.shape[1] :].tolist()
            differ = [i for i, (a, b) in enumerate(zip(out, continuation, strict=True)) if a != b]
            fdt.append(differ[0] if differ else len(continuation))
    return np.asarray(fdt)


def test_recovery_trains_between_rounds_keeps_the_masks_and_the_run_dir_rebuilds_final(
    recovery_run: Path, tiny_llama_dir: Path, one_thread
) -> None:
    run = recovery_run
    recovery = read(run, "recovery").sort_values("round")
    states = read(run, "states")
    assert list(recovery["round"]) == [0, 1] == sorted(states["round"].unique())
    assert all(len(loss) == 4 for loss in recovery["loss"])
    # Round 1's chains start from round 0's base; its reference is the recovered model's.
    assert set(states[states["round"] == 1]["base_round"]) == {0}
    assert set(states[states["round"] == 0]["base_round"].isna()) == {True}
    for round_ in (0, 1):
        base = load_file(run / "base" / f"round-{round_:03d}" / BASE_FILE)
        pruned = states[states["round"] == round_].set_index("component")
        for name, tensor in base.items():
            # The pruned share stays zero (training keeps the mask; nothing revives a zero).
            assert (tensor == 0).float().mean().item() >= pruned.loc[name, "sparsity"] - 1e-9
        index = json.loads((run / "base" / f"round-{round_:03d}" / "base.json").read_text())
        assert index["loss"] == list(recovery[recovery["round"] == round_]["loss"].iloc[0])
    # Independent check: plain torch + transformers from the run directory alone.
    weights = rebuild_final_weights(run, tiny_llama_dir)
    final = read(run, "final/prompts")
    final = final[final["role"] == "decide"].sort_values("prompt_id")
    assert list(transformers_fdt(tiny_llama_dir, weights, run)) == list(final["fdt"])
    summary = read(run, "final/summary").iloc[0]
    assert summary["fdt_at_75"] >= 0
    # The export holds the same bits.
    export = load_file(run / "export" / "model.safetensors")
    assert all(torch.equal(export[name], w) for name, w in weights.items())
    # The recovery row agrees with the final evaluation on the final model (last round's).
    last = recovery[recovery["round"] == 1].iloc[0]
    assert list(last["fdt_after"]) == list(final["fdt"])


def test_the_quality_floor_cuts_the_round_back_and_stops_the_run(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = recovery_job(tiny_llama_dir, tmp_path / "run")
    job["compress"] = {"target_sparsity": 0.9, "step": 0.45, "min_fdt": 12}
    run = _run(tmp_path, job)
    floor = read(run, "floor")
    states = read(run, "states")
    stopped = int(floor["round"].max())
    assert stopped == states["round"].max()
    rows = floor[floor["round"] == stopped]
    assert not rows[rows["scale"] == 1.0]["passed"].iloc[0]  # the decided round fell below
    # Candidates are scored on the validate prompts and pass on the lower end of FDT@75's
    # 90 % interval there.
    assert set(floor["statistic"]) == {"validate fdt_at_75_low"}
    assert set(floor["role"]) == {"validate"} and set(floor["fdt"].map(len)) == {8}
    assert (floor["passed"] == (floor["fdt_at_75_low"] >= 12)).all()
    assert (floor["fdt_at_75_low"] <= floor["fdt_at_75"]).all()
    kept = rows[rows["passed"]]
    summary = read(run, "final/summary").iloc[0]
    if len(kept):  # the final model keeps the floor against the dense one on validate
        best = kept.sort_values("scale").iloc[-1]
        assert summary["validate_fdt_at_75_low"] >= 12
        assert summary["validate_fdt_at_75"] == best["fdt_at_75"]
        assert summary["validate_fdt_at_75_low"] == best["fdt_at_75_low"]
    assert summary["sparsity"] < 0.9 - 0.005


def test_a_driver_killed_during_training_resumes_from_the_ray_train_checkpoint_bit_identically(
    ray_session, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    job = recovery_job(tiny_llama_dir, run, workers=1, steps=6, checkpoint_every=2)
    job["compress"]["target_sparsity"] = 0.1  # one round, one recovery
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "dtm_ray.cli", "run", str(path)]
    with open(tmp_path / "driver.log", "a") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while not list((run / "train" / "round-000").glob("checkpoint_*/progress.json")):
                assert driver.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    assert not (run / "base").exists(), "the training was not interrupted"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trained = load_file(run / "base" / "round-000" / BASE_FILE)

    # The same training, uninterrupted, straight on Ray Train.
    from dtm_ray.cluster.recovery import Recovery, train
    from dtm_ray.records.schemas import STATE_SCHEMA, state_from_table
    from dtm_ray.records.store import RunStore

    checked = checked_job(tmp_path, job)
    store = RunStore(str(run))
    state, _ = state_from_table(store.read_round_table("states", STATE_SCHEMA, 0), {})
    settings = checked.compress.recovery
    straight = train(
        Recovery(
            str(tiny_llama_dir),
            "float32",
            state,
            [c.name for c in checked.components],
            checked.training,
            settings.steps,
            settings.learning_rate,
            settings.weight_decay,
            settings.batch_size,
            settings.seed,
            settings.checkpoint_every,
            settings.objective,
        ),
        1,
        {"CPU": 1},
        "straight",
        str(tmp_path / "straight"),
    )
    assert set(straight.weights) == set(trained)
    assert all(torch.equal(straight.weights[n], trained[n]) for n in trained)
    index = json.loads((run / "base" / "round-000" / "base.json").read_text())
    assert index["loss"] == straight.loss
