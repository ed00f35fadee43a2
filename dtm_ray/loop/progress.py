"""How results reach the run directory and the user while a round runs: buffered probe rows
written as one Parquet file per flush, a progress bar or periodic lines, and log lines."""

from __future__ import annotations

import queue
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dtm_ray.records.store import RunStore


@dataclass(frozen=True)
class Streaming:
    """How a round's results stream out: the one home of these defaults."""

    # Rows go to the run directory as one Parquet file per flush, every `flush_every` rows or
    # `flush_seconds` after the last flush, whichever comes first, and at the end of a round. On
    # an object store a file costs several requests, so files are few and large at speed, yet
    # `dtm-ray show` sees new rows within seconds while a run is slow.
    flush_every: int = 256  # rows per Parquet file at most
    flush_seconds: float = 5.0  # ... or sooner, when results are slow
    progress_interval: float = 15.0  # seconds between progress lines when not on a terminal


# Flushes handed to the writer thread and not yet written; when it falls this far behind, the
# driver waits for it rather than holding ever more rows in memory.
WRITER_QUEUE = 4


class ProbeWriter:
    """Buffers one round's rows and writes one Parquet file per flush: every `every` rows,
    every `seconds` seconds, and at close. Files are written by one background thread, so the
    driver's loop never waits on storage (unless the thread is WRITER_QUEUE flushes behind).
    A killed driver loses at most the rows not yet written, which a resume simply probes again;
    `close` (also on Ctrl-C and SIGTERM, from the round's `finally`) writes every row handed in
    before it returns. A write that fails (StorageError) is raised on the driver by the next
    `add`, `flush_if_due` or `close`; rows after it are not written (a resume probes them)."""

    def __init__(self, store: RunStore, round_: int, every: int, seconds: float) -> None:
        self.store = store
        self.round = round_
        self.every = max(1, every)
        self.seconds = seconds
        self._rows: list[Mapping[str, Any]] = []
        self._last_flush = time.monotonic()
        self._queue: queue.Queue[list[Mapping[str, Any]] | None] = queue.Queue(WRITER_QUEUE)
        self._error: BaseException | None = None
        self._raised = False
        self._closed = False
        self._thread = threading.Thread(target=self._write, name="probe-writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while (rows := self._queue.get()) is not None:
            if self._error is not None:
                continue  # storage failed: the run ends; keep taking so the driver never blocks
            try:
                self.store.write_probe_rows(rows, self.round)
            except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
                self._error = err

    def _check(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def add(self, row: Mapping[str, Any]) -> None:
        self._check()
        self._rows.append(row)
        if len(self._rows) >= self.every:
            self.flush()

    def flush_if_due(self) -> None:
        self._check()
        if self._rows and time.monotonic() - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered rows to the writer thread (a file of their own)."""
        if self._rows:
            self._queue.put(self._rows)
        self._rows = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Write every row handed in, stop the thread, and raise its error if it had one."""
        if not self._closed:
            self._closed = True
            self.flush()
            self._queue.put(None)
        self._thread.join()
        self._check()


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, `ray job submit`) a line every `interval` s."""

    def __init__(self, total: int, done: int, interval: float, label: str = "probes") -> None:
        self.total, self.done, self.interval, self.label = total, done, interval, label
        self._start_done = done
        self._start = time.monotonic()
        self._last_line = self._start
        self._printed = -1
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            # Some terminals report a 0x0 size, which makes tqdm draw nothing; shutil falls back
            # to $COLUMNS/$LINES or 80x24 there.
            size = shutil.get_terminal_size()
            self._bar = tqdm(
                total=total,
                initial=done,
                unit="probe",
                ncols=size.columns,
                nrows=size.lines,
                desc=label,
            )

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif time.monotonic() - self._last_line >= self.interval:
            self._print_line()

    def _print_line(self) -> None:
        elapsed = time.monotonic() - self._start
        ran = self.done - self._start_done
        rate = ran / elapsed if elapsed > 0 else 0.0
        left = self.total - self.done
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"{self.label} {self.done}/{self.total} ({pct:.0f}%), {rate:.2f}/s, ETA {eta}",
            file=sys.stderr,
            flush=True,
        )
        self._last_line = time.monotonic()
        self._printed = self.done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._printed != self.done:
            self._print_line()
