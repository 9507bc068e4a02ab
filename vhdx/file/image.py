"""One .vhdx/.avhdx file: headers, regions, metadata, BAT, and block-level I/O.

An Image knows nothing about its parent: reads that fall through (NOT_PRESENT blocks
and clear bitmap bits of a differencing file) call the ``fallthrough`` function they
are handed. Every change to the BAT, sector bitmaps or metadata region goes through
:mod:`vhdx.log`; headers change only through :meth:`Image._update_headers`.
"""

from __future__ import annotations

import functools
import operator
import os
import secrets
import uuid
from typing import Any, Callable, TypeVar

import numpy as np

from .._version import __version__
from ..errors import (CorruptError, ReadOnlyError, TruncatedError, UnsupportedError, UsageError, VhdxError)
from ..format import bat as batmod
from ..format import bitmap as bitmapmod
from ..format import constants as C
from ..format.geometry import Geometry
from ..format.locator import build_parent_locator
from ..format.records import (Header, Metadata, MetadataItem, RegionEntry, build_file_identifier, build_header,
                             build_metadata_region, build_region_table, metadata_items, parse_creator,
                             parse_header, parse_metadata_region, parse_region_table, system_items,
                             validate_header_fields)
from .log import LogEntry, LogWriter, apply_replay, plan_replay, storage_error
from .outputs import publish, refuse_existing, remove_quietly, temporary_path
from .storage import FileStorage, OverlayStorage, Storage

Fallthrough = Callable[[memoryview, int], None]
Extent = tuple[int, int, Any]  # (virtual_offset, length, buffer | (storage, file_offset) | None)
# Measured with benchmarks/bench_merge.py on ext4 here (2 GiB child, cold cache): copy_file_range
# 1.59 s, a reused 1 MiB buffer 1.70 s, an 8 MiB buffer 2.4-3.7 s (cache misses), cp 1.19 s.
COPY_BUFFER_SIZE = int(os.environ.get("VHDX_COPY_BUFFER", 1 << 20))
WRITEBACK_EARLY = os.environ.get("VHDX_WRITEBACK_EARLY", "1") == "1" and hasattr(os, "posix_fadvise")
COPY_METHOD = os.environ.get("VHDX_COPY_METHOD", "copy_file_range" if hasattr(os, "copy_file_range") else "preadv")

_ZEROS = bytes(4 << 20)
_MAX_TX_BLOCKS = 64  # payload blocks allocated per log transaction
_RESERVED_STATE = 4  # a payload BAT state the format reserves (docs/format.md §5.3)
EAGER_BITMAP_CHUNKS = 64  # differencing disks up to 256 GiB (512-byte sectors) get their bitmaps at creation


def zero_fill(view: memoryview) -> None:
    """memset: zeros without reading a source buffer."""
    np.frombuffer(view, dtype=np.uint8).fill(0)


