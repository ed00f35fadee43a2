"""What dtm-ray's hf engine does on a GPU in bfloat16: one prepared check for a lent device.

No hub and no network: a random-weight Llama-architecture model (about 1.1 B parameters: hidden
2048, 22 layers, intermediate 5632, 16 heads, 4 KV heads) is built on the machine. It measures,
in bfloat16 on CUDA:

- the noise floor: positions where the model's own teacher-forced argmax differs from the token
  it generated greedily (decode and prefill kernels differ);
- batch invariance: the argmax of the same sequences scored in one batch of P and in batches of
  8 (bf16 kernels depend on the batch shape, so near-ties can flip: damage that is not damage);
- probes (magnitude, int8, int4-g128, wanda) with layer skip and with full passes: FDT/SDT equal
  on every (probe, prompt)? seconds per probe, probes per hour;
- weights after the probes: bit-identical to the originals;
- compression on the GPU against the CPU reference path: bit-identical per spec;
- peak GPU memory.

    python -m bench.checks.gpu_check --out DIR               # on a GPU (bench/checks/gpu_check.sh)
    python -m bench.checks.gpu_check --tiny --device cpu     # the same code path, in seconds

vLLM and Ray are not needed (the GPU image may not have them); the vLLM path is
bench/checks/gpu_vllm_check.py.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    SHAPES,
    Results,
    add_output_arguments,
    markdown_table,
    random_llama,
    weight_name,
)
from dtm_ray.core.compress import compress
from dtm_ray.core.metrics import fdt_at
from dtm_ray.engines.hf import HFEngine
from dtm_ray.engines.session import EngineSession

SPECS = ["magnitude:0.5", "int8", "int4-g128", "wanda:0.5"]
EXACT_SPECS = [*SPECS, "int8-tensor", "fp8-e4m3", "nm:2:4"]  # compared device vs CPU
KINDS = ["q", "down"]  # probed in three layers: first, middle, last


def build_model(folder: Path, size: str, device: str, dtype: torch.dtype) -> float:
    """The random Llama of `size` ("1b", or "toy" for --tiny) drawn on `device`; seconds."""
    start = time.perf_counter()
    dtype_name = str(dtype).removeprefix("torch.")
    random_llama(folder, SHAPES[size], dtype=dtype_name, device=device, max_positions=1024)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 4-layer toy model (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    add_output_arguments(p)
    args = p.parse_args()
    results = Results(args, "gpu_check", __doc__)
    size = "toy" if args.tiny else "1b"
    dtype = getattr(torch, args.dtype)
    result: dict = {
        "size": size,
        "dtype": args.dtype,
        "device": args.device,
        "torch": torch.__version__,
        "prompts": args.prompts,
        "prefix_tokens": args.prefix,
        "new_tokens": args.new,
    }
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
        torch.cuda.reset_peak_memory_stats()

    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    result["build_s"] = build_model(folder, size, args.device, dtype)
    start = time.perf_counter()
    engine = HFEngine(folder, dtype=args.dtype, device=args.device, batch_size=args.prompts)
    result["load_s"] = time.perf_counter() - start
    layers = engine.model.config.num_hidden_layers
    params = sum(p.numel() for p in engine.model.parameters())
    result["params"] = params
    vocab = engine.model.config.vocab_size
    rng = np.random.default_rng(0)
    prefixes = rng.integers(3, vocab, size=(args.prompts, args.prefix))

    # The reference and the noise floor.
    session = EngineSession(engine)
    synchronize(args.device)
    start = time.perf_counter()
    reference = session.build_reference(prefixes, args.new)
    synchronize(args.device)
    result["reference_s"] = time.perf_counter() - start
    result["noise_positions"] = int(reference.noise_positions.sum())
    result["noise_prompts"] = int((reference.noise_positions > 0).sum())
    result["tokens_per_s_generate_and_score"] = args.prompts * args.new / result["reference_s"]

    # Batch invariance: the same sequences in one batch and in batches of 8.
    sequences = reference.sequences.tolist()
    whole = engine.score(sequences, args.prefix)
    engine.batch_size = 8
    split = engine.score(sequences, args.prefix)
    engine.batch_size = args.prompts
    differ = whole.argmax != split.argmax
    result["batch_flips_positions"] = int(differ.sum())
    result["batch_flips_prompts"] = int(differ.any(axis=1).sum())
    result["batch_flips_max_margin"] = float(whole.margin[differ].max()) if differ.any() else 0.0

    # Wanda's calibration statistics: the input norms of the probed components.
    picked = [(layer, kind) for layer in (1, layers // 2, layers - 1) for kind in KINDS]
    names = {(layer, kind): weight_name(layer, kind) for layer, kind in picked}
    calibration = rng.integers(3, vocab, size=(16, args.prefix + args.new))
    norms = session.input_norms(calibration, list(names.values()))

    # Probes, with layer skip (the stream on the GPU in a 2 GiB budget; on a GPU too small for
    # it, in pinned host memory) and with full passes: identical results expected.
    per_layer = args.prompts * (args.prefix + args.new) * engine.model.config.hidden_size * 2
    modes = [("skip", 2 << 30, 0), ("full", 0, 0)]
    if per_layer * layers > 2 << 30:
        modes.insert(1, ("host", 2 << 30, 32 << 30))
    rows = []
    for mode, device_budget, host_budget in modes:
        skip = mode != "full"
        engine.residual_cache_bytes, engine.residual_host_bytes = device_budget, host_budget
        probing = EngineSession(engine)
        for (layer, kind), name in names.items():
            for spec in SPECS:
                synchronize(args.device)
                got = probing.probe({name: spec}, reference, {name: norms[name]})
                synchronize(args.device)
                rows.append(
                    {
                        "skip": skip,
                        "mode": mode,
                        "component": name,
                        "layer": layer,
                        "kind": kind,
                        "spec": spec,
                        "seconds": got.seconds,
                        "fdt": got.fdt.tolist(),
                        "sdt": got.sdt.tolist(),
                        "fdt_at_75": int(fdt_at(got.fdt, 75)),
                    }
                )
    skipped = [r for r in rows if r["mode"] == "skip"]
    full = [r for r in rows if r["mode"] == "full"]
    result["probes"] = len(skipped)
    result["skip_equals_full"] = sum(
        (a["fdt"], a["sdt"]) == (b["fdt"], b["sdt"]) for a, b in zip(skipped, full, strict=True)
    )
    result["seconds_per_probe_skip"] = float(np.median([r["seconds"] for r in skipped[1:]]))
    result["seconds_per_probe_full"] = float(np.median([r["seconds"] for r in full]))
    on_host = [r for r in rows if r["mode"] == "host"]
    if on_host:  # every layer's input in pinned host memory instead of every k-th on the GPU
        result["host_equals_full"] = sum(
            (a["fdt"], a["sdt"]) == (b["fdt"], b["sdt"]) for a, b in zip(on_host, full, strict=True)
        )
        result["seconds_per_probe_host"] = float(np.median([r["seconds"] for r in on_host[1:]]))
    result["probes_per_hour_skip"] = 3600 / result["seconds_per_probe_skip"]
    result["fdt_at_75"] = {f"{r['component']} {r['spec']}": r["fdt_at_75"] for r in skipped}

    # The probes put every weight back bit for bit.
    restored = 0
    for name in names.values():
        live = dict(engine.model.named_parameters())[name].detach().cpu()
        restored += int(torch.equal(live, engine.original_weight(name).cpu()))
    result["restored_bit_identical"] = f"{restored}/{len(names)}"

    # Compression on the device against the CPU reference path (what export replays).
    equal = {}
    for name in (names[(1, "q")], names[(layers - 1, "down")]):
        weight = engine.original_weight(name)
        stats = {"input_norm": torch.as_tensor(norms[name])}
        for spec in EXACT_SPECS:
            on_cpu = compress(weight.cpu(), spec, stats)
            on_device = compress(weight.to(args.device), spec, stats).cpu()
            equal[f"{name} {spec}"] = bool(torch.equal(on_cpu, on_device))
    result["device_compress_equals_cpu"] = equal

    if args.device.startswith("cuda"):
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summary = [
        [key, f"{value:.4g}" if isinstance(value, float) else value]
        for key, value in result.items()
        if key not in ("fdt_at_75", "device_compress_equals_cpu")
    ]
    summary.append(["device_compress_equals_cpu", f"{sum(equal.values())}/{len(equal)} equal"])
    unequal = [[k, "differs"] for k, v in equal.items() if not v]
    sections = [("Result", markdown_table(["figure", "value"], summary))]
    if unequal:
        sections.append(
            (
                "Compressions the device computed differently",
                markdown_table(["weight and spec", ""], unequal),
            )
        )
    results.write({**result, "rows": rows}, sections)


if __name__ == "__main__":
    main()
