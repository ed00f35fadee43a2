"""Candidates for `dtm-ray compare`, made with plain torch outside dtm_ray from a dense Hugging Face
folder: every decoder weight matrix (`model.layers.*`, 2-D) changed, everything else kept.

- `bf16`: rounded to bfloat16 and back to the folder's dtype (a bf16 serving copy);
- `pruned`: the 10 % smallest |w| of each matrix set to zero (torch.kthvalue);
- `noised`: plus Gaussian noise of 2 % of each matrix's standard deviation (seeded).

    python bench/compare_candidates.py "$(dtm-ray model smollm2-135m)" runs/candidates
    dtm-ray compare smollm2-135m runs/candidates/bf16 --engine hf --dtype float32

Needs torch and safetensors only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PRUNE = 0.1
NOISE = 0.02


def is_decoder_matrix(name: str, tensor: torch.Tensor) -> bool:
    return name.startswith("model.layers.") and tensor.ndim == 2


def rounded(tensor: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(tensor.dtype)


def pruned(tensor: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    k = int(round(PRUNE * tensor.numel()))
    threshold = tensor.abs().flatten().kthvalue(k).values
    return torch.where(tensor.abs() <= threshold, torch.zeros_like(tensor), tensor)


def noised(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
    return tensor + NOISE * tensor.std() * noise


CANDIDATES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "bf16": rounded,
    "pruned": pruned,
    "noised": noised,
}


def write(source: Path, out: Path, change: Callable) -> None:
    """`source` with every decoder matrix changed, into `out` (the other files copied)."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("."):
            shutil.copy(path, out / path.name)
    for path in sorted(source.glob("*.safetensors")):
        tensors = load_file(path)
        changed = {
            name: change(t, generator) if is_decoder_matrix(name, t) else t
            for name, t in tensors.items()
        }
        save_file(changed, out / path.name, metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a dense Hugging Face folder (safetensors)")
    parser.add_argument("out", help="where the candidate folders go")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    args = parser.parse_args(argv)
    for name in args.only:
        write(Path(args.source), Path(args.out) / name, CANDIDATES[name])
        print(Path(args.out) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
