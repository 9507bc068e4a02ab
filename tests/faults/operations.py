"""The write operations of the fault tests, each with its starting files and what a user sees.

An :class:`Operation` builds its starting files in an empty folder (``build``), runs with every
file it writes behind a :class:`support.faults.FaultPlan` (``run``), and tells what a user sees of the
folder (``state``): the virtual bytes of the disk, plus whatever the operation changes (a
parent locator, the files present). After a fault the state must equal the state before
the operation (old) or after it (new); ``state`` raises when the files do not open.

Disks are tiny (8 MiB, 1 MiB blocks, 512-byte sectors) so that a sweep over every fault
index stays fast.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import vhdx
import vhdx.ops.check
from support.chain import vhdx_files as disk_files
from support.disk import MiB, disk_bytes
from support.disk import nonzero_pattern as pattern
from support.faults import FaultPlan, merge_through, wrapping_writable_files
from vhdx.file.image import Image
from vhdx.ops.merge.run import read_journal
from vhdx.file.storage import FileStorage

SIZE = 8 * MiB
ERRNOS = (errno.EIO, errno.ENOSPC)


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file: a read-only open must leave them all as they are."""
    out = {}
    for p in folder.iterdir():
        os.utime(p, ns=(1, 1))
        out[p.name] = (p.stat().st_size, 1)
    return out


def stamps_now(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@dataclass
class Operation:
    name: str
    build: Callable[[Path], None]
    run: Callable[[Path, FaultPlan], None]
    state: Callable[[Path], Any]
    rerun_from_new: bool = True     # running it again on the new state is the same operation (idempotent)
    creates_files: bool = False     # create_image (not part of this change) lets a wrapper's OSError through


def _open_rw(path: Path, plan: FaultPlan):
    return vhdx.open(str(path), "r+", storage=plan.wrap(FileStorage(str(path), writable=True)))


# ------------------------------------------------------------------ a dynamic disk: block allocation

def build_dynamic(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with vhdx.create(str(folder / "base.vhdx"), SIZE, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(pattern(1, MiB + 4096), 0)
        d.pwrite(pattern(2, 65536), 5 * MiB + 128 * 1024)


def run_allocate(folder: Path, plan: FaultPlan) -> None:
    with _open_rw(folder / "base.vhdx", plan) as d:
        d.pwrite(pattern(3, 96 * 1024), 3 * MiB + 4096)      # block 3 is new


def state_dynamic(folder: Path) -> Any:
    return disk_bytes(folder / "base.vhdx")


# ------------------------------------------------------------------ a child: partial-block write

def build_child(folder: Path, parent_name: str = "parent.vhdx") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    parent = folder / parent_name
    with vhdx.create(str(parent), SIZE, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(pattern(4, 2 * MiB), 0)
    with vhdx.create(str(folder / "child.avhdx"), parent=str(parent), block_size=MiB) as d:
        d.pwrite(pattern(5, 65536), 5 * MiB + 128 * 1024)


def run_partial(folder: Path, plan: FaultPlan) -> None:
    with _open_rw(folder / "child.avhdx", plan) as d:    # one transaction: bitmap page, then BAT page
        d.pwrite(pattern(6, 8192), MiB + 512)                # over the parent's data: PARTIALLY_PRESENT


def state_child(folder: Path) -> Any:
    return disk_bytes(folder / "child.avhdx")


# ------------------------------------------------------------------ reparent to a shorter path

LONG_PARENT = "parent-disk-with-a-long-name-" + "x" * 60 + ".vhdx"


def build_reparent(folder: Path) -> None:
    build_child(folder, LONG_PARENT)
    shutil.copyfile(folder / LONG_PARENT, folder / "p.vhdx")   # the same disk under a short name


def run_reparent(folder: Path, plan: FaultPlan) -> None:
    with wrapping_writable_files(plan):
        vhdx.reparent(str(folder / "child.avhdx"), str(folder / "p.vhdx"))


def state_reparent(folder: Path) -> Any:
    im = Image.open(str(folder / "child.avhdx"))
    try:
        locator = dict(im.metadata.parent_locator or {})
    finally:
        im.close()
    # The absolute and volume paths name the folder, which differs between copies.
    same_everywhere = tuple((k, v) for k, v in sorted(locator.items()) if k not in ("absolute_win32_path",
                                                                                  "volume_path"))
    return tuple(sorted(locator)), same_everywhere, state_child(folder)


# ------------------------------------------------------------------ snapshot and create

def build_parent_only(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with vhdx.create(str(folder / "parent.vhdx"), SIZE, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(pattern(8, MiB), MiB)


def run_snapshot(folder: Path, plan: FaultPlan) -> None:
    with wrapping_writable_files(plan):
        vhdx.snapshot(str(folder / "parent.vhdx"))


def state_snapshot(folder: Path) -> Any:
    parent = folder / "parent.vhdx"
    children = [p for p in disk_files(folder) if p != parent]
    with open(parent, "rb") as f:
        parent_hash = hashlib.sha256(f.read()).hexdigest()
    return parent_hash, tuple(disk_bytes(c) for c in children)


def build_empty(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def run_create(folder: Path, plan: FaultPlan) -> None:
    with wrapping_writable_files(plan):
        vhdx.create(str(folder / "new.vhdx"), SIZE, block_size=MiB, logical_sector_size=512).close()


def state_create(folder: Path) -> Any:
    files = disk_files(folder)
    return tuple((p.name, disk_bytes(p)) for p in files)


# ------------------------------------------------------------------ merge

def build_merge(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.vhdx"
    with vhdx.create(str(base), SIZE, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(pattern(9, 3 * MiB), 0)
    child = vhdx.snapshot(str(base))
    os.rename(child, folder / "child.avhdx")
    with vhdx.open(str(folder / "child.avhdx"), "r+") as d:
        d.pwrite(pattern(10, MiB), 2 * MiB)                  # a whole block
        d.pwrite(pattern(11, 20000), 4 * MiB + 333)          # part of a block


def run_merge(folder: Path, plan: FaultPlan) -> None:
    merge_through(plan.wrap, str(folder / "child.avhdx"), str(folder / "base.vhdx"))
def state_merge(folder: Path) -> Any:
    """What the user's disk reads: through the child while it exists, else the merged base.

    The base's merge journal, when there is one, must parse: a torn journal is torn metadata
    (and makes a re-run start over or give up)."""
    im = Image.open(str(folder / "base.vhdx"))
    try:
        journal = read_journal(im)
    finally:
        im.close()
    if journal is not None and journal.get("state") not in ("copying", "copied", "done"):
        raise AssertionError(f"the merge journal in base.vhdx is torn: {journal!r}")
    child = folder / "child.avhdx"
    if child.exists():
        return True, state_child(folder)
    return False, state_dynamic(folder)


OPERATIONS = {
    "allocate": Operation("allocate", build_dynamic, run_allocate, state_dynamic),
    "child-partial": Operation("child-partial", build_child, run_partial, state_child),
    "reparent": Operation("reparent", build_reparent, run_reparent, state_reparent),
    "snapshot": Operation("snapshot", build_parent_only, run_snapshot, state_snapshot, rerun_from_new=False,
                          creates_files=True),
    "create": Operation("create", build_empty, run_create, state_create, rerun_from_new=False, creates_files=True),
    "merge": Operation("merge", build_merge, run_merge, state_merge),
}
