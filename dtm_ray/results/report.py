"""`dtm-ray report RUN_DIR`: PNG plots and a Markdown + HTML report of a run.

Written at the end of every run with a local run directory, and at any time (also mid-run) by
`dtm-ray report`. The report is a list of sections (`SECTIONS`): each is a function from the
run's tables to a `Section` (title, paragraphs, tables, images) or None when it has nothing to
say for this run; rendering to Markdown and HTML happens once, below. A new section (say, a
table of task evaluations) is one more function in that list.

Plots: FDT@75 per layer x kind per round (heatmaps), FDT@75 against sparsity or precision per
kind, perplexity against FDT (perplexity averages away what FDT shows), and the compression
per round.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dtm_ray.core.specs import parse_spec
from dtm_ray.errors import ConfigError
from dtm_ray.records.schemas import STATUS_OK
from dtm_ray.records.store import RunStore, retrying
from dtm_ray.redact import redact
from dtm_ray.results.roles import role_numbers
from dtm_ray.results.show import (
    RunTables,
    component_table,
    headline,
    kind_order,
    load_run,
    rounds_table,
)

DPI = 110


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)  # (caption, frame)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _kind_colors(kinds: list[str]) -> dict[str, tuple]:
    """One colour per kind, the same kind the same colour in every plot."""
    return dict(zip(kinds, _pyplot().get_cmap("tab10").colors, strict=False))


def _write(out: Path, name: str, action: Callable[[], object]) -> None:
    """Write one file of the report with the run dir's retries and failure mapping: a full disk
    is a StorageError naming the file and the report's folder."""
    retrying("write", f"{name} of the report in {out}", action)


def _save(fig, out: Path, name: str) -> str:
    try:
        _write(out, name, lambda: fig.savefig(out / name, dpi=DPI, bbox_inches="tight"))
    finally:
        _pyplot().close(fig)
    return name


# How the key numbers name each prompt role.
ROLE_NOTES = {"test": "held out", "validate": "checked by the floors", "decide": "in-sample"}


# --- sections --------------------------------------------------------------------------------
def key_numbers(run: RunTables) -> pd.DataFrame | None:
    """The final result against the dense model, one row per number."""
    if not run.finished:
        return None
    s = run.final["summary"].iloc[0]
    noise = int(run.references["noise_positions"].sum()) if len(run.references) else 0
    rows = []
    roles = role_numbers(s)
    for role, n in roles:
        on = (
            f"{role} prompts ({int(n['prompts'])}, {ROLE_NOTES[role]})"
            if len(roles) > 1
            else f"the {int(n['prompts'])} prompts (in-sample: the rounds probed them)"
        )
        rows += [
            (
                f"FDT@75 on {on}",
                f"{int(n['fdt_at_75'])} (90% CI {int(n['fdt_at_75_low'])}-"
                f"{int(n['fdt_at_75_high'])})",
                str(run.new_tokens),
            ),
            (f"mean FDT, {role}", f"{n['fdt_mean']:.2f}", str(run.new_tokens)),
            (f"share of divergent tokens (SDT), {role}", f"{n['sdt_share']:.3f}", "0"),
        ]
    rows += [
        (
            "perplexity on the dense model's continuations",
            f"{s['ppl_reference']:.3f}",
            f"{s['dense_ppl_reference']:.3f}",
        ),
        (
            f"perplexity on {s['text_source']} text",
            f"{s['ppl_text']:.3f}",
            f"{s['dense_ppl_text']:.3f}",
        ),
        ("sparsity of the selected weights", f"{s['sparsity']:.4f}", "0"),
        ("bits per parameter (selected weights)", f"{s['bits_per_param']:.2f}", ""),
        ("rounds", str(s["rounds"]), ""),
        ("noise floor (positions, all rounds)", str(noise), ""),
    ]
    if len(run.noise):  # the worst engine actor's null probe, summed over rounds
        worst = run.noise.groupby("round")["noise_positions"].max().sum()
        rows.append(("worst actor's noise (positions, all rounds)", str(int(worst)), ""))
    return pd.DataFrame(rows, columns=["", "compressed", "dense"])


