"""The free space of one file system, read from its own allocation bitmap (for ``compact --trim``).

Each reader takes ``read(offset, length) -> bytes`` over one volume (a partition, or the whole
disk) and its length, and yields the volume's free space as arrays of (start, end) byte runs,
one piece of the bitmap at a time:

* ext2/3/4: the block bitmap of every block group, found through the group descriptors;
* FAT12/16/32: the clusters whose entry is 0 in every copy of the FAT.

(NTFS's ``$Bitmap`` is a file, read through The Sleuth Kit in :mod:`vhdx.ops.fsfree`.)

We trust a file system's own bitmap for what is free, but never for how much to read: every
size, count and offset is checked against the volume before it drives a read or a loop, so a
crafted file system gives :class:`FsUnreadable` (nothing trimmed there), never an unbounded
read. What the readers refuse, rather than guess: an ext file system whose journal needs
recovery or that was not cleanly unmounted (its bitmaps may be stale), a FAT marked dirty,
``meta_bg`` and ``bigalloc`` layouts, and an ext group whose
bitmap is not initialised (``BLOCK_UNINIT``: treated as wholly in use).
"""

from __future__ import annotations

import struct
from typing import Callable, Iterator

import numpy as np

from ..errors import VhdxError
from . import extsuper
from .extsuper import Superblock

Reader = Callable[[int, int], bytes]
Runs = tuple[np.ndarray, np.ndarray]

EXT_BG_BLOCK_UNINIT = 0x2
EXT_MIN_PER_GROUP = 256      # mke2fs's least: bounds the groups, hence the reads, by the volume / 256
EXT_GDT_PIECE = 4096         # group descriptors read at a time
FAT_CLEAN = {16: 0x8000, 32: 0x08000000}      # FAT[1]: clear while mounted or after a crash
FAT_PIECE = 1 << 20          # FAT entries examined at a time
FAT32_MAX_CLUSTERS = 0x0FFFFFF5 - 2


class FsUnreadable(VhdxError):
    """A file system whose free space cannot be known safely: nothing is trimmed there."""


def free_runs(used: np.ndarray) -> Runs:
    """(starts, ends) of the runs of zeros in ``used`` (one 0/1 value per unit)."""
    free = np.concatenate(([0], (used == 0).astype(np.int8), [0]))
    d = np.diff(free)
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _u16(raw: bytes, at: int) -> int:
    return int(struct.unpack_from("<H", raw, at)[0])


