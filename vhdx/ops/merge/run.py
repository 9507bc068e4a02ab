"""Merge: fold differencing layers into an ancestor, like Hyper-V's Merge-VHD.

The plan is computed with numpy over the sources' BATs and sector bitmaps, one window
of the virtual disk at a time (a window holds whole blocks of every layer), so memory
stays bounded whatever the disk size. Each window becomes a list of extents (runs of
sectors owned by one source layer, or zeros) that the destination writes as one
transaction: blocks allocated in a batch, data copied with copy_file_range (or a reused buffer),
flushed, then BAT and bitmap changes through the log (docs/format.md §7.4, §9.5).

Crash safety and restart (§9.5): before the destination's DataWriteGuid changes, the new
GUID is stored as ``parent_linkage2`` in the layer right above it, so at every moment one
of its two linkage GUIDs matches and the chain stays readable. A journal item in the
destination's metadata marks the merge as in progress until it is done. Data reads through
the child never change during a merge: the destination only receives sectors that the
sources define, and the sources are not modified. Running the same merge again redoes the
copy (it is idempotent) and finishes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, overload

import numpy as np

from ...chains.paths import candidate_paths, file_key
from ...chains.resolve import Resolver
from ...chains.scan import VHDX_SUFFIXES, ScanCache, linkage_of, open_peek, read_data_write_guid
from ...errors import MergeError, VhdxError
from ...format import bat as batmod
from ...format import bitmap as bitmapmod
from ...format import constants as C
from ...format.locator import format_linkage, parse_linkage
from ...format.records import MetadataItem, metadata_items
from ...file.image import Image
from .journal import MERGE_JOURNAL_GUID
from ...file.storage import FileStorage, OverlayStorage, Storage

TRANSPARENT = 255
ZERO = 254
BATCH_BYTES = 1 << 30  # destination data per transaction: each costs three flushes
BATCH_EXTENTS = 1 << 16  # ... and at most this many extents, to bound memory
WINDOW_MIN = 64 << 20
_ZERO_STATES = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
                C.PAYLOAD_BLOCK_UNMAPPED_V095)


@dataclass
class MergePlan:
    """What a merge will do; ``vhdx merge --dry-run`` prints it."""

    child: str
    destination: str
    sources: list[str]
    destination_type: str
    virtual_size: int
    bytes_to_copy: int = 0
    bytes_of_zeros: int = 0
    destination_blocks: int = 0
    allocations: int = 0
    bytes_to_allocate: int = 0
    per_source_bytes: dict[str, int] = field(default_factory=dict)
    dependents: list[str] = field(default_factory=list)
    resuming: bool = False
    bytes_needed: int = 0  # free space the merge may use: new blocks, holes it fills, log and metadata
    to_delete: list[str] = field(default_factory=list)  # in the order they go, nearest the destination first

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeResult:
    plan: MergePlan
    bytes_copied: int
    seconds: float
    deleted: list[str]
    broken_dependents: list[str]
    new_data_write_guid: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_mib_s"] = self.bytes_copied / max(self.seconds, 1e-9) / (1 << 20)
        return d


# --------------------------------------------------------------------------- planning

def _windows(sources: list[Image], window: int, size: int) -> np.ndarray:
    """Indexes of the windows in which any source defines anything (vectorised over the BATs)."""
    hits = []
    for im in sources:
        st = im.payload_states()
        used = np.flatnonzero(st != C.PAYLOAD_BLOCK_NOT_PRESENT)
        hits.append((used.astype(np.int64) * im.block_size) // window)
    if not hits:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(hits))


def _owners(sources: list[Image], start: int, length: int) -> np.ndarray:
    """Per logical sector of [start, start+length): which source defines it (index), ZERO, or TRANSPARENT."""
    ss = sources[0].logical_sector_size
    n = length // ss
    owner = np.full(n, TRANSPARENT, dtype=np.uint8)
    for i, im in enumerate(sources):
        bs = im.block_size
        spb = bs // ss
        first_block = start // bs
        last_block = -(-(start + length) // bs)
        states = im.payload_states()[first_block:last_block]
        if not np.any(states != C.PAYLOAD_BLOCK_NOT_PRESENT):
            continue
        defined = np.isin(states, (C.PAYLOAD_BLOCK_FULLY_PRESENT,) + _ZERO_STATES)
        if not im.has_parent:
            defined |= states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        value = np.where(np.isin(states, _ZERO_STATES), ZERO, i).astype(np.uint8)
        offset_sectors = (first_block * bs - start) // ss  # <= 0: the window starts inside the first block
        mask = np.repeat(defined, spb)
        vals = np.repeat(value, spb)
        if im.has_parent:
            for k in np.flatnonzero(states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT).tolist():
                bits = im.read_bitmap(first_block + k)
                mask[k * spb:(k + 1) * spb] = bits.astype(bool)
                vals[k * spb:(k + 1) * spb] = i
        lo = -offset_sectors
        mask = mask[lo:lo + n]
        vals = vals[lo:lo + n]
        take = mask & (owner == TRANSPARENT)
        owner[take] = vals[take]
    return owner


def _extents(sources: list[Image], start: int, length: int) -> Iterator[tuple[int, int, Any, int]]:
    """(virtual_offset, length, source, source_index) runs of one window; source None means zeros."""
    ss = sources[0].logical_sector_size
    owner = _owners(sources, start, length)
    starts, stops, values = bitmapmod.runs(owner)
    for s0, s1, v in zip(starts.tolist(), stops.tolist(), values.tolist()):
        if v == TRANSPARENT:
            continue
        voff, vlen = start + s0 * ss, (s1 - s0) * ss
        if v == ZERO:
            yield voff, vlen, None, -1
            continue
        im = sources[v]
        bs = im.block_size
        pos = voff
        end = voff + vlen
        offsets = im.payload_offsets()
        while pos < end:  # split at the source's block boundaries: each block has its own file offset
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, end - pos)
            yield pos, n, (im.storage, int(offsets[block]) + in_block), v
            pos += n


def _window_size(images: list[Image]) -> int:
    return max([WINDOW_MIN] + [im.block_size for im in images])


def _fileno(storage: Storage) -> int | None:
    """The descriptor of the real file under ``storage`` (through a read-only log overlay), if any."""
    fd = storage.fileno()
    if fd is None and isinstance(storage, OverlayStorage):
        fd = storage.base.fileno()
    return fd


def _hole_bytes(fd: int | None, ranges: list[tuple[int, int]]) -> int:
    """How many bytes of the file ranges ``(offset, length)`` are holes that a write would allocate.

    Uses SEEK_DATA/SEEK_HOLE; without a descriptor or without that support, every byte counts.
    """
    total = sum(n for _, n in ranges)
    if fd is None or not ranges or not hasattr(os, "SEEK_DATA"):
        return total
    merged: list[list[int]] = []
    for start, n in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + n)
        else:
            merged.append([start, start + n])
    holes = 0
    for start, end in merged:
        pos = start
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    return total
                data = end  # only holes up to the end of the file
            if data >= end:
                holes += end - pos
                break
            holes += data - pos
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    return holes


def _filled_ranges(voff: int, vlen: int, dest_states: np.ndarray, dest_offsets: np.ndarray,
                   dbs: int) -> Iterator[tuple[int, int]]:
    """File ranges ``(offset, length)`` that an extent writes in blocks the destination already has."""
    for b in range(voff // dbs, (voff + vlen - 1) // dbs + 1):
        if dest_states[b] in (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            lo, hi = max(voff, b * dbs), min(voff + vlen, (b + 1) * dbs)
            yield int(dest_offsets[b]) + lo - b * dbs, hi - lo


def _new_space(dest: Image, touched: set[int], plan: MergePlan) -> None:
    """Blocks to allocate, and sector bitmap blocks for the chunks of a differencing destination
    that get a new block and have no bitmap block yet."""
    if not touched:
        return
    t = np.fromiter(touched, dtype=np.int64)
    allocated = np.isin(dest.payload_states()[t], (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
    plan.allocations = int((~allocated).sum())
    plan.bytes_to_allocate = plan.allocations * dest.block_size
    if dest.has_parent and plan.allocations:
        g = dest.geometry
        chunks = np.unique(t[~allocated] // g.chunk_ratio)
        entries = dest.bat[[g.sbm_bat_index(int(c)) for c in chunks.tolist()]]
        lacking = int((batmod.states(entries) != C.SB_BLOCK_PRESENT).sum())
        plan.bytes_to_allocate += lacking * C.SECTOR_BITMAP_BLOCK_SIZE


def plan_merge(sources: list[Image], dest: Image, plan: MergePlan) -> MergePlan:
    """Fill in the totals of ``plan`` (reads BATs and bitmaps, not data).

    ``bytes_needed`` is the free space the merge may use: new blocks and bitmap blocks, the holes
    of sparse blocks it writes into, and, when it needs any of those, the holes of the log and a
    page of BAT and bitmap per block for the metadata.
    """
    window = _window_size(sources + [dest])
    size = dest.size
    dstates, doffsets = dest.payload_states(), dest.payload_offsets()
    dbs = dest.block_size
    fd = _fileno(dest.storage)
    touched: set[int] = set()
    holes = 0
    for w in _windows(sources, window, size).tolist():
        start = w * window
        length = min(window, size - start)
        if length <= 0:
            continue
        filled: list[tuple[int, int]] = []
        for voff, vlen, src, v in _extents(sources, start, length):
            if src is None:
                plan.bytes_of_zeros += vlen
            else:
                plan.bytes_to_copy += vlen
                name = sources[v].path
                plan.per_source_bytes[name] = plan.per_source_bytes.get(name, 0) + vlen
            touched.update(range(voff // dbs, (voff + vlen - 1) // dbs + 1))
            filled.extend(_filled_ranges(voff, vlen, dstates, doffsets, dbs))
        holes += _hole_bytes(fd, filled)
    plan.destination_blocks = len(touched)
    _new_space(dest, touched, plan)
    if plan.bytes_to_allocate + holes:
        log = dest.header
        margin = _hole_bytes(fd, [(log.log_offset, log.log_length)]) + 2 * C.LOG_SECTOR_SIZE * (len(touched) + 1)
        plan.bytes_needed = plan.bytes_to_allocate + holes + margin
    return plan


# --------------------------------------------------------------------------- the journal

JOURNAL_STATES = ("copying", "copied", "done")
JOURNAL_MAX_BYTES = 1 << 20  # a metadata item holds at most 1 MiB (§4.1)
JOURNAL_MAX_SOURCES = 1024
JOURNAL_MAX_PATH = 4096
_JOURNAL_KEYS = {"tool", "state", "sources", "child", "new_data_write_guid", "original_data_write_guid",
                 "started", "finished", "keep"}
_SOURCE_KEYS = {"path", "relative", "data_write_guid"}


@dataclass(frozen=True)
class JournalSource:
    """One merged file as the journal records it (leaf first)."""

    path: str
    relative: str
    data_write_guid: uuid.UUID


@dataclass(frozen=True)
class Journal:
    """A merge journal that passed the schema check; ``body`` is the decoded JSON."""

    state: str
    sources: tuple[JournalSource, ...]
    new_data_write_guid: uuid.UUID
    original_data_write_guid: uuid.UUID
    keep: bool | None
    body: dict[str, Any]


def _journal_item(plan: MergePlan, new_guid: uuid.UUID, original: uuid.UUID, source_guids: list[str],
                  state: str = "copying", keep: bool = False) -> MetadataItem:
    """Our user metadata item: which merge is under way, and how far it got.

    States: "copying", "copied" (all data is in the destination), "done" (kept as a record).
    Sources are recorded by DataWriteGuid and by path relative to the destination, so the
    journal still finds them after the folder was moved or copied. ``keep`` tells a kept
    (deliberately unlinked) file from one that a power loss brought back.
    """
    folder = os.path.dirname(os.path.abspath(plan.destination))
    sources = [dict(path=p, relative=os.path.relpath(p, folder), data_write_guid=g)
               for p, g in zip(plan.sources, source_guids)]
    data = json.dumps(dict(tool="vhdx", state=state, sources=sources, child=plan.child,
                           new_data_write_guid=str(new_guid), original_data_write_guid=str(original),
                           started=int(time.time()), keep=keep)).encode()
    return MetadataItem(MERGE_JOURNAL_GUID, data, C.METADATA_IS_USER)


def _guid_field(value: Any, what: str) -> uuid.UUID:
    if not isinstance(value, str) or len(value) != 36:
        raise ValueError(f"{what} is not a GUID string")
    try:
        guid = uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a GUID") from None
    if str(guid) != value.lower() or guid == C.ZERO_GUID:
        raise ValueError(f"{what} {value!r} is not a GUID")
    return guid


def _path_field(value: Any, what: str, *, absolute: bool) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= JOURNAL_MAX_PATH or "\0" in value:
        raise ValueError(f"{what} is not a path of 1 to {JOURNAL_MAX_PATH} characters")
    if os.path.isabs(value) != absolute:
        raise ValueError(f"{what} {value[:200]!r} must be {'an absolute' if absolute else 'a relative'} path")
    return value


def _journal_source(value: Any, i: int) -> JournalSource:
    if not isinstance(value, dict) or set(value) != _SOURCE_KEYS:
        raise ValueError(f"source {i} is not an object with exactly the keys {sorted(_SOURCE_KEYS)}")
    return JournalSource(_path_field(value["path"], f"source {i} path", absolute=True),
                         _path_field(value["relative"], f"source {i} relative path", absolute=False),
                         _guid_field(value["data_write_guid"], f"source {i} data_write_guid"))


def _journal_from(body: Any) -> Journal:
    """Check the decoded JSON against the one shape we write; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("it is not a JSON object")
    unknown = sorted(set(body) - _JOURNAL_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown[:5]}")
    if body.get("tool") != "vhdx" or body.get("state") not in JOURNAL_STATES:
        raise ValueError(f"tool must be 'vhdx' and state one of {list(JOURNAL_STATES)}")
    raw_sources = body.get("sources")
    if not isinstance(raw_sources, list) or not 0 < len(raw_sources) <= JOURNAL_MAX_SOURCES:
        raise ValueError(f"sources must be a list of 1 to {JOURNAL_MAX_SOURCES} files")
    sources = tuple(_journal_source(s, i) for i, s in enumerate(raw_sources))
    new = _guid_field(body.get("new_data_write_guid"), "new_data_write_guid")
    original = _guid_field(body.get("original_data_write_guid"), "original_data_write_guid")
    guids = [s.data_write_guid for s in sources] + [new, original]
    if len(set(guids)) != len(guids):
        raise ValueError("a DataWriteGuid appears twice")
    if not isinstance(body.get("child", ""), str) or len(body.get("child", "")) > JOURNAL_MAX_PATH:
        raise ValueError("child is not a path")
    for key in ("started", "finished"):
        if key in body and (type(body[key]) is not int or not 0 <= body[key] < 1 << 63):
            raise ValueError(f"{key} is not a time")
    if "keep" in body and not isinstance(body["keep"], bool):
        raise ValueError("keep is not true or false")
    return Journal(body["state"], sources, new, original, body.get("keep"), body)


