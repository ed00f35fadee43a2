"""The command line itself: every subcommand explains itself. Bad inputs to `dtm-ray run` (one
line on stderr, exit 2, nothing started or written) are one corpus in test_bad_inputs.py."""

from __future__ import annotations

import argparse

import pytest

from dtm_ray import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The parser's own subcommands, by name."""
    (action,) = [
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return dict(action.choices)


def test_every_subcommand_is_listed_in_the_top_level_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in subcommands():
        assert f"\n    {name} " in text, f"`dtm-ray --help` does not list {name}"


def test_the_real_subcommands_are_all_here() -> None:
    # A floor, so the parametrized test below cannot pass by iterating over nothing.
    assert {"model", "run", "plan", "show", "report", "export", "evaluate"} <= set(subcommands())


@pytest.mark.parametrize("command", list(subcommands()))
def test_every_subcommand_explains_itself(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: dtm-ray {command}") and len(text) > 300
    parser = subcommands()[command]
    assert parser.description and parser.description.split()[0] in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.metavar or action.dest]
        for name in names:
            assert name in text, f"`dtm-ray {command} --help` does not name {name}"


# --- bugs are never disguised as user mistakes ------------------------------------------------
def _broken_show(run_dir: str) -> None:
    raise ValueError(f"an internal check failed on {run_dir}")


def test_an_internal_error_says_it_is_a_bug_and_where_its_traceback_went(
    monkeypatch, tmp_path, capsys
) -> None:
    from dtm_ray.results import show

    monkeypatch.setattr(show, "load_run", _broken_show)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    assert cli.main(["show", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("dtm-ray: internal error: ValueError: an internal check failed on runs/x")
    assert "dtm-ray: error:" not in err  # a ValueError from inside is not a user error
    (saved,) = tmp_path.glob("dtm-ray-traceback-*.txt")
    assert str(saved) in err
    text = saved.read_text()
    assert text.startswith("Traceback") and "_broken_show" in text


def test_debug_raises_an_internal_error_with_its_traceback(monkeypatch) -> None:
    from dtm_ray.results import show

    monkeypatch.setattr(show, "load_run", _broken_show)
    with pytest.raises(ValueError, match="an internal check failed"):
        cli.main(["--debug", "show", "runs/x"])


def test_a_user_error_outside_run_is_one_line_with_exit_2(tmp_path, capsys) -> None:
    assert cli.main(["export", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dtm-ray: error: "), err
    assert "is not a run directory" in err
