"""Punching holes into ranges of a file that already read as zeros, on a second thread.

``compact`` frees the space of the zero blocks beyond the file's future end while it is still
looking for more of them. Freeing is slow where it is synchronous: on a file system mounted
with ``discard`` the kernel trims the freed extents before ``ftruncate`` or
``fallocate(PUNCH_HOLE)`` returns (measured here: 0.19 s per GiB, nearly all of it waiting on
the device, not the CPU). Done on a second thread while the first one reads, the wait overlaps
the reading (buffered reads take no inode lock; a write or a copy into the same file would, so
the holes must all be punched before any write: :meth:`Puncher.close`).

Crash safety needs no ordering: a hole reads zeros, so punching a range that reads zeros
changes no byte anyone can read, at any moment, whatever the BAT says. The caller must only
hand in ranges whose bytes it has read as zeros, of a file it holds exclusively. Punching is
a fast path like ``copy_file_range`` in :mod:`vhdx.file.copy`: only on a plain descriptor
(``Storage.fileno()``; a wrapped storage gives None and nothing is punched), and a punch the
host refuses (no ``fallocate``, ``EOPNOTSUPP``, an I/O error) only leaves the zeros in place
for the final cut to free.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from typing import Any

from .storage import Storage

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _fallocate() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _fallocate()


def can_punch() -> bool:
    """Whether this host offers ``fallocate`` (Linux): else nothing is punched."""
    return _FALLOCATE is not None


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate ``length`` bytes at ``offset`` of ``fd`` (the file keeps its size); OSError if refused."""
    if _FALLOCATE is None:
        raise OSError(0, "fallocate is not available")
    if _FALLOCATE(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Puncher:
    """Punches holes on a second thread into ranges that read zeros; use it as a context manager
    (leaving it waits for every punch, so that nothing is punched while the file is written)."""

    def __init__(self, storage: Storage) -> None:
        self.fd = storage.fileno() if storage.writable and _FALLOCATE is not None else None
        self.queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.refused: OSError | None = None
        self.punched = 0

    def punch(self, offset: int, length: int) -> None:
        """Queue a hole over ``length`` bytes at ``offset``, which the caller has read as zeros."""
        if self.fd is None or length <= 0:
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="vhdx-punch", daemon=True)
            self.thread.start()
        self.queue.put((offset, length))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.refused is None and self.fd is not None:
                try:
                    punch_hole(self.fd, *item)
                    self.punched += item[1]
                except OSError as e:       # the zeros stay where they are: the cut frees them later
                    self.refused = e

    def close(self) -> None:
        """Wait until every queued hole is punched (or refused)."""
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None

    def __enter__(self) -> "Puncher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
