"""compact punches the zero blocks beyond the file's future end out of the host file while it
scans (vhdx/file/holes.py), before it writes anything. A hole reads zeros, so the file must read
the same after any number of punches: here compact is stopped after each punch in turn (the
next punch refused, the first write never made), and the file must open with the same content,
pass ``vhdx check``, and a re-run must finish; then a fault at every write index of the compact
that follows the punches (tests/ops/test_maint_faults.py runs its scenarios without punches:
the fault-injecting storage has no descriptor, so no fast path is taken).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import vhdx
from support.chain import check_problems, copy_folder
from support.disk import MiB, disk_bytes, nonzero_pattern
from support.faults import FaultPlan, wrapping_writable_files
from support.maintenance import packed_size
from support.needs import need
from vhdx.file import holes
from vhdx.ops import compact as compact_module

BLOCKS = 16


class Stop(Exception):
    """Stands for the process dying after the punches."""


def build(folder: Path) -> Path:
    """16 blocks of 1 MiB: data in 0, 2, 4, 6 and 12; zeros written as data elsewhere."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "base.vhdx"
    with vhdx.create(path, BLOCKS * MiB, block_size=MiB) as d:
        for b in range(BLOCKS):
            d.pwrite(nonzero_pattern(b + 1, MiB) if b in (0, 2, 4, 6, 12) else bytes(MiB), b * MiB)
    return path


def holes_in(path: Path) -> int:
    """Bytes of holes below the end of the host file."""
    size, found, pos = path.stat().st_size, 0, 0
    with open(path, "rb") as f:
        fd = f.fileno()
        while pos < size:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                break
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = size
            found += data - hole
            pos = data
    return found


def stop_after_punches(path: Path, monkeypatch: pytest.MonkeyPatch, allowed: int) -> int:
    """Run compact until its first write, letting ``allowed`` punches through; how many were made."""
    made = []
    real = holes.punch_hole

    def punch(fd: int, offset: int, length: int) -> None:
        if len(made) >= allowed:
            raise OSError(errno.EIO, "stopped here")
        real(fd, offset, length)
        made.append(offset)

    def first_write(*args: object, **kwargs: object) -> None:
        raise Stop()

    with monkeypatch.context() as m:
        m.setattr(holes, "punch_hole", punch)
        m.setattr(compact_module, "commit_entries", first_write)
        with pytest.raises(Stop):
            vhdx.compact(path)
    return len(made)


def test_compact_punches_the_zero_blocks_past_its_end_and_nothing_else(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = build(tmp_path)
    need(holes.can_punch(), "no fallocate (PUNCH_HOLE) on this host")
    before = disk_bytes(path)
    made = stop_after_punches(path, monkeypatch, allowed=1 << 30)
    assert made >= 3, f"only {made} punches"            # blocks 7-11 and 13-15 lie past the end (5 blocks)
    assert holes_in(path) >= made * MiB
    assert disk_bytes(path) == before
    assert not check_problems(path.parent)


def test_a_stop_after_any_punch_leaves_the_same_disk_and_a_rerun_finishes(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pristine = build(tmp_path / "pristine").parent
    before = disk_bytes(pristine / "base.vhdx")
    work = tmp_path / "work"
    copy_folder(pristine, work)
    total = stop_after_punches(work / "base.vhdx", monkeypatch, allowed=1 << 30)
    failures = []
    for allowed in range(total + 1):
        copy_folder(pristine, work)
        made = stop_after_punches(work / "base.vhdx", monkeypatch, allowed)
        failures += same_and_finishes(work, before, f"stopped after {made} of {total} punches")
    assert not failures, "\n".join(failures)


def same_and_finishes(work: Path, before: bytes, where: str) -> list[str]:
    """What is wrong with ``work/base.vhdx`` after a stopped compact: its content must be
    ``before``, ``vhdx check`` must pass, and a re-run must finish the compact."""
    failures = []
    if disk_bytes(work / "base.vhdx") != before:
        failures.append(f"{where}: the content changed")
    failures += [f"{where}: {p}" for p in check_problems(work)]
    vhdx.compact(work / "base.vhdx")
    size, used = packed_size(work / "base.vhdx")
    if disk_bytes(work / "base.vhdx") != before or size != used:
        failures.append(f"{where}: the re-run does not finish ({size} bytes, {used} in use)")
    return failures


@pytest.mark.parametrize("mode", ["power-loss", "eio"])
def test_a_fault_at_every_write_of_the_compact_after_the_punches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                mode: str) -> None:
    pristine = build(tmp_path / "pristine").parent
    before = disk_bytes(pristine / "base.vhdx")
    stop_after_punches(pristine / "base.vhdx", monkeypatch, allowed=1 << 30)
    probe = tmp_path / "probe"
    copy_folder(pristine, probe)
    plan = FaultPlan(None)
    with wrapping_writable_files(plan):
        vhdx.compact(probe / "base.vhdx")
    calls, work, failures = plan.calls, tmp_path / "work", []
    assert calls > 5
    for fail_at in range(1, calls + 1):
        copy_folder(pristine, work)
        with pytest.raises(Exception):
            with wrapping_writable_files(FaultPlan(fail_at, error=None if mode == "power-loss" else errno.EIO)):
                vhdx.compact(work / "base.vhdx")
        failures += same_and_finishes(work, before, f"{mode} at call {fail_at}/{calls}")
    assert not failures, "\n".join(failures[:12])


def test_ordered_map_keeps_the_order_raises_at_the_item_and_stops_its_threads() -> None:
    import threading
    import time

    from vhdx.ops.maintenance import ordered_map

    def slow_square(x: int) -> int:
        time.sleep(0.001 * (x % 3))
        if x == 7:
            raise ValueError("seven")
        return x * x

    assert list(ordered_map(slow_square, range(7), workers=3)) == [x * x for x in range(7)]
    got = []
    with pytest.raises(ValueError, match="seven"):
        for value in ordered_map(slow_square, range(20), workers=2):
            got.append(value)
    assert got == [x * x for x in range(7)]
    assert not [t for t in threading.enumerate() if t.name == "vhdx-scan"]