def parse_journal(raw: bytes, path: str) -> Journal:
    """A journal read from ``path``'s metadata, validated; MergeError when it is not one we wrote."""
    try:
        if len(raw) > JOURNAL_MAX_BYTES:
            raise ValueError(f"{len(raw)} bytes, over {JOURNAL_MAX_BYTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise ValueError("it is not JSON") from None
        return _journal_from(body)
    except ValueError as e:
        raise MergeError(f"untrusted merge journal: {e}; nothing was deleted", path=path) from None


def read_journal(image: Image) -> dict[str, Any] | None:
    """The decoded JSON of ``image``'s merge journal as stored (unvalidated; {} if not JSON)."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    if raw is None:
        return None
    try:
        body = json.loads(raw.decode())
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def load_journal(image: Image) -> Journal | None:
    """``image``'s merge journal, validated (MergeError if it fails), or None if there is none."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    return None if raw is None else parse_journal(bytes(raw), image.path)


# --------------------------------------------------------------------------- whom a journal may name

@dataclass
class JournalMember:
    """A file that holds one journal record: checked, with what it links to."""

    index: int
    path: str
    key: tuple[int, int]  # (st_dev, st_ino): the file deleted must be the file checked
    linkage: tuple[uuid.UUID | None, uuid.UUID | None]
    parent_paths: list[str]
    status: str = ""  # for the record next to the destination: "linked" or "unlinked"


def _places(record: JournalSource, dest_folder: str) -> list[str]:
    """Where a record's file may be: beside the destination by relative path, then its old path."""
    out = []
    for p in (os.path.join(dest_folder, record.relative), record.path):
        p = os.path.normpath(p)
        if p not in out:
            out.append(p)
    return out


def deletable_problem(path: str, allowed: set[str]) -> str | None:
    """Why the merge may not delete ``path`` (None if it may): regular files in allowed folders only."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be examined: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if os.path.realpath(os.path.dirname(path)) not in allowed:
        return f"{path} is outside the destination's folder and the folders named with --search"
    return None


def _member_at(path: str, index: int, record: JournalSource, allowed: set[str]) -> JournalMember | None:
    """The checked member at ``path``, None if another disk is there; ValueError if it may not be one."""
    problem = deletable_problem(path, allowed)
    if problem:
        raise ValueError(problem)
    st = os.lstat(path)
    try:
        image = Image.open(path, "r")
    except (VhdxError, OSError):
        raise ValueError(f"{path} is not a VHDX file") from None
    try:
        fd = image.storage.fileno()
        if fd is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
            raise ValueError(f"{path} changed while it was examined")
        if image.header.data_write_guid != record.data_write_guid:
            return None
        if not image.has_parent:
            raise ValueError(f"{path} is not a differencing disk")
        loc = image.metadata.parent_locator or {}
        parents = [p for how, p in candidate_paths(loc, path, [])
                   if how in ("relative_path", "volume_path", "absolute_win32_path")]
        return JournalMember(index, path, (st.st_dev, st.st_ino), linkage_of(image), parents)
    finally:
        image.close()


def _locate(index: int, record: JournalSource, dest_folder: str, allowed: set[str]) -> JournalMember | None:
    """The file holding ``record`` in an allowed folder, or None.

    Places outside the allowed folders are never acted on (a folder copied elsewhere keeps
    its files there); what sits at a place inside them must pass :func:`_member_at`.
    """
    for place in _places(record, dest_folder):
        if not os.path.lexists(place) or os.path.realpath(os.path.dirname(place)) not in allowed:
            continue
        member = _member_at(place, index, record, allowed)
        if member is not None:
            return member
    return None


def _check_links(journal: Journal, members: list[JournalMember | None], dest_folder: str) -> None:
    """The records must be one chain down to the destination: each file links to the next record.

    A file whose next record is gone must name, as its parent's, a place of that record where
    nothing is (a deleted parent, not one merely left out). The file next to the destination
    must link to its new DataWriteGuid (``linked``), or, after ``keep``, be let go of
    (``unlinked``: parent_linkage back to the original, parent_linkage2 zero).
    """
    last = len(journal.sources) - 1
    for i, m in enumerate(members):
        if m is None:
            continue
        l1, l2 = m.linkage
        if i < last:
            if journal.sources[i + 1].data_write_guid not in (l1, l2):
                raise ValueError(f"{m.path} is not a child of the next file the journal lists")
            if members[i + 1] is None and not any(
                    not os.path.lexists(p) for p in set(m.parent_paths) & set(_places(journal.sources[i + 1],
                                                                                      dest_folder))):
                raise ValueError(f"{m.path} does not name the journal's next file, deleted, as its parent")
        elif l2 == journal.new_data_write_guid:
            m.status = "linked"
        elif l1 == journal.original_data_write_guid and l2 is None and journal.keep is not False:
            m.status = "unlinked"
        else:
            raise ValueError(f"{m.path} does not link to the destination")


def verify_journal(journal: Journal, dest_path: str, allowed: set[str]) -> list[JournalMember | None]:
    """The files a journal may act on, one per record (None: gone); MergeError if it names others.

    Only allowed folders are looked in (real paths). There, every record's file must be a
    regular file (never a symbolic link), open as a VHDX with the recorded DataWriteGuid, and be
    tied to the destination through the others by parent linkage (:func:`_check_links`).
    """
    dest_folder = os.path.dirname(os.path.abspath(dest_path))
    dest_key = file_key(dest_path)
    members: list[JournalMember | None] = []
    try:
        for i, record in enumerate(journal.sources):
            m = _locate(i, record, dest_folder, allowed)
            if m is not None and m.key == dest_key:
                raise ValueError(f"{m.path} is the destination itself")
            members.append(m)
        _check_links(journal, members, dest_folder)
    except ValueError as e:
        raise MergeError(f"untrusted merge journal: {e}; nothing was deleted", path=dest_path) from None
    return members


def allowed_folders(*paths: str, folders: Sequence[str] = ()) -> set[str]:
    """The real folders a merge may delete in: those of ``paths`` (files) and ``folders``."""
    out = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in paths}
    return out | {os.path.realpath(f) for f in folders}


def _journal_names(journal: Journal, child: str) -> bool:
    """Whether the journal lists ``child`` (by DataWriteGuid if it exists, else by file name)."""
    if os.path.exists(child):
        guid = read_data_write_guid(child)
        return any(r.data_write_guid == guid for r in journal.sources)
    name = os.path.basename(child)
    return any(os.path.basename(r.relative) == name for r in journal.sources)


def audit_journal(path: str | os.PathLike[str], search_paths: Sequence[str] = ()) -> str | None:
    """What is wrong with ``path``'s merge journal (None if nothing, or if it has none); reads only.

    A journal in progress must pass :func:`verify_journal`; a "done" one is a record that a
    merge acts on only while the destination still carries its new DataWriteGuid.
    """
    path = os.fspath(path)
    image = Image.open(path, "r")
    try:
        raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
        guid = image.header.data_write_guid
    finally:
        image.close()
    if raw is None:
        return None
    try:
        journal = parse_journal(bytes(raw), path)
        if journal.state == "done" and guid != journal.new_data_write_guid:
            return None
        verify_journal(journal, path, allowed_folders(path, journal.sources[0].path, folders=search_paths))
    except MergeError as e:
        return e.detail.replace("untrusted merge journal: ", "").replace("; nothing was deleted", "")
    return None


# --------------------------------------------------------------------------- the merge

def _open_rw(path: str, wrap: Callable[[Storage], Storage] | None) -> Image:
    """Open a file of the merge for writing; ``wrap`` is the fault-injection seam of the tests."""
    storage: Storage = FileStorage(path, writable=True)
    return Image.open(path, "r+", storage=wrap(storage) if wrap else storage)


def _set_linkage2(path: str, current: uuid.UUID, new: uuid.UUID, wrap: Callable[[Storage], Storage] | None) -> None:
    """Make ``path`` accept both its parent's ``current`` and ``new`` DataWriteGuid (§9.5).

    parent_linkage takes the GUID that matches now and parent_linkage2 the one that will,
    so the link holds at every moment of the change (through the log; its own GUIDs stay).
    """
    image = _open_rw(path, wrap)
    try:
        loc = dict(image.metadata.parent_locator or {})
        l1, l2 = parse_linkage(loc.get("parent_linkage")), parse_linkage(loc.get("parent_linkage2"))
        if l2 == new and (l1 == current or current == new):
            return
        if current != new:  # on a resumed merge the destination already carries ``new``: keep l1
            loc["parent_linkage"] = format_linkage(current)
        loc["parent_linkage2"] = format_linkage(new)
        image.write_parent_locator(loc)
    finally:
        image.close()


def _unlink_merged(member: JournalMember, original: uuid.UUID, wrap: Callable[[Storage], Storage] | None) -> None:
    """After the merge the merged layer is invalid: it links to the destination's old GUID only.

    Reading it over the merged destination would mix old and new data, so it must not open
    as a chain any more (as with Hyper-V, merged files are invalid afterwards).
    """
    image = _open_rw(member.path, wrap)
    try:
        fd = image.storage.fileno()
        if fd is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != member.key:
            raise MergeError("the file changed while the merge checked it; it was left alone", path=member.path)
        loc = dict(image.metadata.parent_locator or {})
        if parse_linkage(loc.get("parent_linkage")) == original and \
                parse_linkage(loc.get("parent_linkage2")) in (None, C.ZERO_GUID):
            return
        loc["parent_linkage"] = format_linkage(original)
        loc["parent_linkage2"] = format_linkage(C.ZERO_GUID)
        image.write_parent_locator(loc)
    finally:
        image.close()


def _dependents(dest: Image, chain_images: list[Image], sources: list[Image], folders: Sequence[str],
                keep: bool, cache: ScanCache | None = None) -> list[str]:
    """Other files that the merge would break.

    Children of the destination (its content changes) and of the merged layers, the child
    itself included: merged layers are invalid afterwards, even when ``keep`` leaves them.
    Only regular files are read, each once per command (``cache``, from the resolver).
    """
    cache = cache if cache is not None else ScanCache()
    ours = {file_key(im.path) for im in chain_images}  # by inode: a link to the child is the child
    guids = {im.header.data_write_guid: im for im in sources + [dest]}
    out = []
    seen: set[str] = set()
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            p = os.path.abspath(os.path.join(folder, name))
            if p in seen or not name.lower().endswith(VHDX_SUFFIXES):
                continue
            seen.add(p)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in ours:
                continue  # one of the chain's own files, perhaps under another name
            peek = cache.peek(p)  # only regular files (a FIFO would block), each read once
            if not isinstance(peek, str) and peek.linkages & guids.keys():
                out.append(p)
    return out


def _human(n: int) -> str:
    """``n`` bytes for people: "512 bytes", "300.0 KiB", "1.2 GiB"."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def _resumable(journal: Journal | None, sources: list[Image], dest_path: str) -> Journal | None:
    """The destination's journal if it records this same merge unfinished (to resume it), else None.

    A finished merge's record ("done") is ignored; an unfinished merge of other files is refused.
    """
    if journal is None or journal.state == "done":
        return None
    if [s.data_write_guid for s in journal.sources] != [im.header.data_write_guid for im in sources]:
        names = ", ".join(os.path.basename(s.path) for s in journal.sources[:4])
        raise MergeError(f"the merge journal records an unfinished merge of other files into this disk "
                         f"({names}); run that merge again to finish it; nothing was changed", path=dest_path)
    return journal


def _plan_deletes(plan: MergePlan, keep: bool, allowed: set[str]) -> list[str]:
    """The files the merge will delete, nearest the destination first; refused if one may not be."""
    if keep:
        return []
    for path in plan.sources:
        problem = deletable_problem(path, allowed)
        if problem:
            raise MergeError(f"the merge may not delete a file it merges: {problem}; name the file itself, or "
                             f"its folder with --search, or merge with --keep; nothing was changed", path=plan.child)
    return list(reversed(plan.sources))


def _check_free_space(plan: MergePlan, dest_path: str) -> None:
    """Refuse before writing when the file system lacks the space the merge may need."""
    if plan.bytes_needed <= 0:
        return  # nothing to allocate: the merge writes only where space is already taken
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(dest_path))).free
    if plan.bytes_needed > free:
        raise MergeError(f"not enough free space: the merge needs up to {_human(plan.bytes_needed)}, "
                         f"{_human(free)} are free", path=dest_path)


