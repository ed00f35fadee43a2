"""What serving engines require of a quantized checkpoint, as pure functions of component names,
shapes and precision levels: vLLM's fused layers and the kernels' shape and dtype limits. Used by
the quantize search (fused groups), by `plan` and by the export's notes. No torch.

Facts (read from vLLM 0.32 and compressed-tensors 0.17):
- vLLM fuses q/k/v of a layer into one `qkv_proj` and gate/up into `gate_up_proj`; every shard of
  a fused layer must have the same scheme (or all be dense), else loading raises "different
  quantization schemes for the shards".
- vLLM on GPU runs weight-only int4/int8 through Marlin: group size 32, 64 or 128 (or one scale
  per row), in_features divisible by 128, out_features by 64; other shapes need a fallback kernel.
- vLLM's CPU build has a weight-only kernel for 4-bit integers only (W4A16), in bf16 or fp16; none
  for int8 or fp8 weight-only, none in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dtm_ray.core.components import Component, kind_of
from dtm_ray.core.specs import parse_spec

# kind -> the fused vLLM layer it is a shard of; o and down are not fused.
FUSED_KINDS = {
    "q": "qkv_proj",
    "k": "qkv_proj",
    "v": "qkv_proj",
    "gate": "gate_up_proj",
    "up": "gate_up_proj",
}
MARLIN_GROUPS = (32, 64, 128)
MARLIN_IN_MULTIPLE = 128
MARLIN_OUT_MULTIPLE = 64
VLLM_CPU_DTYPES = ("bfloat16", "float16")


def fused_name(component: Component) -> str:
    """The name of the group `component` moves in when the search is fused: the vLLM layer it is
    a shard of (`model.layers.3.self_attn.qkv_proj`), or its own weight name when unfused."""
    return _fused_name(component.name, component.kind)


def _fused_name(name: str, kind: str) -> str:
    fused = FUSED_KINDS.get(kind)
    if fused is None:
        return name
    module = name.removesuffix(".weight").rpartition(".")[0]
    return f"{module}.{fused}"


def fused_group_of(names: Sequence[str]) -> str | None:
    """The fused group that `names` are exactly the members of (q/k/v of one layer, or its
    gate/up), read from the Llama weight names every supported architecture uses; else None."""
    if len(names) < 2:
        return None
    kinds = [kind_of(n) for n in names]
    groups = {_fused_name(n, k) for n, k in zip(names, kinds, strict=True)}
    if len(groups) != 1 or set(kinds) - set(FUSED_KINDS):
        return None
    group = groups.pop()
    wanted = [k for k, g in FUSED_KINDS.items() if g == group.rpartition(".")[2]]
    return group if sorted(kinds) == sorted(wanted) else None


def fused_groups(components: Sequence[Component]) -> dict[str, list[Component]]:
    """group name -> its components, in the order of `components` (first member's position)."""
    groups: dict[str, list[Component]] = {}
    for component in components:
        groups.setdefault(fused_name(component), []).append(component)
    return groups


def marlin_problem(shape: tuple[int, int], level: str) -> str | None:
    """Why vLLM's GPU Marlin kernel cannot run a weight of `shape` at `level`, or None."""
    spec = parse_spec(level)
    if spec.method == "fp8-e4m3":
        return None  # fp8 has its own kernels
    out_features, in_features = shape
    problems = []
    if spec.method == "int4" and spec.group not in MARLIN_GROUPS:
        problems.append(f"group {spec.group} not in {'/'.join(map(str, MARLIN_GROUPS))}")
    if in_features % MARLIN_IN_MULTIPLE:
        problems.append(f"in_features {in_features} % {MARLIN_IN_MULTIPLE} != 0")
    if out_features % MARLIN_OUT_MULTIPLE:
        problems.append(f"out_features {out_features} % {MARLIN_OUT_MULTIPLE} != 0")
    return ", ".join(problems) or None


def serving_notes(
    components: Sequence[Component], levels: Mapping[str, str | None], dtype: str
) -> dict[str, list[str]]:
    """One-line notes per engine on why it cannot load (or cannot use its fast kernel for) a
    checkpoint holding `levels` (component name -> quantization level, None for dense) in
    `dtype`. An empty list: nothing known against it."""
    notes: dict[str, list[str]] = {"vllm": [], "vllm_gpu_marlin": [], "vllm_cpu": []}
    for group, members in fused_groups(components).items():
        schemes = {levels.get(c.name) for c in members}
        if len(members) > 1 and len(schemes) > 1:
            parts = ", ".join(f"{c.kind} {levels.get(c.name) or 'dense'}" for c in members)
            notes["vllm"].append(f"{group}: fused shards differ ({parts}); vLLM cannot load it")
    by_problem: dict[str, list[str]] = {}
    for c in components:
        level = levels.get(c.name)
        problem = None if level is None else marlin_problem(c.shape, level)
        if problem:
            by_problem.setdefault(f"{level} {problem}", []).append(c.name)
    for problem, names in by_problem.items():
        notes["vllm_gpu_marlin"].append(f"no Marlin kernel ({problem}): {_names(names)}")
    used = sorted({level for level in levels.values() if level is not None})
    no_cpu = [level for level in used if parse_spec(level).method != "int4"]
    if no_cpu:
        notes["vllm_cpu"].append(
            f"no CPU kernel for {', '.join(no_cpu)} weight-only (the CPU build runs int4 only)"
        )
    if used and dtype not in VLLM_CPU_DTYPES:
        notes["vllm_cpu"].append(f"the CPU build runs quantized weights in bf16/fp16, not {dtype}")
    return notes


def _names(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
