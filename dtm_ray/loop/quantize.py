"""The quantize loop: FDT-guided mixed precision (the DTM paper's second result), one precision
level at a time, most aggressive first.

Per level, over the components no earlier level took:

    rank round:    every component alone at the level, on top of the current state
                   -> ranked by FDT@75 (guide nll: by NLL damage)
    search rounds: S accepted, R the ranked rest; one round evaluates the k combined models
                   S + R[:1] .. S + R[:k] (k engine actors) against the dense model, accepts
                   the longest prefix keeping FDT@75 >= min_fdt, or skips R[0] (backtrack)

Every round measures against the dense model's reference (round 0 of `reference/`), because
`min_fdt` bounds the damage of the combined model, not of one step. `guide: uniform` takes
components in model order up to the parameter cap without probing.

With `fused: true` the unit that is probed, ranked, searched and assigned is a fused group (the
selected q/k/v of a layer, its gate/up: vLLM's `qkv_proj` and `gate_up_proj`, which need one
scheme for all shards); o and down stay single. A group is probed as one delta, its parameters
are its members' sum, and its decision rows carry the group's name
(`model.layers.3.self_attn.qkv_proj`). Unfused, every unit is one component, named by its weight.

Resume: every round's probes are stored, and the ranking and every search step are pure
functions of them, so a resumed run replays the loop from the start, reads each stored probe
instead of running it, and reaches the same state. A round's decisions/ and states/ rows are
written once, after its probes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from dtm_ray.cluster.actor import RoundContext
from dtm_ray.core.decisions.quantize import (
    candidate_sets,
    rank_components,
    search_step,
    uniform_assignment,
)
from dtm_ray.core.serving import fused_groups
from dtm_ray.core.state import Link, ModelState
from dtm_ray.job.checks import Plan
from dtm_ray.log import log
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.rounds import JobEngines, Probe, build_reference, noise_floor, run_probes
from dtm_ray.loop.sparsify import LoopResult
from dtm_ray.records.schemas import STATE_SCHEMA, decision_table, state_table
from dtm_ray.records.store import RunStore


class _Rounds:
    """What every round of the search shares: the run, its engines and the dense reference. It
    numbers the rounds and commits each one's decisions/ and states/ rows once."""

    def __init__(
        self, plan: Plan, store: RunStore, engines: JobEngines, streaming: Streaming
    ) -> None:
        self.plan, self.store, self.engines, self.streaming = plan, store, engines, streaming
        # Every quantize round measures against the dense model: round 0's reference.
        self.dense_round = build_reference(engines, store, plan.job, 0, ModelState())
        self.dense = self.dense_round.reference
        self.by_name = {c.name: c for c in plan.components}
        self.params = {c.name: c.params for c in plan.components}
        # unit name -> its components' names: a fused group, or one component under its own name
        if plan.compress.fused:
            groups = fused_groups(plan.components)
            self.units = {u: tuple(c.name for c in members) for u, members in groups.items()}
        else:
            self.units = {c.name: (c.name,) for c in plan.components}
        self.unit_params = {u: sum(self.params[n] for n in m) for u, m in self.units.items()}
        self.unit_of_last = {members[-1]: unit for unit, members in self.units.items()}
        self.next = 0
        self.ran = 0
        self.sparsity: dict[str, float] = {}

    def members(self, units: Sequence[str]) -> tuple[str, ...]:
        return tuple(name for unit in units for name in self.units[unit])

    def probe_of(self, units: Sequence[str], level: str) -> Probe:
        """One probe of `units` added together at `level`, named by the last member (a single
        component without a delta, as unfused runs always stored it)."""
        names = self.members(units)
        return Probe(self.by_name[names[-1]], level, delta=names if len(names) > 1 else None)

    def probe(self, state: ModelState, probes: list[Probe]) -> int:
        """Run the next round's probes on top of `state`; returns the round number."""
        round_ = self.next
        done = self.store.finished_probes(round_, failed=not self.engines.plan.retry_failed)
        # The dense model's own scores are stored; a compressed state's the first actor gives.
        dense = state.base is None and not any(state.chains.values())
        noise_floor(
            self.engines,
            self.store,
            round_,
            state,
            self.dense,
            self.dense_round.expected if dense else None,
            needed=any(p.key not in done for p in probes),
        )
        context = RoundContext(round_, state, self.dense)
        self.ran += run_probes(self.engines, self.store, context, probes, self.streaming)
        return round_

    def commit(self, state: ModelState, rows: list[dict[str, Any]], changed: Sequence[str]) -> None:
        round_ = self.next
        self.next += 1
        stored = self.store.read_round_table("states", STATE_SCHEMA, round_)
        if stored is not None:  # resumed: this round was committed before
            names, shares = stored.column("component"), stored.column("sparsity")
            self.sparsity = dict(zip(names.to_pylist(), shares.to_pylist(), strict=True))
            return
        pool = self.engines.pool
        if not self.sparsity:
            self.sparsity = _shares(pool.call("zero_shares", ModelState(), list(self.params)))
        if changed:  # quantization can round small weights to zero: measure, do not assume
            self.sparsity.update(_shares(pool.call("zero_shares", state, sorted(changed))))
        for row in rows:
            row["round"] = round_
        self.store.write_round_table("decisions", round_, decision_table(rows))
        table = state_table(round_, state, self.plan.components, self.sparsity)
        self.store.write_round_table("states", round_, table)


def _shares(measured: Mapping[str, tuple[float, int]]) -> dict[str, float]:
    return {name: share for name, (share, _) in measured.items()}


