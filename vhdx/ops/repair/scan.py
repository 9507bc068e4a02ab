"""Finding the file's structures without trusting them: the headers, the log, the region tables.

Each function reads one structure the way ``Image.load`` does, but never stops at the first
problem: it takes what is valid, falls back to the other copy or to a scan, and records in
the :class:`~.report.SalvageReport` what it found, repaired or lost. Nothing here writes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from ...errors import VhdxError
from ...file.log import LogEntry, find_active_sequence, replayable_prefix
from ...file.storage import OverlayStorage, Storage
from ...format import bat as batmod
from ...format import constants as C
from ...format import layout
from ...format.geometry import Geometry, align_up
from ...format.records import (Header, RegionEntry, current_header, parse_header, parse_metadata_table,
                               parse_region_table, validate_header_fields)
from .report import FOUND, LOST, REPAIRED, SalvageReport

SCAN_LIMIT = 1 << 30          # signatures and the BAT are looked for in the first GiB of the file
SCAN_STEP = 64 * C.KiB        # structures sit at 64 KiB (region tables) or 1 MiB (regions) alignments
METADATA_GUESS = 1 * C.MiB    # the metadata region length every known writer uses
BAT_SAMPLE = 64 * C.KiB       # the entries of each BAT candidate that are scored


def blank_header(log_offset: int = 0, log_length: int = 0) -> Header:
    """A header for a file whose two headers are lost: new GUIDs, a clean log."""
    return Header(sequence_number=1, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4(),
                  log_guid=C.ZERO_GUID, log_version=C.LOG_VERSION, version=C.VERSION,
                  log_length=log_length, log_offset=log_offset)


def read_headers(storage: Storage, report: SalvageReport) -> tuple[Header | None, list[bool], int]:
    """The current header (None when both are lost), which slots hold a valid one, and the
    slot of the current one."""
    path = storage.path
    found: list[Header | None] = [None, None]
    errors: list[str | None] = [None, None]
    for i, offset in enumerate(C.HEADER_OFFSETS):
        try:
            h = parse_header(storage.read(offset, C.HEADER_SIZE), path=path, offset=offset)
            validate_header_fields(h, path=path, offset=offset)
            found[i] = h
        except VhdxError as e:
            errors[i] = e.detail
    valid = [h is not None for h in found]
    if not any(valid):
        for i in range(2):
            report.add(f"header {i + 1}", LOST, str(errors[i]))
        return None, valid, 0
    try:
        index, _ = current_header(found, errors, path=path)
    except VhdxError as e:  # two valid headers, same sequence number, different fields
        index = 0
        report.notes.append(f"{e.detail}; header 1 was used")
        valid = [True, False]
    for i in range(2):
        if valid[i]:
            report.add(f"header {i + 1}", FOUND, "current" if i == index else "older copy")
        else:
            report.add(f"header {i + 1}", REPAIRED, f"{errors[i] or 'differs'}; rebuilt from header {index + 1}")
    current = found[index]
    assert current is not None
    return current, valid, index


@dataclass
class LogResult:
    """What the log gave: the storage to read through (the replay laid over the file) and the
    entries replayed."""

    storage: Storage
    replayed: list[LogEntry]


def replay_log(storage: Storage, header: Header, report: SalvageReport) -> LogResult:
    """Replay a dirty log in memory, up to its last valid entry whose replay stays in bounds;
    a log with no valid sequence is reported lost (the last metadata updates with it)."""
    if header.log_guid == C.ZERO_GUID:
        report.add("log", FOUND, "clean")
        return LogResult(storage, [])
    size = storage.size()
    entries: list[LogEntry] | None = None
    log = b""
    if header.log_length and header.log_offset + header.log_length <= size:
        log = storage.read(header.log_offset, header.log_length)
        entries = find_active_sequence(log, header.log_guid, log_offset=header.log_offset)
    if not entries:
        report.add("log", LOST, "dirty, but no valid sequence of entries: its last metadata updates are lost")
        return LogResult(storage, [])
    usable = _usable_prefix(entries, size, storage.path, header.log_offset)
    dropped = len(entries) - len(usable)
    if not usable:
        report.add("log", LOST, f"dirty; none of its {len(entries)} entries can be replayed within the file's bounds")
        return LogResult(storage, [])
    detail = f"dirty; {len(usable)} {'entry' if len(usable) == 1 else 'entries'} replayed"
    if dropped:
        detail += f", {dropped} after sequence {usable[-1].sequence_number} not replayed (out of bounds)"
    damaged = later_entries(log, header.log_guid, entries[-1].sequence_number)
    if damaged:
        dropped += damaged
        detail += f"; {damaged} later {'entry' if damaged == 1 else 'entries'} of this log damaged, not replayed " \
                  "(the metadata updates they held are lost)"
    head = usable[-1]
    if head.flushed_file_offset > size:
        report.notes.append(f"the log says {head.flushed_file_offset} bytes were durable but the file has "
                            f"{size}: the file was cut short")
    report.add("log", REPAIRED if not dropped else LOST, detail)
    patches = [w for e in usable for w in e.writes]
    return LogResult(OverlayStorage(storage, patches, head.last_file_offset), usable)


def later_entries(log: bytes, log_guid: uuid.UUID, head: int) -> int:
    """How many 4 KiB positions of the log start an entry of this log (its signature and
    LogGuid) with a sequence number past ``head``: entries written after the last valid one,
    damaged since (a valid one would have been part of the sequence)."""
    guid = log_guid.bytes_le
    count = 0
    for at in range(0, len(log) - C.LOG_ENTRY_HEADER_SIZE + 1, C.LOG_SECTOR_SIZE):
        if log[at:at + 4] == C.SIGNATURE_LOG_ENTRY and log[at + 32:at + 48] == guid and \
                int.from_bytes(log[at + 16:at + 24], "little") > head:
            count += 1
    return count


def _usable_prefix(entries: list[LogEntry], size: int, path: str, log_offset: int) -> list[LogEntry]:
    """The longest prefix of ``entries`` whose replay passes the log's bounds checks."""
    return entries[:replayable_prefix(entries, size, path=path, log_offset=log_offset)]


