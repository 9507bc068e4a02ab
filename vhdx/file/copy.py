"""The copy engine: moving byte ranges from one file into another as fast as the host allows.

A batch of copies (:meth:`Copier.copy_all`) is sorted by source file and source offset, so each
source file is read front to back (measured 1.23 x faster than virtual-disk order, cold cache),
and copies that continue each other in both files are joined into one. Each copy then goes:

1. **cloned** with ``FICLONERANGE`` where the file system shares extents (XFS with reflink,
   btrfs) and both files are plain descriptors: the part of the copy whose source and destination
   offsets are multiples of the file system's block size (VHDX payload blocks are 1 MiB aligned,
   so whole blocks clone); the unaligned head and tail are copied. A clone that the file system
   refuses (``EXDEV``, ``EOPNOTSUPP``, ``EINVAL``, ``ENOTTY``, ``ENOSYS``) falls back to copying,
   silently; after a refusal other than ``EINVAL`` that source is not tried again;
2. else ``copy_file_range`` (the default, where the OS has it);
3. else one reused, page-aligned (mmap-backed) buffer: ``preadv`` into it, ``pwrite`` out. A
   ``bytearray``'s data sits 16 bytes past a page boundary, which halves the kernel's copy speed
   on some CPUs.

:attr:`Copier.cloned` and :attr:`Copier.copied` count the bytes of each kind. Knobs, read once
at import:

* ``VHDX_COPY_METHOD``: ``copy_file_range`` (default where the OS has it) or ``preadv``;
* ``VHDX_COPY_BUFFER``: the buffer's size in bytes (1 MiB);
* ``VHDX_CLONE``: ``1`` (default) tries ``FICLONERANGE`` first; ``0`` never clones;
* ``VHDX_WRITEBACK_EARLY``: ``1`` (default) starts writing copied pages out at once, so the
  flush that must come before the BAT update finds little left to do, and lets the source's
  pages just read leave the page cache (they are read once).

Measured with benchmarks/bench_merge.py on ext4 here (2 GiB child, cold cache): copy_file_range
1.59 s, a reused 1 MiB buffer 1.70 s, an 8 MiB buffer 2.4-3.7 s (cache misses), cp 1.19 s.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from typing import Any, Callable, Sequence

from .log import storage_error
from .storage import Storage

COPY_BUFFER_SIZE = int(os.environ.get("VHDX_COPY_BUFFER", 1 << 20))
WRITEBACK_EARLY = os.environ.get("VHDX_WRITEBACK_EARLY", "1") == "1" and hasattr(os, "posix_fadvise")
COPY_METHOD = os.environ.get("VHDX_COPY_METHOD", "copy_file_range" if hasattr(os, "copy_file_range") else "preadv")
CLONE = os.environ.get("VHDX_CLONE", "1") == "1"

FICLONERANGE = 0x4020940D  # _IOW(0x94, 13, struct file_clone_range), linux/fs.h
_CLONE_RANGE = struct.Struct("qQQQ")  # src_fd (s64), src_offset, src_length, dest_offset (u64)
_NO_CLONE = {errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EBADF, errno.EPERM}
_CHUNK = 1 << 30  # per system call, and between progress reports
PREFETCH_BYTES = 128 << 20  # of the next batch's sources, hinted to the kernel before this batch commits

Progress = Callable[[int], None]
Copy = Sequence[Any]  # (source storage, source offset, destination offset, length)


def write_at(storage: Storage, data: bytes | memoryview, offset: int) -> None:
    """``storage.write`` with an OSError turned into a VhdxError naming the file and offset."""
    try:
        storage.write(data, offset)
    except OSError as e:
        raise storage_error(e, "write", path=storage.path, offset=offset) from e


def aligned_buffer(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer of ``size`` bytes (anonymous memory, never a file)."""
    return mmap.mmap(-1, max(size, 1))


def file_order(copies: Sequence[Copy]) -> list[list[Any]]:
    """``copies`` grouped by source file (in order of first appearance), each source front to back,
    with copies that continue each other in both files joined into one."""
    first: dict[int, int] = {}
    for c in copies:
        first.setdefault(id(c[0]), len(first))
    out: list[list[Any]] = []
    for storage, src, dst, n in sorted(copies, key=lambda c: (first[id(c[0])], c[1], c[2])):
        last = out[-1] if out else None
        if last and last[0] is storage and last[1] + last[3] == src and last[2] + last[3] == dst:
            last[3] += n
        else:
            out.append([storage, src, dst, n])
    return out


def clone_block_size(fd: int) -> int:
    """The file system's block size for clones of ``fd`` (4 KiB when it cannot tell)."""
    try:
        size = os.fstatvfs(fd).f_bsize
    except OSError:
        return 4096
    return size if 512 <= size <= (1 << 20) and size & (size - 1) == 0 else 4096


