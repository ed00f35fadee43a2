"""The anchors' sensitivity signals as pure scoring math: torch, no engine, no Ray.

Two signals score a candidate compression (component c, spec s) applied to the current model, so
that a guide other than FDT can feed the same decisions. Both work on the weight change

    ΔW = compress(W, s) − W     (float32; `delta_weight`)

where W is the component's *current* weight (its chain replayed, as a probe sees it) and the spec
is applied to W exactly as a probe applies it (`core.compress`, same statistics). For pruning specs
the same formulas apply with ΔW = pruned − unpruned weight: a sparsify probe at added sparsity a on
a component at s0 prunes W to s0 + a(1 − s0) (`core.decisions.sparsify.absolute_sparsity`), so ΔW
is minus the weights that probe removes.

fisher — NVIDIA ModelOpt's `auto_quantize` gradient score
---------------------------------------------------------
Read from `modelopt/torch/quantization/algorithms.py` (`AutoQuantizeGradientSearcher`,
`_estimate_auto_quantize_scores`, `_get_auto_quantize_score`). For each calibration batch ModelOpt
runs one forward and one backward pass of the *unquantized* model; at every scored module it
keeps, from the forward, `output_diff = Y_q − Y` (the module re-run with the candidate format on
the same input X) and, in a backward hook, adds

    score += ((∂L/∂Y) · (Y_q − Y)).clamp(−1e10, 1e10).square().sum()

(elementwise product in float32, summed over every token and output feature). L is whatever the
user's `loss_func` returns; ModelOpt's own LLM example (`examples/hf_ptq/hf_ptq.py`) returns
`output.loss` of a Hugging Face causal LM with `labels = input_ids` (padding -100): the mean
next-token cross-entropy over the batch's predicted positions, *with the calibration text's own
tokens as labels* (the empirical Fisher, not the model's own predictions). The sum over batches is
the score of the format for that module; a lower score is a less sensitive module. Modules that
must share a format (q/k/v, gate/up in `quant_grouping_rules`) are scored per module and the
group's score is the sum of its members' (`QuantRecipeHparam.get_score`).

For a linear module with weight-only compression and the bias untouched, Y_q − Y = X ΔWᵀ, so

    fisher(c, s) = Σ_batches Σ_t Σ_o ( g[t, o] · (x[t] · ΔW[o]) )²,   g = ∂L_batch/∂Y

with L_batch the mean causal-LM cross-entropy of the batch. `fisher_score` computes one batch's
term from the module's input X [tokens, in], output gradient G [tokens, out] and ΔW [out, in], in
chunks of tokens so its memory is bounded (X ΔWᵀ is never formed for all tokens at once).

Where this deviates from ModelOpt, on purpose: (1) Y_q − Y is X ΔWᵀ computed in float32 from the
exact ΔW, where ModelOpt subtracts two module outputs in the model's dtype (in bf16 that adds
output rounding to the difference; in float32 the two agree to rounding); (2) no activation
quantization: dtm_ray's compressions are weight-only; (3) scores are per component, and grouping
(summing q/k/v) is the caller's choice; (4) ModelOpt then makes each module's scores monotone over
its formats (`min(score, previous)`) and solves a knapsack/LP under `effective_bits`: that is a
decision, not the signal, and stays out of here. The score depends on the batch split (the loss
is a mean per batch), as ModelOpt's does: compare scores made with the same batch size.

weight_error — OpenVINO NNCF's data-free criterion, and the per-spec error dtm_ray ranks by
-----------------------------------------------------------------------------------------
Read from `nncf/quantization/algorithms/weight_compression/mixed_precision.py`
(`DataFreeCriterion`, registered as `SensitivityMetric.WEIGHT_QUANTIZATION_ERROR`) and
`weight_lowering.py` (`get_integer_quantization_error`, `integer_quantize_dequantize_weight`,
`calculate_integer_quantization_params`) with `fake_quantize.calculate_scale_zero_point`. NNCF's
sensitivity of a weight is

    nncf_sensitivity(W) = 1 / (e + eps),  e = max_o mean_i (Q8(W) − W)[o, i]²

with Q8 NNCF's *backup* precision (the default `WeightCompressionConfig()`: INT8_ASYM, one scale
and zero point per output row; see `nncf_int8_asym`) and eps the machine epsilon of the weight's
dtype. It does not depend on the candidate format: NNCF keeps the weights with the highest
sensitivity (smallest per-channel int8 error) in 8 bits and gives the primary (4-bit, group-wise)
precision to the rest, lowest sensitivity first, until `ratio` of the parameters
(`MixedPrecisionCriterion.apply`). `nncf_sensitivity` is that number, exactly.

Because NNCF's number cannot rank pruning specs or one int4 group size against another, dtm_ray's
`weight_error` guide scores the candidate's own ΔW, data-free: `weight_error` is the relative
Frobenius error ‖ΔW‖_F / ‖W‖_F (scale-free, so components of different magnitude compare), and
`weight_errors` also gives NNCF's reduction of that ΔW, `max_mean` = max_o mean_i ΔW[o, i]² (the
`reduction="max_mean"` of `get_integer_quantization_error`), so either reading can rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dtm_ray.core.compress import compress
from dtm_ray.core.specs import Spec

FISHER = "fisher"
WEIGHT_ERROR = "weight_error"
SIGNALS = (FISHER, WEIGHT_ERROR)

# ModelOpt clamps each g·(Y_q − Y) to ±1e10 before squaring (`_get_auto_quantize_score`).
FISHER_CLAMP = 1e10
# `fisher_score` forms X ΔWᵀ for at most this many elements at a time (64 MB in float32).
CHUNK_ELEMENTS = 1 << 24


def delta_weight(
    current: torch.Tensor, spec: Spec | str, stats: Mapping[str, Any] | None = None
) -> torch.Tensor:
    """ΔW = compress(current, spec, stats) − current in float32: the change a probe of `spec`
    makes to the component's current weight (the same compression, on the same device)."""
    compressed = compress(current, spec, stats)
    return compressed.float() - current.detach().float()


