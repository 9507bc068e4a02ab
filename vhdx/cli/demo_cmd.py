"""``vhdx demo``: the whole job on a small disk in a temporary folder."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..errors import UsageError
from .common import EXIT_ERROR, EXIT_OK, about


def register(sub: Any) -> None:
    """Add the ``demo`` verb to the sub-parsers ``sub``."""
    p = sub.add_parser("demo", help="build a disk, take two checkpoints, merge them back, check the result",
                       **about("A tour in a scratch folder: create a disk, write to it, take two checkpoints "
                               "and write to each, show the chain, merge the checkpoints back, and check that "
                               "the disk reads as the newest checkpoint did, with vhdx check and a hash "
                               "of the disk.", "vhdx demo", "vhdx demo --dir /tmp/vhdx-demo"))
    p.add_argument("--dir", help="work in DIR (kept afterwards) instead of a temporary folder")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """``vhdx demo``: exit 0 when every check of the demo passed, 1 when one failed."""
    from ..ops.demo import run_in
    if args.dir and os.path.exists(args.dir) and not os.path.isdir(args.dir):
        raise UsageError("--dir must be a folder", path=args.dir)
    return EXIT_OK if run_in(args.dir or None) else EXIT_ERROR
