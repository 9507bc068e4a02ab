"""The one writer of a file's metadata: every change to one open .vhdx goes through here.

A :class:`Writer` belongs to one :class:`~vhdx.file.image.Image` and changes it in place:
sessions (a new FileWriteGuid, a log, a new DataWriteGuid before the first change), header
updates (the other slot first, §2.4), log transactions (:meth:`Writer.log_pages`),
allocation at the end of the file, extents, sector bitmaps, metadata items and the parent
locator, and replaying a dirty log into a writable file (§8.5). Every change to the BAT,
the sector bitmaps or the metadata region is a log transaction (:mod:`vhdx.file.log`).

An error part way through a change leaves the writer failed: it refuses further writes, and
closing leaves LogGuid set, so the next open replays the last log entry (whole) instead of
trusting metadata that may be torn.
"""

from __future__ import annotations

import functools
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import ReadOnlyError, UnsupportedError, UsageError, VhdxError
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from ..format.geometry import align_up, as_offset
from ..format.locator import build_parent_locator
from ..format.records import MetadataItem, build_header, build_metadata_region, metadata_items
from .copy import Copier, Progress, write_at
from .extents import Extent, Transaction, split_extents
from .log import LogWriter, ReplayPlan, apply_replay, storage_error
from .storage import Storage

if TYPE_CHECKING:
    from .image import Image

