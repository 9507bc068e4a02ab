"""The VHDX log: find the active sequence, replay it, write new entries (docs/format.md §8).

Never parses the BAT or the metadata region; never decides which header is current.
Replay produces a list of patches; the caller applies them to the file (writable open)
or lays them over it in memory (read-only open, :class:`vhdx.storage.OverlayStorage`).

Bounds on a log we did not write (checked by :func:`plan_replay` before anything is written
or allocated; a log that breaks one is refused with ``LogReplayError``):

* every target is 4 KiB aligned, starts at or after 192 KiB (never the file identifier or a
  header) and does not overlap the log region (:func:`read_entry`);
* an entry's LastFileOffset is at most the file size rounded up to 1 MiB plus
  ``MAX_REPLAY_GROWTH`` (1 GiB): a writer logs an entry only after extending the file for the
  blocks it allocates, and Windows's LastFileOffset runs ahead of the durable size by one block
  (256 MiB at most) and a 1 MiB sector bitmap;
* every data or zero descriptor ends inside the entry's extent, max(file size, LastFileOffset);
* the zero descriptors of the replay add up to no more than that extent, so a 32-byte
  descriptor cannot make a replay write more zeros than the file can hold.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LogReplayError, VhdxError
from ..format import constants as C
from ..format.checksum import crc32c_zeroed, stamp, stored_checksum
from ..format.structs import DataDescriptor, DataSector, LogEntryHeader, ZeroDescriptor
from .storage import Storage

SECTOR = C.LOG_SECTOR_SIZE
# Targets above this are refused outright: no real file is 128 TiB (hostile-input guard).
MAX_TARGET = 1 << 47
# How far past its current end (rounded up to 1 MiB) a replay may grow the file (see above).
MAX_REPLAY_GROWTH = C.GiB


def storage_error(error: OSError, what: str, *, path: str, offset: int | None = None) -> VhdxError:
    """An OSError from a storage call as a VhdxError naming the file and offset (errno kept)."""
    return VhdxError(f"{what} failed: {error.strerror or error}", path=path, offset=offset, errno=error.errno)


@dataclass
class LogEntry:
    """One valid log entry and the writes it describes."""

    position: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    flushed_file_offset: int
    last_file_offset: int
    writes: list[tuple[int, bytes | int]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, int]:
        """The entry's header fields as JSON-ready values."""
        return dict(offset_in_log=self.position, entry_length=self.entry_length, tail=self.tail,
                    sequence_number=self.sequence_number, descriptor_count=self.descriptor_count,
                    flushed_file_offset=self.flushed_file_offset, last_file_offset=self.last_file_offset)


