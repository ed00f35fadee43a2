"""The cluster side, offline: cluster.yaml against Ray's own schema and the project's checks, and
the working-dir upload. (Local autoscaling and `ray job submit`, on clusters of their own:
tests/e2e/test_cluster.py.)"""

from __future__ import annotations

import copy
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `dtm-ray` live here


# --------------------------------------------------------------------------------------------
# cluster.yaml, offline
# --------------------------------------------------------------------------------------------


def load_cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def check_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own offline checks, then what dtm_ray needs of the cluster; returns the filled config.

    `prepare_config` merges the provider's defaults.yaml, setup commands and per-type worker
    limits; `validate_config` applies ray-schema.json plus Ray's cross-field rules. Both are what
    `ray up` runs before it talks to the cloud (bootstrap, IAM, AMI and instance-type lookups come
    after and need AWS, so they are left out).
    """
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    filled = prepare_config(copy.deepcopy(config))
    validate_config(filled)

    assert filled["provider"]["type"] == "aws"
    types = filled["available_node_types"]
    head_type = filled["head_node_type"]
    head = types[head_type]
    # Engine actors must never land on the head: it advertises no CPU and no GPU, is on-demand.
    assert head["resources"].get("CPU") == 0, "the head must advertise CPU: 0"
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"], "the head must not be spot"

    workers = {name: t for name, t in types.items() if name != head_type}
    gpu_types = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in workers.items():
        # Written out so the autoscaler needs no EC2 lookup to know what a node offers.
        assert t["resources"].get("CPU", 0) >= 1, f"{name}: CPU not declared"
        assert t["min_workers"] == 0, f"{name}: the cluster must scale to zero"
        assert 1 <= t["max_workers"] <= filled["max_workers"], f"{name}: max_workers"
    for name, t in types.items():
        image = t["node_config"].get("ImageId", "")
        # Without an ImageId Ray falls back to an old CUDA 11 Deep Learning AMI.
        assert "deeplearning" in image or image.startswith("ami-"), f"{name}: ImageId {image!r}"
    assert any(
        t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        for t in gpu_types.values()
    ), "no spot GPU worker type"
    total_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert 1 <= filled["max_workers"] <= 64 and total_gpus <= 256, "max_workers out of range"
    assert filled["idle_timeout_minutes"] > 0

    # Every node installs this package, with its vllm extra, from the synced project directory.
    mounts = filled["file_mounts"]
    remote_dirs = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert remote_dirs, "the project directory is not in file_mounts"
    install = re.compile(r"pip install .*-e \S*dtm_ray\[vllm[\],]")
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = "\n".join(filled[key])
        assert install.search(commands), f"{key} do not install dtm_ray[vllm]"
        # Same Ray on the cluster as on the machine that submits to it.
        assert f"ray[default]=={ray.__version__}" in commands, f"{key}: Ray not pinned"
    assert ".venv" in filled["rsync_exclude"], "the local venv would be synced"
    head_start = "\n".join(filled["head_start_ray_commands"])
    assert "--head" in head_start and "--autoscaling-config=" in head_start
    assert "$RAY_HEAD_IP" in "\n".join(filled["worker_start_ray_commands"])
    return filled


def test_cluster_yaml_passes_ray_schema_and_project_checks():
    filled = check_cluster_config(load_cluster_yaml())
    assert {"gpu.a10g.x4", "gpu.a100.x8"} <= set(filled["available_node_types"])


def _break(config: dict[str, Any], what: str) -> None:
    types = config["available_node_types"]
    if what == "unknown-key":
        config["max_worker"] = 4  # typo: the schema forbids unknown top-level keys
    elif what == "gpu-not-integer":
        types["gpu.a10g.x4"]["resources"]["GPU"] = "4"
    elif what == "no-node-config":
        del types["gpu.a10g.x4"]["node_config"]
    elif what == "bad-head-type":
        config["head_node_type"] = "ray.head.gpu"
    elif what == "min-over-max":
        types["gpu.a10g.x4"]["min_workers"] = config["max_workers"] + 1
    elif what == "no-vllm-extra":
        extras = re.compile(r"\[vllm[^\]]*\]")
        config["setup_commands"] = [extras.sub("", c) for c in config["setup_commands"]]
    elif what == "no-gpu-workers":
        for name, t in types.items():
            if name != config["head_node_type"]:
                t["resources"].pop("GPU", None)
    elif what == "head-takes-actors":
        types[config["head_node_type"]]["resources"] = {}
    elif what == "venv-synced":
        config["rsync_exclude"] = []
    else:
        raise AssertionError(what)


@pytest.mark.parametrize(
    "what, error, message",
    [
        # Ray's schema (ray-schema.json)
        ("unknown-key", "schema", "max_worker"),
        ("gpu-not-integer", "schema", "'4' is not of type 'integer'"),
        ("no-node-config", "schema", "'node_config' is a required property"),
        # Ray's cross-field rules in validate_config
        ("bad-head-type", ValueError, "head_node_type"),
        ("min-over-max", ValueError, "min_workers"),
        # what dtm_ray needs
        ("no-vllm-extra", AssertionError, r"dtm_ray\[vllm\]"),
        ("no-gpu-workers", AssertionError, "no GPU worker type"),
        ("head-takes-actors", AssertionError, "CPU: 0"),
        ("venv-synced", AssertionError, "venv"),
    ],
)
def test_broken_cluster_yaml_fails(what: str, error: Any, message: str):
    import jsonschema

    config = load_cluster_yaml()
    _break(config, what)
    with pytest.raises(jsonschema.ValidationError if error == "schema" else error, match=message):
        check_cluster_config(config)


def test_working_dir_upload_leaves_out_venv(tmp_path: Path):
    """What the submit recipe (`--runtime-env jobs/runtime_env.yaml`) uploads, zipped by Ray's own
    code with that file's excludes.

    Ray 2.60 honours .gitignore (and .rayignore) unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1, so
    .venv/ stays out anyway; .git is not ignored by default, hence `.git` in the excludes.
    """
    from ray._private.runtime_env.packaging import _zip_files

    excludes = yaml.safe_load((REPO / "jobs/runtime_env.yaml").read_text())["excludes"]
    target = tmp_path / "pkg.zip"
    _zip_files(str(REPO), excludes, str(target), include_gitignore=True)
    names = zipfile.ZipFile(target).namelist()
    assert "cluster.yaml" in names and "dtm_ray/cli.py" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/"))]
    assert target.stat().st_size < 100 * 2**20, "working-dir upload is unexpectedly large"
