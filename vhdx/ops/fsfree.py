"""Which blocks of a virtual disk lie wholly in the free space of its file systems (``compact --trim``).

The disk is read as its top layer reads it (through its parents). Partitions come from the MBR
or GPT (The Sleuth Kit's volume reader, ``pip install 'vhdx[forensics]'``); without a table the
whole disk is one volume. In each volume the file system's own allocation map says what is
free: ext2/3/4 and FAT through :mod:`vhdx.ops.fsbitmaps`, NTFS through its ``$Bitmap`` file
(read with The Sleuth Kit). Space outside any known file system (gaps between partitions, an
unknown or unreadable file system, a partition overlapping another) is never counted as free.

:func:`free_blocks` returns a :class:`FreeMap`: one flag per block (all of the block's bytes
inside the free runs) and a line per volume saying what was found, for the report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from ..chains.disk import Disk
from .extsuper import is_ext
from .fsbitmaps import FsUnreadable, Reader, Runs, ext_free, fat_free, free_runs
from .fsview import disk_image, read_bytes, tsk_module, volumes

NTFS_PIECE = 1 << 20      # bytes of $Bitmap read at a time
NTFS_VOLUME_INFORMATION = 0x70


@dataclass
class VolumeFree:
    """One volume: where it is, its file system (``unknown`` if none is read) and its free bytes."""

    offset: int
    length: int
    kind: str
    free_bytes: int = 0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The volume as JSON values."""
        return asdict(self)


@dataclass
class FreeMap:
    """``free[b]``: block ``b`` lies wholly in free space; ``volumes``: what each volume gave."""

    block_size: int
    free: np.ndarray
    volumes: list[VolumeFree]


def tsk() -> Any:
    """The ``pytsk3`` module, or :class:`~vhdx.ops.fsview.ForensicsMissingError` saying how to install it."""
    return tsk_module("compact --trim (partition tables, NTFS)")


def volume_list(disk: Disk, image: Any) -> list[VolumeFree]:
    """The partitions clipped to the disk; one that overlaps another is marked not to be trimmed."""
    vols = []
    for v in volumes(image, disk.size):
        vols.append(VolumeFree(v.offset, max(0, min(v.length, disk.size - v.offset)), "unknown", note=v.description))
    vols.sort(key=lambda v: v.offset)
    for a, b in zip(vols, vols[1:]):
        if b.offset < a.offset + a.length:
            a.kind = b.kind = "overlapping"
    return vols


