"""The copy engine: moving byte ranges from one file into another as fast as the host allows.

``copy_file_range`` where both sides are plain files (the default, measured faster here),
else one reused buffer (``preadv``/``pwrite``). Three environment knobs, read once at import:

* ``VHDX_COPY_METHOD``: ``copy_file_range`` (default where the OS has it) or ``preadv``;
* ``VHDX_COPY_BUFFER``: the buffer's size in bytes (1 MiB);
* ``VHDX_WRITEBACK_EARLY``: ``1`` (default) starts writing copied pages out at once, so the
  flush that must come before the BAT update finds little left to do.

Measured with benchmarks/bench_merge.py on ext4 here (2 GiB child, cold cache): copy_file_range
1.59 s, a reused 1 MiB buffer 1.70 s, an 8 MiB buffer 2.4-3.7 s (cache misses), cp 1.19 s.
"""

from __future__ import annotations

import os
from typing import Callable

from .log import storage_error
from .storage import Storage

COPY_BUFFER_SIZE = int(os.environ.get("VHDX_COPY_BUFFER", 1 << 20))
WRITEBACK_EARLY = os.environ.get("VHDX_WRITEBACK_EARLY", "1") == "1" and hasattr(os, "posix_fadvise")
COPY_METHOD = os.environ.get("VHDX_COPY_METHOD", "copy_file_range" if hasattr(os, "copy_file_range") else "preadv")

Progress = Callable[[int], None]


def write_at(storage: Storage, data: bytes | memoryview, offset: int) -> None:
    """``storage.write`` with an OSError turned into a VhdxError naming the file and offset."""
    try:
        storage.write(data, offset)
    except OSError as e:
        raise storage_error(e, "write", path=storage.path, offset=offset) from e


class Copier:
    """Copies ranges of other files into ``dest``, reusing one buffer when it must read."""

    def __init__(self, dest: Storage) -> None:
        self.dest = dest
        self.buffer: bytearray | None = None

    def copy(self, source: Storage, src: int, dst: int, length: int, progress: Progress | None = None) -> None:
        """Copy ``length`` bytes from ``src`` in ``source`` to ``dst`` in ``dest``.

        ``VHDX_COPY_METHOD=preadv`` forces the buffer; benchmarks/bench_merge.py measures both.
        """
        src_fd, dst_fd = source.fileno(), self.dest.fileno()
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
                n = os.copy_file_range(src_fd, dst_fd, min(length - done, 1 << 30), src + done, dst + done)
            except OSError as e:
                raise storage_error(e, f"copy from {source.path}", path=self.dest.path, offset=dst + done) from e
            if n <= 0:
                break
            done += n
            if progress is not None:
                progress(n)
        if WRITEBACK_EARLY and done:
            # Start writing these pages out now (asynchronously), so the flush that must
            # come before the BAT update finds little left to do.
            os.posix_fadvise(dst_fd, dst, done, os.POSIX_FADV_DONTNEED)
        return done

    def _copy_buffered(self, source: Storage, src: int, dst: int, length: int, progress: Progress | None) -> None:
        """Read into the reused buffer, write it out, until ``length`` bytes are copied."""
        if self.buffer is None:
            self.buffer = bytearray(COPY_BUFFER_SIZE)
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
            if progress is not None:
                progress(n)
