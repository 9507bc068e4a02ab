"""Memory maps of part of a host file: private copy-on-write maps (a large BAT is read through
one, page by page as lookups touch it) and transient shared maps to copy bytes from (reads into
a buffer the kernel would copy into slowly; :mod:`vhdx.file.buffers`).

Only :mod:`vhdx.file.storage` calls these, for a descriptor it has checked: a regular file,
locked, the range inside it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
from typing import Any


class Mapping:
    """A private (copy-on-write) memory map of part of a file: pages are read from the file
    when first touched, writes change only this process's copy. ``numpy.asarray`` sees it as
    a writable uint8 array (``__array_interface__``); it is unmapped when the last array over
    it is gone. No descriptor is kept (unlike :mod:`mmap`, which keeps a dup of it)."""

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self.__array_interface__ = {"shape": (length,), "typestr": "|u1", "data": (address, False),
                                    "version": 3}

    def __del__(self) -> None:
        if self.address and _LIBC is not None:
            _LIBC.munmap(ctypes.c_void_p(self.address), ctypes.c_size_t(self.length))
            self.address = 0


def _libc() -> Any:
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int64]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_private(fd: int, offset: int, length: int) -> Mapping | None:
    """A private, copy-on-write mapping of ``length`` bytes of ``fd`` from ``offset``, or None
    when it cannot be made (no libc mmap, an unaligned offset, an error)."""
    if _LIBC is None or length <= 0 or offset % mmap.ALLOCATIONGRANULARITY:
        return None
    address = _LIBC.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, offset)
    if address in (None, _MAP_FAILED):
        return None
    # Entries are looked up here and there: fault in one page, not a read-around window.
    _LIBC.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), getattr(mmap, "MADV_RANDOM", 1))
    return Mapping(address, length)


def copy_through_map(fd: int, file_offset: int, address: int, length: int) -> bool:
    """Copy ``length`` file bytes from ``file_offset`` to memory at ``address`` through a
    transient shared read-only map of the file; False (nothing copied) when that cannot be done.

    The map's pages are faulted in by ``MADV_POPULATE_READ`` before the copy: a page the kernel
    cannot read makes that call fail (and us return False, so the caller reads and reports the
    error), where touching it would raise SIGBUS. Kernels before 5.14 refuse the advice, and
    this returns False from then on. The caller keeps the range inside the file.
    """
    global _POPULATE_OK
    if _LIBC is None or not _POPULATE_OK or length <= 0:
        return False
    shift = file_offset % mmap.ALLOCATIONGRANULARITY
    span = shift + length
    base = _LIBC.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, file_offset - shift)
    if base in (None, _MAP_FAILED):
        return False
    try:
        if _LIBC.madvise(ctypes.c_void_p(base), ctypes.c_size_t(span), _MADV_POPULATE_READ) != 0:
            if ctypes.get_errno() == errno.EINVAL:
                _POPULATE_OK = False  # an older kernel: the advice is unknown
            return False
        ctypes.memmove(address, base + shift, length)
        return True
    finally:
        _LIBC.munmap(ctypes.c_void_p(base), ctypes.c_size_t(span))


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; older kernels: EINVAL
_POPULATE_OK = True
