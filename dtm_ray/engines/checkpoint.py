"""The originals of a model's weights, read one tensor at a time from its safetensors files.

Engines restore a weight from here instead of keeping a copy of everything they ever edited: a
copy of every probed weight would double the memory of a model most of whose weights a round
probes. Shared by both engines.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch


def read_tensor(path: Path | str, name: str, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `name` of the safetensors file `path`, cast to `dtype` the way the model loaders
    cast it: the one cast every reader of originals uses, so their bits agree."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name).to(dtype)


class Checkpoint:
    """Reads single tensors from a safetensors checkpoint, cast to the engine's dtype the way
    the model loaders cast them, with a bounded LRU cache."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, cache_bytes: int) -> None:
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        self._files = self._index(model_dir)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._shapes: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _index(model_dir: Path) -> dict[str, Path]:
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: model_dir / file for name, file in weight_map.items()}
        files: dict[str, Path] = {}
        for path in sorted(model_dir.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                files.update(dict.fromkeys(f.keys(), path))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        return files

    def _file(self, name: str) -> Path:
        try:
            return self._files[name]
        except KeyError:
            raise KeyError(f"the model has no weight named {name!r}") from None

    def path(self, name: str) -> Path:
        """The safetensors file that holds `name`."""
        return self._file(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._shapes:
            from safetensors import safe_open

            with safe_open(self._file(name), "pt") as f:
                self._shapes[name] = tuple(f.get_slice(name).get_shape())
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """The checkpoint tensor cast to the engine dtype (a cached object: do not mutate)."""
        tensor = self._cache.get(name)
        if tensor is not None:
            self._cache.move_to_end(name)
            return tensor
        tensor = read_tensor(self._file(name), name, self.dtype)
        self._cache[name] = tensor
        self._evict()
        return tensor

    def clear(self) -> None:
        self._cache.clear()

    def _evict(self) -> None:
        total = sum(t.nbytes for t in self._cache.values())
        while len(self._cache) > 1 and total > self.cache_bytes:
            _, dropped = self._cache.popitem(last=False)
            total -= dropped.nbytes

    def __contains__(self, name: str) -> bool:
        return name in self._files


BASE_FILE = "model.safetensors"  # a base folder's trained tensors
BASE_INDEX = "base.json"  # written after BASE_FILE: a base folder without it is not committed


class BaseWeights:
    """The tensors of one recovery base (`<base>/model.safetensors`, a path or a `pyarrow.fs`
    URI), read one at a time (cast to `dtype` when given). A remote file is copied to a local
    temporary file once, so a read is a memory map like a local one."""

    def __init__(self, location: str, dtype: torch.dtype | None = None) -> None:
        from safetensors import safe_open

        self.location = location
        self.dtype = dtype
        from dtm_ray.records.store import join_uri  # pyarrow: only where a base is read

        self._local, self._temp = _local_copy(join_uri(location, BASE_FILE))
        with safe_open(self._local, "pt") as f:
            self.names = frozenset(f.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._local, "pt") as f:
            tensor = f.get_tensor(name)
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def close(self) -> None:
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None


def _local_copy(uri: str) -> tuple[str, Path | None]:
    """(a local path of `uri`, the temporary file to delete afterwards or None)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://"), None
    import tempfile

    from dtm_ray.records.store import open_filesystem

    fs, path = open_filesystem(uri)
    handle, name = tempfile.mkstemp(suffix=".safetensors", prefix="dtm-ray-base-")
    temp = Path(name)
    try:
        with open(handle, "wb") as out, fs.open_input_stream(path) as stream:
            while chunk := stream.read(1 << 24):
                out.write(chunk)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return str(temp), temp
