"""The `hf` engine: transformers + torch. The reference in tests, and the fallback for models and
machines vLLM cannot serve."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from dtm_ray.engines.base import ScoreResult, continuation_length, torch_dtype


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


class HFEngine:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype))
        self.model.to(self.device).eval()
        # Always produce exactly n_new tokens: no stopping at EOS.
        self.model.generation_config.eos_token_id = None
        self.pad_id = self.model.config.pad_token_id or 0
        self._params = dict(self.model.named_parameters())
        self._originals: dict[str, torch.Tensor] = {}
        self._closed = False

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
    def score(self, sequences: Sequence[Sequence[int]], n_prefix: int) -> ScoreResult:
        self._check_open()
        n_new = continuation_length(sequences, n_prefix)
        argmax, margin, ref_lp = [], [], []
        for batch in _batches(list(sequences), self.batch_size):
            ids = torch.as_tensor(np.asarray(batch), dtype=torch.long, device=self.device)
            # Logits at positions n_prefix-1 .. L-2 predict the N continuation tokens.
            logits = self.model(input_ids=ids, logits_to_keep=n_new + 1).logits[:, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top2 = logprobs.topk(2, dim=-1)
            argmax.append(top2.indices[..., 0].cpu())
            margin.append((top2.values[..., 0] - top2.values[..., 1]).cpu())
            targets = ids[:, n_prefix:].unsqueeze(-1)
            ref_lp.append(logprobs.gather(-1, targets).squeeze(-1).cpu())
        return ScoreResult(
            argmax=torch.cat(argmax).numpy().astype(np.int64),
            margin=torch.cat(margin).numpy(),
            ref_logprob=torch.cat(ref_lp).numpy(),
        )

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
            original = self._param(name).detach()
        return original.to("cpu", copy=True)

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
            if name not in self._originals:
                self._originals[name] = param.detach().clone()
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def restore(self, names: Iterable[str]) -> None:
        self._check_open()
        for name in names:
            original = self._originals.pop(name, None)
            if original is not None:
                self._param(name).copy_(original)

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
