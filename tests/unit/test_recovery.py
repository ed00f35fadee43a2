"""Recovery training and the quality floor: the pure parts (masks, batches), the engine session on
a base, the config checks, and end-to-end runs of the tiny Llama on Ray Train (2 CPU workers),
checked against an independent rebuild of the final weights with plain torch + transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from support.jobs import checked_job, recovery_job

from dtm_ray.core.compress import compress
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
        checked_job(tmp_path, recovery_job(tiny_llama_dir, tmp_path / "run", **change))
    assert "\n" not in str(err.value)


def test_recovery_on_a_quantize_run_and_a_floor_above_new_tokens_fail(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    job = recovery_job(tiny_llama_dir, tmp_path / "run")
    job["compress"] = {"method": "quantize", "levels": ["int8"], "min_fdt": 4, "recovery": {}}
    with pytest.raises(ConfigError, match="does not apply to method 'quantize'"):
        checked_job(tmp_path, job)
    job = recovery_job(tiny_llama_dir, tmp_path / "run")
    job["compress"]["min_fdt"] = 17
    with pytest.raises(ConfigError, match="min_fdt 17 exceeds new_tokens 16"):
        checked_job(tmp_path, job)


def test_training_text_holding_the_scored_prompts_or_the_evaluation_text_fails(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from pydoc_data.topics import topics

    copy = tmp_path / "copy.jsonl"
    copy.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    job = recovery_job(tiny_llama_dir, tmp_path / "run", text=str(copy))
    with pytest.raises(ConfigError, match="shares 8 consecutive tokens with the scored prompts"):
        checked_job(tmp_path, job)
    job["prompts"]["source"] = "self"  # no prompts to compare: the evaluation text is found
    with pytest.raises(ConfigError, match="shares 32 consecutive tokens with the evaluation"):
        checked_job(tmp_path, job)
    # The prompts' own source is fine: the windows overlapping them are left out.
    checked = checked_job(tmp_path, recovery_job(tiny_llama_dir, tmp_path / "run"))
    from dtm_ray.engines.prompts import overlapping

    assert not overlapping(checked.training, checked.prefixes, 8).any()
    assert checked.training.shape[1] == 32


# --- end to end on Ray Train ---------------------------------------------------------------------
