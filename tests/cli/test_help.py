"""The help a new user reads (issue 14, point 6): a description and an example for every verb,
a help line for every option, what merge deletes, and ``--debug`` anywhere on the line."""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pytest

import vhdx.cli


def subparsers() -> dict[str, argparse.ArgumentParser]:
    """Every verb's parser, by name."""
    parser = vhdx.cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subs[0].choices)


VERBS = sorted(subparsers())


def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        vhdx.cli.main([*argv, "--help"])
    assert info.value.code == 0
    return out.getvalue()


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_a_description_and_an_example(verb: str) -> None:
    p = subparsers()[verb]
    assert p.description and len(p.description.split()) >= 12, f"{verb}: no one-paragraph description"
    assert p.formatter_class is argparse.RawDescriptionHelpFormatter, verb
    assert p.epilog and "Example" in p.epilog and f"vhdx {verb}" in p.epilog, f"{verb}: no example"
    text = help_text(verb)
    assert p.description.split()[0] in text and f"vhdx {verb}" in text


@pytest.mark.parametrize("verb", VERBS)
def test_every_option_has_a_help_line(verb: str) -> None:
    missing = [a.option_strings[-1] if a.option_strings else a.dest
               for a in subparsers()[verb]._actions
               if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, f"vhdx {verb}: no help for {missing}"


def test_the_top_level_options_have_help() -> None:
    parser = vhdx.cli.build_parser()
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_merge_help_says_the_merged_files_are_deleted() -> None:
    text = " ".join(help_text("merge").split())
    assert "deleted" in text and "--keep" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_works_before_or_after_the_verb(where: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.vhdx")
    argv = ["--debug", "info", missing] if where == "before" else ["info", missing, "--debug"]
    assert vhdx.cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err, err
    assert err.strip().splitlines()[-1].startswith("vhdx: error: ")


def test_without_debug_there_is_no_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert vhdx.cli.main(["info", str(tmp_path / "missing.vhdx")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_debug_after_the_verb_does_not_hide_one_before() -> None:
    parser = vhdx.cli.build_parser()
    assert parser.parse_args(["--debug", "hash", "x.vhdx"]).debug is True
    assert parser.parse_args(["hash", "x.vhdx", "--debug"]).debug is True
    assert parser.parse_args(["hash", "x.vhdx"]).debug is False
