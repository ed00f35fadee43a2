"""The documentation against the code: links resolve, commands parse with the real command line,
the reference names every option, the architecture page every module, and every `ray job submit`
is the one recipe. No Ray, no torch: a second or two."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from dtm_ray.cli import build_parser
from dtm_ray.job.spec import load_job

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench/README.md"]
    + list((ROOT / "docs").rglob("*.md"))
)
README_MAX_LINES = 250
# Pages other work writes; links to them may dangle until it lands. Once a page exists its links
# are checked like any other.
PENDING_PAGES: set[str] = set()
# Subcommands documented on a page of their own (pending above) until the reference has them.
PENDING_COMMANDS: set[str] = set()
RECIPE = "ray job submit --runtime-env jobs/runtime_env.yaml -- python -m dtm_ray.cli run jobs/"

FENCE = re.compile(r"^```(\w*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def _split(text: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A page's prose lines (fenced blocks left out) and its fenced blocks (language, body)."""
    prose, blocks, fence, body = [], [], None, []
    for line in text.splitlines():
        match = FENCE.match(line.strip())
        if fence is None and match:
            fence, body = match.group(1), []
        elif fence is not None and line.strip() == "```":
            blocks.append((fence, "\n".join(body)))
            fence = None
        elif fence is not None:
            body.append(line)
        else:
            prose.append(line)
    return prose, blocks


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in _split(path.read_text())[0]:
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            seen = counts.get(slug, 0)
            counts[slug] = seen + 1
            anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def broken_links(page: Path) -> list[str]:
    broken = []
    prose = CODE_SPAN.sub("code", "\n".join(_split(page.read_text())[0]))
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        where = f"{_rel(page)}: {target}"
        if not path.exists():
            if path.is_relative_to(ROOT) and _rel(path) in PENDING_PAGES:
                continue
            broken.append(f"{where} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{where} (no heading #{anchor})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page: Path) -> None:
    assert not broken_links(page)


def dtm_ray_commands(page: Path) -> list[list[str]]:
    """The argument lists of every `dtm-ray` command (or `python -m dtm_ray.cli`) in the page's
    shell blocks, continuation lines joined, comments dropped, split at `&&`, `;` and `|`."""
    commands = []
    for language, body in _split(page.read_text())[1]:
        if language not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            part: list[str] = []
            for word in [*words, ";"]:
                if word not in ("&&", "||", ";", "|"):
                    part.append(word)
                    continue
                for i, token in enumerate(part):
                    if Path(token).name == "dtm-ray":
                        commands.append(part[i + 1 :])
                        break
                    if part[i : i + 3][1:] == ["-m", "dtm_ray.cli"]:
                        commands.append(part[i + 3 :])
                        break
                part = []
    return commands


def command_problem(args: list[str]) -> str | None:
    """Why `dtm-ray ARGS` would not get past the command line and the job file, or None."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            parsed = build_parser().parse_args(args)
    except SystemExit as exit_:
        return None if exit_.code == 0 else errors.getvalue().strip().splitlines()[-1]
    if parsed.command in ("run", "plan"):
        job = ROOT / parsed.job
        if not job.is_file():
            return f"no job file {parsed.job}"
        try:
            load_job(job, parsed.set)
        except Exception as err:  # the job's own checks: a bad key or --set value
            return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_documented_command_parses(page: Path) -> None:
    problems = []
    for args in dtm_ray_commands(page):
        problem = command_problem(args)
        if problem:
            problems.append(f"dtm-ray {shlex.join(args)}: {problem}")
    assert not problems


def test_the_docs_hold_commands_to_check() -> None:
    # The checks above see the tour and the quickstart: an empty harvest would pass any page.
    readme = dtm_ray_commands(ROOT / "README.md")
    assert ["run", "jobs/demo.yaml"] in readme
    assert any(args[:2] == ["run", "jobs/llama2-13b-sparsify.yaml"] for args in readme)
    assert len(readme) >= 10


def test_a_broken_link_or_command_is_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## The command line\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[gone](nowhere.md) [bad anchor](other.md#no-such-heading) "
        "[fine](other.md#the-command-line) [fine too](#a-heading)\n\n## A heading\n\n```bash\n"
        "dtm-ray run jobs/no-such-job.yaml\n"
        "dtm-ray show runs/demo --no-such-flag\n"
        "dtm-ray run jobs/demo.yaml --set compress.no_such_key=1\n"
        "dtm-ray plan jobs/demo.yaml   # fine\n```\n"
    )
    assert [b.split(": ", 1)[1] for b in broken_links(page)] == [
        "nowhere.md (no such file)",
        "other.md#no-such-heading (no heading #no-such-heading)",
    ]
    problems = [command_problem(args) for args in dtm_ray_commands(page)]
    assert [p is None for p in problems] == [False, False, False, True], problems


def test_readme_fits_on_a_screen_or_few() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


def test_the_readme_test_commands_are_the_tiers_ci_runs() -> None:
    """The README's test commands select tiers pytest knows, and .ci/run runs the README's test
    command and then the e2e tier."""
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    markers = {m.split(":")[0] for m in options["ini_options"]["markers"]}
    readme = (ROOT / "README.md").read_text()
    selections = re.findall(r'python -m pytest (?:-n \d+ )?-m (\w+|"[\w ]+")', readme)
    assert {"unit", "integration", "e2e", '"not e2e"'} <= set(selections), selections
    for selection in selections:
        assert set(selection.strip('"').split()) - {"not", "and", "or"} <= markers, selection
    default = re.search(r"\./setup\.sh && \.venv/bin/python -m pytest (-n \d+ -m \S+ \S+)", readme)
    ci = (ROOT / ".ci/run").read_text()
    assert default and default.group(1) in ci, "the README's test command is not what CI runs"
    assert ci.index(default.group(1)) < ci.index("-m e2e")


def _sections(text: str, level: str) -> dict[str, str]:
    """Heading text -> body, for headings of exactly this level ("##", "###")."""
    parts = re.split(rf"^{level} (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_reference_names_every_command_line_option() -> None:
    reference = (ROOT / "docs/reference.md").read_text()
    cli = _sections(reference, "##")["The command line"]
    documented = {
        title.strip("`").removeprefix("dtm-ray "): body
        for title, body in _sections(cli, "###").items()
    }
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing, extra = [], []
    for name, sub in commands.choices.items():
        if name in PENDING_COMMANDS and name not in documented:
            continue
        if name not in documented:
            missing.append(f"dtm-ray {name}")
            continue
        options = {
            option
            for action in sub._actions
            if not isinstance(action, argparse._HelpAction)
            for option in action.option_strings or [action.dest]
        }
        named = set(re.findall(r"`(--[a-z][a-z-]*)", documented[name]))
        named |= set(re.findall(r"^\| `([a-z_]+)` \|", documented[name], flags=re.M))
        missing += [f"dtm-ray {name} {o}" for o in sorted(options - named)]
        extra += [f"dtm-ray {name} {o}" for o in sorted(named - options)]
    extra += [f"dtm-ray {n}" for n in sorted(set(documented) - set(commands.choices))]
    assert not missing, f"options the parser has and docs/reference.md does not: {missing}"
    assert not extra, f"options docs/reference.md names and the parser lacks: {extra}"


def test_architecture_names_every_module() -> None:
    page = (ROOT / "docs/architecture.md").read_text()
    package = ROOT / "dtm_ray"
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*.py")]
    missing = [m for m in sorted(modules) if m.endswith(".py") and not m.endswith("__init__.py")]
    missing = [m for m in missing if f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md has no row for: {missing}"


def test_every_path_the_docs_name_exists() -> None:
    pattern = re.compile(r"`((?:bench|tests|dtm_ray|jobs|deploy|docs)/[\w./-]*)`")
    missing = []
    for page in PAGES:
        for path in pattern.findall(page.read_text()):
            if path.startswith("bench/results") or (ROOT / path).exists():
                continue
            missing.append(f"{_rel(page)}: {path}")
    assert not missing


SUBMIT_FILES = [
    ROOT / "cluster.yaml",
    *sorted((ROOT / "jobs").glob("*.yaml")),
    *sorted((ROOT / "deploy").glob("*.yaml")),
    *PAGES,
]


@pytest.mark.parametrize("path", SUBMIT_FILES, ids=_rel)
def test_every_ray_job_submit_is_the_one_recipe(path: Path) -> None:
    # Shell continuations joined, also inside YAML comments.
    text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
    wrong = []
    for match in re.finditer(r"ray job submit (--[^\n`]*)", text):
        given = "ray job submit " + " ".join(match.group(1).split())
        if not (RECIPE.startswith(given) or given.startswith(RECIPE)):
            wrong.append(given)
    assert not wrong, f"not the recipe ({RECIPE}...): {wrong}"
