"""Recovery after a sparsify round (`compress.recovery`), resumable in three steps:

    train on Ray Train (checkpoints under train/, resumed from the latest)
      -> base/round-r/model.safetensors, then base/round-r/base.json (the base's commit)
      -> recovery/round-r: the loss curve and the model before and after against the dense
         model's reference (the recovery's commit)

The recovered state is the new base with no chains: the trained tensors carry the masks (their
zeros are the pruned entries), and the next round prunes on top of them. The engine actors stay
loaded while the Ray Train workers run beside them on their own resources
(`recovery.resources_per_worker`: on a GPU cluster other GPUs, which the autoscaler adds); the
engines then load the new base in bounded batches, as any state change. Restarting a 13B vLLM
engine costs minutes per round, so this is the default whenever the workers fit now
(`recovery.engines: auto`); on a cluster without room (a small CPU box) the engines are released
for the training and restart after it (`release`), and `keep` waits for room (an autoscaler).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from dtm_ray.cluster.recovery import Recovery, fits_beside, train
from dtm_ray.core.metrics import fdt_at
from dtm_ray.core.state import ModelState
from dtm_ray.engines.checkpoint import BASE_FILE, BASE_INDEX
from dtm_ray.job.checks import CheckedJob
from dtm_ray.log import log
from dtm_ray.loop.rounds import JobEngines, reference_of, source_for_actors
from dtm_ray.records.schemas import RECOVERY_SCHEMA
from dtm_ray.records.store import RunStore
from dtm_ray.results.final import perplexity


def recovery_due(checked: CheckedJob, round_: int) -> bool:
    recovery = checked.compress.recovery
    return recovery is not None and (round_ + 1) % recovery.every == 0


def recovered_state(store: RunStore, round_: int) -> ModelState:
    return ModelState({}, store.base_location(round_))


def recover(
    checked: CheckedJob, store: RunStore, engines: JobEngines, round_: int, state: ModelState
) -> ModelState:
    """Recovery after round `round_` of committed state `state` (or its result, read back)."""
    recovered = recovered_state(store, round_)
    if store.read_round_table("recovery", RECOVERY_SCHEMA, round_) is not None:
        return recovered
    pool = engines.pool
    dense = reference_of(store, 0)
    evaluation = checked.job.evaluation
    windows = pool.call(
        "load_prompts", source_for_actors(evaluation.text), evaluation.count, evaluation.tokens, 0
    )
    before = pool.call("score", state, dense)
    before_text = pool.call("text_nll", state, windows)
    start = time.monotonic()
    loss = _base(checked, store, engines, round_, state)
    seconds = time.monotonic() - start
    pool = engines.pool  # started again when the training released it
    after = pool.call("score", recovered, dense)
    after_text = pool.call("text_nll", recovered, windows)
    config = checked.compress.recovery
    row = {
        "round": round_,
        "steps": config.steps,
        "workers": config.workers,
        "tensors": len(checked.components),
        "loss": loss,
        "seconds": seconds,
        "fdt_at_75_before": float(fdt_at(before.fdt, 75)),
        "fdt_mean_before": float(np.mean(before.fdt)),
        "perplexity_before": perplexity(before_text),
        "fdt_at_75_after": float(fdt_at(after.fdt, 75)),
        "fdt_mean_after": float(np.mean(after.fdt)),
        "perplexity_after": perplexity(after_text),
        "fdt_before": [int(v) for v in before.fdt],
        "fdt_after": [int(v) for v in after.fdt],
    }
    store.write_round_table("recovery", round_, pa.Table.from_pylist([row], RECOVERY_SCHEMA))
    log(
        f"round {round_}: recovery {config.steps} steps, loss {loss[0]:.3f} -> {loss[-1]:.3f}; "
        f"FDT@75 vs dense {row['fdt_at_75_before']:g} -> {row['fdt_at_75_after']:g}, "
        f"perplexity {row['perplexity_before']:.3f} -> {row['perplexity_after']:.3f}"
    )
    return recovered


def _base(
    checked: CheckedJob, store: RunStore, engines: JobEngines, round_: int, state: ModelState
) -> list[float]:
    """Train (or resume training) and write base/round-r; its loss curve. A committed base is
    read back, not trained again."""
    index = store.read_json(f"base/round-{round_:03d}/{BASE_INDEX}")
    if index is not None:
        return [float(v) for v in index["loss"]]
    config = checked.compress.recovery
    names = [c.name for c in checked.components]
    _, dtype = engines.pool.call("dtype_of", names[0])
    recovery = Recovery(
        model=checked.model_source,
        dtype=dtype,
        state=state,
        names=names,
        windows=checked.training,
        steps=config.steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        seed=config.seed + round_,
        checkpoint_every=config.checkpoint_every,
        objective=config.objective,
    )
    fs, path = store.train_location()
    keep = config.engines == "keep" or (
        config.engines == "auto" and fits_beside(config.workers, config.resources_per_worker)
    )
    if not keep:
        log(f"round {round_}: releasing the engine actors while training (they restart after)")
        engines.release()  # Ray stays up: the training runs on this same cluster
    log(
        f"round {round_}: recovery training, {config.steps} steps of {config.batch_size} "
        f"sequences on {config.workers} Ray Train workers"
    )
    trained = train(
        recovery, config.workers, config.resources_per_worker, f"round-{round_:03d}", path, fs
    )
    from safetensors.torch import save_file

    handle, local = tempfile.mkstemp(suffix=".safetensors", prefix="dtm-ray-base-")
    os.close(handle)
    try:
        save_file({k: v.contiguous() for k, v in trained.weights.items()}, local)
        store.write_base_file(round_, BASE_FILE, local)
    finally:
        os.unlink(local)
    # Written after the tensors: its presence commits the base.
    store.write_json(
        f"base/round-{round_:03d}/{BASE_INDEX}",
        {"round": round_, "dtype": dtype, "names": sorted(trained.weights), "loss": trained.loss},
    )
    return trained.loss
