"""The final evaluation of a compressed model against the dense one: pure table building.

The driver measures (on engine actors) the result against the dense model's reference on the
prompts of every role -- test (`test/`: no decision read them), validate (`validate/`: what the
floors and the quantize search checked) and decide (round 0 of `reference/`: what the rounds
probed) -- and both models on windows of real text; this module turns those arrays and the final
`states/` rows into the `final/` tables:

- `prompts`: per prompt of every role (`role`), FDT/SDT against the dense reference and NLL of its
  continuation;
- `components`: per selected component, its chain, share of zeros and nonzero count;
- `summary`: one row: FDT@75 (with a bootstrap interval), mean FDT and SDT share on the test
  prompts (`test_*`), on the validate prompts (`validate_*`) and on the decide prompts (today's
  names, in-sample); perplexity of the result and of the dense model on the decide prompts'
  continuations and on real text, overall sparsity, parameters, bits and bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    HELDOUT_SUMMARY_COLUMNS,
)

# The held-out roles in the order `final/` quotes them (decide, the in-sample one, comes last).
HELDOUT_ROLES = ("test", "validate")


@dataclass
class RoleScores:
    """The result against the dense reference on one role's prompts."""

    reference: Reference  # the dense model's, on the role's prompts
    fdt: np.ndarray  # per prompt
    sdt: np.ndarray
    nll: np.ndarray  # mean NLL of the dense continuation under the result, per prompt


def perplexity(nll: np.ndarray) -> float:
    """exp of the mean per-token negative log-likelihood."""
    return float(math.exp(float(np.mean(nll))))


def _dense_nll(reference: Reference) -> np.ndarray:
    if reference.base_logprob is None:
        raise ValueError("the dense reference has no base_logprob; it was built by an old version")
    return -np.asarray(reference.base_logprob, dtype=np.float64).mean(axis=1)


def _prompt_rows(roles: Mapping[str, RoleScores]) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in FINAL_PROMPTS_SCHEMA.names}
    for role, r in roles.items():
        columns["prompt_id"] += list(range(r.reference.prompts))
        columns["fdt"] += np.asarray(r.fdt).tolist()
        columns["sdt"] += np.asarray(r.sdt).tolist()
        columns["nll"] += np.asarray(r.nll, dtype=np.float64).tolist()
        columns["dense_nll"] += _dense_nll(r.reference).tolist()
        columns["role"] += [role] * r.reference.prompts
    return pa.Table.from_pydict(columns, schema=FINAL_PROMPTS_SCHEMA)


def fdt_numbers(fdt: np.ndarray, sdt: np.ndarray, n_new: int) -> dict[str, Any]:
    """FDT@75 with its 90 % bootstrap interval, mean FDT and SDT of one role's prompts: the
    names of `HELDOUT_SUMMARY_COLUMNS`."""
    low, high = fdt_at_interval(fdt, 75)
    return {
        "prompts": int(np.asarray(fdt).size),
        "fdt_at_75": fdt_at(fdt, 75),
        "fdt_at_75_low": low,
        "fdt_at_75_high": high,
        "fdt_mean": float(np.mean(fdt)),
        "sdt_mean": float(np.mean(sdt)),
        "sdt_share": float(np.mean(sdt)) / n_new,
    }


def final_tables(
    roles: Mapping[str, RoleScores],
    dense_text_nll: np.ndarray,
    text_nll: np.ndarray,
    states: pa.Table,
    rounds: int,
    text_source: str,
    itemsize: int,
    dtype_name: str,
    target_bits: float | None = None,
) -> dict[str, pa.Table]:
    """`roles`: the result against the dense reference on each role's prompts (decide, and test
    and validate where the run has them), in the order final/prompts lists them; `*_text_nll`
    per token of the real-text windows; `states` the final round's rows of `states/`;
    `itemsize` and `dtype_name` describe the weights as the engine held them; `target_bits`
    the quantize budget, if any."""
    decide = roles["decide"]
    dense, fdt, sdt, nll = decide.reference, decide.fdt, decide.sdt, decide.nll
    dense_nll = _dense_nll(dense)
    prompts = _prompt_rows(roles)

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

    n_new = dense.n_new
    heldout = {}
    for role in HELDOUT_ROLES:
        numbers = fdt_numbers(roles[role].fdt, roles[role].sdt, n_new) if role in roles else {}
        heldout.update({f"{role}_{name}": numbers.get(name) for name, _ in HELDOUT_SUMMARY_COLUMNS})
    summary = pa.Table.from_pylist(
        [
            {
                "rounds": rounds,
                **heldout,
                "prompts": dense.prompts,
                "new_tokens": n_new,
                **fdt_numbers(fdt, sdt, n_new),  # the decide prompts: in-sample
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
                "target_bits": target_bits,
            }
        ],
        schema=FINAL_SUMMARY_SCHEMA,
    )
    return {"prompts": prompts, "components": components, "summary": summary}
