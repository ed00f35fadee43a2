"""The sparsify loop (the DTM paper's Algorithm 1): rounds of probe -> decide -> apply until the
selected components reach the target sparsity.

    round r: reference (current model's, or the dense one's) -> calibration (wanda) -> probes
             -> decision (a pure function of the tables) -> decisions/ rows -> states/ rows

`states/round-r` is written last and is the round's commit: a round without it is redone from
what it already wrote (its reference, calibration and finished probes are read back, never
recomputed), and a round with it is replayed from the table. Every step is deterministic, so a
run killed anywhere and resumed reaches the same final state as one that never stopped.

Two options extend the round:
- `min_fdt` (the quality floor): the decided state is scored against the dense model's reference
  on the validate prompts (which no probe read) before it is committed; when the lower end of
  its FDT@75's 90 % interval over them falls below the floor, the round's added sparsities are
  scaled back by bisection to a scale that keeps it (`floor/round-r` holds every candidate) and
  the run stops after that round, at the sparsity it reached.
- `recovery`: after a committed round, training on Ray Train makes a new base the next rounds
  start from (`dtm_ray.loop.recovery`; it commits with `recovery/round-r`).
"""

from __future__ import annotations

import dataclasses
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
from dtm_ray.core.metrics import fdt_at, fdt_at_interval
from dtm_ray.core.specs import parse_spec
from dtm_ray.core.state import Link, ModelState
from dtm_ray.job.checks import CheckedJob
from dtm_ray.job.spec import CompressConfig
from dtm_ray.log import log
from dtm_ray.loop.progress import Streaming
from dtm_ray.loop.recovery import recover, recovery_due
from dtm_ray.loop.rounds import (
    JobEngines,
    Probe,
    build_heldout,
    build_reference,
    calibrate,
    noise_floor,
    read_calibration,
    reuse_reference,
    run_probes,
)
from dtm_ray.loop.sensitivity import guide_table, is_sensitivity_guide, sensitivity_round
from dtm_ray.records.schemas import (
    FLOOR_SCHEMA,
    STATE_SCHEMA,
    decision_table,
    state_from_table,
    state_table,
)
from dtm_ray.records.store import RunStore

# Bisection steps of the quality floor: the committed scale is within 1/2**6 of the step.
FLOOR_BISECTIONS = 6
# What decides a candidate of the floor: the lower end of the 90 % bootstrap interval of its
# FDT@75 over the validate prompts.
FLOOR_STATISTIC = "validate fdt_at_75_low"


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
    checked: CheckedJob, store: RunStore, engines: JobEngines, streaming: Streaming
) -> LoopResult:
    """Run (or resume) the loop to the target; `engines.pool` starts the actors when needed."""
    config = checked.compress
    params = {c.name: c.params for c in checked.components}
    names = [c.name for c in checked.components]
    ran = 0
    state, sparsity, base_round = ModelState(), None, None
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
            ran += _sparsify_round(
                checked, store, engines, round_, state, sparsity, streaming, base_round
            )
            committed = store.read_round_table("states", STATE_SCHEMA, round_)
            calibration = read_calibration(store)  # the round may have calibrated
        # Replay from the table, on resume and straight on alike: one path, one result.
        state, sparsity = state_from_table(committed, calibration, store.base_location)
        base_round = committed.column("base_round")[0].as_py()
        if recovery_due(checked, round_):
            state, base_round = recover(checked, store, engines, round_, state), round_
        if _floor_stopped(store, round_):
            log(
                f"round {round_}: the quality floor min_fdt={config.min_fdt} stops the run at "
                f"sparsity {overall_sparsity(params, sparsity):.4f}"
            )
            break
    rounds = len(store.rounds_written("states"))
    states = state_table(max(rounds - 1, 0), state, checked.components, sparsity, base_round)
    return LoopResult(ran, state, states, rounds)


