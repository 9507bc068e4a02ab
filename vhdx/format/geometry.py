"""Block geometry: chunk ratio, BAT indexes and entry counts (docs/format.md §5.1, §5.2)."""

from __future__ import annotations

from dataclasses import dataclass
import functools
import operator
from typing import Any

from ..errors import UsageError
from .constants import ALIGNMENT, SECTORS_PER_CHUNK


def align_up(value: int, alignment: int = ALIGNMENT) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (1 MiB)."""
    return -(-value // alignment) * alignment


def as_offset(value: Any, what: str, path: str) -> int:
    """``value`` (an offset or length a caller hands in) as a non-negative int; anything else is
    a UsageError naming ``what``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, not {type(value).__name__}", path=path) from None
    if number < 0:
        raise UsageError(f"negative {what} {number}", path=path)
    return number


@dataclass(frozen=True)
class Geometry:
    """Where each payload block and sector bitmap sits in the BAT."""

    virtual_disk_size: int
    block_size: int
    logical_sector_size: int
    has_parent: bool

    @functools.cached_property
    def chunk_ratio(self) -> int:
        """Payload blocks per sector-bitmap block: 2^23 * sector size / block size."""
        return SECTORS_PER_CHUNK * self.logical_sector_size // self.block_size

    @property
    def payload_blocks(self) -> int:
        """Blocks of the virtual disk (the last one may be partial)."""
        return -(-self.virtual_disk_size // self.block_size)

    @property
    def sector_bitmap_blocks(self) -> int:
        """Chunks, each with one sector bitmap block."""
        return -(-self.payload_blocks // self.chunk_ratio)

    @property
    def sectors_per_block(self) -> int:
        """Logical sectors per payload block."""
        return self.block_size // self.logical_sector_size

    @property
    def bat_entries(self) -> int:
        """Entries the BAT must hold: the last one locates the last payload (or SBM) block."""
        if self.has_parent:
            return self.sector_bitmap_blocks * (self.chunk_ratio + 1)
        pb = self.payload_blocks
        return pb + (pb - 1) // self.chunk_ratio if pb else 0

    def payload_bat_index(self, block: Any) -> Any:
        """BAT index of payload block ``block`` (an int or an integer array): the sector
        bitmap slot of each chunk sits after its ``chunk_ratio`` payload entries (§5.2)."""
        return block + block // self.chunk_ratio

    def sbm_bat_index(self, chunk: Any) -> Any:
        """BAT index of chunk ``chunk``'s sector bitmap block (an int or an integer array)."""
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def bitmap_byte_range(self, block: int) -> tuple[int, int]:
        """Byte range of block ``block``'s bits inside its chunk's sector bitmap block."""
        start = (block % self.chunk_ratio) * self.sectors_per_block // 8
        return start, start + self.sectors_per_block // 8