def _no_space(error: BaseException | None) -> bool:
    """Whether ENOSPC is behind ``error`` (directly, or as the cause of a VhdxError)."""
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def _used_bytes(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _stopped(error: BaseException, plan: MergePlan, dest_path: str, used_before: int) -> MergeError:
    """The one-line error for an OSError during the copy; for a full disk, with the space still needed."""
    if not _no_space(error):
        reason = getattr(error, "strerror", None) or error
        return MergeError(f"the merge stopped: {reason}; every file is still consistent, run the same merge "
                          f"again to finish it", path=dest_path)
    where = getattr(error, "path", None) or getattr(error, "filename", None) or dest_path
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(dest_path))).free
    except OSError:
        free = 0
    still = max(plan.bytes_needed - max(_used_bytes(dest_path) - used_before, 0), 0)
    need = (f"the merge still needs up to {_human(still)}, {_human(free)} are free" if still else
            f"the merge needs more space than it estimated, {_human(free)} are free")
    return MergeError(f"disk full: {need}; nothing merged so far is lost: free some space and run the same "
                      f"merge again", path=where)


def _delete_members(members: list[JournalMember]) -> list[str]:
    """Delete checked files in the order given; each delete is made durable (folder fsync) before
    the next, so a power loss never brings back a file nearer the destination than one it kept away.
    A file already gone is skipped; a file replaced since it was checked stops the cleanup."""
    deleted = []
    for m in members:
        folder, name = os.path.split(m.path)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted already (by another run of the same merge)
            if (st.st_dev, st.st_ino) != m.key:
                raise MergeError("the file changed while the merge checked it; it was not deleted", path=m.path)
            os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        deleted.append(m.path)
    return deleted


