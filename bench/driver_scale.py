"""The driver at scale, by simulation: null engine actors on Ray (no model; each probe sleeps a
fixed time and returns real FDT rows), fed by the real pool, progress and Parquet writer of a round.

    python -m bench.driver_scale                       # 64 and 256 actors, 10,000 probes
    python -m bench.driver_scale --actors 64 --probes 2000 --cost 0.5
    python -m bench.driver_scale --waves 20 --per-process 16   # 20 whole waves per actor count

For each actor count: the round's wall time against the ideal (probes x cost / actors), the
driver's CPU time per probe (its overhead: scheduling, result transfer, rows, Parquet), the
driver's peak memory, and the Parquet write cost per row alone. Also the object-store requests
per `--s3-probes` probes (default 1,000) written and compacted on moto's S3 server on 127.0.0.1
(tests/support/s3_server.py), counted on the wire, with rows arriving as fast as the largest pool
makes them; `--flush-every 4 --flush-seconds 30` gives the former writer's files.

The null actors hold 0.01 CPU each; to fit hundreds in this machine's memory, `--per-process K`
lets one threaded actor process serve K pool slots (the pool sees K engines there, each with its
own queue), so the driver's side — what this measures — is that of `actors` engines.
Prints the tables and writes them with a JSON of every figure (`--out DIR`).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from bench.common import KINDS, Results, add_output_arguments, markdown_table
from dtm_ray.cluster.pool import EnginePool
from dtm_ray.core.components import Component
from dtm_ray.core.metrics import summarize
from dtm_ray.loop.progress import ProbeWriter, Streaming
from dtm_ray.loop.rounds import Probe, run_probes
from dtm_ray.records.schemas import probe_ok_row
from dtm_ray.records.store import RunStore


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", type=int, nargs="+", default=[64, 256])
    p.add_argument("--probes", type=int, default=10_000)
    p.add_argument(
        "--waves",
        type=int,
        default=0,
        help="probes per actor count = waves x actors (whole waves), instead of --probes",
    )
    p.add_argument("--cost", type=float, default=2.0, help="seconds per probe in each actor")
    p.add_argument("--prompts", type=int, default=512, help="P: FDT/SDT values per probe row")
    p.add_argument("--new", type=int, default=256, help="N: scored tokens per prompt")
    p.add_argument("--in-flight", type=int, default=2, help="probes queued per actor")
    p.add_argument("--per-process", type=int, default=4, help="pool slots per actor process")
    p.add_argument("--flush-every", type=int, default=Streaming().flush_every)
    p.add_argument("--flush-seconds", type=float, default=Streaming().flush_seconds)
    p.add_argument(
        "--s3-probes", type=int, default=1000, help="rows written to the local S3 server (0: none)"
    )
    add_output_arguments(p)
    return p.parse_args(argv)


# --- the null engine ---------------------------------------------------------------------------
@dataclass
class NullResult:
    """What a probe returns (the fields a probe row reads), without torch in the actor."""

    fdt: np.ndarray
    sdt: np.ndarray
    nll: np.ndarray
    seconds: float
    margin: np.ndarray
    summary: dict[str, float] = field(default_factory=dict)

    @property
    def nll_mean(self) -> float:
        return float(np.mean(self.nll))


@dataclass
class NullScored:
    result: NullResult
    worker: str


class NullActor:
    """An engine actor's `probe` with a fixed cost and a real-sized result."""

    def __init__(self, index: int, cost: float, prompts: int, n_new: int) -> None:
        self.worker = f"null-{index}:{os.getpid()}"
        self.cost = cost
        # One real-sized result, made once: on this small machine hundreds of actors computing
        # summaries would measure the machine's cores, not the driver.
        rng = np.random.default_rng(index)
        fdt = rng.integers(0, n_new + 1, prompts)
        sdt = rng.integers(0, n_new + 1, prompts)
        self.result = NullResult(
            fdt=fdt,
            sdt=sdt,
            nll=rng.random(prompts),
            seconds=cost,
            margin=np.zeros((prompts, n_new), dtype=np.float32),
            summary=summarize(fdt, sdt, n_new),
        )

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker}

    def probe(self, delta: dict[str, str], context: Any) -> NullScored:
        time.sleep(self.cost)
        return NullScored(self.result, self.worker)


