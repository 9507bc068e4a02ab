"""The BAT, entry by entry: entries that point past the end of the file, into a structure or
at a block another entry also claims are dropped, and so are sector bitmaps in the same
state; the virtual ranges they held are reported lost (they read as the parent's, or zeros)."""

from __future__ import annotations

import numpy as np

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


def read_bat(storage: Storage, region: RegionEntry, geometry: Geometry) -> tuple[np.ndarray, int]:
    """The BAT's entries (as many as the disk needs; zeros for any the region or the file
    does not hold) and how many of them the file really holds."""
    needed = geometry.bat_entries
    bat = np.zeros(needed, dtype="<u8")
    held = min(needed, region.length // 8, max(0, (storage.size() - region.file_offset) // 8))
    if held:
        raw = storage.read(region.file_offset, held * 8)
        bat[:held] = batmod.decode_bat(raw)
    return bat, held


class BatRepair:
    """Drops the BAT entries that cannot be trusted; ``bat`` ends up clean."""

    def __init__(self, bat: np.ndarray, geometry: Geometry, file_size: int, spans: list[layout.Span],
                 report: SalvageReport) -> None:
        self.bat = bat
        self.g = geometry
        self.file_size = file_size
        self.spans = spans
        self.report = report
        self.dropped: list[str] = []
        self.lost_blocks = np.zeros(geometry.payload_blocks, dtype=bool)

    def run(self, held: int) -> None:
        """Clean the whole BAT; ``held`` entries were read from the file (the rest were not there)."""
        g = self.g
        pidx = batmod.payload_indices(g)
        if held < g.bat_entries:
            missing = pidx >= held
            self.lost_blocks |= missing
            self.dropped.append(f"{int(missing.sum())} entries past the end of the BAT region or the file")
        self._payload_states(pidx)
        if g.has_parent:
            self._bitmaps()
        else:
            self.bat[batmod.sbm_indices(g)] = 0
        self._overlaps()
        self._record(pidx)

    def _drop(self, bat_indexes: np.ndarray, why: str, *, lose: np.ndarray | None = None) -> None:
        if bat_indexes.size:
            self.bat[bat_indexes] = 0
            self.dropped.append(f"{bat_indexes.size} {why}")
        if lose is not None:
            self.lost_blocks[lose] = True

    def _payload_states(self, pidx: np.ndarray) -> None:
        entries = self.bat[pidx]
        st = batmod.states(entries)
        bad = ~np.isin(st, VALID_PAYLOAD_STATES) | (batmod.reserved_bits(entries) != 0)
        self._drop(pidx[bad], "entries in an invalid state or with reserved bits set", lose=bad)
        st = batmod.states(self.bat[pidx])
        if not self.g.has_parent:
            partial = st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
            self.bat[pidx[partial]] = (self.bat[pidx[partial]] & ~np.uint64(7)) | np.uint64(C.PAYLOAD_BLOCK_FULLY_PRESENT)
            if partial.any():
                self.report.notes.append(f"{int(partial.sum())} PARTIALLY_PRESENT blocks in a disk without a parent "
                                         "were kept as FULLY_PRESENT")
        offs = batmod.file_offsets(self.bat[pidx]).astype(np.int64)
        no_data = np.isin(st, NO_DATA_STATES) & (offs != 0)
        if no_data.any():
            self.lost_blocks |= no_data
            self.bat[pidx[no_data]] &= np.uint64(C.BAT_STATE_MASK)
            self.dropped.append(f"{int(no_data.sum())} entries that read as zeros but point at data "
                                "(their content may be lost)")
        present = batmod.holds_data(st)
        outside = present & ((offs < C.HEADER_SECTION_SIZE) | (offs >= self.file_size))
        self._drop(pidx[outside], "blocks outside the file", lose=outside)

    def _bitmaps(self) -> None:
        g = self.g
        sidx = batmod.sbm_indices(g)
        entries = self.bat[sidx]
        st = batmod.states(entries)
        offs = batmod.file_offsets(entries).astype(np.int64)
        bad = ((st != C.SB_BLOCK_PRESENT) & (st != C.SB_BLOCK_NOT_PRESENT)) | (batmod.reserved_bits(entries) != 0)
        bad |= (st == C.SB_BLOCK_PRESENT) & ((offs < C.HEADER_SECTION_SIZE) |
                                             (offs + C.SECTOR_BITMAP_BLOCK_SIZE > self.file_size))
        self._drop(sidx[bad], "sector bitmaps invalid or outside the file")
        self._orphan_partials()

    def _orphan_partials(self) -> None:
        """PARTIALLY_PRESENT blocks whose chunk has no sector bitmap: their sectors cannot be told apart."""
        g = self.g
        pidx = batmod.payload_indices(g)
        partial = batmod.states(self.bat[pidx]) == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        sbm_ok = batmod.states(self.bat[batmod.sbm_indices(g)]) == C.SB_BLOCK_PRESENT
        chunk_of = np.arange(g.payload_blocks) // g.chunk_ratio
        orphan = partial & ~sbm_ok[chunk_of]
        self._drop(pidx[orphan], "partially present blocks without a sector bitmap", lose=orphan)

    def _overlaps(self) -> None:
        """Drop blocks and bitmaps that overlap a structure or each other (both sides of a clash)."""
        alloc = layout.allocations(self.bat, self.g, bitmaps=self.g.has_parent)
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
        blocks = owners[owners >= 0]
        self._drop(alloc.bat_indexes[rows], "blocks or sector bitmaps that overlap a structure or each other",
                   lose=blocks)
        if (owners < 0).any():
            self._orphan_partials()

    def _record(self, pidx: np.ndarray) -> None:
        bs = self.g.block_size
        lost = np.concatenate(([False], self.lost_blocks, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(lost))
        for first, stop in zip(edges[0::2].tolist(), edges[1::2].tolist()):  # runs of lost blocks
            self.report.lose(first * bs, stop * bs)
        entries = self.bat[pidx]
        offs = batmod.file_offsets(entries).astype(np.int64)
        short = batmod.holds_data(batmod.states(entries)) & (offs + bs > self.file_size)
        for k in np.flatnonzero(short)[:16].tolist():  # the part past the end of the file is lost
            self.report.lose(k * bs + self.file_size - int(offs[k]), (k + 1) * bs)
        st = batmod.states(entries)
        valid = int(batmod.holds_data(st).sum())
        if self.dropped and valid == 0 and self.lost_blocks.all():
            self.report.add("BAT", LOST, "no entry is valid: " + "; ".join(self.dropped))
            self.report.fail("the BAT is lost: no entry can be trusted, and blocks carry no identity to rebuild it "
                             "from")
        elif self.dropped:
            self.report.add("BAT", REPAIRED, "dropped " + "; ".join(self.dropped))
        else:
            self.report.add("BAT", FOUND, f"{valid} blocks hold data")