def descriptor_sectors(descriptor_count: int) -> int:
    """4 KiB sectors an entry header and ``descriptor_count`` descriptors take (at least one)."""
    return max(1, -(-(C.LOG_ENTRY_HEADER_SIZE + C.LOG_DESCRIPTOR_SIZE * descriptor_count) // SECTOR))


def _ring(log: bytes, position: int, length: int) -> bytes:
    """``length`` bytes of the ring starting at ``position``, wrapping at the end."""
    size = len(log)
    if position + length <= size:
        return log[position:position + length]
    first = log[position:]
    return first + log[:length - len(first)]


def read_entry(log: bytes, position: int, log_guid: uuid.UUID, *, log_offset: int = 0) -> LogEntry | None:
    """The entry at ``position`` if it passes every validity rule of §8.5, else None."""
    h = _entry_header(log, position, log_guid)
    if h is None:
        return None
    raw = _ring(log, position, h.entry_length)
    if stored_checksum(raw) != crc32c_zeroed(raw):
        return None
    writes = _entry_writes(raw, h, log_offset=log_offset, log_end=log_offset + len(log))
    if writes is None:
        return None
    return LogEntry(position, h.entry_length, h.tail, h.sequence_number, h.descriptor_count,
                    h.flushed_file_offset, h.last_file_offset, writes)


def _entry_header(log: bytes, position: int, log_guid: uuid.UUID) -> Any:
    """The parsed entry header at ``position`` if its fields fit the ring, else None."""
    size = len(log)
    head = log[position:position + C.LOG_ENTRY_HEADER_SIZE]
    if len(head) < C.LOG_ENTRY_HEADER_SIZE or head[:4] != C.SIGNATURE_LOG_ENTRY:
        return None
    h = LogEntryHeader.parse(head)
    valid = (h.log_guid == log_guid and h.sequence_number != 0
             and 0 < h.entry_length <= size and h.entry_length % SECTOR == 0
             and h.tail % SECTOR == 0 and h.tail < size
             and C.LOG_ENTRY_HEADER_SIZE + C.LOG_DESCRIPTOR_SIZE * h.descriptor_count <= h.entry_length
             and h.flushed_file_offset <= MAX_TARGET and h.last_file_offset <= MAX_TARGET)
    return h if valid else None


def _entry_writes(raw: bytes, h: Any, *, log_offset: int, log_end: int) -> list[tuple[int, bytes | int]] | None:
    """The writes the descriptors of a checksummed entry describe, or None if one breaks a rule."""
    data_index = descriptor_sectors(h.descriptor_count)
    writes: list[tuple[int, bytes | int]] = []
    for i in range(h.descriptor_count):
        at = C.LOG_ENTRY_HEADER_SIZE + C.LOG_DESCRIPTOR_SIZE * i
        d = raw[at:at + C.LOG_DESCRIPTOR_SIZE]
        write: tuple[int, bytes | int] | None = None
        if d[:4] == C.SIGNATURE_ZERO_DESC:
            write = _zero_write(d, h.sequence_number)
        elif d[:4] == C.SIGNATURE_DATA_DESC and (data_index + 1) * SECTOR <= h.entry_length:
            write = _data_write(d, raw[data_index * SECTOR:(data_index + 1) * SECTOR], h.sequence_number)
            data_index += 1
        if write is None or not _target_allowed(write, log_offset=log_offset, log_end=log_end):
            return None
        writes.append(write)
    return writes if data_index * SECTOR == h.entry_length else None


def _zero_write(descriptor: bytes, sequence_number: int) -> tuple[int, int] | None:
    """(target, length) of a zero descriptor (§8.3), or None if it breaks a rule."""
    z = ZeroDescriptor.parse(descriptor)
    if z.sequence_number != sequence_number or z.zero_length % SECTOR:
        return None
    return z.file_offset, z.zero_length


def _data_write(descriptor: bytes, sector: bytes, sequence_number: int) -> tuple[int, bytes] | None:
    """(target, 4 KiB page) of a data descriptor and its data sector (§8.3, §8.4), or None."""
    dd = DataDescriptor.parse(descriptor)
    if dd.sequence_number != sequence_number or sector[:4] != C.SIGNATURE_DATA_SECTOR:
        return None
    data = DataSector.parse(sector)
    if (data.sequence_high << 32) | data.sequence_low != sequence_number:
        return None
    return dd.file_offset, bytes(dd.leading_bytes) + data.data + bytes(dd.trailing_bytes)


def _target_allowed(write: tuple[int, bytes | int], *, log_offset: int, log_end: int) -> bool:
    """A write lands 4 KiB aligned, after the headers, below MAX_TARGET and outside the log."""
    target, item = write
    length = item if isinstance(item, int) else len(item)
    if target % SECTOR or target < 3 * C.HEADER1_OFFSET or target + length > MAX_TARGET:
        return False
    return not (log_offset and target < log_end and target + length > log_offset)


def find_active_sequence(log: bytes, log_guid: uuid.UUID, *, log_offset: int = 0) -> list[LogEntry] | None:
    """The entries to replay, from the head's Tail to the head (§8.5), or None if there is none."""
    size = len(log)
    if size == 0 or size % SECTOR:
        return None
    cache: dict[int, LogEntry | None] = {}

    def entry_at(position: int) -> LogEntry | None:
        if position not in cache:
            cache[position] = read_entry(log, position, log_guid, log_offset=log_offset)
        return cache[position]

    candidate: list[LogEntry] | None = None
    tail = old_tail = 0
    while True:
        seq, position, covered = _sequence_from(entry_at, tail, size)
        active = _active_part(seq)
        if active is not None and (candidate is None or seq[-1].sequence_number > candidate[-1].sequence_number):
            candidate = active
        tail = (position if active is not None else tail + SECTOR) % size
        if tail < old_tail or (active is not None and covered >= size):
            break
        old_tail = tail
    return candidate


def _sequence_from(entry_at: Callable[[int], LogEntry | None], tail: int,
                   size: int) -> tuple[list[LogEntry], int, int]:
    """The run of valid entries with consecutive sequence numbers from ``tail``: (entries, the
    position after them, bytes they cover)."""
    seq: list[LogEntry] = []
    position = tail
    covered = 0
    while covered < size:
        e = entry_at(position)
        if e is None or (seq and e.sequence_number != seq[-1].sequence_number + 1):
            break
        if covered + e.entry_length > size:
            break
        seq.append(e)
        covered += e.entry_length
        position = (position + e.entry_length) % size
    return seq, position, covered


def _active_part(seq: list[LogEntry]) -> list[LogEntry] | None:
    """The part of a run from its head's Tail to its head, or None if the Tail is not in it."""
    positions = {e.position: i for i, e in enumerate(seq)}
    if not seq or seq[-1].tail not in positions:
        return None
    return seq[positions[seq[-1].tail]:]


@dataclass
class ReplayPlan:
    """What replaying the active sequence does to the file."""

    entries: list[LogEntry]
    patches: list[tuple[int, bytes | int]]
    flushed_file_offset: int
    last_file_offset: int


def plan_replay(storage: Storage, log_offset: int, log_length: int, log_guid: uuid.UUID) -> ReplayPlan:
    """Read the log region and work out the replay; raises LogReplayError when impossible."""
    file_size = storage.size()
    if log_length == 0 or log_offset + log_length > file_size:
        raise LogReplayError(f"log at 0x{log_offset:x}, {log_length} bytes, runs past the end of the "
                             f"{file_size}-byte file", path=storage.path, offset=log_offset)
    log = storage.read(log_offset, log_length)
    entries = find_active_sequence(log, log_guid, log_offset=log_offset)
    if not entries:
        raise LogReplayError(f"the header's LogGuid {log_guid} is set but the log holds no valid "
                             f"sequence for it", path=storage.path, offset=log_offset)
    head = entries[-1]
    if file_size < head.flushed_file_offset:
        raise LogReplayError(f"file is {file_size} bytes but the log says {head.flushed_file_offset} "
                             f"were durable: the file was truncated", path=storage.path,
                             offset=log_offset + head.position)
    check_replay_bounds(entries, file_size, path=storage.path, log_offset=log_offset)
    patches = [w for e in entries for w in e.writes]
    return ReplayPlan(entries, patches, head.flushed_file_offset, head.last_file_offset)


def check_replay_bounds(entries: list[LogEntry], file_size: int, *, path: str, log_offset: int) -> None:
    """Refuse a replay that would grow the file or write zeros past the bounds of the module
    docstring; nothing has been written or allocated when this raises."""
    error = _first_out_of_bounds(entries, file_size, path=path, log_offset=log_offset)
    if error is not None:
        raise error


def replayable_prefix(entries: list[LogEntry], file_size: int, *, path: str, log_offset: int) -> int:
    """How many leading ``entries`` :func:`check_replay_bounds` accepts as a sequence (the longest
    such prefix), found in one pass: a crafted log of 256 Ki entries costs no more than one check."""
    zero_budget, zeros, best = file_size, 0, 0
    for n, e in enumerate(entries, 1):
        if _entry_out_of_bounds(e, file_size, path=path, log_offset=log_offset) is not None:
            break  # no longer prefix can pass either
        zero_budget = max(zero_budget, e.last_file_offset)
        zeros += sum(item for _, item in e.writes if isinstance(item, int))
        if zeros <= zero_budget:  # the running totals only grow: this prefix's check passes
            best = n
    return best


def _entry_out_of_bounds(e: LogEntry, file_size: int, *, path: str, log_offset: int) -> LogReplayError | None:
    """Why one entry, on its own, may not be replayed into a ``file_size``-byte file (or None)."""
    limit = -(-file_size // C.ALIGNMENT) * C.ALIGNMENT + MAX_REPLAY_GROWTH
    where = log_offset + e.position
    if e.last_file_offset > limit:
        return LogReplayError(f"log entry {e.sequence_number} claims structures up to 0x{e.last_file_offset:x}, "
                              f"over 1 GiB past the end of the {file_size}-byte file; refusing to replay it",
                              path=path, offset=where)
    extent = max(file_size, e.last_file_offset)
    for target, item in e.writes:
        length = item if isinstance(item, int) else len(item)
        if target + length > extent:
            return LogReplayError(f"log entry {e.sequence_number} writes {length} bytes at 0x{target:x}, past "
                                  f"0x{extent:x} (the larger of the file size and the entry's LastFileOffset); "
                                  f"refusing to replay it", path=path, offset=where)
    return None


def _first_out_of_bounds(entries: list[LogEntry], file_size: int, *, path: str,
                         log_offset: int) -> LogReplayError | None:
    """Why replaying ``entries`` in order breaks a bound (the first entry that does), or None."""
    zero_budget = max([file_size] + [e.last_file_offset for e in entries])
    zeros = 0
    for e in entries:
        error = _entry_out_of_bounds(e, file_size, path=path, log_offset=log_offset)
        if error is not None:
            return error
        zeros += sum(item for _, item in e.writes if isinstance(item, int))
        if zeros > zero_budget:
            return LogReplayError(f"the log's zero descriptors add up to {zeros} bytes, more than the "
                                  f"{zero_budget}-byte file can hold; refusing to replay it", path=path,
                                  offset=log_offset + e.position)
    return None

def apply_replay(storage: Storage, plan: ReplayPlan) -> None:
    """Write the replay into the file, extend it to LastFileOffset, flush.

    An OSError comes out as a VhdxError naming the file and offset; the header still names
    the log then, so the next open replays it again (replay is repeatable).
    """
    zeros = bytes(1 << 20)
    at: int | None = None
    try:
        for target, item in plan.patches:
            at = target
            if isinstance(item, int):
                done = 0
                while done < item:
                    n = min(len(zeros), item - done)
                    at = target + done
                    storage.write(zeros[:n], at)
                    done += n
            else:
                storage.write(item, target)
        at = plan.last_file_offset
        if storage.size() < plan.last_file_offset:
            storage.truncate(plan.last_file_offset)
        at = None
        storage.flush()
    except OSError as e:
        raise storage_error(e, "log replay", path=storage.path, offset=at) from e


def build_entry(*, log_guid: uuid.UUID, sequence_number: int, tail: int, pages: list[tuple[int, bytes]],
                flushed_file_offset: int, last_file_offset: int) -> bytes:
    """One log entry holding a data descriptor and data sector per 4 KiB page."""
    n = len(pages)
    n_desc = descriptor_sectors(n)
    total = (n_desc + n) * SECTOR
    buf = bytearray(total)
    buf[:C.LOG_ENTRY_HEADER_SIZE] = LogEntryHeader.build(dict(
        checksum=0, entry_length=total, tail=tail, sequence_number=sequence_number, descriptor_count=n,
        reserved=0, log_guid=log_guid, flushed_file_offset=flushed_file_offset,
        last_file_offset=last_file_offset))
    high, low = sequence_number >> 32, sequence_number & 0xFFFFFFFF
    for i, (target, page) in enumerate(pages):
        if len(page) != SECTOR or target % SECTOR:
            raise ValueError("log pages must be 4 KiB, 4 KiB aligned")
        at = C.LOG_ENTRY_HEADER_SIZE + C.LOG_DESCRIPTOR_SIZE * i
        buf[at:at + C.LOG_DESCRIPTOR_SIZE] = DataDescriptor.build(dict(
            trailing_bytes=page[4092:4096], leading_bytes=page[:8], file_offset=target,
            sequence_number=sequence_number))
        s = (n_desc + i) * SECTOR
        buf[s:s + SECTOR] = DataSector.build(dict(sequence_high=high, data=page[8:4092], sequence_low=low))
    stamp(buf)
    return bytes(buf)


class LogWriter:
    """Appends entries to the ring; each entry is applied and flushed before the next (§8.7)."""

    def __init__(self, storage: Storage, log_offset: int, log_length: int, log_guid: uuid.UUID,
                 first_sequence: int) -> None:
        self.storage = storage
        self.log_offset = log_offset
        self.log_length = log_length
        self.log_guid = log_guid
        self.sequence_number = first_sequence
        self.head = 0
        # The last entry whose pages are applied but perhaps not yet flushed: the next entry's Tail,
        # so that a replay still covers it; None once a flush has made the application durable.
        self.unsettled: int | None = None

    @property
    def max_pages(self) -> int:
        """Pages one entry may carry: an entry never takes more than half the ring."""
        budget = self.log_length // 2 // SECTOR
        n = budget - 1
        while n > 0 and descriptor_sectors(n) + n > budget:
            n -= 1
        return n

    def _write_ring(self, data: bytes) -> None:
        first = min(len(data), self.log_length - self.head)
        at = self.log_offset + self.head
        try:
            self.storage.write(data[:first], at)
            if first < len(data):
                at = self.log_offset
                self.storage.write(data[first:], at)
        except OSError as e:
            raise storage_error(e, "log write", path=self.storage.path, offset=at) from e
        self.head = (self.head + len(data)) % self.log_length

    def write_entry(self, pages: list[tuple[int, bytes]], *, file_size: int) -> None:
        """Write one entry and flush; the caller applies its pages and need not flush them (§8.7).

        Its Tail is the entry before it if that one's application may not be durable yet (the
        flush of this entry makes it durable), else itself; so a replay covers every entry whose
        pages could be torn or missing. Two entries of at most half the ring each always fit.
        ``file_size`` is the durable size of the file: FlushedFileOffset is it rounded
        down to 1 MiB (never more than what is on disk), LastFileOffset rounded up.
        """
        if len(pages) > self.max_pages:
            raise ValueError("too many pages for one log entry")
        mib = C.ALIGNMENT
        entry = build_entry(log_guid=self.log_guid, sequence_number=self.sequence_number,
                            tail=self.head if self.unsettled is None else self.unsettled,
                            pages=pages, flushed_file_offset=file_size // mib * mib,
                            last_file_offset=-(-file_size // mib) * mib)
        self.sequence_number += 1
        position = self.head
        at = self.log_offset + position
        self._write_ring(entry)
        try:
            self.storage.flush()
        except OSError as e:
            raise storage_error(e, "flush of the log entry", path=self.storage.path, offset=at) from e
        self.unsettled = position if pages else None

    def settled(self) -> None:
        """A flush of the file made every applied entry durable: the next entry's Tail is itself."""
        self.unsettled = None
