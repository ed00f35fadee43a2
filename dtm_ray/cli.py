"""`dtm-ray`: the command line. Thin: parse, validate, hand over; user errors end in one line."""

from __future__ import annotations

import argparse
import signal
import sys

from dtm_ray import models
from dtm_ray.config import ConfigError, load_job, plan_job


def _cmd_model(args: argparse.Namespace) -> int:
    print(models.materialize(args.name))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    if args.out:
        job.out = args.out
    plan = plan_job(job)
    plan.retry_failed = not args.no_retry_failed
    from dtm_ray.driver import run_plan  # Ray starts only once the job is known to be good

    # `kill` or a scheduler's timeout (SIGTERM) stops the run like Ctrl-C: the actors and a
    # Ray started here are shut down and the run dir's lease is released.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)

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
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from dtm_ray.export import export_run  # torch and safetensors load only for this command

    print(export_run(args.run_dir, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtm-ray", description=__doc__)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not just its line"
    )
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
    run.add_argument(
        "--no-retry-failed",
        action="store_true",
        help="on resume, keep probes recorded failed as they are instead of running them again",
    )
    run.set_defaults(func=_cmd_run)

    export = commands.add_parser(
        "export", help="write a finished run's compressed model as a safetensors checkpoint"
    )
    export.add_argument("run_dir", help="run directory of a finished compressing run")
    export.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    export.set_defaults(func=_cmd_export)
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
