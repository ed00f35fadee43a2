"""`dtm-ray show RUN_DIR`: a run's tables as text, read straight from its run directory.

Works on a finished run and on one still in progress (probe rows appear one flush at a time),
local or on s3:// / gs://. `RunTables` is also what `dtm_ray.results.report` draws from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dtm_ray.core.components import kind_of
from dtm_ray.core.serving import fused_group_of
from dtm_ray.errors import ConfigError
from dtm_ray.records.schemas import (
    DECISION_SCHEMA,
    FINAL_COMPONENTS_SCHEMA,
    FINAL_PROMPTS_SCHEMA,
    FINAL_SUMMARY_SCHEMA,
    FINAL_TASKS_SCHEMA,
    FLOOR_SCHEMA,
    NOISE_SCHEMA,
    RECOVERY_SCHEMA,
    REFERENCE_SCHEMA,
    SENSITIVITY_SCHEMA,
    STATE_SCHEMA,
    STATUS_OK,
)
from dtm_ray.records.store import RunStore
from dtm_ray.results.roles import fdt_lines

FINAL_SCHEMAS = {
    "prompts": FINAL_PROMPTS_SCHEMA,
    "components": FINAL_COMPONENTS_SCHEMA,
    "summary": FINAL_SUMMARY_SCHEMA,
    "tasks": FINAL_TASKS_SCHEMA,
}
KIND_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]  # Llama-family order, others after


@dataclass
class RunTables:
    """Every table of one run directory as pandas frames (empty when not written yet)."""

    uri: str
    config: dict[str, Any]
    info: dict[str, Any]
    probes: pd.DataFrame
    references: pd.DataFrame
    decisions: pd.DataFrame
    states: pd.DataFrame
    final: dict[str, pd.DataFrame] = field(default_factory=dict)
    recovery: pd.DataFrame = field(default_factory=RECOVERY_SCHEMA.empty_table().to_pandas)
    floor: pd.DataFrame = field(default_factory=FLOOR_SCHEMA.empty_table().to_pandas)
    noise: pd.DataFrame = field(default_factory=NOISE_SCHEMA.empty_table().to_pandas)
    # guide fisher | weight_error: the rounds' scores in place of probes
    sensitivity: pd.DataFrame = field(default_factory=SENSITIVITY_SCHEMA.empty_table().to_pandas)

    @property
    def new_tokens(self) -> int:
        return int(self.config.get("new_tokens") or 0)

    @property
    def method(self) -> str | None:
        compress = self.config.get("compress")
        return compress.get("method") if compress else None

    @property
    def finished(self) -> bool:
        """A compressing run is finished once its final summary exists."""
        return "summary" in self.final

    @property
    def rounds(self) -> list[int]:
        found = (
            set(self.probes["round"])
            | set(self.references["round"])
            | set(self.states["round"])
            | set(self.sensitivity["round"])
        )
        return sorted(int(r) for r in found)

    def component_rounds(self) -> list[int]:
        """Rounds that probed components one by one: every sparsify or probe-only round, the
        rank rounds of a quantize run (not its search rounds of candidate sets)."""
        counts = self.single_probes().groupby("round")["unit"].nunique()
        if self.method != "quantize":
            return sorted(int(r) for r in counts.index)
        # A search round scores a few candidate sets; a rank round every component alone.
        return sorted(int(r) for r, n in counts.items() if n > 1)

    def component_round(self) -> int | None:
        """The round `show` lists by default: the last of `component_rounds`, else the last
        round with any probe."""
        ranked = self.component_rounds()
        if ranked:
            return ranked[-1]
        if len(self.probes):
            return int(self.probes["round"].max())
        return int(self.sensitivity["round"].max()) if len(self.sensitivity) else None

    def single_probes(self) -> pd.DataFrame:
        """Probe rows that compressed one unit (not a quantize search's candidate sets), one row
        per component, with `unit`: the component, or the fused group (q/k/v, gate/up) a fused
        quantize run probed as one, whose result then shows on each member's row; and `group`:
        what the round probed every unit at ("+0.10" added sparsity for a sparsify round, else
        the spec)."""
        frame = self.probes
        if frame.empty:
            return frame.assign(group=pd.Series(dtype=str), unit=pd.Series(dtype=str))
        units = [
            name if d is None or len(d) <= 1 else fused_group_of(list(d))
            for name, d in zip(frame["component"], frame["delta"], strict=True)
        ]
        single = frame.assign(unit=units)
        single = single[single["unit"].notna()].copy()
        fused = single["unit"] != single["component"]
        if fused.any():
            members = single[fused].assign(component=single.loc[fused, "delta"].map(list))
            members = members.explode("component")
            members["kind"] = members["component"].map(kind_of)
            single = pd.concat([single[~fused], members]).sort_index(kind="stable")
        single["group"] = [
            spec if pd.isna(added) else f"+{added:.2f}"
            for spec, added in zip(single["spec"], single["added"], strict=True)
        ]
        return single.reset_index(drop=True)


def _frame(table: Any, schema: Any) -> pd.DataFrame:
    return (table if table is not None else schema.empty_table()).to_pandas()


def load_run(run_dir: str) -> RunTables:
    """Read a run directory; a folder without run.json is a user error (ConfigError)."""
    store = RunStore(run_dir)
    info = store.read_run_info()
    if info is None:
        raise ConfigError(f"{run_dir} is not a run directory (no run.json)")
    finals = {}
    for name, schema in FINAL_SCHEMAS.items():
        table = store.read_final(name, schema)
        if table is not None:
            finals[name] = table.to_pandas()
    return RunTables(
        uri=run_dir,
        config=info.get("config", {}),
        info=info,
        probes=store.read_probes().to_pandas(),
        references=_frame(store.read_round_table("reference", REFERENCE_SCHEMA), REFERENCE_SCHEMA),
        decisions=_frame(store.read_round_table("decisions", DECISION_SCHEMA), DECISION_SCHEMA),
        states=_frame(store.read_round_table("states", STATE_SCHEMA), STATE_SCHEMA),
        final=finals,
        recovery=_frame(store.read_round_table("recovery", RECOVERY_SCHEMA), RECOVERY_SCHEMA),
        floor=_frame(store.read_round_table("floor", FLOOR_SCHEMA), FLOOR_SCHEMA),
        noise=_frame(store.read_round_table("noise", NOISE_SCHEMA), NOISE_SCHEMA),
        sensitivity=_frame(
            store.read_round_table("sensitivity", SENSITIVITY_SCHEMA), SENSITIVITY_SCHEMA
        ),
    )


# --- tables ------------------------------------------------------------------------------------
def kind_order(kinds: Any) -> list[str]:
    present = list(dict.fromkeys(kinds))
    return [k for k in KIND_ORDER if k in present] + sorted(
        k for k in present if k not in KIND_ORDER
    )


def rounds_table(run: RunTables) -> pd.DataFrame:
    """One row per round: probes, failures, time, noise floor (the reference's own, and the worst
    engine actor's from `noise/`) and the sparsity it ended at."""
    rows = []
    for round_ in run.rounds:
        probes = run.probes[run.probes["round"] == round_]
        ref = run.references[run.references["round"] == round_]
        row: dict[str, Any] = {
            "round": round_,
            "probes": len(probes),
            "failed": int((probes["status"] != STATUS_OK).sum()),
            "probe_s": float(probes["seconds"].median()) if len(probes) else np.nan,
            "noise_positions": int(ref["noise_positions"].sum()) if len(ref) else np.nan,
            "min_margin": float(ref["min_margin"].min()) if len(ref) else np.nan,
        }
        scored = run.sensitivity[run.sensitivity["round"] == round_]
        if len(run.sensitivity):
            # A guide round of fisher or weight_error: candidates scored, the actors' seconds.
            calls = scored.drop_duplicates("call")
            row["scored"] = len(scored)
            row["score_s"] = float(calls["seconds"].sum()) if len(calls) else np.nan
            row["passes"] = int(calls["passes"].sum()) if len(calls) else np.nan
        noise = run.noise[run.noise["round"] == round_]
        if len(run.noise):
            # The worst engine actor's null probe: positions (and prompts) where the unmodified
            # model on that actor departs from the reference's own result.
            worst = noise.sort_values(["noise_positions", "noise_prompts"]).tail(1)
            row["actor_noise"] = int(worst["noise_positions"].iloc[0]) if len(worst) else np.nan
            row["actor_noise_prompts"] = (
                int(worst["noise_prompts"].iloc[0]) if len(worst) else np.nan
            )
        if len(ref) and run.config.get("compress"):
            # The current model against the round's reference: N when it is its own.
            row["current_fdt75"] = _fdt75(ref["current_fdt"].to_numpy())
        states = run.states[run.states["round"] == round_]
        if len(states):
            params = states["params"].sum()
            if run.method == "quantize":
                changed = states["chain"].map(len) > 0
                row["quantized_after"] = float(states.loc[changed, "params"].sum() / params)
            else:
                row["sparsity_after"] = float(
                    (states["sparsity"] * states["params"]).sum() / params
                )
        floor = run.floor[run.floor["round"] == round_]
        if len(floor):  # the largest scale of the step that kept the quality floor
            row["floor_scale"] = (
                float(floor.loc[floor["passed"], "scale"].max()) if (floor["passed"].any()) else 0.0
            )
        recovery = run.recovery[run.recovery["round"] == round_]
        if len(recovery):
            r = recovery.iloc[0]
            row["loss"] = f"{r['loss'][0]:.3f}->{r['loss'][-1]:.3f}"
            # Against the dense model's reference, before -> after the training.
            row["fdt75_dense"] = f"{r['fdt_at_75_before']:g}->{r['fdt_at_75_after']:g}"
            row["fdt_mean_dense"] = f"{r['fdt_mean_before']:.1f}->{r['fdt_mean_after']:.1f}"
            row["perplexity"] = f"{r['perplexity_before']:.2f}->{r['perplexity_after']:.2f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _fdt75(values: np.ndarray) -> int:
    from dtm_ray.core.metrics import fdt_at

    return int(fdt_at(values, 75))


def component_table(run: RunTables, round_: int, group: str | None = None) -> pd.DataFrame:
    """One row per component of a round: FDT@75 and its 90 % interval per probe group, sorted
    from least to most robust (by the first group's FDT@75)."""
    probes = run.single_probes()
    probes = probes[(probes["round"] == round_) & (probes["status"] == STATUS_OK)]
    if group is not None:
        probes = probes[probes["group"] == group]
    if probes.empty:
        return pd.DataFrame()
    cell = [
        f"{v} ({lo}-{hi})"
        for v, lo, hi in zip(
            probes["fdt_at_75"], probes["fdt_at_75_low"], probes["fdt_at_75_high"], strict=True
        )
    ]
    wide = probes.assign(cell=cell).pivot_table(
        index=["component", "layer", "kind"], columns="group", values="cell", aggfunc="first"
    )
    order = probes.pivot_table(
        index=["component", "layer", "kind"], columns="group", values="fdt_at_75", aggfunc="first"
    )
    groups = list(dict.fromkeys(probes["group"]))
    wide = wide[groups]
    wide.columns = [f"FDT@75 {g}" for g in groups]
    wide["_key"] = order[groups[0]]
    wide = wide.sort_values("_key", kind="stable").drop(columns="_key").reset_index()
    return wide.drop(columns="component").rename(columns={"layer": "layer", "kind": "kind"})


def sensitivity_components(run: RunTables, round_: int) -> pd.DataFrame:
    """One row per component of a fisher or weight_error round: its damage score per candidate
    group ("+0.10" added sparsity, or the spec), most sensitive first (by the first group)."""
    rows = run.sensitivity[run.sensitivity["round"] == round_]
    if rows.empty:
        return pd.DataFrame()
    rows = rows.assign(
        group=[
            spec if pd.isna(added) else f"+{added:.2f}"
            for spec, added in zip(rows["spec"], rows["added"], strict=True)
        ],
        layer=[_layer(name) for name in rows["component"]],
        kind=rows["component"].map(kind_of),
    )
    wide = rows.pivot_table(
        index=["component", "layer", "kind"], columns="group", values="score", aggfunc="first"
    )
    groups = list(dict.fromkeys(rows["group"]))
    wide = wide[groups].sort_values(groups[0], ascending=False, kind="stable")
    guide = rows["guide"].iloc[0]
    wide.columns = [f"{guide} {g}" for g in groups]
    return wide.reset_index().drop(columns="component")


def _layer(name: str) -> int | None:
    parts = name.split(".")
    for before, after in zip(parts, parts[1:], strict=False):
        if before == "layers" and after.isdigit():
            return int(after)
    return None


def failed_table(run: RunTables) -> pd.DataFrame:
    failed = run.probes[run.probes["status"] != STATUS_OK]
    return failed[["round", "component", "spec", "attempts", "error"]].reset_index(drop=True)


def final_lines(run: RunTables) -> list[str]:
    if not run.finished:
        return []
    s = run.final["summary"].iloc[0]
    return [
        f"final, against the dense model ({s['new_tokens']} tokens):",
        *[f"  {line}" for line in fdt_lines(s)],
        f"  sparsity {s['sparsity']:.4f} of {s['selected_params']:,} selected parameters, "
        f"{s['bits_per_param']:.2f} bits per parameter, after {s['rounds']} round(s)",
        f"  perplexity on the reference {s['ppl_reference']:.3f} (dense "
        f"{s['dense_ppl_reference']:.3f}), on {s['text_source']} text {s['ppl_text']:.3f} "
        f"(dense {s['dense_ppl_text']:.3f})",
    ]


def headline(run: RunTables) -> str:
    c = run.config
    what = "probe-only"
    compress = c.get("compress")
    if compress:
        goal = (
            f"target sparsity {compress.get('target_sparsity')}"
            if compress.get("method") == "sparsify"
            else f"levels {compress.get('levels')}, min FDT@75 {compress.get('min_fdt')}"
            + (
                f", target {compress['target_bits']:g} bits"
                if compress.get("target_bits") is not None
                else ""
            )
        )
        what = f"{compress.get('method')} (guide {compress.get('guide')}, {goal})"
    if compress:
        status = "finished" if run.finished else "in progress (or stopped): no final/ yet"
    else:
        status = f"{len(run.probes)} probe rows"
    return (
        f"{run.uri}: {c.get('model')} on {c.get('engine')} ({c.get('dtype')}), {what}; "
        f"{_prompt_counts(c)} x {run.new_tokens} tokens; {status}"
    )


def _prompt_counts(config: dict[str, Any]) -> str:
    """'16 prompts', or with held-out roles '16 decide + 16 validate + 64 test prompts'."""
    prompts = config.get("prompts", {})
    validate = prompts.get("validate_count")
    test = (config.get("evaluation") or {}).get("prompts")
    if not config.get("compress") or validate is None or test is None:
        return f"{prompts.get('count')} prompts"
    return f"{prompts.get('count')} decide + {validate} validate + {test} test prompts"


def format_show(
    run: RunTables, round_: int | None = None, group: str | None = None, rows: int = 15
) -> str:
    """The text of `dtm-ray show`: headline, rounds, final result, one round's components
    (least robust first; `rows` from each end, all when 0), failed probes."""
    lines = [headline(run)]
    rounds = rounds_table(run)
    if not rounds.empty:
        lines += ["", "rounds:", _text(rounds)]
    lines += final_lines(run)
    shown = run.component_round() if round_ is None else round_
    if shown is not None:
        if shown not in run.rounds:
            raise ConfigError(f"round {shown} not in {run.uri}; it has rounds {run.rounds}")
        table = component_table(run, shown, group)
        scores = sensitivity_components(run, shown) if table.empty else pd.DataFrame()
        if not scores.empty:  # a fisher or weight_error round: scores, no probes
            guide = run.sensitivity["guide"].iloc[0]
            groups = ", ".join(c.removeprefix(f"{guide} ") for c in scores.columns[2:])
            lines += [
                "",
                f"round {shown}, {guide} score (damage: larger is more sensitive) at {groups}, "
                "most sensitive first:",
                *_ends(scores, rows),
            ]
        elif table.empty and group is not None:
            single = run.single_probes()
            known = list(dict.fromkeys(single.loc[single["round"] == shown, "group"]))
            raise ConfigError(f"round {shown} has no probes at {group}; it has {known}")
        elif table.empty:
            lines += ["", f"round {shown}: no finished probes yet"]
        else:
            groups = ", ".join(c.removeprefix("FDT@75 ") for c in table.columns[2:])
            lines += [
                "",
                f"round {shown}, FDT@75 (90% CI) of {run.new_tokens} at {groups}, "
                "least robust first:",
                *_ends(table, rows),
            ]
    failed = failed_table(run)
    if len(failed):
        lines += ["", f"failed probes ({len(failed)}):", _text(failed)]
    return "\n".join(lines)


def _ends(table: pd.DataFrame, rows: int) -> list[str]:
    """`rows` rows from each end of `table` (all of it when 0 or short enough)."""
    if rows and len(table) > 2 * rows:
        return [
            _text(table.head(rows)),
            f"  ... {len(table) - 2 * rows} more ...",
            _text(table.tail(rows)),
        ]
    return [_text(table)]


def _text(frame: pd.DataFrame) -> str:
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
