"""The ext2/3/4 superblock: the numbers that place a file system's own tables.

Two readers walk an ext file system's tables directly (not through The Sleuth Kit): ``compact
--trim`` its block bitmaps (:mod:`vhdx.ops.fsbitmaps`) and ``diff --files`` its inode tables
(:mod:`vhdx.ops.fsmeta`). Both start here: :func:`parse_superblock` checks every field either
uses to size a read or a loop (block size, group sizes, inode and descriptor sizes) and raises
:class:`ExtUnreadable` with the reason; each reader adds the bounds of its own task.

Layout (offsets in the 1 KiB superblock, which starts 1 KiB into the volume): inode count 0x0,
block count 0x4 (high half 0x150 with the 64bit feature), first data block 0x14, log2(block
size) - 10 at 0x18, blocks per group 0x20, inodes per group 0x28, magic 0xEF53 at 0x38, state
0x3A, revision 0x4C, inode size 0x58 (revision 1 and later; 128 before), incompatible features
0x60, read-only compatible features 0x64, group descriptor size 0xFE (64bit only; 32 bytes
otherwise). The group descriptors follow in the block after the first data block.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import VhdxError

EXT_MAGIC = 0xEF53
INCOMPAT_RECOVER = 0x4          # the journal needs recovery
INCOMPAT_META_BG = 0x10         # group descriptors spread over the groups: not read
INCOMPAT_64BIT = 0x80           # 48-bit block numbers, descriptors of 64 bytes or more
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
STATE_VALID = 0x1               # cleanly unmounted
STATE_ERRORS = 0x2


class ExtUnreadable(VhdxError):
    """An ext superblock whose numbers we do not use: out of range, or a layout not read."""


@dataclass(frozen=True)
class Superblock:
    """The checked numbers of an ext2/3/4 superblock."""

    block_size: int
    blocks: int
    first_data_block: int
    blocks_per_group: int
    inodes: int
    inodes_per_group: int
    inode_size: int
    descriptor_size: int
    wide: bool                  # the 64bit feature
    incompat: int
    ro_compat: int
    state: int

    @property
    def groups_by_inodes(self) -> int:
        """Block groups, counted from the inodes (each group has its inode table)."""
        return -(-self.inodes // self.inodes_per_group)

    @property
    def descriptors_at(self) -> int:
        """The block that holds the first group descriptor."""
        return self.first_data_block + 1

    def descriptor_block(self, desc: bytes, low_at: int, high_at: int) -> int:
        """A block number from a group descriptor: 32 bits at ``low_at``, and with the 64bit
        feature (descriptors of 64 bytes or more) the high 32 at ``high_at``."""
        low = struct.unpack_from("<I", desc, low_at)[0]
        high = struct.unpack_from("<I", desc, high_at)[0] if self.wide and self.descriptor_size >= 64 else 0
        return int(low | high << 32)


def is_ext(boot: bytes) -> bool:
    """Whether the volume's first 2 KiB hold an ext2/3/4 superblock."""
    return len(boot) >= 2048 and struct.unpack_from("<H", boot, 1024 + 0x38)[0] == EXT_MAGIC


def power_of_two_within(n: int, low: int, high: int) -> bool:
    """Whether ``n`` is a power of two from ``low`` to ``high``."""
    return low <= n <= high and n & (n - 1) == 0


def parse_superblock(sb: bytes) -> Superblock:
    """The numbers of the 1 KiB superblock ``sb``, each in the range ext allows, else :class:`ExtUnreadable`."""
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
        raise ExtUnreadable("no ext superblock")
    inodes, blocks_lo, first, log_bs = (struct.unpack_from("<I", sb, at)[0] for at in (0x0, 0x4, 0x14, 0x18))
    bpg, ipg, rev, incompat, ro = (struct.unpack_from("<I", sb, at)[0] for at in (0x20, 0x28, 0x4C, 0x60, 0x64))
    if log_bs > 6:
        raise ExtUnreadable(f"block size 1024 << {log_bs} is out of range")
    bs = 1024 << log_bs
    wide = bool(incompat & INCOMPAT_64BIT)
    blocks = blocks_lo | (struct.unpack_from("<I", sb, 0x150)[0] << 32 if wide else 0)
    isize = struct.unpack_from("<H", sb, 0x58)[0] if rev else 128
    dsize = struct.unpack_from("<H", sb, 0xFE)[0] if wide else 32
    parsed = Superblock(bs, blocks, first, bpg, inodes, ipg, isize, dsize, wide, incompat, ro,
                        struct.unpack_from("<H", sb, 0x3A)[0])
    _check_sizes(parsed)
    return parsed


def _check_sizes(sb: Superblock) -> None:
    """:class:`ExtUnreadable` unless the sizes that drive reads and loops are ones ext allows."""
    bs = sb.block_size
    if sb.first_data_block > 1:
        raise ExtUnreadable(f"first data block {sb.first_data_block} is not valid (0, or 1 with 1 KiB blocks)")
    if not (0 < sb.blocks_per_group <= 8 * bs and 0 < sb.inodes_per_group <= 8 * bs and sb.inodes > 0):
        raise ExtUnreadable(f"{sb.blocks_per_group} blocks and {sb.inodes_per_group} inodes per group "
                            f"are out of range")
    if not power_of_two_within(sb.inode_size, 128, bs):
        raise ExtUnreadable(f"inode size {sb.inode_size} is not valid")
    if sb.wide and not power_of_two_within(sb.descriptor_size, 64, 1024):
        raise ExtUnreadable(f"group descriptor size {sb.descriptor_size} is not valid")
