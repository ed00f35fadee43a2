"""The files a newcomer touches: every job file validates, the cluster manifests parse and name
what KubeRay and Ray require, the reference (docs/reference.md) documents every job key, and
`plan`'s schedule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from support.fakes import llama2_folder

from dtm_ray import cli
from dtm_ray.job.checks import check_job
from dtm_ray.job.spec import (
    ENGINE_OPTION_KEYS,
    CompressConfig,
    EvaluateConfig,
    EvaluationConfig,
    JobConfig,
    ProbeConfig,
    PromptsConfig,
    RecoveryConfig,
    load_job,
)
from dtm_ray.loop.estimate import schedule, sparsify_steps, tokens_scored

ROOT = Path(__file__).resolve().parents[2]

# Llama-2's published config.json values: enough for validation without the weights.


def test_llama2_jobs_select_every_linear_weight(tmp_path):
    job = load_job(ROOT / "jobs/llama2-13b-int8.yaml", [f"model={llama2_folder(tmp_path, '13b')}"])
    checked = check_job(job, read_hub=False)  # no dataset hub here
    assert len(checked.components) == 40 * 7
    assert job.dtype == "bfloat16" and job.engine == "vllm"
    assert job.prompts.source.startswith("hf:wikitext:wikitext-2")
    assert job.compress.levels == ["int8"]


def test_demo_schedule_is_two_rounds_of_two_probes_per_component():
    checked = check_job(load_job(ROOT / "jobs/demo.yaml"))
    rounds = schedule(checked)
    assert [r.label for r in rounds] == ["held-out", "0", "1", "final", "finish"]
    # 3 layers x 7 kinds x 2 added sparsities
    assert [r.probes for r in rounds] == [0, 42, 42, 0, 0]
    # The dense reference on 16 validate + 64 test prompts, generated and scored, first.
    assert tokens_scored(checked, rounds[0]) == (16 + 64) * (48 + 32)
    # 16 prompts x (16 + 32) tokens per probe and per actor's noise floor, plus the reference
    # generated and scored.
    passes = 42 + checked.job.workers
    assert tokens_scored(checked, rounds[1]) == passes * 16 * 48 + 16 * (48 + 32)


def test_sparsify_steps_land_on_the_target():
    assert sparsify_steps(0.25, 0.15) == pytest.approx([0.15, 0.1 / 0.85])
    assert len(sparsify_steps(0.5, 0.1)) == 7  # 0.1, 0.19, 0.271, 0.344, 0.41, 0.469, then 0.5


def test_kuberay_rayjob_names_what_kuberay_requires():
    manifest = yaml.safe_load((ROOT / "deploy/kuberay-rayjob.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayJob"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert "dtm_ray.cli run jobs/" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])  # a YAML string inside the manifest
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for container in head["template"]["spec"]["containers"]:
        assert container["name"] and container["image"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] and isinstance(group["rayStartParams"], dict)
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["name"] and worker["image"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # Every volume a container mounts is defined in its pod.
    for pod in (head["template"]["spec"], group["template"]["spec"]):
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes


def test_runtime_env_file_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    data = yaml.safe_load((ROOT / "jobs/runtime_env.yaml").read_text())
    env = RuntimeEnv(**data)  # raises on unknown fields or malformed values
    assert env["working_dir"] == "."
    assert ".git" in env["excludes"]


def test_reference_documents_every_job_key():
    reference = (ROOT / "docs/reference.md").read_text()
    job_files = reference[reference.index("## Job files") : reference.index("## The run directory")]
    classes = (
        JobConfig,
        PromptsConfig,
        ProbeConfig,
        CompressConfig,
        RecoveryConfig,
        EvaluationConfig,
        EvaluateConfig,
    )
    keys = {f.name for cls in classes for f in dataclasses.fields(cls)} | set(ENGINE_OPTION_KEYS)
    # A key is documented where its table has a row for it.
    missing = sorted(k for k in keys if f"| `{k}` |" not in job_files)
    assert not missing, f"docs/reference.md lacks job keys: {missing}"


def test_readme_demo_command_is_the_demo_job():
    readme = (ROOT / "README.md").read_text()
    assert "./setup.sh && .venv/bin/dtm-ray run jobs/demo.yaml" in readme
    assert "./setup.sh && .venv/bin/python -m pytest" in readme


def test_every_subcommand_explains_itself(capsys):
    for command in ("run", "plan", "show", "report", "export", "model"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: dtm-ray {command}" in text and len(text) > 300


def test_wanda_runs_vllm_eagerly_unless_the_job_says_how(tmp_path):
    def engine_of(**changes) -> object:
        job = yaml.safe_load((ROOT / "jobs" / "demo.yaml").read_text())
        job["compress"].update(changes.pop("compress", {}))
        job.update(changes)
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(job))
        return load_job(path).engine_config()

    # Its calibration hooks see nothing inside CUDA graphs, the GPU default.
    assert engine_of(compress={"criterion": "wanda"}).enforce_eager is True
    assert engine_of().enforce_eager is None  # magnitude: the device's default
    assert engine_of(engine="hf", compress={"criterion": "wanda"}).enforce_eager is None
