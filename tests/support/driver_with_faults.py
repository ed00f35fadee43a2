"""`dtm-ray run` in this process, with faults for the failure tests:

    python tests/support/driver_with_faults.py JOB [--fault-at-write N] [--flush-every K]
        [--retry-delays S,S,...]

`--fault-at-write N`: the N-th file the run opens for writing fails once with S3's timeout error
(the chaos case of tests/e2e/test_disturbances.py). `--flush-every K`: probe rows are written in
files of at most K rows (the default is hundreds), so a test can stop a driver with part of a
round written. `--retry-delays`: the store's waits between retries of a failing storage call (the
default spends about 15 s on each; a test of what happens after the store gives up need not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dtm_ray import cli  # noqa: E402
from dtm_ray.records import store as store_module  # noqa: E402
from support.faults import TRANSIENT, faulty_split, once_at_write, small_probe_files  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job")
    parser.add_argument("--fault-at-write", type=int, default=0)
    parser.add_argument("--flush-every", type=int, default=0)
    parser.add_argument("--retry-delays", default="")
    args, rest = parser.parse_known_args(argv)
    if args.flush_every > 0:
        from dtm_ray.loop import rounds

        rounds.ProbeWriter = small_probe_files(args.flush_every)
    if args.retry_delays:
        store_module.RETRY_DELAYS_S = tuple(float(s) for s in args.retry_delays.split(","))
    if args.fault_at_write > 0:
        n = args.fault_at_write

        def seen(path: str) -> None:
            print(f"chaos: storage fault on write {n}: {path}", file=sys.stderr, flush=True)

        store_module._split_uri = faulty_split(once_at_write(n, lambda: OSError(TRANSIENT), seen))
    return cli.main(["run", args.job, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
