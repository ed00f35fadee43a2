"""A job's model as every node can find it (`ModelSource`), and what the source backends share:
which files are weights, the digest of a listing, the size of a fetch in words.

The sources themselves: `dtm_ray.engines.sources` (resolve on the driver, materialise per node),
`dtm_ray.engines.hub_source` (the model hub) and `dtm_ray.engines.store_source` (object stores).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOLDER, KNOWN, HUB, STORE = "folder", "known", "hub", "store"
# What the driver needs of a model: its config, tokenizer and weight index, never the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
# Progress of a fetch is reported at most this often.
REPORT_EVERY_S = 2.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """A job's model as every node can find it: small, picklable, the same on every node."""

    kind: str  # FOLDER, KNOWN, HUB or STORE
    id: str  # the absolute folder, the known name, the repo id, or the URI
    revision: str | None = None  # the hub commit sha the run uses
    digest: str = ""  # source + revision + weight file sizes (config + sizes for a folder)
    bytes: int = 0  # the weights' size: what a node fetches and each actor loads

    @property
    def name(self) -> str:
        """The source as a user would write it (the URI without its query)."""
        if self.kind == HUB:
            return f"{self.id}@{self.revision}" if self.revision else self.id
        return self.id.split("?", 1)[0]


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def checkpoint_files(names: list[str] | set[str] | dict[str, Any]) -> list[str]:
    """The weight files the engines load of a model's file names: its top-level
    `model*.safetensors` (the Hugging Face checkpoint), else any top-level safetensors. Other
    copies a repo may carry (`pytorch_model*.bin`, `consolidated.safetensors`, GGUF files) are
    neither fetched nor counted."""
    top = [n for n in names if "/" not in n and n.endswith(".safetensors")]
    return sorted([n for n in top if n.startswith("model")] or top)


def weight_bytes(folder: Path) -> int:
    # A hub snapshot's files are links into its blobs; a missing blob counts as nothing.
    names = [p.name for p in folder.iterdir() if p.exists()]
    return sum((folder / name).stat().st_size for name in checkpoint_files(names))


def digest_of(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def size_text(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
