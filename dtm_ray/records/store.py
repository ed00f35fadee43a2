"""The run directory: `run.json` and Parquet tables on any `pyarrow.fs`. I/O only.

Everything goes through `pyarrow.fs.FileSystem.from_uri`, so a run directory may be a local path,
`file://…`, `s3://…` or `gs://…`. No Ray, no torch, no job config here: the store is read by the
driver, by tests and by users' notebooks alike. Schemas live in `dtm_ray.records.schemas`.

Layout (every folder is one table, readable with `pandas.read_parquet(run_dir + "/probes")`):

    run.json
    reference/round-000.parquet     calibration/round-000.parquet
    validate/round-000.parquet      test/round-000.parquet  (held-out prompts, compressing runs)
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

Storage failures: every write and delete is retried on a transient error (a timeout, a throttle,
a 5xx, a dropped connection) with bounded backoff; a persistent one (no space, no permission, no
bucket, bad credentials), or a transient one that outlasts the retries, raises `StorageError`
naming the run directory, the operation and the cause. A failed write leaves no visible file.
`retrying` is that mapping for every writer of dtm_ray, not only run directories (exports,
reports, the model cache). Store requests are bounded: a connect timeout and two tries per
request in the S3 client, a few seconds of the GCS client's own retries, then ours; a store
that cannot be reached is named by its endpoint.

Store URIs are checked for shape (`check_store_uri`: scheme, bucket, prefix) before any client
is made, so `s3://` or `gs:///prefix` is refused in one line without a request.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dtm_ray.errors import (
    ConfigError,
    first_line,
    is_persistent,
    os_error_of,
    storage_error,
)
from dtm_ray.records.schemas import (
    PROBE_SCHEMA,
    REFERENCE_SCHEMA,
    ROLE_FOLDERS,
    STATUS_OK,
    dedupe_probes,
    probe_keys,
)
from dtm_ray.redact import MASK, PATTERNS, redact, redact_data, secret_values

_TEMP_PREFIX = "."
# Waits between tries of a write that failed transiently: about 15 s in all before giving up.
RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)
_ROUND_OF_FILE = re.compile(r"(?:part-r|round-)(\d+)")


# Tries the S3 client makes per request before our own retries (RETRY_DELAYS_S) take over. Its
# default retries every request of an operation with long pauses (about 6 s per failed write
# against an endpoint that refuses connections), which multiplied by ours would hold a run for
# minutes before it reports a store that is gone.
S3_ATTEMPTS = 2
# How long a store client waits for a connection (S3: pyarrow's and boto3's clients).
CONNECT_TIMEOUT_S = 5.0
# How long the GCS client retries one request by itself before ours take over (its default is
# 15 minutes, which holds a run on an unreachable store far past any timeout around it).
GCS_RETRY_LIMIT_S = 3

T = TypeVar("T")


def retrying(operation: str, what: str, action: Callable[[], T], endpoint: str | None = None) -> T:
    """Run a storage action (a write, read, delete, listing), retrying transient failures with
    bounded backoff (RETRY_DELAYS_S); a persistent failure (no space, no permission, no bucket,
    bad credentials), or a transient one that outlasts the retries, raises StorageError "cannot
    {operation} {what}: {cause}" (the store's `endpoint` named when it could not be reached).
    Every writer of dtm_ray goes through here: run tables, exports, reports, the model cache.
    An error that is no storage failure (not an OSError, nor a library's report of one)
    passes through unchanged."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - mapped below, or raised as it is
            failure = os_error_of(err)
            if failure is None:
                raise
            if delay is None or is_persistent(failure):
                raise storage_error(failure, operation, what, endpoint) from err
            time.sleep(delay)
    raise AssertionError("unreachable")


# --- store URIs -------------------------------------------------------------------------------
STORE_SCHEMES = ("s3", "gs", "gcs")
# S3's and GCS's bucket names (S3's older ones with upper case and underscores included).
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,220}[A-Za-z0-9]$")


