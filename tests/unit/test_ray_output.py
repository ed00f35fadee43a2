"""The hand-over of Ray's output (dtm_ray.cluster.logs): whatever arrives when, before, during or
after the hand-back, reaches a printer and never raises in Ray's threads."""

from __future__ import annotations

import functools

import pytest

from dtm_ray.cluster import logs


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
