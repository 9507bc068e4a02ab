"""The parser offers every verb the README documents; a broken verb module fails loudly."""

from __future__ import annotations

import argparse
import re

import pytest

import vhdx.cli
from support.forensic_chain import REPO
from vhdx.cli.common import parse_size


def readme_verbs() -> set[str]:
    """The verbs of the README's command-line block (``vhdx VERB ...`` lines)."""
    text = (REPO / "README.md").read_text()
    block = text.split("## The command line", 1)[1].split("```", 2)[1]
    return set(re.findall(r"^vhdx ([a-z]+)", block, re.M))


def parser_verbs() -> set[str]:
    """The verbs the ``vhdx`` parser has sub-parsers for."""
    parser = vhdx.cli.build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1
    return set(subs[0].choices)


def test_the_parser_has_every_readme_verb() -> None:
    documented = readme_verbs()
    assert {"info", "check", "merge", "orphans", "demo"} <= documented, documented
    assert documented <= parser_verbs()


def test_every_verb_module_is_imported_at_the_top() -> None:
    """No verb is dropped silently: the verb modules are plain imports of ``vhdx.cli``."""
    names = {m.__name__ for m in vhdx.cli.VERB_MODULES}
    assert names == {f"vhdx.cli.{n}" for n in ("inspect", "disks", "chain_cmd", "merge_cmd", "maint_cmd",
                                                "repair_cmd",
                                                "map_cmd", "mount_cmd", "demo_cmd")}


@pytest.mark.parametrize("text, size", [("4096", 4096), ("64M", 64 << 20), ("1GiB", 1 << 30), ("1.5K", 1536)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12Q", "0.3", "-1M"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)
