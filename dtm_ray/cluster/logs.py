"""Quiet output: the user sees dtm-ray's own lines; the engines' chatter goes to a log file.

vLLM, transformers and Ray print dozens of start-up lines (Triton, tcmalloc, NUMA, deprecation
notes, loading bars). Almost all of them are printed inside the engine actors, and Ray forwards
every actor's stdout/stderr to the driver, where its printer ("ray_print_logs", installed by
`ray.init(log_to_driver=True)`) writes them with a coloured "(EngineActor pid=…)" prefix. While
`engine_logs(path)` is active that printer is swapped for one that writes each line, without
colour, to `path`; lines the actors print with the `dtm-ray:` prefix (our own warnings, e.g. an
actor restarting itself) still reach stderr, and `verbose=True` sends everything there as well.
Ray's own driver-side logger ("Started a local Ray instance", token-auth notes) goes to the same
file, and so do the cluster's error notices (a raylet that died, with the last 20 lines of its
log): the user sees their first line, the file keeps them whole. Forwarding stays on
(`log_to_driver`), so this works alike for a local Ray, for a cluster joined through RAY_ADDRESS
and under `ray job submit`, whose `ray job logs` then show the same quiet stream.

Ray's printer is private API (`ray._private.ray_logging`); if it moves, `engine_logs` leaves
Ray's own printer in place and only the file handler on the "ray" logger is added.

The hand-back races Ray's threads: the log thread may hold our printer (a `ray.init` made while
ours was in place binds it into Ray's own handler) and deliver a notice after the block ended.
So `_print_notice` reads the active log once, and without one hands the notice to Ray's own
printer, whose reference is kept for good (never cleared); take-over and hand-back run one at a
time under a lock, Ray's printer restored first.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from dtm_ray.redact import redact

RAY_PRINTER = "ray_print_logs"  # the handler name ray.init gives its worker-log printer
OUR_PRINTER = "dtm_ray_engine_log"
OWN_PREFIX = "dtm-ray:"  # lines actors print for the user
ENGINE_LOG = "engines.log"  # the file name inside the run's log folder


class EngineLog:
    """Receives Ray's batches of forwarded worker lines and writes them to one file, opened on
    the first line (a run refused before any engine starts leaves no log behind)."""

    def __init__(self, path: Path, verbose: bool, echo: TextIO | None = None) -> None:
        self.path = path
        self.verbose = verbose
        self.echo = echo  # where user-facing lines go (default: sys.stderr at call time)
        self._file: TextIO | None = None
        self._lock = threading.Lock()
        self.announced = False  # the user was told where the file is
        self.failed = False  # the file could not be written; nothing more is tried
        self.closed = False  # the block ended: late lines are not written (nor the file reopened)

    def handle(self, data: dict[str, Any]) -> None:
        """One batch from Ray: {"pid", "actor_name" | "task_name", "lines", "is_err", ...}."""
        name = data.get("actor_name") or data.get("task_name") or ""
        pid = data.get("pid", "?")
        prefix = f"({name} pid={pid})" if name else f"({pid})"
        lines = [
            redact(line)
            for line in data.get("lines", [])
            # ray.experimental.tqdm_ray sends its bar state as JSON lines: not text.
            if not (line.startswith("{") and "__ray_tqdm_magic_token__" in line)
        ]
        self._append([f"{prefix} {line}" for line in lines])
        for line in lines:
            if self.verbose or line.lstrip().startswith(OWN_PREFIX):
                print(f"{prefix} {line}", file=self.echo or sys.stderr, flush=True)

    def write(self, lines: list[str]) -> None:
        """Append lines (secrets masked) to the file."""
        self._append([redact(line) for line in lines])

    def _append(self, lines: list[str]) -> None:
        with self._lock:
            if self.failed or self.closed:
                return
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = self.path.open("a", encoding="utf-8")
                self._file.writelines(f"{line}\n" for line in lines)
                self._file.flush()
            except OSError as err:
                # The log must never end a run (its disk may be full); say so once, stop writing.
                self.failed = True
                print(
                    f"dtm-ray: warning: cannot write {self.path} ({err}); engine output is not "
                    "kept from here on",
                    file=self.echo or sys.stderr,
                    flush=True,
                )

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass  # reported when the write failed
                self._file = None


class _ToEngineLog(logging.Handler):
    """Records of Ray's driver-side "ray" logger, written into the engine log."""

    def __init__(self, sink: EngineLog) -> None:
        super().__init__()
        self.sink = sink
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write([self.format(record)])
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def _dispatcher() -> Any | None:
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


_active: EngineLog | None = None
_ray_printer: tuple[str, Any] | None = None  # Ray's handler while ours replaces it
# Ray's own printer of cluster notices, once seen. Kept for good: a notice may reach
# `_print_notice` after the hand-back (Ray's log threads hold it), and is then handed to it.
_ray_notices: Any = None
_swap = threading.Lock()  # take-over and hand-back, one at a time


