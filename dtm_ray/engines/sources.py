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
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_ray.engines.models import cache_dir, is_known, materialize, model_digest
from dtm_ray.errors import ConfigError, storage_error

FOLDER, KNOWN, HUB, STORE = "folder", "known", "hub", "store"
STORE_SCHEMES = ("s3://", "gs://", "gcs://")
# What the driver needs of a model: its config, tokenizer and weight index, never the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_DONE = ".dtm_ray_complete"
# The files of a hub repo besides its weights that loading a model may read: config, tokenizer,
# generation config, chat template, remote code.
_PLAIN_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]
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


def source_of_run(info: Mapping[str, Any]) -> ModelSource:
    """The model source a run (its run.json) measured: the stored one, so export and evaluation
    read the revision the run used; runs from before sources were stored resolve `model`."""
    stored = info.get("model_source")
    if isinstance(stored, dict):
        return ModelSource(**stored)
    return resolve_source(info["config"]["model"])


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def checkpoint_files(names: list[str] | set[str] | dict[str, Any]) -> list[str]:
    """The weight files the engines load of a model's file names: its top-level
    `model*.safetensors` (the Hugging Face checkpoint), else any top-level safetensors. Other
    copies a repo may carry (`pytorch_model*.bin`, `consolidated.safetensors`, GGUF files) are
    neither fetched nor counted."""
    top = [n for n in names if "/" not in n and n.endswith(".safetensors")]
    return sorted([n for n in top if n.startswith("model")] or top)


def _needed(names: list[str] | set[str] | dict[str, Any], weights: bool) -> list[str]:
    """The files a node fetches: every non-weight file, and the checkpoint when `weights`."""
    plain = [n for n in names if not is_weight_file(n)]
    return sorted(plain + (checkpoint_files(names) if weights else []))


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


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
        return ModelSource(FOLDER, str(folder), None, model_digest(folder), _weight_bytes(folder))
    if kind == KNOWN:
        folder = materialize(model)
        return ModelSource(KNOWN, model, None, model_digest(folder), _weight_bytes(folder))
    if kind == HUB:
        return _resolve_hub(model)
    return _resolve_store(model)


def _weight_bytes(folder: Path) -> int:
    # A hub snapshot's files are links into its blobs; a missing blob counts as nothing.
    names = [p.name for p in folder.iterdir() if p.exists()]
    return sum((folder / name).stat().st_size for name in checkpoint_files(names))


def driver_folder(source: ModelSource) -> Path:
    """A local folder with what the driver's checks read: config.json, the tokenizer and the
    weight index (all of a folder or known model; no weights of a hub or store source)."""
    if source.kind == FOLDER:
        return Path(source.id)
    if source.kind == KNOWN:
        return materialize(source.id)
    if source.kind == HUB:
        return _hub_snapshot(source, weights=False)
    return _store_copy(source, weights=False)


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
        return _hub_snapshot(source, weights=True, progress=progress)
    return _store_copy(source, weights=True, progress=progress)


# --- the model hub ---------------------------------------------------------------------------
def _hub_errors() -> tuple[type, ...]:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    return GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError


