"""The one corpus of bad inputs to `dtm-ray run`: bad job files, bad --set overrides, bad prompt
data, bad token budgets, bad run directories. Each ends in exit 2 and ONE line on stderr, with no
traceback, no Ray started and no run directory left behind (a run directory that was there before
is left exactly as it was). A case with no run directory before it is refused before the driver
is even called. Each case's duration is printed (`pytest -s`); speed is measured in bench/, not
asserted here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.jobs import existing_run

from dtm_ray import cli
from dtm_ray.cluster import startup
from dtm_ray.core.state import Reference
from dtm_ray.job.spec import load_job
from dtm_ray.loop import driver
from dtm_ray.records.schemas import reference_table
from dtm_ray.records.store import RunStore

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


def _run_with_reference(tmp: Path, model_dir: Path) -> Path:
    """A run directory whose round-0 reference holds 4 prompts of 8 tokens."""
    out = existing_run(tmp, model_dir, job_dict(model_dir))
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


# Each case: (tmp, model) -> (job, extra argv, expected text, run dir that existed before).
# The job is a dict written as YAML, or the job file's text as is.
Case = Callable[[Path, Path], tuple[dict | str, list[str], str, Path | None]]


def _case_corrupt_probe_file(tmp: Path, m: Path):
    job = job_dict(m)
    out = existing_run(tmp, m, job, probe_file=b"PAR1 not really parquet")
    return job, ["--out", str(out)], "part-r000-00000000000000000001-abcdef01.parquet is not", out


def _case_foreign_probe_file(tmp: Path, m: Path):
    job = job_dict(m)
    out = existing_run(tmp, m, job)
    pq.write_table(pa.table({"city": ["Oslo"]}), out / "probes" / "cities.parquet")
    return job, ["--out", str(out)], "cities.parquet is not a readable table of this run", out


def _case_broken_run_json(tmp: Path, m: Path):
    out = tmp / "run"
    out.mkdir()
    (out / "run.json").write_text('{"config": {"model": ')
    return job_dict(m), ["--out", str(out)], "run.json is not valid JSON", out


def _case_lease_held(tmp: Path, m: Path):
    job = job_dict(m)
    out = existing_run(tmp, m, job)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "token": "x"}
    holder["heartbeat"] = time.time()
    (out / "lease.json").write_text(json.dumps(holder))
    return job, ["--out", str(out)], f"is in use by the driver {holder['host']}:{os.getpid()}", out


def _case_changed_model(tmp: Path, m: Path):
    job = job_dict(m)
    out = existing_run(tmp, m, job)
    run = json.loads((out / "run.json").read_text())
    run["model_digest"] = "0123456789abcdef"
    (out / "run.json").write_text(json.dumps(run))
    return job, ["--out", str(out)], "was measured on another model", out


def _case_broken_model_config(tmp: Path, m: Path):
    broken = tmp / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    return job_dict(broken), [], f"{broken / 'config.json'} is not valid JSON", None


def _quantize(**compress) -> dict:
    return {"method": "quantize", "levels": ["int4-g64", "int8"], **compress}


def _prose_file(tmp: Path) -> str:
    """A .txt of 40 paragraphs of prose: plenty of 8-token windows for every role."""
    return _write(tmp / "prose.txt", "\n\n".join(f"{i}. {PROSE}" for i in range(40)))


def _case_older_compressing_run(tmp: Path, m: Path):
    """A compressing run made before the prompt roles: run.json has no prompt_roles."""
    job = job_dict(m, probe={"components": "all"}, compress={"target_sparsity": 0.2})
    out = existing_run(tmp, m, job)
    return job, ["--out", str(out)], "is a compressing run from an older dtm-ray", out


def _case_changed_roles(tmp: Path, m: Path):
    """The prompt file was edited after the run drew its roles from it."""
    from dtm_ray.job.checks import check_job

    source = _prose_file(tmp)
    job = job_dict(
        m, prompts=prompts(source), probe={"components": "all"}, compress={"target_sparsity": 0.2}
    )
    out = existing_run(tmp, m, job)
    path = tmp / "earlier.yaml"
    run = json.loads((out / "run.json").read_text())
    run["prompt_roles"] = check_job(load_job(path)).roles
    (out / "run.json").write_text(json.dumps(run))
    _write(Path(source), Path(source).read_text().replace("river", "stream"))
    return job, ["--out", str(out)], "drew other prompts than this job would (decide tokens", out


CASES: dict[str, Case] = {
    # 1. the job file and --set: YAML, keys, values
    "job file that is not YAML": lambda t, m: (
        "model: [unclosed\nengine: hf\n",
        [],
        "is not valid YAML",
        None,
    ),
    "unknown key": lambda t, m: (job_dict(m, wokers=2), [], "unknown key 'wokers'", None),
    "unknown nested key": lambda t, m: (
        job_dict(m, prompts={"cuont": 4}),
        [],
        "unknown key prompts.'cuont'",
        None,
    ),
    "no model key": lambda t, m: ({"engine": "hf"}, [], "has no 'model' key", None),
    "missing model": lambda t, m: (
        job_dict(m, model=str(t / "no-such-model")),
        [],
        "neither a local folder nor a known name",
        None,
    ),
    "zero workers": lambda t, m: (
        job_dict(m, workers=0),
        [],
        "workers must be an integer >= 1",
        None,
    ),
    "startup_timeout_s of zero": lambda t, m: (
        job_dict(m, startup_timeout_s=0),
        [],
        "startup_timeout_s must be a number",
        None,
    ),
    "tensor parallelism wider than the GPUs an actor holds": lambda t, m: (
        job_dict(
            m,
            engine="vllm",
            resources_per_worker={"GPU": 1},
            engine_options={"tensor_parallel_size": 2},
        ),
        [],
        "resources_per_worker GPU: 1 but engine_options.tensor_parallel_size: 2",
        None,
    ),
    "wanda on GPUs with CUDA graphs forced on": lambda t, m: (
        job_dict(
            m,
            engine="vllm",
            resources_per_worker={"GPU": 1},
            engine_options={"enforce_eager": False},
            probe={"components": [{"kinds": ["q"]}]},
            compress={"target_sparsity": 0.3, "step": 0.1, "criterion": "wanda"},
        ),
        [],
        "wanda calibrates with hooks that CUDA graphs skip",
        None,
    ),
    "--set value that is not YAML": lambda t, m: (
        job_dict(m),
        ["--set", "probe.specs=[int8"],
        "the value is not valid YAML",
        None,
    ),
    "--set to an unknown compression": lambda t, m: (
        job_dict(m),
        ["--set", "probe.specs=[int9]"],
        "unknown compression 'int9'",
        None,
    ),
    # 2. probe specs and selectors, against the model's shapes
    "pruning sparsity out of range": lambda t, m: (
        job_dict(m, probe={"specs": ["magnitude:2"]}),
        [],
        "sparsity 2 in 'magnitude:2' is outside [0, 1]",
        None,
    ),
    "N:M does not divide the input dim": lambda t, m: (
        job_dict(m, probe={"specs": ["nm:2:3"]}),
        [],
        "not divisible by M=3",
        None,
    ),
    "selector matches nothing": lambda t, m: (
        job_dict(m, probe={"components": [{"layers": [7]}], "specs": ["int8"]}),
        [],
        "matches no component",
        None,
    ),
    # 3. the compress section
    "probe specs beside a compress section": lambda t, m: (
        job_dict(m, compress={"target_sparsity": 0.4}),
        [],
        "probe.specs is not used with a compress: section",
        None,
    ),
    "target sparsity out of range": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"target_sparsity": 1.5}),
        [],
        "compress.target_sparsity must be a number in (0, 1), got 1.5",
        None,
    ),
    "unknown guide": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"guide": "perplexity"}),
        [],
        "compress.guide 'perplexity' unknown; expected one of ['fdt', 'nll', 'uniform', "
        "'fisher', 'weight_error']",
        None,
    ),
    "unknown compress key": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"steps": 0.1}),
        [],
        "unknown key compress.'steps'",
        None,
    ),
    "zero step": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"step": 0}),
        [],
        "compress.step must be a number in (0, 1], got 0",
        None,
    ),
    "declared memory below the plan's": lambda t, m: (
        job_dict(m, resources_per_worker={"CPU": 1, "memory": 256 * 2**20}),
        [],
        "of host memory and resources_per_worker.memory declares 256 MiB",
        None,
    ),
    "quantize without levels": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"method": "quantize"}),
        [],
        "compress.levels must be a non-empty list of precisions",
        None,
    ),
    "a sparsify key on quantize": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8"], "min_fdt": 4, "step": 0.1},
        ),
        [],
        "compress.step does not apply to method 'quantize'",
        None,
    ),
    "a pruning level": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["magnitude:0.5"], "min_fdt": 4},
        ),
        [],
        "a pruning spec",
        None,
    ),
    "min_fdt above new_tokens": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8"], "min_fdt": 9},
        ),
        [],
        "compress.min_fdt 9 exceeds new_tokens 8",
        None,
    ),
    "fused not a boolean": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8"], "min_fdt": 4, "fused": "yes"},
        ),
        [],
        "compress.fused must be true or false, got 'yes'",
        None,
    ),
    "a level that does not fit a component": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int4-g100"], "min_fdt": 4},
        ),
        [],
        "not divisible by group size 100",
        None,
    ),
    # 3b. the prompt roles and the bits budget
    "validate_count of zero": lambda t, m: (
        job_dict(m, prompts=prompts("self", validate_count=0)),
        [],
        "prompts.validate_count must be an integer >= 1, got 0",
        None,
    ),
    "--set evaluation.prompts to a word": lambda t, m: (
        job_dict(m),
        ["--set", "evaluation.prompts=many"],
        "evaluation.prompts must be an integer >= 1, got 'many'",
        None,
    ),
    "target_bits on sparsify": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress={"target_bits": 6}),
        [],
        "compress.target_bits does not apply to method 'sparsify'",
        None,
    ),
    "--set target_bits below what the levels reach": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress=_quantize(min_fdt=4)),
        ["--set", "compress.target_bits=4"],
        "compress.target_bits 4 is below what the levels reach: 4.25 bits per parameter with "
        "every selected unit at int4-g64",
        None,
    ),
    "target_bits above the dense bits": lambda t, m: (
        job_dict(
            m, dtype="float32", probe={"components": "all"}, compress=_quantize(target_bits=40)
        ),
        [],
        "compress.target_bits 40 is above the dense weights' 32 bits per parameter (dtype float32)",
        None,
    ),
    "target_bits above the bits dtype auto gives these actors": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress=_quantize(target_bits=33)),
        [],
        "above the dense weights' 32 bits per parameter (dtype auto, float32 on these actors)",
        None,
    ),
    "target_bits with levels from the most bits to the fewest": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8", "int4-g64"], "target_bits": 6},
        ),
        [],
        "compress.target_bits needs compress.levels from the fewest bits to the most",
        None,
    ),
    "target_bits beside max_params_share": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress=_quantize(target_bits=6, max_params_share=0.5),
        ),
        [],
        "compress.max_params_share does not combine with compress.target_bits",
        None,
    ),
    "quantize with neither min_fdt nor target_bits": lambda t, m: (
        job_dict(m, probe={"components": "all"}, compress=_quantize()),
        [],
        "method quantize needs compress.min_fdt (a quality floor), compress.target_bits",
        None,
    ),
    "too few windows for the three roles": lambda t, m: (
        job_dict(
            m,
            prompts=prompts(_write(t / "p.txt", PROSE), count=2),
            probe={"components": "all"},
            compress={"target_sparsity": 0.2},
        ),
        [],
        "non-empty texts); 2 decide + 2 validate + 8 test = 12 are needed",
        None,
    ),
    "a run: source without held-out prompts for a compressing job": lambda t, m: (
        job_dict(
            m,
            prompts=prompts(f"run:{_run_with_reference(t, m)}"),
            probe={"components": "all"},
            compress={"target_sparsity": 0.2},
        ),
        ["--out", str(t / "other")],
        "holds no validate prompts (a probe-only run",
        None,
    ),
    # 4. prompt and evaluation data, found on the driver
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
    "guide fisher on a run: source": lambda t, m: (
        job_dict(
            m,
            prompts=prompts(f"run:{_run_with_reference(t, m)}"),
            probe={"components": "all"},
            compress={
                "method": "quantize",
                "levels": ["int8"],
                "target_bits": 8,
                "guide": "fisher",
            },
        ),
        ["--out", str(t / "other")],
        "compress.guide fisher calibrates on text",
        None,
    ),
    "guide fisher on vllm with tensor parallelism": lambda t, m: (
        job_dict(
            m,
            engine="vllm",
            engine_options={"tensor_parallel_size": 2},
            probe={"components": "all"},
            compress={"guide": "fisher"},
        ),
        [],
        "compress.guide fisher runs a backward pass over the weights of one vLLM worker",
        None,
    ),
    "calibration_count on a quantize job whose guide does not calibrate": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={
                "method": "quantize",
                "levels": ["int8"],
                "target_bits": 8,
                "guide": "weight_error",
                "calibration_count": 8,
            },
        ),
        [],
        "compress.calibration_count does not apply to method 'quantize' with guide",
        None,
    ),
    "guide fisher with a calibration_count of zero": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={
                "method": "quantize",
                "levels": ["int8"],
                "target_bits": 8,
                "guide": "fisher",
                "calibration_count": 0,
            },
        ),
        [],
        "compress.calibration_count must be an integer >= 1",
        None,
    ),
    "evaluation text of an unknown kind": lambda t, m: (
        job_dict(m, evaluation={"text": "notes.csv"}),
        [],
        "evaluation.text 'notes.csv' must be",
        None,
    ),
    "self as evaluation text": lambda t, m: (
        job_dict(
            m,
            probe={"components": "all"},
            compress={"target_sparsity": 0.2},
            evaluation={"text": "self"},
        ),
        [],
        "evaluation.text 'self' is not real text (it samples from the model); expected 'pydoc'",
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
    # 6. out, the model's files
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
    "config.json that is not JSON": _case_broken_model_config,
    # 7. the run directory: corrupt or foreign files, a live lease, another model
    "corrupt Parquet file in probes/": _case_corrupt_probe_file,
    "foreign Parquet file in probes/": _case_foreign_probe_file,
    "run.json that is not JSON": _case_broken_run_json,
    "run dir held by a live driver": _case_lease_held,
    "resume on a changed model": _case_changed_model,
    "resume a compressing run from before the prompt roles": _case_older_compressing_run,
    "resume after the prompt file changed": _case_changed_roles,
}


def _listing(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folder`."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


def _job_file(tmp: Path, job: dict | str) -> Path:
    path = tmp / "job.yaml"
    path.write_text(job if isinstance(job, str) else yaml.safe_dump(job))
    return path


def _with_out(tmp: Path, job: dict | str, argv: list[str]) -> tuple[list[str], Path]:
    """argv with --out (tmp/run unless the case or its job names one), and that run dir."""
    if "--out" in argv:
        return argv, Path(argv[argv.index("--out") + 1])
    if isinstance(job, dict) and "out" in job:
        return argv, Path(job["out"])
    return [*argv, "--out", str(tmp / "run")], tmp / "run"


@pytest.fixture(scope="module")
def warm(tiny_llama_dir: Path) -> Path:
    """Import the driver and load the tokenizer once, so a case's time is its own work, not the
    process's first imports (tests/integration/test_bad_inputs.py's fresh processes pay those)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_llama_dir)
    return tiny_llama_dir


