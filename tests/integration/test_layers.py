"""In a fresh process: the job layer and the command line load no heavy library. (The layering of
imports: tests/unit/test_layers.py.)"""

from __future__ import annotations

import subprocess
import sys


def test_job_layer_and_cli_load_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "import dtm_ray.cli, dtm_ray.job.checks, dtm_ray.job.resume\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'lm_eval', 'vllm', 'transformers', "
        "'pyarrow') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
