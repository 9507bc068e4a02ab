"""Export and hash: the virtual disk as a raw image, or the SHA-256 of one.

``export`` writes the disk, or the disk as it is at one layer of its chain, to a raw file.
A regular file is written sparse: only the ranges that some layer allocates are read, and
only pieces that are not all zeros are written. A single file with a clean log is copied
by the kernel (``os.copy_file_range``) block run by block run. Anything else is streamed:
one thread reads the next piece while a second writes the last one, from its own buffer.
A device, a pipe or a file descriptor takes every byte, in order. A new regular file
appears under its name only when complete (:func:`~vhdx.file.outputs.atomic_output`), and
no output is ever written over a file of the chain being read.

``hash`` reads the disk the same way and returns the SHA-256 of its bytes; holes are hashed
as zeros without being read. Nothing here prints: progress goes to a callback.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..chains.disk import Disk
from ..chains.paths import PathArgs
from ..chains.resolve import MissingParent
from ..chains.resolve import open as open_disk
from ..errors import DiskExistsError, UsageError, VhdxError, as_callback
from ..file.buffers import aligned_buffer
from ..file.outputs import atomic_output

CHUNK = 2 << 20          # bytes read and written at a time
KERNEL_COPY = "kernel copy"
STREAM = "stream"

ProgressCallback = Callable[[int, int], None]
Sink = Callable[[memoryview, int], None]
Source = str | os.PathLike | Disk          # a path, or an open Disk
Destination = str | os.PathLike | int      # a path, or an open file descriptor


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote.

    ``size`` is the virtual size, the length of the output. ``bytes_written`` counts the
    bytes written into the output: only data for a sparse file, every byte for a device, a
    pipe or a file descriptor. ``data_bytes`` counts the bytes written as data, holes left
    out. ``sha256`` is the hex digest of the output when it was asked for, else None;
    ``method`` is ``"kernel copy"`` or ``"stream"``.
    """

    out: str | int
    size: int
    bytes_written: int
    data_bytes: int
    sha256: str | None
    method: str


# --------------------------------------------------------------------------- layers

def layer_number(layer: int | None, path: str | os.PathLike[str]) -> int:
    """``layer`` as a number of steps down the chain (None is 0); a negative one is refused."""
    if layer is None:
        return 0
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UsageError(f"layer {layer!r}: a layer is a whole number", path=path)
    if layer < 0:
        raise UsageError(f"layer {layer}: layers count from 0 (the file itself)", path=path)
    return layer


def select_layer(disk: Disk, layer: int | None) -> Disk:
    """The disk as it is at ``layer`` of its chain: 0 (or None) is ``disk``, 1 its parent, ..."""
    steps = layer_number(layer, disk.path)
    target = disk
    for _ in range(steps):
        if target.parent is None:
            raise UsageError(f"the chain has no layer {steps}", path=disk.path)
        target = target.parent
    return target


@contextmanager
def open_layer(source: Source, layer: int | None = None, **chain_options: Any) -> Iterator[tuple[Disk, Disk]]:
    """Yield (the disk, the disk at ``layer``) for a path or an open :class:`Disk`.

    A path is opened read-only with ``chain_options`` (those of :func:`vhdx.open`) and
    closed afterwards; a Disk is used as it is and left open.
    """
    if isinstance(source, Disk):
        if chain_options:
            raise UsageError("chain options apply to a path; this Disk is open already", path=source.path)
        yield source, select_layer(source, layer)
        return
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"not a path or a Disk: {type(source).__name__}")
    layer_number(layer, source)
    with open_disk(source, **chain_options) as disk:
        yield disk, select_layer(disk, layer)


def given_options(search_paths: PathArgs, parents: PathArgs | None, ignore_id_mismatch: bool,
                  missing_parent: MissingParent, share: bool) -> dict[str, Any]:
    """The keywords of :func:`vhdx.open` that differ from their defaults (for :func:`open_layer`)."""
    given = dict(search_paths=search_paths, parents=parents, ignore_id_mismatch=ignore_id_mismatch,
                 missing_parent=missing_parent, share=share)
    defaults = dict(search_paths=(), parents=None, ignore_id_mismatch=False, missing_parent="error", share=False)
    return {k: v for k, v in given.items() if v != defaults[k]}