def _hub_message(model: str, err: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, GatedRepoError):  # a subclass of RepositoryNotFoundError: first
        return (
            f"model {model} is a gated repo on the hub: accept its terms on the hub, then set "
            "HF_TOKEN to a token of that account"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"model {model}: the hub repo has no such revision (a branch, tag or commit)"
    if isinstance(err, RepositoryNotFoundError):
        token = " (or it is private: set HF_TOKEN)" if not _has_token() else ""
        return f"model {model}: no such repo on the hub{token}"
    if isinstance(err, HFValidationError):
        return f"model {model} is not a valid hub id (org/name[@revision]): {err}"
    raise err


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _is_network_error(err: BaseException) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    names = {c.__name__ for c in type(err).__mro__}
    return isinstance(err, ConnectionError | TimeoutError | OfflineModeIsEnabled) or bool(
        names & {"TransportError", "ConnectError", "ConnectionError", "TimeoutException"}
    )


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _resolve_hub(model: str) -> ModelSource:
    """The hub id pinned to a commit sha, from the hub, or from the local cache when offline."""
    from huggingface_hub import HfApi

    repo, _, revision = model.partition("@")
    revision = revision or "main"
    if not _hub_offline():
        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        except _hub_errors() as err:
            raise ConfigError(_hub_message(model, err)) from None
        except Exception as err:
            if not _is_network_error(err):
                raise
            # No network: a cached snapshot of the revision is as good (pinned below).
        else:
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
            return _hub_source(repo, info.sha, sizes)
    folder = _cached_snapshot(model, repo, revision)
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    return _hub_source(repo, folder.name, sizes)


def _hub_source(repo: str, sha: str, sizes: dict[str, int]) -> ModelSource:
    weights = {name: sizes[name] for name in checkpoint_files(sizes)}
    listing = [f"{name}:{size}" for name, size in sorted(weights.items())]
    digest = _digest(f"hub:{repo}@{sha}", *listing)
    return ModelSource(HUB, repo, sha, digest, sum(weights.values()))


def _cached_snapshot(model: str, repo: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the hub cannot be reached"
        raise ConfigError(
            f"model {model}: {why} and the revision is not in the local hub cache "
            f"({_hub_cache()}); download it there first or allow network access"
        ) from None


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_snapshot(source: ModelSource, weights: bool, progress: Progress | None = None) -> Path:
    """The revision's snapshot folder in the hub cache (HF_HOME), downloading what is missing
    (only the small files when not `weights`). The hub's own per-file locks make concurrent
    downloads on one node fetch each file once; ours keeps the node's actors from even asking."""
    from filelock import FileLock
    from huggingface_hub import snapshot_download

    patterns = [*_PLAIN_PATTERNS, *(["model*.safetensors"] if weights else [])]
    try:  # already in the cache (HF_HOME): no request to the hub at all
        return _cached_snapshot_files(source, weights)
    except ConfigError:
        if _hub_offline():
            raise
    lock = Path(_hub_cache()) / f".dtm_ray-{source.id.replace('/', '--')}-{source.revision}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(lock)):
            try:  # another actor of this node fetched it while this one waited
                return _cached_snapshot_files(source, weights)
            except ConfigError:
                pass
            watch = _hub_watch(source, progress) if weights and progress is not None else None
            try:
                folder = snapshot_download(
                    source.id, revision=source.revision, allow_patterns=patterns
                )
            finally:
                if watch is not None:
                    watch.set()
            return Path(folder)
    except _hub_errors() as err:
        raise ConfigError(_hub_message(source.name, err)) from None
    except Exception as err:
        if not _is_network_error(err):
            raise
        raise ConfigError(
            f"model {source.name}: the hub cannot be reached and the revision is not in the "
            f"local hub cache ({_hub_cache()})"
        ) from None


def _hub_blob_bytes(source: ModelSource) -> int:
    """Bytes in the hub cache's blob folder of the source's repo, partial downloads included
    (`*.incomplete`): what `snapshot_download` has fetched so far."""
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(_hub_cache()) / repo_folder_name(repo_id=source.id, repo_type="model") / "blobs"
    total = 0
    for path in blobs.glob("*"):
        try:
            total += path.stat().st_size
        except OSError:  # renamed from .incomplete between the listing and the stat
            pass
    return total


def _hub_watch(source: ModelSource, progress: Progress) -> threading.Event:
    """Report the hub download's bytes every `REPORT_EVERY_S` from a daemon thread until the
    returned event is set (the hub client shows no progress of its own to a caller)."""
    stop = threading.Event()
    start = _hub_blob_bytes(source)  # what the cache held before: other revisions' blobs
    progress(f"fetching {source.name} from the hub: {_gb(0)} of {_gb(source.bytes)}")

    def watch() -> None:
        while not stop.wait(REPORT_EVERY_S):
            done = min(max(_hub_blob_bytes(source) - start, 0), source.bytes)
            progress(f"fetching {source.name} from the hub: {_gb(done)} of {_gb(source.bytes)}")

    threading.Thread(target=watch, name="dtm-ray-hub-progress", daemon=True).start()
    return stop


def _cached_snapshot_files(source: ModelSource, weights: bool) -> Path:
    folder = _cached_snapshot(source.name, source.id, source.revision or "main")
    if weights and _weight_bytes(folder) < max(source.bytes, 1):
        raise ConfigError(
            f"model {source.name}: the local hub cache ({_hub_cache()}) holds only part of its "
            "weights and the hub cannot be reached (or HF_HUB_OFFLINE is set)"
        )
    return folder


# --- object stores ---------------------------------------------------------------------------
def _store_listing(uri: str) -> tuple[object, str, dict[str, tuple[int, float]]]:
    """The store's filesystem, the prefix, and relative name -> (size, mtime) under it. A store
    that cannot be reached is a StorageError naming its endpoint once the retries are spent."""
    import pyarrow.fs as pafs

    from dtm_ray.records.store import open_filesystem, retrying, store_endpoint

    name = uri.split("?", 1)[0]
    fs, prefix = open_filesystem(uri, "model")  # the URI's shape first: no client before
    selector = pafs.FileSelector(prefix, recursive=True)

    def listing() -> Any:
        try:
            return fs.get_file_info(selector)
        except OSError as err:  # "no such bucket or prefix" is the store's answer: not retried
            missing = _missing_in_store(err)
            if missing is None:
                raise
            return missing

    infos = retrying("list", f"model {name}", listing, store_endpoint(fs))
    if isinstance(infos, str):
        raise ConfigError(f"model {name}: {infos}")
    files = {
        i.path[len(prefix.rstrip("/")) + 1 :]: (i.size or 0, i.mtime.timestamp() if i.mtime else 0)
        for i in infos
        if i.type == pafs.FileType.File
    }
    if not files:
        raise ConfigError(f"model {uri.split('?', 1)[0]}: no such bucket or prefix (nothing there)")
    return fs, prefix, files


def _missing_in_store(err: OSError) -> str | None:
    """What a failed listing says is not there (the bucket, or the prefix), or None when the
    store failed rather than answered."""
    text = str(err).lower()
    if "nosuchbucket" in text.replace(" ", "") or "no_such_bucket" in text:
        return "the bucket does not exist"
    if isinstance(err, FileNotFoundError | NotADirectoryError) or any(
        word in text for word in ("not found", "does not exist", "nosuchkey", "not a directory")
    ):
        return "no such bucket or prefix"
    return None


def _resolve_store(uri: str) -> ModelSource:
    _, _, files = _store_listing(uri)
    if "config.json" not in files:
        raise ConfigError(f"model {uri.split('?', 1)[0]} has no config.json")
    weights = {n: files[n][0] for n in checkpoint_files(files)}
    if not weights:
        raise ConfigError(f"model {uri.split('?', 1)[0]} has no safetensors weights")
    return ModelSource(STORE, uri, None, _store_digest(uri, files), sum(weights.values()))


def _store_digest(uri: str, files: dict[str, tuple[int, float]]) -> str:
    listing = [f"{n}:{s}:{m:.0f}" for n, (s, m) in sorted(files.items())]
    return _digest(f"store:{uri.split('?', 1)[0]}", *listing)


def _store_target(source: ModelSource, weights: bool) -> Path:
    """The node-local cache folder of a store source: keyed by its digest (URI, sizes, mtimes),
    so a changed object is fetched again rather than mixed with an old copy."""
    return cache_dir() / "sources" / (source.digest + ("" if weights else "-meta"))


def _store_copy(source: ModelSource, weights: bool, progress: Progress | None = None) -> Path:
    """The store source copied into the node-local cache, once per node: under a file lock, into
    a scratch folder renamed when complete, so a killed copy never leaves half a model."""
    from filelock import FileLock, Timeout

    target = _store_target(source, weights)
    if (target / _DONE).is_file():
        return target
    if not weights and (_store_target(source, True) / _DONE).is_file():
        return _store_target(source, True)  # the whole model is here already
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress is not None:
            progress(f"waiting for another actor of this node fetching {source.name}")
        lock.acquire()
    try:
        if (target / _DONE).is_file():  # another actor of this node fetched it meanwhile
            return target
        fs, prefix, files = _store_listing(source.id)
        if _store_digest(source.id, files) != source.digest:
            raise ConfigError(
                f"model {source.name} changed since the run resolved it (its files' sizes or "
                "times differ): a run never mixes two versions; start a new run"
            )
        wanted = {n: files[n][0] for n in _needed(files, weights)}
        total = sum(wanted.values())
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        if progress is not None:
            progress(f"fetching {source.name}: 0 of {_gb(total)}")
        try:
            done, last = 0, 0.0

            def count(n: int) -> None:
                nonlocal done, last
                done += n
                if progress is not None and time.monotonic() - last >= REPORT_EVERY_S:
                    progress(f"fetching {source.name}: {_gb(done)} of {_gb(total)}")
                    last = time.monotonic()

            for name, size in sorted(wanted.items()):
                out = scratch / name
                out.parent.mkdir(parents=True, exist_ok=True)
                _copy_file(fs, f"{prefix.rstrip('/')}/{name}", out, size, count, target.parent)
            (scratch / _DONE).write_text(source.name + "\n")
            if target.exists():
                shutil.rmtree(target)
            scratch.rename(target)
        except OSError as err:  # the cache folder: the copies went through `retrying`
            raise storage_error(err, "fetch", f"model {source.name} into {target.parent}") from err
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        lock.release()
    return target


def _copy_file(
    fs: Any, path: str, out: Path, size: int, count: Callable[[int], None], cache: Path
) -> None:
    """Copy one object to `out`, trying again (from its start) on a transient error, with the
    retries and failure mapping of run directories (`records.store.retrying`): a full cache
    disk or a store that stays unreachable is a StorageError; `count` is told of every piece."""
    from dtm_ray.records.store import retrying, store_endpoint

    def copy() -> None:
        copied = 0
        try:
            with fs.open_input_stream(path) as src, open(out, "wb") as dst:
                while chunk := src.read(16 << 20):
                    dst.write(chunk)
                    copied += len(chunk)
                    count(len(chunk))
            if copied != size:
                raise OSError(f"{path}: got {copied} bytes, the store lists {size}")
        except BaseException:
            count(-copied)
            raise

    retrying("fetch", f"{path} into {cache}", copy, store_endpoint(fs))


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def evict(source: ModelSource) -> None:
    """Remove a store source's copies from this node's cache (tests, and users short on disk)."""
    if source.kind != STORE:
        return
    for weights in (True, False):
        shutil.rmtree(_store_target(source, weights), ignore_errors=True)
        Path(str(_store_target(source, weights)) + ".lock").unlink(missing_ok=True)
