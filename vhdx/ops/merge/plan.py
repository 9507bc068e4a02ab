"""What a merge will do: which source defines each sector, the extents to copy, and the cost.

The plan is computed with numpy over the sources' BATs and sector bitmaps, one window of the
virtual disk at a time (a window holds whole blocks of every layer), so memory stays bounded
whatever the disk size. Each source's used blocks are listed in a :class:`BatView` once per
merge (the BAT's non-zero entries, read in bounded chunks): planning follows the data, not the
virtual size.
Each window becomes a list of extents (runs of sectors owned by one source layer, or zeros)
that the destination writes as one transaction. The planner also counts the free space the
merge may use and finds the other disks it would break.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ...chains.paths import file_key
from ...chains.scan import VHDX_SUFFIXES, ScanCache
from ...errors import MergeError
from ...file.image import Image
from ...file.storage import OverlayStorage, Storage
from ...format import bat as batmod
from ...format import bitmap as bitmapmod
from ...format import constants as C

TRANSPARENT = 255
ZERO = 254
WINDOW_MIN = 64 << 20
KEEP_EXTENTS = 1 << 15  # extents a plan keeps for the copy (a few MiB); beyond that the copy plans again
ZERO_STATES = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
               C.PAYLOAD_BLOCK_UNMAPPED_V095)
ALLOCATED = C.HOLDS_DATA

Extent = tuple[int, int, Any, int]  # (virtual offset, length, (storage, file offset) or None for zeros, source)


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
        """The plan as plain JSON-ready values."""
        return asdict(self)


@dataclass(frozen=True)
class BatView:
    """One image's BAT as the planner reads it: its non-zero entries, read in bounded chunks
    (:class:`~vhdx.format.bat.SparseBat`: blocks listed one by one, runs of plain ZERO-like
    blocks). Every other block is NOT_PRESENT, so the view costs what the data costs."""

    image: Image
    sparse: batmod.SparseBat

    @classmethod
    def of(cls, image: Image) -> "BatView":
        """The view of ``image`` (once per merge)."""
        return cls(image, image.sparse())

    def used_blocks(self) -> Iterator[np.ndarray]:
        """Arrays of the blocks whose state is not NOT_PRESENT (listed blocks, then each run)."""
        sp = self.sparse
        yield sp.blocks[sp.states != C.PAYLOAD_BLOCK_NOT_PRESENT]
        for a, b in zip(sp.run_starts.tolist(), sp.run_stops.tolist()):
            yield np.arange(a, b, dtype=np.int64)

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(states, offsets)`` of blocks ``start`` to ``stop``, NOT_PRESENT (0) where unused."""
        return batmod.dense(self.sparse, start, stop)

    def states_of(self, blocks: np.ndarray) -> np.ndarray:
        """The state of each of ``blocks`` (int64 array)."""
        sp = self.sparse
        out = np.zeros(blocks.size, dtype=np.uint8)
        j = np.searchsorted(sp.run_stops, blocks, side="right")
        inside = j < sp.run_starts.size
        inside[inside] = sp.run_starts[j[inside]] <= blocks[inside]
        out[inside] = sp.run_states[j[inside]]
        i = np.searchsorted(sp.blocks, blocks)
        listed = i < sp.blocks.size
        listed[listed] = sp.blocks[i[listed]] == blocks[listed]
        out[listed] = batmod.states(sp.entries[i[listed]])
        return out

    def entry(self, block: int) -> tuple[int, int]:
        """``(state, file offset)`` of one block."""
        sp = self.sparse
        i = int(np.searchsorted(sp.blocks, block))
        if i < sp.blocks.size and int(sp.blocks[i]) == block:
            raw = int(sp.entries[i])
            return raw & C.BAT_STATE_MASK, raw & C.BAT_FILE_OFFSET_MASK
        j = int(np.searchsorted(sp.run_stops, block, side="right"))
        if j < sp.run_starts.size and int(sp.run_starts[j]) <= block:
            return int(sp.run_states[j]), 0
        return C.PAYLOAD_BLOCK_NOT_PRESENT, 0

    def state(self, block: int) -> int:
        """The state of one block."""
        return self.entry(block)[0]

    def offset(self, block: int) -> int:
        """The file offset of one block (0 when it has none)."""
        return self.entry(block)[1]


