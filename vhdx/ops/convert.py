"""Convert: any VHDX (with its chain) or a raw image into a new standalone VHDX, like Convert-VHD.

The source is opened read-only and never changed: a VHDX through :func:`vhdx.open` (its parents
found as usual, a dirty log replayed in memory), a raw image as a plain read-only file. The
output is built under a temporary name beside its final one and appears only when complete
(:func:`~vhdx.file.outputs.atomic_output`); until then its writes are not flushed one by one,
since nothing refers to the file. Only the ranges the source may hold data in are read (a
VHDX's allocated blocks through its chain, a raw file's data extents by ``SEEK_DATA``); a block
that reads as zeros stays unallocated in a dynamic result (and sparse in a fixed one). The
logical and physical sector sizes and the disk's identity (Page83Data) are kept unless asked
otherwise; ``sha256`` hashes the virtual disk's bytes as they go by.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from ..chains.disk import Disk
from ..chains.paths import PathArgs
from ..chains.resolve import MissingParent
from ..errors import DiskExistsError, UsageError, VhdxError, as_callback, as_path
from ..file.create import create_image
from ..file.image import Image
from ..file.outputs import atomic_output
from ..file.storage import FileStorage
from ..format import constants as C
from ..format.geometry import align_up
from .export import given_options, open_layer, refuse_chain_file
from .maintenance import PROBE, SCAN_PIECE, ProgressCallback, all_zero

BATCH_BYTES = 128 << 20         # data read into buffers per write_extents transaction
KERNEL_BATCH_BYTES = 1 << 30    # data copied by the kernel per transaction
DEFAULT_BLOCK_SIZE = 32 * C.MiB
_ZEROS = bytes(4 << 20)


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert` wrote: the new file, its type and geometry, its identity, the
    blocks and bytes of data it holds, and the SHA-256 of the virtual disk when asked for."""

    out: str
    size: int
    disk_type: str
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    disk_id: str
    blocks_written: int
    data_bytes: int
    sha256: str | None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return asdict(self)