def summary_section(run: RunTables, out: Path) -> Section:
    versions = ", ".join(f"{k} {v}" for k, v in run.info.get("versions", {}).items())
    hardware = run.info.get("hardware", {})
    gpus = ", ".join(hardware.get("gpus", [])) or "none"
    paragraphs = [
        headline(run),
        f"Created {run.info.get('created')} on {hardware.get('host')} "
        f"({hardware.get('cpu_count')} CPUs, GPUs: {gpus}); {versions}.",
        "FDT = first divergent token: how many greedy tokens the compressed model keeps in step "
        "with the reference model; FDT@75 = the largest value that 75 % of prompts reach. "
        f"{run.new_tokens} means no divergence at all. The test prompts are held out: no "
        "decision read them, so their numbers are what new text of the same kind will show; "
        "the decide prompts' are in-sample (the rounds decided on them) and flatter the result.",
    ]
    numbers = key_numbers(run)
    tables = (
        [] if numbers is None else [("key numbers: the result against the dense model", numbers)]
    )
    return Section("Run", paragraphs, tables)


def rounds_section(run: RunTables, out: Path) -> Section | None:
    table = rounds_table(run)
    if table.empty:
        return None
    noise = int(np.nansum(table["noise_positions"]))
    paragraphs = [
        "noise_positions: positions where the reference model's own teacher-forced argmax differs "
        "from its greedy output (decode and prefill kernels disagree at near-ties); these are "
        f"the noise floor, not compression damage. This run: {noise} in total."
    ]
    if "actor_noise" in table:
        worst = int(np.nansum(table["actor_noise"]))
        invariant = run.noise["batch_invariant"]
        mode = (
            "on every actor"
            if invariant.all()
            else "off"
            if not invariant.any()
            else f"on {int(invariant.sum())} of {len(invariant)} actor-rounds"
        )
        paragraphs.append(
            "actor_noise: each round, every engine actor scores the round's model unmodified "
            "against the round's reference (a null probe, `noise/`); actor_noise is the worst "
            "actor's count of positions that depart from the reference's own result "
            "(actor_noise_prompts: its prompts). Probes scored on that actor read this much "
            "damage the model does not have; near-ties that another GPU, kernel or batch shape "
            f"flips. This run: {worst} in all rounds; batch invariance {mode}."
        )
    if "current_fdt75" in table:
        paragraphs.append(
            "current_fdt75: FDT@75 of the round's model against the round's reference "
            f"({run.new_tokens} when the reference is the model's own)."
        )
    return Section("Rounds", paragraphs, [("one row per round", table)])


