"""Moving things inside one open file: BAT entries, blocks, the BAT itself, the file's end.

The primitives of the maintenance verbs (``vhdx compact`` and ``vhdx resize``), each crash-safe
by the rules of docs/architecture.md ("Crash safety"):

* :func:`commit_entries` changes BAT entries through the log (bitmap slots after the payload
  entries that may depend on them: they sit later in the BAT, and pages go in offset order);
* :func:`move_units` copies blocks (payload or sector bitmap) into free space, flushes, and
  only then points their entries at the new place through the log: the old place is free
  only once the log entry is durable;
* :func:`relocate_bat` writes a larger BAT at the end of the file, flushes, and switches both
  region tables (and any metadata pages handed in) in one log entry (docs/format.md §3.2:
  "changes to the table go through the log");
* :func:`shrink_file` logs the new, smaller size before cutting the file (§8.2: "a writer about
  to shrink the file first logs the new size and flushes"), so a replay never finds the file
  shorter than an entry's FlushedFileOffset.

Every function leaves the Image's in-memory view (``bat``, ``region_table``, ``bat_region``)
in step with the file once the change is durable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import UsageError
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from ..format.geometry import align_up
from ..format.records import MetadataItem, RegionEntry, build_metadata_region, build_region_table, metadata_items
from ..format.structs import VirtualDiskSize
from . import battable
from .copy import Copier, Progress

if TYPE_CHECKING:
    from .image import Image


@dataclass(frozen=True)
class Unit:
    """One thing the BAT places in the file: a payload block or a sector bitmap block."""

    bat_index: int
    start: int
    length: int

    @property
    def end(self) -> int:
        """The file offset past its last byte."""
        return self.start + self.length


def units(image: "Image") -> list[Unit]:
    """Every payload block of ``image`` holding data and (in a differencing disk) every present
    sector bitmap, by offset; from the BAT's non-zero entries (as large as the data)."""
    alloc = layout.allocations_of(image.sparse(), image.geometry, bitmaps=image.has_parent)
    out = [Unit(int(i), int(s), int(e - s)) for i, s, e in
           zip(alloc.bat_indexes.tolist(), alloc.starts.tolist(), alloc.ends.tolist())]
    return sorted(out, key=lambda u: u.start)