def _refuse_kept(members: list[JournalMember | None], dest_path: str, child: str) -> None:
    """Kept files (``--keep``) let go of the destination: they are invalid, never merged or deleted."""
    if any(m is not None and m.status == "unlinked" for m in members):
        raise MergeError(f"this disk was already merged into {dest_path} (and kept with --keep); kept files "
                         f"are invalid and must not be merged again", path=child)


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: Literal[False] = False, storage_wrapper: Callable[[Storage], Storage] | None = None,
          on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult: ...


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: Literal[True], storage_wrapper: Callable[[Storage], Storage] | None = None,
          on_plan: Callable[[MergePlan], None] | None = None) -> MergePlan: ...


def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: bool = False, storage_wrapper: Callable[[Storage], Storage] | None = None,
          on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult | MergePlan:
    """Merge ``child`` into its parent, or every layer down to the ancestor ``into``.

    Afterwards the destination reads exactly as the child did and has a new DataWriteGuid;
    the merged files are deleted unless ``keep``. Refuses (listing them) when other disks
    depend on the destination unless ``force``. ``dry_run`` returns the plan and writes nothing.
    ``on_plan`` is called with the plan (its ``to_delete`` lists every file that will be deleted)
    before anything is written. Files are deleted only in the destination's folder, the child's
    and the ``search_paths``. ``storage_wrapper`` wraps every file opened for writing (fault-injection tests).

    Every file the merge writes or deletes (the sources and the destination) is locked
    exclusively before the plan is made and until the merge returns, the child first, before
    anything else is read: a second merge of the same chain, a writer, or a reader (qemu's or
    ours) is refused with :class:`LockedError`. A dry run takes shared locks only.
    """
    held: list[Storage] = []
    try:
        path = os.path.abspath(os.fspath(child))
        if not dry_run and os.path.isfile(path):
            _hold_exclusive([path], held)
        return _merge(child, into, progress=progress, ignore_id_mismatch=ignore_id_mismatch, keep=keep,
                      force=force, search_paths=search_paths, dry_run=dry_run, storage_wrapper=storage_wrapper,
                      held=held, on_plan=on_plan)
    finally:
        for storage in reversed(held):
            storage.close()