class RawSource:
    """A raw image opened read-only: its size (rounded up to a sector), reads, data extents."""

    def __init__(self, path: str, logical_sector_size: int) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise VhdxError(f"cannot open the raw image: {e.strerror}", path=path) from e
        self.file_size = os.lseek(self.fd, 0, os.SEEK_END)
        self.storage: FileStorage | None = None   # set for a regular file: blocks are copied by the kernel
        if stat.S_ISREG(os.fstat(self.fd).st_mode):
            self.storage = FileStorage(path, writable=False)
        self.size = align_up(self.file_size, logical_sector_size)
        if self.size == 0:
            os.close(self.fd)
            raise UsageError("the raw image is empty", path=path)

    def close(self) -> None:
        """Close the file."""
        if self.storage is not None:
            self.storage.close()
        os.close(self.fd)

    def pread_into(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` from ``offset``; zeros past the end of the file."""
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n <= 0:
                view[done:] = bytes(len(view) - done)
                break
            done += n
        return len(view)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the file's data (``SEEK_DATA``/``SEEK_HOLE``; all of it without)."""
        if not hasattr(os, "SEEK_DATA"):
            return [(0, self.size)]
        out = []
        pos = 0
        while pos < self.file_size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:
                break                       # ENXIO: no data after pos
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
        return out


def blocks_to_read(extents: list[tuple[int, int]], block_size: int) -> Iterator[int]:
    """The blocks (in order, each once) that the data ``extents`` touch."""
    last = -1
    for start, length in extents:
        first = max(start // block_size, last + 1)
        for block in range(first, -(-(start + length) // block_size)):
            yield block
            last = block


class _Hasher:
    """SHA-256 of the virtual disk in order; gaps are hashed as zeros."""

    def __init__(self, enabled: bool) -> None:
        self.hash = hashlib.sha256() if enabled else None
        self.position = 0

    def zeros_to(self, offset: int) -> None:
        """Hash zeros up to ``offset``."""
        if self.hash is None:
            return
        while self.position < offset:
            n = min(len(_ZEROS), offset - self.position)
            self.hash.update(_ZEROS[:n])
            self.position += n

    def data(self, view: memoryview, offset: int) -> None:
        """Hash ``view``, the bytes at ``offset`` (zeros before it first)."""
        if self.hash is None:
            return
        self.zeros_to(offset)
        self.hash.update(view)
        self.position += len(view)


class _Copy:
    """The copy loop: read each block the source may hold data in, keep the non-zero ones,
    write them in transactions of about ``BATCH_BYTES``."""

    def __init__(self, source: Any, image: Image, progress: ProgressCallback | None, sha256: bool) -> None:
        self.source, self.image, self.progress = source, image, progress
        self.hasher = _Hasher(sha256)
        bs = image.block_size
        # np.empty: pages are touched only when read into (a bytearray would zero them all).
        # Two sets: one is read into while the other is being written by the writer thread.
        count = max(1, BATCH_BYTES // bs)
        self.sets = [[np.empty(bs, np.uint8) for _ in range(count)] for _ in range(2)]
        self.buffers = self.sets[0]
        self.scratch = memoryview(np.empty(SCAN_PIECE, np.uint8))
        self.queued = self.used = 0
        self.pending: list[tuple[int, int, Any]] = []
        self.blocks = self.data = 0
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.inflight: Future[None] | None = None

    def run(self) -> None:
        """Copy every block, then hash the zeros up to the end."""
        bs, size = self.image.block_size, self.image.size
        kernel = getattr(self.source, "storage", None) if self.hasher.hash is None else None
        for block in blocks_to_read(self.source.data_extents(), bs):
            start = block * bs
            view = memoryview(self.buffers[self.used])[:min(bs, size - start)]
            if kernel is not None and start + len(view) <= self.source.file_size:
                if not self.zeros_in_file(len(view), start):  # data: the kernel copies it
                    self.pending.append((start, len(view), (kernel, start)))
                    self.queued += len(view)
            else:
                self.source.pread_into(view, start)
                self.hasher.data(view, start)
                if not all_zero(view):
                    self.pending.append((start, len(view), view))
                    self.used += 1
            if self.used == len(self.buffers) or self.queued >= KERNEL_BATCH_BYTES:
                self.flush()
            if self.progress is not None:
                self.progress(start + len(view), size)
        self.flush()
        self.wait()
        self.hasher.zeros_to(size)
        if self.progress is not None:
            self.progress(size, size)

    def zeros_in_file(self, length: int, start: int) -> bool:
        """Whether the source's ``length`` bytes at ``start`` are zeros, read in small pieces and
        only until the first non-zero one."""
        done, piece = 0, PROBE
        while done < length:
            part = self.scratch[:min(piece, length - done)]
            self.source.pread_into(part, start + done)
            if not all_zero(part):
                return False
            done += len(part)
            piece = SCAN_PIECE
        return True

    def flush(self) -> None:
        """Hand the pending blocks to the writer thread as one transaction (after the last one
        finished), and read on into the other set of buffers meanwhile."""
        if not self.pending:
            return
        self.wait()
        self.inflight = self.writer.submit(self.image.write_extents, list(self.pending))
        self.blocks += len(self.pending)
        self.data += sum(p[1] for p in self.pending)
        self.pending = []
        self.queued = self.used = 0
        self.buffers = self.sets[1] if self.buffers is self.sets[0] else self.sets[0]

    def wait(self) -> None:
        """Wait for the transaction in flight (its error comes out here)."""
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            inflight.result()

    def close(self) -> None:
        """Wait for the writer thread and stop it (errors of an abandoned transaction are dropped)."""
        try:
            if self.inflight is not None:
                self.inflight.exception()
        finally:
            self.writer.shutdown(wait=True)


def _geometry(source: Any, disk: Disk | None, block_size: int | None, logical_sector_size: int | None,
              physical_sector_size: int | None, new_id: bool) -> dict[str, Any]:
    """The create_image keywords of the output: the source's unless given."""
    base = disk
    while base is not None and base.parent is not None:
        base = base.parent
    if disk is not None and logical_sector_size not in (None, disk.logical_sector_size):
        raise UsageError("a VHDX source keeps its logical sector size", path=disk.path)
    return dict(
        block_size=block_size or (base.block_size if base is not None else DEFAULT_BLOCK_SIZE),
        logical_sector_size=disk.logical_sector_size if disk is not None else (logical_sector_size or 512),
        physical_sector_size=physical_sector_size or (disk.physical_sector_size if disk is not None else 4096),
        page83_data=uuid.uuid4() if new_id or disk is None else disk.disk_id)


def _write(source: Any, out: str, kwargs: dict[str, Any], fixed: bool, overwrite: bool,
           progress: ProgressCallback | None, sha256: bool) -> ConvertResult:
    """Build the output under a temporary name and publish it."""
    if not overwrite and os.path.lexists(out):
        raise DiskExistsError("output exists; pass overwrite=True (--overwrite) to replace it", path=out)
    with atomic_output(out, overwrite=overwrite) as output:
        storage = FileStorage(output.path, writable=True, durable=False)
        image = create_image(output.path, source.size, fixed=fixed, storage=storage, **kwargs)
        copy = _Copy(source, image, progress, sha256)
        try:
            copy.run()
        except BaseException:
            copy.close()
            image.abort()
            raise
        copy.close()
        image.close()
    digest = copy.hasher.hash.hexdigest() if copy.hasher.hash is not None else None
    return ConvertResult(out, source.size, "fixed" if fixed else "dynamic", kwargs["block_size"],
                         kwargs["logical_sector_size"], kwargs["physical_sector_size"], str(kwargs["page83_data"]),
                         copy.blocks, copy.data, digest)


def _check_type(disk_type: str) -> bool:
    if disk_type not in ("dynamic", "fixed"):
        raise UsageError(f"disk_type {disk_type!r}: 'dynamic' or 'fixed'")
    return disk_type == "fixed"


def convert(source: str | os.PathLike[str] | Disk, out: str | os.PathLike[str], *, disk_type: str = "dynamic",
            block_size: int | None = None, source_format: str = "vhdx", logical_sector_size: int | None = None,
            physical_sector_size: int | None = None, new_id: bool = False, sha256: bool = False,
            overwrite: bool = False, progress: ProgressCallback | None = None, layer: int | None = None,
            search_paths: PathArgs = (), parents: PathArgs | None = None, ignore_id_mismatch: bool = False,
            missing_parent: MissingParent = "error", share: bool = False) -> ConvertResult:
    """Write ``source`` (a VHDX and its chain, or a raw image with ``source_format="raw"``) as a
    new standalone VHDX ``out``, like ``Convert-VHD``.

    ``disk_type`` is "dynamic" (zero blocks stay unallocated) or "fixed". ``block_size``
    defaults to the source's base disk's (32 MiB for a raw image). The logical and physical
    sector sizes and the disk identity are kept (a raw image: ``logical_sector_size``, 512 by
    default, and a new identity); ``new_id`` gives the result a new one. The source is read
    only; ``out`` appears only when complete and replaces a file only with ``overwrite``.
    ``sha256`` returns the virtual disk's SHA-256. ``progress(done, total)`` follows the bytes.
    ``layer`` and the chain keywords are those of :func:`vhdx.export`.
    Returns a :class:`ConvertResult`.
    """
    fixed = _check_type(disk_type)
    out, progress = as_path(out, "out"), as_callback(progress)
    if source_format == "raw":
        if isinstance(source, Disk):
            raise UsageError("source_format='raw' takes a path")
        raw = RawSource(os.fspath(source), logical_sector_size or 512)
        try:
            if os.path.exists(out) and os.path.samefile(out, raw.path):
                raise UsageError("the output is the source", path=out)
            kwargs = _geometry(raw, None, block_size, logical_sector_size, physical_sector_size, True)
            return _write(raw, out, kwargs, fixed, overwrite, progress, sha256)
        finally:
            raw.close()
    if source_format != "vhdx":
        raise UsageError(f"source_format {source_format!r}: 'vhdx' or 'raw'")
    options = given_options(search_paths, parents, ignore_id_mismatch, missing_parent, share)
    with open_layer(source, layer, **options) as (disk, target):
        refuse_chain_file(out, disk)
        kwargs = _geometry(target, target, block_size, logical_sector_size, physical_sector_size, new_id)
        return _write(target, out, kwargs, fixed, overwrite, progress, sha256)
