"""The install line names the extra that holds a missing module. (A missing requirement on the
driver and on an actor's node: tests/integration/test_requirements.py.)"""

from __future__ import annotations

import sys

from dtm_ray.errors import MissingRequirement, missing_requirement


def test_the_install_line_names_the_extra_that_holds_the_module() -> None:
    missing = missing_requirement(ModuleNotFoundError("x", name="lm_eval.tasks"), "node n1")
    assert isinstance(missing, MissingRequirement)
    assert str(missing).startswith(f"the Python at {sys.executable} on node n1 has no module")
    assert 'pip install "dtm-ray[eval]"' in str(missing)
    vllm = missing_requirement(ModuleNotFoundError(name="vllm"))
    assert 'pip install "dtm-ray[vllm]"' in str(vllm)
    # One of dtm_ray's own modules missing is a broken install or a bug: not this error.
    assert missing_requirement(ModuleNotFoundError(name="dtm_ray.loop.nothing")) is None