def chain_files(disk: Disk) -> list[str]:
    """The paths of ``disk`` and of every parent below it, leaf first."""
    out = []
    layer: Disk | None = disk
    while layer is not None:
        out.append(layer.path)
        layer = layer.parent
    return out


def output_name(out: Destination) -> str:
    """How errors name an output: its path, or ``file descriptor N``."""
    return f"file descriptor {out}" if isinstance(out, int) else os.fspath(out)


def refuse_chain_file(out: Destination, disk: Disk) -> None:
    """Raise :class:`UsageError` if ``out`` is a file of ``disk``'s chain.

    ``out`` is a path (links are followed; a hard link is the same file) or a file
    descriptor. Writing there would destroy the data being read.
    """
    try:
        st = os.fstat(out) if isinstance(out, int) else os.stat(out)
    except OSError:
        return
    for path in chain_files(disk):
        try:
            pst = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (pst.st_dev, pst.st_ino):
            raise UsageError(f"refusing to write over {path}, a file of the chain being read",
                             path=output_name(out))


# --------------------------------------------------------------------------- the stream

class _Walk:
    """One pass over the virtual disk in order: feeds the hash and reports progress."""

    def __init__(self, size: int, progress: ProgressCallback | None, hasher: Any) -> None:
        self.size = size
        self.progress = progress
        self.hasher = hasher
        self.position = 0
        self.zeros: memoryview | None = None

    def advance(self, piece: memoryview) -> None:
        """``piece`` was read at the current position."""
        if self.hasher is not None:
            self.hasher.update(piece)
        self.position += len(piece)
        self.report()

    def skip_to(self, end: int) -> None:
        """Zeros up to ``end``: hashed without reading, in pieces so progress moves."""
        if self.hasher is None:
            if end > self.position:
                self.position = end
                self.report()
            return
        if self.zeros is None:
            self.zeros = memoryview(bytes(CHUNK))
        while self.position < end:
            n = min(CHUNK, end - self.position)
            self.hasher.update(self.zeros[:n])
            self.position += n
            self.report()

    def report(self) -> None:
        """Tell the progress callback, if any, where the pass is."""
        if self.progress is not None:
            self.progress(self.position, self.size)


class _Overlap:
    """Hands pieces to a sink on one worker thread while the next piece is read.

    Three buffers are handed out in turn; a buffer is reused only after the sink is done
    with it. The single worker runs the sink calls in the order they were handed over.
    """

    def __init__(self, pool: ThreadPoolExecutor, sink: Sink | None) -> None:
        self.pool = pool
        self.sink = sink
        # Page-aligned (memory maps): the kernel copies into them at full speed (vhdx.file.buffers).
        self.buffers = [aligned_buffer(CHUNK) for _ in range(3)]
        self.pending: list[Future | None] = [None] * len(self.buffers)
        self.slot = -1

    def buffer(self) -> memoryview:
        """The next free buffer (waits for the sink call that still uses it, if any)."""
        self.slot = (self.slot + 1) % len(self.buffers)
        waiting = self.pending[self.slot]
        if waiting is not None:
            self.pending[self.slot] = None
            waiting.result()
        return self.buffers[self.slot]

    def hand(self, piece: memoryview, offset: int) -> None:
        """Give ``piece`` (a slice of the last buffer) to the sink."""
        self.pending[self.slot] = self.pool.submit(self.sink, piece, offset)

    def drain(self) -> None:
        """Wait for every sink call; the first failure is raised."""
        for i, waiting in enumerate(self.pending):
            if waiting is not None:
                self.pending[i] = None
                waiting.result()


