"""A Ray cluster on this machine for the node-loss tests, run as its own process so it shares
nothing with the test session's Ray: a head with no CPUs (the driver's node) and worker nodes
with the CPU counts given as arguments (default: two of one CPU). Nodes die fast here: Ray
declares a node dead after ~2 s of missed health checks instead of its default ~15 s.

Prints `address <gcs address>` and `node <node id>` per worker node, then reads commands on
stdin, one per line: `remove <node id>` kills that node at once (as a lost machine dies),
`add <cpus>` starts another worker node and prints its `node <id>`; end of input shuts it all down.

With `--node-caches DIR` each worker node keeps its models in its own cache, DIR/node-<n>
(DTM_RAY_CACHE), as separate machines would: a model is then fetched once per node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from ray._private.utils import get_ray_address_file  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_failure_threshold": 4,
}


def main(cpus: list[int], node_caches: str | None = None) -> None:
    # Cluster() writes its address where a plain `ray.init()` on this machine looks for a
    # cluster to join; put back what was there so later drivers do not join this one.
    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": FAST_HEALTH_CHECKS,
        },
    )
    if before is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(before)
    nodes = {}
    print(f"address {cluster.address}", flush=True)

    def add(count: int) -> None:
        env = {"DTM_RAY_CACHE": f"{node_caches}/node-{len(nodes)}"} if node_caches else None
        node = cluster.add_node(num_cpus=count, env_vars=env)
        nodes[node.node_id] = node
        print(f"node {node.node_id}", flush=True)

    for count in cpus:
        add(count)
    try:
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "remove":
                cluster.remove_node(nodes.pop(arg), allow_graceful=False)
                print(f"removed {arg}", flush=True)
            elif command == "add":
                add(int(arg))
    finally:
        for node in list(nodes.values()):
            cluster.remove_node(node, allow_graceful=False)
        cluster.remove_node(cluster.head_node, allow_graceful=False)


if __name__ == "__main__":
    flag = "--node-caches="
    caches = next((a.removeprefix(flag) for a in sys.argv[1:] if a.startswith(flag)), None)
    counts = [int(a) for a in sys.argv[1:] if not a.startswith("--")]
    main(counts or [1, 1], caches)
