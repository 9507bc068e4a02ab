"""Compact: give a dynamic or differencing disk's unused space back, like Optimize-VHD.

Three steps, each crash-safe (docs/architecture.md, "Crash safety"), and each leaving the
disk reading the same bytes at every moment:

1. **Zero blocks become unallocated.** A block whose data is all zeros becomes ZERO in a disk
   without a parent. In a differencing disk it becomes NOT_PRESENT, and only where its parent
   also reads zeros (else the parent's data would show through). One log transaction. With
   ``trim``, blocks wholly in the free space of the disk's file systems count as zeros
   (:mod:`vhdx.ops.fsfree`). While the blocks are read, those found all zeros past the file's
   future end are punched out of the host file on a second thread (:mod:`vhdx.file.holes`):
   a hole reads zeros too, so no byte changes, and the final cut has less to free.
2. **Blocks at the end move into the holes.** Each is copied into free space lower in the
   file, flushed, and only then its BAT entry points there (through the log); its old place
   is free once that entry is durable (:mod:`vhdx.file.space`).
3. **The file is cut** after its last referenced block, the new size logged first.

A kill at any point leaves a file that opens (its log replayed) with the same content, and
running the command again finishes the work. The DataWriteGuid is kept: nothing a reader of
the disk sees changes, so the disk's children stay linked to it (they are still refused
unless ``force``, since they are not checked).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..chains.disk import Disk
from ..chains.paths import PathArgs
from ..chains.resolve import open as open_disk
from ..errors import UsageError, as_callback, as_path
from ..file.buffers import aligned_buffer
from ..file.holes import Puncher
from ..file.image import Image
from ..file.space import Unit, commit_entries, host_sparse, lower_bat, move_units, plan_moves, referenced_end, shrink_file, units
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from ..format.geometry import align_up
from .fsfree import free_blocks
from .maintenance import PROBE, SCAN_PIECE, ProgressCallback, all_zero, ordered_map, refuse_children

MOVE_BATCH_BYTES = 1 << 30   # bytes moved per log transaction
MOVE_BATCH_UNITS = 512       # and blocks per transaction
SCAN_THREADS = 2             # threads reading the blocks that may be zeros


@dataclass
class CompactResult:
    """What :func:`compact` did (or, with ``dry_run``, would do).

    ``zero_blocks`` were unallocated (``trimmed_blocks`` of them because they lie in the free
    space of a file system on the disk, with ``trim``; ``trim`` lists each volume examined),
    ``moved_blocks`` (``bytes_moved``) were moved toward the
    start of the file, and the file went from ``size_before`` to ``size_after`` bytes
    (``bytes_reclaimed``). ``children`` lists the disks that depend on this one.
    """

    path: str
    dry_run: bool
    zero_blocks: int
    moved_blocks: int
    bytes_moved: int
    size_before: int
    size_after: int
    children: list[str] = field(default_factory=list)
    kept_nonzero_parent: int = 0
    trimmed_blocks: int = 0
    trim: list[dict[str, Any]] | None = None

    @property
    def bytes_reclaimed(self) -> int:
        """File bytes given back."""
        return self.size_before - self.size_after

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        d = asdict(self)
        d["bytes_reclaimed"] = self.bytes_reclaimed
        return d


@dataclass
class Unallocations:
    """The BAT entries that unallocate blocks, how many of those lie in file-system free space
    (``trimmed``), and how many blocks reading zeros had to stay (``kept``: the parent's data)."""

    updates: dict[int, int] = field(default_factory=dict)
    trimmed: int = 0
    kept: int = 0


FREE, ZERO, MAYBE = "free", "zero", "maybe"     # a block in free space, read as zeros, to be read further


def zero_block_entries(disk: Disk, progress: ProgressCallback | None = None,
                       free: np.ndarray | None = None) -> Unallocations:
    """The BAT entries that unallocate the blocks of ``disk``'s file that read as zeros or that
    ``free`` flags (wholly in a file system's free space, see :mod:`vhdx.ops.fsfree`).

    A disk without a parent gets ZERO entries. A differencing disk's block becomes NOT_PRESENT
    only where its parent reads zeros, for a free-space block as for a zero block: dropping it
    elsewhere would show the parent's older bytes there, so it stays.

    Two passes: the first bytes of every block tell most blocks of data at once; then the
    blocks that may be zeros are read to the end, those beyond the file's expected end first,
    and each found all zeros there is punched out of the host file on a second thread while
    the reading goes on (:mod:`vhdx.file.holes`: it reads zeros before and after, so the file
    never changes for a reader; the final cut then has little left to free).
    """
    image = disk.image
    g = image.geometry
    blocks = image.allocated()[0].tolist()
    buf = aligned_buffer(g.block_size)   # page-aligned: the kernel copies into it at full speed
    kinds = classify_blocks(image, blocks, buf, free)
    tail = expected_end(image, len(kinds))
    order = sorted(kinds, key=lambda b: block_file_offset(image, b) < tail)   # beyond the end first
    out = Unallocations()
    resolved = len(blocks) - len(kinds)
    verdicts = ordered_map(Verifier(image, kinds).zeros, order, SCAN_THREADS)
    with Puncher(image.storage) as puncher, contextlib.closing(verdicts):
        for n, (block, zeros) in enumerate(zip(order, verdicts)):
            start = block * g.block_size
            view = buf[:min(g.block_size, image.size - start)]
            if progress is not None:
                progress((resolved + n + 1) * g.block_size, len(blocks) * g.block_size)
            if not zeros:
                continue
            if image.has_parent and not parent_reads_zeros(disk, view, start):
                out.kept += 1
                continue
            state = C.PAYLOAD_BLOCK_NOT_PRESENT if image.has_parent else C.PAYLOAD_BLOCK_ZERO
            out.updates[g.payload_bat_index(block)] = batmod.make_entry(state, 0)
            out.trimmed += kinds[block] == FREE
            if kinds[block] == MAYBE and block_file_offset(image, block) >= tail and punchable(image, block):
                puncher.punch(block_file_offset(image, block), len(view))
    return out


class Verifier:
    """Reads the blocks classified MAYBE past their first bytes, on several threads: each has
    its own buffer; a block whose file bytes are what it reads (:func:`punchable`) is read from
    the file directly, any other through the image, one thread at a time."""

    def __init__(self, image: Image, kinds: dict[int, str]) -> None:
        self.image, self.kinds = image, kinds
        self.local = threading.local()
        self.image_lock = threading.Lock()

    def zeros(self, block: int) -> bool:
        """Whether the block reads zeros (FREE and ZERO blocks: without reading)."""
        if self.kinds[block] != MAYBE:
            return True
        image = self.image
        buf = getattr(self.local, "buf", None)
        if buf is None:
            buf = self.local.buf = aligned_buffer(SCAN_PIECE)
        start = block * image.block_size
        length = min(image.block_size, image.size - start)
        if punchable(image, block):
            base = block_file_offset(image, block)
            for at in range(PROBE, length, SCAN_PIECE):
                part = buf[:min(SCAN_PIECE, length - at)]
                image.storage.readinto(part, base + at)
                if not all_zero(part):
                    return False
            return True
        with self.image_lock:
            return rest_reads_zeros(image, buf, start, length)


def punchable(image: Image, block: int) -> bool:
    """Whether the file's bytes of the block are exactly what it reads (FULLY_PRESENT, no log
    overlay): then bytes read as zeros may become a hole."""
    entry = int(image.bat[image.geometry.payload_bat_index(block)])
    return entry & C.BAT_STATE_MASK == C.PAYLOAD_BLOCK_FULLY_PRESENT and not image.log_replayed_in_memory


def block_file_offset(image: Image, block: int) -> int:
    """Where payload block ``block``'s data sits in the file."""
    return int(image.bat[image.geometry.payload_bat_index(block)]) & C.BAT_FILE_OFFSET_MASK


def classify_blocks(image: Image, blocks: list[int], buf: memoryview, free: np.ndarray | None) -> dict[int, str]:
    """The blocks that may be unallocated: FREE (in file-system free space), ZERO (host holes),
    MAYBE (their first bytes are zeros: read the rest to know). Blocks of data are left out."""
    g = image.geometry
    kinds: dict[int, str] = {}
    for block in blocks:
        start = block * g.block_size
        length = min(g.block_size, image.size - start)
        if free is not None and block < free.size and free[block]:
            kinds[block] = FREE
        elif host_sparse(image, start, length):
            kinds[block] = ZERO
        else:
            head = buf[:min(PROBE, length)]
            image.readinto_at(head, start)   # this file's own bytes; clear bits read zeros
            if all_zero(head):
                kinds[block] = MAYBE if length > PROBE else ZERO
    return kinds


def expected_end(image: Image, candidates: int) -> int:
    """Where the file would end if every candidate block were dropped and the rest packed behind
    the structures; zero blocks at or past it are not where moved blocks will go. A guess, for
    speed only: a structure placed late makes it too large (fewer blocks punched); holes too
    small to pack into make the real end larger than it (a punched block may then receive a
    moved one: slower, never wrong, since every punch is over before the first write)."""
    spans = _structures(image)
    placed = units(image)
    kept = sum(u.length for u in placed) - candidates * image.block_size
    return align_up(max(s.end for s in spans) + max(kept, 0))


def reads_zeros(image: Image, view: memoryview, start: int) -> bool:
    """Whether this file's own bytes of the block at ``start`` (``len(view)`` of them) are all
    zeros: host holes are not read, and a block of data is told by its first bytes."""
    if host_sparse(image, start, len(view)):
        return True
    head = view[:min(PROBE, len(view))]
    image.readinto_at(head, start)
    return all_zero(head) and rest_reads_zeros(image, view, start, len(view))


def rest_reads_zeros(image: Image, buf: memoryview, start: int, length: int) -> bool:
    """Whether the ``length`` bytes of the block at ``start`` past its first ``PROBE`` are all
    zeros (read a piece at a time into ``buf``: small pieces stay in the CPU cache)."""
    done = PROBE
    while done < length:
        part = buf[:min(SCAN_PIECE, length - done, len(buf))]
        image.readinto_at(part, start + done)     # this file's own bytes; clear bits read zeros
        if not all_zero(part):
            return False
        done += len(part)
    return True


def parent_reads_zeros(disk: Disk, view: memoryview, start: int) -> bool:
    """Whether the parent of ``disk`` reads zeros over ``len(view)`` bytes at ``start`` (none: no)."""
    parent = disk.parent
    if parent is None:
        return False
    n = parent.pread_into(view, start)   # clipped at the parent's size: it reads zeros past it
    return all_zero(view[:n])


def _structures(image: Image) -> list[layout.Span]:
    return layout.structure_spans(image.header, image.region_table)


def _batches(moves: list[tuple[Unit, int]]) -> list[list[tuple[Unit, int]]]:
    out: list[list[tuple[Unit, int]]] = []
    size = 0
    for move in moves:
        if not out or len(out[-1]) >= MOVE_BATCH_UNITS or size + move[0].length > MOVE_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(move)
        size += move[0].length
    return out


def pack(image: Image) -> tuple[int, int]:
    """Move blocks from the end of the file into its holes until none fits; (blocks, bytes) moved."""
    moved = nbytes = 0
    while True:
        moves = plan_moves(_structures(image), units(image))
        if not moves:
            return moved, nbytes
        for batch in _batches(moves):
            nbytes += move_units(image, batch)
            moved += len(batch)


def simulate(image: Image, updates: dict[int, int]) -> tuple[int, int, int]:
    """(blocks, bytes moved, file size after) of a compact, computed on the list of what the
    file holds (``updates`` unallocate blocks: their units drop out), not on a copy of the BAT."""
    placed = [u for u in units(image) if u.bat_index not in updates]
    moved = nbytes = 0
    spans = _structures(image)
    while True:
        moves = plan_moves(spans, placed)
        if not moves:
            break
        going = {unit.bat_index: dst for unit, dst in moves}
        placed = sorted((Unit(u.bat_index, going.get(u.bat_index, u.start), u.length) for u in placed),
                        key=lambda u: u.start)
        moved += len(moves)
        nbytes += sum(unit.length for unit, _ in moves)
    end = max([s.end for s in spans] + [u.end for u in placed])
    return moved, nbytes, min(align_up(end), image.storage.size())


def _check_compactable(image: Image) -> None:
    if image.disk_type == "fixed":
        raise UsageError("a fixed disk keeps every block allocated; convert it to a dynamic disk first "
                         "('vhdx convert --dynamic')", path=image.path)


def compact(path: str | os.PathLike[str], *, dry_run: bool = False, force: bool = False, trim: bool = False,
            progress: ProgressCallback | None = None, search_paths: PathArgs = (),
            parents: PathArgs | None = None, ignore_id_mismatch: bool = False) -> CompactResult:
    """Compact the dynamic or differencing disk ``path`` in place, like ``Optimize-VHD``.

    Blocks that read as zeros are unallocated (a differencing disk's only where its parent
    reads zeros too), blocks at the end move into the holes, and the file is cut. With
    ``trim``, blocks lying wholly in the free space of the disk's file systems (ext2/3/4, FAT,
    NTFS, in MBR or GPT partitions; read with pytsk3, the ``forensics`` extra) are unallocated
    as if they read zeros (by the same rule for a differencing disk); ``trim`` in the result
    says what each volume gave. Crash-safe
    and restartable: after a kill, running it again finishes. A disk that other disks depend
    on is refused (:class:`ChainError`) unless ``force``. ``dry_run`` writes nothing and says
    what would be done. ``progress(done, total)`` follows the bytes of data examined.
    ``search_paths``, ``parents`` and ``ignore_id_mismatch`` find a differencing disk's
    parents as for :func:`vhdx.open` (and ``search_paths`` its children).
    Returns a :class:`CompactResult`.
    """
    path, progress = as_path(path), as_callback(progress)
    children = refuse_children(path, "compact", force or dry_run, search_paths)
    options: dict[str, Any] = dict(search_paths=search_paths, parents=parents, ignore_id_mismatch=ignore_id_mismatch)
    with open_disk(path, "r" if dry_run else "r+", **options) as disk:
        image = disk.image
        _check_compactable(image)
        before = image.storage.size()
        free_map = free_blocks(disk, image.block_size) if trim else None
        found = zero_block_entries(disk, progress, None if free_map is None else free_map.free)
        volumes = None if free_map is None else [v.to_dict() for v in free_map.volumes]
        counts = dict(children=children, kept_nonzero_parent=found.kept, trimmed_blocks=found.trimmed, trim=volumes)
        if dry_run:
            moved, nbytes, after = simulate(image, found.updates)
            return CompactResult(path, True, len(found.updates), moved, nbytes, before, after, **counts)
        commit_entries(image, found.updates, data_change=False)
        lower_bat(image)
        moved, nbytes = pack(image)
        shrink_file(image, referenced_end(image))
        after = image.storage.size()
    return CompactResult(path, False, len(found.updates), moved, nbytes, before, after, **counts)
