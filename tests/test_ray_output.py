"""The hand-over of Ray's output (dtm_ray.cluster.logs): whatever arrives when, before, during or
after the hand-back, reaches a printer and never raises in Ray's threads."""

from __future__ import annotations

import functools
import threading

import pytest

from dtm_ray.cluster import logs


def _notice(n: int) -> dict:
    return {"lines": [f"notice {n}: the node 10.0.0.2 was marked dead"], "pid": "raylet"}


@pytest.fixture
def ray_printers(monkeypatch):
    """Ray's notice printer replaced by one that records what it is given, and the dispatcher's
    handlers restored afterwards; yields the record (the notices' first lines)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed: list[str] = []

    def ray_printer(data: dict, ignore_prefix: bool) -> None:
        printed.append(data["lines"][0])

    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_printer)
    monkeypatch.setattr(logs, "_ray_notices", None)
    monkeypatch.setattr(logs, "_ray_printer", None)
    handlers = list(dispatcher.handlers)
    yield printed
    dispatcher.handlers = handlers


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that end a thread, as Python's thread excepthook sees them."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def test_notices_before_during_and_after_the_hand_back_reach_a_printer(
    ray_printers, thread_errors, tmp_path, capsys
) -> None:
    import ray._private.worker as ray_worker

    log_file = tmp_path / "engines.log"
    with logs.engine_logs(log_file):
        # What `ray.init` binds while ours is in place: Ray's log thread then holds our printer,
        # also after the hand-back (Ray puts its handler back while it runs).
        held = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
        assert ray_worker.print_to_stdstream is logs._print_notice
        held(_notice(0))  # before: one line for the user, the notice in the log
    assert ray_worker.print_to_stdstream is not logs._print_notice  # Ray's printer is back
    held(_notice(1))  # after: Ray's own printer has it
    ray_worker.print_to_stdstream(_notice(2), ignore_prefix=False)

    # During: a thread delivers notices, by the held reference and as Ray's error listener does
    # (the module's printer), while the main thread takes over and hands back again and again.
    stop = threading.Event()
    sent = []

    def deliver() -> None:
        n = 100
        while not stop.is_set():
            held(_notice(n))
            ray_worker.print_to_stdstream(_notice(n + 1), ignore_prefix=False)
            sent.extend([n, n + 1])
            n += 2

    thread = threading.Thread(target=deliver, name="ray_print_logs")
    thread.start()
    try:
        for _ in range(300):
            with logs.engine_logs(log_file):
                pass
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert thread_errors == []
    assert len(sent) > 2

    err = capsys.readouterr().err
    # Before: the user's one line, and the whole notice in the log file.
    assert err.splitlines()[0] == (
        f"dtm-ray: ray: notice 0: the node 10.0.0.2 was marked dead (details in {log_file})"
    )
    assert "(raylet) notice 0:" in log_file.read_text()
    # After: Ray's printer; during: each notice exactly once, by ours or by Ray's.
    assert ray_printers[:2] == [_notice(1)["lines"][0], _notice(2)["lines"][0]]
    ours = {int(line.split()[3].rstrip(":")) for line in err.splitlines()[1:] if "notice" in line}
    rays = {int(line.split()[1].rstrip(":")) for line in ray_printers[2:]}
    assert not ours & rays
    assert ours | rays == set(sent)


def test_a_printer_bound_while_ours_was_in_place_falls_back_to_ray_when_none_is_known(
    ray_printers, thread_errors, tmp_path, capsys, monkeypatch
) -> None:
    """Even where Ray's printer was never seen (it moved), a late notice is printed, not raised."""
    import ray._private.worker as ray_worker

    with logs.engine_logs(tmp_path / "engines.log"):
        held = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=False)
    monkeypatch.setattr(logs, "_ray_notices", None)
    monkeypatch.setattr(ray_worker, "print_to_stdstream", logs._print_notice)
    held({"lines": ["late notice"], "pid": "raylet", "is_err": True})
    assert capsys.readouterr().err == "late notice\n"


def test_a_closed_engine_log_is_not_opened_again_by_a_late_batch(tmp_path) -> None:
    sink = logs.EngineLog(tmp_path / "engines.log", verbose=False)
    sink.handle({"pid": 1, "lines": ["first"]})
    sink.close()
    sink.handle({"pid": 1, "lines": ["late"]})  # Ray's thread, after the block
    assert sink._file is None
    assert (tmp_path / "engines.log").read_text() == "(1) first\n"


def test_a_resumed_rounds_noise_floor_joins_ray_through_the_pool_first(monkeypatch, tmp_path):
    """A resume whose round has its reference but no noise floor yet measures the noise first.
    Its `ray.put` must come after the pool joined Ray: before it, `ray.put` starts a Ray of its
    own (with dtm-ray's printer bound into Ray's handler), which the pool then never shuts down."""
    import numpy as np
    import ray

    from dtm_ray.core.state import ModelState, Reference
    from dtm_ray.loop import rounds
    from dtm_ray.records.store import RunStore

    order: list[str] = []

    class Pool:
        def broadcast(self, method: str, context) -> list:  # noqa: ANN001
            order.append(method)
            raise RuntimeError("stop here")

    class Engines:
        @property
        def pool(self) -> Pool:
            order.append("pool")
            return Pool()

    monkeypatch.setattr(ray, "put", lambda value: order.append("put") or "ref")
    tokens = np.zeros((1, 2), dtype=np.int64)
    reference = Reference(tokens, tokens, tokens, np.zeros((1, 2), dtype=np.float32))
    store = RunStore(str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="stop here"):
        rounds.noise_floor(Engines(), store, 1, ModelState(), reference)
    assert order == ["pool", "put", "null_probe"]
