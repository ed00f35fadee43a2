"""Recovery training's pure parts: which sequences a step trains on, and the masks that keep a
pruned weight's zeros zero. No Ray; the training loop that uses them is `dtm_ray.cluster.recovery`.

Masking only the gradients is not enough: AdamW's weight decay and its moment estimates move a
zero weight off zero even with a zero gradient. So the mask is multiplied back into the weight
after every optimizer step (`reapply_masks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch


def step_rows(step: int, batch_size: int, count: int, seed: int) -> np.ndarray:
    """The `batch_size` training sequences (indices into `count`) of optimizer step `step`: the
    sequences in a seeded random order per epoch, the next `batch_size` of them per step. A pure
    function of the step, so a resumed run trains on exactly the sequences an uninterrupted one
    would."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // count
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng([seed, int(epoch)]).permutation(count)
        chosen = epochs == epoch
        rows[chosen] = order[positions[chosen] % count]
    return rows


def worker_rows(rows: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s share of a step's rows (the batch splits evenly; checked in the config)."""
    share = len(rows) // world
    return rows[rank * share : (rank + 1) * share]


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(teacher || student) over [B, T, V] logits: the loss that pulls the
    pruned model back towards the dense model's next-token distribution (what FDT measures
    against), instead of towards the training text."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    per_token = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="none")
    return per_token.sum(dim=-1).mean()


def _local(weight: torch.Tensor) -> torch.Tensor:
    """The entries this process holds: an FSDP2 parameter (a DTensor) holds its shard."""
    to_local = getattr(weight, "to_local", None)
    return to_local() if to_local is not None else weight


def masks_of(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per weight, True where it is nonzero: the entries training may change (of a sharded
    weight, this process's shard)."""
    return {name: _local(weight.detach()) != 0 for name, weight in weights.items()}


@torch.no_grad()
def reapply_masks(
    params: Iterable[tuple[str, torch.Tensor]], masks: Mapping[str, torch.Tensor]
) -> None:
    """Zero every pruned entry again (in place): call after each optimizer step."""
    for name, param in params:
        mask = masks.get(name)
        if mask is not None:
            local = _local(param)
            local.mul_(mask.to(local.dtype))
