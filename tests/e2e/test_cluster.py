"""The cluster side on clusters of their own: local autoscaling from cluster.yaml's node types and
`ray job submit`.

The two tests start their own Ray clusters with `ray start` in subprocesses. They never touch
the session cluster (the `ray_session` fixture), which may be running in this very
process at the same time, so they:
- use their own `--temp-dir`: `ray start` records its address in `<temp-dir>/ray_current_cluster`,
  which is where a later `ray.init()` with no address looks first (the default /tmp/ray one
  would make `ray_session` join the wrong cluster);
- pick every fixed-by-default port (GCS 6379, client server 10001, dashboard 8265, dashboard agent
  52365) freshly, and let Ray choose the rest;
- drop RAY_ADDRESS / RAY_API_SERVER_ADDRESS from the child environment and pass addresses
  explicitly, and set RAY_AUTH_MODE=disabled for every child: once anything has written
  ~/.ray/auth_token, an unset mode makes `ray start` turn token auth on, and a client that
  disagrees with the cluster is rejected;
- tear down by killing only their own processes: `ray stop` would kill every Ray on the machine,
  the session cluster included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `dtm-ray` live here


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


# --------------------------------------------------------------------------------------------
# local clusters started with `ray start`
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def _kill_own_ray(temp_dir: str, gcs_address: str) -> None:
    """SIGKILL this cluster's processes (and their children) only; others keep running."""
    import psutil

    own = {f"--address={gcs_address}", f"--gcs-address={gcs_address}"}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == os.getpid():
            continue
        args = proc.info["cmdline"] or []
        if any(temp_dir in a or a in own for a in args):
            found[proc.pid] = proc
            with contextlib.suppress(psutil.Error):
                found.update({c.pid: c for c in proc.children(recursive=True)})
    found.pop(os.getpid(), None)
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(found.values()), timeout=15)


@contextlib.contextmanager
def local_ray_head(
    *args: str, env: dict[str, str], port: int | None = None
) -> Iterator[dict[str, Any]]:
    """`ray start --head` on fresh ports and its own temp dir; killed again on exit."""
    from ray._private.services import get_node_ip_address

    ip = get_node_ip_address()
    port = port or _free_port()
    dashboard_port = _free_port()
    # Short path: Ray puts Unix sockets under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="dtmray-")
    info = {
        "ip": ip,
        "gcs_address": f"{ip}:{port}",
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
        "temp_dir": temp_dir,
    }
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--ray-client-server-port={_free_port()}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=150000000",
        "--disable-usage-stats",
        *args,
    ]
    try:
        started = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=90, check=False
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        yield info
    finally:
        _kill_own_ray(temp_dir, info["gcs_address"])
        shutil.rmtree(temp_dir, ignore_errors=True)


def _last_json_line(text: str) -> dict[str, Any]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise AssertionError(f"no JSON result in output:\n{text}")


# --------------------------------------------------------------------------------------------
# autoscaling with the fake_multinode provider
# --------------------------------------------------------------------------------------------

