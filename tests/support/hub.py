"""A model hub cache laid out on disk as huggingface_hub lays it out, for the offline hub tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

SHA = "0123456789abcdef0123456789abcdef01234567"  # the commit the fake hub cache holds


def lay_out_hub_cache(cache: Path, repo: str, model_dir: Path) -> Path:
    """`repo` at commit SHA in a hub cache laid out as the hub lays it out: blobs named by
    their hash, a snapshot of links to them, refs/main naming the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for path in model_dir.iterdir():
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    return snapshot
