"""The package's folders are its layers: each imports only from the layers below it (lazy imports
inside functions count too), so there is no circle and no import back up. The job layer and the
CLI import no torch, Ray or lm-eval, so a bad job fails in a fraction of a second."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "dtm_ray"

# Bottom to top. A module may import its own layer and those before it.
LAYERS = [
    ("errors", "log", "redact"),  # what every layer may use: user errors, the log line, redaction
    ("core",),  # metrics, specs, compression math, state, components, decisions: pure
    ("records",),  # the run directory: schemas, store, lease
    ("engines",),  # where the model runs: protocol, hf, vllm, session, probe, prompts, models
    ("cluster",),  # Ray: the thin engine actor and the pool; knows nothing of jobs
    ("job",),  # the job file, its checks and resume rules
    ("results",),  # final tables, export, lm-eval tasks, show, report
    ("loop",),  # rounds, the compression loops, the driver, the cost estimate
    ("cli",),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    """The layer name of `dtm_ray.x.y` (x), or '' for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every dtm_ray import in the file, lazy ones included."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            if base == "dtm_ray":  # `from dtm_ray import x`: x is the module
                found += [(node.lineno, f"dtm_ray.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return [(line, name) for line, name in found if name.startswith("dtm_ray")]


def test_every_module_belongs_to_a_layer() -> None:
    names = {
        p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0]
        for p in PACKAGE.rglob("*.py")
    } - {"__init__"}
    assert names <= set(LAYER_OF), f"modules outside every layer: {sorted(names - set(LAYER_OF))}"


def test_imports_only_go_down() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _top(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if own in ("", "__init__"):
            continue
        for line, name in _imports(path):
            target = _top(name)
            if target and LAYER_OF[target] > LAYER_OF[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not wrong, "imports back up the layers:\n" + "\n".join(wrong)


def test_no_module_imports_itself_back_through_others() -> None:
    """Within a layer too: no circle of imports between modules, lazy ones included."""
    modules = {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in PACKAGE.rglob("*.py")
    }
    graph = {
        module: {name for _, name in _imports(path) if name in modules and name != module}
        for module, path in modules.items()
    }
    circles, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            circles.append(" -> ".join([*path[path.index(module) :], module]))
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(sorted(set(circles)))