def _hold_exclusive(paths: Sequence[str], held: list[Storage]) -> None:
    """Lock each file exclusively (this process's later opens of it share the lock), into ``held``."""
    for p in paths:
        held.append(FileStorage(p, lock="exclusive"))


def _merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None, *,
           progress: Callable[[int, int], None] | None, ignore_id_mismatch: bool, keep: bool, force: bool,
           search_paths: Sequence[str | os.PathLike[str]], dry_run: bool,
           storage_wrapper: Callable[[Storage], Storage] | None, held: list[Storage],
           on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult | MergePlan:
    """The body of :func:`merge`; the locks it takes go into ``held``, which the caller releases."""
    child = os.path.abspath(os.fspath(child))
    search = [os.fspath(p) for p in search_paths]
    t0 = time.monotonic()
    # A merge that stopped after its copy only needs its last steps.
    finished = _finish_copied(child, into, keep, storage_wrapper, t0, dry_run=dry_run,
                              folders=search, on_plan=on_plan, held=held)
    if finished is not None:
        return finished
    leaf = Image.open(child, "r")
    if not leaf.has_parent:
        leaf.close()
        raise MergeError("not a differencing disk: nothing to merge", path=child)
    resolver = Resolver(search_paths=search, ignore_id_mismatch=ignore_id_mismatch)
    try:
        images, layers, _ = resolver.resolve(leaf)
    except BaseException:
        leaf.close()
        raise
    try:
        if into is None:
            dest_index = 1
        else:
            target = os.fspath(into)
            keys = [file_key(im.path) for im in images]
            if not os.path.exists(target) or file_key(target) not in keys[1:]:
                raise MergeError(f"{target} is not an ancestor of the child; the chain is: "
                                 + " <- ".join(im.path for im in reversed(images)), path=child)
            dest_index = keys.index(file_key(target))
        sources = images[:dest_index]
        dest_ro = images[dest_index]
        if not dry_run:  # every file the merge writes or deletes is ours alone before planning
            _hold_exclusive([im.path for im in sources + [dest_ro]], held)
        for im in sources + [dest_ro]:
            if im.size != leaf.size or im.logical_sector_size != leaf.logical_sector_size:
                raise MergeError(f"{im.path}: virtual size or sector size differs from the child's; "
                                 f"refusing to merge", path=child)
        for layer in layers[:dest_index]:
            if layer.linkage == "mismatch" and not ignore_id_mismatch:
                raise MergeError(f"{layer.path}: parent ID mismatch", path=child)
        plan = MergePlan(child=child, destination=dest_ro.path, sources=[im.path for im in sources],
                         destination_type=dest_ro.disk_type, virtual_size=leaf.size)
        journal = _resumable(load_journal(dest_ro), sources, dest_ro.path)
        plan.resuming = journal is not None
        plan.to_delete = _plan_deletes(plan, keep, allowed_folders(dest_ro.path, child, folders=search))
        folders = sorted({os.path.dirname(os.path.abspath(im.path)) for im in images[:dest_index + 1]} | set(search))
        plan.dependents = _dependents(dest_ro, images, sources, folders, keep, resolver.cache)
        plan_merge(sources, dest_ro, plan)
        if dry_run:
            return plan
        if plan.dependents and not force:
            raise MergeError("other disks depend on the destination or on a layer that the merge deletes; "
                             "their content would change (--force / force=True merges anyway): "
                             + ", ".join(plan.dependents), path=child)
        st = os.stat(dest_ro.path)
        if not st.st_mode & 0o222 or not os.access(dest_ro.path, os.W_OK):
            raise MergeError("the destination file is read-only", path=dest_ro.path)
        _check_free_space(plan, dest_ro.path)
        dest_path = dest_ro.path
        for im in images[dest_index:]:
            im.close()
        if on_plan is not None:
            on_plan(plan)
        used_before = _used_bytes(dest_path)
        try:
            result = _run(plan, sources, dest_path, journal, progress, storage_wrapper, keep)
        except (OSError, VhdxError) as e:
            if isinstance(e, VhdxError) and not _no_space(e):
                raise
            raise _stopped(e, plan, dest_path, used_before) from e
    finally:
        for im in images:
            im.close()
    try:
        result.deleted = _complete(dest_path, keep, storage_wrapper,
                                   allowed_folders(dest_path, child, folders=search), child)
    except OSError as e:
        raise MergeError(f"the data is merged but the cleanup stopped: {e.strerror or e}; run the same merge "
                         f"again to finish it", path=dest_path) from e
    result.seconds = time.monotonic() - t0
    return result