MAX_TX_BLOCKS = 64  # payload blocks allocated per log transaction (write_at)
_ZEROS = bytes(4 << 20)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _changes_file(method: _Method) -> _Method:
    """Mark a Writer method that writes: an error part way through leaves the writer failed.

    An OSError comes out as a VhdxError naming the file.
    """
    @functools.wraps(method)
    def run(self: "Writer", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (UsageError, ReadOnlyError):
            raise  # refused before anything was written
        except OSError as e:
            error = storage_error(e, method.__name__.strip("_").replace("_", " "), path=self.image.path)
            self.fail(error)
            raise error from e
        except BaseException as e:
            self.fail(e)
            raise
    return run  # type: ignore[return-value]


class Writer:
    """The writer of one open Image (see the module docstring)."""

    def __init__(self, image: "Image") -> None:
        self.image = image
        self.session_started = False
        self.data_guid_rotated = False
        self.log_writer: LogWriter | None = None
        self.failure: BaseException | None = None
        self.copier: Copier | None = None

    # ------------------------------------------------------------------ state

    @property
    def failed(self) -> bool:
        """True after a write failed part way: the log is left for the next open to replay."""
        return self.failure is not None

    def fail(self, error: BaseException) -> None:
        """Remember the first error that interrupted a change."""
        if self.failure is None:
            self.failure = error

    def check_writable(self) -> None:
        """Raise unless the image is open for writing, open, and no earlier change failed."""
        image = self.image
        if not image.writable:
            raise ReadOnlyError("opened read-only", path=image.path)
        if image.closed:
            raise VhdxError("image is closed", path=image.path)
        if self.failure is not None:
            e = self.failure
            why = e.detail if isinstance(e, VhdxError) else (str(e) or type(e).__name__)
            raise VhdxError(f"an earlier change failed ({why}); no more writes: close the disk and open it "
                            f"again (the open replays its log)", path=image.path)

    # ------------------------------------------------------------------ the file

    @property
    def storage(self) -> Storage:
        """The image's storage."""
        return self.image.storage

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Write bytes of the file at ``offset``."""
        write_at(self.storage, data, offset)

    def sync(self) -> None:
        """Flush the storage (an OSError becomes a VhdxError)."""
        try:
            self.storage.flush()
        except OSError as e:
            raise storage_error(e, "flush", path=self.image.path) from e
        if self.log_writer is not None:
            self.log_writer.settled()

    def truncate(self, size: int) -> None:
        """Resize the file (an OSError becomes a VhdxError)."""
        try:
            self.storage.truncate(size)
        except OSError as e:
            raise storage_error(e, f"resize to {size} bytes", path=self.image.path, offset=size) from e

    def allocate(self, nbytes: int) -> int:
        """Space at the 1 MiB-aligned end of the file; the file is extended (reads as zeros)."""
        start = align_up(self.storage.size())
        self.truncate(start + nbytes)
        return start

    def write_zeros(self, file_offset: int, length: int) -> None:
        """Write ``length`` zero bytes at ``file_offset``."""
        done = 0
        while done < length:
            n = min(len(_ZEROS), length - done)
            self.write(_ZEROS[:n], file_offset + done)
            done += n

    # ------------------------------------------------------------------ headers and sessions

    @_changes_file
    def update_headers(self, **changes: Any) -> None:
        """Safe header update (§2.4): write the other slot, flush, then the first slot, flush."""
        image = self.image
        current = image.header
        if current.sequence_number + 2 > 0xFFFFFFFFFFFFFFFF:
            raise UnsupportedError("the header sequence number is exhausted; the file cannot be updated",
                                   path=image.path, offset=C.HEADER_OFFSETS[image.current_header_index])
        new = current.replace(sequence_number=current.sequence_number + 1, **changes)
        other = 1 - image.current_header_index
        for slot in (other, image.current_header_index):
            raw = build_header(new)
            self.write(raw, C.HEADER_OFFSETS[slot])
            self.sync()
            image.headers[slot] = new.replace(checksum=int.from_bytes(raw[4:8], "little"))
            image.current_header_index = slot
            image.header_errors[slot] = None
            new = new.replace(sequence_number=new.sequence_number + 1)
        image.headers_identical = False

    def replay(self, plan: ReplayPlan) -> None:
        """Replay a dirty log into the file: a new FileWriteGuid before the replay writes,
        LogGuid cleared after (§8.5)."""
        self.update_headers(file_write_guid=uuid.uuid4())
        self.session_started = True
        apply_replay(self.storage, plan)
        self.update_headers(log_guid=C.ZERO_GUID)

    @_changes_file
    def begin_session(self, *, data_change: bool, data_write_guid: uuid.UUID | None = None) -> None:
        """Before the first change of this open: new FileWriteGuid, log session, new DataWriteGuid.

        ``data_write_guid`` chooses the new DataWriteGuid (a merge announces it to the
        child first); if the header already carries it, it is kept.
        """
        self.check_writable()
        need_log = self.log_writer is None
        need_data = data_change and not self.data_guid_rotated
        if not need_log and not need_data:
            return
        changes: dict[str, Any] = {}
        if not self.session_started:
            changes["file_write_guid"] = uuid.uuid4()
            self.session_started = True
        if need_data:
            if data_write_guid is None:
                changes["data_write_guid"] = uuid.uuid4()
            elif data_write_guid != self.image.header.data_write_guid:
                changes["data_write_guid"] = data_write_guid
            self.data_guid_rotated = True
        if need_log:
            changes["log_guid"] = self._start_log()
        self.update_headers(**changes)

    def _start_log(self) -> uuid.UUID:
        """A log session with a new LogGuid, its initial empty entry durable (§8.7)."""
        h = self.image.header
        if h.log_length < 2 * C.MiB // 2 or h.log_offset < C.HEADER_SECTION_SIZE:
            raise UnsupportedError("the file has no log region; cannot update metadata safely",
                                   path=self.image.path)
        log_guid = uuid.uuid4()
        writer = LogWriter(self.storage, h.log_offset, h.log_length, log_guid,
                           first_sequence=secrets.randbits(40) + 1)
        # The initial empty entry is durable before any header names its LogGuid.
        writer.write_entry([], file_size=self.storage.size())
        self.log_writer = writer
        return log_guid

    @_changes_file
    def flush(self) -> None:
        """Make every earlier write durable."""
        if self.image.writable and not self.image.closed:
            self.sync()

    def finish(self) -> None:
        """At close: flush and mark the log clean (LogGuid zero), unless nothing was logged or
        a change failed part way (then LogGuid stays set for the next open to replay)."""
        if self.image.writable and self.failure is None and self.log_writer is not None:
            self.flush()
            self.update_headers(log_guid=C.ZERO_GUID)
            self.log_writer = None

    # ------------------------------------------------------------------ log transactions

    @_changes_file
    def log_pages(self, pages: dict[int, bytes]) -> None:
        """Make metadata page changes durable through the log: entry, flush, apply. The pages
        applied are flushed by the next flush of the file (the data flush of the next
        transaction, the next entry's, the one at close); until then the log covers them."""
        if not pages:
            return
        self.begin_session(data_change=False)
        writer = self.log_writer
        assert writer is not None
        # Bitmap and other pages before BAT pages: if a transaction needs several entries, a
        # BAT entry never becomes durable before the bits it relies on.
        bat_lo = self.image.bat_region.file_offset
        bat_hi = bat_lo + self.image.bat_region.length
        items = sorted(pages.items(), key=lambda kv: (bat_lo <= kv[0] < bat_hi, kv[0]))
        per_entry = writer.max_pages
        for i in range(0, len(items), per_entry):
            group = items[i:i + per_entry]
            writer.write_entry(group, file_size=self.storage.size())
            for target, page in group:
                self.write(page, target)

    def bat_pages(self, bat_indexes: set[int], changes: dict[int, int] | None = None) -> dict[int, bytes]:
        """The 4 KiB BAT pages holding ``bat_indexes``, with ``changes`` applied."""
        base = self.image.bat_region.file_offset
        per_page = C.LOG_SECTOR_SIZE // 8
        entries = {page: self.image.bat[page * per_page:(page + 1) * per_page].copy()
                   for page in {i // per_page for i in bat_indexes}}
        for idx, entry in (changes or {}).items():
            entries[idx // per_page][idx % per_page] = entry
        pages = {}
        for page, values in entries.items():
            raw = batmod.encode_bat(values)
            pages[base + page * C.LOG_SECTOR_SIZE] = raw + bytes(C.LOG_SECTOR_SIZE - len(raw))
        return pages

    @_changes_file
    def set_block_entries(self, updates: dict[int, int]) -> None:
        """Log a set of BAT entry changes (bat_index -> raw entry) atomically per page group."""
        self.begin_session(data_change=True)
        self.log_pages(self.bat_pages(set(updates), updates))
        for idx, entry in updates.items():
            self.image.bat[idx] = entry
        self.image.bat_changed()

    @_changes_file
    def write_metadata_items(self, items: list[MetadataItem], *, data_change: bool = True) -> None:
        """Rewrite the metadata region through the log."""
        self.begin_session(data_change=data_change)
        r = self.image.metadata_region
        raw = build_metadata_region(items, r.length)
        old = self.storage.read(r.file_offset, r.length)
        pages = {}
        for at in range(0, r.length, C.LOG_SECTOR_SIZE):
            if raw[at:at + C.LOG_SECTOR_SIZE] != old[at:at + C.LOG_SECTOR_SIZE]:
                pages[r.file_offset + at] = raw[at:at + C.LOG_SECTOR_SIZE]
        self.log_pages(pages)
        self.image.load_metadata()

    def write_parent_locator(self, pairs: dict[str, str]) -> None:
        """Replace the parent locator item (through the log); the DataWriteGuid stays (§9.4)."""
        items = [it if it.item_id != C.PARENT_LOCATOR_GUID else
                 MetadataItem(it.item_id, build_parent_locator(pairs), it.flags)
                 for it in metadata_items(self.image.metadata)]
        self.write_metadata_items(items, data_change=False)

    @_changes_file
    def trim_unreferenced_tail(self) -> int:
        """Give back space past the last structure the file references; returns bytes freed.

        An interrupted transaction can leave allocated blocks that no BAT entry points at (data
        is written before the BAT update). Call only before the session's first log entry,
        so no log entry can claim a larger durable size.
        """
        self.check_writable()
        image = self.image
        if self.log_writer is not None:
            raise VhdxError("trim only before the first change of a session", path=image.path)
        spans = layout.structure_spans(image.header, image.region_table)
        end = align_up(layout.referenced_end(spans, layout.allocations_of(image.sparse(), image.geometry)))
        size = self.storage.size()
        if size <= end:
            return 0
        if not self.session_started:  # a new FileWriteGuid before the file changes (§2.3), no log yet
            self.update_headers(file_write_guid=uuid.uuid4())
            self.session_started = True
        self.truncate(end)
        self.sync()
        return size - end

    # ------------------------------------------------------------------ extents

    def write_at(self, data: memoryview, offset: int) -> None:
        """Write virtual bytes. In a differencing file, ``offset`` and ``len(data)`` must be sector aligned."""
        self.check_writable()
        image = self.image
        offset = as_offset(offset, "offset", image.path)
        total = len(data)
        if total == 0:
            return
        if offset + total > image.size:
            raise UsageError(f"write of {total} bytes at {offset} is outside the {image.size}-byte disk",
                             path=image.path)
        ss = image.logical_sector_size
        if image.has_parent and (offset % ss or total % ss):
            raise UsageError("differencing writes must be sector aligned", path=image.path)
        self.begin_session(data_change=True)
        # Split into transactions of a bounded number of blocks.
        step = image.block_size * MAX_TX_BLOCKS
        done = 0
        while done < total:
            pos = offset + done
            n = min(total - done, step - pos % step)
            self.write_extents([(pos, n, data[done:done + n])])
            done += n

    @_changes_file
    def write_extents(self, extents: list[Extent], *, progress: Progress | None = None) -> None:
        """Write a batch of non-overlapping extents as one transaction (docs/format.md §7.2 - §7.4).

        Each extent is ``(virtual_offset, length, source)``; ``source`` is a buffer holding
        the bytes, ``(storage, file_offset)`` to copy from another file, or None for zeros.
        Blocks are allocated in one go at the end of the file; data is written and flushed
        before one log transaction updates the BAT and the sector bitmaps that point at it.
        """
        self.check_writable()
        if not extents:
            return
        per_block = split_extents(self.image, extents)
        self.begin_session(data_change=True)  # after the checks: a refused call changes nothing
        Transaction(self, per_block).run(progress)
