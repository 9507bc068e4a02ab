"""The ``vhdx`` command: argument parsing, one-line errors, exit codes.

Verbs live in sibling modules; nothing below this package prints.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

from ..errors import UsageError, VhdxError

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 1
EXIT_UNREADABLE = 2

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
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def add_chain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for parent disks in DIR (repeatable)")
    p.add_argument("--parent", dest="parents", action="append", default=None, metavar="FILE",
                   help="use FILE as the next parent (repeatable, nearest first)")
    p.add_argument("--ignore-id-mismatch", action="store_true",
                   help="accept a parent whose DataWriteGuid differs from the child's parent_linkage")
    p.add_argument("--missing-parent", choices=("error", "zeros"), default="error",
                   help="what to read where a parent cannot be found (default: error)")


FORCE_SHARE_HELP = ("read without taking or honouring locks, like qemu's -U: for inspecting a disk a "
                    "running VM holds; the content may be changing under you")


def add_share_option(p: argparse.ArgumentParser) -> None:
    """``--force-share``/``-U`` for a read-only verb (see FORCE_SHARE_HELP)."""
    p.add_argument("-U", "--force-share", action="store_true", help=FORCE_SHARE_HELP)


def chain_options(args: argparse.Namespace) -> dict[str, Any]:
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


def build_parser() -> argparse.ArgumentParser:
    from . import disks, inspect
    parser = argparse.ArgumentParser(prog="vhdx", description="Hyper-V VHDX/AVHDX disks: inspect, check, "
                                     "export, create, snapshot, merge.",
                                     epilog="Files are locked as QEMU locks images: shared while read, exclusive "
                                     "while written or merged. A disk that another process (a VM, qemu, another "
                                     "vhdx) writes is refused; the read-only verbs read it anyway with "
                                     "--force-share (-U), but its content may be changing under you.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    from .._version import __version__
    parser.add_argument("--version", action="version", version=f"vhdx {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    inspect.register(sub)
    disks.register(sub)
    for name in ("chain", "merge", "map", "demo"):
        try:
            mod = __import__(f"vhdx.cli.{name}_cmd", fromlist=["register"])
        except ImportError:
            continue
        mod.register(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanups run (temporary outputs are removed)."""


def _on_signal(signum: int, frame: Any) -> None:
    # Only the first signal interrupts: later ones are ignored so the cleanups can finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _install_signal_handlers() -> dict[int, Any] | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # a caller that ignores it (nohup) keeps that
            previous[signum] = signal.signal(signum, _on_signal)
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vhdx`` command; returns the exit status.

    SIGINT and SIGTERM raise an exception in the main thread, so every open file and
    temporary output is cleaned up; the command then exits 130 or 143 with one line.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _install_signal_handlers()
    try:
        return _run(args)
    finally:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        if args.debug:
            traceback.print_exc()
        print(f"vhdx: error: {e}", file=sys.stderr)
        return 2
    except VhdxError as e:
        if args.debug:
            traceback.print_exc()
        print(f"vhdx: error: {e}", file=sys.stderr)
        return getattr(args, "error_exit", EXIT_ERROR)
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except OSError as e:
        if args.debug:
            traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"vhdx: error: {where}{e.strerror or e}", file=sys.stderr)
        return getattr(args, "error_exit", EXIT_ERROR)
    except KeyboardInterrupt:
        print("vhdx: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("vhdx: terminated", file=sys.stderr)
        return 143