def _complete(dest_path: str, keep: bool, wrap: Callable[[Storage], Storage] | None, allowed: set[str],
              child: str = "") -> list[str]:
    """The steps after the copy, each safe to repeat: the merged files go (or, with ``keep``,
    let go of the destination), then the journal records the merge as done.

    Only files that :func:`verify_journal` ties to the destination are touched."""
    image = Image.open(dest_path, "r")
    try:
        journal = load_journal(image)
    finally:
        image.close()
    if journal is None:
        return []
    members = verify_journal(journal, dest_path, allowed)
    deleted = []
    if keep:
        # Kept files are invalid now: the layer above lets go of the destination, so neither
        # it nor anything above it opens over data that no longer matches.
        if members[-1] is not None and members[-1].status == "linked":
            _unlink_merged(members[-1], journal.original_data_write_guid, wrap)
    else:
        _refuse_kept(members, dest_path, child or dest_path)
        # Nearest the destination first: if this stops half way, what is left has a missing
        # parent (plainly broken), never a stale link to the merged destination.
        deleted = _delete_members([m for m in reversed(members) if m is not None])
    if journal.state != "done":
        _write_done(dest_path, journal, keep, wrap)
    return deleted


def _write_done(dest_path: str, journal: Journal, keep: bool, wrap: Callable[[Storage], Storage] | None) -> None:
    """The journal stays as a record of the last merge ("done"): a re-run of the same command
    after an interruption can tell that the job is finished."""
    image = _open_rw(dest_path, wrap)
    try:
        items = [it for it in metadata_items(image.metadata) if it.item_id != MERGE_JOURNAL_GUID]
        done = dict(journal.body, state="done", finished=int(time.time()), keep=keep)
        items.append(MetadataItem(MERGE_JOURNAL_GUID, json.dumps(done).encode(), C.METADATA_IS_USER))
        image.write_metadata_items(items, data_change=False)
    finally:
        image.close()


