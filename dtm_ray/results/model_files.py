"""The files of a Hugging Face model folder as both exports see them: its safetensors shards,
and the plain files (config, tokenizer) copied beside the exported weights."""

from __future__ import annotations

import json
from pathlib import Path

from dtm_ray.errors import ConfigError

INDEX = "model.safetensors.index.json"
# Files that hold weights: the checkpoint's own are rewritten, any other format (an uncompressed
# pytorch_model.bin, a GGUF) is left out so no loader picks up the original values.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def shards(model_dir: Path) -> list[str]:
    """The safetensors files holding the model's weights, by name."""
    index = model_dir / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not found:
        raise ConfigError(f"model folder {model_dir} has no safetensors weights")
    return found


def is_plain_file(item: Path) -> bool:
    """A visible file that holds no weights (config, tokenizer, generation config, index)."""
    return item.is_file() and not item.name.startswith(".") and item.suffix not in WEIGHT_SUFFIXES