def stream(disk: Disk, sink: Sink | None = None, *, dense: bool = False, progress: ProgressCallback | None = None,
           hasher: Any = None) -> tuple[int, int, int]:
    """Read ``disk`` in order, in pieces of 2 MiB, and hand them to ``sink(view, offset)``.

    Without ``dense`` only the ranges some layer allocates are read and only pieces that are
    not all zeros reach the sink, so the output stays sparse; holes are hashed as zeros
    without being read. With ``dense`` every piece reaches the sink, in order (pipes,
    devices). The sink runs on a second thread, so reading the next piece overlaps writing
    the last (the system calls release the GIL). Returns (bytes covered, bytes handed to
    the sink, bytes of those that are not zeros).
    """
    walk = _Walk(disk.size, progress, hasher)
    extents = [(0, disk.size)] if dense else disk.data_extents()
    handed = data = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        overlap = _Overlap(pool, sink)
        for start, length in extents:
            walk.skip_to(start)
            while walk.position < start + length:
                offset = walk.position
                view = overlap.buffer()
                n = disk.pread_into(view[:min(CHUNK, start + length - offset)], offset)
                if n <= 0:
                    raise VhdxError(f"the disk ends before its size ({disk.size} bytes)", path=disk.path)
                piece = view[:n]
                walk.advance(piece)
                if sink is None:
                    continue
                nonzero = bool(np.frombuffer(piece, np.uint8).any())
                data += n if nonzero else 0
                if nonzero or dense:
                    overlap.hand(piece, offset)
                    handed += n
        overlap.drain()
    walk.skip_to(disk.size)
    return walk.position, handed, data


# --------------------------------------------------------------------------- the kernel copy

def kernel_copy_possible(disk: Disk) -> bool:
    """A single file, read straight from the host file (no parent, no in-memory log overlay)."""
    return (disk.parent is None and not disk.image.has_parent and disk.image.storage.fileno() is not None
            and hasattr(os, "copy_file_range"))


def data_runs(disk: Disk) -> list[tuple[int, int, int]]:
    """(virtual offset, length, file offset) of each run of data blocks of one file.

    A run goes on while the next block holds data and sits right after this one in the
    host file, so each run is one copy. Blocks that read as zeros are in no run.
    """
    im = disk.image
    bs = im.block_size
    blocks, offsets, _states = im.allocated()  # the blocks that hold data, in order
    if not blocks.size:
        return []
    follows = np.zeros(blocks.size, bool)
    follows[1:] = (blocks[1:] == blocks[:-1] + 1) & (offsets[1:] == offsets[:-1] + bs)
    continued = np.append(follows[1:], False)
    starts = np.flatnonzero(~follows)
    stops = np.flatnonzero(~continued)
    return [(int(blocks[a]) * bs, min((int(blocks[b]) + 1) * bs, im.size) - int(blocks[a]) * bs, int(offsets[a]))
            for a, b in zip(starts.tolist(), stops.tolist())]


def kernel_copy(disk: Disk, out_fd: int, progress: ProgressCallback | None = None) -> int:
    """Copy the data runs of one file into ``out_fd`` at their virtual offsets; holes stay holes.

    Returns the bytes copied. A short last block (the file ends inside it) copies what the
    file holds; the rest reads as zeros and stays a hole.
    """
    src_fd = disk.image.storage.fileno()
    size = disk.size
    written = 0
    for voff, length, src in data_runs(disk):
        done = 0
        while done < length:
            n = os.copy_file_range(src_fd, out_fd, length - done, src + done, voff + done)
            if n <= 0:
                break
            done += n
        written += length
        if progress is not None:
            progress(voff + length, size)
    if progress is not None:
        progress(size, size)
    return written


# --------------------------------------------------------------------------- export and hash

