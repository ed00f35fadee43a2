"""The `hf` engine: transformers + torch. The reference in tests, and the fallback for models and
machines vLLM cannot serve.

Layer skip. A probe that edits a weight of decoder layer L changes nothing before layer L, so its
scoring pass can start from the residual stream entering layer L, taken from one pass of the
model as it was before the edit. `score(..., keep_residuals=True)` keeps that stream (the input of
every decoder layer, or of every k-th one when they do not all fit in `residual_cache_bytes`);
`score(..., from_layer=L)` starts there. The layers that run are the same modules called with the
same tensors as in a full pass, so the logits are bit-identical; on average a probe costs about
half a pass. The caller (the engine session) decides when the kept stream is still valid.

On a GPU a stream larger than `residual_cache_bytes` goes to pinned host memory instead (up to
`residual_host_bytes`): with 512 prompts of 288 tokens one layer's input is 1.5 GB for a 13B
model, so the GPU budget keeps every 40th layer at best, while a node's host memory keeps them
all; a probe then copies one layer's input back per batch (tens of ms at PCIe speed, against
seconds of the layers it skips).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from dtm_ray.core.compress import apply_links
from dtm_ray.core.specs import check_applicable
from dtm_ray.core.state import Chain
from dtm_ray.engines.base import (
    ScoreResult,
    continuation_length,
    keep_freed_memory,
    token_stats,
    torch_dtype,
)
from dtm_ray.engines.checkpoint import Checkpoint
from dtm_ray.engines.config import (
    FISHER_BATCH_SIZE,
    ORIGINAL_CACHE_BYTES,
    RESIDUAL_CACHE_BYTES,
    RESIDUAL_HOST_BYTES,
    SENSITIVITY_DELTA_BYTES,
    residual_keep,
)
from dtm_ray.engines.sensitivity import (
    Candidates,
    SignalValues,
    fisher_values,
    weight_error_values,
)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _predicting(length: int, n_new: int) -> torch.Tensor:
    """The positions whose logits predict the last n_new tokens: length-n_new-1 .. length-2.
    Only these reach the lm_head, whose output is then one contiguous block."""
    return torch.arange(length - n_new - 1, length - 1)


@dataclass
class _Residuals:
    """The residual stream of one scoring pass: per batch, the input (args, kwargs) of each kept
    decoder layer, and the sequences it belongs to."""

    sequences: np.ndarray
    layers: list[int]  # kept layer indices, ascending, always including 0
    batches: list[dict[int, tuple[tuple, dict]]]


@dataclass
class _KeptLayers:
    layers: list[int]
    on_host: bool  # the hidden states in pinned host memory, not on the device


class HFEngine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
        residual_cache_bytes: int = RESIDUAL_CACHE_BYTES,
        original_cache_bytes: int = ORIGINAL_CACHE_BYTES,
        residual_host_bytes: int = RESIDUAL_HOST_BYTES,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval()
        if self.device.type == "cpu":
            keep_freed_memory()
        # Always produce exactly n_new tokens: no stopping at EOS.
        self.model.generation_config.eos_token_id = None
        self.pad_id = self.model.config.pad_token_id or 0
        self._params = dict(self.model.named_parameters())
        # Originals are read back from the checkpoint; a weight whose loaded value differs from
        # its checkpoint tensor (or that has none) is copied before its first edit instead.
        try:
            self._checkpoint = Checkpoint(Path(model_dir), torch_dtype(dtype), original_cache_bytes)
        except FileNotFoundError:  # no safetensors files (a .bin checkpoint): copies only
            self._checkpoint = None
        self._matches_checkpoint: set[str] = set()  # checked once, bit for bit
        self._edited: set[str] = set()  # edited weights whose original is the checkpoint's
        self._originals: dict[str, torch.Tensor] = {}
        self._saved: dict[str, torch.Tensor] = {}  # what a probe overwrote, for put_back
        self._closed = False
        self.residual_cache_bytes = residual_cache_bytes
        self.residual_host_bytes = residual_host_bytes
        self._residuals: _Residuals | None = None
        self._layers, self._layer_of = self._decoder_layers()

    def _decoder_layers(self) -> tuple[list[torch.nn.Module], dict[str, int]]:
        """The decoder layers, and the layer of each weight inside one; empty when the model is
        not laid out as `model.layers` + `model.norm` + `lm_head` (then no layer skip)."""
        decoder = getattr(self.model, "model", None)
        layers = getattr(decoder, "layers", None)
        if layers is None or not hasattr(decoder, "norm") or not hasattr(self.model, "lm_head"):
            return [], {}
        layer_of = {}
        for index, layer in enumerate(layers):
            for name, _ in layer.named_parameters():
                layer_of[f"model.layers.{index}.{name}"] = index
        return list(layers), layer_of

    def layer_of(self, name: str) -> int | None:
        """The decoder layer holding weight `name`, or None (embeddings, lm_head, or layer skip
        off: `residual_cache_bytes=0`)."""
        return self._layer_of.get(name) if self.residual_cache_bytes > 0 else None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this HFEngine is closed")

    def close(self) -> None:
        """Free the model; calling it again does nothing, any other method raises afterwards."""
        if self._closed:
            return
        self._closed = True
        del self.model
        self._params.clear()
        self._originals.clear()
        self._saved.clear()
        if self._checkpoint is not None:
            self._checkpoint.clear()
        self._residuals = None
        self._layers = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- generation -----------------------------------------------------------------------
    @torch.inference_mode()
    def _generate(self, prefixes: Sequence[Sequence[int]], n_new: int, **kwargs) -> np.ndarray:
        self._check_open()
        out = []
        for batch in _batches(list(prefixes), self.batch_size):
            ids, mask = _left_pad(batch, self.pad_id)
            tokens = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                pad_token_id=self.pad_id,
                eos_token_id=None,
                **kwargs,
            )
            out.append(tokens[:, ids.shape[1] :].cpu().numpy())
        return np.concatenate(out).astype(np.int64)

    def generate_greedy(self, prefixes: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        return self._generate(prefixes, n_new, do_sample=False)

    def sample(self, prefixes: Sequence[Sequence[int]], n_new: int, seed: int) -> np.ndarray:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            return self._generate(
                prefixes, n_new, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
            )

    # --- scoring --------------------------------------------------------------------------
    @torch.inference_mode()
    def score(
        self,
        sequences: Sequence[Sequence[int]],
        n_prefix: int,
        *,
        keep_residuals: bool = False,
        from_layer: int = 0,
    ) -> ScoreResult:
        """Teacher-forced argmax, margin and reference log-probability over the continuation.

        keep_residuals: keep this pass's residual stream (replacing any kept before).
        from_layer: start at decoder layer `from_layer` from the kept stream of these same
        sequences; the caller vouches that every layer below it holds the weights it held when
        the stream was kept.
        """
        self._check_open()
        n_new = continuation_length(sequences, n_prefix)
        array = np.asarray(sequences, dtype=np.int64)
        start = self._start_layer(array, from_layer)
        kept = self._kept_layers(array) if keep_residuals else None
        argmax, margin, ref_lp, batches = [], [], [], []
        for index, rows in enumerate(_batches(array, self.batch_size)):
            ids = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            if start is None:
                logits, inputs = self._full_pass(ids, n_new, kept)
                batches.append(inputs)
            else:
                logits = self._pass_from(self._residuals.batches[index][start], start, n_new)
            top, gap, own = token_stats(logits, ids[:, n_prefix:])
            argmax.append(top.cpu())
            margin.append(gap.cpu())
            ref_lp.append(own.cpu())
        if kept and kept.layers:
            self._residuals = _Residuals(array, kept.layers, batches)
        return ScoreResult(
            argmax=torch.cat(argmax).numpy().astype(np.int64),
            margin=torch.cat(margin).numpy(),
            ref_logprob=torch.cat(ref_lp).numpy(),
        )

    def _start_layer(self, sequences: np.ndarray, from_layer: int) -> int | None:
        """The kept layer a pass starts from (the nearest at or below `from_layer`), or None for
        a full pass."""
        if from_layer <= 0:
            return None
        kept = self._residuals
        if kept is None or not np.array_equal(kept.sequences, sequences):
            raise ValueError("from_layer needs the residual stream kept for these same sequences")
        return max(layer for layer in kept.layers if layer <= from_layer)

    def _kept_layers(self, sequences: np.ndarray) -> _KeptLayers:
        """Which layers' inputs to keep, and where: all of them when they fit in
        `residual_cache_bytes`, else every k-th (a probe then also reruns the unchanged layers
        above the kept one); on a GPU, in pinned host memory when `residual_host_bytes` keeps
        more layers than the device budget does."""
        if not self._layers or self.residual_cache_bytes <= 0:
            return _KeptLayers([], on_host=False)
        width = self.model.config.hidden_size
        itemsize = next(self.model.parameters()).element_size()
        per_layer = sequences.size * width * itemsize
        layers = len(self._layers)
        host_budget = self.residual_host_bytes if self.device.type == "cuda" else 0
        stride, on_host = residual_keep(per_layer, layers, self.residual_cache_bytes, host_budget)
        return _KeptLayers(list(range(0, layers, stride)), on_host)

    def _full_pass(
        self, ids: torch.Tensor, n_new: int, keep: _KeptLayers | None
    ) -> tuple[torch.Tensor, dict[int, tuple[tuple, dict]]]:
        """The model's own forward; with `keep`, the inputs of those decoder layers on the side."""
        inputs: dict[int, tuple[tuple, dict]] = {}
        hooks = []
        on_host = keep is not None and keep.on_host
        for index in keep.layers if keep else []:

            def hook(_module, args, kwargs, index=index):
                hidden = args[0]
                if on_host:
                    kept = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
                    kept.copy_(hidden)
                else:
                    kept = hidden.clone()
                inputs[index] = ((kept, *args[1:]), dict(kwargs))

            hooks.append(self._layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        try:
            # No KV cache: a kept layer input must not carry a cache this pass has filled.
            logits = self.model(
                input_ids=ids, logits_to_keep=_predicting(ids.shape[1], n_new), use_cache=False
            ).logits
        finally:
            for h in hooks:
                h.remove()
        return logits, inputs

    def _pass_from(self, layer_input: tuple[tuple, dict], start: int, n_new: int) -> torch.Tensor:
        """Layers start.. , the final norm and the lm_head, as the model's forward runs them."""
        args, kwargs = layer_input
        hidden, rest = args[0].to(self.device, non_blocking=True), args[1:]  # kept on host?
        for layer in self._layers[start:]:
            hidden = layer(hidden, *rest, **kwargs)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        hidden = self.model.model.norm(hidden)
        return self.model.lm_head(hidden[:, _predicting(hidden.shape[1], n_new), :])

    # --- weights --------------------------------------------------------------------------
    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"the model has no weight named {name!r}") from None

    def original_weight(self, name: str) -> torch.Tensor:
        self._check_open()
        original = self._originals.get(name)
        if original is None:
            if name in self._edited:
                return self._checkpoint.get(name).clone()
            original = self._param(name).detach()
        return original.to("cpu", copy=True)

    def weight_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._param(name).shape)

    @torch.no_grad()
    def compress_in_place(self, chains: Mapping[str, Chain], keep: bool = False) -> None:
        """Apply each named weight's links in order to the weight the model holds, on its
        device; `keep` saves a copy of what was overwritten, for `put_back`. The links are
        checked before any weight changes."""
        self._check_open()
        for name, chain in chains.items():
            shape = tuple(self._param(name).shape)
            for link in chain:
                check_applicable(link.spec, shape, has_stats=link.input_norm is not None)
        for name, chain in chains.items():
            param = self._param(name)
            if name not in self._edited and name not in self._originals:
                self._keep_original(name, param)
            if keep:
                self._saved[name] = param.detach().clone()
            param.copy_(apply_links(param.detach(), chain))

    @torch.no_grad()
    def put_back(self, names: Iterable[str]) -> None:
        """Write back the copies `compress_in_place(keep=True)` saved, bit for bit."""
        self._check_open()
        names = list(dict.fromkeys(names))
        missing = [name for name in names if name not in self._saved]
        if missing:
            raise KeyError(f"no saved copy of {missing} to put back")
        for name in names:
            self._param(name).copy_(self._saved.pop(name))

    def nonzero_counts(self, names: Iterable[str]) -> dict[str, int]:
        self._check_open()
        return {name: int(torch.count_nonzero(self._param(name))) for name in names}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self._check_open()
        for name, tensor in weights.items():
            param = self._param(name)
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{name}: new weight has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            if name not in self._edited and name not in self._originals:
                self._keep_original(name, param)
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    def _keep_original(self, name: str, param: torch.nn.Parameter) -> None:
        """Before an unedited weight is overwritten: rely on the checkpoint when it holds exactly
        the loaded value (compared once per weight, bit for bit), else keep a copy."""
        checkpoint = self._checkpoint
        unchecked = name not in self._matches_checkpoint
        if unchecked and checkpoint is not None and name in checkpoint:
            stored = checkpoint.get(name)
            if stored.shape == param.shape and torch.equal(stored, param.detach().cpu()):
                self._matches_checkpoint.add(name)
        if name in self._matches_checkpoint:
            self._edited.add(name)
        else:
            self._originals[name] = param.detach().clone()

    @torch.no_grad()
    def restore(self, names: Iterable[str]) -> None:
        self._check_open()
        for name in names:
            self._saved.pop(name, None)  # a restored weight has nothing left to put back
            original = self._originals.pop(name, None)
            if original is not None:
                self._param(name).copy_(original)
            elif name in self._edited:
                self._param(name).copy_(self._checkpoint.get(name))
                self._edited.discard(name)

    # --- calibration ----------------------------------------------------------------------
    @torch.inference_mode()
    def input_norms(
        self, sequences: Sequence[Sequence[int]], names: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """‖x_j‖₂ over all calibration tokens of the input to each named linear weight (Wanda)."""
        self._check_open()
        if len(sequences) == 0:
            raise ValueError("input_norms needs at least one calibration sequence")
        modules = dict(self.model.named_modules())
        targets = {}
        for name in names:
            self._param(name)  # a clear KeyError for a name the model does not have
            module = modules.get(name.removesuffix(".weight"))
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name!r} is not the weight of a linear layer")
            targets[name] = module
        sums: dict[str, torch.Tensor] = {}
        hooks = []
        try:
            for name, module in targets.items():

                def hook(_module, args, _out, key=name):
                    x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                    sums[key] = sums.get(key, 0) + (x * x).sum(dim=0).cpu()

                hooks.append(module.register_forward_hook(hook))
            for batch in _batches(list(sequences), self.batch_size):
                ids = torch.as_tensor(np.asarray(batch), dtype=torch.long, device=self.device)
                self.model(input_ids=ids, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        return {name: s.sqrt() for name, s in sums.items()}

    # --- sensitivity signals (see dtm_ray.engines.sensitivity) ------------------------------
    def _check_candidates(self, candidates: Candidates) -> None:
        for name, links in candidates.items():
            shape = tuple(self._param(name).shape)
            for link in links:
                check_applicable(link.spec, shape, has_stats=link.input_norm is not None)

    def weight_errors(self, candidates: Candidates) -> SignalValues:
        """Per (component, spec): the spec applied to the weight the model holds now, compared
        with it (data-free; nothing is written)."""
        self._check_open()
        self._check_candidates(candidates)
        return weight_error_values(candidates, lambda name: self._param(name).detach())

    def fisher_scores(
        self,
        sequences: Sequence[Sequence[int]],
        candidates: Candidates,
        batch_size: int = FISHER_BATCH_SIZE,
        delta_bytes: int = SENSITIVITY_DELTA_BYTES,
    ) -> SignalValues:
        """ModelOpt's gradient score of each (component, spec) on this engine's own model, one
        forward + backward pass per calibration batch. Gradients are on for this call only and
        no parameter gets one; the weights are only read, the requires_grad flags put back."""
        self._check_open()
        self._check_candidates(candidates)
        return fisher_values(
            self.model,
            sequences,
            candidates,
            lambda name: self._param(name).detach(),
            batch_size,
            delta_bytes,
        )
