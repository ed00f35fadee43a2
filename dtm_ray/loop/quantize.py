"""The quantize loop: FDT-guided mixed precision (the DTM paper's second result), one precision
level at a time, most aggressive first.

Per level, over the components no earlier level took:

    rank round:    every component alone at the level, on top of the current state, against
                   the dense reference on the decide prompts
                   -> ranked by FDT@75 (guide nll: by NLL damage; guides fisher and
                   weight_error: a sensitivity round instead of probes, ranked by the
                   damage score, a fused unit's the sum of its members', `loop.sensitivity`)
    search rounds: S accepted, R the ranked rest; one round evaluates the k combined models
                   S + R[:1] .. S + R[:k] (k engine actors) against the dense reference on the
                   validate prompts, accepts the longest prefix whose FDT@75 interval's lower
                   end (90 %, bootstrap over the validate prompts) stays >= min_fdt, or skips
                   R[0] (backtrack)

Every round measures against the dense model's reference, because `min_fdt` bounds the damage of
the combined model, not of one step: the rank rounds on the decide prompts (round 0 of
`reference/`), the search rounds on the validate prompts (`validate/`), which no ranking read,
so the floor is judged on prompts the order was not fitted to. `guide: uniform` takes components
in model order up to the parameter cap without probing.

With a bits budget (`target_bits`), every unit ends at one of the levels, the last one the
fallback: the more aggressive levels take units in rank order (uniform: model order) while the
average bits, the units not yet placed counted at the last level, is above the budget
(`budget_prefix`); with `min_fdt` too, each level's search stops adding once the budget is met.
The last level is then not searched: it takes every unit left.

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
    average_bits,
    budget_met,
    budget_prefix,
    candidate_sets,
    rank_components,
    search_step,
    uniform_assignment,
)
from dtm_ray.core.serving import fused_groups
from dtm_ray.core.state import Link, ModelState
from dtm_ray.job.checks import CheckedJob
from dtm_ray.log import log
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.rounds import (
    JobEngines,
    Probe,
    RoundReference,
    build_heldout,
    build_reference,
    noise_floor,
    run_probes,
)
from dtm_ray.loop.sensitivity import guide_table, is_sensitivity_guide, sensitivity_round
from dtm_ray.loop.sparsify import LoopResult
from dtm_ray.records.schemas import STATE_SCHEMA, decision_table, state_table
from dtm_ray.records.store import RunStore


class _Rounds:
    """What every round of the search shares: the run, its engines and the dense reference. It
    numbers the rounds and commits each one's decisions/ and states/ rows once."""

    def __init__(
        self, checked: CheckedJob, store: RunStore, engines: JobEngines, streaming: Streaming
    ) -> None:
        self.checked, self.store, self.engines, self.streaming = checked, store, engines, streaming
        # Every quantize round measures against the dense model: the rank rounds on the decide
        # prompts (round 0's reference), the search rounds on the validate prompts.
        self.dense_round = build_reference(engines, store, checked.job, 0, ModelState())
        self.dense = self.dense_round.reference
        self.validate_round = build_heldout(engines, store, "validate")
        self.by_name = {c.name: c for c in checked.components}
        self.params = {c.name: c.params for c in checked.components}
        # unit name -> its components' names: a fused group, or one component under its own name
        if checked.compress.fused:
            groups = fused_groups(checked.components)
            self.units = {u: tuple(c.name for c in members) for u, members in groups.items()}
        else:
            self.units = {c.name: (c.name,) for c in checked.components}
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

    def assignment(self, state: ModelState) -> dict[str, str]:
        """unit -> its level, for the units the state quantized."""
        return {u: state.specs(m[0])[-1] for u, m in self.units.items() if state.chain(m[0])}

    def probe(
        self, state: ModelState, probes: list[Probe], against: RoundReference | None = None
    ) -> int:
        """Run the next round's probes on top of `state` against the dense reference `against`
        (default: on the decide prompts); returns the round number."""
        round_ = self.next
        against = against or self.dense_round
        done = self.store.finished_probes(round_, failed=not self.engines.checked.retry_failed)
        # The dense model's own scores are stored; a compressed state's the first actor gives.
        dense = state.base is None and not any(state.chains.values())
        noise_floor(
            self.engines,
            self.store,
            round_,
            state,
            against.reference,
            against.expected if dense else None,
            needed=any(p.key not in done for p in probes),
        )
        context = RoundContext(round_, state, against.reference)
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
        table = state_table(round_, state, self.checked.components, self.sparsity)
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
    checked: CheckedJob, store: RunStore, engines: JobEngines, streaming: Streaming
) -> LoopResult:
    """Run (or resume) the search over every level; `engines.pool` starts actors when needed."""
    config = checked.compress
    rounds = _Rounds(checked, store, engines, streaming)
    cap = math.floor(config.max_params_share * sum(rounds.params.values()))
    budget, fallback = config.target_bits, config.levels[-1]
    state = ModelState()
    # With a budget the last level is the fallback: it takes what is left, unsearched.
    searched = config.levels if budget is None else config.levels[:-1]
    for level in searched:
        remaining = [u for u, names in rounds.units.items() if not state.chain(names[0])]
        if budget is not None and budget_met(
            rounds.assignment(state), rounds.unit_params, fallback, budget
        ):
            break  # every unit left ends at the fallback
        if config.guide == "uniform":
            if budget is None:
                chosen = uniform_assignment(remaining, rounds.unit_params, cap)
                rows = [
                    _row(rounds, u, state, to_spec=level, statistic="uniform", reason="uniform")
                    for u in chosen
                ]
            else:
                chosen, rows = _fill(rounds, state, level, remaining, "model order")
            changed = rounds.members(chosen)
            state = state.extended({name: Link(level) for name in changed})
            rounds.commit(state, rows, changed)
            continue
        ranked, rows = _rank(rounds, state, level, remaining)
        if budget is not None and config.min_fdt is None:
            chosen, fill_rows = _fill(rounds, state, level, ranked, f"rank by {config.guide}")
            taken = {row["component"]: row for row in fill_rows}
            rows = [taken.get(row["component"], row) for row in rows]
            changed = rounds.members(chosen)
            state = state.extended({name: Link(level) for name in changed})
            rounds.commit(state, rows, changed)
            continue
        rounds.commit(state, rows, [])
        state = _search(rounds, state, level, ranked, cap)
    if budget is not None:
        state = _fallback(rounds, state, fallback)
    last = state_table(max(rounds.next - 1, 0), state, checked.components, rounds.sparsity)
    return LoopResult(rounds.ran, state, last, rounds.next)


