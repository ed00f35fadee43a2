"""The final evaluation of a compressed model against the dense one: pure table building.

The driver measures (on an engine actor) the result against the dense model's reference (round 0
of `reference/`) and both models on windows of real text; this module turns those arrays and the
final `states/` rows into the `final/` tables:

- `prompts`: per prompt, FDT/SDT against the dense reference and NLL of its continuation;
- `components`: per selected component, its chain, share of zeros and nonzero count;
- `summary`: one row: FDT@75 (with a bootstrap interval), mean FDT, SDT share, perplexity of the
  result and of the dense model on the reference continuations and on real text, overall
  sparsity, parameters and bytes.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from dtm_ray.core.decisions.quantize import bits_per_parameter
from dtm_ray.core.metrics import fdt_at, fdt_at_interval
from dtm_ray.core.specs import precision_of
from dtm_ray.core.state import Reference
from dtm_ray.records.schemas import (
    FINAL_COMPONENTS_SCHEMA,
    FINAL_PROMPTS_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
)


def perplexity(nll: np.ndarray) -> float:
    """exp of the mean per-token negative log-likelihood."""
    return float(math.exp(float(np.mean(nll))))


def final_tables(
    dense: Reference,
    fdt: np.ndarray,
    sdt: np.ndarray,
    nll: np.ndarray,
    dense_text_nll: np.ndarray,
    text_nll: np.ndarray,
    states: pa.Table,
    rounds: int,
    text_source: str,
    itemsize: int,
    dtype_name: str,
) -> dict[str, pa.Table]:
    """`fdt`, `sdt`, `nll` per prompt of the result against `dense`; `*_text_nll` per token of
    the real-text windows; `states` the final round's rows of `states/`; `itemsize` and
    `dtype_name` describe the weights as the engine held them."""
    if dense.base_logprob is None:
        raise ValueError("the dense reference has no base_logprob; it was built by an old version")
    dense_nll = -np.asarray(dense.base_logprob, dtype=np.float64).mean(axis=1)
    prompts = pa.Table.from_pydict(
        {
            "prompt_id": list(range(dense.prompts)),
            "fdt": np.asarray(fdt).tolist(),
            "sdt": np.asarray(sdt).tolist(),
            "nll": np.asarray(nll, dtype=np.float64).tolist(),
            "dense_nll": dense_nll.tolist(),
        },
        schema=FINAL_PROMPTS_SCHEMA,
    )

    rows = states.to_pylist()
    params = np.asarray([r["params"] for r in rows], dtype=np.int64)
    share = np.asarray([r["sparsity"] for r in rows], dtype=np.float64)
    # The share was measured as 1 - nonzero/params, so rounding recovers the exact count.
    nonzero = params - np.rint(share * params).astype(np.int64)
    precision = {r["component"]: precision_of(r["chain"], dtype_name) for r in rows}
    quantized = {n: p for n, p in precision.items() if p != dtype_name}
    by_name = {r["component"]: r["params"] for r in rows}
    components = pa.Table.from_pydict(
        {
            "component": [r["component"] for r in rows],
            "layer": [r["layer"] for r in rows],
            "kind": [r["kind"] for r in rows],
            "params": params.tolist(),
            "chain": [r["chain"] for r in rows],
            "precision": [precision[r["component"]] for r in rows],
            "sparsity": share.tolist(),
            "nonzero": nonzero.tolist(),
        },
        schema=FINAL_COMPONENTS_SCHEMA,
    )

    low, high = fdt_at_interval(fdt, 75)
    n_new = dense.n_new
    summary = pa.Table.from_pylist(
        [
            {
                "rounds": rounds,
                "prompts": dense.prompts,
                "new_tokens": n_new,
                "fdt_at_75": fdt_at(fdt, 75),
                "fdt_at_75_low": low,
                "fdt_at_75_high": high,
                "fdt_mean": float(np.mean(fdt)),
                "sdt_mean": float(np.mean(sdt)),
                "sdt_share": float(np.mean(sdt)) / n_new,
                "ppl_reference": float(np.exp(np.mean(nll))),
                "dense_ppl_reference": float(np.exp(np.mean(dense_nll))),
                "ppl_text": perplexity(text_nll),
                "dense_ppl_text": perplexity(dense_text_nll),
                "text_source": text_source,
                "text_tokens": int(np.asarray(text_nll).size),
                "sparsity": float(1 - nonzero.sum() / params.sum()),
                "selected_params": int(params.sum()),
                "nonzero_params": int(nonzero.sum()),
                "dense_bytes": int(params.sum()) * itemsize,
                "nonzero_bytes": int(nonzero.sum()) * itemsize,
                "bits_per_param": bits_per_parameter(quantized, by_name, 8 * itemsize),
                "quantized_share": sum(by_name[n] for n in quantized) / int(params.sum()),
            }
        ],
        schema=FINAL_SUMMARY_SCHEMA,
    )
    return {"prompts": prompts, "components": components, "summary": summary}
