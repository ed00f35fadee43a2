"""A compare run's result tables, its terminal summary (`dtm-ray show`) and its report
(`dtm-ray report`): pure table building from the arrays the engines returned, and plotting.

The metrics are the DTM paper's, as everywhere in dtm_ray (see `dtm_ray.core.metrics`): the
candidate scores the base's greedy continuation teacher-forced, and its first divergent token
(FDT) is where its argmax first departs from the base's own argmax over the same sequence (the
base's scoring, not its decoding, so a decode/prefill kernel difference in the base is not
counted against the candidate; `noise_positions` shows where the two differ). At that position
both models' top-1 minus top-2 log-probabilities say whether the divergence was a near-tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dtm_ray.core.metrics import (
    fdt_at,
    fdt_at_interval,
    first_divergent_token,
    share_of_divergent_tokens,
)
from dtm_ray.core.state import Reference
from dtm_ray.errors import ConfigError
from dtm_ray.records.schemas import (
    COMPARE_CHUNK_SCHEMA,
    COMPARE_PROMPTS_SCHEMA,
    COMPARE_SUMMARY_SCHEMA,
    COMPARE_TEXT_SCHEMA,
    reference_from_table,
)
from dtm_ray.records.store import RunStore

KIND = "compare"  # run.json's `kind` of a compare run
PROMPTS = "compare/prompts/data.parquet"
SUMMARY = "compare/summary/data.parquet"
CHUNKS = "compare/chunks"
TEXT = "compare/text"


def is_compare_run(info: dict[str, Any] | None) -> bool:
    return bool(info) and info.get("kind") == KIND


def chunk_name(chunk: int) -> str:
    return f"{CHUNKS}/chunk-{chunk:05d}.parquet"


def text_name(side: str) -> str:
    return f"{TEXT}/{side}.parquet"


# --- tables (pure) -----------------------------------------------------------------------------
def chunk_table(chunk: int, first_prompt: int, scored: dict[str, Any]) -> pa.Table:
    """One chunk's rows from a `ServedActor.score_chunk` answer."""
    argmax = np.asarray(scored["argmax"])
    rows = len(argmax)
    return pa.Table.from_pydict(
        {
            "chunk": [chunk] * rows,
            "prompt_id": list(range(first_prompt, first_prompt + rows)),
            "argmax": argmax.astype(np.int32).tolist(),
            "margin": np.asarray(scored["margin"], dtype=np.float32).tolist(),
            "logprob": np.asarray(scored["logprob"], dtype=np.float32).tolist(),
            "worker": [scored["worker"]] * rows,
            "seconds": [float(scored["seconds"])] * rows,
        },
        schema=COMPARE_CHUNK_SCHEMA,
    )


def text_table(side: str, nll: np.ndarray) -> pa.Table:
    """One side's per-token NLL of the real-text windows [W, T-1], summed per window."""
    nll = np.asarray(nll, dtype=np.float64)
    return pa.Table.from_pydict(
        {
            "side": [side] * len(nll),
            "window": list(range(len(nll))),
            "tokens": [nll.shape[1]] * len(nll),
            "nll_sum": nll.sum(axis=1).tolist(),
        },
        schema=COMPARE_TEXT_SCHEMA,
    )


def _matrix(table: pa.Table, column: str, dtype: type) -> np.ndarray:
    return np.asarray(table.column(column).to_pylist(), dtype=dtype)


def candidate_arrays(chunks: pa.Table, prompts: int) -> dict[str, np.ndarray]:
    """argmax, margin, logprob [P, N] of the candidate, in prompt order, from the chunk rows
    (each prompt exactly once: a chunk written twice by a killed run holds the same rows)."""
    table = chunks.sort_by("prompt_id")
    ids = table.column("prompt_id").to_pylist()
    _, first = np.unique(ids, return_index=True)
    table = table.take(pa.array(first))
    if table.num_rows != prompts:
        raise ValueError(f"the chunks hold {table.num_rows} of {prompts} prompts")
    return {
        "argmax": _matrix(table, "argmax", np.int64),
        "margin": _matrix(table, "margin", np.float32),
        "logprob": _matrix(table, "logprob", np.float32),
    }


