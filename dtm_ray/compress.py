"""Simulated compression of one linear weight matrix: pure torch, no engine, no Ray.

`compress(w, spec, stats)` returns a tensor of w's shape and dtype holding the values the
compressed format can represent. Weights are HF-layout [out_features, in_features].
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

_EXPECTED = "magnitude:S, wanda:S, nm:N:M, int8, int8-tensor, int4-gG (e.g. int4-g128), fp8-e4m3"

# Parameters each method takes; every other parameter must stay None so equal specs compare equal.
_PARAMS: dict[str, tuple[str, ...]] = {
    "magnitude": ("sparsity",),
    "wanda": ("sparsity",),
    "nm": ("n", "m"),
    "int8": (),
    "int8-tensor": (),
    "int4": ("group",),
    "fp8-e4m3": (),
}
_PRUNING = frozenset({"magnitude", "wanda", "nm"})
_FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fmt(x: float) -> str:
    short = f"{x:g}"  # "0.5", "1", "0" rather than "1.0"; repr only when %g would lose digits
    return short if float(short) == x else repr(x)


@dataclass(frozen=True)
class Spec:
    method: str
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    group: int | None = None

    def __post_init__(self) -> None:
        if self.method not in _PARAMS:
            raise ValueError(f"unknown compression method {self.method!r}; expected {_EXPECTED}")
        for name in ("sparsity", "n", "m", "group"):
            given = getattr(self, name) is not None
            if given != (name in _PARAMS[self.method]):
                verb = "does not take" if given else "needs"
                raise ValueError(f"compression {self.method!r} {verb} parameter {name!r}")
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", float(self.sparsity))
            if not 0.0 <= self.sparsity <= 1.0:  # also rejects nan
                raise ValueError(f"sparsity {_fmt(self.sparsity)} in '{self}' is outside [0, 1]")
        if self.method == "nm" and not 0 < self.n < self.m:
            raise ValueError(f"'{self}' needs 0 < N < M (N weights kept in every group of M)")
        if self.method == "int4" and self.group < 1:
            raise ValueError(f"group size {self.group} in '{self}' must be a positive integer")

    def __str__(self) -> str:
        if self.sparsity is not None:
            return f"{self.method}:{_fmt(self.sparsity)}"
        if self.method == "nm":
            return f"nm:{self.n}:{self.m}"
        if self.method == "int4":
            return f"int4-g{self.group}"
        return self.method

    @property
    def is_pruning(self) -> bool:
        return self.method in _PRUNING

    @property
    def needs_stats(self) -> bool:
        return self.method == "wanda"


def parse_spec(text: str) -> Spec:
    """Parse a spec string such as 'magnitude:0.5', 'nm:2:4' or 'int4-g128'."""
    t = text.strip().lower()
    head, _, rest = t.partition(":")
    if head in ("magnitude", "wanda") and rest:
        try:
            sparsity = float(rest)
        except ValueError:
            raise ValueError(f"sparsity {rest!r} in {text!r} is not a number") from None
        return Spec(head, sparsity=sparsity)
    if head == "nm":
        parts = rest.split(":")
        if len(parts) != 2 or not all(re.fullmatch(r"-?\d+", p.strip()) for p in parts):
            raise ValueError(f"bad N:M in {text!r}; expected nm:N:M with integers, e.g. nm:2:4")
        return Spec("nm", n=int(parts[0]), m=int(parts[1]))
    if t in ("int8", "int8-tensor", "fp8-e4m3"):
        return Spec(t)
    group = re.fullmatch(r"int4-g(-?\d+)", t)
    if group:
        return Spec("int4", group=int(group[1]))
    raise ValueError(f"unknown compression {text!r}; expected one of {_EXPECTED}")


def _as_spec(spec: Spec | str) -> Spec:
    return spec if isinstance(spec, Spec) else parse_spec(spec)


def check_applicable(spec: Spec | str, shape: tuple[int, int], has_stats: bool = False) -> None:
    """Raise ValueError if `spec` cannot compress a weight of `shape`; no tensor is needed."""
    spec = _as_spec(spec)
    shape = tuple(shape)
    where = f"cannot apply '{spec}' to a weight of shape {shape}"
    if len(shape) != 2:
        raise ValueError(f"{where}: expected a 2-D [out_features, in_features] matrix")
    in_features = shape[1]
    if spec.method == "int4" and in_features % spec.group:
        raise ValueError(
            f"{where}: in_features {in_features} is not divisible by group size {spec.group}"
        )
    if spec.method == "nm" and in_features % spec.m:
        raise ValueError(f"{where}: in_features {in_features} is not divisible by M={spec.m}")
    if spec.needs_stats and not has_stats:
        raise ValueError(f"{where}: needs calibration stats (input_norm) but none were given")


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


def _rtn(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    scale = amax / qmax
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
    scale = x.abs().amax(dim=1, keepdim=True) / _FP8_MAX
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
    spec = _as_spec(spec)
    if not tensor.is_floating_point():
        raise ValueError(f"cannot apply '{spec}' to a tensor of dtype {tensor.dtype}")
    check_applicable(spec, tuple(tensor.shape), has_stats=stats is not None)
    w = tensor.detach()
    return _METHODS[spec.method](w, spec, stats).to(w.dtype)