def holes(structures: list[layout.Span], placed: list[Unit]) -> list[tuple[int, int]]:
    """The free (start, end) ranges between the structures and the placed units, 1 MiB aligned,
    below the last of them, lowest first."""
    taken = sorted([(s.start, s.end) for s in structures] + [(u.start, u.end) for u in placed])
    out = []
    cursor = 0
    for start, end in taken:
        start_free = align_up(cursor)
        if start - start_free >= C.ALIGNMENT:
            out.append((start_free, start // C.ALIGNMENT * C.ALIGNMENT))
        cursor = max(cursor, end)
    return out


def plan_moves(structures: list[layout.Span], placed: list[Unit]) -> list[tuple[Unit, int]]:
    """(unit, new offset) for the units at the end of the file that fit into a lower hole.

    The last unit goes into the lowest hole that holds it, then the one before it, and so on
    while a hole lies below the unit. Each destination is free at the start (nothing is
    placed in space another move frees), so the moves can be carried out in any grouping.
    """
    free = [list(h) for h in holes(structures, placed)]
    moves = []
    for unit in sorted(placed, key=lambda u: u.start, reverse=True):
        for hole in free:
            if hole[0] >= unit.start:
                break
            if hole[1] - hole[0] >= unit.length and hole[0] + unit.length <= unit.start:
                moves.append((unit, hole[0]))
                hole[0] += unit.length
                break
    return moves


def commit_entries(image: "Image", updates: dict[int, int], *, data_change: bool) -> None:
    """Log BAT entry changes (bat index -> raw entry), then apply them to ``image.bat``.

    ``data_change`` False keeps the DataWriteGuid (a change no reader of the disk can see, so
    children stay linked); True rotates it once per open as any write does.
    """
    if not updates:
        return
    writer = image.writer
    writer.check_writable()
    writer.begin_session(data_change=data_change)
    writer.log_pages(writer.bat_pages(set(updates), updates))   # the touched pages only, not a BAT copy
    idx = np.fromiter(updates.keys(), dtype=np.int64, count=len(updates))
    image.bat[idx] = np.fromiter(updates.values(), dtype=np.uint64, count=len(updates))
    image.bat_changed()


def move_units(image: "Image", moves: list[tuple[Unit, int]], *, progress: Progress | None = None) -> int:
    """Copy each unit to its new offset, flush, then point its entry there through the log.

    Returns the bytes copied. The destinations must be free space (see :func:`plan_moves`).
    """
    if not moves:
        return 0
    writer = image.writer
    writer.check_writable()
    writer.begin_session(data_change=False)
    if writer.copier is None:
        writer.copier = Copier(image.storage)
    updates = {}
    copied = 0
    for unit, dst in moves:
        entry = int(image.bat[unit.bat_index])
        if entry & C.BAT_FILE_OFFSET_MASK != unit.start:
            raise UsageError(f"BAT entry {unit.bat_index} changed while a move was planned", path=image.path)
        writer.copier.copy(image.storage, unit.start, dst, unit.length, progress)
        updates[unit.bat_index] = batmod.make_entry(entry & C.BAT_STATE_MASK, dst)
        copied += unit.length
    writer.sync()  # data first: no entry may point at data that is not durable (§7.4)
    commit_entries(image, updates, data_change=False)
    return copied


def referenced_end(image: "Image") -> int:
    """The 1 MiB-aligned end of the last structure or block the file references."""
    spans = layout.structure_spans(image.header, image.region_table)
    return align_up(layout.referenced_end(spans, layout.allocations_of(image.sparse(), image.geometry,
                                                                       bitmaps=image.has_parent)))


def shrink_file(image: "Image", size: int) -> int:
    """Cut the file to ``size`` bytes (past everything it references); returns bytes freed.

    An empty log entry carrying the new size is made durable first, so that the last entry
    of the session never claims more than the file holds after the cut (§8.2).
    """
    writer = image.writer
    writer.check_writable()
    before = image.storage.size()
    if before <= size:
        return 0
    if size < referenced_end(image):
        raise UsageError(f"cannot cut the file to {size} bytes: it references space up to "
                         f"{referenced_end(image)}", path=image.path)
    writer.begin_session(data_change=False)
    assert writer.log_writer is not None
    writer.log_writer.write_entry([], file_size=size)
    writer.truncate(size)
    writer.sync()
    return before - size


def region_table_pages(image: "Image", entries: list[RegionEntry]) -> dict[int, bytes]:
    """The 4 KiB pages of both region tables that change when they list ``entries``."""
    raw = build_region_table(entries)
    pages = {}
    for table in C.REGION_TABLE_OFFSETS:
        old = image.storage.read(table, C.REGION_TABLE_SIZE)
        for at in range(0, C.REGION_TABLE_SIZE, C.LOG_SECTOR_SIZE):
            if raw[at:at + C.LOG_SECTOR_SIZE] != old[at:at + C.LOG_SECTOR_SIZE]:
                pages[table + at] = raw[at:at + C.LOG_SECTOR_SIZE]
    return pages


def relocate_bat(image: "Image", new_bat: np.ndarray, *, extra_pages: dict[int, bytes] | None = None,
                 at: int | None = None) -> int:
    """Write ``new_bat`` at the end of the file (or at ``at``, free space), then switch the
    region tables to it.

    The new BAT goes into unreferenced space and is flushed; one log entry then changes both
    region tables together with ``extra_pages`` (the metadata pages of a new size, so that the
    size and the table that holds it take effect at once). Returns the new BAT's offset.
    """
    writer = image.writer
    writer.check_writable()
    writer.begin_session(data_change=extra_pages is not None)
    length = align_up(new_bat.size * 8)
    if at is None:
        at = writer.allocate(length)
    else:
        writer.write_zeros(at, length)
    for first, stop in battable.nonzero_pages(new_bat):   # the zeroed space holds the rest already
        writer.write(batmod.encode_bat(new_bat[first:stop]), at + first * 8)
    writer.sync()
    entries = [RegionEntry(e.guid, at, length, e.required) if e.guid == C.BAT_REGION_GUID else e
               for e in image.region_table]
    pages = region_table_pages(image, entries)
    pages.update(extra_pages or {})
    if len(pages) > (writer.log_writer.max_pages if writer.log_writer else 0):
        raise UsageError("the region table and metadata change does not fit one log entry", path=image.path)
    writer.log_pages(pages)
    image.region_table = entries
    image.region_table_errors = [None, None]
    image.bat_region = image.region(C.BAT_REGION_GUID)
    if new_bat.size * 8 == length:
        image.bat = new_bat
    else:
        image.bat = np.zeros(length // 8, dtype="<u8")   # pages that stay zero cost no memory
        for first, stop in battable.nonzero_pages(new_bat):
            image.bat[first:stop] = new_bat[first:stop]
    image.bat_changed()
    return at


def bat_pages_from(image: "Image", new_bat: np.ndarray) -> dict[int, bytes]:
    """The 4 KiB pages of the BAT region (in place) that differ from ``new_bat``'s entries,
    compared :data:`~vhdx.file.battable.CHUNK_ENTRIES` entries at a time (never the whole BAT
    in memory at once)."""
    total = align_up(new_bat.size * 8, C.LOG_SECTOR_SIZE) // 8   # whole pages, the last padded with zeros
    if total * 8 > image.bat_region.length:
        raise UsageError("the new BAT does not fit its region", path=image.path)
    old = np.zeros(min(battable.CHUNK_ENTRIES, total), dtype="<u8")
    pages = {}
    for first in range(0, total, battable.CHUNK_ENTRIES):
        new = np.zeros(min(battable.CHUNK_ENTRIES, total - first), dtype="<u8")
        piece = new_bat[first:first + new.size]
        new[:piece.size] = piece
        pages.update(battable.changed_pages(image.storage, image.bat_region.file_offset, first, new, old))
    return pages


def metadata_pages(image: "Image", items: list[MetadataItem]) -> dict[int, bytes]:
    """The 4 KiB pages of the metadata region that change when it holds ``items``."""
    r = image.metadata_region
    raw = build_metadata_region(items, r.length)
    old = image.storage.read(r.file_offset, r.length)
    return {r.file_offset + at: raw[at:at + C.LOG_SECTOR_SIZE] for at in range(0, r.length, C.LOG_SECTOR_SIZE)
            if raw[at:at + C.LOG_SECTOR_SIZE] != old[at:at + C.LOG_SECTOR_SIZE]}


def items_with_size(image: "Image", size: int) -> list[MetadataItem]:
    """The file's metadata items with the virtual disk size item set to ``size``."""
    data = VirtualDiskSize.build(dict(virtual_disk_size=size))
    return [MetadataItem(it.item_id, data, it.flags)
            if it.item_id == C.VIRTUAL_DISK_SIZE_GUID and not it.flags & C.METADATA_IS_USER else it
            for it in metadata_items(image.metadata)]


def lower_bat(image: "Image") -> bool:
    """Move the BAT into the lowest hole below it that holds it (a BAT moved to the end by a
    resize, or larger than the disk now needs), so that the file can be cut; True if it moved."""
    needed = align_up(max(image.geometry.bat_entries, 1) * 8)
    current = image.bat_region
    others = [sp for sp in layout.structure_spans(image.header, image.region_table)
              if sp.name != "region BAT"]
    placed = units(image)
    for start, end in holes(others + [layout.Span(current.file_offset, current.file_offset + current.length,
                                                  "region BAT")], placed):
        if start >= current.file_offset:
            break
        if end - start >= needed:
            new_bat = np.zeros(needed // 8, dtype="<u8")
            battable.fill_entries(new_bat, image.sparse(), image.geometry)
            relocate_bat(image, new_bat, at=start)
            return True
    return False


def host_sparse(image: "Image", offset: int, length: int) -> bool:
    """True when the virtual range lies in blocks of this file whose bytes are holes of the host
    file (``SEEK_DATA`` finds nothing there): it reads zeros without being read. False when
    unknown (no descriptor, no ``SEEK_DATA``) or when a block there is not FULLY_PRESENT."""
    fd = image.storage.fileno()
    if fd is None or not hasattr(os, "SEEK_DATA") or image.log_replayed_in_memory:
        return False
    bs = image.block_size
    pos, end = offset, offset + length
    while pos < end:
        block, within = divmod(pos, bs)
        n = min(bs - within, end - pos)
        entry = int(image.bat[image.bat_index(block)])
        if entry & C.BAT_STATE_MASK != C.PAYLOAD_BLOCK_FULLY_PRESENT:
            return False
        start = (entry & C.BAT_FILE_OFFSET_MASK) + within
        try:
            found = os.lseek(fd, start, os.SEEK_DATA)
        except OSError:
            found = None            # ENXIO: no data from there to the end of the file
        if found is not None and found < start + n:
            return False
        pos += n
    return True
