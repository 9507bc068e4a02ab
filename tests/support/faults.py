"""The one fault-injecting Storage of the tests: power loss, transient I/O errors, recording.

A :class:`FaultPlan` is one simulated machine. Every file it wraps (:meth:`FaultPlan.wrap`,
the internal seam of ``vhdx.merge`` (:func:`merge_through`), or :func:`wrapping_writable_files` for the
operations that open their files themselves) shares one count of mutating calls (write,
truncate, flush). At the ``fail_at``-th call:

* by default the power is lost: that call fails with :class:`PowerLoss`, and so does every
  later call on any file. With ``drop_unflushed`` the failing call is carried out first (it may
  be torn) and then each file loses a random half of the 4 KiB pages it received since its last
  flush (a volatile disk cache; docs/format.md §7.4, §8.7);
* with ``error=errno.EIO`` (or ``ENOSPC``) that one call raises ``OSError(error)`` and the
  machine lives on: a write larger than 4 KiB lands torn (its first half, whole pages), and
  every later call works, as after a transient error of a real disk.

With ``record`` the plan keeps every mutating call (and every ``os.unlink`` made inside
:func:`recording_unlinks`) in :attr:`FaultPlan.ops`, for the power-loss prefix simulation:
:func:`record` runs an operation once that way, :func:`power_loss_prefixes` rebuilds the files
as every prefix of its calls would leave them (:func:`materialize`).
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import vhdx.file.create
import vhdx.file.image
import vhdx.ops.merge.run
from vhdx.ops.merge.cleanup import Wrap, wrapping_merge_storage
from vhdx.file.storage import Storage
from support.chain import copy_folder

PAGE = 4096


class PowerLoss(Exception):
    """The simulated machine lost power: this call and every later one fail."""


@dataclass(frozen=True)
class Op:
    """One recorded call: ``kind`` is "write" (``data`` at ``offset``), "truncate" (to ``offset``),
    "flush" or "unlink"."""

    kind: str
    path: str
    offset: int = 0
    data: bytes = b""


class FaultPlan:
    """One simulated machine: a shared count of mutating calls over every wrapped file."""

    PAGE = PAGE

    def __init__(self, fail_at: int | None = None, *, error: int | None = None, drop_unflushed: bool = False,
                 seed: int = 0, real_flush: bool = False, record: bool = False) -> None:
        self.fail_at = fail_at
        self.error = error
        self.drop_unflushed = drop_unflushed
        self.rng = random.Random(seed)
        self.real_flush = real_flush
        self.record = record
        self.calls = 0
        self.dead = False
        self.raised: OSError | None = None      # the transient error, once raised
        self.history: list[str] = []
        self.storages: list[FaultyStorage] = []
        self.ops: list[Op] = []

    def wrap(self, storage: Storage) -> Storage:
        """The wrapper for :func:`merge_through`: ``storage`` behind this plan."""
        return FaultyStorage(storage, self)

    def tick(self, what: str) -> bool:
        """Count a mutating call; True if this is the call that fails."""
        if self.dead:
            raise PowerLoss(f"storage is gone (power was lost earlier); refused: {what}")
        self.calls += 1
        self.history.append(what)
        if self.fail_at is None:
            return False
        if self.error:   # a transient error fails one call only
            return self.calls == self.fail_at
        return self.calls >= self.fail_at

    def lose_power(self, what: str) -> None:
        self.dead = True
        if self.drop_unflushed:
            for s in self.storages:
                s.drop_unflushed(self.rng)
        raise PowerLoss(f"power lost at call {self.calls} ({what})")

    def io_error(self, path: str) -> None:
        self.raised = OSError(self.error, os.strerror(self.error), path)
        raise self.raised


class FaultyStorage(Storage):
    """A Storage behind a :class:`FaultPlan` (a plan of its own when given ``fail_at`` instead)."""

    def __init__(self, inner: Storage, plan: FaultPlan | int | None = None, *, drop_unflushed: bool = False,
                 seed: int = 0) -> None:
        if not isinstance(plan, FaultPlan):
            plan = FaultPlan(plan, drop_unflushed=drop_unflushed, seed=seed)
        self.inner = inner
        self.plan = plan
        self.path = inner.path
        self.writable = inner.writable
        self._unflushed: list[tuple] = []   # ("w", offset, old, new) / ("t", old_size, old_tail, new_size)
        self._durable_size = inner.size()
        plan.storages.append(self)

    # -- what the single-file tests look at
    @property
    def calls(self) -> int:
        return self.plan.calls

    @property
    def history(self) -> list[str]:
        return self.plan.history

    @property
    def dead(self) -> bool:
        return self.plan.dead

    def _alive(self) -> None:
        if self.plan.dead:
            raise PowerLoss("storage is gone (power was lost earlier)")

    def _record(self, kind: str, offset: int = 0, data: bytes = b"") -> None:
        if self.plan.record:
            self.plan.ops.append(Op(kind, os.path.abspath(self.path), offset, data))

    # -- Storage interface
    def readinto(self, buf, offset: int) -> int:
        self._alive()
        return self.inner.readinto(buf, offset)

    def size(self) -> int:
        self._alive()
        return self.inner.size()

    def fileno(self):
        return None  # no fast paths around the wrapper

    def write(self, data, offset: int) -> None:
        data = bytes(data)
        what = f"{os.path.basename(self.path)}: write {len(data)} bytes at 0x{offset:x}"
        fail = self.plan.tick(what)
        if fail and self.plan.error:
            torn = len(data) // 2 // PAGE * PAGE
            if torn:
                self.inner.write(data[:torn], offset)
            self.plan.io_error(self.path)
        if fail and not self.plan.drop_unflushed:
            self.plan.lose_power(what)
        if self.plan.drop_unflushed:
            self._unflushed.append(("w", offset, self.inner.read(offset, len(data)), data))
        self.inner.write(data, offset)
        self._record("write", offset, data)
        if fail:   # the write may have landed (or been torn) before the power went
            self.plan.lose_power(what)

    def truncate(self, size: int) -> None:
        what = f"{os.path.basename(self.path)}: truncate to 0x{size:x}"
        fail = self.plan.tick(what)
        if fail and self.plan.error:
            self.plan.io_error(self.path)
        if fail and not self.plan.drop_unflushed:
            self.plan.lose_power(what)
        if self.plan.drop_unflushed:
            old_size = self.inner.size()
            old_tail = self.inner.read(size, old_size - size) if size < old_size else b""
            self._unflushed.append(("t", old_size, old_tail, size))
        self.inner.truncate(size)
        self._record("truncate", size)
        if fail:
            self.plan.lose_power(what)

    def flush(self) -> None:
        what = f"{os.path.basename(self.path)}: flush"
        if self.plan.tick(what):
            if self.plan.error:
                self.plan.io_error(self.path)
            self.plan.lose_power(what)
        if self.plan.real_flush:
            self.inner.flush()
        self._record("flush")
        self._unflushed.clear()
        self._durable_size = self.inner.size()

    def close(self) -> None:
        self.inner.close()      # closing persists nothing; always allowed

    def drop_unflushed(self, rng: random.Random) -> None:
        """Back to the last flushed state, then a random subset of the later pages lands."""
        if not self._unflushed:
            return
        fd = os.open(self.path, os.O_RDWR)
        try:
            for op in reversed(self._unflushed):
                if op[0] == "w":
                    _, offset, old, _new = op
                    os.pwrite(fd, old, offset)
                else:
                    _, old_size, old_tail, _new = op
                    os.ftruncate(fd, old_size)
                    if old_tail:
                        os.pwrite(fd, old_tail, old_size - len(old_tail))
            os.ftruncate(fd, self._durable_size)
            for op in self._unflushed:
                if op[0] == "w":
                    _, offset, _old, new = op
                    _write_random_pages(fd, new, offset, rng)
                elif rng.random() < 0.5:
                    os.ftruncate(fd, op[3])
        finally:
            os.close(fd)
        self._unflushed.clear()


def _write_random_pages(fd: int, data: bytes, offset: int, rng: random.Random) -> None:
    """Write each 4 KiB page of ``data`` (at ``offset``) with probability 1/2."""
    pos = offset
    while pos < offset + len(data):
        end = min(offset + len(data), (pos // PAGE + 1) * PAGE)
        if rng.random() < 0.5:
            os.pwrite(fd, data[pos - offset:end - offset], pos)
        pos = end


def merge_through(wrap: Wrap, *args, **kwargs):
    """``vhdx.merge(*args, **kwargs)`` with every file it writes opened through ``wrap`` (a plan's ``wrap``)."""
    with wrapping_merge_storage(wrap):
        return vhdx.ops.merge.run.merge(*args, **kwargs)


@contextlib.contextmanager
def wrapping_writable_files(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Route every file that ``vhdx.file.image`` and ``vhdx.file.create`` open for writing through ``plan`` (for reparent,
    create and snapshot, which take no storage argument); read-only opens stay unwrapped."""
    modules = (vhdx.file.image, vhdx.file.create)
    real = vhdx.file.image.FileStorage

    def make(path, writable: bool = False, **kwargs):
        storage = real(path, writable, **kwargs)
        return plan.wrap(storage) if writable else storage

    for module in modules:
        module.FileStorage = make
    try:
        yield plan
    finally:
        for module in modules:
            module.FileStorage = real


@contextlib.contextmanager
def recording_unlinks(plan: FaultPlan) -> Iterator[FaultPlan]:
    """Record every ``os.unlink`` (a merge deleting its sources) as an "unlink" op of ``plan``."""
    real = os.unlink

    def unlink(path, *args, **kwargs):
        real(path, *args, **kwargs)
        dir_fd = kwargs.get("dir_fd")
        folder = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.getcwd()
        plan.ops.append(Op("unlink", os.path.join(folder, os.fspath(path))))

    os.unlink = unlink
    try:
        yield plan
    finally:
        os.unlink = real


def materialize(ops: list[Op], cut: int, originals: dict[str, bytes], rng: random.Random) -> dict[str, bytes | None]:
    """The files after a power loss just before ``ops[cut]``: per file, every write and
    truncate before its last completed flush, then each later write's 4 KiB pages and each later
    truncate with probability 1/2, in order. An unlink removes the file (None). Files the ops
    never touch are left out."""
    last_flush: dict[str, int] = {}
    for i, op in enumerate(ops[:cut]):
        if op.kind == "flush":
            last_flush[op.path] = i
    files: dict[str, bytearray | None] = {p: bytearray(originals[p]) for p in {op.path for op in ops[:cut]}
                                          if p in originals}
    for i, op in enumerate(ops[:cut]):
        buf = files.get(op.path)
        if op.kind == "unlink":
            files[op.path] = None
            continue
        if buf is None or op.kind == "flush":
            continue
        durable = i < last_flush.get(op.path, -1)
        if op.kind == "truncate":
            if durable or rng.random() < 0.5:
                del buf[op.offset:]
                buf.extend(bytes(op.offset - len(buf)))
            continue
        pos = op.offset
        end = op.offset + len(op.data)
        while pos < end:
            stop = min(end, (pos // PAGE + 1) * PAGE)
            if durable or rng.random() < 0.5:
                if len(buf) < stop:
                    buf.extend(bytes(stop - len(buf)))
                buf[pos:stop] = op.data[pos - op.offset:stop - op.offset]
            pos = stop
    return {p: (bytes(b) if b is not None else None) for p, b in files.items()}


@dataclass(frozen=True)
class Recording:
    """An operation's mutating calls, recorded on a copy (``recorded``) of its ``pristine`` folder."""

    pristine: Path
    recorded: Path
    originals: dict[str, bytes]
    ops: list[Op]


def record(pristine: Path, recorded: Path, run: Callable[[Path, FaultPlan], None]) -> Recording:
    """Copy ``pristine`` to ``recorded`` and ``run(recorded, plan)`` once with a recording plan;
    ``run`` routes the files it writes through the plan (:func:`wrapping_writable_files`,
    :func:`merge_through`, :func:`recording_unlinks`)."""
    copy_folder(pristine, recorded)
    originals = {os.path.abspath(p): p.read_bytes() for p in recorded.iterdir()}
    plan = FaultPlan(None, record=True)
    run(recorded, plan)
    return Recording(pristine, recorded, originals, plan.ops)


def power_loss_prefixes(rec: Recording, work: Path, seeds: int = 1) -> Iterator[str]:
    """For every cut point (none of the calls made, ..., all of them) and ``seeds`` random subsets
    of each file's unflushed pages: lay ``work`` out as the files would be after a power loss
    there (the pristine folder, the touched files materialized, unlinked ones removed) and yield
    where it was cut, for messages."""
    ops = rec.ops
    for cut in range(len(ops) + 1):
        for seed in range(seeds):
            copy_folder(rec.pristine, work)
            for path, data in materialize(ops, cut, rec.originals, random.Random(cut * 1000 + seed)).items():
                target = work / Path(path).relative_to(rec.recorded)
                if data is None:
                    target.unlink()
                else:
                    target.write_bytes(data)
            after = f" (after {ops[cut - 1].kind} of {Path(ops[cut - 1].path).name})" if cut else ""
            yield f"cut {cut}/{len(ops)} seed {seed}{after}"

