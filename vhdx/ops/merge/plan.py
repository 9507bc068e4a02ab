"""What a merge will do: the extents to copy (:mod:`.owners`), the space it needs, whom it breaks.

:func:`plan_merge` walks the windows of the virtual disk in which a source defines anything,
as :mod:`.owners` plans them from the sources' non-zero BAT entries (planning follows the data,
not the virtual size), and counts what the copy will do: bytes, destination blocks to allocate,
the holes it fills. Each window's extents are what the destination writes (in batches of
windows, one transaction each). The planner also finds the other disks the merge would break.
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
from ...format import constants as C
from .owners import BatView, Extent, Window, planned, sorted_unique, window_size, window_spans

KEEP_EXTENTS = 1 << 15  # extents a plan keeps for the copy (a few MiB); beyond that the copy plans again
ALLOCATED = C.HOLDS_DATA


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


def _filled_ranges(found: list[Extent], dest: BatView, allocated: np.ndarray) -> list[tuple[int, int]]:
    """File ranges ``(offset, length)`` that a window's extents write in blocks the destination
    already has (``allocated``: its blocks that hold data, ascending)."""
    if not found or not allocated.size:
        return []
    dbs = dest.image.block_size
    first = min(e[0] for e in found) // dbs
    last = max(e[0] + e[1] - 1 for e in found) // dbs
    lo, hi = np.searchsorted(allocated, (first, last + 1)).tolist()
    if lo == hi:
        return []
    have = set(allocated[lo:hi].tolist())
    out = []
    for voff, vlen, _src, _v in found:
        for b in range(voff // dbs, (voff + vlen - 1) // dbs + 1):
            if b in have:
                lo_, hi_ = max(voff, b * dbs), min(voff + vlen, (b + 1) * dbs)
                out.append((dest.offset(b) + lo_ - b * dbs, hi_ - lo_))
    return out


def _new_space(dest: BatView, touched: set[int], plan: MergePlan) -> None:
    """Blocks to allocate, and sector bitmap blocks for the chunks of a differencing destination
    that get a new block and have no bitmap block yet."""
    if not touched:
        return
    im = dest.image
    t = np.fromiter(touched, dtype=np.int64)
    allocated = batmod.holds_data(dest.states_of(t))
    plan.allocations = int((~allocated).sum())
    plan.bytes_to_allocate = plan.allocations * im.block_size
    if im.has_parent and plan.allocations:
        g = im.geometry
        chunks = sorted_unique(t[~allocated] // g.chunk_ratio)
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
               planner: Callable[..., Iterable[Window]] = planned, keep: list[Any] | None = None,
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
    sp = dview.sparse
    allocated = sp.blocks[batmod.holds_data(sp.states)]
    touched: set[int] = set()
    holes = kept = 0
    spans = window_spans(views, window_size([v.image for v in views] + [dest]), dest.size)
    for start, length, found in planner(views, spans):
        kept += len(found)
        if keep is not None:
            keep.append((start, length, found)) if kept <= keep_limit else keep.clear()
        for extent in found:
            _count(plan, views, extent)
            voff, vlen = extent[0], extent[1]
            touched.update(range(voff // dbs, (voff + vlen - 1) // dbs + 1))
        filled = _filled_ranges(found, dview, allocated)
        if filled:
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
