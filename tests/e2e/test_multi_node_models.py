"""Models on a cluster of two nodes that share nothing but the object store (and a prepared hub
cache): engine actors on both nodes materialise the model themselves, once per node, and the run
equals the model measured from the local folder by an engine in this process. The cluster is
real: a head without CPUs and two worker nodes of one CPU each, each with its own model cache
(tests/support/two_node_cluster.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from support.checks import in_process_values, table_values
from support.cluster import NodeCluster
from support.hub import SHA, lay_out_hub_cache
from support.jobs import SHORT, tiny_job
from support.s3_server import model_uri

from dtm_ray.engines.sources import evict, resolve_source


def test_actors_on_two_nodes_each_materialise_the_model_and_match_the_local_folder(
    model_store, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    hub = tmp_path / "hub"
    lay_out_hub_cache(hub, "acme/tiny", tiny_llama_dir)
    nodes = tmp_path / "nodes"
    s3_model = model_uri(model_store, "tiny")
    cluster = NodeCluster(cpus=[1, 1], node_caches=nodes)
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    env.pop("DTM_RAY_CACHE", None)  # each node keeps its own (the driver's would travel along)
    # One hub cache the nodes share (a shared HF_HOME), offline: the driver's settings travel.
    env.update({"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})

    def run(model: str, name: str) -> list[dict]:
        probe = {"components": [{"layers": [0]}], "specs": ["magnitude:0.5"]}
        job = tiny_job(model, tmp_path / name, SHORT, probe=probe, workers=2)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job))
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "dtm_ray.cli", "run", str(tmp_path / f"{name}.yaml")],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(f"{name}: {time.monotonic() - started:.1f} s")
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads((tmp_path / name / "run.json").read_text())["actors"][0]["actors"]

    try:
        store_actors = run(s3_model, "s3")
        hub_actors = run("acme/tiny", "hub")
    finally:
        cluster.close()
        evict(resolve_source(s3_model))  # the driver's config-and-tokenizer copy
    # One actor on each node; each node fetched the store's model itself, into its own cache.
    assert len({a["node"] for a in store_actors}) == 2
    assert [a["model_fetched"] for a in store_actors] == [True, True]
    weights = (tiny_llama_dir / "model.safetensors").read_bytes()
    for node in ("node-0", "node-1"):
        (copy,) = [p for p in (nodes / node / "models" / "sources").iterdir() if p.is_dir()]
        assert (copy / "model.safetensors").read_bytes() == weights
    # The hub id came from the shared offline cache, pinned to its commit.
    assert len({a["node"] for a in hub_actors}) == 2
    hub_run = json.loads((tmp_path / "hub" / "run.json").read_text())
    assert hub_run["model_source"]["revision"] == SHA
    # Both runs measured what an engine in this process measures on the local folder (its
    # reference rebuilt from the stored prompts must equal the run's, too).
    expected = table_values(str(tmp_path / "s3"))
    assert len(expected) == 7
    assert table_values(str(tmp_path / "hub")) == expected
    assert in_process_values(tiny_llama_dir, str(tmp_path / "s3"), list(expected), 8) == expected
