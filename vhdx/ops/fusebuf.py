"""Read replies in memory the file system allocates and libfuse frees (FUSE's ``read_buf``).

With libfuse's ``read`` operation the file system fills a buffer of libfuse's own, which comes
from ``malloc`` (16 bytes past a page boundary, where this machine's kernel copies at about
half speed), and the Python binding adds one more copy of every reply into it. With
``read_buf`` the file system returns a ``struct fuse_bufvec`` of its own instead: here one
page-aligned memory buffer that the chain is read into directly. libfuse writes it to
``/dev/fuse`` and frees it (``fuse_free_buf``: ``free`` of each memory buffer, then of the
vector), so both are allocated with the C library's allocator, never by Python.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

from ..file.buffers import PAGE

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # mallopt(3) parameters (glibc's malloc.h)
KEEP_BYTES = 16 << 20     # the server's heap keeps this much free memory before trimming
VECTOR_BYTES = 256        # a vector's allocation: its declared 64 bytes, and zeros for any field a
                          # later libfuse appends to struct fuse_buf (a reader of it finds zero there)


class FuseBuf(ctypes.Structure):
    """``struct fuse_buf`` (libfuse 2.9 and 3): one memory or file-descriptor buffer."""
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class FuseBufVec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline ``buf[1]`` (the bindings' own declaration
    makes ``buf`` a pointer, which is not libfuse's layout)."""
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", FuseBuf * 1)]


def keep_freed_memory() -> None:
    """Let this process's C heap keep reply-sized memory it frees (process-wide, for the server).

    By default glibc gives a freed block at the top of the heap back to the kernel (and a 1 MiB
    aligned allocation may be a mapping of its own), so every reply's pages were faulted in anew:
    2 GiB through the mount took 1.7 s instead of 0.6 s. Other C libraries are left as they are."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt(M_MMAP_THRESHOLD, KEEP_BYTES // 4)
        mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)


class ReplyMemory:
    """Allocates read replies with the C library, for libfuse to send and free."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None)
        self.posix_memalign = libc.posix_memalign
        self.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
        self.posix_memalign.restype = ctypes.c_int
        self.calloc = libc.calloc
        self.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
        self.calloc.restype = ctypes.c_void_p
        self.free = libc.free
        self.free.argtypes = [ctypes.c_void_p]
        self.free.restype = None

    def reply(self, bufpp: Any, size: int, fill: Callable[[memoryview], None]) -> None:
        """Set ``*bufpp`` to a vector of one page-aligned buffer of ``size`` bytes that ``fill``
        has written; nothing is left allocated when ``fill`` raises."""
        mem = ctypes.c_void_p()
        if size and self.posix_memalign(ctypes.byref(mem), PAGE, size) != 0:
            raise MemoryError(f"no memory for a read reply of {size} bytes")
        try:
            if size:
                fill(memoryview((ctypes.c_char * size).from_address(mem.value)).cast("B"))
            vector = self.calloc(1, VECTOR_BYTES)
            if not vector:
                raise MemoryError("no memory for a read reply")
        except BaseException:
            self.free(mem)
            raise
        vec = FuseBufVec.from_address(vector)
        vec.count = 1
        vec.buf[0].size, vec.buf[0].mem, vec.buf[0].fd = size, mem, -1
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vector