@pytest.fixture
def no_ray(monkeypatch) -> list:
    """Fail the case if anything tries to start or join Ray; the checked jobs that reached the
    driver (`run_checked_job`), which only a case about an existing run directory may reach."""

    def forbidden() -> bool:
        raise AssertionError("a bad input reached Ray")

    monkeypatch.setattr(startup, "connect_ray", forbidden)
    # An hf: source must be refused at once, whatever the network: nothing listens on port 9.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)

    reached = []
    run_checked_job = driver.run_checked_job

    def recorded(checked, *args, **kwargs):
        reached.append(checked)
        return run_checked_job(checked, *args, **kwargs)

    monkeypatch.setattr(driver, "run_checked_job", recorded)
    return reached


def refused(
    label: str,
    job: dict | str,
    argv: list[str],
    expected: str,
    existing: Path | None,
    tmp: Path,
    capsys,
    reached_driver: list,
) -> str:
    """Run `dtm-ray run` in-process on a bad input and check the refusal; its stderr."""
    job_path = _job_file(tmp, job)
    argv, out = _with_out(tmp, job, argv)
    before = _listing(existing) if existing else None
    capsys.readouterr()

    start = time.monotonic()
    code = cli.main(["run", str(job_path), *argv])
    seconds = time.monotonic() - start

    err = capsys.readouterr().err
    print(f"\n{label}: {seconds:.2f} s: {err.strip()}")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dtm-ray: error: "), err
    assert expected in err
    assert "Traceback" not in err
    if existing is None:
        assert not out.exists()
        assert not reached_driver, "refused only by the driver: the job's checks let it through"
    else:
        assert _listing(existing) == before  # nothing added, removed or changed
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(
    case: str, warm: Path, tmp_path: Path, capsys, no_ray
) -> None:
    job, argv, expected, existing = CASES[case](tmp_path, warm)
    refused(case, job, argv, expected, existing, tmp_path, capsys, no_ray)


