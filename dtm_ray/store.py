"""The run directory: `run.json`, `reference/` and `probes/` as Parquet, on any `pyarrow.fs`.

Everything goes through `pyarrow.fs.FileSystem.from_uri`, so a run directory may be a local path,
`file://…`, `s3://…` or `gs://…`. No Ray here: the store is read by the driver, by tests and by
users' notebooks alike.

Crash safety: every file is written under a hidden temporary name and then moved to its final
name, so a reader never sees half a file (a killed driver leaves at most a hidden temp file, which
readers skip). Probe results arrive as many small files, one per flush, because a single long-lived
ParquetWriter file is unreadable once its writer is killed (DESIGN §7).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtm_ray.config import ConfigError

if TYPE_CHECKING:
    from dtm_ray.probe import Reference

# Keys that change how a run executes but not what it measures; they may differ on resume.
OPERATIONAL_KEYS = frozenset(
    {
        "out",
        "workers",
        "resources_per_worker",
        "max_in_flight_per_worker",
        "max_probe_retries",
        "engine_options.gpu_memory_utilization",
    }
)

PROBE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("spec", pa.string()),
        ("params", pa.int64()),
        ("fdt", pa.list_(pa.int32())),
        ("sdt", pa.list_(pa.int32())),
        ("fdt_mean", pa.float64()),
        ("fdt_at_75", pa.int32()),
        ("sdt_mean", pa.float64()),
        ("nll_mean", pa.float64()),
        ("seconds", pa.float64()),
        ("worker", pa.string()),
        ("attempts", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
    ]
)

REFERENCE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("prompt_id", pa.int32()),
        ("prefix_ids", pa.list_(pa.int32())),
        ("continuation_ids", pa.list_(pa.int32())),
        ("base_argmax", pa.list_(pa.int32())),
        ("base_margin", pa.list_(pa.float32())),
        ("noise_positions", pa.int32()),
        ("min_margin", pa.float32()),
    ]
)

STATUS_OK = "ok"
STATUS_FAILED = "failed"
_TEMP_PREFIX = "."


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # from_uri wants a scheme or an absolute path; a plain relative path means "here".
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _is_visible_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((_TEMP_PREFIX, "_"))


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys: {"prompts": {"count": 8}} -> {"prompts.count": 8}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted not in OPERATIONAL_KEYS:
            flat.update(flatten_config(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved job configs, operational ones aside."""
    # A JSON round trip makes tuples lists (and so on), as they are in a stored run.json.
    old = flatten_config(json.loads(json.dumps(stored)))
    new = flatten_config(json.loads(json.dumps(current)))
    return sorted(
        key
        for key in set(old) | set(new)
        if key not in OPERATIONAL_KEYS and old.get(key, "<missing>") != new.get(key, "<missing>")
    )


