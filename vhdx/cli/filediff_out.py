"""``vhdx diff --files``: printing the files a checkpoint created, changed or deleted."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from .common import EXIT_OK, chain_options, emit_json, plural
from .progress import human_bytes

if TYPE_CHECKING:
    from ..ops.filediff import FileChange

# The change kinds of ops/filediff.py, spelled here so that importing this module loads no ops/.
CREATED, CHANGED, DELETED = "created", "changed", "deleted"


def describe(c: FileChange) -> str:
    """One line for a change: kind, path, inode, size (before -> after) and what changed."""
    now = c.after or c.before
    assert now is not None
    size = f"{c.before.size} -> {c.after.size} bytes" if c.before and c.after and c.before.size != c.after.size \
        else f"{now.size} bytes"
    line = f"  {c.change:<8} {c.path}  ({now.kind}, inode {now.inode}, {size}"
    if c.change == CHANGED:
        line += "; " + ", ".join(c.what)
        if c.ranges:
            shown = ", ".join(f"{o}+{n}" for o, n in c.ranges[:4])
            line += f"; bytes {shown}" + (f" and {len(c.ranges) - 4} more" if len(c.ranges) > 4 else "")
    return line + ")"


def print_file_changes(args: argparse.Namespace) -> int:
    """``vhdx diff --files``: read both views' file systems and print the changed files."""
    from ..chains.resolve import open as open_disk
    from ..ops.filediff import file_changes
    with open_disk(args.child, **chain_options(args)) as disk:
        diff = file_changes(disk, system=args.system)
    if args.json:
        emit_json(diff.to_dict())
        return EXIT_OK
    counts = {k: sum(1 for c in diff.changes if c.change == k) for k in (CREATED, CHANGED, DELETED)}
    print(f"{args.child}: {plural(len(diff.changes), 'file')} created, changed or deleted "
          f"({', '.join(f'{n} {k}' for k, n in counts.items())}) in {human_bytes(diff.changed_bytes)} "
          "the checkpoint wrote")
    for vol in diff.volumes:
        where = f"volume {vol['index']} at {vol['offset']} ({vol['description']}, {human_bytes(vol['length'])})"
        print(f"{where}: {vol.get('fs_type') or 'no file system'}" + (f"; {vol['note']}" if vol.get("note") else ""))
        for c in diff.changes:
            if c.volume == vol["index"]:
                print(describe(c))
    return EXIT_OK
