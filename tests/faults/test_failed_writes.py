"""An I/O error during a write never leaves torn metadata marked clean (docs/format.md §8.5, §8.7).

A transient ``EIO`` or ``ENOSPC`` (an ``OSError`` raised by the storage at its k-th write,
truncate or flush; the machine lives on, so every later call works) is injected at every index
k of each write operation: block allocation, a partial-block write in a child, snapshot,
reparent, create and merge (:mod:`operations`). After each:

* the error reached the caller as a ``VhdxError`` naming a file of the operation;
* the files open (a dirty log replayed, in memory) to the state before the operation or
  after it, never anything else, and the read-only open changed no file;
* ``vhdx check`` finds no error in any file (warnings, such as a dirty log, are fine);
* running the operation again (which replays the log on disk) gives the new state.

Before the fix, ``close()`` after a failed log apply cleared LogGuid, so a half-applied entry
(a reparent to a shorter path: the metadata table rewritten, the locator bytes not) stayed as
the file's metadata for good. ``VHDX_FAULT_SWEEP_ERRNOS=all`` adds EROFS, EFBIG and EDQUOT.
"""

from __future__ import annotations

import errno
import os
import re
import uuid
from pathlib import Path

import pytest

import vhdx
from operations import ERRNOS, OPERATIONS, Operation, stamps, stamps_now
from support.chain import check_problems, copy_folder
from support.disk import MiB, disk_bytes
from support.faults import FaultPlan
from vhdx.file.storage import FileStorage

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SWEEP_ERRNOS = ERRNOS + ((errno.EROFS, errno.EFBIG, errno.EDQUOT)
                         if os.environ.get("VHDX_FAULT_SWEEP_ERRNOS") == "all" else ())


def judge(op: Operation, work: Path, plan: FaultPlan, error: BaseException | None, old, new) -> list[str]:
    """Everything that must hold after one injected error; returns the problems."""
    problems = []
    if plan.raised is None:
        return [f"the fault never fired ({plan.calls} calls)"]
    if error is None:
        problems.append("the operation reported no error")
    elif not isinstance(error, vhdx.VhdxError):
        if not (op.creates_files and isinstance(error, OSError) and error.errno == plan.error):
            problems.append(f"{type(error).__name__} instead of a VhdxError: {error}")
    elif str(work) not in str(error):
        problems.append(f"the error names no file of the operation: {error}")
    before = stamps(work)
    try:
        state = op.state(work)
    except Exception as e:  # noqa: BLE001 - garbage is what this test looks for
        return problems + [f"the files do not open: {type(e).__name__}: {e}"]
    if stamps_now(work) != before:
        problems.append("a read-only open changed a file")
    if state not in (old, new):
        problems.append("the files read neither the old nor the new state")
    problems += check_problems(work)
    if state == old or op.rerun_from_new:
        try:
            op.run(work, FaultPlan(None))
            if op.state(work) != new:
                problems.append("re-running the operation does not give the new state")
        except Exception as e:  # noqa: BLE001
            problems.append(f"re-running the operation raised {type(e).__name__}: {e}")
        problems += [f"after the re-run: {p}" for p in check_problems(work)]
    return problems


def sweep(op: Operation, root: Path) -> tuple[int, int]:
    """Inject each errno at every call index of ``op``; returns (indices, runs)."""
    pristine = root / "pristine"
    op.build(pristine)
    old = op.state(pristine)
    counting = root / "counting"
    copy_folder(pristine, counting)
    plan = FaultPlan(None)
    op.run(counting, plan)
    new = op.state(counting)
    assert new != old or op.name == "merge", "the operation changes nothing"
    calls = plan.calls
    assert calls > 3, f"only {calls} calls counted: is the wrapper applied? {plan.history}"
    failures = []
    work = root / "work"
    for err in SWEEP_ERRNOS:
        for k in range(1, calls + 1):
            copy_folder(pristine, work)
            fp = FaultPlan(k, error=err)
            error = None
            try:
                op.run(work, fp)
            except Exception as e:  # noqa: BLE001 - judged below
                error = e
            problems = judge(op, work, fp, error, old, new)
            if problems:
                failures.append(f"{errno.errorcode[err]} at call {k}/{calls} ({plan.history[k - 1]}): "
                                + " | ".join(problems))
    print(f"{op.name}: fault indices tried: {calls} x {len(SWEEP_ERRNOS)} errnos = {calls * len(SWEEP_ERRNOS)} runs")
    assert not failures, f"{len(failures)} of {calls * len(SWEEP_ERRNOS)} runs fail:\n" + "\n".join(failures[:12])
    return calls, calls * len(SWEEP_ERRNOS)


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_io_error_at_every_call_leaves_old_or_new_state(name: str, scratch: Path) -> None:
    sweep(OPERATIONS[name], scratch)


# ------------------------------------------------------------------ the failed image itself

