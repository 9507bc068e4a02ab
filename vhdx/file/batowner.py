"""The BAT side of an :class:`~vhdx.file.image.Image`: loading, checking and the whole-disk views.

:class:`BatOwner` is the part of ``Image`` that holds the BAT (see :mod:`vhdx.file.battable`):
``bat`` (the mapped entries), ``sparse()`` (the non-zero entries, read in bounded chunks) and
the answers built from them. Writable opens check every entry before any write. A read-only
open checks none at open (the BAT may be 512 MiB: a 64 TiB disk that qemu-img filled with ZERO
entries; and a chain of 64 files should open in milliseconds): each entry is checked when a
read first uses it (:meth:`check_read_entry`), and the whole BAT as soon as anything asks a
whole-disk question (``sparse()``): no read ever uses an entry that was not checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CorruptError
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from ..format.records import RegionEntry
from . import battable, parsecache


class BatOwner:
    """The BAT of an image (mixed into :class:`~vhdx.file.image.Image`, which sets the rest)."""

    storage: Any
    path: str
    writable: bool
    geometry: Any
    header: Any
    region_table: list[RegionEntry]
    bat_region: RegionEntry
    bat: np.ndarray
    _sparse: batmod.SparseBat | None = None
    cache_key: Any = None
    bat_validated = False
    bat_lazy = False  # entries are checked as reads use them (large read-only BATs)
    checked_file_size = 0  # what lazy entry checks compare with: the file's size at open

    def load_bat(self, *, salvage: bool = False) -> None:
        """Map the BAT and check it: whole (writable opens), or lazily (read-only: see the module)."""
        self.adopt_bat(self.region(C.BAT_REGION_GUID), None, validated=False)
        if salvage:
            return
        if self.writable:
            self.validate_bat()
        else:
            self.bat_lazy, self.checked_file_size = True, self.storage.size()

    def region(self, guid: Any) -> RegionEntry:  # pragma: no cover - Image's
        """The region table entry of region ``guid``."""
        raise NotImplementedError

    def validate_bat(self) -> None:
        """Refuse entries that would make reads go outside the file (docs/format.md §5.3) and, for
        writing, invalid states or shared space (:mod:`vhdx.format.layout`), from :meth:`sparse`."""
        if self.bat_lazy:
            self.sparse()  # checks as it scans
        else:
            self._check(self.sparse())

    def _check(self, sparse: batmod.SparseBat) -> None:
        where = layout.BatPlace(self.bat_region.file_offset, self.path)
        battable.validate(sparse, self.geometry, self.storage.size(), where,
                          writing=(self.header, self.region_table) if self.writable else None)
        self.bat_validated = True

    def adopt_bat(self, region: RegionEntry, sparse: batmod.SparseBat | None, *, validated: bool) -> None:
        """Map the BAT region (privately: pages read when touched; or read it into memory), with
        ``sparse``, a stored scan of this unchanged file's BAT (:mod:`vhdx.file.parsecache`), if any."""
        length = battable.entries_length(region, self.geometry, self.path)
        self.bat_region = region
        self.bat = battable.map_entries(self.storage, region.file_offset, length)
        self._sparse, self.bat_validated = sparse, validated

    def check_read_entry(self, block: int, entry: int) -> None:
        """Before a read uses payload ``entry`` of a lazily checked BAT: refuse data outside the
        file as the whole-BAT check does; data that runs past the end needs the whole BAT (only
        the block last in the file may), so that check runs then."""
        start, size = entry & C.BAT_FILE_OFFSET_MASK, self.checked_file_size
        if start < C.HEADER_SECTION_SIZE or start >= size:
            index = self.geometry.payload_bat_index(block)
            raise CorruptError(f"BAT entry {index} (block {block}): data at 0x{start:x}, outside the {size}-byte file",
                               path=self.path, offset=self.bat_region.file_offset + 8 * index)
        if start + self.geometry.block_size > size:
            self.sparse()  # the whole-BAT check: only the block last in the file may run past the end

    def check_bitmap_entry(self, index: int, entry: int) -> None:
        """Before a read uses sector-bitmap ``entry`` (BAT index ``index``) of a lazily checked BAT."""
        start, size = entry & C.BAT_FILE_OFFSET_MASK, self.checked_file_size
        if start < C.HEADER_SECTION_SIZE or start + C.SECTOR_BITMAP_BLOCK_SIZE > size:
            raise CorruptError(f"BAT entry {index}: sector bitmap outside the {size}-byte file", path=self.path,
                               offset=self.bat_region.file_offset + 8 * index)

    @property
    def scanned(self) -> batmod.SparseBat | None:
        """The BAT's non-zero entries if they were scanned and are current, else None."""
        return self._sparse

    def sparse(self) -> batmod.SparseBat:
        """The BAT's non-zero entries (scanned in bounded chunks once, until the BAT changes);
        a lazily checked BAT is checked whole here, before anything uses the answer."""
        if self._sparse is None:
            sparse = battable.scan(self.storage, self.bat_region.file_offset, self.bat.size, self.geometry)
            if self.bat_lazy:
                self._check(sparse)  # raises, and reads go on checking entry by entry
                self.bat_lazy = False
            self._sparse = sparse
            if self.cache_key is not None:  # read-only, clean log: the next open takes it from the cache
                parsecache.put(self.cache_key, parsecache.parsed(self))
        return self._sparse

    def bat_changed(self) -> None:
        """Called by the writer after it changed :attr:`bat`: the next question rescans."""
        self._sparse = None

    def allocated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(blocks, file offsets, states)`` of the payload blocks that hold data (FULLY or
        PARTIALLY_PRESENT), sorted by block: proportional to the data, not the disk."""
        return battable.allocated(self.sparse())

    def count_states(self) -> tuple[dict[str, int], dict[str, int]]:
        """How many payload and sector-bitmap entries are in each state, by name."""
        return batmod.sparse_counts(self.sparse(), self.geometry)

    def payload_states(self) -> np.ndarray:
        """State of every payload block (uint8, one per block: as large as the disk; see :meth:`allocated`)."""
        return battable.dense_states(self.sparse(), 0, self.geometry.payload_blocks)[0]

    def payload_offsets(self) -> np.ndarray:
        """File offset of every payload block (uint64 array, 0 where none; as large as the disk)."""
        return battable.dense_states(self.sparse(), 0, self.geometry.payload_blocks)[1].astype(np.uint64)
