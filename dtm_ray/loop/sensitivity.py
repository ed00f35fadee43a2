"""A guide round of `compress.guide: fisher | weight_error`: the anchors' sensitivity signals
(definitions in `dtm_ray.core.sensitivity`) measured on the round's current model instead of
probes, and handed to the same pure decisions as the probes' statistics.

    candidates {component: [(spec, added)]} -> shared out over the engine actors by component
        -> each actor's `sensitivity(state, guide, its share, calibration, stats)`
        -> `sensitivity/round-r` (one table, written once) -> a table with a quality column

`fisher` needs calibration text: `compress.calibration_count` sequences of prefix + new tokens
drawn from the prompt source apart from every prompt role (the same draw as wanda's), each
actor running its own forward + backward passes over all of them for its share of the
components. `weight_error` reads no data. A resumed round reads its table back and computes
nothing; the decisions are pure functions of it, so they come out the same.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from dtm_ray.core.sensitivity import FISHER, SIGNALS
from dtm_ray.core.state import ModelState
from dtm_ray.log import log
from dtm_ray.loop.rounds import JobEngines, calibration_sequences
from dtm_ray.records.schemas import SENSITIVITY_SCHEMA, STATUS_OK, sensitivity_table
from dtm_ray.records.store import RunStore

# component -> its candidate specs, each with its added sparsity (None for quantize)
Candidates = Mapping[str, Sequence[tuple[str, float | None]]]


def is_sensitivity_guide(guide: str) -> bool:
    return guide in SIGNALS


def shares(names: Sequence[str], workers: int) -> list[list[str]]:
    """`names` cut into at most `workers` contiguous shares of near-equal length, in order (the
    cut depends on the job's worker count only, not on which actors are up)."""
    chunks = np.array_split(np.arange(len(names)), max(1, min(workers, len(names))))
    return [[names[i] for i in chunk] for chunk in chunks if len(chunk)]


def sensitivity_round(
    engines: JobEngines,
    store: RunStore,
    round_: int,
    state: ModelState,
    candidates: Candidates,
    stats: Mapping[str, Any] | None = None,
) -> pa.Table:
    """The round's `sensitivity/` table: stored, or measured over the actors and stored."""
    stored = store.read_round_table("sensitivity", SENSITIVITY_SCHEMA, round_)
    if stored is not None:
        log(f"round {round_}: sensitivity read back ({stored.num_rows} candidates)")
        return stored
    checked = engines.checked
    job, config = checked.job, checked.compress
    guide = config.guide
    names = [name for name, specs in candidates.items() if specs]
    added = {(n, spec): a for n, specs in candidates.items() for spec, a in specs}
    pool = engines.pool
    sequences = None
    if guide == FISHER:
        sequences = calibration_sequences(engines, job, config.calibration_count)
    started = time.monotonic()
    calls = []
    for share in shares(names, job.workers):
        specs = {name: [spec for spec, _ in candidates[name]] for name in share}
        share_stats = {n: stats[n] for n in share if n in stats} if stats else None
        calls.append(("sensitivity", (state, guide, specs, sequences, share_stats)))
    results = pool.spread(calls) if calls else []
    table = sensitivity_table(round_, results, added)
    store.write_round_table("sensitivity", round_, table)
    passes = sum(r.passes for r in results)
    log(
        f"round {round_}: {guide} scored {table.num_rows} candidates of {len(names)} components "
        f"on {len(results)} actor(s) in {time.monotonic() - started:.1f} s"
        + (f" ({passes} forward + backward passes in all)" if passes else "")
    )
    return table


def guide_table(
    table: pa.Table,
    guide: str,
    units: Mapping[str, Sequence[str]] | None = None,
    params: Mapping[str, int] | None = None,
) -> pa.Table:
    """The sensitivity rows as the decisions read them: component, spec, added, status, params
    and the damage in a column named by the guide. With `units` (unit -> its members, e.g. a
    fused q/k/v group), a unit's row per spec sums its members' scores (ModelOpt scores a group
    that must share a format so) and is named by the unit; a unit missing a member's score is
    left out (it ranks last, as a component without a probe does)."""
    rows = table.to_pylist()
    score = {(r["component"], r["spec"]): r["score"] for r in rows}
    added = {(r["component"], r["spec"]): r["added"] for r in rows}
    specs = list(dict.fromkeys(r["spec"] for r in rows))
    groups = units if units is not None else {r["component"]: (r["component"],) for r in rows}
    out: dict[str, list] = {k: [] for k in ("component", "spec", "added", "status", "params")}
    out[guide] = []
    for unit, members in groups.items():
        for spec in specs:
            values = [score.get((m, spec)) for m in members]
            if any(v is None for v in values):
                continue
            out["component"].append(unit)
            out["spec"].append(spec)
            out["added"].append(added.get((members[-1], spec)))
            out["status"].append(STATUS_OK)
            out["params"].append(int(params[unit]) if params is not None else 1)
            out[guide].append(float(sum(values)))
    return pa.table(
        {
            "component": pa.array(out["component"], pa.string()),
            "spec": pa.array(out["spec"], pa.string()),
            "added": pa.array(out["added"], pa.float64()),
            "status": pa.array(out["status"], pa.string()),
            "params": pa.array(out["params"], pa.int64()),
            guide: pa.array(out[guide], pa.float64()),
        }
    )


def cost(table: pa.Table) -> dict[str, float]:
    """A sensitivity table's cost: the actors' seconds and forward + backward passes, summed over
    its calls (each call's values repeat on its rows)."""
    calls = {r["call"]: r for r in table.select(["call", "seconds", "passes"]).to_pylist()}
    return {
        "seconds": float(sum(r["seconds"] for r in calls.values())),
        "passes": int(sum(r["passes"] for r in calls.values())),
    }
