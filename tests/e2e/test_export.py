"""`dtm-ray export` on real finished runs of the tiny Llama: the checkpoint loads in transformers
and vLLM and generates the run's final FDTs, the maps describe the exported tensors, weights no
chain touched stay bit-identical, the llm-compressor recipe lists the allocation in module order
(and, where llm-compressor is installed, reproduces it), and unfinished runs are refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml
from safetensors.torch import load_file
from support.jobs import EVALUATION, FDT_SPARSIFY, run_job, tiny_job
from support.transformers_check import (
    dense_reference,
    final_fdt,
    first_divergence,
    free_running_greedy,
)

from dtm_ray.cli import main
from dtm_ray.records.schemas import STATE_SCHEMA
from dtm_ray.records.store import RunStore

N_NEW = 16


SPARSIFY = FDT_SPARSIFY
QUANTIZE = {"method": "quantize", "levels": ["int4-g64", "int8"], "min_fdt": 8}
RUNS = {  # the FDT-guided run of test_compression, and two one-round baselines
    "magnitude": SPARSIFY,
    "wanda": {**SPARSIFY, "guide": "uniform", "criterion": "wanda", "calibration_count": 4},
    "quantize": {**QUANTIZE, "guide": "uniform", "max_params_share": 0.3},
}
UNIFORM = {**SPARSIFY, "guide": "uniform"}  # run in bfloat16 on the float32 checkpoint
INT4 = {"method": "quantize", "levels": ["int4-g64"], "min_fdt": 8, "guide": "uniform"}
# Every stored format at once, in bfloat16: a quarter of the parameters per level in model order,
# the rest dense (so `ignore` is exercised and layer 1's fused shards differ).
MIXED = {
    "method": "quantize",
    "levels": ["int4-g32", "fp8-e4m3", "int8-tensor"],
    "min_fdt": 8,
    "guide": "uniform",
    "max_params_share": 0.25,
}


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def exported(
    ray_session, fdt_sparsify_run, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], tuple[Path, Path]]:
    """name -> (run dir, export dir) of a finished run, made and exported once per module (the
    magnitude run is the session's FDT-guided run)."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            if name == "magnitude":
                run = fdt_sparsify_run[0]
            else:
                folder = tmp_path_factory.mktemp(name)
                compress, dtype = {
                    "bfloat16": (UNIFORM, "bfloat16"),
                    "mixed": (MIXED, "bfloat16"),
                    "int4": (INT4, "bfloat16"),
                }.get(name, (RUNS.get(name), "auto"))
                job = tiny_job(
                    tiny_llama_dir, folder / "run", compress=compress, dtype=dtype,
                    evaluation=EVALUATION,
                )  # fmt: skip
                run_job(folder, job)
                run = folder / "run"
            code, printed = cli("export", str(run))
            assert code == 0
            assert printed.strip() == str(run / "export")
            made[name] = run, run / "export"
        return made[name]

    return get


def final_states(run: Path) -> pd.DataFrame:
    states = pd.read_parquet(run / "states")
    return states[states["round"] == states["round"].max()].set_index("component")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def linear_modules_in_order(model_dir: Path) -> list[str]:
    """Module order as llm-compressor sees it: transformers' named_modules()."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# --- the checkpoint ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_exported_checkpoint_generates_the_runs_final_fdt_in_transformers(exported, name):
    from transformers import AutoModelForCausalLM

    run, export = exported(name)
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    # On every prompt role, the held-out test prompts first: what final/ leads with.
    for role in ("test", "validate", "decide"):
        prefixes, continuation = dense_reference(run, role)
        fdt = first_divergence(free_running_greedy(model, prefixes, N_NEW), continuation)
        np.testing.assert_array_equal(fdt, final_fdt(run, role), err_msg=role)


def test_exported_checkpoint_generates_the_same_tokens_in_vllm(exported):
    pytest.importorskip("vllm")
    from dtm_ray.engines.vllm import VLLMEngine

    run, export = exported("magnitude")
    prefixes, continuation = dense_reference(run)
    engine = VLLMEngine(export, dtype="float32")
    try:
        tokens = engine.generate_greedy(prefixes.tolist(), N_NEW)
    finally:
        engine.close()
    np.testing.assert_array_equal(first_divergence(tokens, continuation), final_fdt(run))


@pytest.mark.parametrize("name", list(RUNS))
def test_maps_describe_the_exported_tensors_and_untouched_weights_are_bit_identical(
    exported, tiny_llama_dir: Path, name: str
):
    run, export = exported(name)
    states = final_states(run)
    saved, original = tensors(export), tensors(tiny_llama_dir)
    assert sorted(saved) == sorted(original)
    sparsity = json.loads((export / "sparsity_map.json").read_text())
    assert sorted(sparsity) == sorted(states.index)
    for weight, share in sparsity.items():
        zeros = 1.0 - torch.count_nonzero(saved[weight]).item() / saved[weight].numel()
        assert share == pytest.approx(zeros, abs=1e-12)
        assert share == pytest.approx(states.loc[weight, "sparsity"], abs=1e-12)
    chained = {n for n, chain in states["chain"].items() if len(chain)}
    assert chained  # every run here compressed something
    for weight, tensor in original.items():
        if weight not in chained:
            assert saved[weight].dtype == tensor.dtype
            assert torch.equal(saved[weight], tensor), weight
    for file in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (export / file).read_bytes() == (tiny_llama_dir / file).read_bytes()

    precision = json.loads((export / "precision_map.json").read_text())
    components = pd.read_parquet(run / "final" / "components").set_index("component")
    assert precision == components["precision"].to_dict()  # float32 engines, float32 checkpoint
    summary = pd.read_parquet(run / "final" / "summary").iloc[0]
    meta = json.loads((export / "export.json").read_text())
    assert meta["run_dir"] == str(run) and meta["model"] == str(tiny_llama_dir)
    assert meta["summary"]["fdt_at_75"] == summary["fdt_at_75"]
    # export.json quotes the held-out test numbers first, the in-sample ones last.
    assert list(meta["fdt"]) == ["test", "validate", "decide (in-sample)"]
    assert meta["fdt"]["test"]["fdt_at_75"] == summary["test_fdt_at_75"]


def test_wanda_links_replay_with_the_runs_calibration_norms(exported, tiny_llama_dir: Path):
    run, export = exported("wanda")
    states = final_states(run)
    calibration = pd.read_parquet(run / "calibration")
    saved, original = tensors(export), tensors(tiny_llama_dir)
    for weight, row in states.iterrows():
        (spec,), (stats_round,) = list(row["chain"]), list(row["stats_rounds"])
        norms = calibration[(calibration["round"] == stats_round)].set_index("component")
        norm = torch.tensor(norms.loc[weight, "input_norm"], dtype=torch.float32)
        # Plain torch: per row, zero the round(s * in) smallest |w| * ||x||, ties by index.
        w = original[weight]
        k = round(float(spec.split(":")[1]) * w.shape[1])
        order = torch.argsort(w.abs() * norm, dim=1, stable=True)[:, :k]
        expected = w.clone().scatter_(1, order, 0.0)
        assert torch.equal(saved[weight], expected), weight


def test_chains_replay_in_the_runs_engine_dtype_and_save_in_the_checkpoints(
    exported, tiny_llama_dir: Path
):
    run, export = exported("bfloat16")
    states = final_states(run)
    saved, original = tensors(export), tensors(tiny_llama_dir)
    assert json.loads((export / "export.json").read_text())["engine_dtype"] == "bfloat16"
    sparsity = json.loads((export / "sparsity_map.json").read_text())
    for weight, row in states.iterrows():
        (spec,) = list(row["chain"])
        # Plain torch: the run pruned the bfloat16 weight, ties by flat index.
        w = original[weight].to(torch.bfloat16).flatten()
        k = round(float(spec.split(":")[1]) * w.numel())
        expected = w.clone().index_fill_(0, torch.argsort(w.abs(), stable=True)[:k], 0)
        assert saved[weight].dtype == torch.float32  # the checkpoint's dtype
        assert torch.equal(saved[weight], expected.view_as(saved[weight]).float()), weight
        assert sparsity[weight] == pytest.approx(row["sparsity"], abs=1e-12)


# --- the compressed-tensors checkpoint -----------------------------------------------------------
def _teacher_forced_fdt(model_dir: Path, dtype: str, run: Path) -> np.ndarray:
    """FDT of `model_dir` against the run's dense reference, scored the way the run scored."""
    from dtm_ray.engines.hf import HFEngine

    reference = pd.read_parquet(run / "reference")
    dense = reference[reference["round"] == 0].sort_values("prompt_id")
    prefixes, continuation = (
        np.stack(dense[c].to_numpy()) for c in ("prefix_ids", "continuation_ids")
    )
    engine = HFEngine(model_dir, dtype=dtype)
    scored = engine.score(
        np.concatenate([prefixes, continuation], axis=1).tolist(), prefixes.shape[1]
    )
    return first_divergence(scored.argmax, np.stack(dense["base_argmax"].to_numpy()))


@pytest.mark.parametrize("name, dtype", [("quantize", torch.float32), ("mixed", torch.bfloat16)])
def test_compressed_checkpoint_decodes_to_the_measured_weights_and_fdt(
    exported, tiny_llama_dir: Path, name: str, dtype: torch.dtype
):
    from transformers import AutoModelForCausalLM

    from dtm_ray.core.compress import compress

    run, export = exported(name)
    compressed = export / "compressed"
    meta = json.loads((export / "export.json").read_text())
    assert meta["checkpoints"] == {"dense": ".", "compressed": "compressed"}  # auto: both
    final = final_fdt(run)
    dtype_name = str(dtype).removeprefix("torch.")
    np.testing.assert_array_equal(_teacher_forced_fdt(compressed, dtype_name, run), final)

    states = final_states(run)
    levels = {n: chain[-1] for n, chain in states["chain"].items() if len(chain)}
    config = json.loads((compressed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("mixed-precision" if name == "mixed" else "pack-quantized")
    targets = {}
    for group in config["config_groups"].values():
        weights = group["weights"]
        assert weights["symmetric"] and group["format"] in ("pack-quantized", "float-quantized")
        for module in group["targets"]:
            targets[f"{module}.weight"] = (
                weights["type"],
                weights["num_bits"],
                weights["strategy"],
            )
    expected = {
        "int4-g64": ("int", 4, "group"),
        "int4-g32": ("int", 4, "group"),
        "int8": ("int", 8, "channel"),
        "int8-tensor": ("int", 8, "channel"),
        "fp8-e4m3": ("float", 8, "channel"),
    }
    assert targets == {n: expected[level] for n, level in levels.items()}
    dense = sorted(n.removesuffix(".weight") for n in states.index if n not in levels)
    assert dense and sorted(config["ignore"]) == sorted(["lm_head", *dense])

    stored = tensors(compressed)
    for weight, level in levels.items():
        module = weight.removesuffix(".weight")
        assert weight not in stored or level == "fp8-e4m3"  # int weights only packed
        if level == "int8-tensor":  # its one scale, once per row
            assert stored[f"{module}.weight_scale"].unique().numel() == 1
    # The rest is saved in the run's dtype (bfloat16 runs of the float32 checkpoint), as measured.
    assert stored["model.embed_tokens.weight"].dtype == dtype
    assert json.loads((compressed / "config.json").read_text())["dtype"] == str(dtype)[6:]
    size = {f: sum(p.stat().st_size for p in f.glob("*.safetensors")) for f in (export, compressed)}
    assert size[compressed] < size[export]

    # What transformers decodes (it decompresses compressed-tensors checkpoints on load or on the
    # first forward pass) is, bit for bit, each chain applied to the original in the run's dtype.
    model = AutoModelForCausalLM.from_pretrained(compressed, dtype=dtype).eval()
    prefixes, continuation = dense_reference(run) if dtype == torch.float32 else (None, None)
    if prefixes is not None:  # float32: plain greedy generation agrees with the run's FDT too
        fdt = first_divergence(free_running_greedy(model, prefixes, N_NEW), continuation)
        np.testing.assert_array_equal(fdt, final)
    else:
        with torch.inference_mode():
            model(torch.ones(1, 4, dtype=torch.long))
    decoded = model.state_dict()
    original = tensors(tiny_llama_dir)
    for weight, chain in states["chain"].items():
        expected_weight = original[weight].to(dtype)
        for spec in chain:
            expected_weight = compress(expected_weight, spec)
        assert decoded[weight].dtype == dtype
        as_int = torch.int32 if dtype == torch.float32 else torch.int16  # compare bits, not values
        assert torch.equal(decoded[weight].view(as_int), expected_weight.view(as_int)), weight


def test_export_formats(exported, tmp_path: Path):
    run, _ = exported("quantize")
    for fmt in ("dense", "compressed"):
        out = tmp_path / fmt
        assert cli("export", str(run), "--out", str(out), "--format", fmt) == (0, f"{out}\n")
        meta = json.loads((out / "export.json").read_text())
        top = sorted(p.name for p in out.glob("*.safetensors"))
        if fmt == "dense":
            assert (
                meta["checkpoints"] == {"dense": "."} and top and not (out / "compressed").exists()
            )
        else:
            assert meta["checkpoints"] == {"compressed": "compressed"} and not top
            assert (out / "compressed" / "config.json").is_file()
        assert (out / "precision_map.json").is_file() and (out / "recipe.yaml").is_file()
    # A sparsify run's export stays dense only: compressed-tensors has no sparse format.
    _, export = exported("magnitude")
    assert not (export / "compressed").exists()
    assert json.loads((export / "export.json").read_text())["checkpoints"] == {"dense": "."}


def test_vllm_cpu_build_serves_an_int4_export_in_bfloat16(exported):
    """The CPU build's 4-bit kernel (W4A16; on CPUs with AMX W4A8 unless VLLM_CPU_INT4_W4A8=0,
    which this test leaves as the machine has it): the packed checkpoint loads through it and
    scores what the dense export of the same weights scores in the same engine, up to the
    kernel's own rounding: a token may flip only where the top two are within bf16 resolution
    (on SmolLM2, 10 of 512 positions flipped, all at margins <= 0.125; on the tiny Llama with
    W4A8, 0 of 128, log-probabilities within 0.008)."""
    pytest.importorskip("vllm")
    from dtm_ray.engines.vllm import VLLMEngine

    run, export = exported("int4")
    assert json.loads((export / "export.json").read_text())["serving"]["vllm_cpu"] == []
    reference = pd.read_parquet(run / "reference")
    dense = reference[reference["round"] == 0].sort_values("prompt_id")
    prefixes = np.stack(dense["prefix_ids"].to_numpy())
    sequences = np.concatenate([prefixes, np.stack(dense["continuation_ids"].to_numpy())], axis=1)
    scored = {}
    for folder in ("compressed", "."):
        engine = VLLMEngine(export / folder, dtype="bfloat16")
        try:
            scored[folder] = engine.score(sequences.tolist(), prefixes.shape[1])
        finally:
            engine.close()
    packed, plain = scored["compressed"], scored["."]
    clear = plain.margin > 0.25  # two bf16 steps of a logit near 16-32
    np.testing.assert_array_equal(packed.argmax[clear], plain.argmax[clear])
    np.testing.assert_allclose(packed.ref_logprob, plain.ref_logprob, atol=0.3)
    fdt = first_divergence(plain.argmax, np.stack(dense["base_argmax"].to_numpy()))
    assert (fdt < N_NEW).any()  # int4 everywhere changed some tokens: the scores are not vacuous


# --- the recipe ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_recipe_lists_the_allocation_in_module_order(exported, tiny_llama_dir: Path, name: str):
    run, export = exported(name)
    text = (export / "recipe.yaml").read_text()
    assert text.startswith("# llm-compressor recipe") and f"# run: {run}\n" in text
    recipe = yaml.safe_load(text)
    states = final_states(run)
    order = linear_modules_in_order(tiny_llama_dir)
    sparsity = json.loads((export / "sparsity_map.json").read_text())
    precision = json.loads((export / "precision_map.json").read_text())

    def in_order(weights: set[str]) -> list[str]:
        return [m for m in order if f"{m}.weight" in weights]

    pruned = {n for n, chain in states["chain"].items() if any(":" in s for s in chain)}
    if pruned:
        ((modifier, args),) = recipe["sparsity_stage"]["sparsity_modifiers"].items()
        assert modifier == ("WandaPruningModifier" if name == "wanda" else "SparseGPTModifier")
        assert args["targets"] == in_order(pruned)
        expected = [sparsity[f"{m}.weight"] for m in args["targets"]]
        np.testing.assert_allclose(args["sparsity"], expected, atol=1e-6)
    else:
        assert "sparsity_stage" not in recipe

    quantized = {n: p for n, p in precision.items() if p != "float32"}
    if quantized:
        quant = recipe["quantization_stage"]["quantization_modifiers"]["QuantizationModifier"]
        assert quant["ignore"] == ["lm_head"]
        levels = {}
        for group in quant["config_groups"].values():
            weights = group["weights"]
            level = f"int{weights['num_bits']}" + (
                f"-g{weights['group_size']}" if weights["strategy"] == "group" else ""
            )
            assert weights["symmetric"] and weights["type"] == "int"
            levels[level] = group["targets"]
        assert set(levels) == set(quantized.values())
        for level, targets in levels.items():
            assert targets == in_order({n for n, p in quantized.items() if p == level})
    else:
        assert "quantization_stage" not in recipe


# llm-compressor pins transformers and compressed-tensors apart from this project, so it runs in
# its own interpreter: this one if it has llm-compressor, else DTM_RAY_LLMCOMPRESSOR_PYTHON.
_LLMC_CHECK = """
import json, sys
import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.recipe import Recipe
from transformers import AutoModelForCausalLM

recipe, model_dir = sys.argv[1], sys.argv[2]
Recipe.create_instance(recipe)  # the recipe loader validates every modifier's arguments
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ids = torch.randint(3, 1000, (8, 32), generator=torch.Generator().manual_seed(0)).tolist()
data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 8})
oneshot(model=model, recipe=recipe, dataset=data, num_calibration_samples=8, max_seq_length=32)
out = {}
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear) and name != "lm_head":
        scheme = getattr(module, "quantization_scheme", None)
        weights = None if scheme is None else scheme.weights.model_dump(mode="json")
        zeros = 1 - torch.count_nonzero(module.weight).item() / module.weight.numel()
        out[name + ".weight"] = {"sparsity": zeros, "weights": weights}
print("RESULT " + json.dumps(out))
"""


def _llmcompressor_python() -> str | None:
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    return os.environ.get("DTM_RAY_LLMCOMPRESSOR_PYTHON")


@pytest.mark.skipif(
    _llmcompressor_python() is None,
    reason="llm-compressor not importable here; DTM_RAY_LLMCOMPRESSOR_PYTHON names one that has it",
)
@pytest.mark.parametrize("name", list(RUNS))
def test_llm_compressor_reproduces_the_allocation(
    exported, tiny_llama_dir: Path, tmp_path: Path, name: str
):
    python = _llmcompressor_python()
    run, export = exported(name)
    script = tmp_path / "check.py"
    script.write_text(_LLMC_CHECK)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(
        [python, str(script), str(export / "recipe.yaml"), str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.rpartition("RESULT ")[2])
    sparsity = json.loads((export / "sparsity_map.json").read_text())
    precision = json.loads((export / "precision_map.json").read_text())
    for weight, got in result.items():
        if RUNS[name].get("method") != "quantize":
            # Wanda prunes per row as dtm_ray does; SparseGPT's masks come out within a few
            # entries of the asked share.
            assert got["sparsity"] == pytest.approx(sparsity[weight], abs=2e-3), weight
        level = precision[weight]
        if level == "float32":
            assert got["weights"] is None, weight
        else:
            expected = {"int8": ("channel", 8, None), "int4-g64": ("group", 4, 64)}[level]
            weights = got["weights"]
            assert (weights["strategy"], weights["num_bits"], weights["group_size"]) == expected


# --- refusals ------------------------------------------------------------------------------------
def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run_json(run: Path, compress: dict | None) -> None:
    run.mkdir(parents=True)
    config = {"model": "smollm2-135m", "dtype": "auto", "compress": compress}
    (run / "run.json").write_text(json.dumps({"config": config}))


@pytest.mark.parametrize("case", ["no-run-json", "only-run-json", "probe-only", "no-final"])
def test_export_of_an_unfinished_run_is_refused_and_writes_nothing(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]
):
    run = tmp_path / "run"
    if case == "no-run-json":
        run.mkdir()
    else:
        _run_json(run, None if case == "probe-only" else {"method": "sparsify"})
    if case == "no-final":  # a round committed, the final evaluation not yet written
        row = {"round": 0, "component": "w", "layer": 0, "kind": "q", "params": 4}
        table = pa.Table.from_pylist([{**row, "chain": [], "stats_rounds": []}], STATE_SCHEMA)
        RunStore(str(run)).write_round_table("states", 0, table)
    before = _listing(tmp_path)
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtm-ray: error: ") and str(run) in lines[0]
    assert _listing(tmp_path) == before


def test_export_replaces_a_previous_export_but_never_other_folders(exported, tmp_path: Path):
    run, export = exported("magnitude")
    out = tmp_path / "out"
    assert cli("export", str(run), "--out", str(out)) == (0, f"{out}\n")
    first = (out / "model.safetensors").read_bytes()
    assert cli("export", str(run), "--out", str(out)) == (0, f"{out}\n")
    assert (out / "model.safetensors").read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no scratch folder left behind

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli("export", str(run), "--out", str(other))[0] == 2
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
