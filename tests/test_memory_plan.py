"""`dtm-ray plan`'s memory plan: what each actor and node needs, where layer skip will be
inactive, and a one-line refusal of a job its declared resources cannot hold (before Ray)."""

from __future__ import annotations

from pathlib import Path

import yaml
from safetensors import safe_open

from dtm_ray.cli import main
from dtm_ray.engines.models import load_components, read_model_config
from dtm_ray.job.spec import load_job
from dtm_ray.loop.estimate import MemoryPlan, memory_plan


def planned(job: Path) -> MemoryPlan:
    """The memory plan of a job file (what `plan` prints, without reading its prompts)."""
    loaded = load_job(job)
    return memory_plan(read_model_config(loaded.model), load_components(loaded.model), loaded)


def write_job(folder: Path, model: Path, name: str = "job", **changes) -> Path:
    job = {
        "model": str(model),
        "engine": "vllm",
        "dtype": "float32",
        "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 8},
        "new_tokens": 16,
        "compress": {"target_sparsity": 0.2, "step": 0.1},
        "out": str(folder / "run"),
        **changes,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_the_model_term_is_the_checkpoint_and_layer_skip_follows_its_budget(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    with safe_open(tiny_llama_dir / "model.safetensors", "pt") as f:
        stored = sum(_numel(f, key) for key in f.keys())
    memory = planned(write_job(tmp_path, tiny_llama_dir))
    # Every weight but the norms (a few hundred values) at 4 bytes, on the host (CPU engine).
    assert abs(memory.device["model weights"] - 4 * stored) < 4 * 1024
    assert memory.layer_skip is None
    kept = memory.device["residual stream kept for layer skip"]
    assert kept == 2 * 2 * 8 * 24 * 128 * 4  # two layers x (hidden, residual) x tokens x hidden
    tight = write_job(tmp_path, tiny_llama_dir, engine_options={"residual_cache_bytes": 1000})
    memory = planned(tight)
    assert "keeps layer 0 only" in memory.layer_skip
    gpu = write_job(tmp_path, tiny_llama_dir, resources_per_worker={"GPU": 1})
    assert "CUDA graphs" in planned(gpu).layer_skip


def _numel(f, key: str) -> int:
    count = 1
    for size in f.get_slice(key).get_shape():
        count *= size
    return count


def test_plan_prints_the_memory_and_refuses_what_cannot_fit(
    tmp_path: Path, tiny_llama_dir: Path, capsys
) -> None:
    job = write_job(tmp_path, tiny_llama_dir)
    assert main(["plan", str(job), "--no-calibrate"]) == 0
    out = capsys.readouterr().out
    assert "memory per actor, on the host" in out and "host memory per node" in out
    small_host = write_job(
        tmp_path, tiny_llama_dir, "small", resources_per_worker={"CPU": 1, "memory": 1e9}
    )
    assert main(["plan", str(small_host), "--no-calibrate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "host memory but resources_per_worker memory is 0.93 GiB" in err[0]
    gpu = write_job(tmp_path, tiny_llama_dir, "gpu", resources_per_worker={"GPU": 1})
    assert main(["plan", str(gpu), "--no-calibrate", "--gpu-memory-gib", "0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "each GPU needs" in err[0] and "0.04 GiB" in err[0]
    assert main(["run", str(small_host), "--dry-run"]) == 2  # run refuses it before Ray too
    capsys.readouterr()


def test_tensor_parallel_ranks_split_the_model(tmp_path: Path, tiny_llama_dir: Path) -> None:
    single = write_job(tmp_path, tiny_llama_dir, "single", resources_per_worker={"GPU": 1})
    one = planned(single)
    job = write_job(
        tmp_path,
        tiny_llama_dir,
        engine_options={"tensor_parallel_size": 2},
        resources_per_worker={"GPU": 2},
    )
    two = planned(job)
    assert (one.ranks, one.actors_per_node, two.ranks, two.actors_per_node) == (1, 8, 2, 4)
    assert two.device["model weights"] == one.device["model weights"] // 2
