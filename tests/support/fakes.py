"""Made-up inputs the tests share: config-only Llama-2 folders, a fake engine's noise answer, the
sensitivity tests' model state and candidates, and the secrets the redaction tests plant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dtm_ray.core.decisions.sparsify import absolute_sparsity
from dtm_ray.core.state import Link, ModelState

if TYPE_CHECKING:
    import torch

# Llama-2's published config.json values: enough for validation without the weights.
LLAMA2 = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
    },
    "13b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
    },
    "70b": {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
    },
}


def llama2_folder(root: Path, size: str) -> Path:
    folder = root / f"Llama-2-{size}-hf"
    folder.mkdir()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_key_value_heads": LLAMA2[size].get(
            "num_key_value_heads", LLAMA2[size]["num_attention_heads"]
        ),
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "torch_dtype": "float16",
        **LLAMA2[size],
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def folder_like(model_dir: Path, out: Path, weights: dict[str, torch.Tensor] | None) -> Path:
    """A copy of `model_dir` (its small files copied, its weights linked) with `weights` saved
    instead when given."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            if weights is None:
                (out / path.name).symlink_to(path)
        else:
            shutil.copy(path, out / path.name)
    if weights is not None:
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def measured(fdt: list[int], sdt: list[int], worker: str) -> dict:
    return {
        "worker": worker,
        "host": "h",
        "node": "n",
        "engine": "hf",
        "dtype": "float32",
        "batch_invariant": False,
        "fdt": np.array(fdt),
        "sdt": np.array(sdt),
        "seconds": 0.5,
    }


# --- sensitivity: components of the tiny Llama, a state with chains, probes on top of it
Q0 = "model.layers.0.self_attn.q_proj.weight"
V1 = "model.layers.1.self_attn.v_proj.weight"
GATE0 = "model.layers.0.mlp.gate_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
S0 = 0.36  # Q0's sparsity in the state below
ADDED = 0.5


def chained_state() -> ModelState:
    return ModelState(
        {
            Q0: (Link("magnitude:0.2"), Link(f"magnitude:{S0}")),
            DOWN1: (Link("int8"),),
        }
    )


def candidates() -> dict[str, list[str]]:
    # A sparsify probe on a component that has a chain prunes to s0 + a (1 - s0).
    return {
        Q0: [f"magnitude:{absolute_sparsity(S0, ADDED)}", "int8"],
        V1: ["int4-g64", "magnitude:0.5"],
        GATE0: ["nm:2:4"],
        DOWN1: ["int4-g64"],
    }


def calibration(count: int = 6, length: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 5000, size=(count, length))


# --- secrets planted where a run could leak them
HF_TOKEN = "hf_PLANTEDxHUBxTOKEN0123456789"
AWS_SECRET = "PLANTED/aws+secret/KEY0123456789abcdef"
DB_PASSWORD = "planted-db-password-4711"
