"""The export's compressed-tensors checkpoint: quantized components stored packed, so serving
stacks load them with the memory saved, decoding to exactly the weights the run measured.

- int4-gG, int8 and int8-tensor: `pack-quantized` (`<module>.weight_packed` int32 holding the
  integers offset by 2^(bits-1), `weight_scale` [out, in/G] or [out, 1], `weight_shape`),
  symmetric, strategy `group` or `channel`; int8-tensor writes its one scale once per row, since
  vLLM has no per-tensor weight-only path (the weights are identical).
- fp8-e4m3: `float-quantized` (`weight` in float8_e4m3fn, `weight_scale` [out, 1]).
- `config.json` gains `quantization_config`: one config group per level with the exact module
  names as targets, and `ignore` naming every linear layer that stays dense (lm_head, pruned and
  untouched components): vLLM refuses a linear layer that no group and no ignore entry names.

Every other floating tensor is saved in the run's engine dtype when that is narrower than the
checkpoint's (a bfloat16 run of a float32 checkpoint): the run measured those values, and the
served model is then the measured one at the memory it was measured in; `config.json`'s dtype
says so, which is also the dtype vLLM's CPU build needs for its int4 kernel.

The integers and scales are dtm_ray's own (`core.compress.quantize` on the weight the chain's
earlier links left), never re-quantized through compressed-tensors, whose rounding differs
(absmax/7.5 and [-8, 7] for int4, absmax/127.5 for int8). Loaders decode `q.to(scale.dtype) *
scale`; scales are written in the run's engine dtype and are representable in it, so the
decoded weight equals the replayed one bit for bit. Pruned weights stay dense with their zeros:
compressed-tensors removed its sparse formats in 0.15.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dtm_ray.core.components import Component
from dtm_ray.core.specs import parse_spec
from dtm_ray.core.state import ModelState
from dtm_ray.results.model_files import INDEX, is_plain_file, shards, write_file

# compressed-tensors' weight arguments and on-disk format of each quantization method.
_SCHEMES: dict[str, tuple[dict[str, Any], str]] = {
    "int4": ({"num_bits": 4, "type": "int", "strategy": "group"}, "pack-quantized"),
    "int8": ({"num_bits": 8, "type": "int", "strategy": "channel"}, "pack-quantized"),
    "int8-tensor": ({"num_bits": 8, "type": "int", "strategy": "channel"}, "pack-quantized"),
    "fp8-e4m3": ({"num_bits": 8, "type": "float", "strategy": "channel"}, "float-quantized"),
}


def stored_level(specs: Sequence[str]) -> str | None:
    """The level a chain is stored at in the compressed checkpoint: its last link when that is a
    quantization, else None (dense: pruning, or nothing)."""
    if specs and not parse_spec(specs[-1]).is_pruning:
        return specs[-1]
    return None


def write_compressed(
    model_dir: Path,
    out: Path,
    state: ModelState,
    engine_dtype: str,
    linears: Sequence[Component],
    shard_done: Callable[[Path], None] | None = None,
    device: torch.device | None = None,
    where: str = "",
) -> dict[str, str | None]:
    """Write the compressed checkpoint of `state` into the existing folder `out`. `linears` are
    the model's linear components (selected or not); `shard_done` gets each shard once written;
    chains replay on `device` (default cpu; the same bits on every device); `where` is the
    export's target, named when a write fails (a StorageError). Memory as the dense
    checkpoint's (`export_dense`): one shard's saved tensors plus one weight's working copies.
    Returns component -> stored level (None: dense) for every component of `state`."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dtm_ray.core.compress import quantize
    from dtm_ray.engines.base import torch_dtype
    from dtm_ray.results.export_dense import replay_on

    device = device or torch.device("cpu")
    where = where or str(out)
    dtype = torch_dtype(engine_dtype)
    levels = {name: stored_level(state.specs(name)) for name in state.components()}
    narrowed = False
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards(model_dir):
        path = model_dir / shard
        tensors: dict[str, torch.Tensor] = {}  # the shard as saved, filled one by one
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            for name in handle.keys():  # one tensor read at a time
                original = handle.get_tensor(name)
                level = levels.get(name)
                if level is None:  # dense: the replayed chain (if any) in the narrower dtype
                    weight = original
                    if original.is_floating_point() and original.itemsize > dtype.itemsize:
                        weight, narrowed = original.to(dtype), True
                    if name in levels:
                        chain = state.chain(name)
                        weight = replay_on(original, chain, dtype, device, weight.dtype).cpu()
                    tensors[name] = weight.contiguous()
                    continue
                # The chain's earlier links, then the stored form of its last (quantizing) one.
                earlier = replay_on(original, state.chain(name)[:-1], dtype, device, dtype)
                del original
                q = quantize(earlier, level)
                del earlier
                module = name.removesuffix(".weight")
                scale = q.scale.expand(q.values.shape[0], -1).to(dtype).contiguous()
                tensors[f"{module}.weight_scale"] = scale.cpu()
                values = q.values.cpu()
                del q
                spec = parse_spec(level)
                if spec.method == "fp8-e4m3":
                    tensors[f"{module}.weight"] = values.contiguous()
                else:
                    bits = _SCHEMES[spec.method][0]["num_bits"]
                    tensors[f"{module}.weight_packed"] = pack_to_int32(values, bits).contiguous()
                    tensors[f"{module}.weight_shape"] = torch.tensor(values.shape)
        write_file(where, shard, partial(save_file, tensors, out / shard, metadata=metadata))
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # one shard in memory at a time
        if shard_done is not None:
            shard_done(out / shard)
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        index["weight_map"] = dict(sorted(weight_map.items()))
        text = json.dumps(index, indent=2) + "\n"
        write_file(where, INDEX, lambda: (out / INDEX).write_text(text))
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config(levels, linears)
    if narrowed:
        for key in ("dtype", "torch_dtype"):  # transformers 5 writes `dtype`, 4.x `torch_dtype`
            if key in config:
                config[key] = engine_dtype
    text = json.dumps(config, indent=2) + "\n"
    write_file(where, "config.json", lambda: (out / "config.json").write_text(text))
    for item in sorted(model_dir.iterdir()):
        if item.name not in ("config.json", INDEX) and is_plain_file(item):
            write_file(where, item.name, lambda i=item: shutil.copy2(i, out / i.name))
    return levels


def quantization_config(
    levels: Mapping[str, str | None], linears: Sequence[Component]
) -> dict[str, Any]:
    """`quantization_config` for config.json, built with compressed-tensors' own classes: one
    config group per level (exact module names, in model order), everything else ignored."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    targets: dict[str, list[str]] = {}
    for component in linears:
        level = levels.get(component.name)
        if level is not None:
            targets.setdefault(level, []).append(component.name.removesuffix(".weight"))
    ignore = ["lm_head"] + [
        c.name.removesuffix(".weight") for c in linears if levels.get(c.name) is None
    ]
    groups = {}
    formats = set()
    for i, (level, modules) in enumerate(targets.items()):
        spec = parse_spec(level)
        args, fmt = _SCHEMES[spec.method]
        weights = QuantizationArgs(**args, symmetric=True, dynamic=False, group_size=spec.group)
        groups[f"group_{i}"] = QuantizationScheme(targets=modules, weights=weights, format=fmt)
        formats.add(fmt)
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=ignore,
    )
    return config.to_dict()