@dataclass
class _Peek:
    """What the search for a merge to finish needs from one file."""

    path: str
    raw_journal: bytes | None
    data_write_guid: uuid.UUID
    disk_type: str
    size: int
    parent: str | None


def _peek(path: str) -> _Peek | None:
    """Read-only look at a regular VHDX file; None if it is not one."""
    try:
        # A file in use is read without a lock: if its journal names the child, the exclusive
        # lock taken before the cleanup refuses to go on while the other process holds it.
        image, _in_use = open_peek(path)
    except (VhdxError, OSError):
        return None
    try:
        raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
        loc = image.metadata.parent_locator or {} if image.has_parent else {}
        parent = next((p for how, p in candidate_paths(loc, path, []) if how == "relative_path"), None)
        return _Peek(path, None if raw is None else bytes(raw), image.header.data_write_guid, image.disk_type,
                     image.size, parent)
    finally:
        image.close()


def _finish_candidates(child: str, into: str | os.PathLike[str] | None) -> Iterator[_Peek]:
    """Files that may hold the journal of a merge of ``child`` to finish: ``into``; else the files
    below the child by relative path (a restored file may sit above a layer that is back too);
    else, when the child is gone, every regular VHDX file of its folder."""
    if into is not None:
        paths = [os.path.abspath(os.fspath(into))]
    elif not os.path.exists(child):
        folder = os.path.dirname(child)
        try:
            paths = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                     if n.lower().endswith(VHDX_SUFFIXES)]
        except OSError:
            paths = []
    else:
        here = _peek(child)
        for _ in range(JOURNAL_MAX_SOURCES):
            here = _peek(here.parent) if here is not None and here.parent else None
            if here is None:
                return
            yield here
        return
    for p in paths:
        found = _peek(p)
        if found is not None:
            yield found


def _finish_plan(journal: Journal, members: list[JournalMember | None], peek: _Peek, child: str,
                 keep: bool) -> MergePlan:
    """The plan of a finish: nothing to copy; ``to_delete`` the files that are still there."""
    existing = [m for m in reversed(members) if m is not None]
    if journal.state == "done" or not keep:
        _refuse_kept(members, peek.path, child)
    if journal.state == "done" and os.path.exists(child) and \
            file_key(child) not in {m.key for m in existing}:
        raise MergeError(f"this disk was already merged into {peek.path}, and this copy of it is not a file "
                         f"that merge left behind; it is not deleted", path=child)
    return MergePlan(child=child, destination=peek.path, sources=[s.path for s in journal.sources],
                     destination_type=peek.disk_type, virtual_size=peek.size, resuming=True,
                     to_delete=[] if keep and journal.state != "done" else [m.path for m in existing])


