"""What every verb module shares: exit codes, sizes, JSON output and the chain options.

A verb module registers its parsers with these helpers and turns the parsed options into
the keyword arguments of :func:`vhdx.open` with :func:`chain_options`; nothing here opens
a disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 1
EXIT_USAGE = 2
# vhdx check, as qemu-img check: 0 clean (warnings allowed), 1 the check could not be completed,
# 2 errors found (corruption), 3 leaked space only
EXIT_UNREADABLE = 1
EXIT_CORRUPT = 2
EXIT_LEAKS = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

FORCE_SHARE_HELP = ("read without taking or honouring locks, like qemu's -U: for inspecting a disk a "
                    "running VM holds; the content may be changing under you")

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
             "TIB": 1 << 40}


def parse_size(text: str) -> int:
    """'64M', '1GiB', '4096' -> bytes (binary units)."""
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if unit not in _SUFFIXES or not num:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M, 10G, 1T)")
    try:
        value = float(num) * _SUFFIXES[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value != int(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def emit_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (anything JSON does not know, as its str)."""
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def plural(count: int, word: str) -> str:
    """``3 errors``, ``1 error``: ``count`` and ``word``, with an ``s`` unless the count is 1."""
    return f"{count} {word}{'' if count == 1 else 's'}"


def about(description: str, *examples: str) -> dict[str, Any]:
    """The ``add_parser`` keywords of a verb: its paragraph (wrapped) and its examples, shown as written."""
    lines = "\n".join(f"  {e}" for e in examples)
    return dict(description=textwrap.fill(" ".join(description.split()), 78),
                epilog=f"Example{'s' if len(examples) > 1 else ''}:\n{lines}",
                formatter_class=argparse.RawDescriptionHelpFormatter)


def add_chain_options(p: argparse.ArgumentParser) -> None:
    """``--search``, ``--parent``, ``--ignore-id-mismatch``, ``--missing-parent``: how to find parents."""
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR (repeatable)")
    p.add_argument("--parent", dest="parents", action="append", default=None, metavar="FILE",
                   help="use FILE as the next parent (repeatable, nearest first)")
    p.add_argument("--ignore-id-mismatch", action="store_true",
                   help="accept a parent whose DataWriteGuid differs from the child's parent_linkage")
    p.add_argument("--missing-parent", choices=("error", "zeros"), default="error",
                   help="what to read where a parent cannot be found (default: error)")


def add_share_option(p: argparse.ArgumentParser) -> None:
    """``--force-share``/``-U`` for a read-only verb (see FORCE_SHARE_HELP)."""
    p.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)


def add_progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress``/``--no-progress``: ``args.progress`` is None (on a terminal only), True or False."""
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="show a progress bar on stderr (default: only when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="never show a progress bar")


def chain_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`vhdx.open` that the parsed chain and share options ask for."""
    opts: dict[str, Any] = {}
    if getattr(args, "force_share", False):
        opts["share"] = True
    if getattr(args, "search", None):
        opts["search_paths"] = args.search
    if getattr(args, "parents", None):
        opts["parents"] = args.parents
    if getattr(args, "ignore_id_mismatch", False):
        opts["ignore_id_mismatch"] = True
    if getattr(args, "missing_parent", "error") != "error":
        opts["missing_parent"] = args.missing_parent
    return opts


def describing_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`chain_options` for a verb that describes a file (info, map) and reads no parent data:
    a missing parent is not a failure there, it is reported (see :func:`missing_parent`)."""
    opts = chain_options(args)
    opts["missing_parent"] = "zeros"
    return opts


def missing_parent(chain_info: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """The layer of ``chain_info`` (a Disk's) whose parent was not found, as JSON values, or None."""
    for layer in chain_info or []:
        if layer["linkage"] == "missing":
            return dict(child=layer["path"], parent_linkage=layer["parent_linkage"], tried=layer["tried"])
    return None


def missing_parent_line(missing: dict[str, Any]) -> str:
    """The line info and map print for :func:`missing_parent`'s answer."""
    return (f"  parent             MISSING: DataWriteGuid {missing['parent_linkage']} of {missing['child']} "
            f"not found ({plural(len(missing['tried']), 'place')} tried; 'vhdx chain' lists them, "
            "--search DIR may find it)\n")
