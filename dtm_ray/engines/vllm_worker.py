"""Code that runs inside each vLLM worker: the `worker_extension_cls` of `VLLMEngine`.

vLLM imports this module in every worker process (and, in-process mode, in the engine's own
process) before the model loads, and mixes `WeightEditExtension` into the worker class, so the
engine reaches these methods by name through `llm.collective_rpc("dtm_...")`. Named methods need
neither `VLLM_ALLOW_INSECURE_SERIALIZATION` nor picklable callables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm import _custom_ops
from vllm.distributed import get_tp_group
from vllm.model_executor.layers import utils as _layer_utils
from vllm.model_executor.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from dtm_ray.core.compress import compress
from dtm_ray.core.state import Link
from dtm_ray.engines.base import token_stats
from dtm_ray.engines.checkpoint import read_tensor
from dtm_ray.engines.sensitivity import fisher_values, view_model, weight_error_values

# The CPU build packs each linear weight into a oneDNN handle at load and leaves `weight` empty;
# an edit to the parameter would then never reach the matmul. With oneDNN off, CPU linears fall
# back to F.linear on the live parameter. Must run before the model loads, hence at import.
# The flag is read only by the CPU GEMM dispatch, so GPU workers are unaffected.
_custom_ops._supports_onednn = False
# Same trap on AMX CPUs (bf16/fp16): the sgl kernel prepacks the weight. Only the unquantized
# CPU dispatch looks this name up in the module; quantized kernels keep their own reference.
if hasattr(_layer_utils, "check_cpu_sgl_kernel"):
    _layer_utils.check_cpu_sgl_kernel = lambda n, k, dtype: False


class WeightEditExtension:
    """Methods vLLM adds to its worker class; `self` is the worker."""

    def _dtm_model(self) -> torch.nn.Module:
        # get_model() unwraps CUDA-graph wrappers, so edits reach the parameters graphs read.
        return self.model_runner.get_model()  # type: ignore[attr-defined]

    def dtm_load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
        """Load full HF-named tensors through the model's own loader, in place.

        The loader's stacked-params mapping writes q/k/v into the right slice of `qkv_proj`
        (gate/up into `gate_up_proj`) and keeps only this rank's tensor-parallel shard; it copies
        into the existing parameters, so CUDA graphs keep valid pointers.
        """
        saved = self.__dict__.setdefault("_dtm_saved", {})
        with torch.no_grad():
            loaded = self._dtm_model().load_weights(list(weights))
        for name, _ in weights:  # a loaded weight has nothing left to put back
            saved.pop(name, None)
        return sorted(loaded or [])

    # --- edits by spec ----------------------------------------------------------------------
    # A probe or a state change sends (HF name, specs, calibration stats), never a tensor: each
    # rank rebuilds the whole HF weight from the tensor-parallel group's shards (magnitude needs
    # the whole matrix's threshold, a row-parallel layer's int scales the whole row), applies the
    # pure reference compression to it on its own device (the function the export uses, so the
    # bits are the same) and writes back only its own shard.
    def dtm_compress(
        self, edits: Sequence[tuple[str, Sequence[tuple[str, Any]]]], keep: bool
    ) -> list[str]:
        """Apply each weight's links (spec, input norm or None) in order to the weight this rank
        holds. `keep` saves a device copy of every overwritten slice for `dtm_put_back`; a
        failure part way puts back what this call already changed (when keeping)."""
        model = self._dtm_model()
        saved = self.__dict__.setdefault("_dtm_saved", {})
        done = []
        try:
            with torch.no_grad():
                for name, links in edits:
                    place = _place(model, name)
                    weight = place.gather()
                    for spec, norm in links:
                        stats = None if norm is None else {"input_norm": norm}
                        weight = compress(weight, spec, stats)
                    if keep:
                        saved[name] = place.piece().clone()
                    done.append(name)
                    place.write(weight)
        except BaseException:
            if keep:
                self.dtm_put_back(done)
            raise
        return done

    def dtm_put_back(self, names: Sequence[str]) -> list[str]:
        """Write back the slices `dtm_compress(keep=True)` saved, bit for bit, and drop them."""
        model = self._dtm_model()
        saved = self.__dict__.setdefault("_dtm_saved", {})
        missing = [name for name in names if name not in saved]
        if missing:
            raise KeyError(f"no saved copy of {missing} to put back")
        with torch.no_grad():
            for name in names:
                _place(model, name).piece().copy_(saved.pop(name))
        return list(names)

    def dtm_restore(self, files: Sequence[tuple[str, str]], dtype: str) -> list[str]:
        """Write back each named HF weight's original from its safetensors file on this node
        (`(name, path)` pairs), cast to `dtype` as the checkpoint reader casts it: the engine
        sends names, never the tensors. Each rank reads one whole weight at a time (host
        memory: the largest weight) and writes its own shard."""
        model = self._dtm_model()
        saved = self.__dict__.setdefault("_dtm_saved", {})
        with torch.no_grad():
            for name, path in files:
                place = _place(model, name)
                original = read_tensor(path, name, getattr(torch, dtype))
                place.write(original.to(place.param.device))
                saved.pop(name, None)  # a restored weight has nothing left to put back
        return [name for name, _ in files]

    def dtm_nonzero(self, names: Sequence[str]) -> dict[str, int]:
        """Nonzero values of each whole HF weight (gathered from the group's shards)."""
        model = self._dtm_model()
        with torch.no_grad():
            return {name: int(torch.count_nonzero(_place(model, name).gather())) for name in names}

    def dtm_empty_params(self) -> list[str]:
        """Parameters with no elements: weights a backend packed away, which edits cannot reach."""
        return [n for n, p in self._dtm_model().named_parameters() if p.numel() == 0]

    def dtm_params_digest(self) -> str:
        """sha256 over every parameter's name, dtype, shape and raw bytes, on this rank."""
        digest = hashlib.sha256()
        for name, param in sorted(self._dtm_model().named_parameters()):
            tensor = param.detach().to("cpu").contiguous()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # --- sensitivity signals (see dtm_ray.engines.sensitivity) --------------------------------
    def dtm_weight_errors(self, edits: Sequence[tuple[str, Sequence[tuple[str, Any]]]]) -> list:
        """Per (HF weight, spec): the spec applied to the whole weight this rank's group holds
        now, compared with it (`weight_error_values`); nothing is written."""
        model = self._dtm_model()
        values = weight_error_values(_candidates(edits), lambda name: _place(model, name).gather())
        return values.to_lists()

    def dtm_fisher(
        self,
        model_dir: str,
        dtype: str,
        sequences: list[list[int]],
        edits: Sequence[tuple[str, Sequence[tuple[str, Any]]]],
        batch_size: int,
        delta_bytes: int,
    ) -> list:
        """ModelOpt's gradient score on the weights this rank serves: a transformers model of
        the same architecture whose parameters are views of vLLM's live (fused) parameters
        (`view_model`: no weight copied), one forward + backward pass per calibration batch
        (`fisher_values`), dropped afterwards. Only read: vLLM's weights are never written.
        A single rank only (tensor parallelism shards the weights over processes)."""
        model = self._dtm_model()
        view = view_model(
            model_dir, getattr(torch, dtype), lambda name, shape: _hf_tensor(model, name, shape)
        )
        values = fisher_values(
            view,
            sequences,
            _candidates(edits),
            lambda name: view.get_parameter(name).detach(),
            batch_size,
            delta_bytes,
        )
        return values.to_lists()  # the view model goes with this frame; vLLM's weights stay

    # --- Wanda calibration ----------------------------------------------------------------
    # The forward pass itself is an ordinary `llm.generate` in the engine process, between these
    # two calls: a worker cannot schedule requests, so the hooks live on the worker in between.
    def _dtm_linear_module(self, model: torch.nn.Module, name: str) -> tuple[str, LinearBase]:
        """The vLLM linear module whose input is the input of HF weight `name`.

        q/k/v share the fused `qkv_proj` (gate/up `gate_up_proj`): the model class's own
        `packed_modules_mapping` says which fused module holds which HF projection.
        """
        modules = dict(model.named_modules())
        prefix, _, leaf = name.removesuffix(".weight").rpartition(".")
        candidates = [f"{prefix}.{leaf}"] + [
            f"{prefix}.{fused}"
            for fused, parts in getattr(model, "packed_modules_mapping", {}).items()
            if leaf in parts
        ]
        for candidate in candidates:
            module = modules.get(candidate)
            if isinstance(module, LinearBase):
                return candidate, module
        raise ValueError(
            f"{name!r} is not the weight of a linear layer of this vLLM model "
            f"(looked for {candidates})"
        )

    def dtm_input_norms_begin(self, names: Sequence[str]) -> None:
        """Hook the input of each named weight's linear module, summing x_j² and counting rows."""
        self.dtm_input_norms_end()  # drop hooks a failed earlier call may have left
        model = self._dtm_model()
        targets = {name: self._dtm_linear_module(model, name) for name in names}
        sums: dict[str, torch.Tensor] = {}
        rows: dict[str, int] = {}
        hooks: list[torch.utils.hooks.RemovableHandle] = []
        # Kept before registering, so `dtm_input_norms_end` removes whatever got registered.
        self._dtm_norms = (targets, sums, rows, hooks)
        for module_name, module in dict(targets.values()).items():

            def hook(_module: Any, args: tuple[Any, ...], _out: Any, key: str = module_name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                # Summed on the device; one copy to the CPU at the end.
                sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
                rows[key] = rows.get(key, 0) + x.shape[0]

            hooks.append(module.register_forward_hook(hook))

    def dtm_input_norms_end(self) -> dict[str, tuple[torch.Tensor, int, bool]]:
        """Remove the hooks; per weight name: (Σx² over this rank's input, rows seen, sharded).

        `sharded` marks a row-parallel layer whose input holds only this rank's slice of the
        input dimension; column-parallel layers see the full input on every rank.
        """
        state = getattr(self, "_dtm_norms", None)
        self._dtm_norms = None
        if state is None:
            return {}
        targets, sums, rows, hooks = state
        for handle in hooks:
            handle.remove()
        out = {}
        for name, (module_name, module) in targets.items():
            sharded = (
                isinstance(module, RowParallelLinear)
                and module.input_is_parallel
                and module.tp_size > 1
            )
            total = sums.get(module_name)
            total = torch.zeros(0) if total is None else total.cpu()
            out[name] = (total, rows.get(module_name, 0), sharded)
        return out

    # --- layer skip -----------------------------------------------------------------------
    # A probe on decoder layer L changes nothing before L. `dtm_keep_*` records, around one
    # scoring pass of the unedited state, the input of every kept decoder layer for each model
    # step; `dtm_skip_*` wraps layers 0..L-1 so that a later pass over the same requests hands
    # layer L its recorded input instead of computing it. The wrapped layers are the model's
    # own modules, so the layers that run see bit-identical tensors. A step whose token
    # positions differ from the recorded step's (another batch split) runs every layer, so a
    # skip can never use the wrong tokens. Needs eager execution: CUDA graphs replay recorded
    # kernels and would not call the wrappers.
    def _dtm_layers(self) -> torch.nn.ModuleList:
        return self._dtm_model().model.layers

    def dtm_keep_begin(self, stride: int, on_host: bool = False) -> None:
        """Record the inputs of layers 0, stride, 2*stride, ... during the next passes; with
        `on_host` (a GPU rank whose stream exceeds the device budget) in pinned host memory,
        copied back to the device when a skipping pass hands it over."""
        self.dtm_keep_end()
        layers = self._dtm_layers()
        steps: list[dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]] = []
        hooks = []

        def first(_module: Any, args: tuple[Any, ...]) -> None:
            steps.append({})  # layer 0 starts every model step

        # Registered first, so it runs before layer 0's own recording hook.
        hooks.append(layers[0].register_forward_pre_hook(first))
        for index in range(0, len(layers), stride):

            def hook(_module: Any, args: tuple[Any, ...], index: int = index) -> None:
                # Cloned: the layer's fused add + norm updates its inputs in place.
                positions, hidden, residual = args[:3]
                kept = None if residual is None else _keep(residual, on_host)
                steps[-1][index] = (_keep(hidden, on_host), kept, positions.clone())

            hooks.append(layers[index].register_forward_pre_hook(hook))
        self._dtm_keeping = (steps, hooks)

    def dtm_keep_end(self) -> int:
        """Stop recording; keep what was recorded for `dtm_skip_begin`. Returns the steps seen."""
        state = getattr(self, "_dtm_keeping", None)
        self._dtm_keeping = None
        if state is None:
            return 0
        steps, hooks = state
        for handle in hooks:
            handle.remove()
        self._dtm_kept = steps
        return len(steps)

    def dtm_skip_begin(self, from_layer: int) -> int:
        """Wrap layers below the nearest recorded layer <= from_layer; returns that layer."""
        self.dtm_skip_end()
        steps = getattr(self, "_dtm_kept", None) or []
        if not steps:
            raise RuntimeError("no recorded residual stream: call dtm_keep_begin/end first")
        start = max(index for index in steps[0] if index <= from_layer)
        layers = self._dtm_layers()
        skip = _Skip(steps, start)
        originals = [layers[i] for i in range(start)]
        for i in range(start):
            layers[i] = _SkippedLayer(originals[i], i, skip)
        self._dtm_skipping = (originals, skip)
        return start

    def dtm_skip_end(self) -> tuple[int, int]:
        """Put the real layers back; returns (steps skipped, steps run in full)."""
        state = getattr(self, "_dtm_skipping", None)
        self._dtm_skipping = None
        if state is None:
            return (0, 0)
        originals, skip = state
        layers = self._dtm_layers()
        for i, layer in enumerate(originals):
            layers[i] = layer
        return (skip.skipped, skip.full)

    # --- scoring ----------------------------------------------------------------------------
    def dtm_score_begin(self, sequences: list[list[int]], n_prefix: int) -> None:
        """Score the next passes' tokens of `sequences` as the model runs (see `_Scoring`)."""
        self.dtm_score_end()
        model = self._dtm_model()
        scoring = _Scoring(model, sequences, n_prefix)

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            input_ids = args[0] if args else kwargs.get("input_ids")
            positions = args[1] if len(args) > 1 else kwargs.get("positions")
            if isinstance(out, torch.Tensor) and input_ids is not None:
                scoring.step(input_ids, positions, out)

        # On the whole model: the decoder inside is wrapped by vLLM's compile decorator, whose
        # own __call__ bypasses module hooks.
        handle = model.register_forward_hook(hook, with_kwargs=True)
        self._dtm_scoring = (scoring, handle)

    def dtm_score_end(self) -> tuple[torch.Tensor, ...] | None:
        """(argmax, margin, ref_logprob, done) of the pass, or None on a rank that did not
        gather logits."""
        state = getattr(self, "_dtm_scoring", None)
        self._dtm_scoring = None
        if state is None:
            return None
        scoring, handle = state
        handle.remove()
        if not bool(scoring.done.any()):
            return None
        return scoring.argmax, scoring.margin, scoring.ref_logprob, scoring.done


@dataclass
class _Place:
    """Where this rank holds its shard of one HF weight: rows `offset:offset + rows` of the
    (possibly fused) parameter `param`. Column-parallel layers split the HF weight's rows over
    the tensor-parallel ranks (`dim` 0), row-parallel layers its input columns (`dim` 1);
    `replicas` ranks in a row hold the same shard (KV heads replicated when there are fewer of
    them than ranks)."""

    param: torch.Tensor
    offset: int
    rows: int
    dim: int
    replicas: int
    sharded: bool
    bias: torch.Tensor | None = None  # the (possibly fused) module's bias, if it has one

    def piece(self) -> torch.Tensor:
        return self.param.narrow(0, self.offset, self.rows)

    def bias_piece(self) -> torch.Tensor | None:
        """This HF weight's part of the module's bias: its rows of a fused column-parallel
        bias; a row-parallel layer's bias is the whole of it."""
        if self.bias is None or self.dim != 0:
            return self.bias
        return self.bias.narrow(0, self.offset, self.rows)

    def gather(self) -> torch.Tensor:
        """The whole HF weight, on this rank's device (a new tensor)."""
        piece = self.piece()
        if not self.sharded:
            return piece.clone()
        group = get_tp_group()
        whole = group.all_gather(piece.contiguous(), dim=self.dim)
        if self.replicas > 1:
            chunks = whole.chunk(group.world_size, dim=self.dim)
            whole = torch.cat(chunks[:: self.replicas], dim=self.dim)
        return whole

    def write(self, weight: torch.Tensor) -> None:
        """Copy this rank's shard of the whole HF `weight` into the parameter."""
        if self.sharded:
            size = self.piece().shape[self.dim]
            index = get_tp_group().rank_in_group // (self.replicas if self.dim == 0 else 1)
            weight = weight.narrow(self.dim, index * size, size)
        self.piece().copy_(weight)


def _place(model: torch.nn.Module, name: str) -> _Place:
    """This rank's `_Place` of HF weight `name`, read off vLLM's (fused) linear module: the
    model's `packed_modules_mapping` says which fused module holds which HF projection."""
    modules = dict(model.named_modules())
    prefix, _, leaf = name.removesuffix(".weight").rpartition(".")
    module = modules.get(f"{prefix}.{leaf}")
    part = None
    if not isinstance(module, LinearBase):
        for fused, parts in getattr(model, "packed_modules_mapping", {}).items():
            if leaf in parts and isinstance(modules.get(f"{prefix}.{fused}"), LinearBase):
                module, part = modules[f"{prefix}.{fused}"], parts.index(leaf)
    if not isinstance(module, LinearBase) or not name.endswith(".weight"):
        raise ValueError(f"{name!r} is not the weight of a linear layer of this vLLM model")
    param = module.weight.data
    if param.numel() == 0 or param.dim() != 2:
        raise ValueError(f"{name}: vLLM holds no plain 2-D weight for it (packed or quantized)")
    tp = getattr(module, "tp_size", 1)
    sharded = tp > 1 and not isinstance(module, ReplicatedLinear)
    bias = module.bias.data if getattr(module, "bias", None) is not None else None
    if isinstance(module, RowParallelLinear):
        return _Place(param, 0, param.shape[0], 1, 1, sharded, bias)
    if isinstance(module, QKVParallelLinear) and part is not None:
        heads, kv_heads = module.num_heads, module.num_kv_heads
        offsets = [0, heads * module.head_size, (heads + kv_heads) * module.head_size]
        sizes = [heads * module.head_size, kv_heads * module.head_size]
        sizes.append(kv_heads * module.v_head_size)
        replicas = 1 if part == 0 else module.num_kv_head_replicas
        return _Place(param, offsets[part], sizes[part], 0, replicas, sharded, bias)
    if isinstance(module, MergedColumnParallelLinear) and part is not None:
        sizes = [size // tp for size in module.output_sizes]
        return _Place(param, sum(sizes[:part]), sizes[part], 0, 1, sharded, bias)
    if part is not None:
        raise ValueError(f"{name}: fused into a {type(module).__name__}, which is not handled")
    return _Place(param, 0, param.shape[0], 0, 1, sharded, bias)


def _hf_tensor(model: torch.nn.Module, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor this (single, unsharded) rank holds for HF parameter `name` of `shape`, as a
    view: a linear's rows of a fused qkv_proj / gate_up_proj (and of its bias), else the
    parameter of the same name (the embedding's and lm_head's first `shape[0]` rows: vLLM pads
    the vocabulary)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in ("weight", "bias"):
        try:
            place = _place(model, f"{prefix}.weight")
        except ValueError:  # not a linear layer: a norm, the embedding, the lm_head
            place = None
        if place is not None:
            if place.sharded:
                raise ValueError(f"{name}: sharded over tensor-parallel ranks")
            tensor = place.piece() if leaf == "weight" else place.bias_piece()
            if tensor is None:
                raise ValueError(f"{name}: vLLM's layer has no bias")
            return tensor
    module = dict(model.named_modules()).get(prefix)
    tensor = getattr(module, leaf, None) if module is not None else None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: vLLM's model has no such parameter")
    tensor = tensor.data
    if tensor.dim() == len(shape) and tensor.shape[0] > shape[0] and tensor.shape[1:] == shape[1:]:
        tensor = tensor.narrow(0, 0, shape[0])  # padded vocabulary rows
    return tensor


def _candidates(edits: Sequence[tuple[str, Sequence[tuple[str, Any]]]]) -> dict[str, list[Link]]:
    """(name, [(spec, input norm or None)]) as the engine sends them, as links."""
    return {
        name: [
            Link(spec, None, None if norm is None else torch.as_tensor(norm).numpy())
            for spec, norm in links
        ]
        for name, links in edits
    }


def _keep(tensor: torch.Tensor, on_host: bool) -> torch.Tensor:
    """A copy of `tensor`: on the device, or (`on_host`) in pinned host memory. The copy is
    queued on the stream before the layer's in-place update, so it holds the input."""
    if not on_host or tensor.device.type == "cpu":
        return tensor.clone()
    kept = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return kept.copy_(tensor, non_blocking=True)


def _copy_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if tensor.device == device:
        return tensor.clone()
    return tensor.to(device, non_blocking=True)


class _Skip:
    """Shared by the wrapped layers of one pass: which recorded step comes next, and whether
    the running step matches it."""

    def __init__(self, steps: list[dict], start: int) -> None:
        self.steps, self.start = steps, start
        self.step = -1
        self.active = False
        self.skipped = self.full = 0

    def begin_step(self, positions: torch.Tensor) -> None:
        self.step += 1
        kept = self.steps[self.step] if self.step < len(self.steps) else None
        self.active = kept is not None and torch.equal(kept[self.start][2], positions)
        if self.active:
            self.skipped += 1
        else:
            self.full += 1


class _SkippedLayer(torch.nn.Module):
    """Layer `index` < start: passes through while its step is skipped (the last one hands over
    the recorded input of layer `start`), runs the real layer otherwise."""

    def __init__(self, layer: torch.nn.Module, index: int, skip: _Skip) -> None:
        super().__init__()
        self.layer, self.index, self.skip = layer, index, skip

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Any, **kwargs: Any):
        if self.index == 0:
            self.skip.begin_step(positions)
        if not self.skip.active:
            return self.layer(positions, hidden, residual, **kwargs)
        if self.index < self.skip.start - 1:
            return hidden, hidden if residual is None else residual
        kept_hidden, kept_residual, _ = self.skip.steps[self.skip.step][self.skip.start]
        # Copies (onto the device, from pinned host memory where kept there): layer `start`
        # updates its inputs in place, and the record serves many probes.
        return _copy_to(kept_hidden, hidden.device), _copy_to(kept_residual, hidden.device)


class _Scoring:
    """Teacher-forced metrics of one scoring pass, computed in the worker as the model runs.

    vLLM's `prompt_logprobs` runs the lm_head per request over every prompt position, prefix
    included, and builds a Python object per position; a probe needs the logits of the N
    continuation positions only. The hook on the decoder's output takes, from each model step,
    the hidden states of the positions a metric needs (tokens are matched to our sequences by
    their ids and positions, so any batching or chunking of the requests works), and one
    `compute_logits` call per step (vLLM's own lm_head path: tensor-parallel gather, scaling)
    gives their logits.
    """

    def __init__(self, model: torch.nn.Module, sequences: list[list[int]], n_prefix: int) -> None:
        self.model = model
        self.sequences = sequences
        self.n_prefix = n_prefix
        self.n_new = len(sequences[0]) - n_prefix
        shape = (len(sequences), self.n_new)
        self.argmax = torch.full(shape, -1, dtype=torch.int64)
        self.margin = torch.full(shape, float("nan"), dtype=torch.float32)
        self.ref_logprob = torch.full(shape, float("nan"), dtype=torch.float32)
        self.done = torch.zeros(shape, dtype=torch.bool)
        self.by_tokens: dict[tuple[int, ...], list[int]] = {}
        for index, seq in enumerate(sequences):
            self.by_tokens.setdefault(tuple(seq), []).append(index)

    def _owner(self, start: int, tokens: list[int]) -> int | None:
        """The sequence a chunk of one request's tokens (at positions start..) belongs to and
        whose positions are not yet scored."""
        end = start + len(tokens)
        positions = slice(max(start, self.n_prefix - 1), min(end, len(self.sequences[0]) - 1))
        if start == 0 and len(tokens) == len(self.sequences[0]):
            candidates = self.by_tokens.get(tuple(tokens), [])
        else:
            candidates = [i for i, s in enumerate(self.sequences) if s[start:end] == tokens]
        for index in candidates:
            first = positions.start - (self.n_prefix - 1)
            last = positions.stop - (self.n_prefix - 1)
            if first >= last or not bool(self.done[index, first:last].any()):
                return index
        return None

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        ids, pos = input_ids.tolist(), positions.tolist()
        rows, targets = [], []  # hidden-state row, (sequence, continuation index)
        start = 0
        for end in range(1, len(ids) + 1):
            if end < len(ids) and pos[end] == pos[end - 1] + 1:
                continue
            index = self._owner(pos[start], ids[start:end])
            if index is not None:
                for row in range(start, end):
                    i = pos[row] - (self.n_prefix - 1)  # logits at position j predict token j+1
                    if 0 <= i < self.n_new:
                        rows.append(row)
                        targets.append((index, i))
            start = end
        if not rows:
            return
        logits = self.model.compute_logits(hidden[torch.as_tensor(rows, device=hidden.device)])
        if logits is None:  # a tensor-parallel rank other than the one that gathers
            return
        seq = torch.as_tensor([t[0] for t in targets])
        col = torch.as_tensor([t[1] for t in targets])
        next_tokens = torch.as_tensor(
            [self.sequences[s][self.n_prefix + i] for s, i in targets], device=logits.device
        )
        top, gap, own = token_stats(logits, next_tokens)
        self.argmax[seq, col] = top.cpu()
        self.margin[seq, col] = gap.cpu()
        self.ref_logprob[seq, col] = own.cpu()
        self.done[seq, col] = True
