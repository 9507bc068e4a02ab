"""Writes gathered in memory and applied to a disk as one transaction (``vhdx mount --rw``).

The kernel hands a FUSE server small writes (a loop device's write-back: one 4 KiB page each), and
each :meth:`Disk.pwrite <vhdx.chains.disk.Disk.pwrite>` of a differencing disk is a logged
transaction with its flushes. :class:`WriteBuffer` keeps the writes as sorted, disjoint runs of
whole sectors (the edges of an unaligned write are read once, through the buffer, from the disk)
and :meth:`WriteBuffer.apply` writes them all with one
:meth:`Image.write_extents <vhdx.file.image.Image.write_extents>` call: data first, then one log
transaction for the BAT and sector bitmaps it changes. Reads see buffered bytes
(:meth:`WriteBuffer.overlay`). The mount applies at ``limit`` bytes, at every flush, fsync and
release, and at unmount; a kill of the server loses at most the writes not yet applied, and the
file is as the last applied transaction left it (the log replays it).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any

from ..chains.disk import Disk

LIMIT = 32 << 20    # bytes buffered before they are applied


class WriteBuffer:
    """Pending writes to ``disk``: sorted disjoint runs ``starts[i]`` -> ``runs[i]`` (whole sectors)."""

    def __init__(self, disk: Disk, limit: int = LIMIT) -> None:
        self.disk = disk
        self.limit = limit
        self.sector = disk.logical_sector_size
        self.starts: list[int] = []
        self.runs: list[bytearray] = []
        self.pending = 0           # bytes held
        self.applied = 0           # transactions applied (for tests and benchmarks)

    def __len__(self) -> int:
        return self.pending

    def write(self, data: Any, offset: int) -> None:
        """Hold ``data`` for ``offset`` (the caller checked that it lies inside the disk)."""
        view = memoryview(data).cast("B")
        if not view:
            return
        ss = self.sector
        start = offset - offset % ss
        end = -(-(offset + len(view)) // ss) * ss
        if start != offset or end != offset + len(view):
            whole = bytearray(end - start)
            self.read_into(memoryview(whole)[:ss], start)
            if end - ss > start:
                self.read_into(memoryview(whole)[len(whole) - ss:], end - ss)
            whole[offset - start:offset - start + len(view)] = view
            view = memoryview(whole)
        self._insert(start, view)

    def _insert(self, start: int, view: memoryview) -> None:
        """Put whole sectors at ``start``, joining the runs they overlap or touch."""
        end = start + len(view)
        i = bisect_left(self.starts, start)
        if i and self.starts[i - 1] + len(self.runs[i - 1]) >= start:
            i -= 1                                  # the run on the left reaches us: extend it
        j = bisect_right(self.starts, end)          # runs i..j-1 overlap or touch [start, end]
        if i == j:
            self.starts.insert(i, start)
            self.runs.insert(i, bytearray(view))
            self.pending += len(view)
            return
        first, last = self.starts[i], self.starts[j - 1]
        tail = self.runs[j - 1][end - last:] if last + len(self.runs[j - 1]) > end else b""
        self.pending -= sum(len(r) for r in self.runs[i:j])
        if first <= start:
            run = self.runs[i]
            del run[start - first:]
        else:
            run, first = bytearray(), start
        run += view
        run += tail
        self.starts[i:j] = [first]
        self.runs[i:j] = [run]
        self.pending += len(run)

    def overlay(self, view: memoryview, offset: int) -> None:
        """Copy the buffered bytes that fall in ``[offset, offset + len(view))`` over ``view``."""
        end = offset + len(view)
        i = max(0, bisect_right(self.starts, offset) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            s = self.starts[i]
            run = self.runs[i]
            a, b = max(s, offset), min(s + len(run), end)
            if b > a:
                view[a - offset:b - offset] = memoryview(run)[a - s:b - s]
            i += 1

    def read_into(self, view: memoryview, offset: int) -> None:
        """The disk's bytes as they will be once the buffer is applied."""
        self.disk.pread_into(view, offset)
        self.overlay(view, offset)

    def full(self) -> bool:
        """The buffer holds ``limit`` bytes or more: apply it."""
        return self.pending >= self.limit

    def apply(self) -> None:
        """Write every buffered run in one transaction and empty the buffer. On an error the
        buffer is emptied all the same (the writer refuses further writes; the caller says EIO)."""
        if not self.starts:
            return
        extents = [(s, len(r), memoryview(r)) for s, r in zip(self.starts, self.runs)]
        self.starts, self.runs, self.pending = [], [], 0
        self.disk.image.write_extents(extents)
        self.applied += 1
