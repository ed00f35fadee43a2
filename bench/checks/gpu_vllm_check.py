"""What dtm-ray's vllm engine does on a GPU: the prepared check for a lent device that has vLLM.

The same random-weight Llama as `bench/checks/gpu_check.py` (about 1.1 B parameters, built on the
machine, no hub), served by `VLLMEngine` in each of these settings, one after another:

- `graphs`: CUDA graphs (the GPU default), batch invariance on (the default on NVIDIA >= 8.0);
- `graphs-variant`: CUDA graphs, batch invariance off;
- `eager`: no CUDA graphs (what wanda and layer skip need), batch invariance on.

Each setting measures, in bfloat16:

- the noise floor: the reference built whole, then the same sequences scored in slices of 8
  (as a reference is built across actors): argmax flips, and positions where the model's own
  teacher-forced argmax differs from the token it generated;
- whether the scoring hook scored (or the engine fell back to `prompt_logprobs`);
- probes by spec inside the workers (magnitude, int8, int4-g128; wanda where eager) on 6
  weights: seconds per probe, probes per hour, and (eager) layer skip equal to full passes;
- a 2-round magnitude sparsify of every linear weight: state-change seconds;
- compression in the workers against the reference path (the weight compressed here and loaded
  through vLLM's loader): the same parameter bytes per (weight, spec), and restores bit for bit;
- GPU memory in use (vLLM reserves `gpu_memory_utilization` of it).

    python -m bench.checks.gpu_vllm_check --out DIR      # on a GPU (bench/checks/gpu_check.sh)
    python -m bench.checks.gpu_vllm_check --tiny         # vLLM's CPU build, a toy model

Needs vLLM (and its torch); not Ray.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.checks.gpu_check import KINDS, build_model
from bench.common import KINDS as EVERY_KIND
from bench.common import Results, add_output_arguments, markdown_table, weight_name
from dtm_ray.core.compress import compress
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.session import EngineSession
from dtm_ray.engines.vllm import VLLMEngine

SETTINGS = {  # name: (enforce_eager, batch_invariant)
    "graphs": (False, True),
    "graphs-variant": (False, False),
    "eager": (True, True),
}
SPECS = ["magnitude:0.5", "int8", "int4-g128"]
EXACT = ["magnitude:0.5", "int8", "int4-g128", "wanda:0.5"]


def gpu_used_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def one_setting(folder: Path, args: argparse.Namespace, eager: bool, invariant: bool) -> dict:
    on_gpu = torch.cuda.is_available()
    out: dict = {"enforce_eager": eager}
    start = time.perf_counter()
    engine = VLLMEngine(
        folder,
        dtype=args.dtype,
        enforce_eager=eager,
        batch_invariant=invariant if on_gpu else False,
        gpu_memory_utilization=0.5,
        llm_kwargs={"skip_tokenizer_init": True},
    )
    out["start_s"] = time.perf_counter() - start
    out["batch_invariant"] = engine.batch_invariant
    try:
        layers = engine._num_layers
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        rng = np.random.default_rng(0)
        prefixes = rng.integers(3, vocab, size=(args.prompts, args.prefix))
        session = EngineSession(engine)

        # The reference whole, then scored in slices of 8 as actors build it.
        start = time.perf_counter()
        reference = session.build_reference(prefixes, args.new)
        out["reference_s"] = time.perf_counter() - start
        out["noise_positions"] = int(reference.noise_positions.sum())
        sequences = reference.sequences.tolist()
        whole = engine.score(sequences, args.prefix)
        sliced = [
            engine.score(sequences[i : i + 8], args.prefix) for i in range(0, len(sequences), 8)
        ]
        split = np.concatenate([s.argmax for s in sliced])
        differ = whole.argmax != split
        out["slice_flips_positions"] = int(differ.sum())
        out["slice_flips_prompts"] = int(differ.any(axis=1).sum())
        out["scoring_hook"] = bool(engine._hook_scoring)

        # Probes by spec, in the workers.
        names = [
            weight_name(layer, kind) for layer in (1, layers // 2, layers - 1) for kind in KINDS
        ]
        specs = list(SPECS)
        norms = {}
        if eager:
            calibration = rng.integers(3, vocab, size=(16, args.prefix + args.new))
            norms = session.input_norms(calibration, names)
            specs.append("wanda:0.5")
        rows = []
        for name in names:
            for spec in specs:
                stats = {name: norms[name]} if spec.startswith("wanda") else None
                got = session.probe({name: spec}, reference, stats)
                rows.append((name, spec, got.seconds, got.fdt.tolist(), got.sdt.tolist()))
        seconds = [r[2] for r in rows[1:]]
        out["probes"] = len(rows)
        out["seconds_per_probe"] = float(np.median(seconds))
        out["probes_per_hour"] = 3600 / out["seconds_per_probe"]
        if eager:  # layer skip against full passes (the engine's switch, set by hand)
            engine._layer_skip = False
            full = EngineSession(engine)
            equal = 0
            for name, spec, _, fdt, sdt in rows:
                stats = {name: norms[name]} if spec.startswith("wanda") else None
                again = full.probe({name: spec}, reference, stats)
                equal += (again.fdt.tolist(), again.sdt.tolist()) == (fdt, sdt)
            out["skip_equals_full"] = f"{equal}/{len(rows)}"

        # A 2-round magnitude sparsify of every linear weight.
        every = [weight_name(i, k) for i in range(layers) for k in EVERY_KIND]
        changes = []
        for level in (0.3, 0.5):
            state = ModelState({name: (Link(f"magnitude:{level}"),) for name in every})
            start = time.perf_counter()
            session.apply_state(state)
            changes.append(time.perf_counter() - start)
        out["state_change_s"] = changes
        session.apply_state(ModelState())

        # In the workers vs the reference path, and restores, by parameter digest.
        dense = engine.params_digest()
        mismatches = []
        for name in (names[0], names[-1]):
            original = engine.original_weight(name)
            norm = np.random.default_rng(1).uniform(0.5, 2.0, original.shape[1]).astype("f4")
            for spec in EXACT:
                link = Link(spec, None, norm if spec.startswith("wanda") else None)
                engine.set_weights({name: compress(original, spec, link.stats)})
                expected = engine.params_digest()
                engine.restore([name])
                if engine.params_digest() != dense:
                    mismatches.append(f"{name} {spec}: restore")
                engine.compress_in_place({name: (link,)}, keep=True)
                if engine.params_digest() != expected:
                    mismatches.append(f"{name} {spec}: in the workers")
                engine.put_back([name])
                if engine.params_digest() != dense:
                    mismatches.append(f"{name} {spec}: put back")
        out["workers_equal_reference"] = f"{2 * len(EXACT) - len(mismatches)}/{2 * len(EXACT)}"
        out["mismatches"] = mismatches
        out["gpu_used_gib"] = gpu_used_gib()
    finally:
        engine.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 4-layer toy model (smoke test)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--settings", default=",".join(SETTINGS))
    add_output_arguments(p)
    args = p.parse_args()
    results = Results(args, "gpu_vllm_check", __doc__)
    on_gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    size = "toy" if args.tiny else "1b"
    folder = Path(tempfile.mkdtemp(prefix="gpu-vllm-check-"))
    result: dict = {
        "size": size,
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
        "torch": torch.__version__,
        "build_s": build_model(
            folder, size, "cuda" if on_gpu else "cpu", getattr(torch, args.dtype)
        ),
    }
    import vllm

    result["vllm"] = vllm.__version__
    for name in args.settings.split(","):
        eager, invariant = SETTINGS[name]
        try:
            result[name] = one_setting(folder, args, eager, invariant)
        except Exception as err:  # one setting failing must not hide the others' numbers
            result[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        print(name, json.dumps(result[name], default=str), flush=True)
    names = args.settings.split(",")
    figures = sorted({k for name in names for k in result[name]})
    rows = [[k, *(json.dumps(result[n].get(k, ""), default=str) for n in names)] for k in figures]
    table = markdown_table(["figure", *names], rows)
    results.write(result, [(f"{result['size']} model, {args.dtype}", table)])


if __name__ == "__main__":
    main()
