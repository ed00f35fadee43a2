"""On a real vLLM engine: fused serving is the default only for the vLLM engine. (The rules alone:
tests/unit/test_serving.py.)"""

from __future__ import annotations


def test_fused_is_the_default_only_for_the_vllm_engine(tmp_path):
    import yaml

    from dtm_ray.job.spec import load_job

    compress = {"method": "quantize", "levels": ["int4-g64"], "min_fdt": 4}
    fused = {}
    for engine, extra in [("vllm", {}), ("hf", {}), ("vllm", {"fused": False})]:
        path = tmp_path / "job.yaml"
        job = {"model": "smollm2-135m", "engine": engine, "compress": {**compress, **extra}}
        path.write_text(yaml.safe_dump(job))
        fused[engine, bool(extra)] = load_job(path).compress.fused
    assert fused == {("vllm", False): True, ("hf", False): False, ("vllm", True): False}
