"""``vhdx demo``: the whole job on a small disk in a temporary folder."""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

from ..ops.demo import run
from . import EXIT_ERROR, EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="build a disk, take two checkpoints, merge them back, check the result")
    p.add_argument("--dir", help="work in DIR (kept afterwards) instead of a temporary folder")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.dir:
        if os.path.exists(args.dir) and not os.path.isdir(args.dir):
            from ..errors import UsageError
            raise UsageError("--dir must be a folder", path=args.dir)
        os.makedirs(args.dir, exist_ok=True)
        ok = run(args.dir)
    else:
        with tempfile.TemporaryDirectory(prefix="vhdx-demo-") as folder:
            ok = run(folder)
    return EXIT_OK if ok else EXIT_ERROR
