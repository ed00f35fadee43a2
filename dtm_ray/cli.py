"""`dtm-ray`: the command line. Thin: parse, validate, hand over; user errors end in one line."""

from __future__ import annotations

import argparse
import sys

from dtm_ray import models
from dtm_ray.config import ConfigError, EvaluateConfig, load_job, plan_job


def _cmd_model(args: argparse.Namespace) -> int:
    print(models.materialize(args.name))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    if args.out:
        job.out = args.out
    plan = plan_job(job)
    from dtm_ray.driver import run_plan  # Ray starts only once the job is known to be good

    try:
        run_plan(plan)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtm-ray", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="materialize a known model as an HF folder")
    model.add_argument("name", help=f"one of: {', '.join(models.KNOWN_MODELS)}")
    model.set_defaults(func=_cmd_model)

    run = commands.add_parser("run", help="run a probing job")
    run.add_argument("job", help="job YAML file")
    run.add_argument("--out", help="run directory (local path or s3://, gs://); overrides 'out'")
    run.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a job key"
    )
    run.set_defaults(func=_cmd_run)

    export = commands.add_parser(
        "export", help="write a finished run's compressed model as a safetensors checkpoint"
    )
    export.add_argument("run_dir", help="run directory of a finished compressing run")
    export.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    export.set_defaults(func=_cmd_export)

    defaults = EvaluateConfig.__dataclass_fields__
    evaluate = commands.add_parser(
        "evaluate",
        help="lm-eval tasks on a finished run's dense model and export: accuracy and flips",
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
        print(f"dtm-ray: error: {_one_line(str(err))}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    # Some messages quote multi-line text (a YAML parser's report); a user error stays one line.
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    sys.exit(main())
