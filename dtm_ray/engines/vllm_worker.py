"""Code that runs inside each vLLM worker: the `worker_extension_cls` of `VLLMEngine`.

vLLM imports this module in every worker process (and, in-process mode, in the engine's own
process) before the model loads, and mixes `WeightEditExtension` into the worker class, so the
engine reaches these methods by name through `llm.collective_rpc("dtm_...")`. Named methods need
neither `VLLM_ALLOW_INSECURE_SERIALIZATION` nor picklable callables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from vllm import _custom_ops
from vllm.model_executor.layers import utils as _layer_utils

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
        with torch.no_grad():
            loaded = self._dtm_model().load_weights(list(weights))
        return sorted(loaded or [])

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
