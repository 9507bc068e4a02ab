"""Resize: change a disk's virtual size, like Resize-VHD; and its minimum size, like Get-VHD.

**Growing** keeps every byte: the part of the old last block past the old end is zeroed in
the file first (another writer may have left bytes there, and they must not surface), the BAT
entries of the new blocks are cleared through the log while they are still outside the disk,
and then the new size takes effect through the log. When the BAT region is too small for the
new size, a larger BAT is written at the end of the file and both region tables switch to it
in the same log entry as the new size (docs/format.md §3.2, :func:`vhdx.file.space.relocate_bat`).
A fixed disk gets its new blocks allocated. A differencing disk can grow; its new part reads
what its parent reads there (zeros past the parent's end).

**Shrinking** refuses to cut data: the new size must be at least :func:`minimum_size` (the end
of the last non-zero byte), unless ``allow_data_loss``. The blocks past the new end are
unallocated first (they read zeros, so nothing a reader sees changes), then the new size
takes effect, then the file is cut after its last referenced block.

Every step is crash-safe and a re-run finishes the work. A disk with children is refused
unless ``force``: a new size is a change of the disk's data (its DataWriteGuid rotates).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..chains.disk import Disk
from ..chains.paths import PathArgs
from ..chains.resolve import open as open_disk
from ..errors import UsageError, as_path
from ..file.battable import CHUNK_ENTRIES, fill_entries
from ..file.image import Image
from ..file.space import (bat_pages_from, commit_entries, host_sparse, items_with_size, lower_bat, metadata_pages,
                          referenced_end, relocate_bat, shrink_file)
from ..format import bat as batmod
from ..format import constants as C
from ..format.geometry import Geometry, align_up
from .maintenance import last_nonzero, refuse_children

SCAN_PIECE = 4 << 20   # bytes read at a time when looking for the last non-zero byte


@dataclass
class ResizeResult:
    """What :func:`resize` did (or, with ``dry_run``, would do): the sizes before and after,
    whether the BAT moved to the end of the file, and the file's size after."""

    path: str
    dry_run: bool
    old_size: int
    new_size: int
    minimum_size: int | None
    bat_moved: bool
    file_size: int
    children: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return asdict(self)


# ------------------------------------------------------------------ the minimum size

def last_data_end(disk: Disk) -> int:
    """The virtual offset just past the last non-zero byte of ``disk`` (through its chain), or 0."""
    buf = bytearray(SCAN_PIECE)
    for start, length in reversed(disk.data_extents()):
        end = start + length
        while end > start:
            a = max(start, end - SCAN_PIECE)
            if disk.parent is None and host_sparse(disk.image, a, end - a):
                end = a                    # holes of the host file (a fixed disk's unwritten blocks)
                continue
            view = memoryview(buf)[:end - a]
            n = disk.pread_into(view, a)
            last = last_nonzero(view[:n])
            if last >= 0:
                return a + last + 1
            end = a
    return 0


def minimum_of(disk: Disk) -> int:
    """The smallest size ``disk`` can shrink to without losing data: its last non-zero byte,
    rounded up to a logical sector (one sector at least)."""
    ss = disk.logical_sector_size
    return max(ss, align_up(last_data_end(disk), ss))


def minimum_size(path: str | os.PathLike[str], *, search_paths: PathArgs = (), parents: PathArgs | None = None,
                 ignore_id_mismatch: bool = False, share: bool = False) -> int:
    """The smallest virtual size ``path`` can be resized to without losing data (like Get-VHD's
    MinimumSize): the end of its last non-zero byte, through its chain, rounded up to a logical
    sector. The keywords are those of :func:`vhdx.open`."""
    path = as_path(path)
    with open_disk(path, search_paths=search_paths, parents=parents, ignore_id_mismatch=ignore_id_mismatch,
                   share=share) as disk:
        return minimum_of(disk)


# ------------------------------------------------------------------ steps

def zero_block_tail(image: Image, offset: int) -> None:
    """Zero the file bytes of the block holding virtual ``offset``, from ``offset`` to the
    block's end (if the block is allocated), and flush."""
    bs = image.block_size
    block, within = divmod(offset, bs)
    if within == 0 or block >= image.geometry.payload_blocks:
        return
    entry = int(image.bat[image.bat_index(block)])
    if not batmod.holds_data(entry & C.BAT_STATE_MASK):
        return
    start = (entry & C.BAT_FILE_OFFSET_MASK) + within
    end = min((entry & C.BAT_FILE_OFFSET_MASK) + bs, image.storage.size())
    if end > start:
        image.writer.write_zeros(start, end - start)
        image.writer.sync()


