"""The run directory: `run.json` and Parquet tables on any `pyarrow.fs`. I/O only.

Everything goes through `pyarrow.fs.FileSystem.from_uri`, so a run directory may be a local path,
`file://…`, `s3://…` or `gs://…`. No Ray, no torch, no job config here: the store is read by the
driver, by tests and by users' notebooks alike. Schemas live in `dtm_ray.schemas`.

Layout (every folder is one table, readable with `pandas.read_parquet(run_dir + "/probes")`):

    run.json
    reference/round-000.parquet     calibration/round-000.parquet
    probes/part-r000-<time>-<id>.parquet  (while round 0 runs)  ->  probes/round-000.parquet
    decisions/round-000.parquet     states/round-000.parquet
    final/prompts/data.parquet      final/components/data.parquet   final/summary/data.parquet
    final/tasks/data.parquet        final/lm-eval/{dense,compressed}/  (lm-eval's own output)

Crash safety: every file is written under a hidden temporary name and then moved to its final
name, so a reader never sees half a file. Probe results arrive as many small files, one per flush,
because a single long-lived ParquetWriter file is unreadable once its writer is killed; when a
round ends they are compacted into one file per round (object stores list small files slowly).
Compaction writes the round file first and deletes the parts after, so a kill in between leaves
duplicates, which reads drop, and never a gap.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtm_ray.schemas import PROBE_SCHEMA, REFERENCE_SCHEMA, dedupe_probes, probe_keys

_TEMP_PREFIX = "."
_ROUND_OF_FILE = re.compile(r"(?:part-r|round-)(\d+)")


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # from_uri wants a scheme or an absolute path; a plain relative path means "here".
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


def _is_visible_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((_TEMP_PREFIX, "_"))


def _round_file(round_: int) -> str:
    return f"round-{round_:03d}.parquet"


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

    def _read_file(self, path: str, schema: pa.Schema) -> pa.Table:
        with self.fs.open_input_file(path) as handle:
            return pq.read_table(handle, schema=schema)

    def _read_files(self, paths: Sequence[str], schema: pa.Schema) -> pa.Table:
        tables = [self._read_file(p, schema) for p in paths]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    # --- run.json ---------------------------------------------------------------------------
    def read_run_info(self) -> dict[str, Any] | None:
        path = self._path("run.json")
        if not self._exists(path):
            return None
        with self.fs.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())

    def open_run(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
        """run.json of this run: the stored one on resume (comparing configs is the caller's
        job), else a new one holding `config` and `info` (versions, hardware, created time)."""
        stored = self.read_run_info()
        if stored is not None:
            return stored
        run_info = {"config": dict(config), **info}
        text = json.dumps(run_info, indent=2, sort_keys=True, default=str).encode()
        self._write_atomically(self._path("run.json"), lambda stream: stream.write(text))
        return run_info

    # --- one file per round: reference, calibration, decisions, states -------------------
    def write_round_table(self, folder: str, round_: int, table: pa.Table) -> None:
        self._write_table(self._path(folder, _round_file(round_)), table)

    def read_round_table(
        self, folder: str, schema: pa.Schema, round_: int | None = None
    ) -> pa.Table | None:
        """One round's table (None if not written yet), or every round's when `round_` is None."""
        if round_ is None:
            return self._read_files(self._data_files(folder), schema)
        path = self._path(folder, _round_file(round_))
        return self._read_file(path, schema) if self._exists(path) else None

    def rounds_written(self, folder: str) -> list[int]:
        names = (p.rpartition("/")[2] for p in self._data_files(folder))
        return sorted(int(n[6:-8]) for n in names if n.startswith("round-"))

    def write_reference(self, table: pa.Table, round_: int) -> None:
        self.write_round_table("reference", round_, table.cast(REFERENCE_SCHEMA))

    def read_reference(self, round_: int) -> pa.Table | None:
        table = self.read_round_table("reference", REFERENCE_SCHEMA, round_)
        return None if table is None else table.sort_by("prompt_id")

    # --- probes ----------------------------------------------------------------------------
    def write_probe_rows(self, rows: Sequence[Mapping[str, Any]], round_: int) -> str | None:
        """Write one new Parquet file holding `rows` of `round_`; returns its path."""
        if not rows:
            return None
        table = pa.Table.from_pylist([dict(r) for r in rows], schema=PROBE_SCHEMA)
        # Round and time first, so names sort in write order; the random tail keeps writers apart.
        name = f"part-r{round_:03d}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        path = self._path("probes", name)
        self._write_table(path, table)
        return path

    def probe_files(self) -> list[str]:
        return self._data_files("probes")

    def _probe_files_of(self, round_: int) -> list[str]:
        """The round's compacted file (first) and its part files (oldest first)."""
        files = []
        for path in self.probe_files():
            match = _ROUND_OF_FILE.match(path.rpartition("/")[2])
            if match and int(match[1]) == round_:
                files.append(path)
        return sorted(files, key=lambda p: not p.rpartition("/")[2].startswith("round-"))

    def read_probes(self, dedupe: bool = True, round_: int | None = None) -> pa.Table:
        """Probe rows (of one round, or all), oldest first; deduped by default on
        (round, component, spec): an `ok` row wins over a `failed` one, then the earliest."""
        files = self.probe_files() if round_ is None else self._probe_files_of(round_)
        table = self._read_files(files, PROBE_SCHEMA)
        return dedupe_probes(table) if dedupe else table

    def finished_probes(self, round_: int) -> set[tuple[str, str]]:
        """(component, spec) of every probe of `round_` already in the table, ok or failed."""
        return {(c, s) for r, c, s in probe_keys(self.read_probes(round_=round_)) if r == round_}

    def compact_probes(self, round_: int) -> None:
        """Merge a round's part files into `probes/round-NNN.parquet` (deduped), then delete
        the parts."""
        parts = [p for p in self._probe_files_of(round_) if "/part-" in p]
        if not parts:
            return
        table = self.read_probes(round_=round_)
        self.write_round_table("probes", round_, table)
        for path in parts:
            self.fs.delete_file(path)

    # --- final -----------------------------------------------------------------------------
    def write_final(self, name: str, table: pa.Table) -> None:
        self._write_table(self._path("final", name, "data.parquet"), table)

    def read_final(self, name: str, schema: pa.Schema) -> pa.Table | None:
        path = self._path("final", name, "data.parquet")
        return self._read_file(path, schema) if self._exists(path) else None

    def replace_files(self, folder: str, files: Mapping[str, str]) -> None:
        """Make `folder` hold exactly `files` (name -> text), e.g. lm-eval's per-example output."""
        path = self._path(folder)
        if self._exists(path):
            self.fs.delete_dir_contents(path)
        for name, text in files.items():
            data = text.encode()
            self._write_atomically(self._path(folder, name), lambda stream, d=data: stream.write(d))