def check_same_config(stored: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    """Raise ConfigError naming every differing key when a run dir is reused with another job."""
    keys = config_differences(stored, current)
    if not keys:
        return
    old = flatten_config(json.loads(json.dumps(stored)))
    new = flatten_config(json.loads(json.dumps(current)))
    missing = "<missing>"
    details = "; ".join(
        f"{k}: {old.get(k, missing)!r} in the run, {new.get(k, missing)!r} now" for k in keys
    )
    raise ConfigError(
        f"run dir {where} was started with a different job ({details}); "
        "resume with the original settings or choose another --out"
    )


class RunStore:
    """One run directory. Cheap to create; touches storage only when a method is called."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = _split_uri(uri)

    @property
    def location(self) -> str:
        """Where the run lives, unambiguously: the URI, or the absolute local path."""
        return self.uri if "://" in self.uri else self.root

    # --- paths and raw I/O -----------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _write_atomically(self, path: str, write: Callable[[Any], None]) -> None:
        folder, _, name = path.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        temp = f"{folder}/{_TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(temp) as stream:
                write(stream)
            self.fs.move(temp, path)
        except BaseException:
            if self._exists(temp):
                self.fs.delete_file(temp)
            raise

    def _write_table(self, path: str, table: pa.Table) -> None:
        self._write_atomically(path, lambda stream: pq.write_table(table, stream))

    def _data_files(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        files = (i for i in infos if i.type == pafs.FileType.File)
        return sorted(i.path for i in files if _is_visible_data_file(i.base_name))

    def _read_table(self, path: str, schema: pa.Schema) -> pa.Table:
        with self.fs.open_input_file(path) as handle:
            return pq.read_table(handle, schema=schema)

    # --- run.json ---------------------------------------------------------------------------
    def read_run_info(self) -> dict[str, Any] | None:
        path = self._path("run.json")
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())

    def open_run(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
        """Start a new run (write run.json) or resume one whose config matches; returns run.json.

        `info` is everything else run.json records (versions, hardware, created time); on resume
        the stored one is kept, so run.json always describes how the run began.
        """
        stored = self.read_run_info()
        if stored is not None:
            check_same_config(stored.get("config", {}), config, self.uri)
            return stored
        run_info = {"config": dict(config), **info}
        text = json.dumps(run_info, indent=2, sort_keys=True, default=str).encode()
        self._write_atomically(self._path("run.json"), lambda stream: stream.write(text))
        return run_info

    # --- reference -------------------------------------------------------------------------
    def _reference_path(self, round_: int) -> str:
        return self._path("reference", f"round-{round_:03d}.parquet")

    def write_reference(self, table: pa.Table, round_: int = 0) -> None:
        self._write_table(self._reference_path(round_), table.cast(REFERENCE_SCHEMA))

    def read_reference(self, round_: int = 0) -> pa.Table | None:
        path = self._reference_path(round_)
        if not self._exists(path):
            return None
        return self._read_table(path, REFERENCE_SCHEMA).sort_by("prompt_id")

    # --- probes ----------------------------------------------------------------------------
    def write_probe_rows(self, rows: list[Mapping[str, Any]]) -> str | None:
        """Write one new Parquet file holding `rows`; returns its path (None if no rows)."""
        if not rows:
            return None
        table = pa.Table.from_pylist([dict(r) for r in rows], schema=PROBE_SCHEMA)
        # Time first so that names sort in write order; the random tail keeps writers apart.
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self._path("probes", name)
        self._write_table(path, table)
        return path

    def probe_files(self) -> list[str]:
        return self._data_files("probes")

    def read_probes(self, dedupe: bool = True) -> pa.Table:
        """All probe rows, oldest file first; deduped on (round, component, spec) by default.

        Dedupe is a safety net (the driver never writes a probe twice): an `ok` row wins over a
        `failed` one, then the earliest written.
        """
        tables = [self._read_table(p, PROBE_SCHEMA) for p in self.probe_files()]
        table = pa.concat_tables(tables) if tables else PROBE_SCHEMA.empty_table()
        return _dedupe_probes(table) if dedupe else table

    def finished_probes(self, round_: int = 0) -> set[tuple[str, str]]:
        """(component, spec) of every probe of `round_` already in the table, ok or failed."""
        return {(c, s) for r, c, s in probe_keys(self.read_probes()) if r == round_}


def probe_keys(table: pa.Table) -> list[tuple[int, str, str]]:
    """(round, component, spec) of every row, in table order."""
    columns = (table.column(name).to_pylist() for name in ("round", "component", "spec"))
    return list(zip(*columns, strict=True))


def _dedupe_probes(table: pa.Table) -> pa.Table:
    keys = probe_keys(table)
    statuses = table.column("status").to_pylist()
    chosen: dict[tuple[int, str, str], int] = {}
    for row, key in enumerate(keys):
        kept = chosen.get(key)
        if kept is None or (statuses[kept] != STATUS_OK and statuses[row] == STATUS_OK):
            chosen[key] = row
    return table.take(pa.array(sorted(chosen.values()), type=pa.int64()))


# --- reference <-> table ----------------------------------------------------------------------
def _min_margins(margin: np.ndarray) -> np.ndarray:
    """Per prompt, the smallest top-1/top-2 margin (NaN where the engine gave none)."""
    out = np.full(margin.shape[0], np.nan, dtype=np.float32)
    known = ~np.isnan(margin).all(axis=1)
    out[known] = np.nanmin(margin[known], axis=1)
    return out


def reference_table(reference: Reference, round_: int = 0) -> pa.Table:
    prompts = reference.prefixes.shape[0]
    margin = np.asarray(reference.base_margin, dtype=np.float32)
    return pa.Table.from_pydict(
        {
            "round": [round_] * prompts,
            "prompt_id": list(range(prompts)),
            "prefix_ids": reference.prefixes.tolist(),
            "continuation_ids": reference.continuation.tolist(),
            "base_argmax": reference.base_argmax.tolist(),
            "base_margin": margin.tolist(),
            "noise_positions": reference.noise_positions.tolist(),
            "min_margin": _min_margins(margin).tolist(),
        },
        schema=REFERENCE_SCHEMA,
    )


def _matrix(table: pa.Table, column: str, dtype: type) -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=dtype)


def reference_from_table(table: pa.Table) -> Reference:
    from dtm_ray.probe import Reference

    table = table.sort_by("prompt_id")
    return Reference(
        prefixes=_matrix(table, "prefix_ids", np.int64),
        continuation=_matrix(table, "continuation_ids", np.int64),
        base_argmax=_matrix(table, "base_argmax", np.int64),
        base_margin=_matrix(table, "base_margin", np.float32),
    )
