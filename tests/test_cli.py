"""`dtm-ray run` with bad job files: one line on stderr, exit code 2, nothing started or written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtm_ray import cli
from dtm_ray.loop import driver


def write_job(folder: Path, job: dict) -> Path:
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def no_orchestration(monkeypatch):
    """Fail the test if a bad job ever reaches the orchestrator (where actors would start)."""

    def forbidden(plan):
        raise AssertionError(f"a bad job reached run_plan: {plan.job}")

    monkeypatch.setattr(driver, "run_plan", forbidden)


def tiny(model_dir: Path, **changes) -> dict:
    job = {
        "model": str(model_dir),
        "engine": "hf",
        "prompts": {"count": 4, "prefix_tokens": 8},
        "new_tokens": 8,
        "probe": {"components": [{"kinds": ["q"]}], "specs": ["int8"]},
    }
    job.update(changes)
    return job


BAD_JOBS = {
    "unknown key": (lambda m: tiny(m, wokers=2), "unknown key 'wokers'"),
    "unknown nested key": (
        lambda m: tiny(m, prompts={"cuont": 4}),
        "unknown key prompts.'cuont'",
    ),
    "no model key": (lambda m: {"engine": "hf"}, "has no 'model' key"),
    "missing model": (
        lambda m: tiny(m, model=str(m.parent / "no-such-model")),
        "neither a local folder nor a known name",
    ),
    "sparsity out of range": (
        lambda m: tiny(m, probe={"specs": ["magnitude:1.5"]}),
        "outside [0, 1]",
    ),
    "N:M does not divide the input dim": (
        lambda m: tiny(m, probe={"specs": ["nm:2:3"]}),
        "not divisible by M=3",
    ),
    "selector matches nothing": (
        lambda m: tiny(m, probe={"components": [{"layers": [7]}], "specs": ["int8"]}),
        "matches no component",
    ),
    "probe specs beside a compress section": (
        lambda m: tiny(m, compress={"target_sparsity": 0.4}),
        "probe.specs is not used with a compress: section",
    ),
    "target sparsity out of range": (
        lambda m: tiny(m, probe={"components": "all"}, compress={"target_sparsity": 1.5}),
        "compress.target_sparsity must be a number in (0, 1), got 1.5",
    ),
    "unknown guide": (
        lambda m: tiny(m, probe={"components": "all"}, compress={"guide": "perplexity"}),
        "compress.guide 'perplexity' unknown; expected one of ['fdt', 'nll', 'uniform']",
    ),
    "unknown compress key": (
        lambda m: tiny(m, probe={"components": "all"}, compress={"steps": 0.1}),
        "unknown key compress.'steps'",
    ),
    "zero step": (
        lambda m: tiny(m, probe={"components": "all"}, compress={"step": 0}),
        "compress.step must be a number in (0, 1], got 0",
    ),
    "quantize without levels": (
        lambda m: tiny(m, probe={"components": "all"}, compress={"method": "quantize"}),
        "compress.levels must be a non-empty list of precisions",
    ),
    "a sparsify key on quantize": (
        lambda m: tiny(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8"], "min_fdt": 4, "step": 0.1},
        ),
        "compress.step does not apply to method 'quantize'",
    ),
    "a pruning level": (
        lambda m: tiny(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["magnitude:0.5"], "min_fdt": 4},
        ),
        "a pruning spec",
    ),
    "min_fdt above new_tokens": (
        lambda m: tiny(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int8"], "min_fdt": 9},
        ),
        "compress.min_fdt 9 exceeds new_tokens 8",
    ),
    "a level that does not fit a component": (
        lambda m: tiny(
            m,
            probe={"components": "all"},
            compress={"method": "quantize", "levels": ["int4-g100"], "min_fdt": 4},
        ),
        "not divisible by group size 100",
    ),
    "bad evaluation text": (
        lambda m: tiny(m, evaluation={"text": "notes.csv"}),
        "evaluation.text 'notes.csv' must be",
    ),
    "zero workers": (lambda m: tiny(m, workers=0), "workers must be an integer >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_is_one_line_and_starts_nothing(
    case: str, tiny_llama_dir: Path, tmp_path: Path, capsys, no_orchestration
) -> None:
    build, expected = BAD_JOBS[case]
    out = tmp_path / "run"
    code = cli.main(["run", str(write_job(tmp_path, build(tiny_llama_dir))), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dtm-ray: error: "), err
    assert expected in err
    assert not out.exists()


def test_int4_group_that_does_not_divide_smollm2_hidden_size(
    smollm2_dir: Path, tmp_path: Path, capsys, no_orchestration
) -> None:
    job = tiny(smollm2_dir, probe={"specs": ["int4-g128"]})  # hidden 576 = 4.5 x 128
    out = tmp_path / "run"
    code = cli.main(["run", str(write_job(tmp_path, job)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "in_features 576 is not divisible by group size 128" in err
    assert not out.exists()


def test_a_bad_set_override_is_reported_too(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    job = write_job(tmp_path, tiny(tiny_llama_dir))
    code = cli.main(["run", str(job), "--set", "probe.specs=[int9]", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown compression 'int9'" in err and err.count("\n") == 1


def test_the_installed_command_prints_no_traceback(tiny_llama_dir: Path, tmp_path: Path) -> None:
    job = write_job(tmp_path, tiny(tiny_llama_dir, probe={"specs": ["magnitude:2"]}))
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dtm_ray.cli", "run", str(job), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dtm-ray: error: sparsity 2 in 'magnitude:2' is outside [0, 1]"
    ]
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists()


def test_invalid_yaml_is_one_line(tmp_path: Path, capsys, no_orchestration) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: [unclosed\nengine: hf\n")
    assert cli.main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not valid YAML" in err


def test_a_run_dir_made_by_another_job_is_refused_in_one_line(
    tiny_llama_dir: Path, tmp_path: Path, capsys
) -> None:
    from dtm_ray.job.spec import load_job
    from dtm_ray.records.store import RunStore

    out = tmp_path / "run"
    job = write_job(tmp_path, tiny(tiny_llama_dir, out=str(out)))
    earlier = load_job(job, ["new_tokens=16", "workers=3"])
    RunStore(str(out)).open_run(earlier.to_dict(), {"created": "earlier"})
    code = cli.main(["run", str(job), "--set", "prompts.seed=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "new_tokens: 16 in the run, 8 now" in err
    assert "prompts.seed: 0 in the run, 1 now" in err
    assert "workers" not in err
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]
