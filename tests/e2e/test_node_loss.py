"""A node lost mid-round: the engine actors it held restart on another node, the round goes on,
every probe is run exactly once and the result equals a run never disturbed. The cluster is
real: a head and a worker node started by tests/two_node_cluster.py, the node killed at once,
another added a few seconds later (as an autoscaler would)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import FDT_SPARSIFY, assert_same_result, tiny_compress_job

HERE = Path(__file__).resolve().parent


class NodeCluster:
    """tests/two_node_cluster.py in its own process, driven through its stdin."""

    def __init__(self, cpus: list[int], node_caches: Path | None = None) -> None:
        caches = [f"--node-caches={node_caches}"] if node_caches else []
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "two_node_cluster.py"), *map(str, cpus), *caches],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.address = self._read("address")
        self.nodes = [self._read("node") for _ in cpus]

    def _read(self, what: str) -> str:
        for line in self.process.stdout:
            word, _, value = line.strip().partition(" ")
            if word == what:
                return value
        raise RuntimeError(f"the test cluster ended before printing {what}")

    def tell(self, command: str, answer: str) -> str:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read(answer)

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def engine_nodes(run: Path) -> dict[str, str]:
    """Worker name -> node id of the engine actors a run recorded starting."""
    path = run / "run.json"
    if not path.exists():
        return {}
    started = json.loads(path.read_text()).get("actors", [])
    return {a["worker"]: a["node"] for a in started[-1]["actors"]} if started else {}


def wait_for(condition, timeout: float, what: str, driver: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended (exit {driver.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_lost_node_costs_nothing_its_actor_restarts_on_another(
    fdt_sparsify_run, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    undisturbed, _ = fdt_sparsify_run
    run = tmp_path / "run"
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(tiny_compress_job(tiny_llama_dir, run, FDT_SPARSIFY)))
    # Both engine actors on one node: when it dies nothing can run until a node joins.
    cluster = NodeCluster(cpus=[2])
    try:
        env = {**os.environ, "RAY_ADDRESS": cluster.address}
        with open(tmp_path / "driver.log", "w") as log:
            driver = subprocess.Popen(
                [sys.executable, "-m", "dtm_ray.cli", "run", str(job_file)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                # Once round 0's probes are handed out the actors are busy with them (rows are
                # written in files of many rows, so the first file may come only at the end).
                probing = tmp_path / "driver.log"
                wait_for(
                    lambda: "round 0: probing" in probing.read_text(), 300, "the probes", driver
                )
                (node,) = set(engine_nodes(run).values())
                lost_at = time.monotonic()
                cluster.tell(f"remove {node}", "removed")
                time.sleep(8)
                cluster.tell("add 2", "node")
                driver.wait(timeout=600)
            finally:
                if driver.poll() is None:
                    driver.kill()
        took = time.monotonic() - lost_at
    finally:
        cluster.close()
    output = (tmp_path / "driver.log").read_text()
    print(f"\nnode lost: the run ended {took:.0f} s later\n" + output[-3000:])
    assert driver.returncode == 0, output[-3000:]
    for worker in engine_nodes(run):  # as first started
        assert f"{worker} died while running" in output
        assert f"{worker} is back after" in output
    waiting = "to restart: it needs {CPU: 1} and no node has that free"
    assert waiting in output, output[-3000:]
    assert "failed" not in output.lower(), output[-3000:]
    assert_same_result(run, undisturbed)
