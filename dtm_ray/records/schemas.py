"""Every Arrow table of a run directory: its schema and the functions that build and read its rows.

One home for each schema, so the writer, the readers (store, decisions, report, tests, users'
notebooks) and the docs agree. Columns may be added; the ones docs/reference.md lists are a
contract.

Tables (all carry `round` where they belong to one):
- `reference/`  one row per (round, prompt): the reference the round measured against, and the
                round's current model scored against it (`current_*`); its prompts are the
                decide role's.
- `validate/`, `test/`  a compressing run's held-out prompts (one file, round 0): the dense
                model's reference on the validate prompts (what the quantize search and the
                sparsify floor read) and on the test prompts (what only `final/` reads), in
                `reference/`'s schema.
- `probes/`     one row per (round, component, spec): per-prompt FDT/SDT and summaries.
- `noise/`     one row per (round, engine actor): the round's model, unmodified, scored on each
                actor against the round's reference (the noise floor per actor).
- `calibration/` one row per (round, component): input-activation norms for wanda.
- `sensitivity/` one row per (round, component, spec): a `fisher` or `weight_error` guide round's
                scores (what such a round computes instead of probes; read back on resume).
- `decisions/`  one row per (round, component): what the decision did and why.
- `states/`     one row per (round, component): the chain after the round's decision.
- `final/`      `prompts/`, `components/`, `summary/`: the result against the dense model;
                `tasks/`: lm-eval tasks on the dense model and the export (`dtm_ray.results.tasks`).

A compare run (`dtm-ray compare BASE CANDIDATE`) holds `reference/` (round 0: the base's greedy
continuation and its own scoring of it) and `compare/`: `chunks/` (the candidate's teacher-forced
scores, one file per chunk of prompts), `text/` (both models on real text), `prompts/` and
`summary/` (the result); `final/tasks/` when `dtm-ray evaluate` ran on it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dtm_ray.core.state import Link, ModelState, Reference

STATUS_OK = "ok"
STATUS_FAILED = "failed"

PROBE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("spec", pa.string()),
        ("added", pa.float64()),  # added sparsity of a sparsify probe; null for plain probes
        # Every component the probe compressed on top of the round's state: [component] for a
        # one-component probe, a whole candidate set in a quantize search.
        ("delta", pa.list_(pa.string())),
        ("params", pa.int64()),
        ("fdt", pa.list_(pa.int32())),
        ("sdt", pa.list_(pa.int32())),
        ("fdt_mean", pa.float64()),
        ("fdt_at_75", pa.int32()),
        ("fdt_at_75_low", pa.int32()),  # 90 % bootstrap interval of FDT@75 over prompts
        ("fdt_at_75_high", pa.int32()),
        ("sdt_mean", pa.float64()),
        ("nll_mean", pa.float64()),
        ("seconds", pa.float64()),
        ("worker", pa.string()),
        ("attempts", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        # The run's config fingerprint (`dtm_ray.job.spec.config_fingerprint`): rows of another
        # job can never pass for this run's.
        ("config_fingerprint", pa.string()),
    ]
)

REFERENCE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("prompt_id", pa.int32()),
        ("prefix_ids", pa.list_(pa.int32())),
        ("continuation_ids", pa.list_(pa.int32())),
        ("base_argmax", pa.list_(pa.int32())),
        ("base_margin", pa.list_(pa.float32())),
        ("base_logprob", pa.list_(pa.float32())),
        ("noise_positions", pa.int32()),
        ("min_margin", pa.float32()),
        # The round's current model against this reference: FDT = N and SDT = 0 when the
        # reference is the current model's own; measured when it is the dense model's.
        ("current_fdt", pa.int32()),
        ("current_sdt", pa.int32()),
        ("current_nll", pa.float64()),
        # Who generated this prompt's continuation: the actor, its engine and resolved dtype.
        ("worker", pa.string()),
        ("engine", pa.string()),
        ("dtype", pa.string()),
    ]
)

# The noise floor per engine actor (`dtm_ray.loop.rounds.noise_floor`): after a round's reference
# exists and before its probes are read, every engine actor scores the round's model with no
# compression (a null probe) on all prompts against the reference. The reference's own slices
# were built on several actors and probes score on any of them, so whatever an actor gets
# differently from the reference table's `current_*` (its own result, FDT = N and SDT = 0, when
# the reference is the round's model's) is numerics, not compression: near-ties that another
# device, kernel or batch shape flips. 0 everywhere on a CPU in float32.
NOISE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("actor", pa.int32()),  # the actor's index in the engine pool
        ("worker", pa.string()),  # engine-i@host:pid
        ("host", pa.string()),
        ("node", pa.string()),  # Ray's node id
        ("engine", pa.string()),
        ("dtype", pa.string()),
        ("batch_invariant", pa.bool_()),  # VLLM_BATCH_INVARIANT on this actor's engine
        ("prompts", pa.int32()),
        ("short_prompts", pa.int32()),  # prompts whose FDT is below new_tokens
        ("divergent_positions", pa.int64()),  # the SDT numerator: sum of SDT over prompts
        ("min_fdt", pa.int32()),
        # The same sum in the reference table (`current_sdt`): 0 when the reference is the
        # round's model's own, its measured damage when it is the dense model's.
        ("expected_positions", pa.int64()),
        # Where this actor departs from the reference table's `current_fdt` / `current_sdt`: the
        # prompts whose FDT or SDT differ, and sum |SDT - current_sdt| (the actor's noise; equal
        # to short_prompts and divergent_positions against the model's own reference).
        ("noise_prompts", pa.int32()),
        ("noise_positions", pa.int64()),
        ("fdt", pa.list_(pa.int32())),  # per prompt
        ("sdt", pa.list_(pa.int32())),
        ("seconds", pa.float64()),  # the scoring pass
    ]
)

CALIBRATION_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("input_norm", pa.list_(pa.float32())),
    ]
)

# A guide round of `compress.guide: fisher | weight_error` (`dtm_ray.loop.sensitivity`): every
# candidate (component, spec) of the round scored on the round's current model, the components
# shared out over the engine actors. `score` is the damage (larger = more sensitive): fisher's
# gradient score, or weight_error's relative Frobenius error; the decisions read quality = −score.
# `call`, `seconds`, `passes` and `tokens` belong to the actor call that scored the row (one call
# per actor per round; sum them over distinct calls for the round's cost).
SENSITIVITY_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("spec", pa.string()),
        ("added", pa.float64()),  # sparsify: the added sparsity of the spec; null for quantize
        ("guide", pa.string()),  # fisher | weight_error
        ("score", pa.float64()),
        ("weight_mse_max", pa.float64()),  # weight_error: NNCF's max_mean reduction of ΔW
        ("nncf_sensitivity", pa.float64()),  # weight_error: NNCF's spec-free sensitivity
        ("worker", pa.string()),
        ("call", pa.int32()),
        ("seconds", pa.float64()),  # the call's wall time on its actor
        ("passes", pa.int32()),  # the call's forward + backward passes (0: data-free)
        ("tokens", pa.int64()),  # calibration tokens of one pass over all batches
    ]
)

DECISION_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("from_chain", pa.list_(pa.string())),
        ("to_spec", pa.string()),  # the link appended this round; null when left as it was
        ("statistic", pa.string()),  # fdt_at_75 | nll | fisher | weight_error | uniform | ...
        ("value", pa.float64()),  # the statistic's value on the component's curve where it landed
        ("threshold", pa.float64()),  # the threshold that decided it (NaN for uniform)
        ("added", pa.float64()),
        ("sparsity_before", pa.float64()),
        ("sparsity_after", pa.float64()),
        ("reason", pa.string()),
    ]
)

STATE_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("params", pa.int64()),
        ("chain", pa.list_(pa.string())),  # spec strings in the order they were applied
        ("stats_rounds", pa.list_(pa.int32())),  # per link: calibration round, or null
        ("sparsity", pa.float64()),  # share of zeros of the component's current weight
        # The recovery round whose base (base/round-r/) the chain starts from; null: the original.
        ("base_round", pa.int32()),
    ]
)

# One row per recovery (`compress.recovery`): the round it followed, what training did and the
# model against the dense model's reference before and after. Its presence commits the recovery
# (base/round-r/ is complete before it is written).
RECOVERY_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("steps", pa.int32()),
        ("workers", pa.int32()),
        ("tensors", pa.int32()),  # trained tensors written to base/round-r/
        ("loss", pa.list_(pa.float64())),  # mean training loss per optimizer step
        ("seconds", pa.float64()),  # training wall time (this invocation's, on resume)
        ("fdt_at_75_before", pa.float64()),
        ("fdt_mean_before", pa.float64()),
        ("perplexity_before", pa.float64()),  # on the evaluation text
        ("fdt_at_75_after", pa.float64()),
        ("fdt_mean_after", pa.float64()),
        ("perplexity_after", pa.float64()),
        ("fdt_before", pa.list_(pa.int32())),  # per prompt
        ("fdt_after", pa.list_(pa.int32())),
    ]
)

# The quality floor of a sparsify run (`compress.min_fdt`): each candidate state of a round,
# scored against the dense model's reference on the validate prompts. `scale` multiplies the
# round's decided added sparsities (1: the decision as made); the round commits the largest
# passing scale. A candidate passes when `statistic` (the lower end of FDT@75's 90 % bootstrap
# interval over the validate prompts) is at least min_fdt.
FLOOR_SCHEMA = pa.schema(
    [
        ("round", pa.int32()),
        ("scale", pa.float64()),
        ("sparsity", pa.float64()),  # parameter-weighted over the selected components
        ("fdt_at_75", pa.float64()),
        ("fdt_mean", pa.float64()),
        ("passed", pa.bool_()),
        ("fdt", pa.list_(pa.int32())),  # per prompt
        ("fdt_at_75_low", pa.int32()),  # its 90 % bootstrap interval over the prompts
        ("fdt_at_75_high", pa.int32()),
        ("statistic", pa.string()),  # what decided `passed`, e.g. "validate fdt_at_75_low"
        ("role", pa.string()),  # the prompts scored: validate (decide in older runs: null)
    ]
)

FINAL_PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),  # within its role
        # against the dense model's reference on the role's prompts: test (`test/`), validate
        # (`validate/`) or decide (round 0 of `reference/`)
        ("fdt", pa.int32()),
        ("sdt", pa.int32()),
        ("nll", pa.float64()),  # mean NLL of the dense model's continuation under the result
        ("dense_nll", pa.float64()),
        ("role", pa.string()),  # test | validate | decide (null in runs before the roles)
    ]
)

FINAL_COMPONENTS_SCHEMA = pa.schema(
    [
        ("component", pa.string()),
        ("layer", pa.int32()),
        ("kind", pa.string()),
        ("params", pa.int64()),
        ("chain", pa.list_(pa.string())),
        ("precision", pa.string()),  # its quantization spec, or the model's dtype
        ("sparsity", pa.float64()),
        ("nonzero", pa.int64()),
    ]
)

# The held-out numbers of `final/summary` per role (test, validate): `<role>_<name>`.
HELDOUT_SUMMARY_COLUMNS = [
    ("prompts", pa.int32()),
    ("fdt_at_75", pa.int32()),
    ("fdt_at_75_low", pa.int32()),  # 90 % bootstrap interval over the role's prompts
    ("fdt_at_75_high", pa.int32()),
    ("fdt_mean", pa.float64()),
    ("sdt_mean", pa.float64()),
    ("sdt_share", pa.float64()),
]

FINAL_SUMMARY_SCHEMA = pa.schema(
    [
        # (the first two columns are the ones every run's summary has: `RunStore` checks them)
        ("rounds", pa.int32()),
        ("new_tokens", pa.int32()),
        # The result on text the run's decisions never read: the test prompts (null in runs
        # from before the prompt roles) ...
        *[(f"test_{name}", kind) for name, kind in HELDOUT_SUMMARY_COLUMNS],
        # ... on the validate prompts (what the floors and the quantize search checked) ...
        *[(f"validate_{name}", kind) for name, kind in HELDOUT_SUMMARY_COLUMNS],
        # ... and on the decide prompts, the ones the rounds probed: in-sample numbers.
        ("prompts", pa.int32()),
        ("fdt_at_75", pa.int32()),
        ("fdt_at_75_low", pa.int32()),
        ("fdt_at_75_high", pa.int32()),
        ("fdt_mean", pa.float64()),
        ("sdt_mean", pa.float64()),
        ("sdt_share", pa.float64()),
        ("ppl_reference", pa.float64()),  # on the dense model's greedy continuations
        ("dense_ppl_reference", pa.float64()),
        ("ppl_text", pa.float64()),  # on real text (evaluation.text)
        ("dense_ppl_text", pa.float64()),
        ("text_source", pa.string()),
        ("text_tokens", pa.int64()),
        ("sparsity", pa.float64()),  # parameter-weighted over the selected components
        ("selected_params", pa.int64()),
        ("nonzero_params", pa.int64()),
        ("dense_bytes", pa.int64()),  # selected weights in the model's dtype
        ("nonzero_bytes", pa.int64()),  # their nonzero values only (no index overhead)
        ("bits_per_param", pa.float64()),  # over the selected weights, quantization scales included
        ("quantized_share", pa.float64()),  # share of selected parameters held below the dtype
        ("target_bits", pa.float64()),  # quantize: compress.target_bits (null: no budget)
    ]
)

FINAL_TASKS_SCHEMA = pa.schema(
    [
        ("task", pa.string()),  # an lm-eval task (a group's subtasks each get their own row)
        ("metric", pa.string()),  # its first metric, e.g. acc or exact_match
        ("examples", pa.int64()),  # examples both models answered
        ("dense", pa.float64()),  # the metric on the dense model
        ("compressed", pa.float64()),  # and on the exported result
        ("flips", pa.float64()),  # share of examples whose answer differs between the two
        ("flipped", pa.int64()),  # how many
        # The run's FDT@75 from final/summary, beside the task numbers: on the test prompts
        # (held out) and on the decide prompts (in-sample).
        ("test_fdt_at_75", pa.int32()),
        ("fdt_at_75", pa.int32()),
        ("backend", pa.string()),  # lm-eval's model backend: hf | vllm
    ]
)


# --- compare runs (`dtm-ray compare`) ---------------------------------------------------------
# The candidate's teacher-forced pass over the base's reference, one row per prompt, one file per
# chunk of prompts (written as the chunk finishes, so a killed compare resumes with the rest).
COMPARE_CHUNK_SCHEMA = pa.schema(
    [
        ("chunk", pa.int32()),
        ("prompt_id", pa.int32()),
        ("argmax", pa.list_(pa.int32())),  # the candidate's top-1 token per continuation position
        ("margin", pa.list_(pa.float32())),  # its top-1 minus top-2 log-probability
        ("logprob", pa.list_(pa.float32())),  # its log-probability of the reference token
        ("worker", pa.string()),
        ("seconds", pa.float64()),  # the chunk's scoring pass on its actor
    ]
)

# Both models on windows of real text (`evaluation.text`): one file per side.
COMPARE_TEXT_SCHEMA = pa.schema(
    [
        ("side", pa.string()),  # base | candidate
        ("window", pa.int32()),
        ("tokens", pa.int32()),  # tokens scored (the window's length minus its first)
        ("nll_sum", pa.float64()),  # summed negative log-likelihood over them
    ]
)

# The result, one row per prompt. The first divergence is where the candidate's teacher-forced
# argmax first departs from the base's own (`fdt`, N when nowhere); the margins there say whether
# it was a near-tie (both models nearly undecided) or a clear change.
COMPARE_PROMPTS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.int32()),
        ("prefix_ids", pa.list_(pa.int32())),
        ("fdt", pa.int32()),
        ("sdt", pa.int32()),
        ("nll", pa.float64()),  # the candidate's mean NLL of the base's continuation
        ("base_nll", pa.float64()),  # the base's own
        ("noise_positions", pa.int32()),  # where the base's scoring departs from its own greedy
        ("base_token", pa.int32()),  # at the first divergence (null: none): the base's token
        ("candidate_token", pa.int32()),  # and the candidate's
        ("base_margin", pa.float32()),  # the base's top-1 minus top-2 log-probability there
        ("candidate_margin", pa.float32()),  # the candidate's
        ("near_tie", pa.bool_()),  # both margins <= the run's near_tie (null: no divergence)
    ]
)

COMPARE_SUMMARY_SCHEMA = pa.schema(
    [
        ("base", pa.string()),  # the models as named, their engines and dtypes
        ("candidate", pa.string()),
        ("base_engine", pa.string()),
        ("candidate_engine", pa.string()),
        ("base_dtype", pa.string()),
        ("candidate_dtype", pa.string()),
        ("prompts", pa.int32()),
        ("new_tokens", pa.int32()),
        ("fdt_at_75", pa.int32()),
        ("fdt_at_75_low", pa.int32()),  # 90 % bootstrap interval over prompts
        ("fdt_at_75_high", pa.int32()),
        ("fdt_mean", pa.float64()),
        ("sdt_mean", pa.float64()),
        ("sdt_share", pa.float64()),
        ("diverged", pa.int32()),  # prompts whose FDT is below new_tokens
        ("near_ties", pa.int32()),  # of those, divergences at a near-tie
        ("near_tie_share", pa.float64()),  # near_ties / diverged (NaN when none diverged)
        ("near_tie", pa.float64()),  # the margin (log-probability) up to which it is a near-tie
        ("noise_positions", pa.int64()),  # base scoring vs its own greedy, all prompts
        ("ppl_reference", pa.float64()),  # the candidate on the base's continuations
        ("base_ppl_reference", pa.float64()),
        ("ppl_text", pa.float64()),  # the candidate on real text
        ("base_ppl_text", pa.float64()),
        ("text_source", pa.string()),
        ("text_tokens", pa.int64()),
        ("base_seconds", pa.float64()),  # wall time of the base's phase (actors included)
        ("candidate_seconds", pa.float64()),  # and of the candidate's
        ("seconds", pa.float64()),  # both, over every invocation of the compare
    ]
)

COMPARE_TABLE_SCHEMAS = {
    "reference": REFERENCE_SCHEMA,
    "compare/chunks": COMPARE_CHUNK_SCHEMA,
    "compare/text": COMPARE_TEXT_SCHEMA,
    "compare/prompts": COMPARE_PROMPTS_SCHEMA,
    "compare/summary": COMPARE_SUMMARY_SCHEMA,
}


# --- probes ------------------------------------------------------------------------------------
def probe_ok_row(
    round_: int,
    component: Any,
    spec: str,
    added: float | None,
    delta: Sequence[str],
    result: Any,
    worker: str,
    attempts: int,
) -> dict[str, Any]:
    """A finished probe: `component` a components.Component, `result` a probe.ProbeResult."""
    summary = result.summary
    return {
        **_probe_key_columns(round_, component, spec, added, delta),
        "fdt": result.fdt.astype(np.int32).tolist(),
        "sdt": result.sdt.astype(np.int32).tolist(),
        "fdt_mean": summary["fdt_mean"],
        "fdt_at_75": int(summary["fdt_at_75"]),
        "fdt_at_75_low": int(summary["fdt_at_75_low"]),
        "fdt_at_75_high": int(summary["fdt_at_75_high"]),
        "sdt_mean": summary["sdt_mean"],
        "nll_mean": result.nll_mean,
        "seconds": result.seconds,
        "worker": worker,
        "attempts": attempts,
        "status": STATUS_OK,
        "error": None,
    }


def probe_failed_row(
    round_: int,
    component: Any,
    spec: str,
    added: float | None,
    delta: Sequence[str],
    error: str,
    attempts: int,
) -> dict[str, Any]:
    return {
        **_probe_key_columns(round_, component, spec, added, delta),
        "attempts": attempts,
        "status": STATUS_FAILED,
        "error": error,
    }


def _probe_key_columns(
    round_: int, component: Any, spec: str, added: float | None, delta: Sequence[str]
) -> dict[str, Any]:
    return {
        "round": round_,
        "component": component.name,
        "layer": component.layer,
        "kind": component.kind,
        "spec": spec,
        "added": added,
        "delta": list(delta),
        "params": component.params,
    }


def probe_keys(table: pa.Table) -> list[tuple[int, str, str]]:
    """(round, component, spec) of every probe row, in table order."""
    columns = (table.column(name).to_pylist() for name in ("round", "component", "spec"))
    return list(zip(*columns, strict=True))


def dedupe_probes(table: pa.Table) -> pa.Table:
    """One row per (round, component, spec): the earliest `ok` row, else the latest `failed`
    one (a failed probe tried again on resume and failed again: its row counts every try).
    Compaction keeps only these; before it, a round's files may hold a retried probe's failed
    row beside its new one, and a killed compaction leaves rows both in parts and compacted."""
    keys = probe_keys(table)
    statuses = table.column("status").to_pylist()
    chosen: dict[tuple[int, str, str], int] = {}
    for row, key in enumerate(keys):
        kept = chosen.get(key)
        if kept is None or statuses[kept] != STATUS_OK:
            chosen[key] = row
    return table.take(pa.array(sorted(chosen.values()), type=pa.int64()))


# --- reference -----------------------------------------------------------------------------------
def _min_margins(margin: np.ndarray) -> np.ndarray:
    """Per prompt, the smallest top-1/top-2 margin (NaN where the engine gave none)."""
    out = np.full(margin.shape[0], np.nan, dtype=np.float32)
    known = ~np.isnan(margin).all(axis=1)
    out[known] = np.nanmin(margin[known], axis=1)
    return out


def reference_table(
    reference: Reference,
    round_: int,
    current_fdt: Sequence[int] | None = None,
    current_sdt: Sequence[int] | None = None,
    current_nll: Sequence[float] | None = None,
    built_by: Sequence[Mapping[str, Any]] | None = None,
) -> pa.Table:
    """The reference's rows; `current_*` default to the reference model's own scores;
    `built_by` is, per prompt, the info of the actor that generated it (worker, engine, dtype)."""
    prompts = reference.prompts
    margin = np.asarray(reference.base_margin, dtype=np.float32)
    logprob = reference.base_logprob
    own_nll = (
        (-np.asarray(logprob, dtype=np.float64).mean(axis=1)).tolist()
        if logprob is not None
        else [None] * prompts
    )
    return pa.Table.from_pydict(
        {
            "round": [round_] * prompts,
            "prompt_id": list(range(prompts)),
            "prefix_ids": reference.prefixes.tolist(),
            "continuation_ids": reference.continuation.tolist(),
            "base_argmax": reference.base_argmax.tolist(),
            "base_margin": margin.tolist(),
            "base_logprob": (
                np.asarray(logprob, dtype=np.float32).tolist()
                if logprob is not None
                else [None] * prompts
            ),
            "noise_positions": reference.noise_positions.tolist(),
            "min_margin": _min_margins(margin).tolist(),
            "current_fdt": list(current_fdt)
            if current_fdt is not None
            else [reference.n_new] * prompts,
            "current_sdt": list(current_sdt) if current_sdt is not None else [0] * prompts,
            "current_nll": list(current_nll) if current_nll is not None else own_nll,
            **{
                key: [info.get(key) for info in built_by] if built_by else [None] * prompts
                for key in ("worker", "engine", "dtype")
            },
        },
        schema=REFERENCE_SCHEMA,
    )


def _matrix(table: pa.Table, column: str, dtype: type) -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=dtype)


def reference_from_table(table: pa.Table) -> Reference:
    table = table.sort_by("prompt_id")
    logprob = table.column("base_logprob")
    return Reference(
        prefixes=_matrix(table, "prefix_ids", np.int64),
        continuation=_matrix(table, "continuation_ids", np.int64),
        base_argmax=_matrix(table, "base_argmax", np.int64),
        base_margin=_matrix(table, "base_margin", np.float32),
        base_logprob=None if logprob.null_count else _matrix(table, "base_logprob", np.float32),
    )


# --- noise floor ---------------------------------------------------------------------------------
def noise_table(
    round_: int,
    measured: Sequence[Mapping[str, Any]],
    n_new: int,
    current_fdt: Sequence[int],
    current_sdt: Sequence[int],
) -> pa.Table:
    """One row per actor from each actor's `null_probe` answer (in pool order), against the
    reference table's `current_fdt` / `current_sdt` of the round."""
    expected_fdt = np.asarray(current_fdt, dtype=np.int64)
    expected_sdt = np.asarray(current_sdt, dtype=np.int64)
    rows = []
    for actor, m in enumerate(measured):
        fdt = np.asarray(m["fdt"], dtype=np.int64)
        sdt = np.asarray(m["sdt"], dtype=np.int64)
        rows.append(
            {
                "round": round_,
                "actor": actor,
                **{key: m.get(key) for key in ("worker", "host", "node", "engine", "dtype")},
                "batch_invariant": bool(m.get("batch_invariant", False)),
                "prompts": len(fdt),
                "short_prompts": int((fdt < n_new).sum()),
                "divergent_positions": int(sdt.sum()),
                "min_fdt": int(fdt.min()) if len(fdt) else n_new,
                "expected_positions": int(expected_sdt.sum()),
                "noise_prompts": int(((fdt != expected_fdt) | (sdt != expected_sdt)).sum()),
                "noise_positions": int(np.abs(sdt - expected_sdt).sum()),
                "fdt": fdt.astype(np.int32).tolist(),
                "sdt": sdt.astype(np.int32).tolist(),
                "seconds": float(m["seconds"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=NOISE_SCHEMA)


# --- calibration ---------------------------------------------------------------------------------
def calibration_table(round_: int, norms: Mapping[str, np.ndarray]) -> pa.Table:
    names = sorted(norms)
    return pa.Table.from_pydict(
        {
            "round": [round_] * len(names),
            "component": names,
            "input_norm": [np.asarray(norms[n], dtype=np.float32).tolist() for n in names],
        },
        schema=CALIBRATION_SCHEMA,
    )


def calibration_from_table(table: pa.Table) -> dict[str, np.ndarray]:
    return {
        row["component"]: np.asarray(row["input_norm"], dtype=np.float32)
        for row in table.to_pylist()
    }


# --- sensitivity ---------------------------------------------------------------------------------
def sensitivity_table(
    round_: int, results: Sequence[Any], added: Mapping[tuple[str, str], float | None]
) -> pa.Table:
    """One row per (component, spec) of the actors' `SensitivityResult`s (in call order);
    `added` maps (component, spec) to its added sparsity (sparsify rounds)."""
    rows = []
    for call, result in enumerate(results):
        for row in result.rows:
            key = (row["component"], row["spec"])
            rows.append(
                {
                    "round": round_,
                    "component": row["component"],
                    "spec": row["spec"],
                    "added": added.get(key),
                    "guide": result.guide,
                    "score": float(row[result.guide]),
                    "weight_mse_max": row.get("weight_mse_max"),
                    "nncf_sensitivity": row.get("nncf_sensitivity"),
                    "worker": result.worker,
                    "call": call,
                    "seconds": float(result.seconds),
                    "passes": int(result.passes),
                    "tokens": int(result.tokens),
                }
            )
    return pa.Table.from_pylist(rows, schema=SENSITIVITY_SCHEMA)


# --- states --------------------------------------------------------------------------------------
def state_table(
    round_: int,
    state: ModelState,
    components: Sequence[Any],
    sparsity: Mapping[str, float],
    base_round: int | None = None,
) -> pa.Table:
    """One row per selected component (untouched ones with an empty chain); `base_round`: the
    recovery round whose base `state.base` is."""
    rows = [
        {
            "round": round_,
            "component": c.name,
            "layer": c.layer,
            "kind": c.kind,
            "params": c.params,
            "chain": state.specs(c.name),
            "stats_rounds": [link.stats_round for link in state.chain(c.name)],
            "sparsity": float(sparsity[c.name]),
            "base_round": base_round,
        }
        for c in components
    ]
    return pa.Table.from_pylist(rows, schema=STATE_SCHEMA)


def state_from_table(
    table: pa.Table,
    calibration: Mapping[int, Mapping[str, np.ndarray]],
    base_location: Callable[[int], str] | None = None,
) -> tuple[ModelState, dict[str, float]]:
    """The state and per-component sparsity; `calibration` maps round -> component -> norm,
    `base_location` a recovery round to its base folder (the run's `RunStore.base_location`)."""
    chains: dict[str, tuple[Link, ...]] = {}
    sparsity: dict[str, float] = {}
    for row in table.to_pylist():
        name = row["component"]
        links = []
        for spec, stats_round in zip(row["chain"], row["stats_rounds"], strict=True):
            norm = None if stats_round is None else calibration[stats_round][name]
            links.append(Link(spec, stats_round, norm))
        chains[name] = tuple(links)
        sparsity[name] = row["sparsity"]
    rounds = {row.get("base_round") for row in table.to_pylist()}
    if len(rounds) > 1:
        raise ValueError(f"a state's rows name more than one base round: {sorted(rounds)}")
    base_round = rounds.pop() if rounds else None
    base = None
    if base_round is not None:
        if base_location is None:
            raise ValueError(f"this state starts from recovery round {base_round}'s base")
        base = base_location(base_round)
    return ModelState(chains, base), sparsity


# --- decisions -----------------------------------------------------------------------------------
def decision_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist([dict(r) for r in rows], schema=DECISION_SCHEMA)


# The folder of a run directory holding the dense reference on each prompt role's prompts
# (`reference/` also holds every later round's reference on the decide prompts).
ROLE_FOLDERS = {"decide": "reference", "validate": "validate", "test": "test"}

# Each folder of a run directory and the schema of its files.
TABLE_SCHEMAS = {
    "reference": REFERENCE_SCHEMA,
    "validate": REFERENCE_SCHEMA,
    "test": REFERENCE_SCHEMA,
    "probes": PROBE_SCHEMA,
    "noise": NOISE_SCHEMA,
    "calibration": CALIBRATION_SCHEMA,
    "sensitivity": SENSITIVITY_SCHEMA,
    "decisions": DECISION_SCHEMA,
    "states": STATE_SCHEMA,
    "recovery": RECOVERY_SCHEMA,
    "floor": FLOOR_SCHEMA,
    "final/prompts": FINAL_PROMPTS_SCHEMA,
    "final/components": FINAL_COMPONENTS_SCHEMA,
    "final/summary": FINAL_SUMMARY_SCHEMA,
}
