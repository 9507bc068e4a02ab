"""cli/ is argparse and printing only: every action is a call into ops/ (or chains/ for open).

This module builds the ``vhdx`` parser from the verb modules beside it and runs a command:
signals, ``--debug``, one-line errors and exit codes. The helpers the verbs share are in
:mod:`vhdx.cli.common`; nothing below this package prints.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Sequence

from .._version import __version__
from ..errors import UsageError, VhdxError
from . import chain_cmd, demo_cmd, disks, inspect, maint_cmd, map_cmd, merge_cmd, mount_cmd, repair_cmd
from .common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE

__all__ = ["build_parser", "main"]

# Every verb module, in the order of ``vhdx --help``; each adds its parsers with ``register(sub)``.
# They are imported to build the parser, so they import only the standard library, errors and cli/ at
# their top; each ``cmd_*`` handler imports the ops/ and chains/ names it calls (numpy, construct):
# ``vhdx --help`` stays light (tests/test_architecture.py, tests/cli/test_startup.py).
VERB_MODULES = (inspect, disks, chain_cmd, merge_cmd, maint_cmd, repair_cmd, map_cmd, mount_cmd, demo_cmd)

DESCRIPTION = ("Hyper-V VHDX/AVHDX disks: inspect, check, export, create, snapshot, merge, compact, resize, "
               "convert.")
EPILOG = ("Files are locked as QEMU locks images: shared while read, exclusive while written or merged. A "
          "disk that another process (a VM, qemu, another vhdx) writes is refused; the read-only verbs read "
          "it anyway with --force-share (-U), but its content may be changing under you.")

DEBUG_HELP = "show the traceback of an error (before or after the verb)"


def build_parser() -> argparse.ArgumentParser:
    """The ``vhdx`` parser, with a sub-parser for every verb of every verb module."""
    parser = argparse.ArgumentParser(prog="vhdx", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"vhdx {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", help="'vhdx VERB --help' describes each, with examples")
    sub.required = True
    for module in VERB_MODULES:
        module.register(sub)
    for verb_parser in sub.choices.values():  # --debug after the verb too; unset there, it keeps the one before
        verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
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
    _one_blas_thread()
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = _install_signal_handlers()
    try:
        return _run(args)
    finally:
        for signum, handler in (previous or {}).items():
            signal.signal(signum, handler)


def _one_blas_thread() -> None:
    """Before numpy loads: its OpenBLAS would start a thread per core that we never use (no
    linear algebra here), which costs a short command 20-35 % more CPU. A user's setting stands."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, "1")


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Print ``vhdx: error: message`` (and the traceback with --debug); return ``code``."""
    if args.debug:
        traceback.print_exc()
    print(f"vhdx: error: {message}", file=sys.stderr)
    return code


def _run(args: argparse.Namespace) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as e:
        return _fail(args, str(e), EXIT_USAGE)
    except VhdxError as e:
        return _fail(args, str(e), getattr(args, "error_exit", EXIT_ERROR))
    except BrokenPipeError:
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_ERROR
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(args, f"{where}{e.strerror or e}", getattr(args, "error_exit", EXIT_ERROR))
    except KeyboardInterrupt:
        print("vhdx: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("vhdx: terminated", file=sys.stderr)
        return EXIT_TERMINATED
