"""Recovery training and the quality floor: the pure parts (masks, batches), the engine session on
a base, the config checks, and end-to-end runs of the tiny Llama on Ray Train (2 CPU workers),
checked against an independent rebuild of the final weights with plain torch + transformers."""

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
from safetensors.torch import load_file, save_file

from dtm_ray.core.compress import compress, replay
from dtm_ray.core.recovery import (
    distill_loss,
    masks_of,
    reapply_masks,
    step_rows,
    worker_rows,
)
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.checkpoint import BASE_FILE
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.session import EngineSession
from dtm_ray.errors import ConfigError

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"


# --- the pure parts ------------------------------------------------------------------------------
def _adamw_steps(weight: torch.Tensor, remask: bool, steps: int = 5) -> torch.Tensor:
    param = torch.nn.Parameter(weight.clone())
    masks = masks_of({"w": param})
    optimizer = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        # Every entry gets a gradient, the pruned ones too: the masks must undo what it does.
        (param.sum() + (param**2).sum()).backward()
        optimizer.step()
        if remask:
            reapply_masks([("w", param)], masks)
    return param.detach()


def test_the_mask_keeps_zeros_zero_under_adamw_weight_decay() -> None:
    dense = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    weight = compress(dense, "magnitude:0.5")
    zeros = weight == 0
    assert zeros.sum() == 128
    unmasked = _adamw_steps(weight, remask=False)
    assert (unmasked[zeros] != 0).all()  # what the mask is for: AdamW revives every zero
    masked = _adamw_steps(weight, remask=True)
    assert (masked[zeros] == 0).all()
    assert not torch.equal(masked[~zeros], weight[~zeros])  # and the rest did train


def test_a_step_trains_on_a_fixed_batch_and_the_workers_split_it() -> None:
    assert np.array_equal(step_rows(3, 4, 10, 7), step_rows(3, 4, 10, 7))
    # One epoch visits every sequence once, in a seeded order, across step boundaries.
    epoch = np.concatenate([step_rows(s, 5, 10, 7) for s in range(2)])
    assert sorted(epoch) == list(range(10))
    assert not np.array_equal(step_rows(0, 5, 10, 7), step_rows(0, 5, 10, 8))
    rows = step_rows(1, 4, 10, 0)
    assert np.array_equal(np.concatenate([worker_rows(rows, r, 2) for r in range(2)]), rows)


def test_the_distillation_loss_is_the_mean_per_token_kl_to_the_teacher() -> None:
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 3, 5, generator=generator)
    student = torch.randn(2, 3, 5, generator=generator)
    assert distill_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)
    p = torch.softmax(teacher, -1)
    expected = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1)
    assert distill_loss(student, teacher).item() == pytest.approx(expected.mean().item(), 1e-6)


# --- the engine session on a base ----------------------------------------------------------------
def _write_base(folder: Path, tensors: dict[str, torch.Tensor]) -> str:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / BASE_FILE)
    return str(folder)


