"""The anchors' sensitivity signals measured on the model an engine holds (definitions and
sources: `dtm_ray.core.sensitivity`). Both engines call these functions where their weights live:
the hf engine on its own model, the vllm engine inside its worker rank(s).

- `weight_error_values`: data-free; per (component, spec) the spec applied to the component's
  current weight and compared with it, plus NNCF's spec-free sensitivity of that weight. Reads
  each weight once; memory: one compressed copy of one weight at a time.
- `fisher_values`: ModelOpt's gradient score. Per calibration batch one forward pass with the
  causal-LM loss (labels = the calibration tokens themselves, mean over the batch's predicted
  positions) and one backward pass. No parameter gets a gradient: the embedding output is the
  only tensor autograd starts from, so the backward computes activation gradients only. A
  forward hook on each selected linear keeps its input X (a reference to the tensor the layer
  got, shared by q/k/v) and puts a hook on its output Y; when ∂L/∂Y arrives, the score of every
  candidate spec of that component is accumulated (`core.sensitivity.fisher_score`) and X is
  let go. Memory beside the model: one batch's activations as a backward pass keeps them (plus
  the batch's logits, tokens x vocabulary floats, three times over: logits, log-softmax, their
  gradient), and ΔW of the candidates in float32, bounded by `delta_bytes`: when the candidates'
  ΔW do not fit, they are split into groups and each group makes its own passes over the
  calibration batches (`passes` counts forward + backward pairs).
- `view_model`: a transformers model of the architecture in `model_dir` whose parameters are
  views of tensors someone else holds (vLLM's live, fused parameters): no weight is copied, so
  the pass sees exactly the weights vLLM serves, at no memory cost but one batch's activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtm_ray.core.compress import compress
from dtm_ray.core.sensitivity import (
    FISHER,
    delta_weight,
    fisher_score,
    nncf_sensitivity,
    weight_errors,
)
from dtm_ray.core.state import Link

# component -> the candidate compressions of its current weight, each a link (spec + statistics)
Candidates = Mapping[str, Sequence[Link]]


@dataclass
class SignalValues:
    """What an engine measured: per (component, spec) the signal's columns; `passes` forward +
    backward passes over one calibration batch (0 for data-free signals), `tokens` calibration
    tokens per pass over all batches."""

    values: dict[tuple[str, str], dict[str, float]]
    passes: int = 0
    tokens: int = 0

    def to_lists(self) -> list:
        """Plain lists (no tuple keys) for crossing into and out of vLLM worker processes."""
        rows = [[name, spec, cols] for (name, spec), cols in self.values.items()]
        return [rows, self.passes, self.tokens]

    @classmethod
    def from_lists(cls, data: Sequence) -> SignalValues:
        rows, passes, tokens = data
        return cls({(name, spec): dict(cols) for name, spec, cols in rows}, passes, tokens)


@dataclass
class SensitivityResult:
    """One sensitivity call on one engine: `rows` in the order of the candidates, each
    {component, spec, <guide>: the damage score (larger = more sensitive), other columns};
    weight_error rows also carry `weight_mse_max` and `nncf_sensitivity`."""

    guide: str
    rows: list[dict[str, Any]]
    seconds: float
    passes: int
    tokens: int
    worker: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- weight_error -------------------------------------------------------------------------------
def weight_error_values(
    candidates: Candidates, current: Callable[[str], torch.Tensor]
) -> SignalValues:
    """Per (component, spec): `weight_errors` of the spec applied to `current(component)` (the
    weight the engine holds now), and NNCF's sensitivity of that weight."""
    values: dict[tuple[str, str], dict[str, float]] = {}
    with torch.no_grad():
        for name, links in candidates.items():
            weight = current(name)
            spec_free = {"nncf_sensitivity": nncf_sensitivity(weight)}
            for link in links:
                compressed = compress(weight, link.spec, link.stats)
                values[(name, link.spec)] = {**weight_errors(weight, compressed), **spec_free}
                del compressed
    return SignalValues(values)


# --- fisher -------------------------------------------------------------------------------------
def _linears(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        module = modules.get(name.removesuffix(".weight"))
        if not name.endswith(".weight") or not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name!r} is not the weight of a linear layer of this model")
        out[name] = module
    return out


def _groups(
    pairs: list[tuple[str, Link]], nbytes: Callable[[str], int], budget: int
) -> list[list[tuple[str, Link]]]:
    """`pairs` in order, cut into runs whose ΔW (float32) fit in `budget` bytes (at least one
    pair per run)."""
    groups: list[list[tuple[str, Link]]] = []
    run: list[tuple[str, Link]] = []
    size = 0
    for pair in pairs:
        cost = nbytes(pair[0])
        if run and size + cost > budget:
            groups.append(run)
            run, size = [], 0
        run.append(pair)
        size += cost
    if run:
        groups.append(run)
    return groups


