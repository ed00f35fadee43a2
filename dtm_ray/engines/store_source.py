"""Object stores as a model source: an `s3://` or `gs://` prefix (endpoint and credentials as for
run directories) listed on the driver, its digest the URI and each file's size and modification
time, and copied on each node into the node-local cache (`DTM_RAY_CACHE`, default
`~/.cache/dtm_ray`) once: under a file lock, into a scratch folder renamed when complete, with the
retries and failure mapping of run directories (`dtm_ray.records.store`)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtm_ray.engines.model_source import (
    REPORT_EVERY_S,
    STORE,
    ModelSource,
    Progress,
    checkpoint_files,
    digest_of,
    is_weight_file,
    size_text,
)
from dtm_ray.engines.models import cache_dir
from dtm_ray.errors import ConfigError, storage_error

_DONE = ".dtm_ray_complete"


def resolve_store(uri: str) -> ModelSource:
    _, _, files = _store_listing(uri)
    if "config.json" not in files:
        raise ConfigError(f"model {uri.split('?', 1)[0]} has no config.json")
    weights = {n: files[n][0] for n in checkpoint_files(files)}
    if not weights:
        raise ConfigError(f"model {uri.split('?', 1)[0]} has no safetensors weights")
    return ModelSource(STORE, uri, None, _store_digest(uri, files), sum(weights.values()))


def store_copy(source: ModelSource, weights: bool, progress: Progress | None = None) -> Path:
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
            progress(f"fetching {source.name}: 0 of {size_text(total)}")
        try:
            done, last = 0, 0.0

            def count(n: int) -> None:
                nonlocal done, last
                done += n
                if progress is not None and time.monotonic() - last >= REPORT_EVERY_S:
                    progress(f"fetching {source.name}: {size_text(done)} of {size_text(total)}")
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


def _store_digest(uri: str, files: dict[str, tuple[int, float]]) -> str:
    listing = [f"{n}:{s}:{m:.0f}" for n, (s, m) in sorted(files.items())]
    return digest_of(f"store:{uri.split('?', 1)[0]}", *listing)


def _store_target(source: ModelSource, weights: bool) -> Path:
    """The node-local cache folder of a store source: keyed by its digest (URI, sizes, mtimes),
    so a changed object is fetched again rather than mixed with an old copy."""
    return cache_dir() / "sources" / (source.digest + ("" if weights else "-meta"))


def _needed(names: list[str] | set[str] | dict[str, Any], weights: bool) -> list[str]:
    """The files a node fetches: every non-weight file, and the checkpoint when `weights`."""
    plain = [n for n in names if not is_weight_file(n)]
    return sorted(plain + (checkpoint_files(names) if weights else []))


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


def remove_copies(source: ModelSource) -> None:
    """Remove the source's copies (weights and the driver's small files) from this node's cache."""
    for weights in (True, False):
        shutil.rmtree(_store_target(source, weights), ignore_errors=True)
        Path(str(_store_target(source, weights)) + ".lock").unlink(missing_ok=True)
