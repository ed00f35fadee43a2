"""Recovery training on Ray Train: the pruned model's selected weights fine-tuned with their zeros
kept, on `TorchTrainer` workers beside the engine actors (which stay loaded).

Each worker loads the model, brings the selected weights to the state's values (the base's
tensors, chains replayed: the same functions the engines use), freezes everything else and runs
AdamW on causal-LM loss over the job's training sequences, re-applying each weight's mask after
every step. On CPU the workers talk over gloo and wrap the model in DDP; on GPUs over NCCL, each
decoder layer sharded with FSDP2 (`fully_shard`), so a 13B model trains on several GPUs.

Checkpoints go to the run directory (`RunConfig(storage_path=..., storage_filesystem=...)`, local
or an object store); Ray Train resumes a run of the same name from its latest checkpoint, so a
driver killed during training continues from there. Every step's batch is a pure function of the
step number (`dtm_ray.core.recovery.step_rows`) and the seeds are fixed: with one worker on CPU a
resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dtm_ray.core.state import ModelState
from dtm_ray.engines.sources import ModelSource

WEIGHTS_FILE = "weights.safetensors"  # the trained tensors, in the engines' dtype
PROGRESS_FILE = "progress.json"  # steps done and the loss of each


@dataclass
class Recovery:
    """What one recovery trains: the model, the state it starts from, the weights it may
    change, its sequences and its settings."""

    model: ModelSource  # materialised once per node, as the engine actors do
    dtype: str  # the engines' dtype; training runs in float32 and hands back this dtype
    state: ModelState
    names: list[str]  # the weights to train (the selected components)
    windows: np.ndarray  # int64 [W, T] training sequences
    steps: int
    learning_rate: float
    weight_decay: float
    batch_size: int
    seed: int
    checkpoint_every: int
    # lm: causal-LM loss on the text (the paper's continued training); distill: KL to the dense
    # model's next-token distribution on the same text (the dense model runs beside, frozen).
    objective: str = "lm"


@dataclass
class Trained:
    weights: dict[str, Any]  # name -> trained tensor (torch, engines' dtype)
    loss: list[float]  # mean loss per step


def train(
    recovery: Recovery,
    workers: int,
    resources: Mapping[str, float],
    name: str,
    storage_path: str,
    storage_filesystem: Any = None,
) -> Trained:
    """Run (or resume) the training `name` under `storage_path`; the trained weights and the
    loss curve. Uses the Ray cluster this process is connected to."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from safetensors.torch import load_file

    gpus = float(resources.get("GPU", 0)) > 0
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"recovery": recovery, "threads": _threads(resources)},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus, resources_per_worker=dict(resources)
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # The latest checkpoint is what a resume needs; one more covers a torn upload.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"recovery training {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        progress = json.loads(Path(folder, PROGRESS_FILE).read_text())
        weights = load_file(os.path.join(folder, WEIGHTS_FILE))
    if progress["step"] != recovery.steps:
        raise RuntimeError(f"recovery training {name} stopped at step {progress['step']}")
    dtype = _torch_dtype(recovery.dtype)
    return Trained({k: v.to(dtype) for k, v in weights.items()}, progress["loss"])


def fits_beside(workers: int, resources: Mapping[str, float]) -> bool:
    """Whether the cluster has room for the training workers now, beside what runs."""
    import ray

    free = ray.available_resources()
    return all(free.get(k, 0.0) >= v * workers for k, v in resources.items() if v > 0)


def _threads(resources: Mapping[str, float]) -> int | None:
    if resources.get("GPU", 0) > 0:
        return None
    return max(1, int(resources.get("CPU", 1)))


def _torch_dtype(name: str) -> Any:
    from dtm_ray.engines.base import torch_dtype

    return torch_dtype(name)