def prompt_table(
    reference: Reference, candidate: dict[str, np.ndarray], near_tie: float
) -> pa.Table:
    """Per prompt: FDT and SDT of the candidate against the base's own argmax, the candidate's
    NLL of the base's continuation, and at the first divergence both tokens and margins."""
    base = reference.base_argmax
    argmax = candidate["argmax"]
    fdt = first_divergent_token(base, argmax)
    sdt = share_of_divergent_tokens(base, argmax)
    n_new = reference.n_new
    rows = []
    for p in range(reference.prompts):
        at = int(fdt[p])
        diverged = at < n_new
        base_margin = float(reference.base_margin[p, at]) if diverged else None
        candidate_margin = float(candidate["margin"][p, at]) if diverged else None
        rows.append(
            {
                "prompt_id": p,
                "prefix_ids": reference.prefixes[p].tolist(),
                "fdt": at,
                "sdt": int(sdt[p]),
                "nll": float(-np.mean(candidate["logprob"][p], dtype=np.float64)),
                "base_nll": (
                    float(-np.mean(reference.base_logprob[p], dtype=np.float64))
                    if reference.base_logprob is not None
                    else None
                ),
                "noise_positions": int(reference.noise_positions[p]),
                "base_token": int(base[p, at]) if diverged else None,
                "candidate_token": int(argmax[p, at]) if diverged else None,
                "base_margin": base_margin,
                "candidate_margin": candidate_margin,
                "near_tie": _near_tie(base_margin, candidate_margin, near_tie)
                if diverged
                else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=COMPARE_PROMPTS_SCHEMA)


def _near_tie(base: float, candidate: float, threshold: float) -> bool:
    """Both models nearly undecided at the divergence (margins at most `threshold`); an unknown
    margin (NaN) is not small."""
    return bool(base <= threshold and candidate <= threshold)


def perplexity(text: pa.Table) -> tuple[float, int]:
    """exp(mean NLL per token) over the windows, and the tokens scored."""
    tokens = int(_column_sum(text, "tokens"))
    return math.exp(_column_sum(text, "nll_sum") / tokens), tokens


def _column_sum(table: pa.Table, column: str) -> float:
    return float(np.sum(table.column(column).to_numpy()))


def summary_table(
    prompts: pa.Table,
    base_text: pa.Table,
    candidate_text: pa.Table,
    facts: dict[str, Any],
) -> pa.Table:
    """One row: FDT@75 with its 90 % interval, mean FDT, SDT share, near-ties among the
    divergences, perplexities of both on the base's continuations and on real text. `facts`:
    the sides as named (base, candidate, *_engine, *_dtype), new_tokens, near_tie, text_source,
    base_seconds, candidate_seconds."""
    frame = prompts.to_pandas()
    fdt = frame["fdt"].to_numpy()
    n_new = int(facts["new_tokens"])
    low, high = fdt_at_interval(fdt, 75)
    diverged = int((fdt < n_new).sum())
    near_ties = int(frame["near_tie"].fillna(False).astype(bool).sum())
    ppl_text, tokens = perplexity(candidate_text)
    base_ppl_text, _ = perplexity(base_text)
    row = {
        **{k: facts[k] for k in ("base", "candidate", "base_engine", "candidate_engine")},
        **{k: facts[k] for k in ("base_dtype", "candidate_dtype")},
        "prompts": len(frame),
        "new_tokens": n_new,
        "fdt_at_75": fdt_at(fdt, 75),
        "fdt_at_75_low": low,
        "fdt_at_75_high": high,
        "fdt_mean": float(np.mean(fdt)),
        "sdt_mean": float(frame["sdt"].mean()),
        "sdt_share": float(frame["sdt"].mean()) / n_new,
        "diverged": diverged,
        "near_ties": near_ties,
        "near_tie_share": near_ties / diverged if diverged else float("nan"),
        "near_tie": float(facts["near_tie"]),
        "noise_positions": int(frame["noise_positions"].sum()),
        "ppl_reference": float(np.exp(frame["nll"].mean())),
        "base_ppl_reference": float(np.exp(frame["base_nll"].mean())),
        "ppl_text": ppl_text,
        "base_ppl_text": base_ppl_text,
        "text_source": facts["text_source"],
        "text_tokens": tokens,
        "base_seconds": float(facts["base_seconds"]),
        "candidate_seconds": float(facts["candidate_seconds"]),
        "seconds": float(facts["base_seconds"]) + float(facts["candidate_seconds"]),
    }
    return pa.Table.from_pylist([row], schema=COMPARE_SUMMARY_SCHEMA)


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary row as a few lines for the terminal."""
    n = s["new_tokens"]
    share = "-" if math.isnan(s["near_tie_share"]) else f"{s['near_tie_share']:.2f}"
    return [
        f"{s['candidate']} ({s['candidate_engine']}, {s['candidate_dtype']}) against "
        f"{s['base']} ({s['base_engine']}, {s['base_dtype']}), {s['prompts']} prompts x {n} "
        "tokens:",
        f"  FDT@75 {s['fdt_at_75']} of {n} (90% CI {s['fdt_at_75_low']}-{s['fdt_at_75_high']}), "
        f"mean FDT {s['fdt_mean']:.2f}, SDT share {s['sdt_share']:.3f}",
        f"  {s['diverged']} of {s['prompts']} prompts diverge; {s['near_ties']} of them at a "
        f"near-tie (both margins <= {s['near_tie']:g}): share {share}; base noise positions "
        f"{s['noise_positions']}",
        f"  perplexity on the base's continuations {s['ppl_reference']:.3f} (base "
        f"{s['base_ppl_reference']:.3f}), on {s['text_source']} text {s['ppl_text']:.3f} "
        f"(base {s['base_ppl_text']:.3f}, {s['text_tokens']} tokens)",
        f"  {s['seconds']:.0f} s (base {s['base_seconds']:.0f} s, candidate "
        f"{s['candidate_seconds']:.0f} s)",
    ]


# --- reading a compare run ---------------------------------------------------------------------
@dataclass
class CompareTables:
    uri: str
    info: dict[str, Any]
    reference: Reference | None
    chunks: pd.DataFrame
    prompts: pd.DataFrame | None
    summary: dict[str, Any] | None

    @property
    def config(self) -> dict[str, Any]:
        return self.info.get("config", {})

    @property
    def new_tokens(self) -> int:
        return int(self.config.get("new_tokens") or 0)


def load_compare(run_dir: str) -> CompareTables:
    store = RunStore(run_dir)
    info = store.read_run_info()
    if not is_compare_run(info):
        raise ConfigError(f"{run_dir} is not a compare run directory")
    reference = store.read_reference(0)
    prompts = store.read_table(PROMPTS, COMPARE_PROMPTS_SCHEMA)
    summary = store.read_table(SUMMARY, COMPARE_SUMMARY_SCHEMA)
    return CompareTables(
        uri=run_dir,
        info=info,
        reference=None if reference is None else reference_from_table(reference),
        chunks=store.read_folder(CHUNKS, COMPARE_CHUNK_SCHEMA).to_pandas(),
        prompts=None if prompts is None else prompts.to_pandas(),
        summary=None if summary is None else summary.to_pylist()[0],
    )


def headline(run: CompareTables) -> str:
    c = run.config
    sides = [
        f"{c['compare'][s]['model']} ({c['compare'][s]['engine']}, {c['compare'][s]['dtype']})"
        for s in ("base", "candidate")
    ]
    done = "finished" if run.summary is not None else "in progress (or stopped): no summary yet"
    return (
        f"{run.uri}: compare {sides[1]} against {sides[0]}; {c['prompts']['count']} prompts x "
        f"{run.new_tokens} tokens; {done}"
    )


def progress_line(run: CompareTables) -> str:
    count = run.config["prompts"]["count"]
    scored = run.chunks["prompt_id"].nunique() if len(run.chunks) else 0
    built = "built" if run.reference is not None else "not built yet"
    return f"reference {built}; candidate scored {scored} of {count} prompts"


def format_compare(run: CompareTables, rows: int = 15) -> str:
    """The text of `dtm-ray show` for a compare run: summary, then the prompts that diverge
    earliest (`rows` of them; all when 0)."""
    lines = [headline(run)]
    if run.summary is None:
        return "\n".join([*lines, progress_line(run)])
    lines += summary_lines(run.summary)
    frame = run.prompts.sort_values(["fdt", "prompt_id"], kind="stable")
    frame = frame[frame["fdt"] < run.new_tokens]
    if frame.empty:
        return "\n".join([*lines, "", "no prompt diverges"])
    shown = frame if not rows else frame.head(rows)
    columns = ["prompt_id", "fdt", "sdt", "nll", "base_margin", "candidate_margin", "near_tie"]
    more = f" ({len(frame) - len(shown)} more)" if len(shown) < len(frame) else ""
    lines += ["", f"prompts by first divergence, earliest first{more}:"]
    lines.append(shown[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return "\n".join(lines)


# --- report --------------------------------------------------------------------------------------
def divergent_positions(run: CompareTables) -> np.ndarray:
    """Every continuation position (0..N-1) where the candidate's argmax departs from the base's,
    over all prompts (the SDT positions)."""
    if run.reference is None or run.prompts is None:
        return np.empty(0, dtype=np.int64)
    candidate = candidate_arrays(
        pa.Table.from_pandas(run.chunks, schema=COMPARE_CHUNK_SCHEMA, preserve_index=False),
        run.reference.prompts,
    )
    return np.nonzero(run.reference.base_argmax != candidate["argmax"])[1]


def write_compare_report(run_dir: str, out: str | Path | None = None) -> Path | str:
    """report.md, report.html and PNGs of a compare run: the summary, the FDT distribution, where
    divergences happen, the margins at the first divergence, and lm-eval tasks if evaluated."""
    import tempfile

    from dtm_ray.redact import redact
    from dtm_ray.results.report import (
        Section,
        default_report_dir,
        render_html,
        render_markdown,
    )

    run = load_compare(run_dir)
    remote = "://" in run_dir and not run_dir.startswith("file://")

    def write(target: Path) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        sections = [_summary_section(run, Section)]
        if run.summary is not None:
            sections += _plot_sections(run, target, Section)
            tasks = RunStore(run_dir).read_final("tasks", _tasks_schema())
            if tasks is not None:
                sections.append(_tasks_section(tasks.to_pandas(), Section))
        title = "dtm-ray compare: " + " vs ".join(
            run.config["compare"][s]["model"] for s in ("candidate", "base")
        )
        (target / "report.md").write_text(redact(render_markdown(title, sections)))
        (target / "report.html").write_text(redact(render_html(title, sections)))
        return target / "report.html"

    if out is None and remote:
        store = RunStore(run_dir)
        with tempfile.TemporaryDirectory(prefix=".dtm-ray-report-") as scratch:
            write(Path(scratch))
            store.clear_folder("report")
            for path in sorted(Path(scratch).iterdir()):
                store.put_file(path, f"report/{path.name}")
        return store.child_uri("report").split("?", 1)[0] + "/report.html"
    return write(Path(out) if out is not None else default_report_dir(run_dir))


def _tasks_schema() -> pa.Schema:
    from dtm_ray.records.schemas import FINAL_TASKS_SCHEMA

    return FINAL_TASKS_SCHEMA


def _summary_section(run: CompareTables, Section: type) -> Any:  # noqa: N803
    paragraphs = [headline(run)]
    if run.summary is None:
        return Section("Compare", [*paragraphs, progress_line(run)])
    paragraphs += [
        "FDT = first divergent token: how many greedy tokens the candidate keeps in step with "
        "the base, measured teacher-forced on the base's greedy continuation (exactly the "
        "point where free-running greedy text of the two parts). FDT@75 = the largest value "
        f"that 75 % of prompts reach; {run.new_tokens} means no divergence.",
        "A divergence is a near-tie when both models' top-1 minus top-2 log-probabilities "
        f"there are at most {run.summary['near_tie']:g}: each model was nearly undecided, so "
        "a kernel or a rounding flips it; a clear divergence is a real change of the model.",
    ]
    s = run.summary
    share = "-" if math.isnan(s["near_tie_share"]) else f"{s['near_tie_share']:.2f}"
    numbers = pd.DataFrame(
        [
            ("FDT@75", f"{s['fdt_at_75']} (90% CI {s['fdt_at_75_low']}-{s['fdt_at_75_high']})"),
            ("mean FDT", f"{s['fdt_mean']:.2f} of {s['new_tokens']}"),
            ("SDT share", f"{s['sdt_share']:.3f}"),
            ("prompts diverging", f"{s['diverged']} of {s['prompts']}"),
            ("near-ties among them", f"{s['near_ties']} (share {share})"),
            ("base noise positions", str(s["noise_positions"])),
            (
                "perplexity on the base's continuations",
                f"{s['ppl_reference']:.3f} (base {s['base_ppl_reference']:.3f})",
            ),
            (
                f"perplexity on {s['text_source']} text",
                f"{s['ppl_text']:.3f} (base {s['base_ppl_text']:.3f})",
            ),
            (
                "seconds",
                f"{s['seconds']:.0f} (base {s['base_seconds']:.0f}, candidate "
                f"{s['candidate_seconds']:.0f})",
            ),
        ],
        columns=["", "candidate against base"],
    )
    return Section("Compare", paragraphs, [("key numbers", numbers)])


def _plot_sections(run: CompareTables, out: Path, Section: type) -> list[Any]:  # noqa: N803
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = run.new_tokens
    frame = run.prompts
    fdt = frame["fdt"].to_numpy()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(fdt, bins=np.arange(n + 2) - 0.5, color="tab:blue")
    ax.axvline(run.summary["fdt_at_75"], color="black", linestyle="--", label="FDT@75")
    ax.set_xlabel(f"first divergent token ({n}: none)")
    ax.set_ylabel("prompts")
    ax.legend(frameon=False)
    fig.savefig(out / "fdt.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    positions = divergent_positions(run)
    diverged = frame[frame["fdt"] < n]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bins = np.arange(n + 1) - 0.5
    ax.hist(positions, bins=bins, color="lightgray", label="every divergent position (SDT)")
    ties = diverged["near_tie"].astype(bool)
    ax.hist(
        [diverged.loc[~ties, "fdt"], diverged.loc[ties, "fdt"]],
        bins=bins,
        stacked=True,
        color=["tab:red", "tab:orange"],
        label=["first divergence, clear", "first divergence, near-tie"],
    )
    ax.set_xlabel("continuation position")
    ax.set_ylabel("count")
    ax.legend(frameon=False)
    fig.savefig(out / "positions.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    images = [
        ("fdt.png", "FDT per prompt: the distribution, FDT@75 dashed"),
        ("positions.png", "where the candidate departs: all divergent positions and the first"),
    ]
    if len(diverged):
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        colors = np.where(ties, "tab:orange", "tab:red")
        ax.scatter(diverged["base_margin"], diverged["candidate_margin"], c=colors, s=25)
        threshold = run.summary["near_tie"]
        ax.axvline(threshold, color="grey", linestyle=":")
        ax.axhline(threshold, color="grey", linestyle=":")
        ax.set_xlabel("base top-1 - top-2 log-probability")
        ax.set_ylabel("candidate top-1 - top-2 log-probability")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_yscale("symlog", linthresh=0.1)
        fig.savefig(out / "margins.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        images.append(("margins.png", "both models' margins at each first divergence"))
    return [Section("Divergences", [], [], images)]


def _tasks_section(tasks: pd.DataFrame, Section: type) -> Any:  # noqa: N803
    table = tasks[["task", "metric", "examples", "dense", "compressed", "flips", "flipped"]]
    table = table.rename(columns={"dense": "base", "compressed": "candidate"})
    return Section(
        "Tasks (lm-eval)",
        [
            "Each task's metric on both models and the flips: the share of examples whose "
            "answer changed between them (equal accuracies can hide many flips)."
        ],
        [("tasks", table)],
    )
