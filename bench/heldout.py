"""Held-out prompts on SmolLM2: do the numbers `final/` reports hold on text the run never read?

Runs dtm-ray jobs (as a user would: `dtm-ray run`, the run dir, its export) and checks them with
plain transformers, independent of dtm_ray's engines:

- `split`: pydoc's paragraphs in two halves as .txt files: the jobs draw their prompts (decide,
  validate, test) from the first half; fresh prompts come from the second, which no run reads.
- `run NAME`: one of the experiment's jobs (below) into WORK/runs/NAME, its stderr in
  WORK/logs/NAME.log; `--code DIR` runs another checkout of dtm_ray (the `before` runs: the code
  before the prompt roles, decisions and reports on the decide prompts alone).
- `check NAME`: per role, the FDT of every prompt recomputed by free-running greedy generation of
  the dense model and of the run's export (`export/`), against the continuation the run stored;
  must equal `final/prompts` per prompt. Then 64 fresh windows (grid windows of the second half,
  seeded) scored the same way: their FDT@75 should lie inside the test interval `final/` reports.
  A `before` run (no test prompts of its own) is scored on the `after` run's prompts.
- `cost NAME`: seconds of the run against the seconds its held-out passes took (from its log).
- `seeds`: a small quantize run per prompt seed; how often the floor's promise (the validate
  interval's lower end >= min_fdt) held on the test prompts.

Every command adds its results to WORK/heldout.json (with the command, the commit and the
machine). Typical use (from the repository root, the shared venv's python):

    python -m bench.heldout split
    python -m bench.heldout run quantize-hf && python -m bench.heldout check quantize-hf
    python -m bench.heldout seeds --seeds 0 1 2 3 4
    python -m bench.heldout table && python -m bench.heldout publish
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import greedy

ROOT = Path(__file__).resolve().parent.parent
N_NEW = 32
PREFIX = 16
LAYERS = [0, 10, 20, 29]  # 28 weights: q k v o gate up down of four layers


def job(
    name: str, work: Path, seed: int = 0, new_keys: bool = True, validate: int = 16
) -> dict[str, Any]:
    """The experiment's jobs: SmolLM2-135M fp32, 16 prompts x (16 + 32) tokens from the first
    half of pydoc, 2 CPU workers; `new_keys`: the keys of the held-out roles (the code before
    them refuses unknown keys)."""
    layers = [0, 29] if name.startswith("seed") else LAYERS
    base: dict[str, Any] = {
        "model": "smollm2-135m",
        "engine": "vllm" if "vllm" in name else "hf",
        "dtype": "float32",
        "prompts": {
            "source": str(work / "first-half.txt"),
            "count": 16,
            "prefix_tokens": PREFIX,
            "seed": seed,
        },
        "new_tokens": N_NEW,
        "probe": {
            "components": [{"kinds": ["q", "k", "v", "o", "gate", "up", "down"], "layers": layers}]
        },
        "evaluation": {"text": str(work / "first-half.txt"), "count": 8, "tokens": 128},
        "workers": 2,
        "resources_per_worker": {"CPU": 1},
    }
    if name.startswith("quantize") or name.startswith("seed"):
        base["compress"] = {"method": "quantize", "levels": ["int4-g64", "int8"], "min_fdt": 16}
    else:
        base["compress"] = {"target_sparsity": 0.6, "step": 0.1, "min_fdt": 8}
    if new_keys:
        base["prompts"]["validate_count"] = validate
        base["evaluation"]["prompts"] = 64
    return base


# --- bookkeeping ------------------------------------------------------------------------------
def _commit(code: Path) -> str:
    marker = code / "COMMIT"  # a checkout exported without git (git archive), named by hand
    if marker.is_file():
        return marker.read_text().strip()
    try:
        out = subprocess.run(
            ["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def _machine() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1_5_15": load,
        "note": "shared 2-core machine: timings are noisy, compare ratios within one run",
    }


def _record(work: Path, key: str, value: Any) -> None:
    path = work / "heldout.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = {
        **value,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": _commit(ROOT),
        "machine": _machine(),
        "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    print(json.dumps(data[key], indent=2, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value))


# --- split ------------------------------------------------------------------------------------
def split(work: Path) -> None:
    """pydoc's paragraphs (its topics in sorted order, split at blank lines) in two halves."""
    from pydoc_data.topics import topics

    paragraphs = [
        p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()
    ]
    half = len(paragraphs) // 2
    work.mkdir(parents=True, exist_ok=True)
    (work / "first-half.txt").write_text("\n\n".join(paragraphs[:half]))
    (work / "second-half.txt").write_text("\n\n".join(paragraphs[half:]))
    print(f"{len(paragraphs)} paragraphs: {half} in first-half.txt, the rest in second-half.txt")


