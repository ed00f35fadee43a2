"""The independent references tests compare the engines and runs with: plain transformers
free-running greedy generation, the first position where two token arrays part, full-logit
statistics from one plain forward pass, and the engine protocol's signatures."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dtm_ray.engines.base import Engine


def free_running_greedy(model, prefixes: np.ndarray, n_new: int) -> np.ndarray:  # noqa: ANN001
    """`n_new` greedy tokens after each prefix, EOS ignored: int64 [P, n_new]."""
    ids = torch.as_tensor(np.asarray(prefixes), dtype=torch.long)
    with torch.inference_mode():
        # An explicit all-ones mask: prefixes may contain the pad/EOS id, which generate would
        # otherwise mask out of the context.
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].numpy()


def first_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the first position where `a` and `b` differ; their length where none does."""
    diff = np.asarray(a) != np.asarray(b)
    return np.where(diff.any(axis=1), diff.argmax(axis=1), diff.shape[1])


ROLE_FOLDERS = {"decide": "reference", "validate": "validate", "test": "test"}


def dense_reference(run: Path, role: str = "decide") -> tuple[np.ndarray, np.ndarray]:
    """(prefixes, greedy continuations) of the dense model on a prompt role's prompts: round 0
    of a run's reference/ (decide), or its validate/ or test/ table."""
    reference = pd.read_parquet(run / ROLE_FOLDERS[role])
    dense = reference[reference["round"] == 0].sort_values("prompt_id")
    assert (dense["noise_positions"] == 0).all()  # fp32 on CPU: decode and prefill agree
    return np.stack(dense["prefix_ids"].to_numpy()), np.stack(dense["continuation_ids"].to_numpy())


def final_fdt(run: Path, role: str = "decide") -> np.ndarray:
    """Per prompt of a role, in prompt order: FDT of the run's result in final/prompts."""
    final = pd.read_parquet(run / "final" / "prompts")
    return final[final["role"] == role].sort_values("prompt_id")["fdt"].to_numpy()


def protocol_methods() -> list[str]:
    return [n for n, f in vars(Engine).items() if inspect.isfunction(f) and not n.startswith("_")]


def protocol_drift(cls: type) -> list[str]:
    """How `cls` departs from the Engine protocol: a method missing, or parameters that differ
    from the protocol's in name, order or kind. An implementation may add parameters after the
    protocol's, with defaults, so that every call written against the protocol still works."""
    problems = []
    for name in protocol_methods():
        method = getattr(cls, name, None)
        if not callable(method):
            problems.append(f"{name}: missing")
            continue
        want = list(inspect.signature(getattr(Engine, name)).parameters.values())
        have = list(inspect.signature(method).parameters.values())
        if [(p.name, p.kind) for p in have[: len(want)]] != [(p.name, p.kind) for p in want]:
            problems.append(f"{name}{inspect.signature(method)}: the protocol has {want}")
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        required = [
            p.name
            for p in have[len(want) :]
            if p.default is inspect.Parameter.empty and p.kind not in variadic
        ]
        if required:
            problems.append(f"{name}: added parameters without a default: {required}")
    return problems


@torch.inference_mode()
def full_logit_stats(model, sequences: np.ndarray, n_prefix: int):  # noqa: ANN001, ANN201
    """Argmax, top-1 minus top-2 log-probability and the log-probability of each sequence's own
    token over positions n_prefix..: from one plain forward pass over the whole sequences, a
    float64 log-softmax of all logits and a full sort (not the engines' `token_stats`)."""
    ids = torch.as_tensor(np.asarray(sequences), dtype=torch.long)
    logits = model(input_ids=ids).logits[:, n_prefix - 1 : -1].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    ranked = logprobs.sort(dim=-1, descending=True)
    own = logprobs.gather(-1, ids[:, n_prefix:].unsqueeze(-1)).squeeze(-1)
    margin = ranked.values[..., 0] - ranked.values[..., 1]
    return ranked.indices[..., 0].numpy(), margin.numpy(), own.numpy()
