"""Verbs that mend a damaged file: repair (to a copy, or --in-place) and replay."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import EXIT_CORRUPT, EXIT_OK, about, emit_json, parse_size


def register(sub: Any) -> None:
    """Add the ``repair`` and ``replay`` verbs to the sub-parsers ``sub``."""
    p = sub.add_parser("repair", help="bring a damaged disk back, to a copy, and say what was lost", **about(
        "Repair a damaged VHDX or AVHDX file into a new file OUT; the input is only read. Headers and "
        "region tables are rebuilt from their other copy or from a scan, a dirty log is replayed up to its "
        "last valid entry, lost metadata items are inferred (or taken from --size and --parent), and BAT "
        "entries that point outside the file, into a structure or at another entry's block are dropped. "
        "The report lists each structure found, repaired or lost, and the virtual byte ranges whose "
        "content could not be recovered (they read as the parent's, or zeros). --in-place repairs the "
        "file itself, crash-safe, through the log. Exit 0 when a file was written, 2 when the input is "
        "unrecoverable (the reason is printed; nothing is written).",
        "vhdx repair broken.vhdx -o fixed.vhdx", "vhdx repair --json --size 10G broken.vhdx -o fixed.vhdx",
        "vhdx repair --parent base.vhdx checkpoint.avhdx -o checkpoint-fixed.avhdx"))
    p.add_argument("path", help="the damaged .vhdx or .avhdx file")
    p.add_argument("-o", "--output", metavar="OUT", help="the repaired copy to write (must not exist)")
    p.add_argument("--in-place", action="store_true", help="repair the file itself (through the log, crash-safe)")
    p.add_argument("--size", type=parse_size, default=None, help="the virtual size, when the file has lost it")
    p.add_argument("--parent", metavar="FILE", default=None,
                   help="the parent of a differencing disk whose parent locator is damaged")
    p.add_argument("--json", action="store_true", help="print the salvage report as JSON")
    p.set_defaults(func=cmd_repair)

    p = sub.add_parser("replay", help="replay a dirty log into the file", **about(
        "Replay the log of a file that was not closed cleanly (a crash, a power loss, a killed VM) into "
        "the file itself and mark the log clean, under an exclusive lock: the one verb that writes a "
        "dirty file on purpose. Every other verb reads such a file by replaying its log in memory. A log "
        "that cannot be replayed leaves the file as it was; 'vhdx repair' salvages such a file.",
        "vhdx replay disk.vhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_replay)


def cmd_repair(args: argparse.Namespace) -> int:
    """``vhdx repair``: salvage into OUT (or in place) and print the salvage report."""
    from ..ops.repair import repair
    if bool(args.output) == bool(args.in_place):
        print("vhdx: error: give -o OUT (a repaired copy) or --in-place", file=sys.stderr)
        return 2
    report = repair(args.path, args.output, in_place=args.in_place, size=args.size, parent=args.parent)
    if args.json:
        emit_json(report.to_dict())
    else:
        sys.stdout.write(f"{args.path}:\n")
        for line in report.lines():
            sys.stdout.write(f"  {line}\n")
        if report.ok:
            where = "repaired in place" if report.in_place else f"repaired copy written to {report.output}"
            sys.stdout.write(f"{where}\n")
    return EXIT_OK if report.ok else EXIT_CORRUPT


def cmd_replay(args: argparse.Namespace) -> int:
    """``vhdx replay``: replay a dirty log and print one line of what was done."""
    from ..ops.repair import replay
    result = replay(args.path)
    if args.json:
        emit_json(result.to_dict())
    else:
        print(result.line())
    return EXIT_OK