def _u32(raw: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", raw, at)[0])


def check_ext_state(sb: Superblock) -> None:
    """:class:`FsUnreadable` for an ext file system whose bitmaps may be stale or that we do not read."""
    if sb.incompat & extsuper.INCOMPAT_RECOVER:
        raise FsUnreadable("its journal needs recovery (the bitmaps may be stale)")
    if sb.state & (extsuper.STATE_VALID | extsuper.STATE_ERRORS) != extsuper.STATE_VALID:
        raise FsUnreadable("it was not cleanly unmounted or has errors (run e2fsck)")
    if sb.incompat & extsuper.INCOMPAT_META_BG or sb.ro_compat & extsuper.RO_COMPAT_BIGALLOC:
        raise FsUnreadable("meta_bg and bigalloc layouts are not read")


class ExtLayout:
    """Where an ext file system's block bitmaps are described, from its superblock, each number checked."""

    def __init__(self, raw: bytes, volume_length: int) -> None:
        try:
            sb = extsuper.parse_superblock(raw)
        except extsuper.ExtUnreadable as e:
            raise FsUnreadable(e.detail) from None
        check_ext_state(sb)
        self.sb, self.block_size, self.first = sb, sb.block_size, sb.first_data_block
        self.blocks, self.per_group, self.desc_size = sb.blocks, sb.blocks_per_group, sb.descriptor_size
        self.uninit_flags = bool(sb.ro_compat & (extsuper.RO_COMPAT_GDT_CSUM | extsuper.RO_COMPAT_METADATA_CSUM))
        if self.per_group < EXT_MIN_PER_GROUP or self.per_group % 8:
            raise FsUnreadable(f"{self.per_group} blocks per group is out of range")
        if not self.first < self.blocks or self.blocks * self.block_size > volume_length:
            raise FsUnreadable(f"{self.blocks} blocks of {self.block_size} bytes do not fit the volume")
        self.groups = -(-(self.blocks - self.first) // self.per_group)

    def bitmap_block(self, desc: bytes) -> int:
        """The block holding a group's bitmap (from its descriptor)."""
        return self.sb.descriptor_block(desc, 0, 0x20)


def ext_free(read: Reader, volume_length: int) -> Iterator[Runs]:
    """The free blocks of an ext2/3/4 file system, as byte runs, one block group at a time."""
    lay = ExtLayout(read(1024, 1024), volume_length)
    bs = lay.block_size
    gdt = b""
    for g in range(lay.groups):
        if g % EXT_GDT_PIECE == 0:
            count = min(EXT_GDT_PIECE, lay.groups - g)
            gdt = read((lay.first + 1) * bs + g * lay.desc_size, count * lay.desc_size)
        at = g % EXT_GDT_PIECE * lay.desc_size
        desc = gdt[at:at + lay.desc_size]
        if lay.uninit_flags and _u16(desc, 0x12) & EXT_BG_BLOCK_UNINIT:
            continue                           # no bitmap written yet: counted as in use
        where = lay.bitmap_block(desc)
        if not lay.first <= where < lay.blocks:
            raise FsUnreadable(f"group {g}'s bitmap at block {where} lies outside the file system")
        count = min(lay.per_group, lay.blocks - lay.first - g * lay.per_group)
        bits = np.unpackbits(np.frombuffer(read(where * bs, bs), dtype=np.uint8), bitorder="little")[:count]
        starts, ends = free_runs(bits)
        base = lay.first + g * lay.per_group
        yield (starts + base) * bs, (ends + base) * bs


class FatLayout:
    """The numbers of a FAT boot sector that place the FATs and the clusters, each checked."""

    def __init__(self, boot: bytes, volume_length: int) -> None:
        if len(boot) < 512 or boot[510:512] != b"\x55\xaa" or boot[0] not in (0xEB, 0xE9):
            raise FsUnreadable("no FAT boot sector")
        self.sector = _u16(boot, 11)
        spc, reserved, self.fats = boot[13], _u16(boot, 14), boot[16]
        root_entries = _u16(boot, 17)
        total = _u16(boot, 19) or _u32(boot, 32)
        self.fat_sectors = _u16(boot, 22) or _u32(boot, 36)
        check_fat_geometry(self.sector, spc, self.fats, reserved, self.fat_sectors, total * self.sector, volume_length)
        self.cluster = spc * self.sector
        self.fat_start = reserved * self.sector
        root = -(-root_entries * 32 // self.sector)
        self.data_start = (reserved + self.fats * self.fat_sectors + root) * self.sector
        if self.data_start >= total * self.sector:
            raise FsUnreadable("the FATs fill the volume")
        self.clusters = (total * self.sector - self.data_start) // self.cluster
        self.bits = 12 if self.clusters < 4085 else 16 if self.clusters < 65525 else 32
        if self.clusters > FAT32_MAX_CLUSTERS:
            raise FsUnreadable(f"{self.clusters} clusters is more than FAT32 can number")
        if (self.clusters + 2) * self.bits > self.fat_sectors * self.sector * 8:
            raise FsUnreadable(f"a FAT of {self.fat_sectors} sectors cannot describe {self.clusters} clusters")

    @property
    def kind(self) -> str:
        """``fat12``, ``fat16`` or ``fat32``."""
        return f"fat{self.bits}"


def check_fat_geometry(sector: int, spc: int, fats: int, reserved: int, fat_sectors: int, length: int,
                       volume_length: int) -> None:
    """:class:`FsUnreadable` unless a boot sector's numbers are possible and fit the volume."""
    if sector not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or not 1 <= fats <= 4:
        raise FsUnreadable("the boot sector's geometry is not valid")
    if reserved == 0 or fat_sectors == 0 or length > volume_length:
        raise FsUnreadable("the boot sector's sizes do not fit the volume")


def fat_entries(raw: bytes, bits: int, count: int) -> np.ndarray:
    """``count`` FAT entries decoded from ``raw`` (12-bit entries are packed two in three bytes)."""
    if bits == 16:
        return np.frombuffer(raw, dtype="<u2", count=count).astype(np.uint32)
    if bits == 32:
        return np.frombuffer(raw, dtype="<u4", count=count) & 0x0FFFFFFF
    arr = np.frombuffer(raw, dtype=np.uint8).astype(np.uint32)
    n = np.arange(count)
    at = n * 3 // 2
    word = arr[at] | (arr[at + 1] << 8)
    return np.where(n % 2 == 1, word >> 4, word & 0xFFF)


def check_fat_clean(raw: bytes, bits: int) -> None:
    """:class:`FsUnreadable` when FAT[1] says the volume was not cleanly unmounted (FAT16/32)."""
    if bits in FAT_CLEAN and not int(fat_entries(raw, bits, 2)[1]) & FAT_CLEAN[bits]:
        raise FsUnreadable("it is marked dirty (not cleanly unmounted: run fsck.fat)")


def fat_free(read: Reader, volume_length: int) -> Iterator[Runs]:
    """The free clusters of a FAT12/16/32 file system (free in every copy of the FAT), as byte runs."""
    lay = FatLayout(read(0, 512), volume_length)
    fat_bytes = lay.fat_sectors * lay.sector
    piece = lay.clusters + 2 if lay.bits == 12 else FAT_PIECE
    for first in range(0, lay.clusters + 2, piece):
        count = min(piece, lay.clusters + 2 - first)
        lo, hi = first * lay.bits // 8, -(-(first + count) * lay.bits // 8) + 1
        used = np.zeros(count, dtype=bool)
        for copy in range(lay.fats):
            raw = read(lay.fat_start + copy * fat_bytes + lo, min(hi, fat_bytes) - lo)
            used |= fat_entries(raw, lay.bits, count) != 0
        if first == 0:
            check_fat_clean(raw, lay.bits)
            used[:2] = True                    # entries 0 and 1 are not clusters
        starts, ends = free_runs(used)
        yield (lay.data_start + (starts + first - 2) * lay.cluster,
               lay.data_start + (ends + first - 2) * lay.cluster)
