"""Page-aligned buffers, and reads that avoid the kernel's slow copies into misaligned ones.

The kernel copies file data into a buffer at half speed or worse when the buffer's address
is a little *ahead* of the file offset modulo the page size (by 1 to 63 bytes: every store
then aliases a load that follows it, "4K aliasing"). A ``bytearray`` of a few MiB starts 16
bytes past a page boundary, so reading block-aligned data into it is the slow case (measured
on this project's machines: 4.8-5.8 GiB/s against 9-11 GiB/s; see benchmarks/README.md).

* :func:`aligned_buffer` gives a page-aligned buffer (an anonymous memory map) for the
  library's own streaming and copy buffers.
* :func:`readinto_file` copies large pieces for such a buffer from a transient map of the file
  (:meth:`Storage.copy_mapped`: no kernel copy at all, and the user-space copy does not suffer
  from the aliasing); where no map can be made (an unlocked open, an old kernel, a page that
  cannot be read), through a bounce buffer of our own placed so that the kernel's copy is
  aligned, and then a second copy. Other buffers are read directly.

The map is the fastest of the three on files whose page cache holds large folios (what large
writes leave on Linux 6.x): 1 GiB read in 0.036 s against 0.063 s directly and 0.043 s through
the bounce (benchmarks/README.md, "Misaligned buffers").
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from typing import Iterator

from .storage import Storage

PAGE = mmap.PAGESIZE
ALIAS_WINDOW = 64          # buffer ahead of the file offset by 1..63 bytes (mod a page): the slow copy
BOUNCE_MIN = 256 << 10     # below this a map or a bounce costs more than it saves
BOUNCE_SIZE = 2 << 20      # measured: 1-4 MiB bounce buffers are equally fast, smaller ones slower
SCRATCH_MAX = 4 << 20      # a thread's reused scratch buffer (reads returning bytes of up to this size)

_local = threading.local()  # one bounce buffer per thread (a Disk may be read from several threads)


def aligned_buffer(size: int) -> memoryview:
    """A writable, zero-filled, page-aligned buffer of ``size`` bytes (an anonymous memory map).

    The map is released when the last view of it is gone.
    """
    return memoryview(mmap.mmap(-1, max(size, 1)))[:size]


def address_of(view: memoryview) -> int | None:
    """The address of a writable buffer's first byte, or None (read-only, or not addressable)."""
    if not len(view):
        return None
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def slow_to_copy_into(view: memoryview, file_offset: int) -> bool:
    """Whether the kernel's copy of file bytes at ``file_offset`` into ``view`` is the slow,
    aliased kind (the buffer 1..63 bytes ahead of the file offset, modulo the page size)."""
    address = address_of(view)
    return address is not None and 0 < (address - file_offset) % PAGE < ALIAS_WINDOW


@contextlib.contextmanager
def scratch(size: int) -> Iterator[memoryview]:
    """A buffer of ``size`` bytes to read into and copy out of, for the length of a ``with``:
    this thread's reused page-aligned one up to ``SCRATCH_MAX`` (its pages already faulted in);
    above that, or nested in a thread, a new ``bytearray`` (which raises MemoryError when the
    memory is not there, where an anonymous map would be granted and fail later)."""
    if size > SCRATCH_MAX or getattr(_local, "scratch_busy", False):
        yield memoryview(bytearray(size))
        return
    buf = getattr(_local, "scratch", None)
    if buf is None:
        buf = _local.scratch = aligned_buffer(SCRATCH_MAX)
    _local.scratch_busy = True
    try:
        yield buf[:size]
    finally:
        _local.scratch_busy = False


def _bounce() -> memoryview:
    buf = getattr(_local, "bounce", None)
    if buf is None:
        buf = _local.bounce = aligned_buffer(BOUNCE_SIZE + PAGE)
    return buf


def readinto_file(storage: Storage, view: memoryview, file_offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``file_offset`` (zeros past the end of file,
    as :meth:`Storage.readinto`); from a map of the file, or through a bounce buffer, when
    the kernel would copy into ``view`` slowly."""
    n = len(view)
    if n < BOUNCE_MIN or storage.fileno() is None or not slow_to_copy_into(view, file_offset):
        storage.readinto(view, file_offset)
        return
    address = address_of(view)
    if address is not None and storage.copy_mapped(address, n, file_offset):
        return
    # The bounce buffer starts at the file offset's place in its page: the kernel's copy is aligned.
    bounce = _bounce()
    shift = file_offset % PAGE
    done = 0
    while done < n:
        k = min(BOUNCE_SIZE, n - done)
        piece = bounce[shift:shift + k]
        storage.readinto(piece, file_offset + done)
        view[done:done + k] = piece
        done += k