class Copier:
    """Copies ranges of other files into ``dest``: clones, kernel copies, or one reused buffer."""

    def __init__(self, dest: Storage) -> None:
        self.dest = dest
        self.buffer: mmap.mmap | None = None
        self.cloned = 0  # bytes that now share the source's extents (no data moved)
        self.copied = 0  # bytes moved
        self._no_clone: set[int] = set()  # sources (by id) whose clones the file system refused
        self._cloning: set[int] = set()  # sources (by id) whose clones it accepted
        self._block: int | None = None
        self._sequential: set[int] = set()  # source descriptors told they are read front to back
        # The copies of the next batch, set by the caller: after a batch is copied, the kernel is
        # asked to start reading their first PREFETCH_BYTES, while the batch's data is flushed and
        # its metadata committed (a hint only: nothing is written, nothing waits for it).
        self.upcoming: Sequence[Copy] = ()

    def copy_all(self, copies: Sequence[Copy], progress: Progress | None = None) -> None:
        """Copy a batch of ``(source, src, dst, length)`` in source-file order, joining neighbours;
        then hint the kernel to read ahead :attr:`upcoming`."""
        for storage, src, dst, n in file_order(copies):
            self.copy(storage, src, dst, n, progress)
        self.prefetch(self.upcoming)

    def prefetch(self, copies: Sequence[Copy]) -> None:
        """Ask the kernel to start reading the first PREFETCH_BYTES of ``copies`` (in file order)."""
        left = PREFETCH_BYTES
        for storage, src, _dst, n in file_order(copies):
            fd = storage.fileno()
            if left <= 0 or not hasattr(os, "posix_fadvise"):
                break
            if fd is not None and id(storage) not in self._cloning:  # clones read nothing
                os.posix_fadvise(fd, src, min(n, left), os.POSIX_FADV_WILLNEED)
            left -= n

    def copy(self, source: Storage, src: int, dst: int, length: int, progress: Progress | None = None) -> None:
        """Copy ``length`` bytes from ``src`` in ``source`` to ``dst`` in ``dest`` (cloning what aligns).

        ``VHDX_COPY_METHOD=preadv`` forces the buffer; benchmarks/bench_merge.py measures both.
        """
        src_fd, dst_fd = source.fileno(), self.dest.fileno()
        if src_fd is not None and src_fd not in self._sequential and hasattr(os, "posix_fadvise"):
            self._sequential.add(src_fd)
            os.posix_fadvise(src_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a bigger read-ahead window
        if src_fd is not None and dst_fd is not None and CLONE and id(source) not in self._no_clone:
            if self._block is None:
                self._block = clone_block_size(dst_fd)
            bs = self._block
            head = (-src) % bs
            body = (length - head) // bs * bs if (dst - src) % bs == 0 and length > head else 0
            if body and self._clone(source, src_fd, dst_fd, src + head, dst + head, body, progress):
                self._move(source, src_fd, dst_fd, src, dst, head, progress)
                tail = head + body
                self._move(source, src_fd, dst_fd, src + tail, dst + tail, length - tail, progress)
                return
        self._move(source, src_fd, dst_fd, src, dst, length, progress)

    def _clone(self, source: Storage, src_fd: int, dst_fd: int, src: int, dst: int, length: int,
               progress: Progress | None) -> bool:
        """Share ``length`` block-aligned bytes with ``FICLONERANGE``; False (nothing done) if refused."""
        done = 0
        while done < length:
            n = min(length - done, _CHUNK)
            try:
                fcntl.ioctl(dst_fd, FICLONERANGE, _CLONE_RANGE.pack(src_fd, src + done, n, dst + done))
            except OSError as e:
                if e.errno not in _NO_CLONE and e.errno != errno.EINVAL:
                    raise storage_error(e, f"clone from {source.path}", path=self.dest.path, offset=dst + done) from e
                if e.errno != errno.EINVAL:
                    self._no_clone.add(id(source))
                if done:  # what is cloned stays cloned; the rest is copied
                    self._move(source, src_fd, dst_fd, src + done, dst + done, length - done, progress)
                return bool(done)
            done += n
            self.cloned += n
            self._cloning.add(id(source))
            if progress is not None:
                progress(n)
        return True

    def _move(self, source: Storage, src_fd: int | None, dst_fd: int | None, src: int, dst: int, length: int,
              progress: Progress | None) -> None:
        """Copy the bytes: in the kernel where it can, else through the buffer."""
        if length <= 0:
            return
        if COPY_METHOD == "copy_file_range" and src_fd is not None and dst_fd is not None:
            done = self._copy_file_range(source, src_fd, dst_fd, src, dst, length, progress)
            if done == length:
                return
            src, dst, length = src + done, dst + done, length - done
        self._copy_buffered(source, src, dst, length, progress)

    def _copy_file_range(self, source: Storage, src_fd: int, dst_fd: int, src: int, dst: int, length: int,
                         progress: Progress | None) -> int:
        """Bytes copied in the kernel (fewer than ``length`` when it stops early)."""
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, _CHUNK), src + done, dst + done)
            except OSError as e:
                raise storage_error(e, f"copy from {source.path}", path=self.dest.path, offset=dst + done) from e
            if n <= 0:
                break
            done += n
            self.copied += n
            if progress is not None:
                progress(n)
        if WRITEBACK_EARLY and done:
            # Start writing these pages out now (asynchronously), so the flush that must come
            # before the BAT update finds little left to do; the source's pages are read once.
            os.posix_fadvise(dst_fd, dst, done, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(src_fd, src, done, os.POSIX_FADV_DONTNEED)
        return done

    def _copy_buffered(self, source: Storage, src: int, dst: int, length: int, progress: Progress | None) -> None:
        """Read into the reused page-aligned buffer, write it out, until ``length`` bytes are copied."""
        if self.buffer is None:
            self.buffer = aligned_buffer(COPY_BUFFER_SIZE)
        view = memoryview(self.buffer)
        done = 0
        while done < length:
            n = min(len(view), length - done)
            try:
                source.readinto(view[:n], src + done)
            except OSError as e:
                raise storage_error(e, "read", path=source.path, offset=src + done) from e
            write_at(self.dest, view[:n], dst + done)
            done += n
            self.copied += n
            if progress is not None:
                progress(n)