def heatmap_section(run: RunTables, out: Path) -> Section | None:
    probes = _component_probes(run)
    if probes.empty:
        return None
    plt = _pyplot()
    # One row per round, one column per probe setting of that round.
    rounds = sorted(probes["round"].unique())
    groups = {r: list(dict.fromkeys(probes.loc[probes["round"] == r, "group"])) for r in rounds}
    kinds = kind_order(probes["kind"])
    layers = sorted(probes["layer"].unique())
    columns = max(len(g) for g in groups.values())
    cell = 0.28 if len(layers) > 12 else 0.5
    fig, axes = plt.subplots(
        len(rounds),
        columns,
        figsize=(
            max(3.4, 0.5 * len(kinds) + 1.2) * columns + 1.0,
            (cell * len(layers) + 1.2) * len(rounds),
        ),
        squeeze=False,
        constrained_layout=True,
    )
    panels = [(r, g) for r in rounds for g in groups[r]]
    used = [axes[i][j] for i, r in enumerate(rounds) for j in range(len(groups[r]))]
    image = None
    for ax, (round_, group) in zip(used, panels, strict=True):
        sub = probes[(probes["round"] == round_) & (probes["group"] == group)]
        grid = sub.pivot_table(index="layer", columns="kind", values="fdt_at_75", aggfunc="first")
        grid = grid.reindex(index=layers, columns=kinds)
        image = ax.imshow(
            grid.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=run.new_tokens, aspect="auto"
        )
        ax.set_xticks(range(len(kinds)), kinds)
        step = max(1, len(layers) // 16)
        ax.set_yticks(range(0, len(layers), step), [str(x) for x in layers[::step]])
        ax.set_title(f"round {round_}, {group}", fontsize=10)
        ax.set_xlabel("kind")
        ax.set_ylabel("layer")
        if len(layers) * len(kinds) <= 120:
            for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
                if not np.isnan(value):
                    dark = value < 0.6 * run.new_tokens
                    ax.text(
                        j,
                        i,
                        f"{value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if dark else "black",
                    )
    for ax in axes.flat:
        if not any(ax is u for u in used):
            ax.axis("off")
    shrink = 0.8 if len(rounds) <= 2 else 0.4  # a long bar over many rows reads badly
    fig.colorbar(image, ax=axes, shrink=shrink, label=f"FDT@75 (of {run.new_tokens})")
    name = _save(fig, out, "fdt_heatmap.png")
    return Section(
        "FDT@75 per layer and kind",
        [
            "Each panel is one round at one probe setting (a sparsify round's added sparsity, or a "
            "spec). Dark cells are components whose compression changes the text early. A fused "
            "quantize search probes q/k/v and gate/up of a layer as one group: its members' "
            "cells show the group's value."
        ],
        images=[(name, "FDT@75 per layer x kind, per round and probe setting")],
    )


def _component_probes(run: RunTables) -> pd.DataFrame:
    """Finished one-component probes of the rounds that probed components one by one."""
    probes = run.single_probes()
    keep = (probes["status"] == STATUS_OK) & probes["round"].isin(run.component_rounds())
    return probes[keep]


def _probe_sparsity(spec: str) -> float | None:
    parsed = parse_spec(spec)
    return parsed.sparsity if parsed.is_pruning else None


def curves_section(run: RunTables, out: Path) -> Section | None:
    """FDT@75 against the probe's sparsity (pruning) or its precision (quantization), per kind:
    the mean over the probed layers, one panel per round."""
    probes = _component_probes(run).copy()
    if probes.empty:
        return None
    plt = _pyplot()
    probes["sparsity"] = probes["spec"].map(_probe_sparsity)
    rounds = sorted(probes["round"].unique())
    kinds = kind_order(probes["kind"])
    colors = _kind_colors(kinds)
    columns = min(len(rounds), 4)
    rows = -(-len(rounds) // columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.6 * columns + 1.2, 3.6 * rows),
        squeeze=False,
        sharey=True,
        constrained_layout=True,
    )
    for ax in list(axes.flat)[len(rounds) :]:
        ax.axis("off")
    for ax, round_ in zip(axes.flat, rounds, strict=False):
        sub = probes[probes["round"] == round_]
        pruning = sub["sparsity"].notna().all()
        if pruning:
            # The probe's absolute sparsity, averaged over layers per (kind, added level).
            key, label = "group", "sparsity of the probed weight (mean over layers)"
            points = sub.groupby(["kind", key]).agg(x=("sparsity", "mean"), y=("fdt_at_75", "mean"))
        else:
            key, label = "spec", "precision"
            order = list(dict.fromkeys(sub["spec"]))
            points = sub.groupby(["kind", key]).agg(y=("fdt_at_75", "mean"))
            points["x"] = [order.index(s) for s in points.index.get_level_values(key)]
            ax.set_xticks(range(len(order)), order)
        for kind in kinds:
            if kind not in points.index.get_level_values("kind"):
                continue
            line = points.loc[kind].sort_values("x")
            ax.plot(line["x"], line["y"], marker="o", label=kind, color=colors[kind])
        ax.set_title(f"round {round_}", fontsize=10)
        ax.set_xlabel(label)
        ax.set_ylim(-1, run.new_tokens + 1)
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel(f"FDT@75 (of {run.new_tokens})")
    handles = [plt.Line2D([], [], color=colors[k], marker="o", label=k) for k in kinds]
    fig.legend(handles=handles, title="kind", loc="outside right center")
    name = _save(fig, out, "fdt_vs_compression.png")
    return Section(
        "FDT@75 against compression, per kind",
        [
            "Mean FDT@75 over the probed layers of each kind. In a compressing run every round is "
            "measured against its own reference, so rounds are compared within, not across panels."
        ],
        images=[(name, "FDT@75 against sparsity or precision, per kind")],
    )


def perplexity_section(run: RunTables, out: Path) -> Section | None:
    """Every probe's perplexity change on the reference continuation against its FDT@75."""
    probes = run.single_probes()
    # One dot per probe: a fused group's probe shows on each member's row.
    probes = probes[probes["status"] == STATUS_OK].drop_duplicates(["round", "unit", "spec"])
    if probes.empty or run.references.empty:
        return None
    plt = _pyplot()
    base = run.references.groupby("round")["current_nll"].mean()
    ratio = np.exp(probes["nll_mean"].to_numpy() - base.reindex(probes["round"]).to_numpy())
    change = 100.0 * (ratio - 1.0)
    kinds = kind_order(probes["kind"])
    colors = _kind_colors(kinds)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for kind in kinds:
        mask = (probes["kind"] == kind).to_numpy()
        ax.scatter(
            change[mask],
            probes["fdt_at_75"].to_numpy()[mask],
            s=22,
            alpha=0.8,
            label=kind,
            color=colors[kind],
        )
    if np.abs(change).max() > 50:  # a wide range: logarithmic beyond +-1 %
        ax.set_xscale("symlog", linthresh=1.0)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_xlabel("perplexity change on the reference continuation (%)")
    ax.set_ylabel(f"FDT@75 (of {run.new_tokens})")
    ax.set_ylim(-1, run.new_tokens + 1)
    ax.grid(alpha=0.3)
    ax.legend(title="kind", loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("each dot: one component compressed alone", fontsize=10)
    name = _save(fig, out, "perplexity_vs_fdt.png")
    small = change < np.percentile(change, 50)
    spread = probes["fdt_at_75"].to_numpy()[small]
    text = (
        "Perplexity barely moves for most probes while FDT@75 ranges widely: components with "
        "the same perplexity change differ in how soon the text diverges."
    )
    if len(spread):
        text += (
            f" Among the half of the probes with the smallest perplexity change "
            f"(< {np.percentile(change, 50):.2f} %), FDT@75 spans {spread.min()}-{spread.max()}."
        )
    return Section(
        "Perplexity hides what FDT shows",
        [text],
        images=[(name, "perplexity change against FDT@75, per probe")],
    )


def progress_section(run: RunTables, out: Path) -> Section | None:
    """Sparsity (pruning) or the share of parameters at each precision, after every round."""
    if run.states.empty:
        return None
    plt = _pyplot()
    states = run.states.copy()
    rounds = sorted(states["round"].unique())
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    if run.method == "quantize":
        states["precision"] = states["chain"].map(lambda c: c[-1] if len(c) else "unchanged")
        shares = states.pivot_table(
            index="round", columns="precision", values="params", aggfunc="sum", fill_value=0
        )
        shares = shares.div(shares.sum(axis=1), axis=0)
        bottom = np.zeros(len(shares))
        for precision in shares.columns:
            ax.bar(shares.index, shares[precision], bottom=bottom, label=precision)
            bottom += shares[precision].to_numpy()
        ax.set_ylabel("share of selected parameters")
        title = "precision per round"
    else:
        kinds = kind_order(states["kind"])
        colors = _kind_colors(kinds)
        states["zeros"] = states["sparsity"] * states["params"]
        for kind in kinds:
            sub = states[states["kind"] == kind].groupby("round")[["zeros", "params"]].sum()
            ax.plot(
                sub.index,
                sub["zeros"] / sub["params"],
                marker="o",
                lw=1,
                alpha=0.7,
                label=kind,
                color=colors[kind],
            )
        total = states.groupby("round")[["zeros", "params"]].sum()
        start = _start_sparsity(run)
        x = [-1, *total.index] if start is not None else list(total.index)
        y = total["zeros"] / total["params"]
        y = [start, *y] if start is not None else list(y)
        ax.plot(x, y, marker="s", lw=2.5, color="black", label="all selected")
        if start is not None:
            rounds = [-1, *rounds]
        target = (run.config.get("compress") or {}).get("target_sparsity")
        if target:
            ax.axhline(target, ls="--", color="grey", lw=1)
            ax.text(rounds[0], target, " target", va="bottom", color="grey", fontsize=9)
        ax.set_ylabel("sparsity after the round")
        title = "sparsity per round, per kind (parameter-weighted)"
    ax.set_xticks(rounds, ["start" if r == -1 else str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(title, fontsize=10)
    name = _save(fig, out, "compression_progress.png")
    return Section("Compression per round", images=[(name, title)])


def recovery_section(run: RunTables, out: Path) -> Section | None:
    """Recovery training: the loss curve of every recovery, and the model against the dense
    model's reference before and after it."""
    recovery = run.recovery.sort_values("round")
    if recovery.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), constrained_layout=True)
    start = 0
    for row in recovery.itertuples():
        steps = np.arange(start + 1, start + len(row.loss) + 1)
        ax.plot(steps, row.loss, lw=1.2, label=f"after round {row.round}")
        start += len(row.loss)
    ax.set_xlabel("optimizer step (all recoveries in order)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    title = "recovery training loss"
    ax.set_title(title, fontsize=10)
    name = _save(fig, out, "recovery_loss.png")
    table = recovery[
        [
            "round",
            "steps",
            "workers",
            "seconds",
            "fdt_at_75_before",
            "fdt_at_75_after",
            "fdt_mean_before",
            "fdt_mean_after",
            "perplexity_before",
            "perplexity_after",
        ]
    ]
    paragraphs = [
        "After each listed round the pruned weights were fine-tuned on Ray Train with their zeros "
        "kept; the trained tensors became the base the next round pruned further. FDT against "
        "the dense model's reference, perplexity on the evaluation text, before -> after."
    ]
    return Section(
        "Recovery training", paragraphs, [("one row per recovery", table)], [(name, title)]
    )


def _start_sparsity(run: RunTables) -> float | None:
    """The selected components' sparsity before round 0 (from round 0's decision rows)."""
    first = run.decisions[run.decisions["round"] == 0]
    states = run.states[run.states["round"] == 0]
    if first.empty or states.empty:
        return None
    params = states.set_index("component")["params"]
    before = first.set_index("component")["sparsity_before"].reindex(params.index)
    return float((before * params).sum() / params.sum())


def components_section(run: RunTables, out: Path) -> Section | None:
    last = run.component_round()
    if last is None:
        return None
    table = component_table(run, last)
    if table.empty:
        return None
    shown = table if len(table) <= 20 else pd.concat([table.head(10), table.tail(10)])
    note = "" if len(table) <= 20 else f" (the 10 least and 10 most robust of {len(table)})"
    return Section(
        "Components",
        [
            f"Round {last}: FDT@75 with its 90 % bootstrap interval over prompts, least robust "
            f"first{note}. `dtm-ray show` prints any round."
        ],
        [(f"round {last}", shown)],
    )


def tasks_section(run: RunTables, out: Path) -> Section | None:
    """lm-eval tasks (`final/tasks/`, written by `dtm-ray evaluate` or a job's `evaluate:`)."""
    tasks = run.final.get("tasks")
    if tasks is None or tasks.empty:
        return None
    from dtm_ray.results.task_compare import plot_tasks

    table = tasks[["task", "metric", "examples", "dense", "compressed", "flips", "flipped"]]
    plot_tasks([run.uri], out / "tasks.png")
    return Section(
        "Tasks (lm-eval)",
        [
            "Each task's metric on the dense model and on the compressed one, and the flips: the "
            "share of examples whose answer changed. Equal accuracies can hide many flips, in "
            f"both directions. The run's FDT@75 against the dense model: {_task_fdt(tasks)}."
        ],
        [("tasks", table)],
        images=[("tasks.png", "task metric and flips against FDT@75, mean FDT and perplexity")],
    )


def _task_fdt(tasks: pd.DataFrame) -> str:
    test = tasks["test_fdt_at_75"].iloc[0] if "test_fdt_at_75" in tasks else None
    decide = int(tasks["fdt_at_75"].iloc[0])
    if test is None or pd.isna(test):
        return f"{decide} (on the prompts the rounds probed)"
    return f"{int(test)} on the test prompts (held out), {decide} on the decide prompts (in-sample)"


# The report, top to bottom. Each entry: (run tables, output folder) -> Section or None.
SECTIONS: list[Callable[[RunTables, Path], Section | None]] = [
    summary_section,
    rounds_section,
    perplexity_section,
    heatmap_section,
    curves_section,
    progress_section,
    recovery_section,
    tasks_section,
    components_section,
]


# --- rendering -------------------------------------------------------------------------------
def _markdown_table(frame: pd.DataFrame) -> str:
    cells = frame.astype(object).where(frame.notna(), "-")
    text = [[_fmt(v) for v in row] for row in cells.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in text]
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += section.paragraphs
        for caption, frame in section.tables:
            parts += [f"*{caption}*", _markdown_table(frame)]
        parts += [f"![{caption}]({name})" for name, caption in section.images]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        for caption, frame in section.tables:
            body.append(f"<p><em>{html.escape(caption)}</em></p>")
            body.append(frame.to_html(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}"))
        for name, caption in section.images:
            body.append(
                f'<figure><img src="{html.escape(name)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _is_remote(run_dir: str) -> bool:
    return "://" in run_dir and not run_dir.startswith("file://")


def default_report_dir(run_dir: str) -> Path:
    if _is_remote(run_dir):
        raise ConfigError(f"{run_dir} is not local: its report goes into the run dir's report/")
    return Path(run_dir.removeprefix("file://")) / "report"


def write_report(run_dir: str, out: str | Path | None = None) -> Path | str:
    """Write report.md, report.html and the PNGs into `out` (default RUN_DIR/report; a run on an
    object store gets them there, uploaded once written); returns where report.html is."""
    run = load_run(run_dir)
    if out is None and _is_remote(run_dir):
        store = RunStore(run_dir)
        with tempfile.TemporaryDirectory(prefix=".dtm-ray-report-") as scratch:
            _write_report(run, Path(scratch))
            store.clear_folder("report")
            for path in sorted(Path(scratch).iterdir()):
                store.put_file(path, f"report/{path.name}")
        return store.child_uri("report").split("?", 1)[0] + "/report.html"
    target = Path(out) if out is not None else default_report_dir(run_dir)
    return _write_report(run, target)


def _write_report(run: RunTables, target: Path) -> Path:
    _write(target, "its folder", lambda: target.mkdir(parents=True, exist_ok=True))
    sections = [s for s in (make(run, target) for make in SECTIONS) if s is not None]
    title = f"dtm-ray report: {run.config.get('model')}"
    for name, text in (
        ("report.md", redact(render_markdown(title, sections))),
        ("report.html", redact(render_html(title, sections))),
    ):
        _write(target, name, lambda n=name, t=text: (target / n).write_text(t))
    return target / "report.html"
