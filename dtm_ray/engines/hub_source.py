"""The model hub as a model source: a hub id (`org/name[@revision]`) pinned on the driver to a
commit sha (from the hub, or from the local cache when offline), and fetched on each node through
`snapshot_download` into `HF_HOME` (honouring `HF_HUB_OFFLINE`) under a file lock, with the
download's bytes reported as they arrive. Each failure is one line: no such repo or revision, a
gated repo, no network and no cached copy."""

from __future__ import annotations

import threading
from pathlib import Path

from dtm_ray.engines.model_source import (
    HUB,
    REPORT_EVERY_S,
    ModelSource,
    Progress,
    checkpoint_files,
    digest_of,
    size_text,
    weight_bytes,
)
from dtm_ray.errors import ConfigError

# The files of a hub repo besides its weights that loading a model may read: config, tokenizer,
# generation config, chat template, remote code.
_PLAIN_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "*.jinja"]


def resolve_hub(model: str) -> ModelSource:
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


def hub_snapshot(source: ModelSource, weights: bool, progress: Progress | None = None) -> Path:
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


def _hub_source(repo: str, sha: str, sizes: dict[str, int]) -> ModelSource:
    weights = {name: sizes[name] for name in checkpoint_files(sizes)}
    listing = [f"{name}:{size}" for name, size in sorted(weights.items())]
    digest = digest_of(f"hub:{repo}@{sha}", *listing)
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
    total = size_text(source.bytes)
    progress(f"fetching {source.name} from the hub: {size_text(0)} of {total}")

    def watch() -> None:
        while not stop.wait(REPORT_EVERY_S):
            done = min(max(_hub_blob_bytes(source) - start, 0), source.bytes)
            progress(f"fetching {source.name} from the hub: {size_text(done)} of {total}")

    threading.Thread(target=watch, name="dtm-ray-hub-progress", daemon=True).start()
    return stop


def _cached_snapshot_files(source: ModelSource, weights: bool) -> Path:
    folder = _cached_snapshot(source.name, source.id, source.revision or "main")
    if weights and weight_bytes(folder) < max(source.bytes, 1):
        raise ConfigError(
            f"model {source.name}: the local hub cache ({_hub_cache()}) holds only part of its "
            "weights and the hub cannot be reached (or HF_HUB_OFFLINE is set)"
        )
    return folder
