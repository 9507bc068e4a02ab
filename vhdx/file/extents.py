"""Writing extents: one transaction of data and the metadata that points at it (§7.2 - §7.4).

The :class:`~vhdx.file.writer.Writer` hands each ``write_extents`` call here: the extents are
split at block boundaries (:func:`split_extents`), then a :class:`Transaction` plans the
allocations, allocates them in one go at the end of the file, copies the data, marks the
sector bitmaps and commits the bitmaps and the BAT through one log transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..format import bat as batmod
from ..format import bitmap as bitmapmod
from ..format import constants as C
from ..format.geometry import as_offset
from .copy import Copier, Progress
from .storage import Storage

if TYPE_CHECKING:
    from .image import Image
    from .writer import Writer

Extent = tuple[int, int, Any]  # (virtual_offset, length, buffer | (storage, file_offset) | None)
Part = tuple[int, int, Any, int]  # (offset in block, length, source, bytes of the source to skip)


def split_extents(image: "Image", extents: list[Extent]) -> dict[int, list[Part]]:
    """Check each extent and split it at block boundaries: per block, its parts."""
    bs, ss, size, path = image.block_size, image.logical_sector_size, image.size, image.path
    per_block: dict[int, list[Part]] = {}
    for offset, length, source in extents:
        offset, length = as_offset(offset, "offset", path), as_offset(length, "length", path)
        if length == 0 or offset + length > size:
            raise UsageError(f"extent of {length} bytes at {offset} is outside the {size}-byte disk", path=path)
        if image.has_parent and (offset % ss or length % ss):
            raise UsageError("differencing writes must be sector aligned", path=path)
        done = 0
        while done < length:
            block, in_block = divmod(offset + done, bs)
            n = min(bs - in_block, length - done)
            per_block.setdefault(block, []).append((in_block, n, source, done))
            done += n
    return per_block


class PendingBat:
    """BAT entries changed by a transaction, read through to the live BAT for the rest."""

    def __init__(self, bat: np.ndarray) -> None:
        self.bat = bat
        self.changes: dict[int, int] = {}

    def __getitem__(self, idx: int) -> int:
        """The entry as the transaction leaves it."""
        return self.changes.get(idx, int(self.bat[idx]))

    def __setitem__(self, idx: int, entry: int) -> None:
        """Change an entry (in the transaction only)."""
        self.changes[int(idx)] = int(entry)


@dataclass
class Transaction:
    """One write_extents call (docs/format.md §7.2 - §7.4), in named steps: plan the
    allocations, allocate, copy the data, mark the sector bitmaps, commit (:meth:`run`)."""

    writer: "Writer"
    per_block: dict[int, list[Part]]
    bat: PendingBat = field(init=False)
    new_blocks: list[tuple[int, int]] = field(default_factory=list)  # (block, state)
    new_chunks: list[int] = field(default_factory=list)  # chunks that need a sector bitmap
    fresh: set[int] = field(default_factory=set)  # blocks allocated by this transaction

    @property
    def blocks(self) -> list[int]:
        """The blocks written, in order."""
        return sorted(self.per_block)

    def __post_init__(self) -> None:
        self.bat = PendingBat(self.writer.image.bat)  # changes stay aside until the log has them

    def run(self, progress: Progress | None) -> None:
        """Every step, in order."""
        self.plan_allocations()
        self.allocate()
        self.copy_data(progress)
        self.commit(self.mark_bitmaps())

    def plan_allocations(self) -> None:
        """Which blocks need space (and in which state), which become ZERO; then the bitmaps."""
        image = self.writer.image
        g, size = image.geometry, image.size
        for block in self.blocks:
            parts = self.per_block[block]
            state = self.bat[g.payload_bat_index(block)] & C.BAT_STATE_MASK
            if batmod.holds_data(state):
                continue
            whole = sum(p[1] for p in parts) >= min(g.block_size, size - block * g.block_size)
            all_zero = all(p[2] is None for p in parts)
            falls_through = image.has_parent and state == C.PAYLOAD_BLOCK_NOT_PRESENT
            if all_zero and not falls_through:
                continue  # the block already reads as zeros
            if all_zero and whole:
                self.bat[g.payload_bat_index(block)] = batmod.make_entry(C.PAYLOAD_BLOCK_ZERO, 0)
            elif falls_through and not whole:
                self.new_blocks.append((block, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
            else:
                self.new_blocks.append((block, C.PAYLOAD_BLOCK_FULLY_PRESENT))
        self.plan_bitmaps()

    def plan_bitmaps(self) -> None:
        """The chunks whose new partial blocks need a sector bitmap they do not have yet."""
        g = self.writer.image.geometry
        for block, state in self.new_blocks:
            chunk = block // g.chunk_ratio
            if state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT and chunk not in self.new_chunks and \
                    self.bat[g.sbm_bat_index(chunk)] & C.BAT_STATE_MASK != C.SB_BLOCK_PRESENT:
                self.new_chunks.append(chunk)

    def allocate(self) -> None:
        """Space for the new sector bitmaps and blocks, in one go at the end of the file."""
        g = self.writer.image.geometry
        need = len(self.new_blocks) * g.block_size + len(self.new_chunks) * C.SECTOR_BITMAP_BLOCK_SIZE
        if not need:
            return
        at = self.writer.allocate(need)
        for chunk in self.new_chunks:
            self.bat[g.sbm_bat_index(chunk)] = batmod.make_entry(C.SB_BLOCK_PRESENT, at)
            at += C.SECTOR_BITMAP_BLOCK_SIZE
        for block, state in self.new_blocks:
            self.bat[g.payload_bat_index(block)] = batmod.make_entry(state, at)
            self.fresh.add(block)
            at += g.block_size

    def copy_data(self, progress: Progress | None) -> None:
        """Write or copy the data into its blocks; copies contiguous on both sides go as one."""
        copies: list[list[Any]] = []  # [src_storage, src_offset, dst_offset, length]
        for block in self.blocks:
            entry = self.bat[self.writer.image.geometry.payload_bat_index(block)]
            if not batmod.holds_data(entry & C.BAT_STATE_MASK):
                continue
            base = entry & C.BAT_FILE_OFFSET_MASK
            for in_block, n, source, skip in self.per_block[block]:
                dst = base + in_block
                if source is None:
                    if block not in self.fresh:
                        self.writer.write_zeros(dst, n)
                elif isinstance(source, tuple):
                    _add_copy(copies, source, skip, dst, n)
                else:
                    self.writer.write(source[skip:skip + n], dst)
        if copies:
            if self.writer.copier is None:
                self.writer.copier = Copier(self.writer.storage)
            self.writer.copier.copy_all(copies, progress)  # in source-file order

    def mark_bitmaps(self) -> dict[int, bytearray]:
        """The sector bitmap pages with a bit set for every sector written to a partial block."""
        image = self.writer.image
        g, ss = image.geometry, image.logical_sector_size
        pages: dict[int, bytearray] = {}
        if not image.has_parent:
            return pages
        for block in self.blocks:
            if self.bat[g.payload_bat_index(block)] & C.BAT_STATE_MASK != C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                continue
            sbm_base = self.bat[g.sbm_bat_index(block // g.chunk_ratio)] & C.BAT_FILE_OFFSET_MASK
            lo, hi = g.bitmap_byte_range(block)
            if block in self.fresh:
                # A new partial block starts as "all from the parent".
                self._modify_bitmap(pages, sbm_base, lo * 8, (hi - lo) * 8, False)
            for in_block, n, _source, _skip in self.per_block[block]:
                self._modify_bitmap(pages, sbm_base, lo * 8 + in_block // ss, n // ss, True)
        return pages

    def _modify_bitmap(self, pages: dict[int, bytearray], sbm_base: int, first_bit: int, count: int,
                       value: bool) -> None:
        """Set or clear ``count`` bits from ``first_bit`` of the SBM block at ``sbm_base``."""
        page_bits = C.LOG_SECTOR_SIZE * 8
        bit = first_bit
        end = first_bit + count
        while bit < end:
            page_index = bit // page_bits
            page_offset = sbm_base + page_index * C.LOG_SECTOR_SIZE
            if page_offset not in pages:
                pages[page_offset] = bytearray(self.writer.storage.read(page_offset, C.LOG_SECTOR_SIZE))
            stop = min(end, (page_index + 1) * page_bits)
            arr = np.frombuffer(pages[page_offset], dtype=np.uint8)
            bitmapmod.set_bits(arr, bit - page_index * page_bits, stop - bit, value)
            bit = stop

    def commit(self, sbm_pages: dict[int, bytearray]) -> None:
        """Data durable first (§7.4), then one log transaction for the bitmaps and the BAT."""
        changes = self.bat.changes
        if not (sbm_pages or changes):
            return
        self.writer.sync()
        pages = {k: bytes(v) for k, v in sbm_pages.items()}
        if changes:
            pages.update(self.writer.bat_pages(set(changes), changes))
        self.writer.log_pages(pages)
        for idx, entry in changes.items():
            self.writer.image.bat[idx] = entry
        self.writer.image.bat_changed()


def _add_copy(copies: list[list[Any]], source: tuple[Storage, int], skip: int, dst: int, n: int) -> None:
    """Add a copy, growing the last one when it continues it on both sides."""
    storage, src = source
    last = copies[-1] if copies else None
    if last and last[0] is storage and last[1] + last[3] == src + skip and last[2] + last[3] == dst:
        last[3] += n
    else:
        copies.append([storage, src + skip, dst, n])
