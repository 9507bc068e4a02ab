"""One .vhdx/.avhdx file: open and validate it, its block states, and the read path.

An Image knows nothing about its parent: reads that fall through (NOT_PRESENT blocks, clear bits)
call the ``fallthrough`` function they are handed. Every change goes through its Writer.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable

import numpy as np

from ..errors import CorruptError, ReadOnlyError, UsageError
from ..format import bat as batmod
from ..format import bitmap as bitmapmod
from ..format import constants as C
from ..format.geometry import as_offset
from ..format.records import Header, MetadataItem, RegionEntry
from . import parsecache
from .batowner import BatOwner
from .buffers import readinto_file
from .copy import Progress
from .describe import describe
from .headsection import HeaderSection
from .extents import Extent
from .log import LogEntry, plan_replay
from .storage import FileStorage, OverlayStorage, Storage
from .writer import Writer

Fallthrough = Callable[[memoryview, int], None]


def zero_fill(view: memoryview) -> None:
    """memset: zeros without reading a source buffer."""
    np.frombuffer(view, dtype=np.uint8).fill(0)


MODES = {"r": "r", "rb": "r", "r+": "r+", "r+b": "r+", "rb+": "r+"}  # what open() accepts, as "r" or "r+"


class Image(HeaderSection, BatOwner):
    """A parsed VHDX file on a :class:`Storage`. Use :meth:`open` or :func:`vhdx.file.create.create_image`."""

    def __init__(self, storage: Storage, *, owns_storage: bool = True) -> None:
        self.storage = storage
        self.path = storage.path
        self.writable = storage.writable
        self._owns_storage = owns_storage
        self.closed = False
        self.headers: list[Header | None] = [None, None]
        self.header_errors: list[str | None] = [None, None]
        self.current_header_index = 0
        self.headers_identical = False
        self.region_table: list[RegionEntry] = []
        self.region_table_errors: list[str | None] = [None, None]
        self.log_replayed: list[LogEntry] = []
        self.log_was_dirty = False
        self.log_replayed_in_memory = False
        self.writer = Writer(self)
        self.cache_key: Any = None  # this unchanged file's key in parsecache (read-only opens)
        self.bat_validated = False

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r", *, storage: Storage | None = None,
             share: bool = False) -> "Image":
        """Open one file: "r" takes a shared lock, "r+" an exclusive one; ``share`` (read-only)
        takes no lock and ignores other processes' locks (see :mod:`vhdx.storage`). "rb" and "r+b"
        (or "rb+") are the same as "r" and "r+": a disk is always binary."""
        if mode not in MODES:
            raise UsageError(f"mode {mode!r}: use 'r' or 'r+' ('rb', 'r+b')", path=path)
        mode = MODES[mode]
        writable = mode == "r+"
        if share and writable:
            raise UsageError("share=True (--force-share) is for reading only; a writer needs the "
                             "file to itself", path=path)
        if storage is None:
            storage = FileStorage(path, writable=writable, lock=None if share else "auto")
        elif writable and not storage.writable:
            raise ReadOnlyError("storage is read-only but mode is 'r+'", path=path)
        return cls.loaded(storage)

    @classmethod
    def open_headers(cls, storage: Storage) -> "Image":
        """Only the headers, region table and metadata of a file on ``storage``, read-only.

        Enough for a folder scan to learn the GUIDs and the parent locator without reading
        the BAT; nothing that reads or writes blocks works on the result. Close it after use.
        """
        if storage.writable:
            raise UsageError("open_headers reads only", path=storage.path)
        return cls.loaded(storage, header_only=True)

    @classmethod
    def loaded(cls, storage: Storage, *, owns_storage: bool = True, header_only: bool = False) -> "Image":
        """An Image of ``storage``, loaded; closed again (and the error raised) if loading fails."""
        image = cls(storage, owns_storage=owns_storage)
        try:
            image.load(header_only=header_only)
        except BaseException:
            image.abort()
            raise
        return image

    def load(self, *, salvage: bool = False, header_only: bool = False) -> None:
        """Parse everything; ``salvage`` (for ``vhdx check``) skips the BAT checks that
        :func:`vhdx.check.check_image` reports as findings instead; ``header_only`` stops
        before the BAT."""
        self.read_identifier(self.storage.size())
        pair = self.read_headers()
        if self._from_cache(pair, salvage=salvage, header_only=header_only):
            return
        self.select_header(pair)
        if self.header.log_guid != C.ZERO_GUID:
            self.cache_key = None  # a log to replay: this open's view is not the file's
            self._replay_log(self.header)
        self.load_regions()
        self.load_metadata()
        if not header_only:
            self.load_bat(salvage=salvage)
        parsecache.put(self.cache_key, parsecache.parsed(self))

    def _from_cache(self, pair: bytes, *, salvage: bool, header_only: bool) -> bool:
        """Load from :mod:`.parsecache` if this file, unchanged (same headers), was parsed before by a
        locked read-only open of it with a clean log; else note its key for after the parse."""
        if self.writable or getattr(self.storage, "lock_mode", None) is None:
            return False  # unlocked (--force-share): another process may be changing the file
        key = parsecache.key_of(self.storage.fileno(), pair)
        self.cache_key = key
        if not parsecache.restore(self, parsecache.get(key), header_only=header_only):
            return False
        if not header_only and self.scanned is None:
            self.load_bat(salvage=salvage)  # a scan stored the headers only
        elif not (header_only or salvage or self.bat_validated):
            self.validate_bat()  # a salvage open stored the entries: check them, no rescan
        parsecache.put(key, parsecache.parsed(self))
        return True

    def _replay_log(self, header: Header) -> None:
        plan = plan_replay(self.storage, header.log_offset, header.log_length, header.log_guid)
        self.log_was_dirty = True
        self.log_replayed = plan.entries
        if self.writable:
            self.writer.replay(plan)
        else:
            self.storage = OverlayStorage(self.storage, plan.patches, plan.last_file_offset)
            self.log_replayed_in_memory = True

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        """The virtual disk's size in bytes."""
        return self.metadata.virtual_disk_size

    @property
    def block_size(self) -> int:
        """The payload block size in bytes."""
        return self.metadata.block_size

    @property
    def logical_sector_size(self) -> int:
        """The logical sector size (512 or 4096)."""
        return self.metadata.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        """The physical sector size (512 or 4096)."""
        return self.metadata.physical_sector_size

    @property
    def has_parent(self) -> bool:
        """True for a differencing file."""
        return self.metadata.has_parent

    @property
    def disk_type(self) -> str:
        """"differencing", "fixed" or "dynamic"."""
        if self.metadata.has_parent:
            return "differencing"
        return "fixed" if self.metadata.leave_block_allocated else "dynamic"

    @property
    def failed(self) -> bool:
        """True after a write failed part way: the log is left for the next open to replay."""
        return self.writer.failed

    def bat_index(self, block: int) -> int:
        """BAT index of payload block ``block`` (sector-bitmap slots interleaved, §5.2)."""
        return self.geometry.payload_bat_index(block)

    # ------------------------------------------------------------------ reading

    def read_bitmap(self, block: int) -> np.ndarray:
        """Block ``block``'s sector bitmap bits (one uint8 0/1 per sector)."""
        g = self.geometry
        chunk = block // g.chunk_ratio
        sbm_index = g.sbm_bat_index(chunk)
        entry = int(self.bat[sbm_index])
        if entry & C.BAT_STATE_MASK != C.SB_BLOCK_PRESENT:
            raise CorruptError(f"block {block} is PARTIALLY_PRESENT but the sector bitmap of chunk {chunk} "
                               f"is not present", path=self.path, offset=self.bat_region.file_offset + 8 * sbm_index)
        if self.bat_lazy:
            self.check_bitmap_entry(sbm_index, entry)
        lo, hi = g.bitmap_byte_range(block)
        raw = self.storage.read((entry & C.BAT_FILE_OFFSET_MASK) + lo, hi - lo)
        return bitmapmod.unpack(raw)

    def readinto_at(self, view: memoryview, offset: int, fallthrough: Fallthrough | None = None) -> None:
        """Fill ``view`` with virtual bytes from ``offset``; the range must lie inside the disk (UsageError)."""
        offset = as_offset(offset, "offset", self.path)
        if offset + len(view) > self.size:
            raise UsageError(f"read of {len(view)} bytes at {offset} runs past the end of the {self.size}-byte disk",
                             path=self.path)
        bs = self.block_size
        has_parent = self.has_parent
        total = len(view)
        done = 0
        while done < total:
            pos = offset + done
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, total - done)
            entry = int(self.bat[self.bat_index(block)])
            state = entry & C.BAT_STATE_MASK
            if self.bat_lazy and batmod.holds_data(state):
                self.check_read_entry(block, entry)  # a large BAT is checked as reads use it
            if state == C.PAYLOAD_BLOCK_FULLY_PRESENT or (state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
                                                          and not has_parent):
                n = self._read_present(view, done, pos, n, entry)
            elif state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                self._read_partial(view[done:done + n], block, in_block, entry, fallthrough)
            elif state == C.PAYLOAD_BLOCK_NOT_PRESENT and has_parent and fallthrough is not None:
                fallthrough(view[done:done + n], pos)
            else:
                zero_fill(view[done:done + n])
            done += n

    def _read_present(self, view: memoryview, done: int, pos: int, n: int, entry: int) -> int:
        """Read a present block's bytes, and the following blocks that sit right after it in
        the file (one read); returns how many bytes were read."""
        bs, total = self.block_size, len(view)
        block = pos // bs
        file_offset = (entry & C.BAT_FILE_OFFSET_MASK) + pos % bs
        while done + n < total and (pos + n) % bs == 0:
            nxt = int(self.bat[self.bat_index(block + 1)])
            if nxt & C.BAT_STATE_MASK != C.PAYLOAD_BLOCK_FULLY_PRESENT or \
                    (nxt & C.BAT_FILE_OFFSET_MASK) != file_offset + n:
                break
            if self.bat_lazy:
                self.check_read_entry(block + 1, nxt)
            block += 1
            n += min(bs, total - done - n)
        readinto_file(self.storage, view[done:done + n], file_offset)
        return n

    def _read_partial(self, out: memoryview, block: int, in_block: int, entry: int,
                      fallthrough: Fallthrough | None) -> None:
        """Read part of a partially present block: runs of set bits from this file, the rest
        from ``fallthrough`` (or zeros)."""
        ss, bs, n = self.logical_sector_size, self.block_size, len(out)
        file_base = entry & C.BAT_FILE_OFFSET_MASK
        first_sector = in_block // ss
        bits = self.read_bitmap(block)[first_sector:-(-(in_block + n) // ss)]
        starts, stops, values = bitmapmod.runs(bits)
        for s0, s1, v in zip(starts.tolist(), stops.tolist(), values.tolist()):
            a = max(in_block, (first_sector + s0) * ss)
            b = min(in_block + n, (first_sector + s1) * ss)
            piece = out[a - in_block:b - in_block]
            if v:
                self.storage.readinto(piece, file_base + a)
            elif fallthrough is not None:
                fallthrough(piece, block * bs + a)
            else:
                zero_fill(piece)

    # ------------------------------------------------------------------ writing (the writer's)

    def begin_session(self, *, data_change: bool, data_write_guid: uuid.UUID | None = None) -> None:
        """See :meth:`Writer.begin_session`."""
        self.writer.begin_session(data_change=data_change, data_write_guid=data_write_guid)

    def write_at(self, data: memoryview, offset: int) -> None:
        """Write virtual bytes (see :meth:`Writer.write_at`)."""
        self.writer.write_at(data, offset)

    def write_extents(self, extents: list[Extent], *, progress: Progress | None = None) -> None:
        """Write a batch of extents as one transaction (see :meth:`Writer.write_extents`)."""
        self.writer.write_extents(extents, progress=progress)

    def set_block_entries(self, updates: dict[int, int]) -> None:
        """Log BAT entry changes (see :meth:`Writer.set_block_entries`)."""
        self.writer.set_block_entries(updates)

    def write_metadata_items(self, items: list[MetadataItem], *, data_change: bool = True) -> None:
        """Rewrite the metadata region through the log (see :meth:`Writer.write_metadata_items`)."""
        self.writer.write_metadata_items(items, data_change=data_change)

    def write_parent_locator(self, pairs: dict[str, str]) -> None:
        """Replace the parent locator item (see :meth:`Writer.write_parent_locator`)."""
        self.writer.write_parent_locator(pairs)

    def trim_unreferenced_tail(self) -> int:
        """Give back unreferenced space at the end (see :meth:`Writer.trim_unreferenced_tail`)."""
        return self.writer.trim_unreferenced_tail()

    def flush(self) -> None:
        """Make every earlier write durable."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and mark the log clean (LogGuid zero), unless a write failed part way: then
        LogGuid stays set and the next open replays the last entry (docs/format.md §8.5)."""
        self._close(finish=True)

    def abort(self) -> None:
        """Close without finishing the session: the file stays as the last completed step left
        it (a log still marked active is replayed by the next open). For a failed open or build."""
        self._close(finish=False)

    def _close(self, *, finish: bool) -> None:
        if self.closed:
            return
        try:
            if finish:
                self.writer.finish()
        finally:
            self.closed = True
            if self._owns_storage:
                self.storage.close()

    # ------------------------------------------------------------------ describing

    def info(self) -> dict[str, Any]:
        """Everything about the file as JSON-ready values (``vhdx info``)."""
        return describe(self)
