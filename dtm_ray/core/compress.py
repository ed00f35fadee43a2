"""Simulated compression of one linear weight matrix: pure torch, no engine, no Ray.

`compress(w, spec, stats)` returns a tensor of w's shape and dtype holding the values the
compressed format can represent. Weights are HF-layout [out_features, in_features].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from dtm_ray.core.specs import Spec, as_spec, check_applicable
from dtm_ray.core.state import Chain

_FP8_MAX = 448.0  # largest finite float8_e4m3fn

# --- pruning: kept values come straight from the input (masked_fill), so they stay bit-identical.


def _magnitude(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    k = round(spec.sparsity * w.numel())
    if k == 0:
        return w.clone()
    # The k smallest |w| in (|w|, flat index) order, as a stable sort would give them: equal
    # |w| are pruned in flat-index order, so every engine gets the same mask; existing zeros
    # come first, so pruning composes across sparsity levels. A selection instead of a sort:
    # everything below the k-th value, then the first of the ties at it.
    magnitude = w.abs().flatten()
    threshold = magnitude.kthvalue(k).values
    pruned = magnitude < threshold
    ties = torch.nonzero(magnitude == threshold).flatten()
    pruned[ties[: k - int(pruned.sum())]] = True
    return w.masked_fill(pruned.view(w.shape), 0)


def _input_norm(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    norm = None if stats is None else stats.get("input_norm")
    if norm is None:
        raise ValueError(f"'{spec}' needs stats['input_norm'] of shape [{w.shape[1]}]")
    norm = torch.as_tensor(norm)
    if tuple(norm.shape) != (w.shape[1],):
        raise ValueError(
            f"'{spec}': stats['input_norm'] has shape {tuple(norm.shape)}, "
            f"expected ({w.shape[1]},) for a weight of shape {tuple(w.shape)}"
        )
    return norm.to(device=w.device, dtype=torch.float32)


def _wanda(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    score = w.abs().float() * _input_norm(w, spec, stats)
    k = round(spec.sparsity * w.shape[1])
    idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
    pruned = torch.zeros(w.shape, dtype=torch.bool, device=w.device).scatter_(1, idx, True)
    return w.masked_fill(pruned, 0)


def _nm(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    groups = w.abs().reshape(w.shape[0], -1, spec.m)
    idx = torch.sort(groups, dim=-1, stable=True).indices[..., : spec.m - spec.n]
    pruned = torch.zeros(groups.shape, dtype=torch.bool, device=w.device).scatter_(-1, idx, True)
    return w.masked_fill(pruned.view(w.shape), 0)


# --- quantization: float32 arithmetic from the input, cast back to the input dtype by compress().


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row/group has scale 0; dividing by 1 instead leaves its zeros at 0, not NaN.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _per_unit(amax: torch.Tensor, levels: float) -> torch.Tensor:
    """amax / levels as a true division on every device. CUDA turns a division by a Python
    scalar into a multiplication by its reciprocal, which rounds differently (on an H100, 102 of
    2048 int8 row scales differed from the CPU's); dividing by a tensor rounds like the CPU."""
    return amax / torch.full_like(amax, levels)


def _rtn(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    scale = _per_unit(amax, qmax)
    return scale * torch.clamp(torch.round(x / _safe(scale)), qmin, qmax)


def _int8(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    x = w.float()
    return _rtn(x, x.abs().amax(dim=1, keepdim=True), -127, 127)


def _int8_tensor(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    x = w.float()
    return _rtn(x, x.abs().amax(), -127, 127)


def _int4(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    x = w.float().reshape(w.shape[0], -1, spec.group)
    return _rtn(x, x.abs().amax(dim=-1, keepdim=True), -8, 7).reshape(w.shape)


def _fp8(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    x = w.float()
    scale = _per_unit(x.abs().amax(dim=1, keepdim=True), _FP8_MAX)
    # The clamp only absorbs float32 rounding above 448, which the fp8 cast would turn into NaN.
    y = torch.clamp(x / _safe(scale), -_FP8_MAX, _FP8_MAX)
    return scale * y.to(torch.float8_e4m3fn).float()


_METHODS: dict[str, Callable[[torch.Tensor, Spec, Mapping[str, Any] | None], torch.Tensor]] = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "nm": _nm,
    "int8": _int8,
    "int8-tensor": _int8_tensor,
    "int4": _int4,
    "fp8-e4m3": _fp8,
}


def compress(
    tensor: torch.Tensor, spec: Spec | str, stats: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """Return the simulated-compressed copy of `tensor` (same shape and dtype, input untouched)."""
    spec = as_spec(spec)
    if not tensor.is_floating_point():
        raise ValueError(f"cannot apply '{spec}' to a tensor of dtype {tensor.dtype}")
    check_applicable(spec, tuple(tensor.shape), has_stats=stats is not None)
    w = tensor.detach()
    return _METHODS[spec.method](w, spec, stats).to(w.dtype)


def _composed_prefix(chain: Chain) -> int:
    """How many leading links of `chain` the last of them stands for alone: magnitude pruning at
    a sparsity at least the previous link's prunes the zeros it finds first (they are the
    smallest magnitudes) and then what a single pass at that sparsity prunes, so a run of
    magnitude links with non-decreasing sparsity equals its last link applied to the original."""
    count = 0
    for link in chain:
        spec = as_spec(link.spec)
        if spec.method != "magnitude":
            break
        if count and spec.sparsity < as_spec(chain[count - 1].spec).sparsity:
            break
        count += 1
    return count


def replay(original: torch.Tensor, chain: Chain) -> torch.Tensor:
    """The weight a chain makes of a component's original: each link applied in order, with the
    calibration statistics it recorded. The one replay of a chain: engines, the state cache and
    the export all call it, so what is exported is exactly what was measured.

    A leading run of magnitude links is replayed as its last link alone (bit-identical, see
    `_composed_prefix`), so a magnitude chain costs one pass however many rounds made it."""
    skip = max(_composed_prefix(chain) - 1, 0)
    weight = original
    for link in chain[skip:]:
        weight = compress(weight, link.spec, link.stats)
    return weight


def apply_links(weight: torch.Tensor, links: Chain) -> torch.Tensor:
    """`links` applied in order to `weight` (the weight an earlier part of the chain made): how a
    state change reaches a longer chain from the weight an engine already holds."""
    for link in links:
        weight = compress(weight, link.spec, link.stats)
    return weight