# --------------------------------------------------------------------------- windows and owners

def window_size(images: Sequence[Image]) -> int:
    """The planning window: at least 64 MiB, and whole blocks of every image."""
    return max([WINDOW_MIN] + [im.block_size for im in images])


def windows(views: Sequence[BatView], window: int) -> np.ndarray:
    """Indexes of the windows in which any source defines anything (vectorised over the BATs)."""
    hits = []
    for v in views:
        for used in v.used_blocks():
            hits.append(np.unique((used * v.image.block_size) // window))
    if not hits:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(hits))


def window_spans(views: Sequence[BatView], window: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of every window of a ``size``-byte disk in which a source defines anything."""
    for w in windows(views, window).tolist():
        start = w * window
        length = min(window, size - start)
        if length > 0:
            yield start, length


def _source_sectors(v: BatView, i: int, start: int, length: int, ss: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(defined mask, owner values) per unit of ``ss`` bytes (a logical sector, or a whole block
    where :func:`planning_unit` allows it) of the window for source ``i``; None if it has nothing."""
    im = v.image
    bs = im.block_size
    spb = bs // ss
    first_block = start // bs
    states = v.window(first_block, -(-(start + length) // bs))[0]
    if not np.any(states != C.PAYLOAD_BLOCK_NOT_PRESENT):
        return None
    defined = np.isin(states, (C.PAYLOAD_BLOCK_FULLY_PRESENT,) + ZERO_STATES)
    if not im.has_parent:
        defined |= states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
    mask = np.repeat(defined, spb)
    vals = np.repeat(np.where(np.isin(states, ZERO_STATES), ZERO, i).astype(np.uint8), spb)
    if im.has_parent:
        for k in np.flatnonzero(states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT).tolist():
            mask[k * spb:(k + 1) * spb] = im.read_bitmap(first_block + k).astype(bool)
            vals[k * spb:(k + 1) * spb] = i
    lo = (start - first_block * bs) // ss  # >= 0: the window may start inside the first block
    n = length // ss
    return mask[lo:lo + n], vals[lo:lo + n]


def planning_unit(views: Sequence[BatView], start: int, length: int) -> int:
    """The bytes one entry of :func:`owners` stands for in a window: a whole block where every source
    has the same block size, the window is whole blocks and no differencing source has a partially
    present block in it (so no sector bitmap is needed), else a logical sector. A sparse 1 TiB chain
    plans its windows in a few dozen entries each instead of 128 Ki sectors."""
    ss, bs = views[0].image.logical_sector_size, views[0].image.block_size
    if start % bs or length % bs or any(v.image.block_size != bs for v in views):
        return ss
    for v in views:
        if v.image.has_parent and np.any(v.window(start // bs, (start + length) // bs)[0]
                                          == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT):
            return ss
    return bs


def owners(views: Sequence[BatView], start: int, length: int, unit: int | None = None) -> np.ndarray:
    """Per ``unit`` (default: logical sector) of [start, start+length): which source defines it
    (index), ZERO, or TRANSPARENT."""
    ss = unit or views[0].image.logical_sector_size
    owner = np.full(length // ss, TRANSPARENT, dtype=np.uint8)
    for i, v in enumerate(views):
        found = _source_sectors(v, i, start, length, ss)
        if found is None:
            continue
        mask, vals = found
        take = mask & (owner == TRANSPARENT)
        owner[take] = vals[take]
    return owner


def extents(views: Sequence[BatView], start: int, length: int) -> Iterator[Extent]:
    """(virtual_offset, length, source, source_index) runs of one window; source None means zeros."""
    ss = planning_unit(views, start, length)
    starts, stops, values = bitmapmod.runs(owners(views, start, length, ss))
    for s0, s1, v in zip(starts.tolist(), stops.tolist(), values.tolist()):
        if v == TRANSPARENT:
            continue
        voff, vlen = start + s0 * ss, (s1 - s0) * ss
        if v == ZERO:
            yield voff, vlen, None, -1
            continue
        im = views[v].image
        bs = im.block_size
        pos, end = voff, voff + vlen
        while pos < end:  # split at the source's block boundaries: each block has its own file offset
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, end - pos)
            yield pos, n, (im.storage, views[v].offset(block) + in_block), v
            pos += n


# --------------------------------------------------------------------------- the space it needs

def _fileno(storage: Storage) -> int | None:
    """The descriptor of the real file under ``storage`` (through a read-only log overlay), if any."""
    fd = storage.fileno()
    if fd is None and isinstance(storage, OverlayStorage):
        fd = storage.base.fileno()
    return fd


def _merged_ranges(ranges: list[tuple[int, int]]) -> list[list[int]]:
    """``(offset, length)`` ranges as sorted, non-overlapping [start, end) pairs."""
    merged: list[list[int]] = []
    for start, n in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + n)
        else:
            merged.append([start, start + n])
    return merged


def hole_bytes(fd: int | None, ranges: list[tuple[int, int]]) -> int:
    """How many bytes of the file ranges ``(offset, length)`` are holes that a write would allocate.

    Uses SEEK_DATA/SEEK_HOLE; without a descriptor or without that support, every byte counts.
    """
    total = sum(n for _, n in ranges)
    if fd is None or not ranges or not hasattr(os, "SEEK_DATA"):
        return total
    holes = 0
    for start, end in _merged_ranges(ranges):
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


def _filled_ranges(voff: int, vlen: int, dest: BatView) -> Iterator[tuple[int, int]]:
    """File ranges ``(offset, length)`` that an extent writes in blocks the destination already has."""
    dbs = dest.image.block_size
    for b in range(voff // dbs, (voff + vlen - 1) // dbs + 1):
        if dest.state(b) in ALLOCATED:
            lo, hi = max(voff, b * dbs), min(voff + vlen, (b + 1) * dbs)
            yield dest.offset(b) + lo - b * dbs, hi - lo


def _new_space(dest: BatView, touched: set[int], plan: MergePlan) -> None:
    """Blocks to allocate, and sector bitmap blocks for the chunks of a differencing destination
    that get a new block and have no bitmap block yet."""
    if not touched:
        return
    im = dest.image
    t = np.fromiter(touched, dtype=np.int64)
    allocated = np.isin(dest.states_of(t), ALLOCATED)
    plan.allocations = int((~allocated).sum())
    plan.bytes_to_allocate = plan.allocations * im.block_size
    if im.has_parent and plan.allocations:
        g = im.geometry
        chunks = np.unique(t[~allocated] // g.chunk_ratio)
        entries = im.bat[[g.sbm_bat_index(int(c)) for c in chunks.tolist()]]
        lacking = int((batmod.states(entries) != C.SB_BLOCK_PRESENT).sum())
        plan.bytes_to_allocate += lacking * C.SECTOR_BITMAP_BLOCK_SIZE


def _count(plan: MergePlan, views: Sequence[BatView], extent: Extent) -> None:
    """Add one extent to the plan's totals."""
    voff, vlen, src, v = extent
    if src is None:
        plan.bytes_of_zeros += vlen
    else:
        plan.bytes_to_copy += vlen
        name = views[v].image.path
        plan.per_source_bytes[name] = plan.per_source_bytes.get(name, 0) + vlen


def plan_merge(views: Sequence[BatView], dest: Image, plan: MergePlan, *,
               extents_of: Callable[..., Iterable[Extent]] = extents, keep: list[Any] | None = None,
               keep_limit: int = KEEP_EXTENTS) -> MergePlan:
    """Fill in the totals of ``plan`` (reads BATs and bitmaps, not data).

    ``bytes_needed`` is the free space the merge may use: new blocks and bitmap blocks, the holes
    of sparse blocks it writes into, and, when it needs any of those, the holes of the log and a
    page of BAT and bitmap per block for the metadata. ``keep``, if given, receives
    ``(start, length, extents)`` of every window, so that the copy need not plan them again; or
    nothing at all when there are more than ``keep_limit`` extents (memory stays bounded).
    """
    dview = BatView.of(dest)
    dbs = dest.block_size
    fd = _fileno(dest.storage)
    touched: set[int] = set()
    holes = kept = 0
    for start, length in window_spans(views, window_size([v.image for v in views] + [dest]), dest.size):
        filled: list[tuple[int, int]] = []
        found = list(extents_of(views, start, length))
        kept += len(found)
        if keep is not None:
            keep.append((start, length, found)) if kept <= keep_limit else keep.clear()
        for extent in found:
            _count(plan, views, extent)
            voff, vlen = extent[0], extent[1]
            touched.update(range(voff // dbs, (voff + vlen - 1) // dbs + 1))
            filled.extend(_filled_ranges(voff, vlen, dview))
        holes += hole_bytes(fd, filled)
    plan.destination_blocks = len(touched)
    _new_space(dview, touched, plan)
    if plan.bytes_to_allocate + holes:
        log = dest.header
        margin = hole_bytes(fd, [(log.log_offset, log.log_length)]) + 2 * C.LOG_SECTOR_SIZE * (len(touched) + 1)
        plan.bytes_needed = plan.bytes_to_allocate + holes + margin
    return plan


def human_size(n: int) -> str:
    """``n`` bytes for people: "512 bytes", "300.0 KiB", "1.2 GiB"."""
    if n < 1024:
        return f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"


def check_free_space(plan: MergePlan, dest_path: str) -> None:
    """Refuse before writing when the file system lacks the space the merge may need."""
    if plan.bytes_needed <= 0:
        return  # nothing to allocate: the merge writes only where space is already taken
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(dest_path))).free
    if plan.bytes_needed > free:
        raise MergeError(f"not enough free space: the merge needs up to {human_size(plan.bytes_needed)}, "
                         f"{human_size(free)} are free", path=dest_path)


def no_space(error: BaseException | None) -> bool:
    """Whether ENOSPC is behind ``error`` (directly, or as the cause of a VhdxError)."""
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        error = error.__cause__ or error.__context__
    return False


def used_bytes(path: str) -> int:
    """The bytes ``path`` takes on disk (0 if it cannot be examined)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def stopped_error(error: BaseException, plan: MergePlan, dest_path: str, used_before: int) -> MergeError:
    """The one-line error for an OSError during the copy; for a full disk, with the space still needed."""
    if not no_space(error):
        reason = getattr(error, "strerror", None) or error
        return MergeError(f"the merge stopped: {reason}; every file is still consistent, run the same merge "
                          f"again to finish it", path=dest_path)
    where = getattr(error, "path", None) or getattr(error, "filename", None) or dest_path
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(dest_path))).free
    except OSError:
        free = 0
    still = max(plan.bytes_needed - max(used_bytes(dest_path) - used_before, 0), 0)
    need = (f"the merge still needs up to {human_size(still)}, {human_size(free)} are free" if still else
            f"the merge needs more space than it estimated, {human_size(free)} are free")
    return MergeError(f"disk full: {need}; nothing merged so far is lost: free some space and run the same "
                      f"merge again", path=where)


# --------------------------------------------------------------------------- whom it breaks

def _vhdx_files(folders: Sequence[str]) -> Iterator[str]:
    """The .vhdx/.avhdx paths of ``folders``, each once (absolute)."""
    seen: set[str] = set()
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            p = os.path.abspath(os.path.join(folder, name))
            if p not in seen and name.lower().endswith(VHDX_SUFFIXES):
                seen.add(p)
                yield p


def dependents(dest: Image, chain_images: Sequence[Image], sources: Sequence[Image], folders: Sequence[str],
               cache: ScanCache | None = None) -> list[str]:
    """Other files that the merge would break.

    Children of the destination (its content changes) and of the merged layers, the child
    itself included: merged layers are invalid afterwards, even when they are kept.
    Only regular files are read, each once per command (``cache``, from the resolver).
    """
    cache = cache if cache is not None else ScanCache()
    ours = {file_key(im.path) for im in chain_images}  # by inode: a link to the child is the child
    guids = {im.header.data_write_guid for im in list(sources) + [dest]}
    out = []
    for p in _vhdx_files(folders):
        try:
            st = os.stat(p)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in ours:
            continue  # one of the chain's own files, perhaps under another name
        peek = cache.peek(p)  # only regular files (a FIFO would block), each read once
        if not isinstance(peek, str) and peek.linkages & guids:
            out.append(p)
    return out
