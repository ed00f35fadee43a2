"""Memory and state-change time of Llama-2 13B and 70B sparsify runs, projected from the memory
plan's formulas (`dtm_ray.job.memory`, what `dtm-ray plan` prints) and a state-change rate
measured by `bench/scale_rehearsal.py` (pass it with --rate-gbps; the default is the rehearsal's
1.1 B model in bf16 on one H100: every weight, 1.94 GB, changed in 2.7 s).

    python -m bench.memory_projection [--rate-gbps 0.72] [--out DIR]

No model, no GPU: the shapes are the published configs.
"""

from __future__ import annotations

import argparse

from bench.common import Results, add_output_arguments, markdown_table
from dtm_ray.core.components import components_from_config
from dtm_ray.job.memory import GIB, memory_plan, model_weights
from dtm_ray.job.spec import JobConfig, PromptsConfig
from dtm_ray.loop.estimate import EXPORT_BYTES_PER_SECOND

LLAMA2_13B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "num_hidden_layers": 40,
    "vocab_size": 32000,
}
LLAMA2_70B = {
    **LLAMA2_13B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_hidden_layers": 80,
}
# (name, config, tensor-parallel size, engine actors) on 8 x H100 80 GB nodes.
CASES = [("Llama-2-13B", LLAMA2_13B, 1, 8), ("Llama-2-70B", LLAMA2_70B, 4, 2)]


def project(rate_bytes_per_s: float) -> list[dict]:
    rows = []
    for name, config, tp, workers in CASES:
        every = components_from_config(config)
        for prompts, new_tokens, eager in ((128, 128, False), (512, 256, True)):
            job = JobConfig(
                model=name,
                engine="vllm",
                dtype="bfloat16",
                engine_options={"tensor_parallel_size": tp, "enforce_eager": eager},
                prompts=PromptsConfig(count=prompts, prefix_tokens=32),
                new_tokens=new_tokens,
                workers=workers,
                resources_per_worker={"GPU": tp},
            )
            plan = memory_plan(config, job, every, every, gpu_bytes=80 * GIB, node_gpus=8)
            selected = sum(c.params for c in every) * 2
            device = dict(plan.device or [])
            rows.append(
                {
                    "model": name,
                    "tp": tp,
                    "prompts": prompts,
                    "new_tokens": new_tokens,
                    "eager": eager,
                    "weights_gib": model_weights(config, every) * 2 / GIB,
                    "gpu_gib": plan.device_total / GIB,
                    "gpu_residual_gib": device["kept residual stream"] / GIB,
                    "host_residual_gib": dict(plan.host).get("kept residual stream, pinned", 0)
                    / GIB,
                    "host_per_actor_gib": plan.host_total / GIB,
                    "host_per_node_gib": plan.node_host / GIB,
                    "actors_per_node": plan.actors_per_node,
                    "state_change_s": selected / rate_bytes_per_s,
                    "export_s": model_weights(config, every) * 2 / EXPORT_BYTES_PER_SECOND,
                    "fits": not plan.problems,
                    "warnings": plan.warnings,
                }
            )
    return rows


def kept_stream(row: dict) -> str:
    """Where layer skip keeps the residual stream: on the GPU, in pinned host memory, or not."""
    if row["gpu_residual_gib"]:
        return f"{row['gpu_residual_gib']:.1f} GiB on the GPU"
    if row["host_residual_gib"]:
        return f"{row['host_residual_gib']:.1f} GiB, pinned host"
    return "0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate-gbps", type=float, default=1.94 / 2.7, help="state change, GB/s")
    add_output_arguments(p)
    args = p.parse_args()
    results = Results(args, "memory_projection", __doc__)
    rows = project(args.rate_gbps * 1e9)
    table = markdown_table(
        [
            "model",
            "TP",
            "prompts × new tokens",
            "CUDA graphs",
            "GPU per rank GiB",
            "kept stream per actor",
            "host per actor GiB",
            "host per node GiB",
            "state change s",
            "export s",
            "fits",
        ],
        [
            [
                r["model"],
                r["tp"],
                f"{r['prompts']} × {r['new_tokens']}",
                "no" if r["eager"] else "yes",
                f"{r['gpu_gib']:.1f}",
                kept_stream(r),
                f"{r['host_per_actor_gib']:.1f}",
                f"{r['host_per_node_gib']:.0f}",
                f"{r['state_change_s']:.0f}",
                f"{r['export_s']:.0f}",
                "yes" if r["fits"] else "NO",
            ]
            for r in rows
        ],
    )
    warnings = "\n".join(
        f"- {r['model']}, {r['prompts']} prompts: {w}" for r in rows for w in r["warnings"]
    )
    assumptions = (
        f"State change at {args.rate_gbps:.2f} GB/s of selected weights per actor; export at "
        f"{EXPORT_BYTES_PER_SECOND / 1e6:.0f} MB/s, the plan's assumption; 8 × 80 GiB GPUs a node."
    )
    sections = [("Projection", f"{table}\n\n{assumptions}")]
    if warnings:
        sections.append(("What the plan warns", warnings))
    results.write({"rate_gbps": args.rate_gbps, "rows": rows}, sections)


if __name__ == "__main__":
    main()
