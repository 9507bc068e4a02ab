"""Read-only verbs: info, check."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any, Callable

from .common import (EXIT_CORRUPT, EXIT_LEAKS, EXIT_OK, EXIT_UNREADABLE, about, add_chain_options, add_share_option,
                     chain_options, describing_options, emit_json, missing_parent, missing_parent_line, plural)
from .progress import human_bytes

if TYPE_CHECKING:
    from ..ops.check import CheckReport, Finding

Write = Callable[[str], Any]

CHECK_HELP = ("structural check with the exit codes of qemu-img check: 0 when no errors were found (warnings "
              "allowed), 1 when the check could not be completed (the file cannot be read as a VHDX at all), "
              "2 when errors (corruption) were found, 3 when the only findings are leaked space (wasted, no "
              "harm to data)")


def register(sub: Any) -> None:
    """Add the ``info`` and ``check`` verbs to the sub-parsers ``sub``."""
    p = sub.add_parser("info", help="every header, region, metadata field, BAT and log state", **about(
        "Describe one VHDX or AVHDX file: its identity and sizes, both headers, the region table, every "
        "metadata item, the parent locator of a differencing disk, the block allocation table and the "
        "state of the log. Nothing is written: a log that needs replaying is replayed in memory only.",
        "vhdx info disk.vhdx", "vhdx info --json checkpoint.avhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help=CHECK_HELP, **about(
        "Check the structures of a file and its chain as qemu-img check does: headers and checksums, "
        "regions, metadata, the log, every BAT entry and overlaps, and that each parent is found and "
        "matches. Each finding is one line with what to do about it. Nothing is written. Exit codes, as "
        "qemu-img check's: 0 when no errors were found (warnings allowed), 1 when the check could not be "
        "completed (the file cannot be read as a VHDX at all), 2 when errors (corruption) were found, 3 "
        "when the only findings are leaked space (wasted, no harm to data).",
        "vhdx check disk.vhdx", "vhdx check --search /backup checkpoint.avhdx"))
    p.add_argument("path", help="the .vhdx or .avhdx file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("-r", "--repair", action="store_true", help="first fix in place what is safe to fix (a dirty "
                   "log, a stale or invalid header, leaked space), like qemu-img check -r; see also 'vhdx repair'")
    add_chain_options(p)
    add_share_option(p)
    p.set_defaults(func=cmd_check, error_exit=EXIT_UNREADABLE)


# --------------------------------------------------------------------------- info

def cmd_info(args: argparse.Namespace) -> int:
    """``vhdx info``: every header, region, metadata item, BAT count and the log state of a disk."""
    from ..chains.resolve import open as open_disk
    with open_disk(args.path, **describing_options(args)) as disk:
        info = disk.info()
    missing = missing_parent(info.get("chain"))
    if missing:
        info["missing_parent"] = missing
    if args.json:
        emit_json(info)
        return EXIT_OK
    out = sys.stdout.write
    _print_identity(info, out)
    _print_headers(info, out)
    _print_metadata(info, out)
    _print_bat(info["bat"], out)
    _print_log(info["log"], out)
    for layer in info.get("chain", [])[1:]:
        out(f"  parent             {layer['path']} ({layer['found_by']}, linkage {layer['linkage']})\n")
    if missing:
        out(missing_parent_line(missing))
    return EXIT_OK


def _print_identity(info: dict[str, Any], out: Write) -> None:
    out(f"{info['path']}\n")
    out(f"  type               {info['disk_type']}\n")
    out(f"  virtual size       {info['virtual_size']} bytes ({human_bytes(info['virtual_size'])})\n")
    out(f"  file size          {info['file_size']} bytes ({human_bytes(info['file_size'])})\n")
    out(f"  block size         {info['block_size']} ({human_bytes(info['block_size'])})\n")
    out(f"  sector size        {info['logical_sector_size']} logical, {info['physical_sector_size']} physical\n")
    out(f"  disk id (page 83)  {info['disk_id']}\n")
    out(f"  data write guid    {info['data_write_guid']}\n")
    out(f"  file write guid    {info['file_write_guid']}\n")
    out(f"  creator            {info['creator']}\n")


def _print_headers(info: dict[str, Any], out: Write) -> None:
    out("  headers\n")
    for h in info["headers"]:
        if h["valid"]:
            out(f"    0x{h['offset']:06x} seq {h['sequence_number']}{' (current)' if h['current'] else ''} "
                f"log_guid {h['log_guid']} log {h['log_length']}@0x{h['log_offset']:x}\n")
        else:
            out(f"    0x{h['offset']:06x} INVALID: {h['error']}\n")
    out("  regions\n")
    for r in info["region_table"]:
        out(f"    {r['region']:10} 0x{r['file_offset']:x} {r['length']} bytes required={r['required']}\n")


def _print_metadata(info: dict[str, Any], out: Write) -> None:
    md = info["metadata"]
    out("  metadata items\n")
    for e in md["entries"]:
        flags = "".join(c for c, on in (("U", e["is_user"]), ("V", e["is_virtual_disk"]), ("R", e["is_required"])) if on)
        out(f"    {e['item']:22} +0x{e['offset']:x} {e['length']} bytes [{flags}]\n")
    if md["parent_locator"]:
        out("  parent locator\n")
        for k, v in md["parent_locator"].items():
            out(f"    {k:20} {v}\n")


def _print_bat(b: dict[str, Any], out: Write) -> None:
    out(f"  BAT                {b['entries']} entries at 0x{b['file_offset']:x}, chunk ratio {b['chunk_ratio']}\n")
    out("    payload          " + ", ".join(f"{k} {v}" for k, v in b["payload_states"].items()) + "\n")
    if b["sector_bitmap_states"]:
        out("    sector bitmaps   " + ", ".join(f"{k} {v}" for k, v in b["sector_bitmap_states"].items()) + "\n")


def _print_log(log: dict[str, Any], out: Write) -> None:
    if not log["dirty"]:
        state = "clean"
    elif log["replayed_in_memory"]:
        state = f"DIRTY, {len(log['replayed_entries'])} entries replayed in memory"
    else:
        state = "was dirty, replayed"
    out(f"  log                {log['length']} bytes at 0x{log['offset']:x}, {state}\n")


# --------------------------------------------------------------------------- check

def cmd_check(args: argparse.Namespace) -> int:
    """``vhdx check``: the structural and chain check; exit codes as qemu-img check: 0 clean (warnings
    allowed), 1 the check could not be completed, 2 errors found, 3 leaked space only."""
    from ..ops.check import LEAK, check_chain, check_file
    if getattr(args, "repair", False):
        _repair_first(args)
    report = check_file(args.path, share=args.force_share)
    if not report.opened and not args.json:
        # The file cannot be opened as a VHDX at all: one line, like every other error.
        first = report.findings[0]
        where = f"at 0x{first.offset:x}: " if first.offset is not None else ""
        print(f"vhdx: error: {args.path}: {where}{first.message}", file=sys.stderr)
        return EXIT_UNREADABLE
    findings = list(report.findings)
    if report.opened and not report.errors:  # a broken structure would only be reported twice
        findings.extend(check_chain(args.path, **chain_options(args)))
    errors = [f for f in findings if f.severity == "error"]
    leaks = [f for f in findings if f.severity == LEAK]
    if args.json:
        _emit_check_json(report, findings, errors)
    else:
        _print_check(args.path, findings, errors, leaks)
    if not report.opened:
        return EXIT_UNREADABLE  # the file could not be opened as a VHDX at all
    return EXIT_CORRUPT if errors else EXIT_LEAKS if leaks else EXIT_OK


def _repair_first(args: argparse.Namespace) -> None:
    """``check --repair``: the safe in-place fixes, one line each (on stderr with --json)."""
    from ..ops.repair import fix_in_place
    for line in fix_in_place(args.path) or ["nothing that check --repair fixes"]:
        print(f"fixed: {line}", file=sys.stderr if args.json else sys.stdout)


def _emit_check_json(report: CheckReport, findings: list[Finding], errors: list[Finding]) -> None:
    from ..ops.check import LEAK
    d = report.to_dict()
    d["findings"] = [f.to_dict() for f in findings]
    d["errors"] = len(errors)
    d["warnings"] = len([f for f in findings if f.severity == "warning"])
    d["leaks"] = len([f for f in findings if f.severity == LEAK])
    emit_json(d)


def _print_check(path: str, findings: list[Finding], errors: list[Finding], leaks: list[Finding]) -> None:
    for f in findings:
        sys.stdout.write(f"{f}\n")
    leaked = f"; {plural(len(leaks), 'leak')} (wasted space, no harm to data)" if leaks else ""
    if errors:
        sys.stdout.write(f"{path}: {plural(len(errors), 'error')} found{leaked}\n")
    else:
        notes = len(findings) - len(leaks)
        noted = f" ({plural(notes, 'note')})" if notes else ""
        sys.stdout.write(f"{path}: no errors were found{noted}{leaked}\n")
