"""A corpus of bad inputs to `dtm-ray run`: each ends in exit 2 and ONE line on stderr, with no
traceback, no Ray started and no run directory left behind (a run directory that was there
before is left exactly as it was). Each case's duration is printed (`pytest -s`) and bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dtm_ray import cli
from dtm_ray.cluster import pool
from dtm_ray.core.state import Reference
from dtm_ray.engines.models import model_digest
from dtm_ray.job.spec import load_job
from dtm_ray.records.schemas import reference_table
from dtm_ray.records.store import RunStore

BEFORE_RAY_S = 3.0  # in-process cases, all checked before Ray would start
SUBPROCESS_S = 30.0  # the installed command pays for importing the package in a fresh process

PROSE = (
    "The river rose through the night and by morning the lower fields were under water. "
    "Farmers moved their animals to the ridge and waited for the rain to stop. "
)


def job_dict(model_dir: Path, **changes) -> dict:
    job = {
        "model": str(model_dir),
        "engine": "hf",
        "prompts": {"source": "self", "count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "probe": {"components": [{"kinds": ["q"]}], "specs": ["int8"]},
    }
    job.update(changes)
    return job


def prompts(source: str, **more) -> dict:
    return {"source": source, "count": 4, "prefix_tokens": 8, **more}


# --- files the cases need ---------------------------------------------------------------------
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _existing_run(tmp: Path, model_dir: Path, job: dict, probe_file: bytes | None = None) -> Path:
    """A run directory of `job` as an earlier invocation left it: run.json and a probes file."""
    out = tmp / "run"
    path = tmp / "earlier.yaml"
    path.write_text(yaml.safe_dump({**job, "out": str(out)}))
    store = RunStore(str(out))
    config = load_job(path).to_dict()
    store.write_json("run.json", {"config": config, "model_digest": model_digest(model_dir)})
    (out / "probes").mkdir()
    target = out / "probes" / "part-r000-00000000000000000001-abcdef01.parquet"
    if probe_file is None:
        pq.write_table(pa.table({"round": [0], "component": ["x"]}), target)
    else:
        target.write_bytes(probe_file)
    return out


def _run_with_reference(tmp: Path, model_dir: Path) -> Path:
    """A run directory whose round-0 reference holds 4 prompts of 8 tokens."""
    out = _existing_run(tmp, model_dir, job_dict(model_dir))
    n = 4
    reference = Reference(
        prefixes=np.arange(n * 8, dtype=np.int64).reshape(n, 8) + 100,
        continuation=np.zeros((n, 8), dtype=np.int64),
        base_argmax=np.zeros((n, 8), dtype=np.int64),
        base_margin=np.ones((n, 8), dtype=np.float32),
        base_logprob=None,
    )
    RunStore(str(out)).write_reference(reference_table(reference, 0), 0)
    return out


# Each case: (tmp, model) -> (job dict, extra argv, expected text, run dir that existed before).
Case = Callable[[Path, Path], tuple[dict, list[str], str, Path | None]]


def _case_corrupt_probe_file(tmp: Path, m: Path):
    job = job_dict(m)
    out = _existing_run(tmp, m, job, probe_file=b"PAR1 not really parquet")
    return job, ["--out", str(out)], "part-r000-00000000000000000001-abcdef01.parquet is not", out


def _case_foreign_probe_file(tmp: Path, m: Path):
    job = job_dict(m)
    out = _existing_run(tmp, m, job)
    pq.write_table(pa.table({"city": ["Oslo"]}), out / "probes" / "cities.parquet")
    return job, ["--out", str(out)], "cities.parquet is not a readable table of this run", out


def _case_broken_run_json(tmp: Path, m: Path):
    out = tmp / "run"
    out.mkdir()
    (out / "run.json").write_text('{"config": {"model": ')
    return job_dict(m), ["--out", str(out)], "run.json is not valid JSON", out


def _case_lease_held(tmp: Path, m: Path):
    job = job_dict(m)
    out = _existing_run(tmp, m, job)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x"}
    holder["heartbeat"] = time.time()
    (out / "lease.json").write_text(json.dumps(holder))
    return job, ["--out", str(out)], f"is in use by the driver {holder['host']}:{os.getpid()}", out


def _case_changed_model(tmp: Path, m: Path):
    job = job_dict(m)
    out = _existing_run(tmp, m, job)
    run = json.loads((out / "run.json").read_text())
    run["model_digest"] = "0123456789abcdef"
    (out / "run.json").write_text(json.dumps(run))
    return job, ["--out", str(out)], "was measured on another model", out


def _case_broken_model_config(tmp: Path, m: Path):
    broken = tmp / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    return job_dict(broken), [], f"{broken / 'config.json'} is not valid JSON", None


CASES: dict[str, Case] = {
    # 1. prompt data, found on the driver
    "empty .txt": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.txt", "\n\n  \n"))),
        [],
        "holds no text",
        None,
    ),
    ".jsonl without a text field": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.jsonl", '{"body": "x"}\n'))),
        [],
        "line 1 has no string 'text' field (found ['body'])",
        None,
    ),
    ".jsonl with one broken line": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.jsonl", '{"text": "a"}\n{"text": "b\n'))),
        [],
        "line 2 is not valid JSON",
        None,
    ),
    ".parquet without a text column": lambda t, m: (
        job_dict(m, prompts=prompts(_parquet(t / "p.parquet", {"body": [PROSE]}))),
        [],
        "has no 'text' column (columns: ['body'])",
        None,
    ),
    ".parquet that is not Parquet": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.parquet", "hello"))),
        [],
        "is not a readable Parquet file",
        None,
    ),
    "texts shorter than prefix_tokens": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.txt", "Short.\n\nAlso short."))),
        [],
        "give only 0 prefixes of 8 tokens (2 non-empty texts); 4 are needed",
        None,
    ),
    "fewer prefixes than count": lambda t, m: (
        job_dict(m, prompts=prompts(_write(t / "p.txt", PROSE), count=500)),
        [],
        "prefixes of 8 tokens (1 non-empty texts); 500 are needed",
        None,
    ),
    "hf: source with the hub unreachable": lambda t, m: (
        job_dict(m, prompts=prompts("hf:wikitext:wikitext-2-raw-v1:test")),
        [],
        "the dataset hub 127.0.0.1:9 cannot be reached",
        None,
    ),
    "run: source that is not a run": lambda t, m: (
        job_dict(m, prompts=prompts(f"run:{t / 'nowhere'}")),
        [],
        "is not a run directory",
        None,
    ),
    "run: source with fewer prompts than count": lambda t, m: (
        job_dict(m, prompts=prompts(f"run:{_run_with_reference(t, m)}", count=9)),
        ["--out", str(t / "other")],
        "holds 4 prefixes of 8 tokens; prompts.count (9)",
        None,
    ),
    "wanda calibration on a run: source": lambda t, m: (
        job_dict(
            m,
            prompts=prompts(f"run:{_run_with_reference(t, m)}"),
            probe={"components": "all"},
            compress={"criterion": "wanda"},
        ),
        ["--out", str(t / "other")],
        "wanda calibrates on text",
        None,
    ),
    "empty evaluation text": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"target_sparsity": 0.2},
            evaluation={"text": _write(t / "e.txt", "")},
        ),
        [],
        "holds no text",
        None,
    ),
    # 5. token budgets, for both engines
    "hf: max_model_len below prefix + new tokens": lambda t, m: (
        job_dict(m, engine_options={"max_model_len": 12}),
        [],
        "prompts.prefix_tokens + new_tokens = 16 tokens exceed 12, engine_options.max_model_len",
        None,
    ),
    "vllm: max_model_len below prefix + new tokens": lambda t, m: (
        job_dict(m, engine="vllm", engine_options={"max_model_len": 12}),
        [],
        "16 tokens exceed 12, engine_options.max_model_len",
        None,
    ),
    "prefix + new tokens beyond the model's positions": lambda t, m: (
        job_dict(m, new_tokens=600),
        [],
        "= 608 tokens exceed 512, the model's max_position_embeddings",
        None,
    ),
    # 5. out, --set, the model's files
    "out under a regular file": lambda t, m: (
        job_dict(m),
        ["--out", str(Path(_write(t / "a-file", "x")) / "run")],
        "is a file, not a directory",
        None,
    ),
    "out under /proc": lambda t, m: (
        job_dict(m),
        ["--out", "/proc/dtm-ray-run"],
        "is not writable",
        None,
    ),
    "--set value that is not YAML": lambda t, m: (
        job_dict(m),
        ["--set", "probe.specs=[int8"],
        "the value is not valid YAML",
        None,
    ),
    "config.json that is not JSON": _case_broken_model_config,
    "startup_timeout_s of zero": lambda t, m: (
        job_dict(m, startup_timeout_s=0),
        [],
        "startup_timeout_s must be a number",
        None,
    ),
    # 5. the run directory: corrupt or foreign files, a live lease, another model
    "corrupt Parquet file in probes/": _case_corrupt_probe_file,
    "foreign Parquet file in probes/": _case_foreign_probe_file,
    "run.json that is not JSON": _case_broken_run_json,
    "run dir held by a live driver": _case_lease_held,
    "resume on a changed model": _case_changed_model,
}


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def warm(tiny_llama_dir: Path) -> Path:
    """Import the driver and load the tokenizer once, so a case's time is its own work, not the
    process's first imports (the subprocess cases below pay those)."""
    from transformers import AutoTokenizer

    import dtm_ray.loop.driver  # noqa: F401

    AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tiny_llama_dir


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the case if anything tries to start or join Ray."""

    def forbidden() -> bool:
        raise AssertionError("a bad input reached Ray")

    monkeypatch.setattr(pool, "connect_ray", forbidden)
    # An hf: source must be refused at once, whatever the network: nothing listens on port 9.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(
    case: str, warm: Path, tmp_path: Path, capsys, no_ray
) -> None:
    job, argv, expected, existing = CASES[case](tmp_path, warm)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run")]
    out = Path(argv[argv.index("--out") + 1])
    before = _listing(existing) if existing else None
    capsys.readouterr()

    start = time.monotonic()
    code = cli.main(["run", str(job_path), *argv])
    seconds = time.monotonic() - start

    err = capsys.readouterr().err
    print(f"\n{case}: {seconds:.2f} s: {err.strip()}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dtm-ray: error: "), err
    assert expected in err
    assert "Traceback" not in err
    if existing is None:
        assert not out.exists()
    else:
        assert _listing(existing) == before  # nothing added, removed or changed
    assert seconds < BEFORE_RAY_S


# The installed command, in a fresh process: real exit code, real stderr, no traceback.
SUBPROCESS_CASES = [
    "--set value that is not YAML",
    "out under /proc",
    "corrupt Parquet file in probes/",
]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_the_command_itself_prints_one_line(case: str, warm: Path, tmp_path: Path) -> None:
    job, argv, expected, existing = CASES[case](tmp_path, warm)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run")]
    before = _listing(existing) if existing else None
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dtm_ray.cli", "run", str(job_path), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.monotonic() - start
    print(f"\n{case} (subprocess): {seconds:.2f} s: {done.stderr.strip()}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if existing is not None:
        assert _listing(existing) == before
    assert seconds < SUBPROCESS_S


def test_debug_shows_the_traceback(warm: Path, tmp_path: Path, no_ray) -> None:
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job_dict(warm, startup_timeout_s=0)))
    with pytest.raises(ValueError, match="startup_timeout_s"):
        cli.main(["--debug", "run", str(job_path), "--out", str(tmp_path / "run")])