def _print_notice(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    """Ray's `print_to_stdstream` for the cluster's error notices (pid "raylet"): into the
    engine log whole, to the user as one line. Anything else, and anything after the hand-back,
    goes to Ray's own printer. Never raises: it runs in Ray's log threads."""
    active = _active  # read once: the hand-back may clear it meanwhile
    if active is None or active.closed or data.get("pid") != "raylet":
        _ray_print(data, ignore_prefix)
        return
    try:
        lines = [ln for text in data.get("lines", []) for ln in text.splitlines() if ln.strip()]
        active.handle({**data, "lines": lines})
        if lines and not active.verbose:
            # The first sentences say what happened; Ray's guesses at why follow.
            first = re.split(r"\s+(?:Possible reasons|This can happen)", lines[0])[0].strip()
            print(
                f"dtm-ray: ray: {redact(first)} (details in {active.path})",
                file=active.echo or sys.stderr,
                flush=True,
            )
    except Exception:  # noqa: BLE001 - a notice must never end Ray's thread; Ray's printer has it
        _ray_print(data, ignore_prefix)


def _ray_print(data: dict[str, Any], ignore_prefix: bool) -> None:
    """Ray's own printer, or the lines as they are where it is unknown."""
    printer = _ray_notices
    if printer is None or printer is _print_notice:
        worker = _notice_module()
        printer = getattr(worker, "print_to_stdstream", None)
    if printer is None or printer is _print_notice:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in data.get("lines", []):
            print(line, file=sink, flush=True)
        return
    printer(data, ignore_prefix)


def _notice_module() -> Any | None:
    try:
        import ray._private.worker as worker
    except ImportError:
        return None
    return worker if hasattr(worker, "print_to_stdstream") else None


def take_over_ray_output(announce: bool = True) -> None:
    """Swap Ray's worker-log printer for the active EngineLog. Call after `ray.init` (which
    installs Ray's printer); a no-op outside `engine_logs`. `announce`: tell the user, once,
    where the engine output goes (when engines start)."""
    global _ray_printer, _ray_notices
    active = _active
    dispatcher = _dispatcher()
    if active is None or dispatcher is None:
        return
    with _swap:
        with dispatcher._lock:
            for pair in dispatcher.handlers:
                if pair[0] == RAY_PRINTER:
                    _ray_printer = pair
            handlers = [p for p in dispatcher.handlers if p[0] not in (RAY_PRINTER, OUR_PRINTER)]
            dispatcher.handlers = [*handlers, (OUR_PRINTER, active.handle)]
        worker = _notice_module()
        if worker is not None and worker.print_to_stdstream is not _print_notice:
            _ray_notices = worker.print_to_stdstream  # set before ours is reachable
            worker.print_to_stdstream = _print_notice
    if announce and not active.announced:
        active.announced = True
        hint = "" if active.verbose else " (--verbose shows it)"
        print(f"dtm-ray: engine output goes to {active.path}{hint}", file=sys.stderr, flush=True)


def _give_back_ray_output() -> None:
    global _ray_printer
    with _swap:
        worker = _notice_module()
        if worker is not None and worker.print_to_stdstream is _print_notice:
            # Ray's printer first; `_ray_notices` stays, for notices already on their way to ours.
            worker.print_to_stdstream = _ray_notices or worker.print_to_stdstream
        dispatcher = _dispatcher()
        if dispatcher is None:
            return
        with dispatcher._lock:
            handlers = [p for p in dispatcher.handlers if p[0] != OUR_PRINTER]
            # Ray removes its printer itself at ray.shutdown(); put it back only while Ray runs.
            if _ray_printer is not None and _ray_connected():
                handlers.append(_ray_printer)
            dispatcher.handlers = handlers
        _ray_printer = None


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


@contextmanager
def engine_logs(path: Path, verbose: bool = False) -> Iterator[EngineLog]:
    """Within the block, forwarded actor output and Ray's driver logger go to `path`."""
    global _active
    import ray  # noqa: F401 - importing Ray sets up its "ray" logger, which is changed below

    sink = EngineLog(path, verbose)
    ray_logger = logging.getLogger("ray")
    file_handler = _ToEngineLog(sink)
    saved_handlers, saved_propagate = list(ray_logger.handlers), ray_logger.propagate
    if verbose:
        ray_logger.addHandler(file_handler)
    else:
        ray_logger.handlers = [file_handler]
        ray_logger.propagate = False
    _active = sink
    take_over_ray_output(announce=False)  # Ray may be running already (a notebook, the tests)
    try:
        yield sink
    finally:
        _give_back_ray_output()
        _active = None
        ray_logger.handlers, ray_logger.propagate = saved_handlers, saved_propagate
        sink.close()


def local_log_dir(run_uri: str) -> Path:
    """Where a run's logs go: RUN/logs for a local run dir; for s3:// or gs:// a local folder
    named after the run (logs are written line by line, which object stores do not do)."""
    if "://" not in run_uri or run_uri.startswith("file://"):
        return Path(run_uri.removeprefix("file://")) / "logs"
    # The bucket and key only: a query (`?endpoint_override=…`) is no part of a folder name.
    safe = run_uri.split("://", 1)[1].split("?", 1)[0].strip("/").replace("/", "_")
    return Path("dtm-ray-logs") / safe
