"""What the anchors' sensitivity signals cost on SmolLM2, per engine, beside one plain forward
pass over the same calibration text (the ratio is what to read on a shared machine).

    python bench/sensitivity_cost.py --out runs/sensitivity_cost.json [--engines hf vllm]

The state: the 21 weights of layers 0, 15 and 29 at magnitude 0.3 (a second sparsify round).
Candidates per weight: the sparsify probe points of step 0.1 on top of that (added 0.05 and
0.15, so absolute 0.335 and 0.405), and, separately, int4-g64 and int8. Calibration: 16 windows
of 96 tokens of the shipped `pydoc` text; fisher in batches of 8 (2 forward + backward passes).
One torch thread per engine, as an engine actor with {CPU: 1} runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from dtm_ray.core.decisions.sparsify import absolute_sparsity
from dtm_ray.core.state import Link, ModelState
from dtm_ray.engines.models import materialize
from dtm_ray.engines.prompts import load_calibration
from dtm_ray.engines.session import EngineSession

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
KINDS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LAYERS = (0, 15, 29)
S0 = 0.3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/sensitivity_cost.json")
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = materialize("smollm2-135m")
    names = [f"model.layers.{layer}.{kind}.weight" for layer in LAYERS for kind in KINDS]
    state = ModelState({name: (Link(f"magnitude:{S0}"),) for name in names})
    sets = {
        "sparsify": [f"magnitude:{absolute_sparsity(S0, a)}" for a in (0.05, 0.15)],
        "quantize": ["int4-g64", "int8"],
    }
    sequences = load_calibration("pydoc", model_dir, args.sequences, args.tokens, 16, 16, seed=0)
    out = {
        "model": "smollm2-135m",
        "dtype": "float32",
        "components": len(names),
        "calibration": {"sequences": args.sequences, "tokens": args.tokens},
        "batch_size": args.batch_size,
        "commit": subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": platform.platform(),
        "engines": {},
    }
    for kind in args.engines:
        if kind == "hf":
            from dtm_ray.engines.hf import HFEngine

            engine = HFEngine(model_dir, dtype="float32", batch_size=args.batch_size)
        else:
            from dtm_ray.engines.vllm import VLLMEngine

            engine = VLLMEngine(model_dir, dtype="float32")
        session = EngineSession(engine)
        try:
            session.apply_state(state)
            session.text_nll(sequences)  # warm-up
            start = time.perf_counter()
            session.text_nll(sequences)
            forward = time.perf_counter() - start
            timings = {"forward_s": forward}
            for label, specs in sets.items():
                cands = {name: specs for name in names}
                for guide in ("weight_error", "fisher"):
                    result = session.sensitivity(guide, cands, sequences, None, args.batch_size)
                    timings[f"{guide}/{label}"] = {
                        "seconds": result.seconds,
                        "per_forward": result.seconds / forward,
                        "passes": result.passes,
                        "rows": len(result.rows),
                    }
                    print(kind, guide, label, f"{result.seconds:.2f} s", flush=True)
            out["engines"][kind] = timings
        finally:
            engine.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
