"""`dtm-ray compare BASE CANDIDATE`: FDT between two checkpoints made outside dtm_ray.

The per-prompt FDT of a compare equals the first difference of the two models' free-running
greedy text in plain transformers; a pair that cannot be compared (tokenizers differ, a candidate
that cannot be read or loaded here) ends in one line, exit 2, before Ray is imported; a killed
compare resumes with the chunks it had not written; `show` and `report` read a compare run; the
tables are pure functions checked against a loop written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from support.fakes import folder_like

from dtm_ray.job.compare import build_compare, check_compare

ROOT = Path(__file__).resolve().parents[2]


# --- candidates made with plain torch, outside dtm_ray --------------------------------------------
# --- the tables, against a loop written here ---------------------------------------------------


# --- one line, exit 2, before Ray ----------------------------------------------------------------
CLI = """
import json, sys
from dtm_ray import cli
code = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "ray": "ray" in sys.modules, "vllm": "vllm" in sys.modules}))
"""


def compare_cli(*args: str) -> tuple[dict, str]:
    """`dtm-ray compare ARGS` in a fresh process: its exit code, whether it imported Ray, and
    its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CLI, json.dumps(["compare", *args])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _swapped_tokenizer(smollm2_dir: Path, out: Path) -> Path:
    """SmolLM2 whose tokenizer gives two tokens each other's ids."""
    folder = folder_like(smollm2_dir, out, None)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_unusable_pairs_end_in_one_line_before_ray(smollm2_dir: Path, tmp_path: Path):
    swapped = _swapped_tokenizer(smollm2_dir, tmp_path / "swapped")
    no_config = folder_like(smollm2_dir, tmp_path / "no-config", None)
    (no_config / "config.json").unlink()
    no_weights = folder_like(smollm2_dir, tmp_path / "no-weights", None)
    (no_weights / "model.safetensors").unlink()
    gptq = folder_like(smollm2_dir, tmp_path / "gptq", None)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    (gptq / "config.json").write_text(json.dumps(config))
    unknown = folder_like(smollm2_dir, tmp_path / "unknown", None)
    config["quantization_config"] = {"quant_method": "made-up"}
    (unknown / "config.json").write_text(json.dumps(config))
    int8 = folder_like(smollm2_dir, tmp_path / "int8", None)
    weights = {"type": "int", "num_bits": 8, "symmetric": True, "strategy": "channel"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
    }
    (int8 / "config.json").write_text(json.dumps(config))
    out = tmp_path / "run"
    hf = ["--engine", "hf", "--out", str(out)]
    cases = {
        "tokenizers": ([str(swapped), *hf], "do not share a tokenizer"),
        "missing": ([str(tmp_path / "nowhere"), *hf], "no such folder"),
        "no config": ([str(no_config), *hf], "no config.json"),
        "no weights": ([str(no_weights), *hf], "no weights"),
        "gptq on hf": ([str(gptq), *hf], "requires optimum"),
        "unknown on vllm": (
            [str(unknown), "--engine", "vllm", "--out", str(out)],
            "which vLLM does not know",
        ),
        "int8 on vllm's cpu build": (
            [str(int8), "--engine", "vllm", "--dtype", "bfloat16", "--out", str(out)],
            "runs 4-bit integer weights only; this checkpoint holds int8",
        ),
    }
    for name, (args, words) in cases.items():
        result, stderr = compare_cli(str(smollm2_dir), *args)
        lines = stderr.strip().splitlines()
        assert result["code"] == 2 and not result["ray"], (name, result, stderr)
        assert len(lines) == 1 and lines[0].startswith("dtm-ray: error: "), (name, stderr)
        assert words in lines[0], (name, lines[0])
        if name == "tokenizers":  # sizes agree; the line names the first differing id
            the = json.loads((smollm2_dir / "tokenizer.json").read_text())["model"]["vocab"]
            first = min(the["the"], the["and"])
            assert f"id {first} is " in lines[0] and "49152 tokens" in lines[0], lines[0]
        if "vllm" not in name:
            assert not result["vllm"], name
        assert not out.exists(), name


def test_a_job_file_with_compare_runs_through_compare(smollm2_dir: Path, tmp_path: Path):
    job = tmp_path / "compare.yaml"
    job.write_text(
        "compare:\n"
        f"  base: {{model: {smollm2_dir}, engine: hf, dtype: float32}}\n"
        f"  candidate: {smollm2_dir}\n"
        "prompts: {count: 4, prefix_tokens: 8}\n"
        "new_tokens: 8\n"
        f"out: {tmp_path / 'run'}\n"
    )
    result, stderr = compare_cli("--job", str(job), "--count", "3", "--dry-run")
    assert result == {"code": 0, "ray": False, "vllm": False}, stderr
    built = build_compare(
        {"compare": {"base": {"model": "a", "dtype": "float32"}, "candidate": "b"}}
    )
    assert (built.candidate.engine, built.candidate.dtype) == ("vllm", "float32")  # the base's
    from dtm_ray import cli

    assert cli.main(["run", str(job)]) == 2  # a compressing job's command names the right one


def test_a_side_in_an_object_store_is_read_on_the_driver_without_its_weights(
    model_store, tiny_llama_dir: Path, tmp_path: Path, monkeypatch
):
    from support.s3_server import model_uri

    monkeypatch.setenv("DTM_RAY_CACHE", str(tmp_path / "cache"))
    uri = model_uri(model_store, "tiny")
    job = build_compare(
        {
            "compare": {"base": {"model": str(tiny_llama_dir), "engine": "hf"}, "candidate": uri},
            "prompts": {"count": 4, "prefix_tokens": 8},
            "new_tokens": 8,
            "out": str(tmp_path / "run"),
        }
    )
    checked = check_compare(job)
    assert checked.sources["candidate"].kind == "store" and checked.sources["candidate"].id == uri
    assert not list(checked.folders["candidate"].glob("*.safetensors"))  # the actors fetch them
    assert checked.prefixes.shape == (4, 8) and not (tmp_path / "run").exists()