def _floor_stopped(store: RunStore, round_: int) -> bool:
    """Whether round `round_` was cut back by the quality floor (then the run ends there)."""
    table = store.read_round_table("floor", FLOOR_SCHEMA, round_)
    if table is None:
        return False
    committed = [r["scale"] for r in table.to_pylist() if r["passed"]]
    return max(committed, default=0.0) < 1.0


def _sparsify_round(
    checked: CheckedJob,
    store: RunStore,
    engines: JobEngines,
    round_: int,
    state: ModelState,
    sparsity: dict[str, float],
    streaming: Streaming,
    base_round: int | None = None,
) -> int:
    """One round of the sparsify loop, ending with its decisions/ and states/ rows."""
    job, config = checked.job, checked.compress
    params = {c.name: c.params for c in checked.components}
    overall = overall_sparsity(params, sparsity)
    step = round_step(overall, config.target_sparsity, config.step)
    log(
        f"round {round_}: sparsity {overall:.4f}, step {step:.4f} "
        f"(target {config.target_sparsity}, guide {config.guide})"
    )
    scores = is_sensitivity_guide(config.guide)  # a sensitivity round instead of probes
    # Round 0's reference is the dense model's, needed by the final evaluation in any case; a
    # sensitivity guide reads no other round's.
    if round_ == 0 or (config.reference == "current" and not scores):
        current = build_reference(engines, store, job, round_, state)
    elif not scores:
        current = reuse_reference(engines, store, round_, state)
    if config.guide != "uniform" and not scores:
        # Before any probe is read: what each actor's numerics alone make of the round's model.
        noise_floor(engines, store, round_, state, current.reference, current.expected)
    wanda = config.criterion == "wanda"
    stats = (
        calibrate(engines, store, job, round_, state, list(params), config.calibration_count)
        if wanda
        else {}
    )
    ran = 0
    if config.guide == "uniform":
        decision = uniform_step(params, sparsity, config.target_sparsity)
    elif scores:
        probes = _sparsify_probes(checked.components, sparsity, step, config)
        specs: dict[str, list[tuple[str, float | None]]] = {}
        for probe in probes:
            specs.setdefault(probe.component.name, []).append((probe.spec, probe.added))
        table = sensitivity_round(engines, store, round_, state, specs, stats)
        candidates = candidates_from_table(
            guide_table(table, config.guide),
            _components_table(checked.components, sparsity),
            config.guide,
            float("nan"),
            float("nan"),
            step,
        )
        decision = decide_sparsify(
            candidates, config.target_sparsity, step, config.guide, job.new_tokens
        )
    else:
        probes = _sparsify_probes(checked.components, sparsity, step, config)
        context = RoundContext(round_, state, current.reference, stats)
        ran = run_probes(engines, store, context, probes, streaming)
        candidates = candidates_from_table(
            store.read_probes(round_=round_),
            _components_table(checked.components, sparsity),
            config.guide,
            current.base_fdt,
            current.base_nll,
            step,
        )
        decision = decide_sparsify(
            candidates, config.target_sparsity, step, config.guide, job.new_tokens
        )
    if config.min_fdt is not None:
        decision = _floor(checked, store, engines, round_, state, sparsity, decision, stats)
    links = _links(config, round_, sparsity, decision.added, stats)
    new_state = state.extended(links)
    new_sparsity = dict(sparsity)
    if links:
        shares = engines.pool.call("zero_shares", new_state, sorted(links))
        new_sparsity.update({n: s for n, (s, _) in shares.items()})
    rows = _decision_rows(round_, config, state, sparsity, new_sparsity, links, decision)
    store.write_round_table("decisions", round_, decision_table(rows))
    # The commit: once states/round-r exists, the round is done.
    store.write_round_table(
        "states",
        round_,
        state_table(round_, new_state, checked.components, new_sparsity, base_round),
    )
    now = overall_sparsity(params, new_sparsity)
    log(f"round {round_}: pruned {len(links)} components further; sparsity now {now:.4f}")
    return ran