# Bad inputs that need more than a case: the real model, or several facts about one message.
def test_int4_group_that_does_not_divide_smollm2_hidden_size(
    smollm2_dir: Path, tmp_path: Path, capsys, no_ray
) -> None:
    job = job_dict(smollm2_dir, probe={"specs": ["int4-g128"]})  # hidden 576 = 4.5 x 128
    expected = "in_features 576 is not divisible by group size 128"
    refused("int4-g128 on SmolLM2", job, [], expected, None, tmp_path, capsys, no_ray)


def test_a_run_dir_made_by_another_job_names_each_difference(
    warm: Path, tmp_path: Path, capsys, no_ray
) -> None:
    out = tmp_path / "run"
    job = job_dict(warm, out=str(out))
    earlier = load_job(_job_file(tmp_path, job), ["new_tokens=16", "workers=3"])
    RunStore(str(out)).open_run(earlier.to_dict(), {"created": "earlier"})
    argv = ["--set", "prompts.seed=1"]
    expected = "new_tokens: 16 in the run, 8 now"
    err = refused("run dir of another job", job, argv, expected, out, tmp_path, capsys, no_ray)
    assert "prompts.seed: 0 in the run, 1 now" in err
    assert "workers" not in err  # workers may change between runs of one job
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


def test_a_compressing_run_keeps_its_prompt_roles_on_resume(
    warm: Path, tmp_path: Path, capsys, no_ray
) -> None:
    """Validate and test counts are filled in (and recorded) for a compressing job, so a
    resume that would draw other counts, by --set or by a changed prompts.count, is refused."""
    out = tmp_path / "run"
    job = job_dict(warm, out=str(out), probe={"components": "all"}, compress={"step": 0.1})
    earlier = load_job(_job_file(tmp_path, job), [])
    assert (earlier.prompts.validate_count, earlier.evaluation.prompts) == (4, 16)
    RunStore(str(out)).open_run(earlier.to_dict(), {"created": "earlier", "prompt_roles": {}})
    argv = ["--set", "prompts.validate_count=8", "--set", "evaluation.prompts=32"]
    expected = "prompts.validate_count: 4 in the run, 8 now"
    err = refused("other held-out counts", job, argv, expected, out, tmp_path, capsys, no_ray)
    assert "evaluation.prompts: 16 in the run, 32 now" in err
    # prompts.count moves the defaults with it: the decide, validate and test counts all differ.
    err = refused(
        "another count",
        job,
        ["--set", "prompts.count=2"],
        "prompts.count: 4 in the run, 2 now",
        out,
        tmp_path,
        capsys,
        no_ray,
    )
    assert "prompts.validate_count: 4 in the run, 2 now" in err
    assert "evaluation.prompts: 16 in the run, 8 now" in err


def test_a_quantize_run_of_an_older_version_is_not_continued(
    warm: Path, tmp_path: Path, capsys, no_ray
) -> None:
    """Quantize runs from before fused groups (and bf16 scales rounded to bf16) have no
    compress.fused in run.json; continuing one would mix two quantizers' numbers."""
    out = tmp_path / "run"
    compress = {"method": "quantize", "levels": ["int8"], "min_fdt": 4}
    job = job_dict(warm, out=str(out), probe={"components": "all"}, compress=compress)
    older = load_job(_job_file(tmp_path, job), []).to_dict()
    del older["compress"]["fused"]
    RunStore(str(out)).open_run(older, {"created": "earlier"})
    expected = "is a quantize run from an older dtm-ray (no compress.fused in its run.json)"
    refused("older quantize run", job, [], expected, out, tmp_path, capsys, no_ray)


def test_debug_shows_the_traceback(warm: Path, tmp_path: Path, no_ray) -> None:
    job_path = _job_file(tmp_path, job_dict(warm, startup_timeout_s=0))
    with pytest.raises(ValueError, match="startup_timeout_s"):
        cli.main(["--debug", "run", str(job_path), "--out", str(tmp_path / "run")])
