"""The file's span map: where each structure sits and what may not share space (§1.1, §3, §5).

Pure functions over parsed values: the header section, the log and the regions come from the
header and the region table (:func:`structure_spans`); the payload blocks and sector bitmap
blocks come from the BAT's non-zero entries as numpy arrays (:func:`allocations_of`). The checks on top of them say
whether two spans share bytes and whether a span runs past the end of the file; the file
layer raises on the first problem, ``vhdx check`` reports them all.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptError, TruncatedError, UnsupportedError, VhdxError
from . import bat as batmod
from . import constants as C
from .geometry import Geometry, align_up
from .records import Header, RegionEntry


@dataclass(frozen=True)
class Span:
    """Bytes ``start`` to ``end`` of the file, held by the structure ``name``."""

    start: int
    end: int
    name: str

    @property
    def described(self) -> str:
        """The name as a message says it: "the log", "region BAT"."""
        return self.name if self.name.startswith("region ") else f"the {self.name}"


def structure_spans(header: Header, regions: list[RegionEntry]) -> list[Span]:
    """The header section, the log (when it has a length) and each region, in that order."""
    spans = [Span(C.FILE_IDENTIFIER_OFFSET, C.HEADER_SECTION_SIZE, "header section")]
    if header.log_length:
        spans.append(Span(header.log_offset, header.log_offset + header.log_length, "log"))
    spans += [Span(r.file_offset, r.file_offset + r.length, f"region {r.name}") for r in regions]
    return spans


def first_overlap(spans: list[Span]) -> tuple[Span, Span] | None:
    """The first pair (earlier, later) of spans, sorted by offset, that share bytes."""
    ordered = sorted(spans, key=lambda s: (s.start, s.end, s.name))
    return next(((a, b) for a, b in zip(ordered, ordered[1:]) if b.start < a.end), None)


def validate_region_table(entries: list[RegionEntry], header: Header, file_size: int, *, path: str,
                          offset: int) -> None:
    """Refuse a region table (at file ``offset``) with a repeated, unknown required, misplaced or
    missing region, or one whose regions overlap each other, the log or the header section."""
    seen: set[uuid.UUID] = set()
    for e in entries:
        if e.guid in seen:
            raise CorruptError(f"region table: region {e.name} listed twice", path=path, offset=offset)
        seen.add(e.guid)
        _check_region(e, file_size, path=path, offset=offset)
    for guid, name in ((C.BAT_REGION_GUID, "BAT"), (C.METADATA_REGION_GUID, "metadata")):
        if guid not in seen:
            raise CorruptError(f"region table: no {name} region", path=path, offset=offset)
    clash = first_overlap(structure_spans(header, entries))
    if clash is not None:
        a, b = clash
        raise CorruptError(f"{b.name} at 0x{b.start:x} overlaps {a.name}", path=path, offset=b.start)


def _check_region(e: RegionEntry, file_size: int, *, path: str, offset: int) -> None:
    """One region: known (or not required), 1 MiB aligned, after the header section, inside the file."""
    known = e.guid in (C.BAT_REGION_GUID, C.METADATA_REGION_GUID)
    if not known and e.required & C.REGION_REQUIRED:
        raise UnsupportedError(f"unknown required region {e.guid}", path=path, offset=offset)
    if e.file_offset % C.ALIGNMENT or e.length % C.ALIGNMENT or e.file_offset < C.HEADER_SECTION_SIZE \
            or e.length == 0:
        raise CorruptError(f"region {e.name}: at 0x{e.file_offset:x}, {e.length} bytes: not 1 MiB "
                           f"aligned or inside the header section", path=path, offset=offset)
    if e.file_offset + e.length > file_size:
        raise TruncatedError(f"region {e.name} ends at 0x{e.file_offset + e.length:x}, past the end of "
                             f"the {file_size}-byte file", path=path, offset=e.file_offset)


@dataclass(frozen=True)
class Allocations:
    """The payload blocks and sector bitmap blocks the BAT places in the file, one row each:
    payload blocks first (in block order), then sector bitmaps (in chunk order)."""

    starts: np.ndarray       # file offset (int64)
    ends: np.ndarray         # file offset past the last byte (int64)
    bat_indexes: np.ndarray  # the BAT entry (int64)
    owners: np.ndarray       # the payload block, or -1 - chunk for a sector bitmap (int64)

    def owner_name(self, row: int) -> str:
        """ "block 5" or "sector bitmap 0" for a row."""
        owner = int(self.owners[row])
        return f"block {owner}" if owner >= 0 else f"sector bitmap {-1 - owner}"


def allocations(bat: np.ndarray, geometry: Geometry, *, bitmaps: bool = True) -> Allocations:
    """Every payload block that holds data and (when ``bitmaps``) every present sector bitmap."""
    return allocations_of(batmod.sparse_piece(0, bat, geometry), geometry, bitmaps=bitmaps)


def allocations_of(sparse: batmod.SparseBat, geometry: Geometry, *, bitmaps: bool = True) -> Allocations:
    """:func:`allocations` from the BAT's non-zero entries (proportional to the data)."""
    present = batmod.holds_data(sparse.states)
    blocks = sparse.blocks[present]
    starts = [sparse.offsets[present]]
    lengths = [geometry.block_size]
    indexes = [np.asarray(geometry.payload_bat_index(blocks), dtype=np.int64)]
    owners = [blocks]
    if bitmaps:
        sbm = batmod.states(sparse.sbm_entries) == C.SB_BLOCK_PRESENT
        starts.append(batmod.file_offsets(sparse.sbm_entries[sbm]).astype(np.int64))
        lengths.append(C.SECTOR_BITMAP_BLOCK_SIZE)
        indexes.append(sparse.sbm_bat_indexes(geometry)[sbm])
        owners.append(-1 - sparse.chunks[sbm])
    ends = [s + length for s, length in zip(starts, lengths)]
    return Allocations(np.concatenate(starts), np.concatenate(ends), np.concatenate(indexes),
                       np.concatenate(owners))