def write_all_to(fd: int) -> Sink:
    """A sink that writes every piece to ``fd`` in the order it comes (offsets ignored)."""
    def sink(view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    return sink


def _export_dense(target: Disk, fd: int, progress: ProgressCallback | None, hasher: Any) -> tuple[int, int, str]:
    """Every byte to ``fd``, in order: (bytes written, bytes of data, method)."""
    _, handed, data = stream(target, write_all_to(fd), dense=True, progress=progress, hasher=hasher)
    return handed, data, STREAM


def _export_file(target: Disk, out: str, overwrite: bool, progress: ProgressCallback | None,
                 hasher: Any) -> tuple[int, int, str]:
    """A regular file, built under a temporary name: sparse, published only when complete."""
    if not overwrite and os.path.lexists(out):
        raise DiskExistsError("output exists; pass overwrite=True to replace it", path=out)
    with atomic_output(out, overwrite=overwrite) as output:
        if hasher is None and kernel_copy_possible(target):
            written = kernel_copy(target, output.fd, progress)
            method = KERNEL_COPY
        else:
            written = stream(target, output.write_at, progress=progress, hasher=hasher)[1]
            method = STREAM
        os.ftruncate(output.fd, target.size)
    return written, written, method


def _export_path(target: Disk, out: str, overwrite: bool, progress: ProgressCallback | None,
                 hasher: Any) -> tuple[int, int, str]:
    """A device or a pipe takes every byte in order; anything else becomes a new regular file."""
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    if st is None or stat.S_ISREG(st.st_mode):
        return _export_file(target, out, overwrite, progress, hasher)
    fd = os.open(out, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        return _export_dense(target, fd, progress, hasher)
    finally:
        os.close(fd)


def export(source: Source, out: Destination, *, layer: int | None = None, sha256: bool = False,
           overwrite: bool = False, progress: ProgressCallback | None = None, search_paths: PathArgs = (),
           parents: PathArgs | None = None, ignore_id_mismatch: bool = False, missing_parent: MissingParent = "error",
           share: bool = False) -> ExportResult:
    """Write the virtual disk ``source`` (a path, or an open :class:`Disk`) as a raw image.

    ``out`` is a path or an open file descriptor. A new or regular file is written sparse
    and appears only when complete; an existing one is replaced only with ``overwrite``. A
    device or a pipe, and a descriptor (which stays open), take every byte in order. An
    output that is a file of the chain is refused with :class:`UsageError`. ``layer`` N
    exports the disk as it is at layer N of its chain (0 the file itself, 1 its parent).
    ``sha256`` hashes the data as it streams. ``progress(done, total)`` is called as bytes
    go by. ``search_paths``, ``parents``, ``ignore_id_mismatch``, ``missing_parent`` and ``share``
    are those of :func:`vhdx.open` (for a path). Returns an :class:`ExportResult`.
    """
    if isinstance(out, bool) or not isinstance(out, (str, os.PathLike, int)):
        raise UsageError(f"not a path or a file descriptor: {type(out).__name__}")
    progress = as_callback(progress)
    hasher = hashlib.sha256() if sha256 else None
    options = given_options(search_paths, parents, ignore_id_mismatch, missing_parent, share)
    with open_layer(source, layer, **options) as (disk, target):
        refuse_chain_file(out, disk)
        try:
            if isinstance(out, int):
                written, data, method = _export_dense(target, out, progress, hasher)
            else:
                written, data, method = _export_path(target, os.fspath(out), overwrite, progress, hasher)
        except VhdxError:
            raise
        except OSError as e:
            if isinstance(e, BrokenPipeError) and isinstance(out, int):
                raise                       # the reader went away: the caller's own pipe
            raise VhdxError(f"cannot write the export: {e.strerror or e}", path=output_name(out)) from e
        size = target.size
    return ExportResult(out=out if isinstance(out, int) else os.fspath(out), size=size, bytes_written=written,
                        data_bytes=data, sha256=hasher.hexdigest() if hasher else None, method=method)


def hash(source: Source, *, layer: int | None = None, progress: ProgressCallback | None = None,
         search_paths: PathArgs = (), parents: PathArgs | None = None, ignore_id_mismatch: bool = False,
         missing_parent: MissingParent = "error", share: bool = False) -> str:
    """The SHA-256 of the virtual disk ``source`` (a path, or an open :class:`Disk`), in hex.

    It equals ``sha256sum`` of the disk's export. Holes are hashed as zeros without being
    read. ``layer``, ``progress`` and the keywords of :func:`vhdx.open` are as for :func:`export`.
    """
    hasher = hashlib.sha256()
    progress = as_callback(progress)
    options = given_options(search_paths, parents, ignore_id_mismatch, missing_parent, share)
    with open_layer(source, layer, **options) as (_, target):
        stream(target, progress=progress, hasher=hasher)
    return hasher.hexdigest()