class FailAt(FaultPlan):
    """A transient error at the first call whose description matches ``pattern`` (after ``skip`` of them)."""

    def __init__(self, pattern: str, skip: int = 0, error: int = errno.EIO) -> None:
        super().__init__(None, error=error)
        self.pattern, self.skip = re.compile(pattern), skip

    def tick(self, what: str) -> bool:
        super().tick(what)
        if self.raised is None and self.pattern.search(what):
            if self.skip == 0:
                return True
            self.skip -= 1
        return False


BAT_PAGE = r"write 4096 bytes at 0x300000$"          # BAT page 0 (after its log entry)
METADATA_PAGE = r"write 4096 bytes at 0x2[0-9a-f]{5}$"  # a page of the metadata region (2 MiB)


def _log_guid(path: Path) -> uuid.UUID:
    im = vhdx.file.image.Image.open(str(path))
    try:
        return im.header.log_guid
    finally:
        im.close()


def test_failed_log_apply_keeps_the_log_dirty_and_refuses_more_writes(scratch: Path) -> None:
    """EIO on a page write after the log entry is durable: close() must leave LogGuid set."""
    OPERATIONS["allocate"].build(scratch)
    path = scratch / "base.vhdx"
    plan = FailAt(BAT_PAGE)
    disk = vhdx.open(str(path), "r+", storage=plan.wrap(FileStorage(str(path), writable=True)))
    new = b"\x77" * 8192
    with pytest.raises(vhdx.VhdxError) as info:
        disk.pwrite(new, 3 * MiB)
    assert plan.raised is not None and str(path) in str(info.value) and "0x300000" in str(info.value)
    assert disk.image.failed
    with pytest.raises(vhdx.VhdxError, match="earlier change failed") as again:
        disk.pwrite(new, 0)
    assert str(path) in str(again.value)
    disk.close()
    assert _log_guid(path) != uuid.UUID(int=0), "close() marked the log clean after a failed apply"
    assert disk_bytes(path)[3 * MiB:3 * MiB + 8192] == new   # the replay finishes the transaction
    assert not check_problems(scratch)


def test_eio_during_reparent_to_a_shorter_path_leaves_no_torn_locator(scratch: Path) -> None:
    """The issue's case: the metadata table is rewritten, the locator bytes are not, and
    close() used to mark that clean. Now the next open replays the whole entry."""
    op = OPERATIONS["reparent"]
    op.build(scratch)
    old = op.state(scratch)
    plan = FailAt(METADATA_PAGE, skip=1)   # the second metadata page of the entry
    with pytest.raises(vhdx.VhdxError) as info:
        op.run(scratch, plan)
    assert plan.raised is not None and "child.avhdx" in str(info.value)
    state = op.state(scratch)       # raises if the locator is torn
    assert state != old, "the durable log entry was not replayed"
    assert dict(state[1])["relative_path"].endswith("p.vhdx")
    assert not check_problems(scratch)


def test_failed_replay_on_a_writable_open_leaves_the_file_replayable(scratch: Path) -> None:
    """EIO while an "r+" open replays a dirty log: the open fails naming the file, the file
    still reads as replayed (in memory), and the next "r+" open replays it."""
    OPERATIONS["allocate"].build(scratch)
    path = scratch / "base.vhdx"
    crash = FailAt(BAT_PAGE)
    disk = vhdx.open(str(path), "r+", storage=crash.wrap(FileStorage(str(path), writable=True)))
    with pytest.raises(vhdx.VhdxError):
        disk.pwrite(b"\x55" * 4096, 3 * MiB)
    disk.close()
    expected = disk_bytes(path)
    for needle in (BAT_PAGE, "flush", r"write 4096 bytes at 0x10000$"):
        plan = FailAt(needle, skip=1 if needle == "flush" else 0)
        with pytest.raises(vhdx.VhdxError) as info:
            vhdx.open(str(path), "r+", storage=plan.wrap(FileStorage(str(path), writable=True)))
        assert plan.raised is not None and str(path) in str(info.value), needle
        assert disk_bytes(path) == expected, needle
    with vhdx.open(str(path), "r+") as d:
        assert d.pread(3 * MiB, 4096) == b"\x55" * 4096
    assert _log_guid(path) == uuid.UUID(int=0)
    assert not check_problems(scratch)


def test_disk_close_after_a_failed_write_inside_with_leaves_the_log_dirty(scratch: Path) -> None:
    """The Disk layer: an error inside ``with vhdx.open(..., "r+")`` closes the disk on the way
    out, and that close must not mark the log clean."""
    OPERATIONS["child-partial"].build(scratch)
    path = scratch / "child.avhdx"
    plan = FailAt(BAT_PAGE)     # the bitmap page is written, the BAT page is not
    with pytest.raises(vhdx.VhdxError):
        with vhdx.open(str(path), "r+", storage=plan.wrap(FileStorage(str(path), writable=True))) as d:
            d.pwrite(b"\x66" * 1024, 7 * MiB + 512)
    assert plan.raised is not None
    assert _log_guid(path) != uuid.UUID(int=0), "the Disk's close marked the log clean after a failed apply"
    assert disk_bytes(path)[7 * MiB + 512:7 * MiB + 1536] == b"\x66" * 1024
    assert not check_problems(scratch)
