"""A Python without dtm-ray's requirements (a cluster image that lacks pyarrow, a worker node
without torch) is told so in one line, exit 2: which module, which Python, what to install;
never "internal error"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def shim(folder: Path, module: str) -> Path:
    """A folder holding a package `module` whose import fails as a missing module's does; put
    first on PYTHONPATH, it hides the installed one."""
    package = folder / "shim" / module
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{module}'\", name={module!r})\n"
    )
    return folder / "shim"


def expected_line(module: str, install: str = 'pip install "dtm-ray"') -> str:
    return (
        f"dtm-ray: error: the Python at {sys.executable} has no module {module!r} (a requirement "
        f"of dtm-ray): install the requirements into it ({install}, or the cluster image's "
        "requirements), or run dtm-ray with a Python that has them"
    )


def cli_without(module: str, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`python -m dtm_ray.cli ARGV` in a Python whose `module` cannot be imported."""
    path = f"{shim(tmp_path, module)}{os.pathsep}{ROOT}"
    env = {**os.environ, "PYTHONPATH": path}
    command = [sys.executable, "-m", "dtm_ray.cli", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module, argv",
    [
        ("pyarrow", ["show", "runs/nothing-here"]),  # the store: imported by the command
        ("numpy", ["run", "job.yaml"]),  # imported while the parser is built
        ("yaml", ["run", "job.yaml"]),
    ],
)
def test_a_missing_requirement_on_the_driver_is_one_line_exit_2(
    tmp_path: Path, module: str, argv: list[str]
) -> None:
    done = cli_without(module, tmp_path, *argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr == expected_line(module) + "\n"


@pytest.mark.parametrize(
    "module, python",
    [
        # Missing while the actor starts its engine (transformers: the hf engine's).
        ("transformers", f"the Python at {sys.executable} on node "),
        # Missing while Ray's worker imports the actor's module (torch): Ray reports it as text.
        ("torch", "the Python of Ray's workers on that node"),
    ],
)
def test_a_missing_requirement_on_an_actors_node_is_one_line_naming_it(
    ray_session, tiny_llama_dir: Path, tmp_path: Path, module: str, python: str
) -> None:
    from dtm_ray.cluster.actor import EngineActor
    from dtm_ray.cluster.startup import wait_for_actors
    from dtm_ray.engines import EngineConfig
    from dtm_ray.errors import StartupError

    path = f"{shim(tmp_path, module)}{os.pathsep}{ROOT}"
    actor = (
        ray_session.remote(EngineActor)
        .options(runtime_env={"env_vars": {"PYTHONPATH": path}}, num_cpus=1)
        .remote(str(tiny_llama_dir), EngineConfig(kind="hf"))
    )
    try:
        with pytest.raises(StartupError) as raised:
            wait_for_actors([actor], {"CPU": 1}, 120)
    finally:
        ray_session.kill(actor)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("engine actor engine-0 ") and " could not start: " in message
    assert message.split(" could not start: ", 1)[1].startswith(python)
    assert f"has no module {module!r} (a requirement of dtm-ray)" in message
    assert 'pip install "dtm-ray"' in message