# --- run --------------------------------------------------------------------------------------
def run(
    name: str,
    work: Path,
    code: Path,
    seed: int = 0,
    validate: int = 16,
    sets: list[str] | None = None,
) -> float:
    """`dtm-ray run` of job `name` (resumes when the run dir exists); its wall seconds."""
    before = code != ROOT
    spec = job(name.removesuffix("-before"), work, seed, not before, validate)
    (work / "jobs").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    path = work / "jobs" / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(code), "RAY_AUTH_MODE": "disabled"}
    command = [
        sys.executable,
        "-m",
        "dtm_ray.cli",
        "run",
        str(path),
        "--out",
        str(work / "runs" / name),
    ]
    for assignment in sets or []:
        command += ["--set", assignment]
    started = time.monotonic()
    with open(work / "logs" / f"{name}.log", "a") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=code)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}); see {work / 'logs' / f'{name}.log'}")
    return seconds


# --- plain transformers -------------------------------------------------------------------------
def _model(folder: Path):  # noqa: ANN202
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def first_divergence(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = np.asarray(a) != np.asarray(b)
    return np.where(diff.any(axis=1), diff.argmax(axis=1), diff.shape[1])


def _numbers(fdt: np.ndarray) -> dict[str, Any]:
    from dtm_ray.core.metrics import fdt_at, fdt_at_interval

    low, high = fdt_at_interval(fdt, 75)
    return {
        "prompts": len(fdt),
        "fdt_at_75": fdt_at(fdt, 75),
        "low": low,
        "high": high,
        "fdt_mean": float(np.mean(fdt)),
    }


def _table(run: Path, folder: str) -> tuple[np.ndarray, np.ndarray]:
    import pandas as pd

    frame = pd.read_parquet(run / folder)
    frame = frame[frame["round"] == 0].sort_values("prompt_id")
    return np.stack(frame["prefix_ids"].to_numpy()), np.stack(frame["continuation_ids"].to_numpy())


ROLE_FOLDERS = {"test": "test", "validate": "validate", "decide": "reference"}
ROLES = ("test", "validate", "decide")


def check(
    name: str, work: Path, prompts_from: str | None = None, roles: tuple[str, ...] = tuple(ROLES)
) -> dict[str, Any]:
    """Recompute each role's FDT by plain transformers greedy on the export, and score fresh
    windows of the second half of pydoc (when every role is asked for)."""
    import pandas as pd

    from dtm_ray.engines.models import materialize
    from dtm_ray.engines.prompts import load_prompts

    run = work / "runs" / name
    source = work / "runs" / (prompts_from or name)  # where the role prompts are read from
    dense_dir = materialize("smollm2-135m")
    dense, final = _model(dense_dir), _model(run / "export")
    summary = pd.read_parquet(run / "final" / "summary").iloc[0].to_dict()
    stored = pd.read_parquet(run / "final" / "prompts")
    result: dict[str, Any] = {"run": str(run), "prompts_from": str(source), "roles": {}}
    for role in roles:
        prefixes, continuation = _table(source, ROLE_FOLDERS[role])
        started = time.monotonic()
        dense_tokens = greedy(dense, prefixes, N_NEW)
        fdt = first_divergence(greedy(final, prefixes, N_NEW), dense_tokens)
        entry = {
            **_numbers(fdt),
            "dense_continuation_equal": bool((dense_tokens == continuation).all()),
            "seconds": time.monotonic() - started,
        }
        if source == run and "role" in stored:
            rows = stored[stored["role"] == role].sort_values("prompt_id")["fdt"].to_numpy()
            entry["equal_to_final_prompts"] = bool(np.array_equal(rows, fdt))
            entry["mismatches"] = int((rows != fdt).sum())
        elif role == "decide" and "role" not in stored:  # a run from before the roles
            rows = stored.sort_values("prompt_id")["fdt"].to_numpy()
            entry["equal_to_final_prompts"] = bool(np.array_equal(rows, fdt))
        result["roles"][role] = entry
    if set(roles) == set(ROLES):
        # Fresh windows: the second half of pydoc, which no run read, drawn as prompts are.
        fresh = load_prompts(str(work / "second-half.txt"), dense_dir, 64, PREFIX, seed=0)
        fdt = first_divergence(greedy(final, fresh, N_NEW), greedy(dense, fresh, N_NEW))
        result["fresh"] = _numbers(fdt)
        test = result["roles"]["test"]
        result["fresh"]["inside_test_interval_pm1"] = bool(
            test["low"] - 1 <= result["fresh"]["fdt_at_75"] <= test["high"] + 1
        )
    result["final_summary"] = {
        k: v
        for k, v in summary.items()
        if k.startswith(("test_", "validate_", "fdt_", "prompts", "bits", "sparsity", "rounds"))
    }
    _record(work, f"check:{name}", result)
    return result


# --- cost -------------------------------------------------------------------------------------
def cost(name: str, work: Path, seconds: float | None = None) -> dict[str, Any]:
    """The run's held-out passes (its log's lines) against its total time."""
    text = (work / "logs" / f"{name}.log").read_text()
    built = {
        role: float(s)
        for role, s in re.findall(
            r"the dense reference on the \d+ (\w+) prompts: built in "
            r"([\d.]+) s",
            text,
        )
    }
    scored = {role: float(s) for role, s in re.findall(r"(\w+) \d+ prompts ([\d.]+) s", text)}
    final = re.findall(r"final evaluation in ([\d.]+) s", text)
    decide = re.findall(r"round 0: reference built in ([\d.]+) s", text)
    extra = sum(built.values()) + scored.get("test", 0.0) + scored.get("validate", 0.0)
    result = {
        "run_seconds": seconds,
        "heldout_reference_seconds": built,
        "decide_reference_seconds": float(decide[-1]) if decide else None,
        "final_scoring_seconds": scored,
        "final_seconds": float(final[-1]) if final else None,
        "heldout_extra_seconds": extra,
        "heldout_share": extra / seconds if seconds else None,
    }
    _record(work, f"cost:{name}", result)
    return result


# --- seeds ------------------------------------------------------------------------------------
def seeds(
    work: Path, values: list[int], code: Path, before: Path | None, validate: int = 16
) -> None:
    """Per prompt seed, a small quantize run (14 weights of layers 0 and 29): does FDT@75 on the
    test prompts keep min_fdt when the validate interval's lower end did? With `before`, the
    old rule (decide prompts' FDT@75 >= min_fdt) on the same seeds, judged on the same test
    prompts."""
    import pandas as pd

    key = f"seeds:validate-{validate}"
    data = (
        json.loads((work / "heldout.json").read_text()) if (work / "heldout.json").exists() else {}
    )
    rows = [r for r in data.get(key, {}).get("rows", []) if r["seed"] not in values]
    for seed in values:
        name = f"seed-v{validate}-{seed}"
        seconds = run(name, work, code, seed, validate)
        summary = pd.read_parquet(work / "runs" / name / "final" / "summary").iloc[0]
        row = {
            "seed": seed,
            "seconds": seconds,
            "min_fdt": 16,
            "bits_per_param": float(summary["bits_per_param"]),
            "decide": [int(summary[k]) for k in ("fdt_at_75", "fdt_at_75_low", "fdt_at_75_high")],
            "validate": [
                int(summary[f"validate_{k}"])
                for k in ("fdt_at_75", "fdt_at_75_low", "fdt_at_75_high")
            ],
            "test": [
                int(summary[f"test_{k}"]) for k in ("fdt_at_75", "fdt_at_75_low", "fdt_at_75_high")
            ],
        }
        row["promise_held"] = row["test"][0] >= 16
        if before is not None:
            old = f"seed-{seed}-before"
            row["before_seconds"] = run(old, work, before, seed)
            checked = check(old, work, prompts_from=name, roles=("test",))
            old_summary = pd.read_parquet(work / "runs" / old / "final" / "summary").iloc[0]
            row["before"] = {
                "bits_per_param": float(old_summary["bits_per_param"]),
                "decide": int(old_summary["fdt_at_75"]),
                "test": [checked["roles"]["test"][k] for k in ("fdt_at_75", "low", "high")],
            }
            row["before"]["promise_held"] = row["before"]["test"][0] >= 16
        rows.append(row)
        held = sum(r["promise_held"] for r in rows)
        summary = {"validate_prompts": validate, "held": held, "of": len(rows)}
        if before is not None:
            summary["before_held"] = sum(r["before"]["promise_held"] for r in rows)
        _record(work, key, {**summary, "rows": sorted(rows, key=lambda r: r["seed"])})


def _ci(entry: dict[str, Any]) -> str:
    return f"{entry['fdt_at_75']} ({entry['low']}–{entry['high']})"


def table(work: Path) -> None:
    """The results in heldout.json as Markdown tables."""
    data = json.loads((work / "heldout.json").read_text())
    print(
        "| run | rule | result | decide (in-sample) | validate | test | fresh 64 | "
        "test equal per prompt |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("quantize-hf", "quantize-hf-before", "sparsify-vllm", "sparsify-vllm-before"):
        entry = data.get(f"check:{name}")
        if entry is None:
            continue
        roles, s = entry["roles"], entry["final_summary"]
        rule = "before: decide FDT@75" if name.endswith("before") else "after: validate low end"
        result = (
            f"{s['bits_per_param']:.2f} bits/param"
            if name.startswith("quantize")
            else f"sparsity {s['sparsity']:.3f}"
        )
        equal = roles["test"].get("equal_to_final_prompts")
        print(
            f"| {name} | {rule} | {result} | {_ci(roles['decide'])} | {_ci(roles['validate'])} "
            f"| {_ci(roles['test'])} | {_ci(entry['fresh'])} | "
            f"{'–' if equal is None else ('yes' if equal else 'NO')} |"
        )
    for key in sorted(k for k in data if k.startswith("seeds:")):
        rows = data[key]["rows"]
        print(
            f"\n{key}: seed, bits/param, decide, validate, test (FDT@75, low, high), held; "
            "before: bits/param, decide, test, held"
        )
        for r in rows:
            before = r.get("before")
            old = (
                f" | {before['bits_per_param']:.2f} | {before['decide']} | {before['test']} | "
                f"{before['promise_held']}"
                if before
                else ""
            )
            print(
                f"| {r['seed']} | {r['bits_per_param']:.2f} | {r['decide']} | {r['validate']} | "
                f"{r['test']} | {r['promise_held']}{old} |"
            )


def publish(work: Path, out: Path) -> None:
    """heldout.json with paths relative to the repository, for docs/benchmarks/."""
    text = (work / "heldout.json").read_text().replace(f"{ROOT}/", "")
    out.write_text(text)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["split", "run", "check", "cost", "seeds", "table", "publish"]
    )
    parser.add_argument("name", nargs="?", help="the job: quantize-hf, sparsify-vllm, ...")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "results" / "heldout")
    parser.add_argument("--code", type=Path, default=ROOT, help="the dtm_ray checkout to run")
    parser.add_argument("--before", type=Path, help="seeds: also run this checkout (old rule)")
    parser.add_argument("--prompts-from", help="check: read the role prompts from this run")
    parser.add_argument("--roles", nargs="+", default=list(ROLES), help="check: these roles")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--validate", type=int, default=16, help="seeds: validate prompts")
    parser.add_argument("--seconds", type=float, help="cost: the run's wall seconds")
    args = parser.parse_args()
    work = args.work.resolve()
    if args.command == "split":
        split(work)
    elif args.command == "run":
        seconds = run(args.name, work, args.code.resolve())
        code = args.code.resolve()
        _record(work, f"run:{args.name}", {"seconds": seconds, "code_commit": _commit(code)})
    elif args.command == "check":
        check(args.name, work, args.prompts_from, tuple(args.roles))
    elif args.command == "table":
        table(work)
    elif args.command == "publish":
        publish(work, ROOT / "docs" / "benchmarks" / "held-out.json")
    elif args.command == "cost":
        data = json.loads((work / "heldout.json").read_text())
        seconds = args.seconds or data.get(f"run:{args.name}", {}).get("seconds")
        cost(args.name, work, seconds)
    else:
        before = args.before.resolve() if args.before else None
        seeds(work, args.seeds, args.code.resolve(), before, args.validate)


if __name__ == "__main__":
    main()
