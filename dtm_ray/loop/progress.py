"""How results reach the run directory and the user while a round runs: buffered probe rows
written as one Parquet file per flush, a progress bar or periodic lines, and log lines."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dtm_ray.records.store import RunStore


@dataclass(frozen=True)
class Streaming:
    """How a round's results stream out: the one home of these defaults."""

    flush_every: int = 4  # rows per Parquet file
    flush_seconds: float = 30.0  # ... or sooner, when results are slow
    progress_interval: float = 15.0  # seconds between progress lines when not on a terminal


class ProbeWriter:
    """Buffers one round's rows and writes one Parquet file per flush: every `every` rows,
    every `seconds` seconds, and at close. A killed driver loses at most the unflushed rows,
    which a resume simply probes again."""

    def __init__(self, store: RunStore, round_: int, every: int, seconds: float) -> None:
        self.store = store
        self.round = round_
        self.every = max(1, every)
        self.seconds = seconds
        self._rows: list[Mapping[str, Any]] = []
        self._last_flush = time.monotonic()

    def add(self, row: Mapping[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.every:
            self.flush()

    def flush_if_due(self) -> None:
        if self._rows and time.monotonic() - self._last_flush >= self.seconds:
            self.flush()

    def flush(self) -> None:
        self.store.write_probe_rows(self._rows, self.round)
        self._rows = []
        self._last_flush = time.monotonic()


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, `ray job submit`) a line every `interval` s."""

    def __init__(
        self, total: int, done: int, interval: float, label: str = "probes"
    ) -> None:
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
