"""Where a job's model comes from, and how each node gets its own copy of it.

A job's `model:` is one of
- a local folder holding a Hugging Face checkpoint (`config.json` and safetensors);
- a known name (`smollm2-135m`, see `dtm_ray.engines.models`);
- a model-hub id, `org/name` with an optional `@revision` (a branch, tag or commit);
- an object-store URI, `s3://bucket/prefix` or `gs://bucket/prefix` (endpoint and credentials as
  for run directories: the URI's query, `AWS_ENDPOINT_URL(_S3)`, the usual AWS variables).

The driver resolves it once (`resolve_source`): a hub revision becomes its commit sha, so a run
never mixes two revisions, and the digest recorded in run.json is the source, that revision and
the weight files' sizes. It reads only what the checks need (config, tokenizer, weight index:
`driver_folder`), and hands the small `ModelSource` to the actors, never its own path. Each node
then materialises the source once (`node_folder`): the hub through `snapshot_download` into
`HF_HOME` (honouring `HF_HUB_OFFLINE`), an object store into the node-local cache
(`DTM_RAY_CACHE`, default `~/.cache/dtm_ray`), keyed by the URI and the files' sizes and
modification times. A file lock makes the actors of one node fetch once; the others wait and
read the same files. Every reader of original weights (engines, export, evaluation) reads them.

This module resolves and dispatches; the backends are `dtm_ray.engines.hub_source` and
`dtm_ray.engines.store_source`, and `ModelSource` with what they share is in
`dtm_ray.engines.model_source` (imported from here too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dtm_ray.engines.hub_source import hub_snapshot, resolve_hub
from dtm_ray.engines.model_source import (
    FOLDER,
    HUB,
    KNOWN,
    STORE,
    ModelSource,
    Progress,
    weight_bytes,
)
from dtm_ray.engines.models import is_known, materialize, model_digest
from dtm_ray.engines.store_source import remove_copies, resolve_store, store_copy
from dtm_ray.errors import ConfigError

# What other modules import from here, `ModelSource` and its kinds included.
__all__ = [
    "FOLDER",
    "HUB",
    "KNOWN",
    "STORE",
    "ModelSource",
    "driver_folder",
    "evict",
    "kind_of",
    "node_folder",
    "resolve_source",
    "source_of_run",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def source_of_run(info: Mapping[str, Any]) -> ModelSource:
    """The model source a run (its run.json) measured: the stored one, so export and evaluation
    read the revision the run used; runs from before sources were stored resolve `model`."""
    stored = info.get("model_source")
    if isinstance(stored, dict):
        return ModelSource(**stored)
    return resolve_source(info["config"]["model"])


def kind_of(model: str) -> str:
    """Which kind of source `model` names, by its form alone (nothing is read). A store URI of
    the wrong shape (`s3://`, `gs:///prefix`) is a ConfigError here, before any client exists."""
    if "://" in model and not model.startswith("file://"):
        from dtm_ray.records.store import check_store_uri

        check_store_uri(model, "model")
        return STORE
    if Path(model).expanduser().is_dir():
        return FOLDER
    if is_known(model):
        return KNOWN
    if _HUB_ID.match(model) and not model.startswith(("./", "../", "~")):
        return HUB
    raise ConfigError(
        f"model {model!r} is neither a local folder nor a known name "
        f"({', '.join(_known_names())}), a hub id (org/name[@revision]) or an object-store URI "
        "(s3://bucket/prefix, gs://bucket/prefix)"
    )


def _known_names() -> list[str]:
    from dtm_ray.engines.models import KNOWN_MODELS

    return sorted(KNOWN_MODELS)


# --- the driver: resolve once ----------------------------------------------------------------
def resolve_source(model: str) -> ModelSource:
    """The job's `model` as a ModelSource (hub revision pinned to a commit, sizes listed), or a
    one-line ConfigError: no such folder, repo, bucket or prefix, a gated repo, no network."""
    kind = kind_of(model)
    if kind == FOLDER:
        folder = Path(model).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model folder {model} has no config.json")
        return ModelSource(FOLDER, str(folder), None, model_digest(folder), weight_bytes(folder))
    if kind == KNOWN:
        folder = materialize(model)
        return ModelSource(KNOWN, model, None, model_digest(folder), weight_bytes(folder))
    if kind == HUB:
        return resolve_hub(model)
    return resolve_store(model)


def driver_folder(source: ModelSource) -> Path:
    """A local folder with what the driver's checks read: config.json, the tokenizer and the
    weight index (all of a folder or known model; no weights of a hub or store source)."""
    if source.kind == FOLDER:
        return Path(source.id)
    if source.kind == KNOWN:
        return materialize(source.id)
    if source.kind == HUB:
        return hub_snapshot(source, weights=False)
    return store_copy(source, weights=False)


def node_folder(source: ModelSource | str, progress: Progress | None = None) -> Path:
    """The complete model folder on this node, materialised once per node (later callers, and
    the other actors of the node waiting on the lock, read the same files)."""
    if isinstance(source, str):  # a job's `model` as written: a folder or a known name
        source = resolve_source(source)
    if source.kind == FOLDER:
        folder = Path(source.id)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model folder {source.id} is not on this node; name a hub id or an object-store "
                "URI, or a folder every node shares"
            )
        return folder
    if source.kind == KNOWN:
        return materialize(source.id)
    if source.kind == HUB:
        return hub_snapshot(source, weights=True, progress=progress)
    return store_copy(source, weights=True, progress=progress)


def evict(source: ModelSource) -> None:
    """Remove a store source's copies from this node's cache (tests, and users short on disk)."""
    if source.kind == STORE:
        remove_copies(source)
