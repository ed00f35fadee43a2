"""A GPTQ-format checkpoint for `dtm-ray compare`, written with plain torch: the integers and
scales of a compressed-tensors `pack-quantized` int4 checkpoint (symmetric, one scale per group;
what `dtm-ray export` writes to `export/compressed`) repacked in AutoGPTQ's layout, so the GPTQ
checkpoint holds the very same weights:

- `<module>.qweight` int32 [in / 8, out]: eight 4-bit values (q + 8) per int32 along the input
  dimension, value i at bits 4i;
- `<module>.scales` [in / group, out] float16 (the scales are exact in float16: checked);
- `<module>.qzeros` int32 [in / group, out / 8]: the symmetric zero point 8, stored as 7 (the
  GPTQ v1 convention of zeros minus one), eight per int32 along the output dimension;
- `config.json` `quantization_config`: `{quant_method: gptq, bits: 4, group_size, desc_act:
  false, sym: true}`.

No GPTQ checkpoint can be downloaded here (no model hub); this one lets a compare exercise vLLM's
GPTQ loader and kernels (on CPU: its 4-bit path) against the dense export of the same weights:

    python bench/compare_gptq.py runs/q/export/compressed runs/q-gptq
    dtm-ray compare runs/q/export runs/q-gptq --engine vllm --dtype bfloat16

Needs torch and safetensors only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def unpack_rows(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """compressed-tensors' int32 [out, in / 8] (value i at bits 4i, offset by 8) -> the
    unsigned values q + 8, int32 [out, in]."""
    parts = [(packed >> (4 * i)) & 0xF for i in range(8)]
    return torch.stack(parts, dim=-1).reshape(packed.shape[0], -1)[:, :columns]


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Unsigned 4-bit values (int32) packed eight per int32 along `dim`, value i at bits 4i."""
    moved = values.movedim(dim, 0)
    groups = moved.reshape(moved.shape[0] // 8, 8, *moved.shape[1:])
    out = torch.zeros(groups.shape[0], *groups.shape[2:], dtype=torch.int64)
    for i in range(8):
        out |= groups[:, i].to(torch.int64) << (4 * i)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # as two's complement
    return out.movedim(0, dim).contiguous()


def repack(source: Path, out: Path) -> None:
    config = json.loads((source / "config.json").read_text())
    quantization = config.pop("quantization_config")
    groups = set()
    for group in quantization["config_groups"].values():
        weights = group["weights"]
        if (weights["type"], weights["num_bits"], weights["symmetric"]) != ("int", 4, True):
            raise SystemExit(f"only symmetric int4 groups repack as GPTQ, got {weights}")
        groups.add(weights["group_size"])
    if len(groups) != 1:
        raise SystemExit(f"GPTQ takes one group size, the checkpoint has {sorted(groups)}")
    (group_size,) = groups
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(path))
    result = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_shape")):
            continue
        if not name.endswith(".weight_packed"):
            result[name] = tensor
            continue
        module = name.removesuffix(".weight_packed")
        out_features, in_features = tensors[f"{module}.weight_shape"].tolist()
        scale = tensors[f"{module}.weight_scale"]  # [out, in / group]
        values = unpack_rows(tensor, in_features)  # q + 8, [out, in]
        half = scale.to(torch.float16)
        if not torch.equal(half.to(scale.dtype), scale):
            raise SystemExit(f"{module}: its scales are not exact in float16")
        result[f"{module}.qweight"] = pack(values.t().contiguous(), dim=0)
        result[f"{module}.scales"] = half.t().contiguous()
        zeros = torch.full((in_features // group_size, out_features), 7, dtype=torch.int32)
        result[f"{module}.qzeros"] = pack(zeros, dim=1)
    save_file(result, out / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "checkpoint_format": "gptq",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy(path, out / path.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compressed", help="a compressed-tensors pack-quantized int4 folder")
    parser.add_argument("out", help="the GPTQ folder to write")
    args = parser.parse_args(argv)
    repack(Path(args.compressed), Path(args.out))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