def read_region_tables(storage: Storage, header: Header, report: SalvageReport) -> list[RegionEntry] | None:
    """The region table: table 1 if valid, else table 2, else a ``regi`` signature found at a
    64 KiB alignment of the header section; None when none is usable."""
    size = storage.size()
    tables: list[list[RegionEntry] | None] = [None, None]
    errors: list[str] = ["", ""]
    for i, offset in enumerate(C.REGION_TABLE_OFFSETS):
        tables[i], errors[i] = _region_table_at(storage, offset, header, size)
    good = next((t for t in tables if t is not None), None)
    if good is not None:
        for i in range(2):
            if tables[i] is not None:
                report.add(f"region table {i + 1}", FOUND)
            else:
                report.add(f"region table {i + 1}", REPAIRED, f"{errors[i]}; rebuilt from the other copy")
        return good
    for offset in range(0, C.HEADER_SECTION_SIZE, SCAN_STEP):
        if offset in C.REGION_TABLE_OFFSETS or storage.read(offset, 4) != C.SIGNATURE_REGION:
            continue
        table, _ = _region_table_at(storage, offset, header, size)
        if table is not None:
            for i in range(2):
                report.add(f"region table {i + 1}", REPAIRED, f"{errors[i]}; rebuilt from a copy at 0x{offset:x}")
            return table
    for i in range(2):
        report.add(f"region table {i + 1}", LOST, errors[i])
    return None


def _region_table_at(storage: Storage, offset: int, header: Header, size: int) -> tuple[list[RegionEntry] | None, str]:
    """The table at ``offset`` if valid; regions that run past the end of a file cut short are
    accepted (what they held past the end is lost, and reported so by the next steps)."""
    try:
        entries = parse_region_table(storage.read(offset, C.REGION_TABLE_SIZE), path=storage.path, offset=offset)
        layout.validate_region_table(entries, header, 1 << 62, path=storage.path, offset=offset)
    except VhdxError as e:
        return None, e.detail
    outside = next((e for e in entries if e.file_offset >= size), None)
    if outside is not None:
        return None, f"region {outside.name} starts at 0x{outside.file_offset:x}, past the end of the file"
    return entries, ""


def find_metadata(storage: Storage, avoid: list[layout.Span]) -> RegionEntry | None:
    """A metadata region found by its signature at a 64 KiB alignment (its table must parse)."""
    limit = min(storage.size(), SCAN_LIMIT)
    for offset in range(C.HEADER_SECTION_SIZE, limit, SCAN_STEP):
        if any(s.start <= offset < s.end for s in avoid):
            continue
        if storage.read(offset, 8) != C.SIGNATURE_METADATA:
            continue
        length = min(METADATA_GUESS, storage.size() - offset)
        try:
            parse_metadata_table(storage.read(offset, length), path=storage.path, offset=offset)
        except VhdxError:
            continue
        return RegionEntry(C.METADATA_REGION_GUID, offset, align_up(length), C.REGION_REQUIRED)
    return None


def find_bat(storage: Storage, geometry: Geometry, avoid: list[layout.Span]) -> RegionEntry | None:
    """The BAT found by its content: at a 1 MiB alignment outside ``avoid``, the table whose
    entries are all valid and that places the most blocks inside the file (None when no
    candidate places any)."""
    size = storage.size()
    length = align_up(geometry.bat_entries * 8)
    best, best_score = None, 0
    for offset in range(C.HEADER_SECTION_SIZE, min(size, SCAN_LIMIT), C.ALIGNMENT):
        if any(s.start < offset + length and offset < s.end for s in avoid):
            continue
        raw = storage.read(offset, min(geometry.bat_entries * 8, BAT_SAMPLE))
        score = _bat_score(batmod.decode_bat(raw[:len(raw) // 8 * 8]), offset, length, size)
        if score > best_score:
            best, best_score = offset, score
    if best is None:
        return None
    return RegionEntry(C.BAT_REGION_GUID, best, length, C.REGION_REQUIRED)


def _bat_score(entries: np.ndarray, offset: int, length: int, size: int) -> int:
    """How much ``entries`` look like a BAT at ``offset``: the present entries that point inside
    the file, less one for each entry that is invalid (reserved bits or state, outside the
    file, inside the table itself); a few damaged entries do not hide a real BAT, noise scores
    below zero."""
    st = batmod.states(entries)
    invalid = (batmod.reserved_bits(entries) != 0) | (st == C.PayloadState.RESERVED_4)
    present = ~invalid & ((st == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    offs = batmod.file_offsets(entries).astype(np.int64)
    inside = (offs >= C.HEADER_SECTION_SIZE) & (offs < size) & ((offs < offset) | (offs >= offset + length))
    good = int((present & inside).sum())
    bad = int(invalid.sum()) + int((present & ~inside).sum())
    return good - bad
