"""The user's view of a run: quiet output, `show`, `report` and `plan`, on real runs of the CLI."""

from __future__ import annotations

from pathlib import Path

from dtm_ray.cluster.logs import EngineLog, local_log_dir


# --- the engine log ------------------------------------------------------------------------------
def ray_batch(*lines: str) -> dict:
    # What Ray's log monitor publishes for one batch of an actor's output.
    return {
        "ip": "10.0.0.1",
        "pid": 4242,
        "actor_name": "EngineActor",
        "task_name": None,
        "is_err": True,
        "lines": list(lines),
        "localhost": "10.0.0.1",
    }


def test_engine_log_keeps_chatter_in_the_file_and_shows_dtm_ray_lines(tmp_path, capsys):
    log = EngineLog(tmp_path / "logs" / "engines.log", verbose=False)
    log.handle(
        ray_batch(
            "WARNING 11-24 [cpu_worker.py:114] libtcmalloc is not found",
            "dtm-ray: engine-0: weights unknown; restarting this actor",
        )
    )
    log.close()
    shown = capsys.readouterr().err
    assert (
        shown
        == "(EngineActor pid=4242) dtm-ray: engine-0: weights unknown; restarting this actor\n"
    )
    written = (tmp_path / "logs" / "engines.log").read_text().splitlines()
    assert written == [
        "(EngineActor pid=4242) WARNING 11-24 [cpu_worker.py:114] libtcmalloc is not found",
        "(EngineActor pid=4242) dtm-ray: engine-0: weights unknown; restarting this actor",
    ]


def test_engine_log_verbose_shows_everything_without_colour(tmp_path, capsys):
    log = EngineLog(tmp_path / "engines.log", verbose=True)
    log.handle(ray_batch("Loading safetensors checkpoint shards: 100%"))
    log.close()
    err = capsys.readouterr().err
    assert err == "(EngineActor pid=4242) Loading safetensors checkpoint shards: 100%\n"


def test_a_dead_node_notice_is_one_line_for_the_user_and_whole_in_the_log(tmp_path, capsys):
    import ray._private.worker as ray_worker

    from dtm_ray.cluster.logs import engine_logs

    notice = (
        "The node with node id: 3c49 and address: 10.0.0.2 and node name: 10.0.0.2 has been "
        "marked dead because the detector has missed too many heartbeats from it. This can "
        "happen when a \t(1) raylet crashes unexpectedly (OOM, etc.) \n\t(2) raylet has "
        "lagging heartbeats due to slow network or busy workload."
    )
    ray_printer = ray_worker.print_to_stdstream
    with engine_logs(tmp_path / "engines.log"):
        # What Ray's error listener thread does with a notice from the cluster.
        ray_worker.print_to_stdstream(
            {"lines": [notice], "pid": "raylet", "is_err": False}, ignore_prefix=False
        )
    shown = capsys.readouterr()
    assert shown.out == ""
    assert shown.err.splitlines() == [
        "dtm-ray: ray: The node with node id: 3c49 and address: 10.0.0.2 and node name: "
        "10.0.0.2 has been marked dead because the detector has missed too many heartbeats "
        f"from it. (details in {tmp_path / 'engines.log'})"
    ]
    written = (tmp_path / "engines.log").read_text()
    assert "(raylet) \t(2) raylet has lagging heartbeats due to slow network" in written
    assert ray_worker.print_to_stdstream is ray_printer  # given back after the block


def test_log_folder_of_local_and_remote_run_dirs():
    assert local_log_dir("runs/demo") == Path("runs/demo/logs")
    assert local_log_dir("s3://bucket/runs/x") == Path("dtm-ray-logs/bucket_runs_x")
    endpoint = "s3://bucket/runs/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert local_log_dir(endpoint) == Path("dtm-ray-logs/bucket_runs_x")


# --- a real run, end to end --------------------------------------------------------------------