def _fill(
    rounds: _Rounds, state: ModelState, level: str, order: list[str], how: str
) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The units of `order` the bits budget puts at `level` (`budget_prefix`), with their
    decisions/ rows: each carries the average bits once it is placed (the units not yet
    placed at the last level)."""
    config = rounds.checked.compress
    budget, fallback = config.target_bits, config.levels[-1]
    assigned = rounds.assignment(state)
    chosen = budget_prefix(order, rounds.unit_params, level, fallback, budget, assigned)
    rows = []
    for unit in chosen:
        assigned[unit] = level
        bits = average_bits(assigned, rounds.unit_params, fallback)
        rows.append(
            _row(
                rounds,
                unit,
                state,
                to_spec=level,
                statistic="bits_per_param",
                value=bits,
                threshold=budget,
                reason=f"within the bits budget ({how}, rank {order.index(unit) + 1} of "
                f"{len(order)}): {bits:.3f} bits per parameter once placed",
            )
        )
    log(
        f"{level}: {len(chosen)} of {len(order)} units by the bits budget; "
        f"{average_bits(assigned, rounds.unit_params, fallback):.3f} bits per parameter "
        f"(target {budget:g})"
    )
    return chosen, rows


def _fallback(rounds: _Rounds, state: ModelState, fallback: str) -> ModelState:
    """With a bits budget: every unit without a level takes the last one."""
    left = [u for u, names in rounds.units.items() if not state.chain(names[0])]
    if not left:
        return state
    config = rounds.checked.compress
    assigned = {**rounds.assignment(state), **dict.fromkeys(left, fallback)}
    bits = average_bits(assigned, rounds.unit_params, config.levels[-1])
    rows = [
        _row(
            rounds,
            unit,
            state,
            to_spec=fallback,
            statistic="bits_per_param",
            value=bits,
            threshold=config.target_bits,
            reason=f"the fallback level: {bits:.3f} bits per parameter in all",
        )
        for unit in left
    ]
    changed = rounds.members(left)
    state = state.extended({name: Link(fallback) for name in changed})
    rounds.commit(state, rows, changed)
    met = "within" if bits <= config.target_bits + 1e-9 else "ABOVE"
    log(
        f"{fallback}: the other {len(left)} units; {bits:.3f} bits per parameter, {met} the "
        f"budget of {config.target_bits:g}"
    )
    return state


def _rank(
    rounds: _Rounds, state: ModelState, level: str, remaining: list[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """The rank round: every remaining unit alone at `level`; the ranking and its rows (the
    caller commits them)."""
    guide = rounds.checked.compress.guide
    if is_sensitivity_guide(guide):
        # A sensitivity round instead of probes: every member scored alone at the level, a
        # unit's score the sum of its members'.
        members = rounds.members(remaining)
        candidates = {name: [(level, None)] for name in members}
        table = sensitivity_round(rounds.engines, rounds.store, rounds.next, state, candidates)
        units = {unit: rounds.units[unit] for unit in remaining}
        probes = guide_table(table, guide, units, rounds.unit_params)
    else:
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
    return ranked, rows


def _by_unit(rounds: _Rounds, probes: pa.Table) -> pa.Table:
    """The probe rows named by unit, with the unit's parameters (rows are stored under the
    unit's last member)."""
    if not rounds.checked.compress.fused:
        return probes
    rows = probes.to_pylist()
    for row in rows:
        unit = rounds.unit_of_last.get(row["component"])
        if unit is not None:
            row["component"], row["params"] = unit, rounds.unit_params[unit]
    return pa.Table.from_pylist(rows, schema=probes.schema)