def grown_bat(image: Image, g_new: Geometry) -> np.ndarray:
    """The BAT for the larger geometry: the old entries, the new blocks' (and chunks') cleared;
    a fixed disk's new blocks allocated (zeroed space at the end of the file)."""
    g_old = image.geometry
    new = np.zeros(align_up(g_new.bat_entries * 8, C.LOG_SECTOR_SIZE) // 8, dtype="<u8")
    fill_entries(new, image.sparse(), g_old)   # the old blocks' entries; the new ones stay cleared
    count = g_new.payload_blocks - g_old.payload_blocks
    if image.disk_type == "fixed" and count > 0:
        at = image.writer.allocate(count * g_new.block_size)
        for first in range(0, count, CHUNK_ENTRIES):   # in pieces: a fixed disk's BAT is all entries
            fresh = np.arange(first, min(count, first + CHUNK_ENTRIES), dtype=np.int64)
            offsets = np.uint64(at) + fresh.astype(np.uint64) * np.uint64(g_new.block_size)
            new[g_new.payload_bat_index(fresh + g_old.payload_blocks)] = offsets | np.uint64(C.PAYLOAD_BLOCK_FULLY_PRESENT)
        image.writer.sync()
    return new


def grow(image: Image, size: int) -> bool:
    """Grow ``image`` to ``size`` bytes; True if the BAT had to move to the end of the file."""
    image.writer.begin_session(data_change=True)
    zero_block_tail(image, image.size)
    g_new = Geometry(size, image.block_size, image.logical_sector_size, image.has_parent)
    new_bat = grown_bat(image, g_new)
    size_pages = metadata_pages(image, items_with_size(image, size))
    if g_new.bat_entries * 8 > image.bat_region.length:
        relocate_bat(image, new_bat, extra_pages=size_pages)
        image.load_metadata()
        return True
    image.writer.log_pages(bat_pages_from(image, new_bat))   # outside the disk until the size changes
    image.bat = new_bat
    image.bat_changed()
    image.writer.log_pages(size_pages)
    image.load_metadata()
    return False


def shrink(image: Image, size: int) -> None:
    """Shrink ``image`` to ``size`` bytes: unallocate the blocks past it, zero the rest of the
    new last block, set the size, cut the file."""
    g_old = image.geometry
    g_new = Geometry(size, image.block_size, image.logical_sector_size, image.has_parent)
    # A differencing disk's cut blocks become ZERO, not NOT_PRESENT, so that until the size
    # changes they keep reading zeros instead of the parent's data.
    cut = batmod.make_entry(C.PAYLOAD_BLOCK_ZERO if image.has_parent else C.PAYLOAD_BLOCK_NOT_PRESENT, 0)
    blocks = image.allocated()[0]   # from the BAT's non-zero entries: as large as the data
    held = blocks[blocks >= g_new.payload_blocks]
    updates = {int(i): cut for i in g_old.payload_bat_index(held)}
    chunks = image.sparse().chunks   # the sector-bitmap entries that are not zero
    updates.update({int(i): 0 for i in g_old.sbm_bat_index(chunks[chunks >= g_new.sector_bitmap_blocks])})
    commit_entries(image, updates, data_change=True)
    image.writer.begin_session(data_change=True)
    zero_block_tail(image, size)
    image.writer.log_pages(metadata_pages(image, items_with_size(image, size)))
    image.load_metadata()
    lower_bat(image)
    shrink_file(image, referenced_end(image))


def check_size(image: Image, size: Any) -> int:
    """``size`` as a valid virtual size for ``image`` (a UsageError if it is not one)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise UsageError(f"size {size!r}: a whole number of bytes", path=image.path)
    ss = image.logical_sector_size
    if size <= 0 or size % ss or size > C.MAX_VIRTUAL_DISK_SIZE:
        raise UsageError(f"size {size}: a multiple of the {ss}-byte logical sector, up to 64 TiB",
                         path=image.path)
    return size


def _check_shrink(disk: Disk, size: int, allow_data_loss: bool) -> int | None:
    """The minimum size when shrinking (a UsageError if ``size`` is under it without
    ``allow_data_loss``); None when growing."""
    if size >= disk.size:
        return None
    minimum = minimum_of(disk)
    if size < minimum and not allow_data_loss:
        raise UsageError(f"{size} bytes would cut data: the disk holds non-zero bytes up to {minimum} "
                         f"('--min'); pass --allow-data-loss (allow_data_loss=True) to cut them", path=disk.path)
    return minimum


def resize(path: str | os.PathLike[str], size: int, *, allow_data_loss: bool = False, force: bool = False,
           dry_run: bool = False, search_paths: PathArgs = (), parents: PathArgs | None = None,
           ignore_id_mismatch: bool = False) -> ResizeResult:
    """Change the virtual size of ``path`` to ``size`` bytes, like ``Resize-VHD``.

    Growing works for every disk type. Shrinking refuses to go under the last non-zero byte
    (:func:`minimum_size`) unless ``allow_data_loss``. ``size`` must be a multiple of the
    logical sector size. A disk that other disks depend on is refused (:class:`ChainError`)
    unless ``force``. Crash-safe and restartable. ``dry_run`` checks and writes nothing.
    ``search_paths``, ``parents`` and ``ignore_id_mismatch`` are those of :func:`vhdx.open`
    (a differencing disk's minimum is read through its chain). Returns a :class:`ResizeResult`.
    """
    path = as_path(path)
    children = refuse_children(path, "resize", force or dry_run, search_paths)
    options: dict[str, Any] = dict(search_paths=search_paths, parents=parents, ignore_id_mismatch=ignore_id_mismatch)
    with open_disk(path, "r" if dry_run else "r+", **options) as disk:
        image = disk.image
        size = check_size(image, size)
        old = image.size
        minimum = _check_shrink(disk, size, allow_data_loss)
        moved = False
        if dry_run:
            moved = size > old and Geometry(size, image.block_size, image.logical_sector_size,
                                            image.has_parent).bat_entries * 8 > image.bat_region.length
        elif size > old:
            moved = grow(image, size)
        elif size < old:
            shrink(image, size)
        file_size = image.storage.size()
    return ResizeResult(path, dry_run, old, size, minimum, moved, file_size, children)
