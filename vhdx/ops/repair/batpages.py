"""The 4 KiB pages of the BAT region an in-place repair changes, found without holding the
BAT: the region is walked :data:`CHUNK` entries at a time, only where the file holds data
(the old entries) or the cleaned BAT has a non-zero entry (the new ones); each chunk's new
entries are laid out from the cleaned list into one reused array and compared page by page.

The pages are those the whole BAT, encoded and padded with zeros to a whole page, would
change: entries past the ones the disk counts, on its last page, become zeros."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ...file.battable import changed_pages as changed_pages_of
from ...file.storage import Storage
from ...format import bat as batmod
from ...format import constants as C
from ...format.geometry import Geometry, align_up

PAGE_ENTRIES = C.LOG_SECTOR_SIZE // 8
CHUNK = 1 << 17  # entries (1 MiB) compared at a time; a whole number of pages


def changed_pages(storage: Storage, offset: int, bat: batmod.SparseBat, kept: np.ndarray,
                  geometry: Geometry) -> dict[int, bytes]:
    """``{file offset: page}`` of the BAT at ``offset`` in ``storage`` that differ from the
    cleaned ``bat`` (with ``kept``, the raw entries of a differencing disk's last chunk past
    its last block, from :func:`~.batfix.kept_entries`)."""
    total = align_up(geometry.bat_entries * 8, C.LOG_SECTOR_SIZE) // 8
    layout = NewEntries(bat, kept, geometry)
    old = np.zeros(min(CHUNK, total), dtype="<u8")  # the file's bytes: little-endian on any host
    pages: dict[int, bytes] = {}
    for first in _chunks(storage, offset, total, layout):
        stop = min(total, first + CHUNK)
        pages.update(changed_pages_of(storage, offset, first, layout.entries(first, stop), old))
    return pages


def _chunks(storage: Storage, offset: int, total: int, layout: "NewEntries") -> Iterator[int]:
    """The first entry of each chunk that holds old data in the file or a new non-zero entry."""
    marks = np.zeros(-(-total // CHUNK) + 1, dtype=np.int64)
    spans = [((lo - offset) // 8, -(-(hi - offset) // 8)) for lo, hi in storage.data_ranges(offset, total * 8)]
    for lo, hi in spans + layout.index_spans():
        if hi > lo:
            marks[lo // CHUNK] += 1
            marks[(min(hi, total) - 1) // CHUNK + 1] -= 1
    for chunk in np.flatnonzero(np.cumsum(marks)[:-1] > 0).tolist():
        yield chunk * CHUNK


class NewEntries:
    """The cleaned BAT's entries, laid out by BAT index, a range at a time."""

    def __init__(self, bat: batmod.SparseBat, kept: np.ndarray, geometry: Geometry) -> None:
        self.bat = bat
        self.g = geometry
        self.kept = kept
        self.kept_at = geometry.payload_bat_index(geometry.payload_blocks)
        self.pay_idx = bat.payload_bat_indexes(geometry)
        self.sbm_idx = bat.sbm_bat_indexes(geometry)
        self.buf = np.zeros(CHUNK, np.uint64)

    def index_spans(self) -> list[tuple[int, int]]:
        """``[first, stop)`` BAT index ranges that may hold a non-zero new entry."""
        g, bat = self.g, self.bat
        spans: list[tuple[int, int]] = []
        for idx in (self.pay_idx, self.sbm_idx):
            spans += [(a, a + 1) for a in np.unique(idx // CHUNK * CHUNK).tolist()]
        spans += [(int(g.payload_bat_index(a)), int(g.payload_bat_index(b - 1)) + 1)
                  for a, b in zip(bat.run_starts.tolist(), bat.run_stops.tolist())]
        if np.any(self.kept):
            spans.append((self.kept_at, self.kept_at + self.kept.size))
        return spans

    def entries(self, first: int, stop: int) -> np.ndarray:
        """The new entries ``first`` to ``stop`` (at most :data:`CHUNK`; a reused buffer)."""
        g, bat = self.g, self.bat
        out = self.buf[:stop - first]
        out[:] = 0
        period = g.chunk_ratio + 1
        b0, b1 = first - first // period, stop - stop // period  # payload blocks in the range
        lo, hi = np.searchsorted(bat.run_stops, b0, side="right"), np.searchsorted(bat.run_starts, b1)
        for a, b, state in zip(bat.run_starts[lo:hi].tolist(), bat.run_stops[lo:hi].tolist(),
                               bat.run_states[lo:hi].tolist()):
            blocks = np.arange(max(a, b0), min(b, b1), dtype=np.int64)
            out[g.payload_bat_index(blocks) - first] = state
        for idx, values in ((self.pay_idx, bat.entries), (self.sbm_idx, bat.sbm_entries)):
            lo, hi = np.searchsorted(idx, [first, stop])
            out[idx[lo:hi] - first] = values[lo:hi]
        a, b = max(first, self.kept_at), min(stop, self.kept_at + self.kept.size)
        if b > a:
            out[a - first:b - first] = self.kept[a - self.kept_at:b - self.kept_at]
        return out