def test_a_session_on_a_base_holds_its_tensors_replays_chains_on_them_and_puts_them_back(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    engine = HFEngine(tiny_llama_dir)
    session = EngineSession(engine, push_bytes=1)  # one weight per push batch
    original = {n: engine.original_weight(n) for n in (Q0, UP1)}
    trained = {n: w + 0.01 for n, w in original.items()}
    base = _write_base(tmp_path / "base", trained)
    held = lambda name: engine.model.get_parameter(name).detach()  # noqa: E731

    session.apply_state(ModelState({}, base))
    assert all(torch.equal(held(n), trained[n]) for n in trained)
    on_base = ModelState({Q0: (Link("magnitude:0.5"),)}, base)
    session.apply_state(on_base)
    assert torch.equal(held(Q0), compress(trained[Q0], "magnitude:0.5"))
    assert torch.equal(held(UP1), trained[UP1])
    # A probe compresses the base's weight and puts the base's weight back, not the original.
    reference = session.build_reference(np.arange(3, 27).reshape(3, 8), 4)
    session.probe({UP1: "magnitude:0.3"}, reference)
    assert torch.equal(held(UP1), trained[UP1])
    # Another session reaching the same state from scratch holds the same bits.
    other = EngineSession(HFEngine(tiny_llama_dir))
    other.apply_state(on_base)
    assert all(torch.equal(other.engine.model.get_parameter(n).detach(), held(n)) for n in trained)
    # Back to no base: the originals, bit for bit.
    session.apply_state(ModelState())
    assert all(torch.equal(held(n), original[n]) for n in original)


# --- config checks -------------------------------------------------------------------------------
def recovery_job(model_dir: Path, out: Path, **recovery) -> dict:
    settings = {
        "steps": 4,
        "learning_rate": 1e-3,
        "batch_size": 2,
        "sequence_tokens": 32,
        "workers": 2,
        "checkpoint_every": 2,
        **recovery,
    }
    return {
        "model": str(model_dir),
        "engine": "hf",
        "dtype": "float32",
        "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 8},
        "new_tokens": 16,
        "compress": {"target_sparsity": 0.2, "step": 0.1, "recovery": settings},
        "evaluation": {"text": "pydoc", "count": 4, "tokens": 32},
        "workers": 2,
        "out": str(out),
    }


def _plan(tmp_path: Path, job: dict):
    from dtm_ray.job.checks import plan_job
    from dtm_ray.job.spec import load_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return plan_job(load_job(path))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "compress.recovery.steps must be an integer >= 1, got 0"),
        ({"learning_rate": 0}, "compress.recovery.learning_rate must be a number > 0, got 0"),
        ({"learning_rate": -1e-5}, "learning_rate must be a number > 0"),
        ({"warmup": 3}, "unknown key compress.recovery.'warmup'"),
        ({"batch_size": 3}, "batch_size 3 must be a multiple of compress.recovery.workers 2"),
        ({"engines": "maybe"}, "compress.recovery.engines 'maybe' unknown"),
        ({"objective": "mse"}, "compress.recovery.objective 'mse' unknown"),
        ({"sequence_tokens": 4096}, "compress.recovery.sequence_tokens = 4096 tokens exceed 512"),
    ],
)
def test_bad_recovery_settings_fail_in_one_line(
    tiny_llama_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        _plan(tmp_path, recovery_job(tiny_llama_dir, tmp_path / "run", **change))
    assert "\n" not in str(err.value)


def test_recovery_on_a_quantize_run_and_a_floor_above_new_tokens_fail(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = recovery_job(tiny_llama_dir, tmp_path / "run")
    job["compress"] = {"method": "quantize", "levels": ["int8"], "min_fdt": 4, "recovery": {}}
    with pytest.raises(ConfigError, match="does not apply to method 'quantize'"):
        _plan(tmp_path, job)
    job = recovery_job(tiny_llama_dir, tmp_path / "run")
    job["compress"]["min_fdt"] = 17
    with pytest.raises(ConfigError, match="min_fdt 17 exceeds new_tokens 16"):
        _plan(tmp_path, job)


def test_training_text_holding_the_scored_prompts_or_the_evaluation_text_fails(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from pydoc_data.topics import topics

    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    job = recovery_job(tiny_llama_dir, tmp_path / "run", text=str(copy))
    with pytest.raises(ConfigError, match="shares 8 consecutive tokens with the scored prompts"):
        _plan(tmp_path, job)
    job["prompts"]["source"] = "self"  # no prompts to compare: the evaluation text is found
    with pytest.raises(ConfigError, match="shares 32 consecutive tokens with the evaluation"):
        _plan(tmp_path, job)
    # The prompts' own source is fine: the windows overlapping them are left out.
    plan = _plan(tmp_path, recovery_job(tiny_llama_dir, tmp_path / "run"))
    from dtm_ray.engines.prompts import overlapping

    assert not overlapping(plan.training, plan.prefixes, 8).any()
    assert plan.training.shape[1] == 32


# --- end to end on Ray Train ---------------------------------------------------------------------
def _run(tmp_path: Path, job: dict) -> Path:
    from dtm_ray.job.checks import plan_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import run_plan

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    run_plan(plan_job(load_job(path)), print_summary=False)
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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

    plan = _plan(tmp_path, job)
    store = RunStore(str(run))
    state, _ = state_from_table(store.read_round_table("states", STATE_SCHEMA, 0), {})
    settings = plan.compress.recovery
    straight = train(
        Recovery(
            str(tiny_llama_dir),
            "float32",
            state,
            [c.name for c in plan.components],
            plan.training,
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


def test_a_base_in_an_object_store_reads_back_bit_identically(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from s3_server import S3Server

    from dtm_ray.engines.checkpoint import BaseWeights
    from dtm_ray.records.store import RunStore

    server = S3Server()
    try:
        store = RunStore(server.uri("based/run"))  # a URI with a query: the endpoint
        tensors = {Q0: torch.randn(8, 4), UP1: torch.zeros(3, 3)}
        save_file(tensors, tmp_path / "local.safetensors")
        store.write_base_file(2, BASE_FILE, str(tmp_path / "local.safetensors"))
        location = store.base_location(2)
        assert location.startswith(f"s3://{server.bucket}/based/run/base/round-002?")
        base = BaseWeights(location)
        assert base.names == {Q0, UP1}
        assert all(torch.equal(base.get(n), t) for n, t in tensors.items())
        base.close()
    finally:
        server.close()