# Runs as a separate driver process connected to the fake cluster: this test process may already
# be connected to the session cluster, and a process holds one Ray connection at a time.
AUTOSCALE_DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import ray
    from dtm_ray.engines import EngineConfig
    from dtm_ray.cluster.actor import start_engine_actors

    address, model_dir, n_actors = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ray.init(address=address, log_to_driver=False)
    head = ray.get_runtime_context().get_node_id()
    before = {"nodes": len([n for n in ray.nodes() if n["Alive"]]),
              "gpus": ray.cluster_resources().get("GPU", 0)}

    start = time.time()
    # The project's engine actors, with the options a job with resources_per_worker {GPU: 1}
    # gets. No CUDA here, so the hf engine loads the model on CPU inside each actor.
    actors = start_engine_actors(model_dir, EngineConfig(kind="hf"), n_actors, {"GPU": 1})
    infos = ray.get([a.info.remote() for a in actors], timeout=120)
    where = lambda self: (ray.get_runtime_context().get_node_id(), ray.get_gpu_ids())
    placed = ray.get([a.__ray_call__.remote(where) for a in actors], timeout=30)
    ready_s = time.time() - start
    alive = [n for n in ray.nodes() if n["Alive"]]
    scaled_up = {
        "nodes": [{"id": n["NodeID"], "gpus": n["Resources"].get("GPU", 0)} for n in alive],
        "cluster_gpus": ray.cluster_resources().get("GPU", 0),
    }

    # Back to zero: once the actors are gone the idle workers are terminated.
    for actor in actors:
        ray.kill(actor)
    start = time.time()
    while time.time() - start < 60 and ray.cluster_resources().get("GPU", 0) > 0:
        time.sleep(1)
    after = {"nodes": len([n for n in ray.nodes() if n["Alive"]]),
             "gpus": ray.cluster_resources().get("GPU", 0), "seconds": time.time() - start}
    print(json.dumps({"before": before, "ready_s": ready_s, "head": head, "placed": placed,
                      "infos": infos, **scaled_up, "after": after}))
    """
)


def fake_cluster_config(cluster: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """cluster.yaml's node-type layout on the fake_multinode provider, shrunk to this machine.

    Same node-type names, same head (`ray.head.default`, the name fake_multinode insists on)
    with no CPU, same min_workers; each GPU type becomes a 1-CPU, 1-GPU local node, at most two.
    `monitor.py` reads this file as is (no prepare_config), so every key is written out.
    """
    head_type = cluster["head_node_type"]
    types: dict[str, Any] = {
        head_type: {
            "resources": dict(cluster["available_node_types"][head_type]["resources"]),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, t in cluster["available_node_types"].items():
        if name != head_type and t["resources"].get("GPU", 0) >= 1:
            types[name] = {
                "resources": {"CPU": 1, "GPU": 1, "object_store_memory": 80 * 2**20},
                "node_config": {},
                "min_workers": t.get("min_workers", 0),
                "max_workers": 2,
            }
    return {
        "cluster_name": "dtm-ray-fake",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,  # otherwise fake workers dial port 6379
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": types,
        "head_node_type": head_type,
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.05,  # 3 s, so the test also sees the scale-down
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def test_fake_cluster_scales_gpu_workers_from_zero(tmp_path: Path, tiny_llama_dir: Path):
    from ray._private.services import get_node_ip_address

    n_actors = 2
    cluster = load_cluster_yaml()
    head_cpus = cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"]
    port = _free_port()
    config_path = tmp_path / "fake-cluster.yaml"
    config = fake_cluster_config(cluster, f"{get_node_ip_address()}:{port}")
    config_path.write_text(json.dumps(config, indent=1))
    # The autoscaler (monitor.py) is a child of `ray start` and reads these two.
    env = _child_env(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    with local_ray_head(
        f"--autoscaling-config={config_path}",
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        "--include-dashboard=false",
        env=env,
        port=port,
    ) as head:
        driver = subprocess.run(
            [sys.executable, "-c", AUTOSCALE_DRIVER, head["gcs_address"], str(tiny_llama_dir)]
            + [str(n_actors)],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
    assert driver.returncode == 0, driver.stdout + driver.stderr
    result = _last_json_line(driver.stdout)

    # Scaled from zero: only the (CPU: 0) head before, GPU workers after.
    assert result["before"] == {"nodes": 1, "gpus": 0}
    worker_ids = {n["id"] for n in result["nodes"] if n["id"] != result["head"]}
    assert len(worker_ids) >= n_actors, result
    assert result["cluster_gpus"] >= n_actors
    # Every actor became ready, on a worker, with a GPU of its own.
    placed_nodes = [node for node, _ in result["placed"]]
    assert len(set(placed_nodes)) == n_actors and set(placed_nodes) <= worker_ids
    assert all(len(gpus) == 1 for _, gpus in result["placed"])
    # ... and back to the head alone once the actors are gone (min_workers 0).
    assert result["after"]["gpus"] == 0 and result["after"]["nodes"] == 1, result["after"]


# --------------------------------------------------------------------------------------------
# the submit recipe:
#   ray job submit --runtime-env jobs/runtime_env.yaml -- python -m dtm_ray.cli run ...
# --------------------------------------------------------------------------------------------

# The repository's demo job, shrunk with --set so it takes seconds: 2 components x 1 spec.
DEMO_JOB = "jobs/smollm2-demo.yaml"
SHRINK = {
    "prompts.count": "4",
    "prompts.prefix_tokens": "16",
    "new_tokens": "8",
    "probe.components": "[{kinds: [q], layers: [0, 1]}]",
    "probe.specs": "[magnitude:0.5]",
    "workers": "1",
    "resources_per_worker": "{CPU: 1}",
}
EXPECTED_COMPONENTS = [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]


def test_ray_job_submit_writes_run_directory(tmp_path: Path, smollm2_dir: Path):
    import pyarrow.dataset as ds

    assert (REPO / DEMO_JOB).is_file()
    out = tmp_path / "run"
    overrides = [arg for key, value in SHRINK.items() for arg in ("--set", f"{key}={value}")]
    env = _child_env()
    # The job server lives in the dashboard: it must be on for `ray job submit`.
    with local_ray_head(
        "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", env=env
    ) as head:
        submit = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                f"--address={head['dashboard_url']}",
                # The recipe the docs give (tests/unit/test_docs.py holds them to it): the
                # repository as the working directory, relative to the folder the command runs in.
                "--runtime-env",
                "jobs/runtime_env.yaml",
                "--",
                "python",
                "-m",
                "dtm_ray.cli",
                "run",
                DEMO_JOB,  # relative: resolved inside the uploaded working directory
                *overrides,
                "--out",
                str(out),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=170,
            check=False,
        )
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log
    assert "succeeded" in log
    # The streamed job log (`ray job logs`) holds the driver's own lines, no engine chatter.
    assert "dtm-ray: round 0: probing" in log
    assert "EngineActor" not in log and "Loading safetensors" not in log
    # Ray's own CLI colours its status lines even into a pipe; the job's lines carry no colour.
    job_lines = [line for line in log.splitlines() if " cli.py:" not in line]
    assert not [line for line in job_lines if "\x1b" in line], job_lines

    run_info = json.loads((out / "run.json").read_text())
    assert run_info["config"]["model"] == "smollm2-135m"
    assert run_info["config"]["out"] == str(out)
    reference = ds.dataset(out / "reference", format="parquet").to_table()
    assert reference.num_rows == int(SHRINK["prompts.count"])
    probe_files = sorted((out / "probes").glob("*.parquet"))
    assert probe_files
    probes = ds.dataset([str(p) for p in probe_files], format="parquet").to_table()
    assert probes.num_rows == len(EXPECTED_COMPONENTS)  # one row per probe, no duplicates
    assert sorted(probes.column("component").to_pylist()) == EXPECTED_COMPONENTS
    assert set(probes.column("status").to_pylist()) == {"ok"}