def _row(rounds: _Rounds, unit: str, state: ModelState, **values: Any) -> dict[str, Any]:
    """A decisions/ row of a unit (a component, or a fused group: all its members share one
    chain); `round` is filled in at commit."""
    return {
        "round": -1,
        "component": unit,
        "from_chain": state.specs(rounds.units[unit][0]),
        "to_spec": None,
        "statistic": "fdt_at_75",
        "value": float("nan"),
        "threshold": float("nan"),
        "added": None,
        "sparsity_before": None,
        "sparsity_after": None,
        "reason": "",
        **values,
    }


def run_quantize(
    plan: Plan, store: RunStore, engines: JobEngines, streaming: Streaming
) -> LoopResult:
    """Run (or resume) the search over every level; `engines.pool` starts actors when needed."""
    config = plan.compress
    rounds = _Rounds(plan, store, engines, streaming)
    cap = math.floor(config.max_params_share * sum(rounds.params.values()))
    state = ModelState()
    for level in config.levels:
        remaining = [u for u, names in rounds.units.items() if not state.chain(names[0])]
        if config.guide == "uniform":
            chosen = uniform_assignment(remaining, rounds.unit_params, cap)
            rows = [
                _row(rounds, u, state, to_spec=level, statistic="uniform", reason="uniform")
                for u in chosen
            ]
            changed = rounds.members(chosen)
            state = state.extended({name: Link(level) for name in changed})
            rounds.commit(state, rows, changed)
            continue
        ranked = _rank(rounds, state, level, remaining)
        state = _search(rounds, state, level, ranked, cap)
    last = state_table(max(rounds.next - 1, 0), state, plan.components, rounds.sparsity)
    return LoopResult(rounds.ran, state, last, rounds.next)


def _rank(rounds: _Rounds, state: ModelState, level: str, remaining: list[str]) -> list[str]:
    """The rank round: every remaining unit alone at `level`."""
    guide = rounds.plan.compress.guide
    round_ = rounds.probe(state, [rounds.probe_of([unit], level) for unit in remaining])
    probes = _by_unit(rounds, rounds.store.read_probes(round_=round_))
    ranked = rank_components(probes, remaining, guide, spec=level)
    rows = [
        _row(
            rounds,
            name,
            state,
            value=float(i + 1),
            statistic=f"rank by {guide}",
            reason=f"rank {i + 1} of {len(ranked)} at {level}",
        )
        for i, name in enumerate(ranked)
    ]
    rounds.commit(state, rows, [])
    return ranked


def _by_unit(rounds: _Rounds, probes: pa.Table) -> pa.Table:
    """The probe rows named by unit, with the unit's parameters (rows are stored under the
    unit's last member)."""
    if not rounds.plan.compress.fused:
        return probes
    rows = probes.to_pylist()
    for row in rows:
        unit = rounds.unit_of_last.get(row["component"])
        if unit is not None:
            row["component"], row["params"] = unit, rounds.unit_params[unit]
    return pa.Table.from_pylist(rows, schema=probes.schema)


def _search(
    rounds: _Rounds, state: ModelState, level: str, ranked: list[str], cap: int
) -> ModelState:
    """Search rounds until the ranked list of units is used up; returns the state with the
    level's accepted units."""
    min_fdt = rounds.plan.compress.min_fdt
    accepted: tuple[str, ...] = ()
    rest: tuple[str, ...] = tuple(ranked)
    skipped: tuple[str, ...] = ()
    k = rounds.plan.job.workers  # one candidate per engine actor
    while rest:
        sets = candidate_sets(accepted, rest, k, rounds.unit_params, cap)
        # The round's state holds what this level accepted so far; a probe adds the rest of
        # its candidate set, so one probe scores exactly the combined model S + R[:i].
        probes = [
            Probe(
                rounds.by_name[rounds.units[s[-1]][-1]],
                level,
                delta=rounds.members(s[len(accepted) :]),
            )
            for s in sets
        ]
        round_ = rounds.probe(state, probes)
        values = _fdt_values(rounds.store, round_, probes)
        step = search_step(accepted, rest, skipped, values, min_fdt, rounds.unit_params, cap, k=k)
        new = step.accepted[len(accepted) :]
        rows = _search_rows(rounds, step, level, state, new, min_fdt)
        changed = rounds.members(new)
        state = state.extended({name: Link(level) for name in changed})
        rounds.commit(state, rows, list(changed))
        accepted, rest, skipped = step.accepted, step.rest, step.skipped
    what = "units" if rounds.plan.compress.fused else "components"
    log(f"{level}: {len(accepted)} {what} accepted, {len(skipped)} skipped")
    return state


def _fdt_values(store: RunStore, round_: int, probes: list[Probe]) -> list[float]:
    """FDT@75 of each candidate, in order; a failed probe never passes."""
    table = store.read_probes(round_=round_).to_pylist()
    rows = {(r["component"], r["spec"]): r for r in table}
    values = []
    for probe in probes:
        row = rows[probe.key]
        values.append(float(row["fdt_at_75"]) if row["status"] == "ok" else -math.inf)
    return values


def _search_rows(
    rounds: _Rounds, step: Any, level: str, before: ModelState, new: Sequence[str], min_fdt: float
) -> list[dict[str, Any]]:
    """One row per evaluated candidate (named by the unit it added) and per skip."""
    rows = []
    for row in step.rows:
        if "skipped" in row:
            reason = f"skipped: {row.get('reason', 'no candidate passed')}"
            rows.append(_row(rounds, row["skipped"], before, threshold=min_fdt, reason=reason))
            continue
        verdict = "passes" if row["passed"] else "fails"
        rows.append(
            _row(
                rounds,
                row["added"],
                before,
                to_spec=level if row["added"] in new else None,
                value=float(row["fdt_at_75"]),
                threshold=min_fdt,
                reason=f"set of {row['size']} {verdict}" + (", accepted" if row["chosen"] else ""),
            )
        )
    return rows
