"""Ray's notices on a real local Ray: before, during and after the hand-back they reach a printer.
(The printers alone: tests/unit/test_ray_output.py.)"""

from __future__ import annotations

import functools
import threading

from dtm_ray.cluster import logs


def _notice(n: int) -> dict:
    return {"lines": [f"notice {n}: the node 10.0.0.2 was marked dead"], "pid": "raylet"}


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