def fisher_score(
    inputs: torch.Tensor,
    output_grads: torch.Tensor,
    delta_weight: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> float:
    """One batch's term of ModelOpt's gradient score of a linear module:
    Σ_t Σ_o clamp(g[t, o] · (x[t] · ΔW[o]))², with `inputs` X [..., in], `output_grads`
    G = ∂L/∂Y [..., out] (same leading shape) and `delta_weight` ΔW [out, in].

    Computed in float32, in chunks of tokens so that no more than `chunk_elements` values of
    X ΔWᵀ exist at once; the chunk sums add up in float64. Sum the terms of all batches for the
    score."""
    out_features, in_features = delta_weight.shape
    if inputs.shape[-1] != in_features or output_grads.shape[-1] != out_features:
        raise ValueError(
            f"fisher_score: inputs [..., {inputs.shape[-1]}] and output_grads "
            f"[..., {output_grads.shape[-1]}] do not fit a weight of shape "
            f"{tuple(delta_weight.shape)}"
        )
    x = inputs.detach().reshape(-1, in_features)
    g = output_grads.detach().reshape(-1, out_features)
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"fisher_score: {x.shape[0]} input rows but {g.shape[0]} gradient rows")
    dw = delta_weight.detach().float().to(x.device)
    step = max(1, chunk_elements // max(out_features, 1))
    total = 0.0
    for start in range(0, x.shape[0], step):
        diff = x[start : start + step].float() @ dw.T  # Y_q − Y of these tokens
        term = g[start : start + step].float() * diff
        total += float(term.clamp(-FISHER_CLAMP, FISHER_CLAMP).square().sum(dtype=torch.float64))
    return total


def weight_error(
    original: torch.Tensor, compressed: torch.Tensor, reduction: str = "relative_frobenius"
) -> float:
    """How far `compressed` is from `original` (both [out, in]), in float32:
    - "relative_frobenius" (the default, dtm_ray's `weight_error`): ‖C − W‖_F / ‖W‖_F
      (0 when both are zero, inf when only W is);
    - "frobenius": ‖C − W‖_F (NNCF's `reduction="frobenius"`);
    - "max_mean": max over output rows of the mean over the row of (C − W)² (NNCF's
      `reduction="max_mean"`, what its data-free criterion inverts)."""
    if tuple(original.shape) != tuple(compressed.shape) or original.dim() != 2:
        raise ValueError(
            f"weight_error needs two [out, in] tensors of one shape, got "
            f"{tuple(original.shape)} and {tuple(compressed.shape)}"
        )
    w = original.detach().float()
    diff = compressed.detach().float().to(w.device) - w
    if reduction == "max_mean":
        return float(diff.square().mean(dim=1).max())
    delta = float(torch.linalg.vector_norm(diff, dtype=torch.float64))
    if reduction == "frobenius":
        return delta
    if reduction != "relative_frobenius":
        raise ValueError(
            f"unknown reduction {reduction!r}; expected relative_frobenius, frobenius or max_mean"
        )
    norm = float(torch.linalg.vector_norm(w, dtype=torch.float64))
    if norm == 0.0:
        return 0.0 if delta == 0.0 else float("inf")
    return delta / norm


def weight_errors(original: torch.Tensor, compressed: torch.Tensor) -> dict[str, float]:
    """The per-spec data-free columns of the `weight_error` guide: `weight_error` (relative
    Frobenius) and `weight_mse_max` (NNCF's max_mean reduction) of compressed − original."""
    return {
        "weight_error": weight_error(original, compressed, "relative_frobenius"),
        "weight_mse_max": weight_error(original, compressed, "max_mean"),
    }


def nncf_int8_asym(weight: torch.Tensor) -> torch.Tensor:
    """NNCF's INT8_ASYM quantize-dequantize of W [out, in], one (scale, zero point) per output
    row, in float32, as `integer_quantize_dequantize_weight` with the default
    `WeightCompressionConfig()` computes it:
    scale = (max − min) / 255 (eps where |scale| < eps), zp = clip(−round(min / scale), 0, 255),
    q = clip(round(W / scale + zp), 0, 255), W' = (q − zp) · scale. Rounding half to even, as
    numpy's. The row range is min..max of the row (NNCF does not widen it to include 0)."""
    w = weight.detach().float()
    low = w.amin(dim=1, keepdim=True)
    high = w.amax(dim=1, keepdim=True)
    eps = torch.finfo(torch.float32).eps
    scale = (high - low) / 255.0
    scale = torch.where(scale.abs() < eps, torch.full_like(scale, eps), scale)
    zero_point = torch.clamp(-torch.round(low / scale), 0, 255)
    q = torch.clamp(torch.round(w / scale + zero_point), 0, 255)
    return (q - zero_point) * scale


def nncf_sensitivity(weight: torch.Tensor) -> float:
    """NNCF's WEIGHT_QUANTIZATION_ERROR sensitivity of a weight (`DataFreeCriterion`):
    1 / (max_o mean_i (Q8(W) − W)² + eps), Q8 = `nncf_int8_asym`, eps the machine epsilon of
    the weight's own dtype (bf16: 2^-7, which dominates typical errors; float32: 2^-23).
    Higher = more sensitive (NNCF keeps it in 8 bits)."""
    error = weight_error(weight, nncf_int8_asym(weight), "max_mean")
    return 1.0 / (error + torch.finfo(weight.dtype).eps)