# --- on each worker ------------------------------------------------------------------------------
def start_weights(model: Any, recovery: Recovery) -> dict[str, Any]:
    """The selected weights as `recovery.state` has them, computed as the engines compute them:
    the base's tensor (else the loaded original) in the engines' dtype, the chain replayed."""
    from dtm_ray.core.compress import replay
    from dtm_ray.engines.checkpoint import BaseWeights

    dtype = _torch_dtype(recovery.dtype)
    params = dict(model.named_parameters())
    base = BaseWeights(recovery.state.base) if recovery.state.base else None
    try:
        weights = {}
        for name in recovery.names:
            weight = params[name].detach().to("cpu", dtype, copy=True)
            if base is not None and name in base:
                weight = base.get(name).to(dtype)
            weights[name] = replay(weight, recovery.state.chain(name))
        return weights
    finally:
        if base is not None:
            base.close()


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dtm_ray.core.recovery import (
        distill_loss,
        masks_of,
        reapply_masks,
        step_rows,
        worker_rows,
    )
    from dtm_ray.engines.sources import node_folder

    recovery: Recovery = config["recovery"]
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(recovery.seed)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else (torch.device("cpu"))
    )

    folder = node_folder(recovery.model)  # this node's copy, fetched once per node
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.config.use_cache = False
    teacher = None
    if recovery.objective == "distill":  # the dense model, as the checkpoint has it
        teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        teacher.requires_grad_(False)
        teacher.to(device).eval()
    trainable = set(recovery.names)
    checkpoint = ray.train.get_checkpoint()
    step, losses = 0, []
    with torch.no_grad():
        start = start_weights(model, recovery)
        masks = masks_of(start)  # the state's zeros: they stay zero
        if checkpoint is not None:  # resume: the weights as the last checkpoint has them
            with checkpoint.as_directory() as folder:
                start = load_file(os.path.join(folder, WEIGHTS_FILE))
                progress = json.loads(Path(folder, PROGRESS_FILE).read_text())
            step, losses = progress["step"], progress["loss"]
        params = dict(model.named_parameters())
        for name, param in params.items():
            param.requires_grad_(name in trainable)
            if name in trainable:
                param.copy_(start[name].to(torch.float32))
    model.to(device).train()
    if torch.cuda.is_available() and world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one FSDP2 unit per decoder layer
            fully_shard(layer)
        fully_shard(model)
        net = model
    else:
        net = ray.train.torch.prepare_model(model, move_to_device=False)
    named = [(n, p) for n, p in model.named_parameters() if n in trainable]
    masks = {name: _placed(masks[name], param) for name, param in named}
    optimizer = torch.optim.AdamW(
        [p for _, p in named], lr=recovery.learning_rate, weight_decay=recovery.weight_decay
    )
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            optimizer.load_state_dict(
                torch.load(os.path.join(folder, f"optimizer-{rank}.pt"), weights_only=False)
            )
            torch.set_rng_state(torch.load(os.path.join(folder, f"rng-{rank}.pt")))

    windows = torch.as_tensor(np.array(recovery.windows), dtype=torch.long)
    while step < recovery.steps:
        rows = step_rows(step, recovery.batch_size, len(windows), recovery.seed)
        ids = windows[worker_rows(rows, rank, world)].to(device)
        optimizer.zero_grad(set_to_none=True)
        if teacher is None:
            loss = net(input_ids=ids, labels=ids).loss
        else:
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits
            loss = distill_loss(net(input_ids=ids, use_cache=False).logits, target)
        loss.backward()
        optimizer.step()
        reapply_masks(named, masks)
        step += 1
        mean = loss.detach().float()
        if world > 1:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        save = step % recovery.checkpoint_every == 0 or step == recovery.steps
        _report(step, losses, named, optimizer, rank, save)


def _placed(mask: Any, param: Any) -> Any:
    """A full mask as the parameter holds its values: on its device, and for an FSDP2 shard (a
    DTensor) the rows this rank holds."""
    mask = mask.to(param.device)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask, param.device_mesh, param.placements).to_local()
    return mask


def _full(param: Any) -> Any:
    """The whole tensor of a parameter (an FSDP2 shard is gathered: every rank must call it)."""
    full = getattr(param, "full_tensor", None)
    return (full() if full is not None else param).detach()


def _report(
    step: int, losses: list[float], named: list, optimizer: Any, rank: int, save: bool
) -> None:
    """Report the step's loss; with `save`, a checkpoint: rank 0 writes the trained weights
    and the progress, every rank its optimizer state and random state."""
    import ray.train
    import torch
    from safetensors.torch import save_file

    metrics = {"step": step, "loss": losses[-1]}
    if not save:
        ray.train.report(metrics)
        return
    weights = {name: _full(param).cpu().contiguous() for name, param in named}
    with tempfile.TemporaryDirectory() as folder:
        torch.save(optimizer.state_dict(), os.path.join(folder, f"optimizer-{rank}.pt"))
        torch.save(torch.get_rng_state(), os.path.join(folder, f"rng-{rank}.pt"))
        if rank == 0:
            save_file(weights, os.path.join(folder, WEIGHTS_FILE))
            with open(os.path.join(folder, PROGRESS_FILE), "w") as out:
                json.dump({"step": step, "loss": losses}, out)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
