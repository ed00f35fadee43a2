"""The export command in a fresh process: a device the machine lacks is one line with exit 2. (The
export's bytes: tests/unit/test_export_scale.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_export_on_a_device_the_machine_lacks_is_one_line_with_exit_2(tmp_path: Path) -> None:
    device = "cuda"
    # CUDA hidden, so the machine has no GPU torch can use even where one is installed.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "dtm_ray.cli", "export", str(tmp_path), "--device", device],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"dtm-ray: error: --device {device}: this machine has no CUDA")
    assert "use --device auto or cpu" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing read or written
