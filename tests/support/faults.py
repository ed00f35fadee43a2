"""Storage faults for the failure tests: a pyarrow filesystem that fails the calls it is told to,
installed under every RunStore made afterwards (in the test process, or in a driver process
started by support/driver_with_faults.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from dtm_ray.records import store as store_module

# What S3 says when a request times out: a transient error the store retries.
TRANSIENT = "AWS Error NETWORK_CONNECTION during PutObject operation: Timeout was reached"

Fail = Callable[[str, str], OSError | None]


class FaultyFS:
    """A pyarrow filesystem that fails the calls `fail(method, path)` says should fail."""

    FAULTY = ("create_dir", "open_output_stream", "move", "delete_file", "delete_dir")

    def __init__(self, fs: pafs.FileSystem, fail: Fail) -> None:
        self._fs, self.fail = fs, fail

    def __getattr__(self, name: str):  # noqa: ANN204
        method = getattr(self._fs, name)
        if name not in self.FAULTY:
            return method

        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            err = self.fail(name, str(args[0]) if args else "")
            if err is not None:
                raise err
            return method(*args, **kwargs)

        return call


def faulty_split(fail: Fail) -> Callable[[str], tuple[FaultyFS, str]]:
    """A replacement for the store's `_split_uri` that wraps each filesystem in FaultyFS."""
    real = store_module._split_uri

    def split(uri: str) -> tuple[FaultyFS, str]:
        fs, root = real(uri)
        return FaultyFS(fs, fail), root

    return split


def every_nth_write(n: int, error: Callable[[], OSError]) -> Fail:
    """Fail every n-th opened output stream."""
    count = {"writes": 0}

    def fail(method: str, path: str) -> OSError | None:
        if method != "open_output_stream":
            return None
        count["writes"] += 1
        return error() if count["writes"] % n == 0 else None

    return fail


def once_at_write(n: int, error: Callable[[], OSError], seen: Callable[[str], None]) -> Fail:
    """Fail the n-th opened output stream only; `seen(path)` is told which one it was."""
    count = {"writes": 0}

    def fail(method: str, path: str) -> OSError | None:
        if method != "open_output_stream":
            return None
        count["writes"] += 1
        if count["writes"] != n:
            return None
        seen(path)
        return error()

    return fail


def small_probe_files(rows: int) -> type:
    """The round's probe writer with files of at most `rows` rows (the default is hundreds), so a
    test can stop or fail a run with part of a round written; set it as `rounds.ProbeWriter`."""
    from dtm_ray.loop import rounds

    class SmallFiles(rounds.ProbeWriter):
        def __init__(self, store, round_: int, every: int, seconds: float) -> None:
            super().__init__(store, round_, min(every, rows), seconds)

    return SmallFiles


def mount_tmpfs(folder: Path, size: str) -> bool:
    """A small disk of its own at `folder` (tmpfs, `size` as mount takes it), to be filled up;
    False where this process may not mount (not root, no mount command)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    folder.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    return done.returncode == 0