@dataclass
class NullContext:
    round: int = 0


@dataclass
class NullChecked:
    retry_failed: bool = True


class NullEngines:
    """Stands in for `rounds.JobEngines`: its `pool` and `checked` attributes, over null actors."""

    def __init__(self, pool: EnginePool) -> None:
        self.pool = pool
        self.checked = NullChecked()


def probes(count: int) -> list[Probe]:
    """`count` probes over a 13B-shaped component list (40 layers x 7 kinds), several specs."""
    components = [
        Component(f"model.layers.{layer}.{kind}.weight", layer, kind, (5120, 5120))
        for layer in range(40)
        for kind in KINDS
    ]
    specs = [f"magnitude:{s / 1000:.3f}" for s in range(1, 1000)]
    out = []
    for i in range(count):
        out.append(Probe(components[i % len(components)], specs[i // len(components)]))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def simulate(actors: int, args: argparse.Namespace) -> dict[str, Any]:
    per = args.per_process
    remote = ray.remote(NullActor).options(num_cpus=0.01, max_restarts=0, max_concurrency=per)
    start = time.perf_counter()
    handles = [
        remote.remote(i, args.cost, args.prompts, args.new) for i in range(-(-actors // per))
    ]
    ray.get([h.info.remote() for h in handles])
    started = time.perf_counter() - start
    slots = [handles[i // per] for i in range(actors)]
    pool = EnginePool(slots, max_in_flight=args.in_flight, max_retries=0)
    streaming = Streaming(
        flush_every=args.flush_every, flush_seconds=args.flush_seconds, progress_interval=30.0
    )
    count = args.waves * actors if args.waves else args.probes
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(str(Path(tmp) / "run"))
        work = probes(count)
        cpu, wall = time.process_time(), time.perf_counter()
        ran = run_probes(NullEngines(pool), store, NullContext(), work, streaming)
        wall = time.perf_counter() - wall
        cpu = time.process_time() - cpu
        files_before = len(store.probe_files())  # compacted: the round file
        stored = store.read_probes(round_=0).num_rows
    for h in handles:
        ray.kill(h)
    ideal = count * args.cost / actors
    return {
        "actors": actors,
        "processes": len(handles),
        "probes": ran,
        "rows_stored": stored,
        "actor_start_s": started,
        "wall_s": wall,
        "ideal_s": ideal,
        "wall_over_ideal": wall / ideal,
        "driver_cpu_ms_per_probe": 1000 * cpu / ran,
        "driver_peak_rss_mib": peak_rss_mib(),
        "probe_files_after_compaction": files_before,
    }


def s3_requests(args: argparse.Namespace, rate: float) -> dict[str, Any]:
    """Object-store requests per `--s3-probes` probes: rows arriving at `rate` per second (a
    round on `max(--actors)` actors) through the real writer into a run directory on moto's
    S3 server on 127.0.0.1, then the round's compaction; requests are counted on the wire."""
    from tests.support.s3_server import S3Server  # the tests' local S3 server (moto), from the root

    server = S3Server()
    try:
        store = RunStore(server.uri("bench/run"))
        rng = np.random.default_rng(0)
        fdt = rng.integers(0, args.new + 1, args.prompts)
        sdt = rng.integers(0, args.new + 1, args.prompts)
        margin = np.zeros((args.prompts, args.new), np.float32)
        summary = summarize(fdt, sdt, args.new)
        result = NullResult(fdt, sdt, rng.random(args.prompts), 1.0, margin, summary)
        rows = [
            probe_ok_row(0, p.component, p.spec, None, p.names, result, "null", 1)
            for p in probes(args.s3_probes)
        ]
        start_requests = server.relay.requests
        writer = ProbeWriter(store, 0, args.flush_every, args.flush_seconds)
        start = time.perf_counter()
        for i, row in enumerate(rows):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            writer.add(row)
            writer.flush_if_due()
        writer.close()
        writes = server.relay.requests - start_requests
        files = len(store.probe_files())
        store.compact_probes(0)
        total = server.relay.requests - start_requests
        assert store.read_probes(round_=0).num_rows == len(rows)
    finally:
        server.close()
    per = 1000 / len(rows)
    return {
        "probes": len(rows),
        "rate_per_s": rate,
        "files": files,
        "write_requests_per_1000": writes * per,
        "requests_per_1000": total * per,
    }


def parquet_cost(args: argparse.Namespace, rows: int = 2000) -> dict[str, Any]:
    """Rows through the real writer alone: per-row cost of building rows, flushes, compaction."""
    rng = np.random.default_rng(0)
    work = probes(rows)
    fdt = rng.integers(0, args.new + 1, args.prompts)
    sdt = rng.integers(0, args.new + 1, args.prompts)
    start = time.perf_counter()
    summary = summarize(fdt, sdt, args.new)  # in the actor, with the bootstrap interval
    summary_s = time.perf_counter() - start
    margin = np.zeros((args.prompts, args.new), np.float32)
    result = NullResult(fdt, sdt, rng.random(args.prompts), 1.0, margin, summary)
    start = time.perf_counter()
    built = [
        probe_ok_row(0, probe.component, probe.spec, None, probe.names, result, "null", 1)
        for probe in work
    ]
    build = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(str(Path(tmp) / "run"))
        writer = ProbeWriter(store, 0, args.flush_every, 1e9)
        start = time.perf_counter()
        for row in built:
            writer.add(row)
        writer.close()
        write = time.perf_counter() - start
        start = time.perf_counter()
        store.compact_probes(0)
        compact = time.perf_counter() - start
    return {
        "rows": rows,
        "actor_summary_ms": 1000 * summary_s,
        "row_build_ms": 1000 * build / rows,
        "write_ms_per_row": 1000 * write / rows,
        "compact_ms_per_row": 1000 * compact / rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = Results(args, "driver_scale", __doc__)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=max(4, max(args.actors)))
    report: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "note")},
        "parquet": parquet_cost(args),
        "runs": [],
    }
    if args.s3_probes:
        report["s3"] = s3_requests(args, max(args.actors) / args.cost)
    try:
        for actors in args.actors:
            report["runs"].append(simulate(actors, args))
    finally:
        ray.shutdown()
    head = [
        "actors",
        "actor processes",
        "probes",
        "wall s",
        "ideal s",
        "wall/ideal",
        "driver CPU ms/probe",
        "driver peak MiB",
        "actor start s",
    ]
    rows = [
        [
            r["actors"],
            r["processes"],
            r["probes"],
            f"{r['wall_s']:.1f}",
            f"{r['ideal_s']:.1f}",
            f"{r['wall_over_ideal']:.2f}",
            f"{r['driver_cpu_ms_per_probe']:.2f}",
            f"{r['driver_peak_rss_mib']:.0f}",
            f"{r['actor_start_s']:.1f}",
        ]
        for r in report["runs"]
    ]
    p = report["parquet"]
    costs = [
        f"- in the actor, per probe: the summary with its bootstrap interval, "
        f"{p['actor_summary_ms']:.1f} ms",
        f"- Parquet alone ({p['rows']} rows of P = {args.prompts}): build "
        f"{p['row_build_ms']:.2f} ms/row, write {p['write_ms_per_row']:.2f} ms/row (files of "
        f"{args.flush_every} rows), compact {p['compact_ms_per_row']:.2f} ms/row",
    ]
    if "s3" in report:
        s3 = report["s3"]
        costs.append(
            f"- object store (the local S3 server), {s3['probes']} probes at "
            f"{s3['rate_per_s']:.0f}/s, files of <= {args.flush_every} rows or "
            f"{args.flush_seconds:g} s: {s3['files']} files, "
            f"{s3['write_requests_per_1000']:.0f} requests per 1,000 probes writing, "
            f"{s3['requests_per_1000']:.0f} with the compaction"
        )
    setting = (
        f"probes of {args.cost:g} s, rows of {args.prompts} prompts × {args.new} tokens, "
        f"{args.in_flight} in flight per actor, {args.per_process} pool slots per actor process"
    )
    sections = [(f"The round against its ideal: {setting}", markdown_table(head, rows))]
    sections.append(("Costs per row", "\n".join(costs)))
    results.write(report, sections)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