def check_store_uri(uri: str, what: str = "run dir") -> None:
    """Refuse, in one line and before any client exists, a URI of the wrong shape: a scheme
    other than s3://, gs://, gcs:// or file://, a missing or malformed bucket, empty, `.` or
    `..` parts in the prefix. A local path (no `://`) passes; what the store holds is not
    checked (that needs the store)."""
    if "://" not in uri:
        return
    scheme, _, rest = uri.partition("://")
    path, _, _query = rest.partition("?")
    if scheme == "file":
        if not path.startswith("/"):
            raise ConfigError(
                f"{what} {uri}: a file:// URI takes an absolute path (file:///abs/path); "
                "a plain path works too"
            )
        return
    if scheme not in STORE_SCHEMES:
        raise ConfigError(
            f"{what} {uri}: {scheme}:// is not a supported store; use s3://bucket/prefix, "
            "gs://bucket/prefix, file:///abs/path or a local path"
        )
    authority, _, prefix = path.partition("/")
    bucket = authority.rpartition("@")[2]  # s3://KEY:SECRET@bucket/… is pyarrow's too
    example = f"{scheme}://bucket/prefix"
    if not bucket:
        raise ConfigError(f"{what} {uri.split('?', 1)[0]} names no bucket; expected {example}")
    if not _BUCKET.match(bucket):
        raise ConfigError(
            f"{what} {uri.split('?', 1)[0]}: {bucket!r} is not a bucket name (3 to 222 letters, "
            "digits, dots, hyphens or underscores, starting and ending with a letter or digit)"
        )
    parts = prefix.rstrip("/").split("/") if prefix.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(
            f"{what} {uri.split('?', 1)[0]}: its prefix {prefix!r} has an empty, '.' or '..' "
            f"part; expected {example}"
        )