def _align_up(value: int, alignment: int = C.ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


def _block_state_name(state: int) -> str:
    return C.PAYLOAD_STATE_NAMES.get(state, str(state))


def as_offset(value: Any, what: str, path: str) -> int:
    """``value`` as a non-negative int; anything else is a UsageError naming ``what``."""
    try:
        number = operator.index(value)
    except TypeError:
        raise UsageError(f"{what} must be an integer, not {type(value).__name__}", path=path) from None
    if number < 0:
        raise UsageError(f"negative {what} {number}", path=path)
    return number


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _changes_file(method: _Method) -> _Method:
    """Mark an Image method that writes: an error part way through leaves the image failed.

    A failed image refuses further writes, and its close() leaves LogGuid set, so the next
    open replays the last log entry (whole) instead of trusting metadata that may be torn.
    An OSError comes out as a VhdxError naming the file.
    """
    @functools.wraps(method)
    def run(self: "Image", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (UsageError, ReadOnlyError):
            raise  # refused before anything was written
        except OSError as e:
            error = storage_error(e, method.__name__.strip("_").replace("_", " "), path=self.path)
            self._fail(error)
            raise error from e
        except BaseException as e:
            self._fail(e)
            raise
    return run  # type: ignore[return-value]


class _PendingBat:
    """BAT entries changed by a transaction, read through to the live BAT for the rest."""

    def __init__(self, bat: np.ndarray) -> None:
        self.bat = bat
        self.changes: dict[int, int] = {}

    def __getitem__(self, idx: int) -> int:
        return self.changes.get(idx, int(self.bat[idx]))

    def __setitem__(self, idx: int, entry: int) -> None:
        self.changes[int(idx)] = int(entry)


class Image:
    """A parsed VHDX file on a :class:`Storage`. Use :meth:`open` or :meth:`create`."""

    def __init__(self, storage: Storage, *, owns_storage: bool = True) -> None:
        self.storage = storage
        self.path = storage.path
        self.writable = storage.writable
        self._owns_storage = owns_storage
        self._closed = False
        self.headers: list[Header | None] = [None, None]
        self.header_errors: list[str | None] = [None, None]
        self.current_header_index = 0
        self.headers_identical = False
        self.region_table: list[RegionEntry] = []
        self.region_table_errors: list[str | None] = [None, None]
        self.log_replayed: list[LogEntry] = []
        self.log_was_dirty = False
        self.log_replayed_in_memory = False
        self._session_started = False
        self._data_guid_rotated = False
        self._log_writer: LogWriter | None = None
        self._failure: BaseException | None = None
        self.creator = ""

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: str = "r", *, storage: Storage | None = None,
             share: bool = False) -> "Image":
        """Open one file: "r" takes a shared lock, "r+" an exclusive one; ``share`` (read-only)
        takes no lock and ignores other processes' locks (see :mod:`vhdx.storage`)."""
        if mode not in ("r", "r+"):
            raise UsageError(f"mode {mode!r}: use 'r' or 'r+'", path=path)
        writable = mode == "r+"
        if share and writable:
            raise UsageError("share=True (--force-share) is for reading only; a writer needs the "
                             "file to itself", path=path)
        if storage is None:
            storage = FileStorage(path, writable=writable, lock=None if share else "auto")
        elif writable and not storage.writable:
            raise ReadOnlyError("storage is read-only but mode is 'r+'", path=path)
        image = cls(storage)
        try:
            image.load()
        except BaseException:
            image.close(_failed=True)
            raise
        return image

    @classmethod
    def open_headers(cls, storage: Storage) -> "Image":
        """Only the headers, region table and metadata of a file on ``storage``, read-only.

        Enough for a folder scan to learn the GUIDs and the parent locator without reading
        the BAT; nothing that reads or writes blocks works on the result. Close it after use.
        """
        if storage.writable:
            raise UsageError("open_headers reads only", path=storage.path)
        image = cls(storage)
        try:
            image.load(header_only=True)
        except BaseException:
            image.close(_failed=True)
            raise
        return image

    def load(self, *, salvage: bool = False, header_only: bool = False) -> None:
        """Parse everything; ``salvage`` (for ``vhdx check``) skips the BAT checks that
        :func:`vhdx.check.check_image` reports as findings instead; ``header_only`` stops
        before the BAT."""
        path = self.path
        file_size = self.storage.size()
        if file_size < C.HEADER_SECTION_SIZE:
            raise TruncatedError(f"{file_size} bytes: too short for a VHDX file (the header section "
                                 f"alone is 1 MiB)", path=path, offset=file_size)
        head = self.storage.read(0, C.REGION_TABLE2_OFFSET + C.REGION_TABLE_SIZE)
        if head[:8] != C.SIGNATURE_FILE:
            raise CorruptError("not a VHDX file (no 'vhdxfile' signature)", path=path, offset=0)
        self.creator = parse_creator(head, path=path)
        self._select_header(head)
        header = self.header
        if header.log_guid != C.ZERO_GUID:
            self._replay_log(header)
        self._load_regions()
        self._load_metadata()
        if not header_only:
            self._load_bat(salvage=salvage)

    def _select_header(self, head: bytes) -> None:
        """Valid CRC-32C, highest sequence number wins; identical headers are tolerated (§2.2)."""
        first_error: VhdxError | None = None
        for i, offset in enumerate(C.HEADER_OFFSETS):
            try:
                h = parse_header(head[offset:offset + C.HEADER_SIZE], path=self.path, offset=offset)
                validate_header_fields(h, path=self.path, offset=offset)
                self.headers[i] = h
            except VhdxError as e:
                self.header_errors[i] = e.detail
                first_error = first_error or e
        h1, h2 = self.headers
        if h1 is None and h2 is None:
            assert first_error is not None
            raise CorruptError(f"no valid header: header 1: {self.header_errors[0]}; "
                               f"header 2: {self.header_errors[1]}", path=self.path, offset=C.HEADER1_OFFSET)
        if h1 is not None and h2 is not None:
            if h1.sequence_number == h2.sequence_number:
                self.headers_identical = h1.replace(checksum=0) == h2.replace(checksum=0)
                if not self.headers_identical:
                    raise CorruptError(f"both headers carry sequence number {h1.sequence_number} but "
                                       f"differ", path=self.path, offset=C.HEADER1_OFFSET)
                self.current_header_index = 0
            else:
                self.current_header_index = 0 if h1.sequence_number > h2.sequence_number else 1
        else:
            self.current_header_index = 0 if h1 is not None else 1

    @property
    def header(self) -> Header:
        h = self.headers[self.current_header_index]
        assert h is not None
        return h

    def _replay_log(self, header: Header) -> None:
        plan = plan_replay(self.storage, header.log_offset, header.log_length, header.log_guid)
        self.log_was_dirty = True
        self.log_replayed = plan.entries
        if self.writable:
            # §8.5: a new FileWriteGuid before the replay writes, LogGuid cleared after.
            self._update_headers(file_write_guid=uuid.uuid4())
            self._session_started = True
            apply_replay(self.storage, plan)
            self._update_headers(log_guid=C.ZERO_GUID)
        else:
            self.storage = OverlayStorage(self.storage, plan.patches, plan.last_file_offset)
            self.log_replayed_in_memory = True

    def _load_regions(self) -> None:
        errors: list[VhdxError] = []
        for i, offset in enumerate(C.REGION_TABLE_OFFSETS):
            try:
                entries = parse_region_table(self.storage.read(offset, C.REGION_TABLE_SIZE),
                                             path=self.path, offset=offset)
                self._validate_regions(entries, offset)
            except VhdxError as e:
                self.region_table_errors[i] = e.detail
                errors.append(e)
                continue
            if not self.region_table:
                self.region_table = entries
        if not self.region_table:
            raise errors[0]

    def _validate_regions(self, entries: list[RegionEntry], table_offset: int) -> None:
        seen: set[uuid.UUID] = set()
        file_size = self.storage.size()
        spans = [(C.FILE_IDENTIFIER_OFFSET, C.HEADER_SECTION_SIZE, "header section")]
        h = self.header
        if h.log_length:
            spans.append((h.log_offset, h.log_offset + h.log_length, "log"))
        for e in entries:
            if e.guid in seen:
                raise CorruptError(f"region table: region {e.name} listed twice", path=self.path, offset=table_offset)
            seen.add(e.guid)
            known = e.guid in (C.BAT_REGION_GUID, C.METADATA_REGION_GUID)
            if not known and e.required & C.REGION_REQUIRED:
                raise UnsupportedError(f"unknown required region {e.guid}", path=self.path, offset=table_offset)
            if e.file_offset % C.ALIGNMENT or e.length % C.ALIGNMENT or e.file_offset < C.HEADER_SECTION_SIZE \
                    or e.length == 0:
                raise CorruptError(f"region {e.name}: at 0x{e.file_offset:x}, {e.length} bytes: not 1 MiB "
                                   f"aligned or inside the header section", path=self.path, offset=table_offset)
            if e.file_offset + e.length > file_size:
                raise TruncatedError(f"region {e.name} ends at 0x{e.file_offset + e.length:x}, past the end of "
                                     f"the {file_size}-byte file", path=self.path, offset=e.file_offset)
            spans.append((e.file_offset, e.file_offset + e.length, f"region {e.name}"))
        for guid, name in ((C.BAT_REGION_GUID, "BAT"), (C.METADATA_REGION_GUID, "metadata")):
            if guid not in seen:
                raise CorruptError(f"region table: no {name} region", path=self.path, offset=table_offset)
        spans.sort()
        for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
            if b0 < a1:
                raise CorruptError(f"{bn} at 0x{b0:x} overlaps {an}", path=self.path, offset=b0)

    def region(self, guid: uuid.UUID) -> RegionEntry:
        return next(e for e in self.region_table if e.guid == guid)

    def _load_metadata(self) -> None:
        r = self.region(C.METADATA_REGION_GUID)
        if r.length > C.MAX_METADATA_REGION_SIZE:
            raise UnsupportedError(f"metadata region of {r.length} bytes is over our 128 MiB limit",
                                   path=self.path, offset=r.file_offset)
        self.metadata_region = r
        self.metadata: Metadata = parse_metadata_region(self.storage.read(r.file_offset, r.length),
                                                        path=self.path, offset=r.file_offset)
        md = self.metadata
        self.geometry = Geometry(md.virtual_disk_size, md.block_size, md.logical_sector_size, md.has_parent)

    def _load_bat(self, *, salvage: bool = False) -> None:
        r = self.region(C.BAT_REGION_GUID)
        g = self.geometry
        needed = g.bat_entries * 8
        if r.length < needed:
            raise CorruptError(f"BAT region holds {r.length // 8} entries, the disk needs {g.bat_entries}",
                               path=self.path, offset=r.file_offset)
        if needed > C.MAX_BAT_REGION_SIZE:
            raise UnsupportedError(f"BAT of {needed} bytes is over the 513 MiB maximum", path=self.path,
                                   offset=r.file_offset)
        self.bat_region = r
        # Read straight into the array: the BAT is the one allocation that scales with the disk.
        self.bat = np.empty(_align_up(needed, C.LOG_SECTOR_SIZE) // 8, dtype="<u8")
        self.storage.readinto(self.bat.view(np.uint8).data, r.file_offset)
        self._cr = g.chunk_ratio
        if not salvage:
            self._validate_bat()

    def _validate_bat(self) -> None:
        """Refuse entries that would make reads go outside the file (docs/format.md §5.3)."""
        file_size = self.storage.size()
        entries = batmod.payload_entries(self.bat, self.geometry)
        st = batmod.states(entries)
        offs = batmod.file_offsets(entries)
        present = (st == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        bad = present & ((offs < C.HEADER_SECTION_SIZE) | (offs >= file_size))
        if bad.any():
            block = int(np.flatnonzero(bad)[0])
            bat_index = self.bat_index(block)
            raise CorruptError(f"BAT entry {bat_index} (block {block}): data at 0x{int(offs[block]):x}, outside "
                               f"the {file_size}-byte file", path=self.path,
                               offset=self.bat_region.file_offset + 8 * bat_index)
        # A block that runs past the end of the file: tolerated for the block that sits last in
        # the file (old qemu wrote a short last block, §6), a truncated file everywhere else.
        short = present & (offs + np.uint64(self.block_size) > np.uint64(file_size))
        if short.any():
            last = int(np.argmax(np.where(present, offs, 0)))
            short[last] = False
            if short.any():
                block = int(np.flatnonzero(short)[0])
                raise TruncatedError(f"block {block}: data at 0x{int(offs[block]):x} runs past the end of the "
                                     f"{file_size}-byte file: the file was cut short", path=self.path,
                                     offset=self.bat_region.file_offset + 8 * self.bat_index(block))
        if self.geometry.has_parent:
            sidx = batmod.sbm_indices(self.geometry)
            sst = batmod.states(self.bat[sidx])
            soff = batmod.file_offsets(self.bat[sidx])
            bad = (sst == C.SB_BLOCK_PRESENT) & ((soff < C.HEADER_SECTION_SIZE) | (soff + C.MiB > file_size))
            if bad.any():
                bat_index = int(sidx[int(np.flatnonzero(bad)[0])])
                raise CorruptError(f"BAT entry {bat_index}: sector bitmap outside the {file_size}-byte file",
                                   path=self.path, offset=self.bat_region.file_offset + 8 * bat_index)
        if self.writable:
            self._validate_for_writing(st, offs, present)

    def _validate_for_writing(self, st: np.ndarray, offs: np.ndarray, present: np.ndarray) -> None:
        """Refuse to write a file whose BAT holds an invalid state, or whose blocks or sector
        bitmaps share space with each other or with a structure.

        Reading such a file is harmless (a reserved payload state reads as zeros, ``vhdx check``
        reports it); writing it would spread the damage.
        """
        bat_base = self.bat_region.file_offset
        reserved = np.flatnonzero(st == _RESERVED_STATE)
        if reserved.size:
            k = int(reserved[0])
            raise CorruptError(f"BAT entry {self.bat_index(k)} (block {k}): reserved state 4; refusing to write",
                               path=self.path, offset=bat_base + 8 * self.bat_index(k))
        blocks = np.flatnonzero(present)
        starts = [offs[present].astype(np.int64)]
        lengths = [np.full(blocks.size, self.block_size, dtype=np.int64)]
        indexes = [blocks + blocks // self._cr]
        if self.geometry.has_parent:
            sidx = batmod.sbm_indices(self.geometry)
            sst = batmod.states(self.bat[sidx])
            bad = np.flatnonzero((sst != C.SB_BLOCK_PRESENT) & (sst != C.SB_BLOCK_NOT_PRESENT))
            if bad.size:
                bat_index = int(sidx[int(bad[0])])
                raise CorruptError(f"BAT entry {bat_index}: sector bitmap in invalid state {int(sst[int(bad[0])])}; "
                                   f"refusing to write", path=self.path, offset=bat_base + 8 * bat_index)
            sbm = sst == C.SB_BLOCK_PRESENT
            starts.append(batmod.file_offsets(self.bat[sidx][sbm]).astype(np.int64))
            lengths.append(np.full(int(sbm.sum()), C.SECTOR_BITMAP_BLOCK_SIZE, dtype=np.int64))
            indexes.append(sidx[sbm])
        self._validate_no_overlap(np.concatenate(starts), np.concatenate(lengths), np.concatenate(indexes))

    def _validate_no_overlap(self, starts: np.ndarray, lengths: np.ndarray, bat_indexes: np.ndarray) -> None:
        """Refuse allocations (payload blocks and sector bitmaps, given by file offset, length and
        BAT index) that overlap a structure of the file or each other."""
        spans = [(0, C.HEADER_SECTION_SIZE, "the header section")]
        h = self.header
        if h.log_length:
            spans.append((h.log_offset, h.log_offset + h.log_length, "the log"))
        spans += [(r.file_offset, r.file_offset + r.length, f"region {r.name}") for r in self.region_table]
        ends = starts + lengths
        for lo, hi, name in spans:
            hit = np.flatnonzero((starts < hi) & (ends > lo))
            if hit.size:
                self._refuse_overlap(int(bat_indexes[hit[0]]), int(starts[hit[0]]), name)
        order = np.argsort(starts, kind="stable")
        s, e = starts[order], ends[order]
        if s.size > 1:
            clash = np.flatnonzero(s[1:] < np.maximum.accumulate(e[:-1]))
            if clash.size:
                k = int(clash[0]) + 1
                self._refuse_overlap(int(bat_indexes[order[k]]), int(s[k]), "another block or sector bitmap")

    def _refuse_overlap(self, bat_index: int, start: int, other: str) -> None:
        g = self.geometry
        is_sbm = self.has_parent and bat_index % (g.chunk_ratio + 1) == g.chunk_ratio
        what = (f"sector bitmap of chunk {bat_index // (g.chunk_ratio + 1)}" if is_sbm else
                f"block {bat_index - bat_index // (g.chunk_ratio + 1)}")
        raise CorruptError(f"BAT entry {bat_index} ({what}): data at 0x{start:x} overlaps {other}; refusing to write",
                           path=self.path, offset=self.bat_region.file_offset + 8 * bat_index)

    # ------------------------------------------------------------------ properties

    @property
    def size(self) -> int:
        return self.metadata.virtual_disk_size

    @property
    def block_size(self) -> int:
        return self.metadata.block_size

    @property
    def logical_sector_size(self) -> int:
        return self.metadata.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        return self.metadata.physical_sector_size

    @property
    def has_parent(self) -> bool:
        return self.metadata.has_parent

    @property
    def disk_type(self) -> str:
        if self.metadata.has_parent:
            return "differencing"
        return "fixed" if self.metadata.leave_block_allocated else "dynamic"

    def bat_index(self, block: int) -> int:
        """BAT index of payload block ``block`` (sector-bitmap slots interleaved, §5.2)."""
        return block + block // self._cr

    def payload_states(self) -> np.ndarray:
        """State of every payload block (uint8 array, one per block)."""
        return batmod.states(batmod.payload_entries(self.bat, self.geometry))

    def payload_offsets(self) -> np.ndarray:
        return batmod.file_offsets(batmod.payload_entries(self.bat, self.geometry))

    # ------------------------------------------------------------------ reading

    def read_bitmap(self, block: int) -> np.ndarray:
        """Block ``block``'s sector bitmap bits (one uint8 0/1 per sector)."""
        g = self.geometry
        chunk = block // g.chunk_ratio
        sbm_index = g.sbm_bat_index(chunk)
        entry = int(self.bat[sbm_index])
        if entry & C.BAT_STATE_MASK != C.SB_BLOCK_PRESENT:
            raise CorruptError(f"block {block} is PARTIALLY_PRESENT but the sector bitmap of chunk {chunk} "
                               f"is not present", path=self.path,
                               offset=self.bat_region.file_offset + 8 * sbm_index)
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
        ss = self.logical_sector_size
        has_parent = self.has_parent
        bat = self.bat
        cr = self._cr
        total = len(view)
        done = 0
        while done < total:
            pos = offset + done
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, total - done)
            entry = int(bat[block + block // cr])
            state = entry & C.BAT_STATE_MASK
            out = view[done:done + n]
            if state == C.PAYLOAD_BLOCK_FULLY_PRESENT or (state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
                                                          and not has_parent):
                file_offset = (entry & C.BAT_FILE_OFFSET_MASK) + in_block
                # Coalesce following blocks that sit right after this one in the file.
                while done + n < total and (pos + n) % bs == 0:
                    nxt = int(bat[block + 1 + (block + 1) // cr])
                    if nxt & C.BAT_STATE_MASK != C.PAYLOAD_BLOCK_FULLY_PRESENT or \
                            (nxt & C.BAT_FILE_OFFSET_MASK) != file_offset + n:
                        break
                    block += 1
                    n += min(bs, total - done - n)
                out = view[done:done + n]
                self.storage.readinto(out, file_offset)
            elif state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                file_base = entry & C.BAT_FILE_OFFSET_MASK
                first_sector = in_block // ss
                last_sector = -(-(in_block + n) // ss)
                bits = self.read_bitmap(block)[first_sector:last_sector]
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
            elif state == C.PAYLOAD_BLOCK_NOT_PRESENT and has_parent and fallthrough is not None:
                fallthrough(out, pos)
            else:
                zero_fill(out)
            done += n

    # ------------------------------------------------------------------ writing

    def _check_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path)
        if self._closed:
            raise VhdxError("image is closed", path=self.path)
        if self._failure is not None:
            e = self._failure
            why = e.detail if isinstance(e, VhdxError) else (str(e) or type(e).__name__)
            raise VhdxError(f"an earlier change failed ({why}); no more writes: close the disk and open it "
                            f"again (the open replays its log)", path=self.path)

    @property
    def failed(self) -> bool:
        """True after a write failed part way: the log is left for the next open to replay."""
        return self._failure is not None

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error

    def _write(self, data: bytes | memoryview, offset: int) -> None:
        try:
            self.storage.write(data, offset)
        except OSError as e:
            raise storage_error(e, "write", path=self.path, offset=offset) from e

    def _flush(self) -> None:
        try:
            self.storage.flush()
        except OSError as e:
            raise storage_error(e, "flush", path=self.path) from e

    def _truncate(self, size: int) -> None:
        try:
            self.storage.truncate(size)
        except OSError as e:
            raise storage_error(e, f"resize to {size} bytes", path=self.path, offset=size) from e

    @_changes_file
    def _update_headers(self, **changes: Any) -> None:
        """Safe header update (§2.4): write the other slot, flush, then the first slot, flush."""
        current = self.header
        if current.sequence_number + 2 > 0xFFFFFFFFFFFFFFFF:
            raise UnsupportedError("the header sequence number is exhausted; the file cannot be updated",
                                   path=self.path, offset=C.HEADER_OFFSETS[self.current_header_index])
        new = current.replace(sequence_number=current.sequence_number + 1, **changes)
        other = 1 - self.current_header_index
        for slot in (other, self.current_header_index):
            raw = build_header(new)
            self._write(raw, C.HEADER_OFFSETS[slot])
            self._flush()
            self.headers[slot] = new.replace(checksum=int.from_bytes(raw[4:8], "little"))
            self.current_header_index = slot
            self.header_errors[slot] = None
            new = new.replace(sequence_number=new.sequence_number + 1)
        self.headers_identical = False

    @_changes_file
    def begin_session(self, *, data_change: bool, data_write_guid: uuid.UUID | None = None) -> None:
        """Before the first change of this open: new FileWriteGuid, log session, new DataWriteGuid.

        ``data_write_guid`` chooses the new DataWriteGuid (a merge announces it to the
        child first); if the header already carries it, it is kept.
        """
        self._check_writable()
        h = self.header
        need_log = self._log_writer is None
        need_data = data_change and not self._data_guid_rotated
        if not need_log and not need_data:
            return
        changes: dict[str, Any] = {}
        if not self._session_started:
            changes["file_write_guid"] = uuid.uuid4()
            self._session_started = True
        if need_data:
            if data_write_guid is None:
                changes["data_write_guid"] = uuid.uuid4()
            elif data_write_guid != h.data_write_guid:
                changes["data_write_guid"] = data_write_guid
            self._data_guid_rotated = True
        if need_log:
            if h.log_length < 2 * C.MiB // 2 or h.log_offset < C.HEADER_SECTION_SIZE:
                raise UnsupportedError("the file has no log region; cannot update metadata safely",
                                       path=self.path)
            log_guid = uuid.uuid4()
            writer = LogWriter(self.storage, h.log_offset, h.log_length, log_guid,
                               first_sequence=secrets.randbits(40) + 1)
            # §8.7: the initial empty entry is durable before any header names its LogGuid.
            writer.write_entry([], file_size=self._durable_size())
            self._log_writer = writer
            changes["log_guid"] = log_guid
        self._update_headers(**changes)

    def _durable_size(self) -> int:
        return self.storage.size()

    @_changes_file
    def log_pages(self, pages: dict[int, bytes]) -> None:
        """Make metadata page changes durable through the log: entry, flush, apply, flush."""
        if not pages:
            return
        self.begin_session(data_change=False)
        writer = self._log_writer
        assert writer is not None
        # Bitmap and other pages before BAT pages: if a transaction needs several entries, a
        # BAT entry never becomes durable before the bits it relies on.
        bat_lo = self.bat_region.file_offset
        bat_hi = bat_lo + self.bat_region.length
        items = sorted(pages.items(), key=lambda kv: (bat_lo <= kv[0] < bat_hi, kv[0]))
        per_entry = writer.max_pages
        for i in range(0, len(items), per_entry):
            group = items[i:i + per_entry]
            writer.write_entry(group, file_size=self._durable_size())
            for target, page in group:
                self._write(page, target)
            self._flush()

    def _bat_pages(self, bat_indexes: set[int], changes: dict[int, int] | None = None) -> dict[int, bytes]:
        """The 4 KiB BAT pages holding ``bat_indexes``, with ``changes`` applied."""
        base = self.bat_region.file_offset
        per_page = C.LOG_SECTOR_SIZE // 8
        pages = {}
        for page in {i // per_page for i in bat_indexes}:
            entries = self.bat[page * per_page:(page + 1) * per_page].copy()
            for idx, entry in (changes or {}).items():
                if idx // per_page == page:
                    entries[idx - page * per_page] = entry
            raw = batmod.encode_bat(entries)
            pages[base + page * C.LOG_SECTOR_SIZE] = raw + bytes(C.LOG_SECTOR_SIZE - len(raw))
        return pages

    @_changes_file
    def trim_unreferenced_tail(self) -> int:
        """Give back space past the last structure the file references; returns bytes freed.

        An interrupted transaction can leave allocated blocks that no BAT entry points at (data
        is written before the BAT update). Call only before the session's first log entry,
        so no log entry can claim a larger durable size.
        """
        self._check_writable()
        if self._log_writer is not None:
            raise VhdxError("trim only before the first change of a session", path=self.path)
        h = self.header
        end = C.HEADER_SECTION_SIZE
        if h.log_length:
            end = max(end, h.log_offset + h.log_length)
        for r in self.region_table:
            end = max(end, r.file_offset + r.length)
        payload = batmod.payload_entries(self.bat, self.geometry)
        pst = batmod.states(payload)
        poffs = batmod.file_offsets(payload).astype(np.int64)
        data = (pst == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (pst == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        if data.any():
            end = max(end, int(poffs[data].max()) + self.block_size)
        sbm = batmod.states(self.bat[batmod.sbm_indices(self.geometry)]) == C.SB_BLOCK_PRESENT
        if sbm.any():
            soffs = batmod.file_offsets(self.bat[batmod.sbm_indices(self.geometry)]).astype(np.int64)
            end = max(end, int(soffs[sbm].max()) + C.SECTOR_BITMAP_BLOCK_SIZE)
        end = _align_up(end)
        size = self.storage.size()
        if size <= end:
            return 0
        if not self._session_started:  # a new FileWriteGuid before the file changes (§2.3), no log yet
            self._update_headers(file_write_guid=uuid.uuid4())
            self._session_started = True
        self._truncate(end)
        self._flush()
        return size - end

    def _allocate(self, nbytes: int) -> int:
        """Space at the 1 MiB-aligned end of the file; the file is extended (reads as zeros)."""
        start = _align_up(self.storage.size())
        self._truncate(start + nbytes)
        return start

    def write_at(self, data: memoryview, offset: int) -> None:
        """Write virtual bytes. In a differencing file, ``offset`` and ``len(data)`` must be sector aligned."""
        self._check_writable()
        offset = as_offset(offset, "offset", self.path)
        total = len(data)
        if total == 0:
            return
        if offset + total > self.size:
            raise UsageError(f"write of {total} bytes at {offset} is outside the {self.size}-byte disk",
                             path=self.path)
        ss = self.logical_sector_size
        if self.has_parent and (offset % ss or total % ss):
            raise UsageError("differencing writes must be sector aligned", path=self.path)
        self.begin_session(data_change=True)
        bs = self.block_size
        # Split into transactions of a bounded number of blocks.
        step = bs * _MAX_TX_BLOCKS
        done = 0
        while done < total:
            pos = offset + done
            n = min(total - done, step - pos % step)
            self.write_extents([(pos, n, data[done:done + n])])
            done += n

    @_changes_file
    def write_extents(self, extents: list[Extent], *, progress: Callable[[int], None] | None = None) -> None:
        """Write a batch of non-overlapping extents as one transaction (docs/format.md §7.2 - §7.4).

        Each extent is ``(virtual_offset, length, source)``; ``source`` is a buffer holding
        the bytes, ``(storage, file_offset)`` to copy from another file, or None for zeros.
        Blocks are allocated in one go at the end of the file; data is written and flushed
        before one log transaction updates the BAT and the sector bitmaps that point at it.
        """
        self._check_writable()
        if not extents:
            return
        g = self.geometry
        bs, ss, size = g.block_size, g.logical_sector_size, self.size
        has_parent = self.has_parent
        # Split extents at block boundaries: per block, a list of (in_block, length, source, source_skip).
        per_block: dict[int, list[tuple[int, int, Any, int]]] = {}
        for offset, length, source in extents:
            offset, length = as_offset(offset, "offset", self.path), as_offset(length, "length", self.path)
            if length == 0 or offset + length > size:
                raise UsageError(f"extent of {length} bytes at {offset} is outside the {size}-byte disk",
                                 path=self.path)
            if has_parent and (offset % ss or length % ss):
                raise UsageError("differencing writes must be sector aligned", path=self.path)
            done = 0
            while done < length:
                pos = offset + done
                block, in_block = divmod(pos, bs)
                n = min(bs - in_block, length - done)
                per_block.setdefault(block, []).append((in_block, n, source, done))
                done += n
        self.begin_session(data_change=True)  # after the checks: a refused call changes nothing
        blocks = sorted(per_block)
        bat_index = self.bat_index
        new_bat = _PendingBat(self.bat)  # changes stay aside until the log has them
        changed_bat: set[int] = set()
        new_blocks: list[tuple[int, int]] = []  # (block, state)
        for block in blocks:
            parts = per_block[block]
            entry = int(new_bat[bat_index(block)])
            state = entry & C.BAT_STATE_MASK
            if state in (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                continue
            valid = min(bs, size - block * bs)
            whole = sum(p[1] for p in parts) >= valid
            all_zero = all(p[2] is None for p in parts)
            falls_through = has_parent and state == C.PAYLOAD_BLOCK_NOT_PRESENT
            if all_zero and not falls_through:
                continue  # the block already reads as zeros
            if all_zero and whole:
                new_bat[bat_index(block)] = batmod.make_entry(C.PAYLOAD_BLOCK_ZERO, 0)
                changed_bat.add(bat_index(block))
                continue
            if falls_through and not whole:
                new_blocks.append((block, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
            else:
                new_blocks.append((block, C.PAYLOAD_BLOCK_FULLY_PRESENT))
        new_sbm_chunks: list[int] = []
        if has_parent:
            for block, st in new_blocks:
                if st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    chunk = block // g.chunk_ratio
                    sbm_entry = int(new_bat[g.sbm_bat_index(chunk)])
                    if sbm_entry & C.BAT_STATE_MASK != C.SB_BLOCK_PRESENT and chunk not in new_sbm_chunks:
                        new_sbm_chunks.append(chunk)
        fresh: set[int] = set()
        need = len(new_blocks) * bs + len(new_sbm_chunks) * C.SECTOR_BITMAP_BLOCK_SIZE
        if need:
            at = self._allocate(need)
            for chunk in new_sbm_chunks:
                idx = g.sbm_bat_index(chunk)
                new_bat[idx] = batmod.make_entry(C.SB_BLOCK_PRESENT, at)
                changed_bat.add(idx)
                at += C.SECTOR_BITMAP_BLOCK_SIZE
            for block, st in new_blocks:
                idx = bat_index(block)
                new_bat[idx] = batmod.make_entry(st, at)
                changed_bat.add(idx)
                fresh.add(block)
                at += bs
        # Data first: coalesce copies that are contiguous on both sides.
        copies: list[list[Any]] = []  # [src_storage, src_offset, dst_offset, length]
        for block in blocks:
            entry = int(new_bat[bat_index(block)])
            if entry & C.BAT_STATE_MASK not in (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
                continue
            base = entry & C.BAT_FILE_OFFSET_MASK
            for in_block, n, source, skip in per_block[block]:
                dst = base + in_block
                if source is None:
                    if block not in fresh:
                        self._write_zeros(dst, n)
                elif isinstance(source, tuple):
                    storage, src = source
                    last = copies[-1] if copies else None
                    if last and last[0] is storage and last[1] + last[3] == src + skip and last[2] + last[3] == dst:
                        last[3] += n
                    else:
                        copies.append([storage, src + skip, dst, n])
                else:
                    self._write(source[skip:skip + n], dst)
        for storage, src, dst, n in copies:
            self._copy_from(storage, src, dst, n, progress)
        # Sector bitmap bits for every partially present block written.
        sbm_pages: dict[int, bytearray] = {}
        if has_parent:
            for block in blocks:
                entry = int(new_bat[bat_index(block)])
                if entry & C.BAT_STATE_MASK != C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                    continue
                chunk = block // g.chunk_ratio
                sbm_base = int(new_bat[g.sbm_bat_index(chunk)]) & C.BAT_FILE_OFFSET_MASK
                lo, hi = g.bitmap_byte_range(block)
                if block in fresh:
                    # A new partial block starts as "all from the parent".
                    self._modify_bitmap(sbm_pages, sbm_base, lo * 8, (hi - lo) * 8, False)
                for in_block, n, _source, _skip in per_block[block]:
                    self._modify_bitmap(sbm_pages, sbm_base, lo * 8 + in_block // ss, n // ss, True)
        if need or sbm_pages or changed_bat:
            self._flush()  # data before the metadata that points at it (§7.4)
            pages = {k: bytes(v) for k, v in sbm_pages.items()}
            if changed_bat:
                pages.update(self._bat_pages(changed_bat, new_bat.changes))
            self.log_pages(pages)
            for idx, entry in new_bat.changes.items():
                self.bat[idx] = entry

    def _write_zeros(self, file_offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = min(len(_ZEROS), length - done)
            self._write(_ZEROS[:n], file_offset + done)
            done += n

    def _copy_from(self, source: Storage, src: int, dst: int, length: int,
                   progress: Callable[[int], None] | None) -> None:
        """Copy ``length`` bytes between files: copy_file_range where both are plain files
        (the default, measured faster here), else through one reused buffer (preadv/pwrite).

        ``VHDX_COPY_METHOD=preadv`` forces the buffer; benchmarks/bench_merge.py measures both.
        """
        src_fd, dst_fd = source.fileno(), self.storage.fileno()
        if COPY_METHOD == "copy_file_range" and src_fd is not None and dst_fd is not None:
            done = 0
            while done < length:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), src + done, dst + done)
                except OSError as e:
                    raise storage_error(e, f"copy from {source.path}", path=self.path, offset=dst + done) from e
                if n <= 0:
                    break
                done += n
                if progress is not None:
                    progress(n)
            if WRITEBACK_EARLY and done:
                # Start writing these pages out now (asynchronously), so the flush that must
                # come before the BAT update finds little left to do.
                os.posix_fadvise(dst_fd, dst, done, os.POSIX_FADV_DONTNEED)
            if done == length:
                return
            src, dst, length = src + done, dst + done, length - done
        buf = self._copy_buffer
        view = memoryview(buf)
        done = 0
        while done < length:
            n = min(len(buf), length - done)
            try:
                source.readinto(view[:n], src + done)
            except OSError as e:
                raise storage_error(e, "read", path=source.path, offset=src + done) from e
            self._write(view[:n], dst + done)
            done += n
            if progress is not None:
                progress(n)

    @property
    def _copy_buffer(self) -> bytearray:
        buf = getattr(self, "_copy_buf", None)
        if buf is None:
            buf = self._copy_buf = bytearray(COPY_BUFFER_SIZE)
        return buf

    def _modify_bitmap(self, pages: dict[int, bytearray], sbm_base: int, first_bit: int, count: int,
                       value: bool) -> None:
        """Set or clear ``count`` bits from ``first_bit`` of the SBM block at ``sbm_base``."""
        page_bits = C.LOG_SECTOR_SIZE * 8
        bit = first_bit
        end = first_bit + count
        while bit < end:
            page_index = bit // page_bits
            page_offset = sbm_base + page_index * C.LOG_SECTOR_SIZE
            if page_offset not in pages:
                pages[page_offset] = bytearray(self.storage.read(page_offset, C.LOG_SECTOR_SIZE))
            stop = min(end, (page_index + 1) * page_bits)
            arr = np.frombuffer(pages[page_offset], dtype=np.uint8)
            bitmapmod.set_bits(arr, bit - page_index * page_bits, stop - bit, value)
            bit = stop

    @_changes_file
    def set_block_entries(self, updates: dict[int, int]) -> None:
        """Log a set of BAT entry changes (bat_index -> raw entry) atomically per page group."""
        self.begin_session(data_change=True)
        self.log_pages(self._bat_pages(set(updates), updates))
        for idx, entry in updates.items():
            self.bat[idx] = entry

    @_changes_file
    def write_metadata_items(self, items: list[MetadataItem], *, data_change: bool = True) -> None:
        """Rewrite the metadata region through the log."""
        self.begin_session(data_change=data_change)
        r = self.metadata_region
        raw = build_metadata_region(items, r.length)
        old = self.storage.read(r.file_offset, r.length)
        pages = {}
        for at in range(0, r.length, C.LOG_SECTOR_SIZE):
            if raw[at:at + C.LOG_SECTOR_SIZE] != old[at:at + C.LOG_SECTOR_SIZE]:
                pages[r.file_offset + at] = raw[at:at + C.LOG_SECTOR_SIZE]
        self.log_pages(pages)
        self._load_metadata()

    def write_parent_locator(self, pairs: dict[str, str]) -> None:
        """Replace the parent locator item (through the log); the DataWriteGuid stays (§9.4)."""
        items = [it if it.item_id != C.PARENT_LOCATOR_GUID else
                 MetadataItem(it.item_id, build_parent_locator(pairs), it.flags)
                 for it in metadata_items(self.metadata)]
        self.write_metadata_items(items, data_change=False)

    @_changes_file
    def flush(self) -> None:
        """Make every earlier write durable."""
        if self.writable and not self._closed:
            self._flush()

    def close(self, *, _failed: bool = False) -> None:
        """Flush and mark the log clean (LogGuid zero), unless a write failed part way: then
        LogGuid stays set and the next open replays the last entry (docs/format.md §8.5)."""
        if self._closed:
            return
        try:
            if self.writable and not _failed and self._failure is None and self._log_writer is not None:
                self.flush()
                self._update_headers(log_guid=C.ZERO_GUID)
                self._log_writer = None
        finally:
            self._closed = True
            if self._owns_storage:
                self.storage.close()

    # ------------------------------------------------------------------ describing

    def info(self) -> dict[str, Any]:
        st = self.payload_states()
        states = {C.PAYLOAD_STATE_NAMES.get(int(s), str(int(s))): int(c)
                  for s, c in zip(*np.unique(st, return_counts=True))}
        sbm = batmod.states(self.bat[batmod.sbm_indices(self.geometry)])
        sbm_states = {C.SB_STATE_NAMES.get(int(s), str(int(s))): int(c)
                      for s, c in zip(*np.unique(sbm, return_counts=True))}
        headers = []
        for i, offset in enumerate(C.HEADER_OFFSETS):
            h = self.headers[i]
            d: dict[str, Any] = {"offset": offset, "valid": h is not None, "current": i == self.current_header_index}
            if h is not None:
                d.update(h.to_dict())
            else:
                d["error"] = self.header_errors[i]
            headers.append(d)
        g = self.geometry
        return {
            "path": self.path,
            "creator": self.creator,
            "disk_type": self.disk_type,
            "virtual_size": self.size,
            "block_size": self.block_size,
            "logical_sector_size": self.logical_sector_size,
            "physical_sector_size": self.physical_sector_size,
            "disk_id": str(self.metadata.page83_data),
            "data_write_guid": str(self.header.data_write_guid),
            "file_write_guid": str(self.header.file_write_guid),
            "file_size": self.storage.size(),
            "headers": headers,
            "headers_identical": self.headers_identical,
            "region_table": [e.to_dict() for e in self.region_table],
            "region_table_errors": self.region_table_errors,
            "metadata": self.metadata.to_dict(),
            "bat": {
                "file_offset": self.bat_region.file_offset, "length": self.bat_region.length,
                "chunk_ratio": g.chunk_ratio, "payload_blocks": g.payload_blocks,
                "sector_bitmap_blocks": g.sector_bitmap_blocks, "entries": g.bat_entries,
                "payload_states": states, "sector_bitmap_states": sbm_states,
            },
            "log": {
                "offset": self.header.log_offset, "length": self.header.log_length,
                "log_guid": str(self.header.log_guid),
                "dirty": self.log_was_dirty,
                "replayed_in_memory": self.log_replayed_in_memory,
                "replayed_entries": [e.to_dict() for e in self.log_replayed],
            },
        }


def create_image(path: str | os.PathLike[str], size: int, *, block_size: int = 32 * C.MiB,
                 logical_sector_size: int = 512, physical_sector_size: int = 4096, fixed: bool = False,
                 page83_data: uuid.UUID | None = None, parent_locator: bytes | None = None,
                 storage: Storage | None = None) -> Image:
    """Write a new, empty VHDX file and return it open for writing.

    Layout as Windows writes it: log at 1 MiB (1 MiB), metadata at 2 MiB (1 MiB),
    BAT at 3 MiB, payload after (docs/format.md §1.1).
    """
    path = os.fspath(path)
    has_parent = parent_locator is not None
    if block_size < C.MIN_BLOCK_SIZE or block_size > C.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size}: a power of two from 1 MiB to 256 MiB", path=path)
    if logical_sector_size not in C.LOGICAL_SECTOR_SIZES:
        raise UsageError(f"logical sector size {logical_sector_size}: 512 or 4096", path=path)
    if physical_sector_size not in C.PHYSICAL_SECTOR_SIZES:
        raise UsageError(f"physical sector size {physical_sector_size}: 512 or 4096", path=path)
    if not isinstance(size, int) or size <= 0 or size > C.MAX_VIRTUAL_DISK_SIZE or size % logical_sector_size:
        raise UsageError(f"size {size}: a multiple of {logical_sector_size} bytes from 1 sector to 64 TiB",
                         path=path)
    if fixed and has_parent:
        raise UsageError("a differencing disk cannot be fixed", path=path)
    g = Geometry(size, block_size, logical_sector_size, has_parent)
    log_offset, log_length = 1 * C.MiB, 1 * C.MiB
    md_offset, md_length = 2 * C.MiB, 1 * C.MiB
    bat_offset = 3 * C.MiB
    bat_length = _align_up(g.bat_entries * 8)
    payload_start = bat_offset + bat_length
    items = system_items(block_size=block_size, leave_block_allocated=fixed, has_parent=has_parent,
                         virtual_disk_size=size, logical_sector_size=logical_sector_size,
                         physical_sector_size=physical_sector_size, page83_data=page83_data or uuid.uuid4(),
                         parent_locator=parent_locator)
    metadata = build_metadata_region(items, md_length)
    bat = np.zeros(bat_length // 8, dtype=np.uint64)
    file_size = payload_start
    if has_parent and g.sector_bitmap_blocks <= EAGER_BITMAP_CHUNKS:
        # Zeroed (sparse) sector bitmaps for every chunk up front. Hyper-V allocates them
        # lazily, which the spec allows, but libvhdi then reads a chunk's bitmap from file
        # offset 0 and returns garbage for an untouched checkpoint. 1 MiB per 4 GiB chunk.
        sidx = batmod.sbm_indices(g)
        offsets = payload_start + np.arange(sidx.size, dtype=np.uint64) * np.uint64(C.SECTOR_BITMAP_BLOCK_SIZE)
        bat[sidx] = offsets | np.uint64(C.SB_BLOCK_PRESENT)
        file_size = payload_start + sidx.size * C.SECTOR_BITMAP_BLOCK_SIZE
    if fixed:
        idx = batmod.payload_indices(g)
        offsets = payload_start + np.arange(g.payload_blocks, dtype=np.uint64) * np.uint64(block_size)
        bat[idx] = offsets | np.uint64(C.PAYLOAD_BLOCK_FULLY_PRESENT)
        file_size = payload_start + g.payload_blocks * block_size
    regions = [RegionEntry(C.BAT_REGION_GUID, bat_offset, bat_length, C.REGION_REQUIRED),
               RegionEntry(C.METADATA_REGION_GUID, md_offset, md_length, C.REGION_REQUIRED)]
    header = Header(sequence_number=1, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4(),
                    log_guid=C.ZERO_GUID, log_version=C.LOG_VERSION, version=C.VERSION,
                    log_length=log_length, log_offset=log_offset)
    temporary = None
    if storage is None:
        storage, temporary = _create_temporary(path)
    try:
        storage.truncate(file_size)
        storage.write(build_file_identifier(f"vhdx-python {__version__}"), 0)
        rt = build_region_table(regions)
        storage.write(rt, C.REGION_TABLE1_OFFSET)
        storage.write(rt, C.REGION_TABLE2_OFFSET)
        # Only the table and the items packed after it: the rest of the region is zeros, which
        # the newly sized file reads already, so it stays sparse.
        used = C.METADATA_TABLE_SIZE + sum(len(it.data) for it in items)
        storage.write(metadata[:_align_up(used, C.LOG_SECTOR_SIZE)], md_offset)
        raw_bat = batmod.encode_bat(bat)
        nz = np.flatnonzero(bat)
        if nz.size:
            storage.write(raw_bat[:(int(nz[-1]) + 1) * 8], bat_offset)
        storage.flush()
        # Headers last: until they are written the file is not a VHDX.
        storage.write(build_header(header), C.HEADER1_OFFSET)
        storage.write(build_header(header.replace(sequence_number=2)), C.HEADER2_OFFSET)
        storage.flush()
        if temporary is not None:
            # Only a complete file takes the final name, so a killed creation leaves none there.
            publish(temporary, path)
            storage.path = path
    except BaseException:
        if temporary is not None:
            storage.close()
            remove_quietly(temporary)
        raise
    image = Image(storage, owns_storage=True)
    try:
        image.load()
    except BaseException:
        image.close(_failed=True)
        raise
    return image


def _create_temporary(path: str) -> tuple[FileStorage, str]:
    """A new file under a temporary name beside ``path`` (which must not exist yet)."""
    refuse_existing(path)
    temporary = temporary_path(path, "creating")
    try:
        return FileStorage(temporary, writable=True, create=True), temporary
    except VhdxError as e:
        raise VhdxError(e.detail, path=path) from e