# What decides a candidate of the search: the lower end of the 90 % bootstrap interval of its
# FDT@75 over the validate prompts.
SEARCH_STATISTIC = "validate fdt_at_75_low"


def _search(
    rounds: _Rounds, state: ModelState, level: str, ranked: list[str], cap: int
) -> ModelState:
    """Search rounds until the ranked list of units is used up (or, with a bits budget, the
    budget is met); returns the state with the level's accepted units."""
    config = rounds.checked.compress
    min_fdt, budget, fallback = config.min_fdt, config.target_bits, config.levels[-1]
    accepted: tuple[str, ...] = ()
    rest: tuple[str, ...] = tuple(ranked)
    skipped: tuple[str, ...] = ()
    while rest:
        k = rounds.checked.job.workers  # one candidate per engine actor
        if budget is not None:
            # Never a candidate past the unit that meets the budget.
            need = budget_prefix(
                rest, rounds.unit_params, level, fallback, budget, rounds.assignment(state)
            )
            if not need:
                break  # met: what is left ends at the fallback
            k = min(k, len(need))
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
        round_ = rounds.probe(state, probes, rounds.validate_round)
        values, shown = _candidate_values(rounds.store, round_, probes)
        step = search_step(accepted, rest, skipped, values, min_fdt, rounds.unit_params, cap, k=k)
        new = step.accepted[len(accepted) :]
        rows = _search_rows(rounds, step, level, state, new, min_fdt, shown)
        changed = rounds.members(new)
        state = state.extended({name: Link(level) for name in changed})
        rounds.commit(state, rows, list(changed))
        accepted, rest, skipped = step.accepted, step.rest, step.skipped
    what = "units" if config.fused else "components"
    bits = ""
    if budget is not None:
        reached = average_bits(rounds.assignment(state), rounds.unit_params, fallback)
        bits = f"; {reached:.3f} bits per parameter with the rest at {fallback} (target {budget:g})"
    log(f"{level}: {len(accepted)} {what} accepted, {len(skipped)} skipped{bits}")
    return state


def _candidate_values(
    store: RunStore, round_: int, probes: list[Probe]
) -> tuple[list[float], list[str]]:
    """Per candidate, in order: the statistic that decides it (SEARCH_STATISTIC; a failed probe
    never passes) and its FDT@75 with the interval, as text for the decision's reason."""
    table = store.read_probes(round_=round_).to_pylist()
    rows = {(r["component"], r["spec"]): r for r in table}
    values, shown = [], []
    for probe in probes:
        row = rows[probe.key]
        if row["status"] != "ok":
            values.append(-math.inf)
            shown.append("failed")
            continue
        values.append(float(row["fdt_at_75_low"]))
        shown.append(
            f"FDT@75 {row['fdt_at_75']} ({row['fdt_at_75_low']}-{row['fdt_at_75_high']}) on "
            f"{len(row['fdt'])} validate prompts"
        )
    return values, shown


def _search_rows(
    rounds: _Rounds,
    step: Any,
    level: str,
    before: ModelState,
    new: Sequence[str],
    min_fdt: float,
    shown: Sequence[str],
) -> list[dict[str, Any]]:
    """One row per evaluated candidate (named by the unit it added) and per skip."""
    rows = []
    for row in step.rows:
        if "skipped" in row:
            reason = f"skipped: {row.get('reason', 'no candidate passed')}"
            rows.append(
                _row(
                    rounds,
                    row["skipped"],
                    before,
                    statistic=SEARCH_STATISTIC,
                    threshold=min_fdt,
                    reason=reason,
                )
            )
            continue
        verdict = "passes" if row["passed"] else "fails"
        rows.append(
            _row(
                rounds,
                row["added"],
                before,
                to_spec=level if row["added"] in new else None,
                statistic=SEARCH_STATISTIC,
                value=float(row["fdt_at_75"]),
                threshold=min_fdt,
                reason=f"set of {row['size']} {verdict} ({shown[row['size'] - 1]})"
                + (", accepted" if row["chosen"] else ""),
            )
        )
    return rows