def _calibration_batches(sequences: Sequence[Sequence[int]], batch_size: int) -> list[np.ndarray]:
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(
            "fisher needs calibration sequences of one length >= 2 tokens, got lengths "
            f"{sorted(lengths)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    array = np.asarray(sequences, dtype=np.int64)
    return [array[i : i + batch_size] for i in range(0, len(array), batch_size)]


def fisher_values(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    candidates: Candidates,
    current: Callable[[str], torch.Tensor],
    batch_size: int,
    delta_bytes: int,
) -> SignalValues:
    """ModelOpt's gradient score of every (component, spec) of `candidates` on `model` (a
    transformers causal LM holding the current weights; `current(name)` is its weight `name`)
    over `sequences`, in batches of `batch_size` (see the module docstring). The model's
    weights are only read; its `requires_grad` flags and train/eval mode are put back."""
    batches = _calibration_batches(sequences, batch_size)
    linears = _linears(model, list(candidates))
    # One pair per (component, spec): a repeated spec would count its terms twice.
    unique = {(name, link.spec): link for name, links in candidates.items() for link in links}
    pairs = [(name, link) for (name, _), link in unique.items()]
    groups = _groups(pairs, lambda name: current(name).numel() * 4, delta_bytes)
    device = next(model.parameters()).device
    scores = {(name, link.spec): 0.0 for name, link in pairs}
    flags = {param: param.requires_grad for param in model.parameters()}
    training = model.training
    passes = 0
    try:
        for param in flags:
            param.requires_grad_(False)
        model.eval()
        for group in groups:
            deltas: dict[str, list[tuple[str, torch.Tensor]]] = {}
            with torch.no_grad():
                for name, link in group:
                    delta = delta_weight(current(name), link.spec, link.stats)
                    deltas.setdefault(name, []).append((link.spec, delta))
            for ids in batches:
                _one_pass(model, torch.as_tensor(ids, device=device), linears, deltas, scores)
                passes += 1
            del deltas
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)
        model.train(training)
    tokens = sum(b.size for b in batches)
    return SignalValues(
        {key: {FISHER: value} for key, value in scores.items()}, passes=passes, tokens=tokens
    )


def _one_pass(
    model: torch.nn.Module,
    ids: torch.Tensor,
    linears: Mapping[str, torch.nn.Module],
    deltas: Mapping[str, list[tuple[str, torch.Tensor]]],
    scores: dict[tuple[str, str], float],
) -> None:
    """One forward + backward pass over one batch, adding its term to `scores`."""
    seen: dict[str, int] = {}
    hooks = []

    def start_grad(_module: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        # The only tensor autograd starts from: no parameter needs (or gets) a gradient.
        return out.detach().requires_grad_(True)

    try:
        with torch.inference_mode(False), torch.enable_grad():
            hooks.append(model.get_input_embeddings().register_forward_hook(start_grad))
            for name, specs in deltas.items():

                def keep(_module: Any, args: tuple, out: torch.Tensor, name=name, specs=specs):
                    x = args[0].detach()

                    def on_grad(grad: torch.Tensor) -> None:
                        for spec, delta in specs:
                            scores[(name, spec)] += fisher_score(x, grad, delta)
                        seen[name] = seen.get(name, 0) + 1

                    out.register_hook(on_grad)

                hooks.append(linears[name].register_forward_hook(keep))
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    missing = sorted(set(deltas) - set(seen))
    if missing:
        raise RuntimeError(f"fisher: no gradient reached {missing[:3]} in a backward pass")


# --- a transformers model over someone else's tensors --------------------------------------------
def view_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    tensor_of: Callable[[str, tuple[int, ...]], torch.Tensor],
) -> torch.nn.Module:
    """The transformers causal LM of `model_dir`'s config, each parameter `name` of shape S
    replaced by `tensor_of(name, S)` (no copy; requires_grad off), buffers (rotary tables)
    computed as transformers computes them, on the tensors' device. Built with empty weights,
    so it costs no weight memory. A tensor of the wrong shape or dtype, or an inference tensor,
    is a ValueError."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = None
    for module_name, module in model.named_modules():
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            name = f"{module_name}.{leaf}" if module_name else leaf
            tensor = tensor_of(name, tuple(param.shape))
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: the engine holds {tuple(tensor.shape)} {tensor.dtype}, the "
                    f"transformers model expects {tuple(param.shape)} {dtype}"
                )
            if tensor.is_inference():  # made under torch.inference_mode: autograd refuses it
                raise ValueError(f"{name}: the engine's tensor cannot take part in a backward pass")
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
            device = tensor.device
    if device is not None:
        model.to(device)  # the buffers; parameters are already there
    return model.eval()
