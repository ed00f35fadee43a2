"""Compression specs as strings and values: parsing, validation against a weight's shape, and
what a chain of specs leaves a weight as (its precision). No torch: the job layer validates specs
with this module before any engine or tensor library loads; the math is in `compress.py`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

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


def as_spec(spec: Spec | str) -> Spec:
    return spec if isinstance(spec, Spec) else parse_spec(spec)


def check_applicable(spec: Spec | str, shape: tuple[int, int], has_stats: bool = False) -> None:
    """Raise ValueError if `spec` cannot compress a weight of `shape`; no tensor is needed."""
    spec = as_spec(spec)
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


def precision_of(chain: Sequence[str], dtype_name: str) -> str:
    """The precision a chain leaves a weight in: its last quantization spec (pruning keeps the
    dtype), else the weights' own dtype name."""
    quantized = [spec for spec in chain if not parse_spec(spec).is_pruning]
    return quantized[-1] if quantized else dtype_name


FP16_SCALE_BITS = 16  # one fp16 scale per int4 group


def spec_bits(spec: str) -> float:
    """Storage bits per weight of a quantization spec (scales of int8 / fp8 rows ignored)."""
    text = spec.strip().lower()
    if text in ("int8", "int8-tensor", "fp8-e4m3"):
        return 8.0
    group = re.fullmatch(r"int4-g(\d+)", text)
    if group and int(group[1]) >= 1:
        return 4.0 + FP16_SCALE_BITS / int(group[1])
    raise ValueError(
        f"unknown quantization spec {spec!r}: expected int8, int8-tensor, int4-gG or fp8-e4m3"
    )
