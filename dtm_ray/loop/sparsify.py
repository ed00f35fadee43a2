"""The sparsify loop (the DTM paper's Algorithm 1): rounds of probe -> decide -> apply until the
selected components reach the target sparsity.

    round r: reference (current model's, or the dense one's) -> calibration (wanda) -> probes
             -> decision (a pure function of the tables) -> decisions/ rows -> states/ rows

`states/round-r` is written last and is the round's commit: a round without it is redone from
what it already wrote (its reference, calibration and finished probes are read back, never
recomputed), and a round with it is replayed from the table. Every step is deterministic, so a
run killed anywhere and resumed reaches the same final state as one that never stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from dtm_ray.cluster.actor import RoundContext
from dtm_ray.core.components import Component
from dtm_ray.core.decisions.sparsify import (
    TARGET_TOLERANCE,
    SparsifyDecision,
    absolute_sparsity,
    candidates_from_table,
    decide_sparsify,
    overall_sparsity,
    probe_points,
    round_step,
    uniform_step,
)
from dtm_ray.core.specs import parse_spec
from dtm_ray.core.state import Link, ModelState
from dtm_ray.job.checks import Plan
from dtm_ray.job.spec import CompressConfig
from dtm_ray.log import log
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.rounds import (
    JobEngines,
    Probe,
    build_reference,
    calibrate,
    read_calibration,
    reuse_reference,
    run_probes,
)
from dtm_ray.records.schemas import STATE_SCHEMA, decision_table, state_from_table, state_table
from dtm_ray.records.store import RunStore


@dataclass
class LoopResult:
    """What a compression loop leaves for the final evaluation."""

    ran: int  # probes this invocation ran
    state: ModelState  # the final state
    states: pa.Table  # its states/ rows
    rounds: int


def _components_table(components: list[Component], sparsity: dict[str, float]) -> pa.Table:
    return pa.table(
        {
            "component": [c.name for c in components],
            "params": pa.array([c.params for c in components], pa.int64()),
            "sparsity": pa.array([float(sparsity[c.name]) for c in components], pa.float64()),
        }
    )


def run_sparsify(
    plan: Plan, store: RunStore, engines: JobEngines, streaming: Streaming
) -> LoopResult:
    """Run (or resume) the loop to the target; `engines.pool` starts the actors when needed."""
    config = plan.compress
    params = {c.name: c.params for c in plan.components}
    names = [c.name for c in plan.components]
    ran = 0
    state, sparsity = ModelState(), None
    calibration = read_calibration(store)
    for round_ in range(config.max_rounds + 1):
        committed = store.read_round_table("states", STATE_SCHEMA, round_)
        if committed is None:
            if sparsity is None:  # round 0: the components as the checkpoint has them
                shares = engines.pool.call("zero_shares", state, names)
                sparsity = {name: share for name, (share, _) in shares.items()}
            overall = overall_sparsity(params, sparsity)
            if overall >= config.target_sparsity - TARGET_TOLERANCE:
                break
            if round_ == config.max_rounds:
                log(f"stopping at max_rounds={config.max_rounds}, sparsity {overall:.4f}")
                break
            ran += _sparsify_round(plan, store, engines, round_, state, sparsity, streaming)
            committed = store.read_round_table("states", STATE_SCHEMA, round_)
            calibration = read_calibration(store)  # the round may have calibrated
        # Replay from the table, on resume and straight on alike: one path, one result.
        state, sparsity = state_from_table(committed, calibration)
    rounds = len(store.rounds_written("states"))
    states = state_table(max(rounds - 1, 0), state, plan.components, sparsity)
    return LoopResult(ran, state, states, rounds)


def _sparsify_round(
    plan: Plan,
    store: RunStore,
    engines: JobEngines,
    round_: int,
    state: ModelState,
    sparsity: dict[str, float],
    streaming: Streaming,
) -> int:
    """One round of the sparsify loop, ending with its decisions/ and states/ rows."""
    job, config = plan.job, plan.compress
    params = {c.name: c.params for c in plan.components}
    overall = overall_sparsity(params, sparsity)
    step = round_step(overall, config.target_sparsity, config.step)
    log(
        f"round {round_}: sparsity {overall:.4f}, step {step:.4f} "
        f"(target {config.target_sparsity}, guide {config.guide})"
    )
    # Round 0's reference is the dense model's, needed by the final evaluation in any case.
    if round_ == 0 or config.reference == "current":
        current = build_reference(engines, store, job, round_, state)
    else:
        current = reuse_reference(engines, store, round_, state)
    wanda = config.criterion == "wanda"
    stats = (
        calibrate(engines, store, job, round_, state, list(params), config.calibration_count)
        if wanda
        else {}
    )
    ran = 0
    if config.guide == "uniform":
        decision = uniform_step(params, sparsity, config.target_sparsity)
    else:
        probes = _sparsify_probes(plan.components, sparsity, step, config)
        context = RoundContext(round_, state, current.reference, stats)
        ran = run_probes(engines, store, context, probes, streaming)
        candidates = candidates_from_table(
            store.read_probes(round_=round_),
            _components_table(plan.components, sparsity),
            config.guide,
            current.base_fdt,
            current.base_nll,
            step,
        )
        decision = decide_sparsify(
            candidates, config.target_sparsity, step, config.guide, job.new_tokens
        )
    links = {
        name: Link(
            _spec(config, absolute_sparsity(sparsity[name], added)),
            round_ if wanda else None,
            stats.get(name) if wanda else None,
        )
        for name, added in decision.added.items()
        if added > 0
    }
    new_state = state.extended(links)
    new_sparsity = dict(sparsity)
    if links:
        shares = engines.pool.call("zero_shares", new_state, sorted(links))
        new_sparsity.update({n: s for n, (s, _) in shares.items()})
    rows = _decision_rows(round_, config, state, sparsity, new_sparsity, links, decision)
    store.write_round_table("decisions", round_, decision_table(rows))
    # The commit: once states/round-r exists, the round is done.
    store.write_round_table(
        "states", round_, state_table(round_, new_state, plan.components, new_sparsity)
    )
    now = overall_sparsity(params, new_sparsity)
    log(f"round {round_}: pruned {len(links)} components further; sparsity now {now:.4f}")
    return ran


def _spec(config: CompressConfig, absolute: float) -> str:
    # absolute_sparsity rounds to 6 decimals, so the spec string is short and exact.
    return str(parse_spec(f"{config.criterion}:{absolute}"))


def _sparsify_probes(
    components: list[Component], sparsity: dict[str, float], step: float, config: CompressConfig
) -> list[Probe]:
    """Every selected component at added sparsity step/2 and 3*step/2 (clipped to 1)."""
    probes = []
    for component in components:
        s0 = sparsity[component.name]
        if s0 >= 1:
            continue  # nothing left to prune
        for added in probe_points(step):
            spec = _spec(config, absolute_sparsity(s0, added))
            probes.append(Probe(component, spec, added))
    return probes


def _decision_rows(
    round_: int,
    config: CompressConfig,
    state: ModelState,
    before: dict[str, float],
    after: dict[str, float],
    links: dict[str, Link],
    decision: SparsifyDecision,
) -> list[dict[str, Any]]:
    statistic = {"fdt": "fdt_at_75", "nll": "nll", "uniform": "uniform"}[config.guide]
    rows = []
    for name in before:
        link = links.get(name)
        rows.append(
            {
                "round": round_,
                "component": name,
                "from_chain": state.specs(name),
                "to_spec": link.spec if link else None,
                "statistic": statistic,
                "value": decision.quality.get(name, float("nan")),
                "threshold": decision.threshold,
                "added": decision.added.get(name, 0.0),
                "sparsity_before": before[name],
                "sparsity_after": after[name],
                "reason": decision.reasons.get(name, "pruned" if link else "kept"),
            }
        )
    return rows