def _finish_copied(child: str, into: str | os.PathLike[str] | None, keep: bool,
                   wrap: Callable[[Storage], Storage] | None, t0: float, *, dry_run: bool = False,
                   folders: Sequence[str] = (), on_plan: Callable[[MergePlan], None] | None = None,
                   held: list[Storage] | None = None) -> MergeResult | MergePlan | None:
    """Finish a merge that stopped after its copy, or None if there is none to finish.

    The destination holds a journal in state "copied" that lists this child: the data is all
    there, and only the steps of :func:`_complete` are left. State "done": the merge finished
    before; files of it that are still there (a power loss undid their deletion) are deleted.
    Either way only files that :func:`verify_journal` ties to the destination are touched.
    """
    for peek in _finish_candidates(child, into):
        if peek.raw_journal is None:
            continue
        try:
            journal = parse_journal(peek.raw_journal, peek.path)
        except MergeError:
            continue  # refused by the merge itself if this is its destination
        if journal.state == "copying" or not _journal_names(journal, child):
            continue
        done = journal.state == "done"
        allowed = allowed_folders(peek.path, child, folders=folders)
        if done and peek.data_write_guid != journal.new_data_write_guid:
            if os.path.exists(child):
                raise MergeError(f"this disk was already merged into {peek.path}, which has changed since; "
                                 f"it is invalid and must not be merged again", path=child)
            members: list[JournalMember | None] = []
        else:
            members = verify_journal(journal, peek.path, allowed)
        plan = _finish_plan(journal, members, peek, child, keep)
        if dry_run:
            return plan
        if held is not None:
            # Lock the destination and the files to delete; _complete reads the journal again.
            _hold_exclusive([peek.path] + [m.path for m in members if m is not None], held)
        if on_plan is not None:
            on_plan(plan)
        if not done:
            deleted = _complete(peek.path, keep, wrap, allowed, child)
        else:
            deleted = _delete_members([m for m in reversed(members) if m is not None])
        return MergeResult(plan=plan, bytes_copied=0, seconds=time.monotonic() - t0, deleted=deleted,
                           broken_dependents=[], new_data_write_guid=str(peek.data_write_guid))
    return None


def _run(plan: MergePlan, sources: list[Image], dest_path: str, journal: Journal | None,
         progress: Callable[[int, int], None] | None, wrap: Callable[[Storage], Storage] | None,
         keep: bool = False) -> MergeResult:
    above = sources[-1]  # the layer whose parent is the destination
    new_guid = journal.new_data_write_guid if journal else uuid.uuid4()
    source_guids = [str(im.header.data_write_guid) for im in sources]
    dest = _open_rw(dest_path, wrap)
    original = journal.original_data_write_guid if journal else dest.header.data_write_guid
    if journal:
        # Blocks an interrupted run allocated but never put in the BAT: give them back first.
        try:
            dest.trim_unreferenced_tail()
        except BaseException:
            dest.close()
            raise
    try:
        # 1. The layer above learns the destination's next GUID before the destination changes.
        _set_linkage2(above.path, dest.header.data_write_guid, new_guid, wrap)
    except BaseException:
        dest.close()
        raise
    copied = 0
    try:
        if dest.header.data_write_guid != new_guid:
            # 2. Journal and new DataWriteGuid in one go (the first change to the destination).
            dest.begin_session(data_change=True, data_write_guid=new_guid)
            items = [it for it in metadata_items(dest.metadata) if it.item_id != MERGE_JOURNAL_GUID]
            dest.write_metadata_items(items + [_journal_item(plan, new_guid, original, source_guids, keep=keep)])
        else:
            dest.begin_session(data_change=True, data_write_guid=new_guid)
        # 3. Copy, one batch of windows per transaction.
        total = plan.bytes_to_copy + plan.bytes_of_zeros
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        window = _window_size(sources + [dest])
        batch: list[tuple[int, int, Any]] = []
        batch_bytes = 0
        for w in _windows(sources, window, dest.size).tolist():
            start = w * window
            length = min(window, dest.size - start)
            if length <= 0:
                continue
            for voff, vlen, src, _v in _extents(sources, start, length):
                batch.append((voff, vlen, src))
                batch_bytes += vlen
                if src is not None:
                    copied += vlen
            if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_EXTENTS:
                zeros = sum(e[1] for e in batch if e[2] is None)
                dest.write_extents(batch, progress=tick)
                tick(zeros)
                batch, batch_bytes = [], 0
        if batch:
            zeros = sum(e[1] for e in batch if e[2] is None)
            dest.write_extents(batch, progress=tick)
            tick(zeros)
        # 4. Virtual-disk items come from the child (§4.1); the journal says "copied".
        child_items = {(it.item_id, bool(it.flags & C.METADATA_IS_USER)): it
                       for it in metadata_items(sources[0].metadata) if it.flags & C.METADATA_IS_VIRTUAL_DISK}
        items = []
        for it in metadata_items(dest.metadata):
            if it.item_id == MERGE_JOURNAL_GUID:
                continue
            key = (it.item_id, bool(it.flags & C.METADATA_IS_USER))
            items.append(child_items.pop(key, it) if it.flags & C.METADATA_IS_VIRTUAL_DISK else it)
        items.extend(child_items.values())
        dest.write_metadata_items(items + [_journal_item(plan, new_guid, original, source_guids, "copied", keep)])
        dest.flush()
    finally:
        dest.close()
    return MergeResult(plan=plan, bytes_copied=copied, seconds=0.0, deleted=[], broken_dependents=plan.dependents,
                       new_data_write_guid=str(new_guid))
