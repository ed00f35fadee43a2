"""lm-eval results across runs: the rows of several runs' `final/tasks/` beside their guide,
sparsity, FDT and perplexity, as a Markdown table and a plot (the report's tasks section, and
comparisons of guides such as `fdt`, `nll` and `uniform`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtm_ray.errors import ConfigError
from dtm_ray.records.store import RunStore, retrying


def runs_tasks(run_dirs: Sequence[str]) -> list[dict[str, Any]]:
    """`final/tasks/` rows of several runs, each with its run's guide, sparsity, FDT@75 and
    perplexity on real text (from `final/summary/`)."""
    from dtm_ray.records.schemas import FINAL_SUMMARY_SCHEMA, FINAL_TASKS_SCHEMA

    rows = []
    for run_dir in run_dirs:
        store = RunStore(run_dir)
        summary = store.read_final("summary", FINAL_SUMMARY_SCHEMA)
        tasks = store.read_final("tasks", FINAL_TASKS_SCHEMA)
        if summary is None or tasks is None:
            raise ConfigError(f"run {run_dir} has no final/tasks; run `dtm-ray evaluate` on it")
        compress = (store.read_run_info() or {}).get("config", {}).get("compress") or {}
        s = summary.to_pylist()[0]
        for row in tasks.to_pylist():
            rows.append(
                {
                    **row,
                    "run": run_dir,
                    "guide": compress.get("guide", "?"),
                    "sparsity": s["sparsity"],
                    "fdt_mean": s["fdt_mean"],
                    "ppl_text": s["ppl_text"],
                    "dense_ppl_text": s["dense_ppl_text"],
                }
            )
    return rows


def tasks_markdown(run_dirs: Sequence[str]) -> str:
    """A Markdown table: per task the dense model, then each run (labelled by its guide) with
    its metric, flips against the dense model, FDT@75 and perplexity on real text."""
    rows = runs_tasks(run_dirs)
    lines = [
        "| model | sparsity | FDT@75 | mean FDT | ppl (text) | task | metric | value | flips |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | ---: | ---: |",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        of_task = [r for r in rows if r["task"] == task]
        first = of_task[0]  # every run evaluated the same dense model
        lines.append(
            f"| dense | 0 | – | – | {first['dense_ppl_text']:.2f} | {task} | {first['metric']} "
            f"| {first['dense']:.3f} | – |"
        )
        for r in of_task:
            lines.append(
                f"| {r['guide']} | {r['sparsity']:.2f} | {r['fdt_at_75']} | {r['fdt_mean']:.2f} "
                f"| {r['ppl_text']:.2f} "
                f"| {task} | {r['metric']} | {r['compressed']:.3f} "
                f"| {r['flips']:.3f} ({r['flipped']}/{r['examples']}) |"
            )
    return "\n".join(lines)


def plot_tasks(run_dirs: Sequence[str], path: str | Path) -> Path:
    """Draw task metric and flips against FDT@75, mean FDT and text perplexity, one marker per
    guide and one colour per task, into the PNG `path`. Does FDT tell knowledge loss better
    than perplexity? Flips that fall as FDT rises, more cleanly than they rise with perplexity,
    say yes. (FDT@75 is often 0 for every run at high sparsity; mean FDT still separates them.)"""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    rows = runs_tasks(run_dirs)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(tasks)}
    markers = {g: "osD^v<>p*h"[i % 10] for i, g in enumerate(guides)}
    columns = [
        ("fdt_at_75", "FDT@75 vs the dense model\n(higher: closer)"),
        ("fdt_mean", "mean FDT vs the dense model\n(higher: closer)"),
        ("ppl_text", "perplexity on real text\n(lower: better; dotted: dense)"),
    ]
    fig, axes = plt.subplots(
        2, len(columns), figsize=(13, 7.5), sharey="row", sharex="col", constrained_layout=True
    )
    for col, (x_key, x_label) in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        for r in rows:
            style = {"color": colors[r["task"]], "marker": markers[r["guide"]], "s": 70}
            top.scatter(r[x_key], r["compressed"], alpha=0.85, **style)
            bottom.scatter(r[x_key], r["flips"], alpha=0.85, **style)
        for task in tasks:  # the dense model's value, as a dashed line per task
            first = next(r for r in rows if r["task"] == task)
            top.axhline(first["dense"], color=colors[task], linestyle="--", linewidth=1)
        if x_key == "ppl_text":
            for ax in (top, bottom):
                ax.axvline(rows[0]["dense_ppl_text"], color="grey", linestyle=":")
        else:
            locator = MaxNLocator(nbins=6, steps=[1, 2, 5, 10], integer=x_key == "fdt_at_75")
            bottom.xaxis.set_major_locator(locator)
            low = min(r[x_key] for r in rows)
            high = max(r[x_key] for r in rows)
            pad = max(1.0, 0.1 * (high - low))  # a single value still gets a readable axis
            bottom.set_xlim(max(-0.5, low - pad), high + pad)
        bottom.set_xlabel(x_label)
    axes[0, 0].set_ylabel("task metric of the compressed model\n(dashed: dense model)")
    axes[1, 0].set_ylabel("flips: share of answers changed\nvs the dense model")
    for ax in axes.flat:
        ax.set_ylim(-0.02, 1.02)  # both rows are shares of the examples
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=colors[t], linewidth=6, label=t) for t in tasks]
    handles += [
        Line2D([], [], color="black", marker=markers[g], linestyle="", label=f"guide {g}")
        for g in guides
    ]
    fig.legend(handles=handles, loc="outside right center", frameon=False)
    fig.suptitle("lm-eval tasks: each compressed run against the dense model")
    path = Path(path)
    try:  # with the run dir's retries and failure mapping (a full disk: one line)
        retrying("write", f"{path.name} in {path.parent}", lambda: fig.savefig(path, dpi=100))
    finally:
        plt.close(fig)
    return path
