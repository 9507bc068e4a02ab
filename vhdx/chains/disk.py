"""Disk: the virtual disk as a file-like object (``io.RawIOBase``).

A Disk is an :class:`~vhdx.file.image.Image` plus an optional parent Disk it is *given*; it
never searches for one (that is :mod:`vhdx.chains.resolve`'s job). It owns the parents listed in
``owned`` and closes them with itself.
"""

from __future__ import annotations

import io
import operator
import os
import uuid
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import ReadOnlyError, UsageError
from ..file.buffers import scratch
from ..file.image import Image, zero_fill
from ..format.geometry import as_offset
from .locate import layers_of, locate, read_here

_MAX_CHUNK = 64 << 20

# The short path (:meth:`Disk._read_short`): a read of at most SHORT_MAX bytes that
# :func:`~vhdx.chains.locate.locate` finds in one place is one BAT lookup per layer and one system call.
SHORT_MAX = 1 << 20
_ZEROS = memoryview(bytes(SHORT_MAX))


class Disk(io.RawIOBase):
    """A VHDX virtual disk: read, readinto, write, seek, tell, flush, close."""

    def __init__(self, image: Image, parent: "Disk | None" = None, *, owned: Iterable[Any] = (),
                 parent_zeros: bool = False) -> None:
        super().__init__()
        self.image = image
        self.parent = parent
        self._owned = list(owned)
        self._parent_zeros = parent_zeros
        self._position = 0
        self.chain_info: list[dict[str, Any]] = []
        self._short: list[tuple[Any, ...]] | None = None  # the short path's view of the chain, once built
        if image.has_parent and parent is None and not parent_zeros:
            raise UsageError("a differencing disk needs its parent (or parent_zeros=True)", path=image.path)

    # ------------------------------------------------------------ attributes

    @property
    def path(self) -> str:
        """The file this disk reads and writes (the leaf of its chain)."""
        return self.image.path

    @property
    def size(self) -> int:
        """The virtual size in bytes."""
        return self.image.size

    @property
    def block_size(self) -> int:
        """The leaf file's block size in bytes."""
        return self.image.block_size

    @property
    def logical_sector_size(self) -> int:
        """The logical sector size in bytes (512 or 4096)."""
        return self.image.logical_sector_size

    @property
    def physical_sector_size(self) -> int:
        """The physical sector size in bytes (512 or 4096)."""
        return self.image.physical_sector_size

    @property
    def disk_id(self) -> uuid.UUID:
        """The disk's identity (Page83Data), shared by every file of a chain."""
        return self.image.metadata.page83_data

    @property
    def data_write_guid(self) -> uuid.UUID:
        """The leaf's DataWriteGuid: what a child's parent_linkage names."""
        return self.image.header.data_write_guid

    @property
    def disk_type(self) -> str:
        """"fixed", "dynamic" or "differencing"."""
        return self.image.disk_type

    def info(self) -> dict[str, Any]:
        """Every header, region and metadata field, BAT counts and log state, as a plain dict."""
        d = self.image.info()
        if self.chain_info:
            d["chain"] = self.chain_info
        return d

    # ------------------------------------------------------------ io.RawIOBase

    def readable(self) -> bool:
        """Always True: every disk can be read."""
        return True

    def writable(self) -> bool:
        """True when opened with mode "r+"."""
        return self.image.writable

    def seekable(self) -> bool:
        """Always True."""
        return True

    def tell(self) -> int:
        """The current position."""
        self._check_open()
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        """Move the position (``whence`` as for files); returns the new position."""
        self._check_open()
        try:
            offset = operator.index(offset)
        except TypeError:
            raise UsageError(f"seek offset must be an integer, not {type(offset).__name__}", path=self.path) from None
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._position + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise UsageError(f"invalid whence {whence!r}: io.SEEK_SET, SEEK_CUR or SEEK_END", path=self.path)
        if pos < 0:
            raise UsageError(f"negative seek position {pos}", path=self.path)
        self._position = pos
        return pos

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed disk")

    def readinto(self, buffer: Any) -> int:
        """Read at the position into ``buffer``; returns the bytes read (0 at the end)."""
        if self.closed:
            raise ValueError("I/O operation on closed disk")
        view = memoryview(buffer) if type(buffer) is bytearray else self._bytes_of(buffer, into=True)
        pos = self._position
        if 0 < len(view) <= SHORT_MAX and self._read_short(view, pos):
            n = len(view)
        else:
            n = self._pread_general(view, pos)
        self._position = pos + n
        return n

    def pread_into(self, view: memoryview, offset: int) -> int:
        """Positional read: fill ``view`` from virtual ``offset``, clipped at the disk size."""
        view = self._bytes_of(view, into=True)
        if type(offset) is int and offset >= 0 and 0 < len(view) <= SHORT_MAX and self._read_short(view, offset):
            return len(view)
        return self._pread_general(view, offset)

    def _bytes_of(self, buffer: Any, *, into: bool) -> memoryview:
        """``buffer`` as a flat view of bytes; a UsageError naming the file when it is not a
        contiguous buffer or, to read ``into``, a read-only one."""
        try:
            view = memoryview(buffer).cast("B")
        except TypeError as e:
            raise UsageError(f"a contiguous bytes-like buffer is required ({e})", path=self.path) from None
        if into and view.readonly:
            raise UsageError(f"cannot read into a read-only buffer ({type(buffer).__name__})", path=self.path)
        return view

    def _pread_general(self, view: memoryview, offset: int) -> int:
        offset = as_offset(offset, "offset", self.path)
        n = max(0, min(len(view), self.size - offset))
        if n:
            self._read_virtual(view[:n], offset)
        return n

    def _read_short(self, view: memoryview, offset: int) -> bool:
        """The read of a few KiB, as fast as Python allows: True when ``view`` was filled from
        ``offset``; False (nothing promised about ``view``) sends it down the general path.

        Taken where :func:`~vhdx.chains.locate.locate` finds the range in one place. Anything
        else, a short read or an error, or a large read the kernel would copy into ``view``
        slowly, is left to the general path, which handles (and reports) it.
        """
        where = locate(self._layers(), offset, len(view))
        if where is None:
            return False
        fd, file_offset = where
        if fd is None:
            view[:] = _ZEROS[:len(view)]
            return True
        return read_here(fd, view, file_offset)

    def _layers(self) -> list[Any]:
        """What the lookups of :mod:`~vhdx.chains.locate` need of this chain, taken once."""
        if self._short is None:
            self._short = layers_of(self)
        return self._short

    def pread(self, offset: int, length: int) -> bytes:
        """Positional read of up to ``length`` bytes from virtual ``offset`` (fewer at the end)."""
        offset = as_offset(offset, "offset", self.path)
        length = as_offset(length, "length", self.path)
        return self._read_bytes(offset, max(0, min(length, self.size - offset)))

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes at the position (to the end of the disk when ``size`` is
        negative or None); ``b""`` at the end."""
        self._check_open()
        pos = self._position
        left = max(0, self.size - pos)
        everything = size is None or (isinstance(size, int) and size < 0)
        n = left if everything else min(as_offset(size, "size", self.path), left)
        data = self._read_bytes(pos, n)
        self._position = pos + len(data)
        return data

    def readall(self) -> bytes:
        """Read to the end of the disk (one read, not ``io``'s 8 KiB at a time)."""
        return self.read(-1)

    def _read_bytes(self, offset: int, n: int) -> bytes:
        """``n`` virtual bytes from ``offset`` (inside the disk) as a new ``bytes``.

        Bytes in one place are one ``os.pread`` (the kernel fills the new object: no second
        copy) or a zero-filled ``bytes(n)``; others are read into a page-aligned scratch buffer
        and copied out once (not into a new ``bytearray``, whose fresh pages fault as it fills)."""
        if n <= 0:
            return b""
        where = locate(self._layers(), offset, n)
        if where is not None:
            fd, file_offset = where
            if fd is None:
                return bytes(n)
            try:
                data = os.pread(fd, n, file_offset)
            except OSError:
                data = b""  # the general path reads again and reports it with the offset
            if len(data) == n:
                return data
        with scratch(n) as view:
            self._read_virtual(view, offset)
            return bytes(view)

    def _read_virtual(self, view: memoryview, offset: int) -> None:
        done = 0
        total = len(view)
        while done < total:
            n = min(_MAX_CHUNK, total - done)
            self._read_through_chain(view[done:done + n], offset + done)
            done += n

    def _read_through_chain(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` layer by layer, without recursion (a chain may be a thousand deep).

        What a layer does not define is handed down as holes (slices of ``view``) to its
        parent, which reads zeros past its own size (§6); below the base, holes read zeros
        (``parent_zeros``) or were already zero-filled by the image.
        """
        holes: list[tuple[memoryview, int]] = [(view, offset)]
        disk: Disk | None = self
        while holes and disk is not None:
            below: list[tuple[memoryview, int]] = []
            parent = disk.parent
            fall: Callable[[memoryview, int], None] | None = None
            if parent is not None:
                fall = lambda hole, at: below.append((hole, at))  # noqa: E731
            elif disk._parent_zeros:
                fall = lambda hole, at: zero_fill(hole)  # noqa: E731
            for hole, at in holes:
                disk.image.readinto_at(hole, at, fall)
            holes = []
            if parent is not None:
                for hole, at in below:
                    n = max(0, min(len(hole), parent.size - at))
                    if n < len(hole):
                        zero_fill(hole[n:])
                    if n:
                        holes.append((hole[:n], at))
            disk = parent

    def write(self, data: Any) -> int:
        """Write ``data`` at the position; returns the bytes written."""
        self._check_open()
        n = self.pwrite(data, self._position)
        self._position += n
        return n

    def pwrite(self, data: Any, offset: int) -> int:
        """Positional write; writes past the end of the disk are refused."""
        if not self.image.writable:
            raise ReadOnlyError("opened read-only", path=self.path)
        view = self._bytes_of(data, into=False)
        offset = as_offset(offset, "offset", self.path)
        if offset + len(view) > self.size:
            raise UsageError(f"write of {len(view)} bytes at {offset} runs past the end of the "
                             f"{self.size}-byte disk", path=self.path)
        if not view:
            return 0
        ss = self.logical_sector_size
        start = offset - offset % ss
        end = -(-(offset + len(view)) // ss) * ss
        if start == offset and end == offset + len(view):
            self.image.write_at(view, offset)
            return len(view)
        # Read the edge sectors through the chain, then write whole sectors.
        buf = bytearray(end - start)
        mv = memoryview(buf)
        self._read_virtual(mv[:ss], start)
        if end - ss > start:
            self._read_virtual(mv[len(buf) - ss:], end - ss)
        buf[offset - start:offset - start + len(view)] = view
        self.image.write_at(mv, start)
        return len(view)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) ranges that may hold non-zero data, through the whole chain.

        Everything outside them reads as zeros. Block granularity, computed from the BAT
        states of every layer (their blocks that hold data); used to skip holes when exporting or hashing.
        """
        starts_all, stops_all = [], []
        layer: Disk | None = self
        while layer is not None:
            im = layer.image
            blocks = im.allocated()[0]  # the blocks that hold data: proportional to the data
            if blocks.size:
                cut = np.flatnonzero(blocks[1:] != blocks[:-1] + 1) + 1
                firsts, lasts = blocks[np.concatenate([[0], cut])], blocks[np.concatenate([cut - 1, [-1]])]
                starts_all.append(firsts * im.block_size)
                stops_all.append(np.minimum((lasts + 1) * im.block_size, im.size))
            layer = layer.parent
        if not starts_all:
            return []
        starts = np.concatenate(starts_all)
        stops = np.minimum(np.concatenate(stops_all), self.size)
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        out: list[tuple[int, int]] = []
        for a, b in zip(starts.tolist(), stops.tolist()):
            if b <= a:
                continue
            if out and a <= out[-1][0] + out[-1][1]:
                s0, n0 = out[-1]
                out[-1] = (s0, max(n0, b - s0))
            else:
                out.append((a, b - a))
        return out

    def flush(self) -> None:
        """Make what was written durable (the log is flushed and applied)."""
        if not self.closed:
            self.image.flush()

    def close(self) -> None:
        """Close the file and every parent this disk owns."""
        if self.closed:
            return
        try:
            self.image.close()
        finally:
            try:
                for owned in reversed(self._owned):
                    owned.close()
            finally:
                super().close()

    def __enter__(self) -> "Disk":
        return self

    def __repr__(self) -> str:
        return f"<vhdx.Disk {self.path!r} {self.disk_type} {self.size} bytes>"

    def __del__(self) -> None:
        # Like a file object: an unclosed disk is closed when collected. Errors are
        # swallowed here; a failed close leaves the log dirty, and the next open replays it.
        try:
            self.close()
        except Exception:
            pass