def _links(
    config: CompressConfig,
    round_: int,
    sparsity: dict[str, float],
    added: dict[str, float],
    stats: dict[str, Any],
) -> dict[str, Link]:
    """The round's new link per component it prunes further."""
    wanda = config.criterion == "wanda"
    return {
        name: Link(
            _spec(config, absolute_sparsity(sparsity[name], a)),
            round_ if wanda else None,
            stats.get(name) if wanda else None,
        )
        for name, a in added.items()
        if a > 0
    }


def _floor(
    checked: CheckedJob,
    store: RunStore,
    engines: JobEngines,
    round_: int,
    state: ModelState,
    sparsity: dict[str, float],
    decision: SparsifyDecision,
    stats: dict[str, Any],
) -> SparsifyDecision:
    """The decision cut back to keep the floor against the dense model's reference on the
    validate prompts: a candidate passes when the lower end of the 90 % bootstrap interval of
    its FDT@75 there is >= min_fdt, so a pass is not the luck of a few prompts. The decided
    state is scored as a whole; when it fails, the added sparsities are scaled by a factor in
    [0, 1] that passes, found by bisection (each candidate scored as a whole; FDT@75 is noisy,
    so the result passes within 1/64 of a scale that fails, which need not be the largest
    passing one). Every candidate goes to `floor/round-r`."""
    config = checked.compress
    params = {c.name: c.params for c in checked.components}
    dense = build_heldout(engines, store, "validate").reference
    rows = []

    def scaled(scale: float) -> dict[str, float]:
        return {name: a * scale for name, a in decision.added.items()}

    def passes(scale: float) -> bool:
        added = scaled(scale)
        links = _links(config, round_, sparsity, added, stats)
        result = engines.pool.call("score", state.extended(links), dense)
        value = float(fdt_at(result.fdt, 75))
        low, high = fdt_at_interval(result.fdt, 75)
        passed = low >= config.min_fdt
        after = {n: absolute_sparsity(sparsity[n], added.get(n, 0.0)) for n in sparsity}
        rows.append(
            {
                "round": round_,
                "scale": scale,
                "sparsity": overall_sparsity(params, after),
                "fdt_at_75": value,
                "fdt_mean": float(result.fdt.mean()),
                "passed": passed,
                "fdt": [int(v) for v in result.fdt],
                "fdt_at_75_low": low,
                "fdt_at_75_high": high,
                "statistic": FLOOR_STATISTIC,
                "role": "validate",
            }
        )
        log(
            f"round {round_}: quality floor, scale {scale:.4f}: FDT@75 {value:g} ({low}-{high}) "
            f"on {dense.prompts} validate prompts vs dense: {'passes' if passed else 'fails'}"
        )
        return passed

    low = 1.0
    if not passes(1.0):
        low, high = 0.0, 1.0
        for _ in range(FLOOR_BISECTIONS):
            middle = (low + high) / 2
            if passes(middle):
                low = middle
            else:
                high = middle
    store.write_round_table("floor", round_, pa.Table.from_pylist(rows, schema=FLOOR_SCHEMA))
    if low == 1.0:
        return decision
    reason = (
        f"cut back to {low:.4f} of the step by the quality floor min_fdt={config.min_fdt} "
        f"({FLOOR_STATISTIC})"
    )
    added = scaled(low)
    reasons = dict(decision.reasons)
    reasons.update({name: reason for name, a in decision.added.items() if a > 0})
    return dataclasses.replace(
        decision,
        added=added,
        new_sparsity={n: absolute_sparsity(sparsity[n], added.get(n, 0.0)) for n in sparsity},
        overall_after=overall_sparsity(
            params, {n: absolute_sparsity(sparsity[n], added.get(n, 0.0)) for n in sparsity}
        ),
        reasons=reasons,
    )


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
    # The score guides' value is their quality, minus the damage score.
    statistic = {"fdt": "fdt_at_75", "nll": "nll"}.get(config.guide, config.guide)
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
