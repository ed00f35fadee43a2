"""Simulated compression of one linear weight matrix: pure torch, no engine, no Ray.

`compress(w, spec, stats)` returns a tensor of w's shape and dtype holding the values the
compressed format can represent. Weights are HF-layout [out_features, in_features].
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
# Each quantizer has two halves: `quantize()` gives the stored integers (or fp8 values) and their
# scales, `_dequantized` multiplies them back. The export packs exactly these integers and scales
# into a compressed-tensors checkpoint, whose loaders decode `q.to(scale.dtype) * scale`: the
# product of an 8-bit (or fp8) q and a scale with a bf16/fp16/fp32 mantissa is exact in float32,
# so the served weight is the measured weight bit for bit in every dtype.


@dataclass(frozen=True)
class Quantized:
    """A quantized weight as a serving format stores it. `values` are integers in [qmin, qmax]
    (int specs) or float8_e4m3fn values (fp8), shape [out, in]; `scale` is float32 holding
    values representable in the weight's dtype, shape [out, in / group] for int4, [out, 1] per
    row, [1, 1] for int8-tensor."""

    values: torch.Tensor
    scale: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        groups = self.scale.shape[1]
        q = self.values.float().reshape(self.values.shape[0], groups, -1)
        return (self.scale.unsqueeze(-1) * q).reshape(self.values.shape)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row/group has scale 0; dividing by 1 instead leaves its zeros at 0, not NaN.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _per_unit(amax: torch.Tensor, levels: float, dtype: torch.dtype) -> torch.Tensor:
    """amax / levels as a true division on every device, rounded to a value of the weight's
    dtype. CUDA turns a division by a Python scalar into a multiplication by its reciprocal,
    which rounds differently (on an H100, 102 of 2048 int8 row scales differed from the CPU's);
    dividing by a tensor rounds like the CPU. The rounding to `dtype`: serving stacks keep the
    scale in the model's dtype (vLLM's weight_scale), so a bf16 model must be measured with the
    bf16 scale it will be served with; values above qmax after the rounding are clamped."""
    scale = amax / torch.full_like(amax, levels)
    return scale.to(dtype).float() if dtype != torch.float32 else scale


def _rtn(x: torch.Tensor, amax: torch.Tensor, qmax: int, w: torch.Tensor) -> Quantized:
    """Symmetric round-to-nearest of x [rows, groups, size] with one scale per [rows, groups],
    to integers in [-qmax - 1, qmax] (int4: [-8, 7]) or [-qmax, qmax] (int8: qmax 127)."""
    qmin = -8 if qmax == 7 else -qmax
    scale = _per_unit(amax, qmax, w.dtype)
    q = torch.clamp(torch.round(x / _safe(scale).unsqueeze(-1)), qmin, qmax).to(torch.int8)
    return Quantized(q.reshape(w.shape), scale)


def quantize(tensor: torch.Tensor, spec: Spec | str) -> Quantized:
    """The stored form of `tensor` [out, in] under a quantization spec: integers (fp8 values)
    and scales, from which `compress` makes its values. Scales are representable in the
    tensor's dtype."""
    spec = as_spec(spec)
    if spec.is_pruning or not tensor.is_floating_point():
        raise ValueError(f"cannot quantize a tensor of dtype {tensor.dtype} with '{spec}'")
    check_applicable(spec, tuple(tensor.shape))
    w = tensor.detach()
    x = w.float()
    out = x.shape[0]
    if spec.method == "int8":
        return _rtn(x.unsqueeze(1), x.abs().amax(dim=1, keepdim=True), 127, w)
    if spec.method == "int8-tensor":
        return _rtn(x.reshape(1, 1, -1), x.abs().amax().reshape(1, 1), 127, w)
    if spec.method == "int4":
        grouped = x.reshape(out, -1, spec.group)
        return _rtn(grouped, grouped.abs().amax(dim=-1), 7, w)
    # fp8-e4m3: one scale per row.
    scale = _per_unit(x.abs().amax(dim=1, keepdim=True), _FP8_MAX, w.dtype)
    # The clamp only absorbs float32 rounding above 448, which the fp8 cast would turn into NaN.
    y = torch.clamp(x / _safe(scale), -_FP8_MAX, _FP8_MAX)
    return Quantized(y.to(torch.float8_e4m3fn), scale)


def _quantized(w: torch.Tensor, spec: Spec, stats: Mapping[str, Any] | None) -> torch.Tensor:
    q = quantize(w, spec)
    if spec.method == "int8-tensor":  # one scale for the whole tensor
        return q.scale * q.values.float()
    return q.dequantized()


_METHODS: dict[str, Callable[[torch.Tensor, Spec, Mapping[str, Any] | None], torch.Tensor]] = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "nm": _nm,
    "int8": _quantized,
    "int8-tensor": _quantized,
    "int4": _quantized,
    "fp8-e4m3": _quantized,
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
    return apply_links(original, replay_links(chain))


def replay_links(chain: Chain) -> Chain:
    """The links `replay` applies to the original: `chain` less a leading run of magnitude links
    that its last link stands for (see `_composed_prefix`)."""
    return chain[max(_composed_prefix(chain) - 1, 0) :]


def apply_links(weight: torch.Tensor, links: Chain) -> torch.Tensor:
    """`links` applied in order to `weight` (the weight an earlier part of the chain made): how a
    state change reaches a longer chain from the weight an engine already holds."""
    for link in links:
        weight = compress(weight, link.spec, link.stats)
    return weight