def volume_reader(disk: Disk, vol: VolumeFree) -> Reader:
    """``read(offset, length)`` inside the volume; reading past its end is :class:`FsUnreadable`."""
    def read(offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > vol.length:
            raise FsUnreadable(f"a read of {length} bytes at {offset} leaves the volume")
        return read_bytes(disk, vol.offset + offset, length)
    return read


def ntfs_dirty(fs: Any) -> bool:
    """Whether the NTFS's ``$Volume`` says it is dirty (its $VOLUME_INFORMATION flags, bit 0);
    an unreadable one counts as dirty."""
    try:
        volume = fs.open("/$Volume")
        for attr in volume:
            if int(attr.info.type) == NTFS_VOLUME_INFORMATION:
                info = volume.read_random(0, min(int(attr.info.size), 64), attr.info.type, attr.info.id)
                return len(info) < 12 or bool(int.from_bytes(info[10:12], "little") & 0x1)
    except OSError:
        pass
    return True


def ntfs_free(image: Any, vol: VolumeFree) -> Iterator[Runs]:
    """The free clusters of the NTFS at ``vol``, from its ``$Bitmap``, as byte runs."""
    mod = tsk()
    try:
        fs = mod.FS_Info(image, offset=vol.offset)
        bitmap = fs.open("/$Bitmap")
    except OSError as e:
        raise FsUnreadable(f"its $Bitmap does not open: {e}") from None
    if ntfs_dirty(fs):
        raise FsUnreadable("it is marked dirty (not cleanly unmounted: run chkdsk)")
    cluster, count = int(fs.info.block_size), int(fs.info.block_count)
    size = int(bitmap.info.meta.size)
    if cluster <= 0 or count * cluster > vol.length or size * 8 < count:
        raise FsUnreadable(f"{count} clusters of {cluster} bytes do not fit the volume or its $Bitmap")
    for at in range(0, -(-count // 8), NTFS_PIECE):
        raw = bitmap.read_random(at, min(NTFS_PIECE, -(-count // 8) - at))
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:count - at * 8]
        if bits.size < min(NTFS_PIECE * 8, count - at * 8):
            raise FsUnreadable("its $Bitmap is shorter than its size says")
        starts, ends = free_runs(bits)
        yield (starts + at * 8) * cluster, (ends + at * 8) * cluster


def file_system_runs(disk: Disk, image: Any, vol: VolumeFree) -> Iterator[Runs] | None:
    """The free runs of the volume's file system (naming it in ``vol.kind``), or None if unknown."""
    read = volume_reader(disk, vol)
    head = read(0, min(4096, vol.length))
    if is_ext(head):
        vol.kind = "ext"
        return ext_free(read, vol.length)
    if head[3:11] == b"NTFS    ":
        vol.kind = "ntfs"
        return ntfs_free(image, vol)
    if head[3:11] != b"EXFAT   " and len(head) >= 512 and head[510:512] == b"\x55\xaa" and head[0] in (0xEB, 0xE9):
        vol.kind = "fat"
        return fat_free(read, vol.length)
    return None


class Coverage:
    """Free bytes counted per block, from disjoint runs: partial counts plus a whole-block sweep."""

    def __init__(self, size: int, block_size: int) -> None:
        self.size, self.bs = size, block_size
        self.count = -(-size // block_size)
        self.partial = np.zeros(self.count + 1, dtype=np.int64)
        self.whole = np.zeros(self.count + 1, dtype=np.int64)

    def add(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Count the runs [start, end) of disk bytes (clipped to the disk)."""
        s, e = np.asarray(starts, np.int64), np.minimum(np.asarray(ends, np.int64), self.size)
        keep = e > s
        s, e = s[keep], e[keep]
        first, last = s // self.bs, (e - 1) // self.bs
        one = first == last
        f, la, s2, e2 = first[~one], last[~one], s[~one], e[~one]
        self._count(self.partial, np.concatenate((first[one], f, la)),
                    np.concatenate(((e - s)[one], (f + 1) * self.bs - s2, e2 - la * self.bs)))
        self._count(self.whole, np.concatenate((f + 1, la)),
                    np.concatenate((np.ones(f.size, np.int64), -np.ones(la.size, np.int64))))

    def _count(self, into: np.ndarray, at: np.ndarray, amounts: np.ndarray) -> None:
        """``into[at] += amounts``, repeated indexes summed (bincount: exact below 2**53)."""
        if at.size:
            into += np.rint(np.bincount(at, weights=amounts, minlength=into.size)).astype(np.int64)

    def free(self) -> np.ndarray:
        """One flag per block: all of its bytes were counted free."""
        lengths = np.full(self.count, self.bs, dtype=np.int64)
        if self.count:
            lengths[-1] = self.size - (self.count - 1) * self.bs
        return (np.cumsum(self.whole)[:self.count] > 0) | (self.partial[:self.count] >= lengths)


def count_volume(disk: Disk, image: Any, vol: VolumeFree, cover: Coverage) -> None:
    """Add the volume's free runs to ``cover``; on any doubt, add nothing and say why in ``vol.note``."""
    if vol.kind == "overlapping":
        vol.note = "overlaps another partition: nothing trimmed"
        return
    try:
        runs = file_system_runs(disk, image, vol)
        if runs is None:
            vol.note = f"{vol.note}: no file system read here, nothing trimmed".lstrip(": ")
            return
        pieces = list(runs)                         # all of the bitmap read before any of it counts
    except (FsUnreadable, OSError) as e:
        vol.note = f"unreadable ({e}): nothing trimmed"
        return
    for starts, ends in pieces:
        keep = ends > starts
        cover.add(starts[keep] + vol.offset, np.minimum(ends[keep], vol.length) + vol.offset)
        vol.free_bytes += int((np.minimum(ends[keep], vol.length) - starts[keep]).clip(0).sum())


def free_blocks(disk: Disk, block_size: int) -> FreeMap:
    """Which ``block_size`` blocks of ``disk`` (as its top layer reads) lie wholly in free space."""
    image = disk_image(disk)
    cover = Coverage(disk.size, block_size)
    vols = volume_list(disk, image)
    for vol in vols:
        count_volume(disk, image, vol, cover)
    return FreeMap(block_size, cover.free(), vols)