def _split_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # from_uri wants a scheme or an absolute path; a plain relative path means "here".
    if "://" not in uri:
        uri = os.path.abspath(uri)
    check_store_uri(uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except ValueError as err:  # ArrowInvalid: an option in the query it does not know
        raise ConfigError(f"{uri}: {first_line(err)}") from None
    if isinstance(fs, pafs.S3FileSystem):
        fs = _s3_filesystem(fs, uri)
    elif type(fs).__name__ == "GcsFileSystem" and "retry_limit_seconds=" not in uri:
        fs = _gcs_filesystem(fs)
    return fs, root


def open_filesystem(uri: str, what: str = "store URI") -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a local path or URI, with the endpoint, credential and retry
    handling of run directories (models in object stores are read the same way). A URI of the
    wrong shape is a ConfigError naming it as `what` before any client is made."""
    check_store_uri(uri, what)
    return _split_uri(uri)


def store_endpoint(fs: Any) -> str | None:
    """Where a store filesystem sends its requests, for messages: `scheme://host[:port]`, or
    None for a local filesystem."""
    if isinstance(fs, pafs.S3FileSystem):
        options = fs.__reduce__()[1][0]
        host = options.get("endpoint_override") or f"s3.{options.get('region') or 'us-east-1'}"
        if "://" in host:
            return host
        if not options.get("endpoint_override"):
            host += ".amazonaws.com"
        return f"{options.get('scheme') or 'https'}://{host}"
    if type(fs).__name__ == "GcsFileSystem":
        options = fs.__reduce__()[1][0]
        host = options.get("endpoint_override") or "storage.googleapis.com"
        return host if "://" in host else f"{options.get('scheme') or 'https'}://{host}"
    return None


def join_uri(uri: str, *parts: str) -> str:
    """`uri` with path parts appended before its query (`s3://b/run?endpoint_override=…`)."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def _s3_filesystem(fs: pafs.S3FileSystem, uri: str) -> pafs.S3FileSystem:
    """The S3 filesystem `from_uri` made, with a connect timeout, bounded client retries and,
    when the URI names no endpoint, the one in AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (the AWS
    SDKs' convention for S3-compatible stores, which pyarrow does not read by itself)."""
    options = dict(fs.__reduce__()[1][0])  # the options it was made with (pickling support)
    if not options.get("proxy_options", {}).get("host"):
        options.pop("proxy_options", None)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_override=" not in uri:
        scheme, _, host = endpoint.rpartition("://")
        options["endpoint_override"] = host.rstrip("/")
        if scheme:
            options["scheme"] = scheme
    if options.get("connect_timeout", -1) <= 0:
        options["connect_timeout"] = CONNECT_TIMEOUT_S
    retries = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
    return pafs.S3FileSystem(**options, retry_strategy=retries)


def _gcs_filesystem(fs: Any) -> Any:
    """The GCS filesystem `from_uri` made, its own retries bounded to GCS_RETRY_LIMIT_S."""
    options = dict(fs.__reduce__()[1][0])
    options["retry_time_limit"] = timedelta(seconds=GCS_RETRY_LIMIT_S)
    return type(fs)._reconstruct(options)


def _is_visible_data_file(name: str) -> bool:
    return name.endswith(".parquet") and not name.startswith((_TEMP_PREFIX, "_"))


def _redacted(table: pa.Table) -> pa.Table:
    """The table with secrets masked in its text columns (errors, workers, names), with Arrow's
    vectorized string kernels (a compaction redacts thousands of rows)."""
    secrets = secret_values()
    for i, field in enumerate(table.schema):
        if not pa.types.is_string(field.type) and not pa.types.is_large_string(field.type):
            continue
        column = table.column(i)
        for value in secrets:
            column = pc.replace_substring(column, value, MASK)
        for pattern, replacement in PATTERNS:
            column = pc.replace_substring_regex(column, pattern, replacement)
        table = table.set_column(i, field, column)
    return table


def _round_file(round_: int) -> str:
    return f"round-{round_:03d}.parquet"


class RunStore:
    """One run directory. Cheap to create; touches storage only when a method is called."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = _split_uri(uri)
        self.endpoint = store_endpoint(self.fs)  # named when the store cannot be reached
        self.fingerprint: str | None = None  # the run's config fingerprint, stamped on rows

    @property
    def location(self) -> str:
        """Where the run lives, unambiguously: the URI, or the absolute local path."""
        return self.uri if "://" in self.uri else self.root

    @property
    def is_local(self) -> bool:
        """Whether the run dir is a local path (files there can be renamed; others are objects)."""
        return "://" not in self.uri or self.uri.startswith("file://")

    def child_uri(self, folder: str) -> str:
        """The URI (or local path) of a folder inside the run dir, with the run dir's query
        (endpoint, region) kept, so `RunStore(child_uri)` reaches the same store."""
        if "://" not in self.uri:
            return self._path(folder)
        base, sep, query = self.uri.partition("?")
        return f"{base.rstrip('/')}/{folder}{sep}{query}"

    # --- paths and raw I/O -----------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        return self._retrying("read", path, lambda: self._exists_once(path))

    def _exists_once(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _retrying(self, operation: str, path: str, action: Callable[[], T]) -> T:
        """Run a storage action with `retrying`'s retries; StorageError naming the file and the
        run dir when it cannot."""
        relative = path.removeprefix(self.root.rstrip("/") + "/")
        what = f"run dir {self.location}"
        if path.rstrip("/") != self.root.rstrip("/"):
            what = f"{relative} in {what}"
        return retrying(operation, what, action, self.endpoint)

    def _write_atomically(self, path: str, write: Callable[[Any], None]) -> None:
        self._retrying("write", path, lambda: self._write_once(path, write))

    def _write_once(self, path: str, write: Callable[[Any], None]) -> None:
        folder, _, name = path.rpartition("/")
        self.fs.create_dir(folder, recursive=True)
        temp = f"{folder}/{_TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with self.fs.open_output_stream(temp) as stream:
                write(stream)
            self.fs.move(temp, path)
        except BaseException:
            try:  # no half-written file stays behind, not even a hidden one
                if self._exists_once(temp):
                    self.fs.delete_file(temp)
            except OSError:
                pass  # the write's own error is the one to report
            raise

    def _delete_file(self, path: str) -> None:
        self._retrying("delete", path, lambda: self.fs.delete_file(path))

    def _write_table(self, path: str, table: pa.Table) -> None:
        table = _redacted(table)
        self._write_atomically(path, lambda stream: pq.write_table(table, stream))

    def _data_files(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(self._path(folder), allow_not_found=True)
        infos = self._list(self._path(folder), selector)
        files = (i for i in infos if i.type == pafs.FileType.File)
        return sorted(i.path for i in files if _is_visible_data_file(i.base_name))

    def _list(self, path: str, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._retrying("list", path, lambda: self.fs.get_file_info(selector))

    def _read_bytes(self, path: str) -> pa.Buffer:
        with self.fs.open_input_file(path) as handle:
            return handle.read_buffer()

    def _read_file(self, path: str, schema: pa.Schema, rows: bool = True) -> pa.Table:
        """One table file (only its schema checked when not `rows`); a corrupt or foreign file
        is a one-line error naming it."""
        # The bytes first, through the retries: a store that is unreachable is a StorageError
        # (resume once it is back), not a file to move away. Probe files are small; a round's
        # compacted file is read whole anyway.
        data = self._retrying("read", path, lambda: self._read_bytes(path))
        try:
            with pa.BufferReader(data) as handle:
                names = pq.read_schema(handle).names
                # A file of this table has at least its key columns; read with the table's
                # schema, a foreign file would otherwise come back as rows of nulls.
                missing = [n for n in schema.names[:2] if n not in names]
                if missing:
                    raise ValueError(f"it has no {missing[0]!r} column")
                if not rows:
                    return schema.empty_table()
                handle.seek(0)
                return pq.read_table(handle, schema=schema)
        except (pa.ArrowException, ValueError, OSError) as err:
            raise ConfigError(
                f"{path} is not a readable table of this run ({first_line(err)}); "
                "move it out of the run directory and run again (a probe file's probes then "
                "run again)"
            ) from None

    def check_files(self, schemas: Mapping[str, pa.Schema]) -> None:
        """Open every table file of the folders in `schemas` (folder -> schema), schemas only,
        so a corrupt or foreign file is found before any work starts."""
        for folder, schema in schemas.items():
            for path in self._data_files(folder):
                self._read_file(path, schema, rows=False)

    def _read_files(self, paths: Sequence[str], schema: pa.Schema) -> pa.Table:
        tables = [self._read_file(p, schema) for p in paths]
        return pa.concat_tables(tables) if tables else schema.empty_table()

    # --- run.json ---------------------------------------------------------------------------
    def read_run_info(self) -> dict[str, Any] | None:
        info = self.read_json("run.json")
        if info is not None and not isinstance(info.get("config"), dict):
            raise ConfigError(
                f"{self._path('run.json')} is not a dtm-ray run.json (no 'config'); "
                "choose another --out, or move the file away"
            )
        return info

    def read_json(self, name: str) -> dict[str, Any] | None:
        """A JSON object file at the run's root (None when absent); a broken one is a one-line
        error naming it."""
        path = self._path(name)
        if not self._exists(path):
            return None
        raw = self._retrying("read", path, lambda: self._read_bytes(path)).to_pybytes()
        try:
            data = json.loads(raw.decode())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(
                f"{path} is not valid JSON ({first_line(err)}); restore it, or move the run "
                "directory away and choose another --out"
            ) from None
        if not isinstance(data, dict):
            kind = type(data).__name__
            raise ConfigError(f"{path} holds a JSON {kind}, not an object; move it away")
        return data

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        text = json.dumps(redact_data(data), indent=2, sort_keys=True, default=str).encode()
        self._write_atomically(self._path(name), lambda stream: stream.write(text))

    def delete(self, name: str) -> None:
        """Remove a file at the run's root, if there."""
        path = self._path(name)
        if self._exists(path):
            self._delete_file(path)

    def exists(self) -> bool:
        return self._exists(self.root)

    def holds_results(self) -> bool:
        """Whether anything was measured here: any table file at all."""
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        return any(
            i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
            for i in self._list(self.root, selector)
        )

    def remove_logs(self) -> None:
        """Delete `logs/` (the engines' output of a run that measured nothing)."""
        path = self._path("logs")
        if self._exists(path):
            self._retrying("delete", path, lambda: self.fs.delete_dir(path))

    def remove_root_if_empty(self) -> None:
        """Delete the run directory itself when nothing is left in it."""
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        if self._exists(self.root) and not self._list(self.root, selector):
            self._retrying("delete", self.root, lambda: self.fs.delete_dir(self.root))

    def open_run(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
        """run.json of this run: the stored one on resume (comparing configs is the caller's
        job), else a new one holding `config` and `info` (versions, hardware, created time)."""
        stored = self.read_run_info()
        if stored is not None:
            return stored
        run_info = {"config": dict(config), **info}
        self.write_json("run.json", run_info)
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

    def write_reference(self, table: pa.Table, round_: int, role: str = "decide") -> None:
        """A round's reference; `role` validate or test: the dense model's on those prompts
        (round 0 only)."""
        self.write_round_table(ROLE_FOLDERS[role], round_, table.cast(REFERENCE_SCHEMA))

    def read_reference(self, round_: int, role: str = "decide") -> pa.Table | None:
        table = self.read_round_table(ROLE_FOLDERS[role], REFERENCE_SCHEMA, round_)
        return None if table is None else table.sort_by("prompt_id")

    # --- probes ----------------------------------------------------------------------------
    def write_probe_rows(self, rows: Sequence[Mapping[str, Any]], round_: int) -> str | None:
        """Write one new Parquet file holding `rows` of `round_`; returns its path. Rows carry
        the run's `fingerprint` (set by the driver once the run is open)."""
        if not rows:
            return None
        stamp = {"config_fingerprint": self.fingerprint} if self.fingerprint else {}
        table = pa.Table.from_pylist([{**r, **stamp} for r in rows], schema=PROBE_SCHEMA)
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

    def finished_probes(self, round_: int, failed: bool = True) -> set[tuple[str, str]]:
        """(component, spec) of every probe of `round_` already in the table: ok ones, and
        failed ones too unless `failed` is False (then a resume probes those again)."""
        table = self.read_probes(round_=round_)
        statuses = table.column("status").to_pylist()
        return {
            (c, s)
            for (r, c, s), status in zip(probe_keys(table), statuses, strict=True)
            if r == round_ and (failed or status == STATUS_OK)
        }

    def failed_attempts(self, round_: int) -> dict[tuple[str, str], int]:
        """Tries already spent on each failed probe of `round_`, so a retry keeps counting."""
        table = self.read_probes(round_=round_)
        rows = zip(
            probe_keys(table),
            table.column("status").to_pylist(),
            table.column("attempts").to_pylist(),
            strict=True,
        )
        return {(c, s): a or 0 for (r, c, s), status, a in rows if status != STATUS_OK}

    def compact_probes(self, round_: int) -> None:
        """Merge a round's part files into `probes/round-NNN.parquet` (deduped), then delete
        the parts."""
        parts = [p for p in self._probe_files_of(round_) if "/part-" in p]
        if not parts:
            return
        table = self.read_probes(round_=round_)
        self.write_round_table("probes", round_, table)
        for path in parts:
            self._delete_file(path)

    # --- tables by name (a compare run's `compare/`) -----------------------------------------
    def write_table(self, name: str, table: pa.Table) -> None:
        """Write the table file `name` (a `.parquet` path inside the run dir), atomically."""
        self._write_table(self._path(name), table)

    def read_table(self, name: str, schema: pa.Schema) -> pa.Table | None:
        """The table file `name`, or None when it is not written yet."""
        path = self._path(name)
        return self._read_file(path, schema) if self._exists(path) else None

    def read_folder(self, folder: str, schema: pa.Schema) -> pa.Table:
        """Every table file in `folder`, concatenated in name order (empty when none)."""
        return self._read_files(self._data_files(folder), schema)

    def table_names(self, folder: str) -> list[str]:
        """The names of the table files in `folder`, sorted."""
        return [path.rpartition("/")[2] for path in self._data_files(folder)]

    # --- final -----------------------------------------------------------------------------
    def write_final(self, name: str, table: pa.Table) -> None:
        self._write_table(self._path("final", name, "data.parquet"), table)

    def read_final(self, name: str, schema: pa.Schema) -> pa.Table | None:
        path = self._path("final", name, "data.parquet")
        return self._read_file(path, schema) if self._exists(path) else None

    def put_file(self, local: str | os.PathLike[str], name: str) -> None:
        """Copy a local file to `name` (a path inside the run dir), streamed in pieces. An object
        store shows an object only once its upload completes, so it is written in place (a
        move there is a server-side copy of the whole object); a local file goes through a
        temporary name."""
        path = self._path(name)

        def write(stream: Any) -> None:
            with open(local, "rb") as source:
                while chunk := source.read(16 << 20):
                    stream.write(chunk)

        if self.is_local:
            self._write_atomically(path, write)
            return

        def upload() -> None:
            self.fs.create_dir(path.rpartition("/")[0], recursive=True)
            with self.fs.open_output_stream(path) as stream:
                write(stream)

        self._retrying("write", path, upload)

    def clear_folder(self, folder: str) -> None:
        """Delete everything in `folder` (inside the run dir), if there."""
        path = self._path(folder)
        if self._exists(path):
            self._retrying("empty", path, lambda: self.fs.delete_dir_contents(path))

    def folder_files(self, folder: str) -> list[str]:
        """The files in `folder`, recursively, by path relative to it."""
        selector = pafs.FileSelector(self._path(folder), recursive=True, allow_not_found=True)
        base = self._path(folder).rstrip("/") + "/"
        infos = self._list(self._path(folder), selector)
        return sorted(i.path.removeprefix(base) for i in infos if i.type == pafs.FileType.File)

    def replace_files(self, folder: str, files: Mapping[str, str]) -> None:
        """Make `folder` hold exactly `files` (name -> text), e.g. lm-eval's per-example output."""
        path = self._path(folder)
        if self._exists(path):
            self._retrying("empty", path, lambda: self.fs.delete_dir_contents(path))
        for name, text in files.items():
            data = redact(text).encode()
            self._write_atomically(self._path(folder, name), lambda stream, d=data: stream.write(d))

    # --- recovery bases ----------------------------------------------------------------------
    def base_location(self, round_: int) -> str:
        """Where recovery round `round_` writes its base: a folder engines and export read."""
        return join_uri(self.location, "base", f"round-{round_:03d}")

    def _base_path(self, round_: int, name: str) -> str:
        return self._path("base", f"round-{round_:03d}", name)

    def write_base_file(self, round_: int, name: str, local_file: str) -> None:
        """Copy a local file into round `round_`'s base folder (temp name, then renamed)."""
        path = self._base_path(round_, name)

        def write(stream: Any) -> None:
            with open(local_file, "rb") as source:
                while chunk := source.read(1 << 24):
                    stream.write(chunk)

        self._write_atomically(path, write)

    def train_location(self) -> tuple[pafs.FileSystem, str]:
        """(filesystem, path) of `train/`, where Ray Train keeps its checkpoints."""
        return self.fs, self._path("train")
