"""The files of a Hugging Face model folder as both exports see them: its safetensors shards,
and the plain files (config, tokenizer) copied beside the exported weights; and how an export
writes each of its files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dtm_ray.errors import ConfigError

T = TypeVar("T")

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


def write_file(where: str, name: str, action: Callable[[], T]) -> T:
    """Write one file of an export (`action`) with the run dir's retries and failure mapping
    (`records.store.retrying`): a full disk is a StorageError naming the file and `where` the
    export goes, never a bug."""
    from dtm_ray.records.store import retrying

    return retrying("write", f"{name} of the export to {where}", action)
