"""The BAT of one file at any size: mapped, scanned in bounded chunks, checked (docs/format.md §5).

A 64 TiB disk with 1 MiB blocks has a 512 MiB BAT, almost all of it zeros (holes, in a file
we created). So the BAT is never read whole:

* :func:`map_entries` gives the ``uint64`` array :attr:`Image.bat` as a private, copy-on-write
  memory map of the BAT region: a page is read from the file the first time an entry on it is
  looked at, and the writer's updates change this process's copy only (the file is changed
  through the log). Where the storage cannot map, the region is read into memory instead.
* :func:`scan` reads the entries in chunks of :data:`CHUNK_ENTRIES` into one reused buffer,
  skipping the holes of the file (``SEEK_DATA``/``SEEK_HOLE``) longer than :data:`JOIN_GAP`,
  and keeps only the non-zero entries (:class:`~vhdx.format.bat.SparseBat`): memory and time
  follow the data, not the virtual size. Every whole-disk question (which blocks hold data, state counts, the checks
  below, ``vhdx check``, the merge planner) is answered from that list.
* :func:`validate` refuses entries that would send reads outside the file, and, for writing,
  invalid states and overlaps (:mod:`vhdx.format.layout`), from the same list.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import CorruptError, UnsupportedError
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from ..format.geometry import Geometry, align_up
from ..format.records import Header, RegionEntry
from .storage import Storage

CHUNK_ENTRIES = 1 << 17  # 1 MiB of entries per read when scanning
JOIN_GAP = 64 << 10  # data ranges of the BAT at most this far apart are read as one; longer holes are skipped


def entries_length(region: RegionEntry, geometry: Geometry, path: str) -> int:
    """Bytes of the BAT region that hold the disk's entries (a whole number of 4 KiB pages);
    refuses a region too small for the disk or over the format's maximum."""
    needed = geometry.bat_entries * 8
    if region.length < needed:
        raise CorruptError(f"BAT region holds {region.length // 8} entries, the disk needs {geometry.bat_entries}",
                           path=path, offset=region.file_offset)
    if needed > C.MAX_BAT_REGION_SIZE:
        raise UnsupportedError(f"BAT of {needed} bytes is over the 513 MiB maximum", path=path,
                               offset=region.file_offset)
    return align_up(needed, C.LOG_SECTOR_SIZE)


