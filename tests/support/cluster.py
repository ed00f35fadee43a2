"""Ray for the tests: the session's local cluster (started by the `ray_session` fixture), the
engine actors it runs, and a cluster of nodes in a process of its own (support/two_node_cluster.py)
whose nodes a test can remove and add."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def start_session_ray():  # noqa: ANN201
    """One local Ray for the whole test session, dashboard off (starting one costs ~10 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    return ray


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        pid = _parent_pid(pid)
    return False


def engine_actor_pids() -> list[int]:
    """EngineActor processes of this test session's Ray (workers descend from our raylet)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                title = cmdline.read()
            if title.startswith(b"ray::EngineActor") and _descends_from(int(entry), os.getpid()):
                pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def engine_nodes(run: Path) -> dict[str, str]:
    """Worker name -> node id of the engine actors a run recorded starting."""
    path = run / "run.json"
    if not path.exists():
        return {}
    started = json.loads(path.read_text()).get("actors", [])
    return {a["worker"]: a["node"] for a in started[-1]["actors"]} if started else {}


class NodeCluster:
    """support/two_node_cluster.py in its own process, driven through its stdin: a head without
    CPUs and worker nodes of the given CPU counts, which `tell` removes and adds."""

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
