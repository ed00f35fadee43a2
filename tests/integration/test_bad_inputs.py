"""The installed command in a fresh process: a bad input is exit 2 and one line on stderr, with no
traceback and nothing written. (Every bad input's message, in this process:
tests/unit/test_bad_inputs.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.jobs import existing_run, tiny_job, write_job

# A small valid job: 4 of the model's own prompts of 8 tokens, int8 on the q projections.
SMALL = {
    "prompts": {"source": "self", "count": 4, "prefix_tokens": 8},
    "new_tokens": 8,
    "probe": {"components": [{"kinds": ["q"]}], "specs": ["int8"]},
}
CORRUPT = b"PAR1 not really parquet"
# Each case: the job's changes, extra argv, the text the line holds, a probe file already there.
CASES = {
    "pruning sparsity out of range": (
        {"probe": {"specs": ["magnitude:2"]}},
        [],
        "sparsity 2 in 'magnitude:2' is outside [0, 1]",
        None,
    ),
    "--set value that is not YAML": (
        {},
        ["--set", "probe.specs=[int8"],
        "the value is not valid YAML",
        None,
    ),
    "out under /proc": ({}, ["--out", "/proc/dtm-ray-run"], "is not writable", None),
    "corrupt Parquet file in probes/": (
        {},
        [],
        "part-r000-00000000000000000001-abcdef01.parquet is not",
        CORRUPT,
    ),
}


def _listing(folder: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
        for p in folder.rglob("*")
    }


@pytest.mark.parametrize("case", list(CASES))
def test_the_command_itself_prints_one_line(
    case: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    changes, argv, expected, probe_file = CASES[case]
    job = tiny_job(tiny_llama_dir, **{**SMALL, **changes})
    existing = existing_run(tmp_path, tiny_llama_dir, job, probe_file) if probe_file else None
    out = existing or tmp_path / "run"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    before = _listing(existing) if existing else None
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "dtm_ray.cli", "run", str(write_job(tmp_path, job)), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(f"\n{case} (subprocess): {time.monotonic() - start:.2f} s: {done.stderr.strip()}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dtm-ray: error: "), done.stderr
    assert expected in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    if existing is None:
        assert not Path(argv[argv.index("--out") + 1]).exists()
    else:
        assert _listing(existing) == before