def map_entries(storage: Storage, offset: int, length: int) -> np.ndarray:
    """The ``length`` bytes of BAT at ``offset`` as a writable uint64 array: a private map
    where the storage can make one (pages read on demand), else read into memory."""
    mapping = storage.map_readonly(offset, length)
    if mapping is not None:
        return np.asarray(mapping).view("<u8")
    entries = np.empty(length // 8, dtype="<u8")
    storage.readinto(entries.view(np.uint8).data, offset)
    return entries


def pieces(storage: Storage, offset: int, count: int, chunk: int = CHUNK_ENTRIES) -> Iterator[tuple[int, np.ndarray]]:
    """``(first index, entries)`` for the BAT's first ``count`` entries that may be non-zero,
    at most ``chunk`` at a time, in index order. The array is a reused buffer: copy what you keep."""
    buf = np.empty(min(chunk, max(count, 1)), dtype="<u8")
    for first, stop in _read_ranges(storage.data_ranges(offset, count * 8), offset, count):
        for a in range(first, stop, chunk):
            view = buf[:min(stop, a + chunk) - a]
            storage.readinto(view.view(np.uint8).data, offset + 8 * a)
            yield a, view


def _read_ranges(data: list[tuple[int, int]], offset: int, count: int) -> Iterator[tuple[int, int]]:
    """``[first, stop)`` entry ranges to read for the file's data ranges ``data`` of the BAT at
    ``offset``: ranges less than :data:`JOIN_GAP` bytes apart are read as one (a hole reads as
    zeros without touching the disk, and one read replaces hundreds of small ones: a sparse BAT
    has a data page every few pages)."""
    first = stop = -1
    for lo, hi in data:
        a, b = (lo - offset) // 8, min(count, -(-(hi - offset) // 8))
        if stop >= 0 and 8 * (a - stop) <= JOIN_GAP:
            stop = b
            continue
        if stop >= 0:
            yield first, stop
        first, stop = a, b
    if stop >= 0:
        yield first, stop


def scan(storage: Storage, offset: int, count: int, geometry: Geometry) -> batmod.SparseBat:
    """The non-zero entries of the BAT's first ``count`` entries, read in bounded chunks."""
    return batmod.sparse_join([batmod.sparse_piece(a, view, geometry) for a, view in pieces(storage, offset, count)]
                              or [batmod.sparse_piece(0, np.zeros(0, np.uint64), geometry)])


def validate(sparse: batmod.SparseBat, geometry: Geometry, file_size: int, where: layout.BatPlace, *,
             writing: tuple[Header, list[RegionEntry]] | None = None) -> None:
    """Refuse entries that would make reads go outside the file (docs/format.md §5.3) and, when
    ``writing`` (the header and region table), entries in an invalid state or sharing space."""
    if sparse.size == 0 and writing is None:
        return  # every entry zero (NOT_PRESENT): nothing can point anywhere
    alloc = layout.allocations_of(sparse, geometry, bitmaps=geometry.has_parent)
    layout.validate_in_file(alloc, file_size, where)
    if writing is not None:
        spans = layout.structure_spans(*writing)
        layout.validate_for_writing(sparse, geometry, alloc, spans, where)


def allocated(sparse: batmod.SparseBat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blocks, file offsets, states)`` of the payload blocks that hold data, by block."""
    keep = batmod.holds_data(sparse.states)
    return sparse.blocks[keep], sparse.offsets[keep], sparse.states[keep]


def dense_states(sparse: batmod.SparseBat, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """``(states, file offsets)`` of payload blocks ``start`` to ``stop`` (bounded by the caller)."""
    return batmod.dense(sparse, start, stop)


def fill_entries(dst: np.ndarray, sparse: batmod.SparseBat, geometry: Geometry) -> None:
    """Write the counted non-zero entries of a BAT (its ``sparse`` list) into ``dst``, a zeroed
    array of at least ``geometry.bat_entries``: listed payload entries, the runs of a plain
    state (in pieces of :data:`CHUNK_ENTRIES` blocks) and the sector-bitmap entries. Only the
    pages of ``dst`` that receive a non-zero entry are touched (a new ``numpy.zeros`` array
    costs no memory where it stays zero)."""
    dst[sparse.payload_bat_indexes(geometry)] = sparse.entries
    for start, stop, state in zip(sparse.run_starts.tolist(), sparse.run_stops.tolist(), sparse.run_states.tolist()):
        for first in range(start, stop, CHUNK_ENTRIES):
            blocks = np.arange(first, min(stop, first + CHUNK_ENTRIES), dtype=np.int64)
            dst[geometry.payload_bat_index(blocks)] = state   # a plain state: no offset, no other bit
    dst[sparse.sbm_bat_indexes(geometry)] = sparse.sbm_entries


def nonzero_pages(entries: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(first, stop)`` entry ranges of ``entries``, whole 4 KiB pages, that hold a non-zero
    entry: looked at :data:`CHUNK_ENTRIES` at a time, each range at most that long."""
    per_page = C.LOG_SECTOR_SIZE // 8
    for first in range(0, entries.size, CHUNK_ENTRIES):
        nz = np.flatnonzero(entries[first:first + CHUNK_ENTRIES])
        if nz.size:
            lo = first + int(nz[0]) // per_page * per_page
            yield lo, min(entries.size, first + (int(nz[-1]) // per_page + 1) * per_page)


def changed_pages(storage: Storage, offset: int, first: int, new: np.ndarray, old: np.ndarray) -> dict[int, bytes]:
    """``{file offset: page}`` of the 4 KiB pages of the BAT at ``offset`` whose entries
    ``first`` to ``first + new.size`` (a whole number of pages) differ from ``new``; ``old`` is
    a reused ``"<u8"`` array at least as long, read into (the file's bytes, little-endian)."""
    per_page = C.LOG_SECTOR_SIZE // 8
    view = old[:new.size]
    view[:] = 0
    storage.readinto(view.view(np.uint8).data, offset + 8 * first)
    differ = np.flatnonzero((view != new).reshape(-1, per_page).any(axis=1))
    return {offset + 8 * (first + page * per_page): new[page * per_page:(page + 1) * per_page].astype("<u8").tobytes()
            for page in differ.tolist()}
