"""dtm-ray: how far can each weight matrix of an LLM be pruned or quantized before its greedy
text changes? Measured with Divergent Token Metrics (FDT: the first token where the compressed
model's greedy output departs from the original's), fanned out over Ray, and used to compress
the model round by round.

typical use:
  dtm-ray plan jobs/demo.yaml        what the job will run and cost
  dtm-ray run jobs/demo.yaml         run (or resume) it; tables, report and export in its run dir
  dtm-ray show runs/demo             its tables in the terminal, also while it runs
  dtm-ray report runs/demo           plots and an HTML/Markdown report (written after every run)
"""

# The command line is thin: parse, validate, hand over; user errors end in one line.

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

from dtm_ray import models
from dtm_ray.config import ConfigError, EvaluateConfig, Plan, load_job, plan_job


def _cmd_model(args: argparse.Namespace) -> int:
    print(models.materialize(args.name))
    return 0


def _load_plan(args: argparse.Namespace, read_hub: bool = True) -> Plan:
    job = load_job(args.job, args.set)
    if args.out:
        job.out = args.out
    return plan_job(job, read_hub)


def _cmd_run(args: argparse.Namespace) -> int:
    plan = _load_plan(args, read_hub=not args.dry_run)
    plan.retry_failed = not args.no_retry_failed
    job = plan.job
    if args.dry_run:
        from dtm_ray.plan import estimate, flop_costs, format_estimate

        texts = (job.prompts.source, job.evaluation.text)
        unread = sorted({text for text in texts if text.startswith("hf:")})
        print(f"{args.job}: valid; run dir {job.out}")
        if unread:
            print(f"not read in a dry run (the run reads them first): {', '.join(unread)}")
        print(format_estimate(plan, estimate(plan, flop_costs(plan))))
        return 0
    from dtm_ray.driver import run_plan  # Ray starts only once the job is known to be good

    # `kill` or a scheduler's timeout (SIGTERM) stops the run like Ctrl-C: the actors and a
    # Ray started here are shut down and the run dir's lease is released.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)

    try:
        run_plan(plan, verbose=args.verbose)
    except ConfigError:
        raise  # a run dir made by another job: a user error like the ones above
    except (ValueError, FileNotFoundError) as err:
        # Past validation, these are failures inside the run; keep their traceback.
        raise RuntimeError(f"the run failed with {type(err).__name__}") from err
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
    from dtm_ray.plan import calibrate, estimate, flop_costs, format_estimate

    plan = _load_plan(args)
    if args.no_calibrate:
        costs = flop_costs(plan, args.worker_tflops * 1e12 if args.worker_tflops else None)
    else:
        from dtm_ray.logs import engine_logs

        log_file = Path(tempfile.gettempdir()) / "dtm-ray-plan" / "engines.log"
        with engine_logs(log_file, args.verbose):
            costs = calibrate(plan)
    print(format_estimate(plan, estimate(plan, costs)))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from dtm_ray.show import format_show, load_run

    print(format_show(load_run(args.run_dir), args.round, args.group, 0 if args.all else 15))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from dtm_ray.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dtm_ray.export import export_run  # torch and safetensors load only for this command

    print(export_run(args.run_dir, args.out))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    config = EvaluateConfig(
        tasks=args.tasks,
        backend=args.backend,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
    )
    from dtm_ray.tasks import evaluate_run, format_run_tasks  # Ray starts once the tasks are good

    print(format_run_tasks(evaluate_run(args.run_dir, config)))
    return 0


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job YAML file (see the README's job-file reference)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtm-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not just its line"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser(
        "model",
        help="print the local folder of a known model (materialized on first use)",
        description="Print the Hugging Face folder of a model dtm-ray knows by name, converting "
        "it on first use (from a weights file shipped in a Python package, no model hub "
        "needed). Job files may name such a model instead of a folder.",
    )
    model.add_argument("name", help=f"one of: {', '.join(models.KNOWN_MODELS)}")
    model.set_defaults(func=_cmd_model)

    run = commands.add_parser(
        "run",
        help="run or resume a job: probe, compress round by round, evaluate, report",
        description="Run a job into its run directory, or resume it: finished probes and rounds "
        "are read back, never redone. A compressing job ends with the final evaluation, "
        "export/ and report/ (local run dirs). Progress and results go to the terminal; "
        "vLLM, transformers and Ray output to RUN_DIR/logs/engines.log.",
    )
    _add_job_arguments(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the job against the model's config and print the plan (FLOP estimate); "
        "starts no Ray and loads no weights",
    )
    run.add_argument(
        "--verbose", action="store_true", help="also show the engines' output (vLLM, Ray, ...)"
    )
    run.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="on resume, keep probes recorded failed as they are instead of running them again",
    )
    run.set_defaults(func=_cmd_run)

    plan = commands.add_parser(
        "plan",
        help="estimate a job's rounds, probes, tokens and time before running it",
        description="Print probes per round, rounds expected, tokens to score and the estimated "
        "time per round and in total for the job's workers. By default the costs come from a "
        "short calibration on one engine actor (start-up, the reference, one probe); "
        "--no-calibrate uses 2 x parameters FLOPs per token at a stated throughput instead.",
    )
    _add_job_arguments(plan)
    plan.add_argument(
        "--no-calibrate",
        action="store_true",
        help="estimate from FLOPs instead of timing one engine (no Ray, no weights loaded)",
    )
    plan.add_argument(
        "--worker-tflops",
        type=float,
        help="throughput of one worker for --no-calibrate, in TFLOP/s "
        "(default: 0.05 per CPU core, 100 per GPU)",
    )
    plan.add_argument("--verbose", action="store_true", help="show the engine's output")
    plan.set_defaults(func=_cmd_plan)

    show = commands.add_parser(
        "show",
        help="print a run's tables: rounds, final result, components, failed probes",
        description="Print a run directory's tables in the terminal: one row per round (probes, "
        "failures, noise floor, sparsity), the final result against the dense model, one "
        "round's components by FDT@75 with 90%% intervals, and failed probes. Works while the "
        "run is still going.",
    )
    show.add_argument("run_dir", help="run directory (local path or s3://, gs://)")
    show.add_argument(
        "--round", type=int, help="the round whose components to list (default: last)"
    )
    show.add_argument(
        "--group", help="only this probe setting: a spec (int8) or added sparsity (+0.10)"
    )
    show.add_argument("--all", action="store_true", help="list every component, not both ends")
    show.set_defaults(func=_cmd_show)

    report = commands.add_parser(
        "report",
        help="write PNG plots and an HTML + Markdown report of a run",
        description="Write report.html, report.md and PNG plots (FDT@75 heatmaps per round, FDT "
        "against sparsity or precision per kind, perplexity against FDT, compression per round) "
        "for a run directory, finished or not. Runs with a local run dir get one automatically.",
    )
    report.add_argument("run_dir", help="run directory (local path or s3://, gs://)")
    report.add_argument("--out", help="output folder (default: RUN_DIR/report; required for s3://)")
    report.set_defaults(func=_cmd_report)

    export = commands.add_parser(
        "export",
        help="write a finished run's compressed model as a safetensors checkpoint",
        description="Write a finished compressing run's model as a Hugging Face safetensors "
        "checkpoint (each component's chain replayed on its original weight), with "
        "sparsity_map.json, precision_map.json and an llm-compressor recipe.yaml. Local runs "
        "get one at the end of the run; s3:// or gs:// runs need --out.",
    )
    export.add_argument("run_dir", help="run directory of a finished compressing run")
    export.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    export.set_defaults(func=_cmd_export)

    defaults = EvaluateConfig.__dataclass_fields__
    evaluate = commands.add_parser(
        "evaluate",
        help="lm-eval tasks on a finished run's dense model and export: accuracy and flips",
        description="Run lm-eval-harness tasks on the dense model and on a finished run's "
        "export, as Ray tasks sized like an engine worker, and write final/tasks/: per task its "
        "metric for both models, the flips (share of examples whose answer changed) and the "
        "run's FDT@75 beside them.",
    )
    evaluate.add_argument("run_dir", help="run directory of a finished compressing run")
    evaluate.add_argument(
        "--tasks",
        nargs="+",
        default=["facts"],
        help="lm-eval task names, task sets (facts, knowledge-qa, knowledge-mc, cloze, harness) "
        "or local task YAML files (default: facts, shipped, offline)",
    )
    evaluate.add_argument("--backend", default=defaults["backend"].default, help="hf | vllm | auto")
    evaluate.add_argument("--limit", type=int, help="examples per task (default: all)")
    evaluate.add_argument("--num-fewshot", type=int, help="default: each task's own")
    evaluate.add_argument("--batch-size", type=int, default=defaults["batch_size"].default)
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"dtm-ray: error: {_one_line(str(err))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    # Some messages quote multi-line text (a YAML parser's report); a user error stays one line.
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