def rows_in(alloc: Allocations, span: Span) -> np.ndarray:
    """The rows of ``alloc`` that share bytes with ``span``."""
    return np.flatnonzero((alloc.starts < span.end) & (alloc.ends > span.start))


def clashes(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort spans by start (stable): ``(order, hits)``, where each of ``order[hits]`` starts
    before an earlier span (in that order) ends."""
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    if s.size < 2:
        return order, np.zeros(0, dtype=np.int64)
    return order, np.flatnonzero(s[1:] < np.maximum.accumulate(e[:-1])) + 1


def referenced_end(spans: list[Span], alloc: Allocations) -> int:
    """The end of the last structure, payload block or sector bitmap the file references."""
    end = max(s.end for s in spans)
    return max(end, int(alloc.ends.max())) if alloc.ends.size else end


def leaked_tail(spans: list[Span], alloc: Allocations, file_size: int) -> tuple[int, int]:
    """``(start, length)`` of the file's bytes past its last referenced structure, payload block
    or sector bitmap (rounded up to the 1 MiB alignment of every structure): space no entry
    refers to, wasted but harmless. ``length`` is 0 when there is none or when it is less than
    1 MiB (padding: Disk2VHD leaves 512 bytes)."""
    end = align_up(referenced_end(spans, alloc))
    return end, file_size - end if file_size - end >= C.ALIGNMENT else 0


def outside_file(starts: np.ndarray, ends: np.ndarray, file_size: int) -> np.ndarray:
    """Where a span starts inside the header section or ends past the end of the file."""
    return (starts < C.HEADER_SECTION_SIZE) | (ends > file_size)


def past_end(ends: np.ndarray, file_size: int) -> np.ndarray:
    """Where a span runs past the end of the file."""
    return ends > file_size


def starts_outside(starts: np.ndarray, file_size: int) -> np.ndarray:
    """Where a span starts inside the header section or at or past the end of the file."""
    return (starts < C.HEADER_SECTION_SIZE) | (starts >= file_size)


# ---------------------------------------------------------------- the BAT against the file

@dataclass(frozen=True)
class BatPlace:
    """Where the BAT is, for errors that name the offset of an entry."""

    file_offset: int
    path: str

    def error(self, error: type[VhdxError], bat_index: int, message: str) -> VhdxError:
        """``error`` at BAT entry ``bat_index``."""
        return error(message, path=self.path, offset=self.file_offset + 8 * bat_index)


def validate_in_file(alloc: Allocations, file_size: int, where: BatPlace) -> None:
    """Refuse blocks and sector bitmaps that lie outside the file (docs/format.md §5.3)."""
    blocks = alloc.owners >= 0
    bad = np.flatnonzero(blocks & starts_outside(alloc.starts, file_size))
    if bad.size:
        row = int(bad[0])
        bat_index = int(alloc.bat_indexes[row])
        raise where.error(CorruptError, bat_index, f"BAT entry {bat_index} (block {int(alloc.owners[row])}): data "
                          f"at 0x{int(alloc.starts[row]):x}, outside the {file_size}-byte file")
    # A block that runs past the end of the file: tolerated for the block that sits last in
    # the file (old qemu wrote a short last block, §6), a truncated file everywhere else.
    short = blocks & past_end(alloc.ends, file_size)
    if short.any():
        short[int(np.argmax(np.where(blocks, alloc.starts, -1)))] = False
        if short.any():
            row = int(np.flatnonzero(short)[0])
            raise where.error(TruncatedError, int(alloc.bat_indexes[row]), (
                f"block {int(alloc.owners[row])}: data at 0x{int(alloc.starts[row]):x} runs past the end "
                f"of the {file_size}-byte file: the file was cut short"))
    bad = np.flatnonzero(~blocks & outside_file(alloc.starts, alloc.ends, file_size))
    if bad.size:
        bat_index = int(alloc.bat_indexes[int(bad[0])])
        raise where.error(CorruptError, bat_index, f"BAT entry {bat_index}: sector bitmap outside the "
                          f"{file_size}-byte file")


def validate_for_writing(sparse: batmod.SparseBat, geometry: Geometry, alloc: Allocations, spans: list[Span],
                         where: BatPlace) -> None:
    """Refuse to write a file whose BAT holds an invalid state, or whose blocks or sector
    bitmaps share space with each other or with a structure.

    Reading such a file is harmless (a reserved payload state reads as zeros, ``vhdx check``
    reports it); writing it would spread the damage. ``sparse`` holds the BAT's non-zero
    entries (zero entries are valid), so the checks cost what the data costs.
    """
    reserved = np.flatnonzero(sparse.states == C.PayloadState.RESERVED_4)
    if reserved.size:
        k = int(sparse.blocks[int(reserved[0])])
        bat_index = geometry.payload_bat_index(k)
        raise where.error(CorruptError, bat_index, f"BAT entry {bat_index} (block {k}): reserved state 4; "
                          f"refusing to write")
    if geometry.has_parent:
        sst = batmod.states(sparse.sbm_entries)
        bad = np.flatnonzero((sst != C.SB_BLOCK_PRESENT) & (sst != C.SB_BLOCK_NOT_PRESENT))
        if bad.size:
            bat_index = int(sparse.sbm_bat_indexes(geometry)[int(bad[0])])
            raise where.error(CorruptError, bat_index, f"BAT entry {bat_index}: sector bitmap in invalid state "
                              f"{int(sst[int(bad[0])])}; refusing to write")
    for span in spans:
        hit = rows_in(alloc, span)
        if hit.size:
            _refuse_overlap(alloc, int(hit[0]), span.described, where)
    order, hits = clashes(alloc.starts, alloc.ends)
    if hits.size:
        _refuse_overlap(alloc, int(order[int(hits[0])]), "another block or sector bitmap", where)


def _refuse_overlap(alloc: Allocations, row: int, other: str, where: BatPlace) -> None:
    bat_index, owner = int(alloc.bat_indexes[row]), int(alloc.owners[row])
    what = f"block {owner}" if owner >= 0 else f"sector bitmap of chunk {-1 - owner}"
    raise where.error(CorruptError, bat_index, f"BAT entry {bat_index} ({what}): data at "
                      f"0x{int(alloc.starts[row]):x} overlaps {other}; refusing to write")
