"""The BAT, entry by entry: entries that point past the end of the file, into a structure or
at a block another entry also claims are dropped, and so are sector bitmaps in the same
state; the virtual ranges they held are reported lost (they read as the parent's, or zeros).

The BAT is read as its non-zero entries (:func:`vhdx.file.battable.scan`, file holes skipped)
and cleaned on that list: a 64 TiB disk's 512 MiB BAT costs memory for the entries it holds,
not for its size."""

from __future__ import annotations

import numpy as np

from ...file import battable
from ...file.storage import Storage
from ...format import bat as batmod
from ...format import constants as C
from ...format import layout
from ...format.geometry import Geometry
from ...format.records import RegionEntry
from .report import FOUND, LOST, REPAIRED, SalvageReport

NO_DATA_STATES = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
                  C.PAYLOAD_BLOCK_UNMAPPED_V095)
VALID_PAYLOAD_STATES = (C.PAYLOAD_BLOCK_NOT_PRESENT,) + NO_DATA_STATES + C.HOLDS_DATA


def held_entries(storage: Storage, region: RegionEntry, geometry: Geometry) -> int:
    """How many of the disk's BAT entries the region and the file really hold."""
    return min(geometry.bat_entries, region.length // 8, max(0, (storage.size() - region.file_offset) // 8))


def read_bat(storage: Storage, region: RegionEntry, geometry: Geometry) -> tuple[batmod.SparseBat, int]:
    """The BAT's non-zero entries (any the region or the file does not hold read as zeros)
    and how many entries the file really holds."""
    held = held_entries(storage, region, geometry)
    if not held:
        return batmod.sparse_piece(0, np.zeros(0, np.uint64), geometry), 0
    return battable.scan(storage, region.file_offset, held, geometry), held


def first_entries(storage: Storage, offset: int, count: int) -> np.ndarray:
    """The first ``count`` entries of a BAT at ``offset`` (zeros past the file), read where
    the file holds data: a zeroed array costs memory only where an entry is written."""
    out = np.zeros(count, np.uint64)
    for first, view in battable.pieces(storage, offset, count):
        out[first:first + view.size] = view
    return out


def kept_entries(storage: Storage, region: RegionEntry, geometry: Geometry) -> np.ndarray:
    """The raw entries of a differencing disk's last chunk past the disk's last block (from
    BAT index ``payload_bat_index(payload_blocks)``): no block uses them; an in-place repair
    leaves them as they are."""
    first = geometry.payload_bat_index(geometry.payload_blocks)
    stop = min(geometry.bat_entries - 1, held_entries(storage, region, geometry)) if geometry.has_parent else 0
    if stop <= first:
        return np.zeros(0, np.uint64)
    return batmod.decode_bat(storage.read(region.file_offset + 8 * first, 8 * (stop - first)))


def lookup(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, found)``: where each of ``wanted`` is in the sorted ``keys``."""
    pos = np.searchsorted(keys, wanted)
    found = pos < keys.size
    found[found] = keys[pos[found]] == wanted[found]
    return np.minimum(pos, max(keys.size - 1, 0)), found


class BatRepair:
    """Drops the BAT entries that cannot be trusted; ``bat`` is the clean BAT's non-zero entries."""

    def __init__(self, bat: batmod.SparseBat, geometry: Geometry, file_size: int, spans: list[layout.Span],
                 report: SalvageReport) -> None:
        self.g = geometry
        self.file_size = file_size
        self.spans = spans
        self.report = report
        self.dropped: list[str] = []
        self.blocks = bat.blocks.astype(np.int64)
        self.entries = bat.entries.astype(np.uint64)
        self.chunks = bat.chunks.astype(np.int64)
        self.sbm = bat.sbm_entries.astype(np.uint64)
        self.runs = (bat.run_starts, bat.run_stops, bat.run_states)
        self.lost: list[np.ndarray] = [np.zeros(0, np.int64)]  # blocks lost one by one
        self.lost_from = geometry.payload_blocks  # every block from here on is lost (no entry)

    @property
    def bat(self) -> batmod.SparseBat:
        """The BAT as it stands: the listed entries that are not zero, and the runs."""
        pay, sbm = self.entries != 0, self.sbm != 0
        return batmod.SparseBat(self.blocks[pay], self.entries[pay], self.chunks[sbm], self.sbm[sbm], -1, *self.runs)

    def run(self, held: int) -> None:
        """Clean the whole BAT; ``held`` entries were read from the file (the rest were not there)."""
        g = self.g
        if held < g.bat_entries:
            self.lost_from = min(g.payload_blocks, held - held // (g.chunk_ratio + 1))
            self.dropped.append(f"{g.payload_blocks - self.lost_from} entries past the end of the BAT region "
                                "or the file")
        self._payload_states()
        if g.has_parent:
            self._bitmaps()
        else:
            self.sbm[:] = 0
        self._overlaps()
        self._record()

    def _drop(self, rows: np.ndarray, why: str, *, lose: bool = True, sbm_rows: np.ndarray | None = None) -> None:
        """Zero the payload entries at ``rows`` (their blocks lost when ``lose``) and the
        sector-bitmap entries at ``sbm_rows`` (positions or masks in the lists)."""
        blocks = self.blocks[rows]
        n = blocks.size + (self.chunks[sbm_rows].size if sbm_rows is not None else 0)
        if n:
            self.entries[rows] = 0
            if sbm_rows is not None:
                self.sbm[sbm_rows] = 0
            self.dropped.append(f"{n} {why}")
        if lose:
            self.lost.append(blocks)

    def _payload_states(self) -> None:
        st = batmod.states(self.entries)
        bad = ~np.isin(st, VALID_PAYLOAD_STATES) | (batmod.reserved_bits(self.entries) != 0)
        self._drop(bad, "entries in an invalid state or with reserved bits set")
        st = batmod.states(self.entries)
        if not self.g.has_parent:
            partial = st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
            self.entries[partial] = (self.entries[partial] & ~np.uint64(7)) | np.uint64(C.PAYLOAD_BLOCK_FULLY_PRESENT)
            if partial.any():
                self.report.notes.append(f"{int(partial.sum())} PARTIALLY_PRESENT blocks in a disk without a parent "
                                         "were kept as FULLY_PRESENT")
        offs = batmod.file_offsets(self.entries).astype(np.int64)
        no_data = np.isin(st, NO_DATA_STATES) & (offs != 0)
        if no_data.any():
            self.lost.append(self.blocks[no_data])
            self.entries[no_data] &= np.uint64(C.BAT_STATE_MASK)
            self.dropped.append(f"{int(no_data.sum())} entries that read as zeros but point at data "
                                "(their content may be lost)")
        present = batmod.holds_data(st)
        outside = present & ((offs < C.HEADER_SECTION_SIZE) | (offs >= self.file_size))
        self._drop(outside, "blocks outside the file")

    def _bitmaps(self) -> None:
        st = batmod.states(self.sbm)
        offs = batmod.file_offsets(self.sbm).astype(np.int64)
        bad = ((st != C.SB_BLOCK_PRESENT) & (st != C.SB_BLOCK_NOT_PRESENT)) | (batmod.reserved_bits(self.sbm) != 0)
        bad |= (st == C.SB_BLOCK_PRESENT) & ((offs < C.HEADER_SECTION_SIZE) |
                                             (offs + C.SECTOR_BITMAP_BLOCK_SIZE > self.file_size))
        self._drop(np.zeros(self.blocks.size, dtype=bool), "sector bitmaps invalid or outside the file", lose=False,
                   sbm_rows=bad)
        self._orphan_partials()

    def _orphan_partials(self) -> None:
        """PARTIALLY_PRESENT blocks whose chunk has no sector bitmap: their sectors cannot be told apart."""
        partial = batmod.states(self.entries) == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        pos, found = lookup(self.chunks, self.blocks // self.g.chunk_ratio)
        sbm_ok = found & (batmod.states(self.sbm[pos]) == C.SB_BLOCK_PRESENT) if self.sbm.size else found
        self._drop(partial & ~sbm_ok, "partially present blocks without a sector bitmap")

    def _overlaps(self) -> None:
        """Drop blocks and bitmaps that overlap a structure or each other (both sides of a clash)."""
        alloc = layout.allocations_of(self.bat, self.g, bitmaps=self.g.has_parent)
        if not alloc.starts.size:
            return
        hit = np.zeros(alloc.starts.size, dtype=bool)
        for span in self.spans:
            hit[layout.rows_in(alloc, span)] = True
        order, hits = layout.clashes(alloc.starts, alloc.ends)
        if hits.size:
            ends = alloc.ends[order]
            running = np.maximum.accumulate(ends)
            owner = np.maximum.accumulate(np.where(ends == running, np.arange(ends.size), 0))
            hit[order[hits]] = True
            hit[order[owner[hits - 1]]] = True
        rows = np.flatnonzero(hit)
        if not rows.size:
            return
        owners = alloc.owners[rows]
        blocks, chunks = owners[owners >= 0], -1 - owners[owners < 0]
        self._drop(lookup(self.blocks, blocks)[0], "blocks or sector bitmaps that overlap a structure or each other",
                   sbm_rows=lookup(self.chunks, chunks)[0])
        if chunks.size:
            self._orphan_partials()

    def lost_runs(self) -> list[tuple[int, int]]:
        """The lost blocks as ``[first, stop)`` runs, in order, touching runs joined."""
        lost = np.unique(np.concatenate(self.lost))
        lost = lost[lost < self.lost_from]
        cut = np.flatnonzero(np.diff(lost) != 1) + 1
        firsts = lost[np.concatenate(([0], cut))] if lost.size else lost
        lasts = lost[np.concatenate((cut - 1, [lost.size - 1]))] if lost.size else lost
        runs = list(zip(firsts.tolist(), (lasts + 1).tolist()))
        if self.lost_from < self.g.payload_blocks:
            if runs and runs[-1][1] == self.lost_from:
                runs[-1] = (runs[-1][0], self.g.payload_blocks)
            else:
                runs.append((self.lost_from, self.g.payload_blocks))
        return runs

    def _record(self) -> None:
        bs = self.g.block_size
        runs = self.lost_runs()
        for first, stop in runs:
            self.report.lose(first * bs, stop * bs)
        offs = batmod.file_offsets(self.entries).astype(np.int64)
        present = batmod.holds_data(batmod.states(self.entries))
        short = present & (offs + bs > self.file_size)
        for k in np.flatnonzero(short)[:16].tolist():  # the part past the end of the file is lost
            block = int(self.blocks[k])
            self.report.lose(block * bs + self.file_size - int(offs[k]), (block + 1) * bs)
        valid = int(present.sum())
        all_lost = sum(b - a for a, b in runs) == self.g.payload_blocks
        if self.dropped and valid == 0 and all_lost:
            self.report.add("BAT", LOST, "no entry is valid: " + "; ".join(self.dropped))
            self.report.fail("the BAT is lost: no entry can be trusted, and blocks carry no identity to rebuild it "
                             "from")
        elif self.dropped:
            self.report.add("BAT", REPAIRED, "dropped " + "; ".join(self.dropped))
        else:
            self.report.add("BAT", FOUND, f"{valid} blocks hold data")
