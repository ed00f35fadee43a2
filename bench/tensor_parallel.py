"""Tensor parallelism, run for real: the same 2-round sparsify job with the vllm engine at
`tensor_parallel_size` 1 and 2 (vLLM's CPU build here, its `mp` executor: one worker process per
rank), compared on every (probe, prompt), on the decisions, the states and the final evaluation.

    python -m bench.tensor_parallel                      # magnitude
    python -m bench.tensor_parallel --criterion wanda    # wanda: row-parallel norms gathered
    python -m bench.tensor_parallel --out DIR

The model is a random 2-layer Llama with SmolLM2's tokenizer (the test suite's tiny model: one
KV head, so at TP 2 both ranks hold it whole), built locally; one engine actor per job.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from bench.common import LlamaShape, Results, add_output_arguments, markdown_table, random_llama


def build_model(folder: Path) -> Path:
    """The test suite's tiny model: 2 layers, one KV head, head_dim 64, SmolLM2's tokenizer."""
    from dtm_ray.engines.models import materialize

    model_dir = folder / "model"
    shape = LlamaShape(hidden=128, layers=2, intermediate=256, heads=2, kv_heads=1, vocab=49152)
    random_llama(model_dir, shape, tie_embeddings=True, tokenizer_from=materialize("smollm2-135m"))
    return model_dir


def run_job(model_dir: Path, out: Path, tp: int, criterion: str) -> float:
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job
    from dtm_ray.loop.driver import run_checked_job

    job = {
        "model": str(model_dir),
        "engine": "vllm",
        "dtype": "float32",
        "engine_options": {"tensor_parallel_size": tp},
        "prompts": {"source": "pydoc", "count": 8, "prefix_tokens": 8},
        "new_tokens": 16,
        "probe": {"components": "all"},
        "compress": {"target_sparsity": 0.2, "step": 0.1, "criterion": criterion},
        "evaluation": {"text": "pydoc", "count": 4, "tokens": 32},
        "workers": 1,
        "resources_per_worker": {"CPU": 2},
        "out": str(out),
    }
    path = out.parent / f"job-tp{tp}.yaml"
    path.write_text(yaml.safe_dump(job))
    start = time.perf_counter()
    run_checked_job(check_job(load_job(path)), print_summary=False)
    return time.perf_counter() - start


def states(run: Path) -> set[tuple]:
    table = pd.read_parquet(run / "states")
    return {(r.round, r.component, tuple(r.chain)) for r in table.itertuples()}


def compare(one: Path, two: Path) -> dict:
    probes = [pd.read_parquet(run / "probes") for run in (one, two)]
    keys = ["round", "component", "spec"]
    merged = probes[0].merge(probes[1], on=keys, suffixes=("_1", "_2"))
    assert len(merged) == len(probes[0]) == len(probes[1]), "the runs probed different things"
    fdt_1, fdt_2 = (np.stack(merged[f"fdt_{k}"].to_numpy()) for k in (1, 2))
    sdt_1, sdt_2 = (np.stack(merged[f"sdt_{k}"].to_numpy()) for k in (1, 2))
    final = [pd.read_parquet(run / "final" / "prompts") for run in (one, two)]
    return {
        "probes": len(merged),
        "rounds": int(merged["round"].nunique()),
        "pairs": int(fdt_1.size),
        "fdt_equal": int((fdt_1 == fdt_2).sum()),
        "sdt_equal": int((sdt_1 == sdt_2).sum()),
        "diverging_probes": int((fdt_1 < fdt_1.max()).any(axis=1).sum()),
        "states_equal": states(one) == states(two),
        "final_fdt_equal": bool(
            np.array_equal(final[0]["fdt"].to_numpy(), final[1]["fdt"].to_numpy())
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--criterion", choices=["magnitude", "wanda"], default="magnitude")
    add_output_arguments(p)
    args = p.parse_args(argv)
    results = Results(args, "tensor_parallel", __doc__)
    folder = Path(tempfile.mkdtemp(prefix="dtm-tp-"))
    model_dir = build_model(folder)
    seconds = {tp: run_job(model_dir, folder / f"run-tp{tp}", tp, args.criterion) for tp in (1, 2)}
    result = {
        "criterion": args.criterion,
        "seconds": {f"tp{tp}": s for tp, s in seconds.items()},
        **compare(folder / "run-tp1", folder / "run-tp2"),
    }
    rows = [[key, value] for key, value in result.items() if key != "seconds"]
    rows += [[f"seconds at {tp.upper()}", f"{s:.0f}"] for tp, s in result["seconds"].items()]
    results.write(result, [("TP 1 against TP 2", markdown_table(["figure", "value"], rows))])
    return result


if __name__ == "__main__":
    main()
