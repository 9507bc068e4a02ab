"""The host file: positional reads and writes, size, truncate, flush, close.

This is the only module that calls ``os.pread``/``os.pwrite``. Every layer above it
talks to a :class:`Storage`, so tests can swap in a wrapper that fails at the N-th
write or flush, and a read-only open can put the in-memory log overlay in between.
A :class:`FileStorage` takes QEMU-compatible image locks on open (:mod:`vhdx.file.locks`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from ..errors import DiskExistsError, DiskNotFoundError, ReadOnlyError, UsageError, VhdxError
from .locks import LOCK_MODES, FileLock, acquire_lock, release_lock
from .maps import Mapping, copy_through_map, map_private

_READ_CHUNK = 1 << 30  # preadv is limited to 2 GiB per call on Linux
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular_reason(mode: int, *, allow_block: bool = False) -> str | None:
    """Why a file of this ``st_mode`` must not be opened as a disk, or None if it may be.

    Opening a FIFO for reading blocks until a writer appears, and opening a device can have
    side effects, so only regular files qualify (and block devices, when ``allow_block``).
    """
    if stat.S_ISREG(mode) or (allow_block and stat.S_ISBLK(mode)):
        return None
    kind = next((name for test, name in _KINDS if test(mode)), "an unknown kind of file")
    return f"not a regular file ({kind})"

class Storage:
    """Interface of a host file. Offsets are bytes in the host file."""

    path: str = "<storage>"
    writable: bool = False

    def readinto(self, buf: memoryview, offset: int) -> int:  # pragma: no cover - interface
        """Fill ``buf`` from ``offset``; bytes past the end of file read as zeros. Returns len(buf)."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``; bytes past the end of file read as zeros."""
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` (a read-only storage raises ReadOnlyError)."""
        raise ReadOnlyError("opened read-only", path=self.path, offset=offset)

    def size(self) -> int:  # pragma: no cover - interface
        """The size of the host file in bytes."""
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        """Set the host file's size to ``size`` bytes (new bytes read as zeros)."""
        raise ReadOnlyError("opened read-only", path=self.path, offset=size)

    def flush(self) -> None:
        """Make every earlier write durable."""

    def close(self) -> None:
        """Release the file; idempotent."""

    def fileno(self) -> int | None:
        """The OS file descriptor, or None when there is no plain file underneath."""
        return None

    def map_readonly(self, offset: int, length: int) -> Mapping | None:
        """A private copy-on-write map of ``length`` bytes from ``offset`` (writes to it never
        reach the file), or None when this storage cannot map (then read instead)."""
        return None

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """``(start, end)`` ranges inside ``[offset, offset + length)`` that may hold non-zero
        bytes; everything else reads as zeros (file holes). Without a way to tell: all of it."""
        return [(offset, offset + length)] if length > 0 else []

    def copy_mapped(self, address: int, length: int, offset: int) -> bool:
        """Copy ``length`` bytes from ``offset`` to memory at ``address`` through a map of the
        file (see :func:`copy_through_map`); False, nothing copied, when this storage cannot
        (then read instead)."""
        return False


class FileStorage(Storage):
    """A host file opened with ``os.open``: ``O_RDONLY`` unless ``writable``.

    Only a regular file is opened, or a block device unless ``regular_only`` (a path the user
    names may be a device; a file found while scanning or resolving never is). The kind is
    checked before opening, so a FIFO is never opened, and again on the descriptor, which is
    opened with ``O_NONBLOCK`` in case the path was swapped for a FIFO in between.

    ``lock`` is "shared" (readers), "exclusive" (writers), None (no lock and no check: for
    reading a disk that a running VM holds, whose content may be changing), or "auto"
    (exclusive when ``writable``, else shared). The lock changes no byte of the file and is
    released on close. A conflicting lock held by another process raises
    :class:`LockedError`; a file system without lock support opens unlocked.
    """

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, *,
                 create: bool = False, durable: bool = True, regular_only: bool = False,
                 lock: str | None = "auto") -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.durable = durable
        self._fd: int | None = None
        if lock == "auto":
            lock = "exclusive" if writable else "shared"
        if lock is not None and lock not in LOCK_MODES:
            raise UsageError(f"lock={lock!r}: 'shared', 'exclusive' or None", path=self.path)
        self.lock_mode = lock
        self._lock: FileLock | None = None
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        else:
            try:
                mode: int | None = os.stat(self.path).st_mode
            except OSError:
                mode = None  # os.open below reports it
            if mode is not None:
                self._refuse_special(mode, regular_only)
        flags |= getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except FileExistsError as e:
            raise DiskExistsError("file exists; refusing to overwrite it", path=self.path) from e
        except FileNotFoundError as e:
            raise DiskNotFoundError(f"cannot open: {e.strerror}", path=self.path) from e
        except OSError as e:
            raise VhdxError(f"cannot open: {e.strerror}", path=self.path) from e
        try:
            st = os.fstat(fd)
            self._refuse_special(st.st_mode, regular_only)
            # F_SETFL sets the status flags whole: ours are the ones we opened with, but O_NONBLOCK
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            if lock is not None:
                self._lock = acquire_lock(fd, self.path, lock, (st.st_dev, st.st_ino))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _refuse_special(self, mode: int, regular_only: bool) -> None:
        """Raise unless a file of this ``st_mode`` may be opened."""
        reason = not_regular_reason(mode, allow_block=not regular_only)
        if reason is not None:
            raise VhdxError(f"cannot open: {reason}", path=self.path)

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise VhdxError("file is closed", path=self.path)
        return self._fd

    def fileno(self) -> int | None:
        """The descriptor (None once closed)."""
        return self._fd

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset`` with ``os.preadv``; zeros past the end of file."""
        fd = self._fd_or_raise()
        if offset < 0:  # os.preadv would read -1 as "at the current position"
            raise UsageError(f"read at negative offset {offset}", path=self.path)
        view = memoryview(buf).cast("B")
        total = len(view)
        done = 0
        while done < total:
            chunk = view[done:done + _READ_CHUNK]
            try:
                got = os.preadv(fd, [chunk], offset + done)
            except OSError as e:
                raise VhdxError(f"read failed: {e.strerror}", path=self.path, offset=offset + done) from e
            if got == 0:
                view[done:] = bytes(total - done) if total - done < (1 << 20) else b"\0" * (total - done)
                break
            done += got
        return total

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset``, zeros past the end: one ``os.pread`` when the file
        has them all (much cheaper than filling a zeroed buffer and copying it, for the 1 MiB
        metadata region that every open reads)."""
        if 0 < length <= _READ_CHUNK:
            try:
                data = os.pread(self._fd_or_raise(), length, offset)
            except OSError as e:
                raise VhdxError(f"read failed: {e.strerror}", path=self.path, offset=offset) from e
            if len(data) == length:
                return data
        return super().read(offset, length)

    def map_readonly(self, offset: int, length: int) -> Mapping | None:
        """A private map of a regular file's bytes (None for a block device, an unlocked open,
        whose file another process may cut short under the map, or a range past the end).

        The map holds our open file description until it is unmapped, and our locks belong to
        it (OFD locks): so the last release of a lock unlocks its bytes itself, in one call
        (:meth:`~vhdx.file.locks.FileLock.release`), instead of counting on the description's end."""
        fd = self._mappable(offset, length)
        return None if fd is None else map_private(fd, offset, length)

    def copy_mapped(self, address: int, length: int, offset: int) -> bool:
        """Copy through a transient map (:func:`copy_through_map`) when the range lies inside a
        locked regular file, as for :meth:`map_readonly`: a process that honours the lock cannot
        cut the file short under the map."""
        fd = self._mappable(offset, length)
        return fd is not None and copy_through_map(fd, offset, address, length)

    def _mappable(self, offset: int, length: int) -> int | None:
        """The descriptor, when ``[offset, offset + length)`` of this file may be mapped: a
        locked regular file holding the whole range; else None."""
        fd = self._fd
        if fd is None or self.lock_mode is None or offset < 0:
            return None
        st = os.fstat(fd)
        return fd if stat.S_ISREG(st.st_mode) and offset + length <= st.st_size else None

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The data ranges of ``[offset, offset + length)`` by ``SEEK_DATA``/``SEEK_HOLE``."""
        fd = self._fd
        end = offset + length
        if fd is None or length <= 0 or not hasattr(os, "SEEK_DATA"):
            return super().data_ranges(offset, length)
        out: list[tuple[int, int]] = []
        pos = offset
        try:
            while pos < end:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break  # only a hole up to the end of the file
                    raise
                if start >= end:
                    break
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
                out.append((start, stop))
                pos = stop
        except OSError:
            return super().data_ranges(offset, length)
        return out

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """``os.pwrite`` all of ``data`` at ``offset``."""
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path, offset=offset)
        fd = self._fd_or_raise()
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(fd, view[done:done + _READ_CHUNK], offset + done)
            except OSError as e:
                raise VhdxError(f"write failed: {e.strerror}", path=self.path, offset=offset + done) from e

    def size(self) -> int:
        """The file's size (a block device's, by seeking to its end)."""
        fd = self._fd_or_raise()
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size

    def truncate(self, size: int) -> None:
        """``os.ftruncate`` to ``size`` bytes."""
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path, offset=size)
        try:
            os.ftruncate(self._fd_or_raise(), size)
        except OSError as e:
            raise VhdxError(f"cannot resize the file to {size} bytes: {e.strerror}",
                            path=self.path) from e

    def flush(self) -> None:
        """``os.fdatasync`` (unless opened with ``durable=False``)."""
        if self.writable and self.durable and self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise VhdxError(f"flush failed: {e.strerror}", path=self.path) from e

    def close(self) -> None:
        """Release the lock and close the descriptor; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            lock, self._lock = self._lock, None
            try:
                if lock is not None:
                    release_lock(lock, self.lock_mode or "shared")
            finally:
                os.close(fd)


class OverlayStorage(Storage):
    """Read-only view of a storage with replayed log pages laid over it (docs/format.md §8.6).

    ``patches`` are ``(file_offset, data)`` pairs, ``data`` being bytes or an int
    length of zeros, applied in order. ``logical_size`` is the size the file would have
    after replay; bytes between the physical end and it read as zeros.
    """

    def __init__(self, base: Storage, patches: list[tuple[int, bytes | int]], logical_size: int) -> None:
        self.base = base
        self.path = base.path
        self.writable = False
        self.patches = patches
        self._logical_size = max(logical_size, base.size())
        ends = [off + (p if isinstance(p, int) else len(p)) for off, p in patches]
        self._lo = min((off for off, _ in patches), default=0)
        self._hi = max(ends, default=0)

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read the base storage, then lay the replayed patches over the bytes read."""
        view = memoryview(buf).cast("B")
        self.base.readinto(view, offset)
        end = offset + len(view)
        if end <= self._lo or offset >= self._hi:
            return len(view)
        for p_off, p in self.patches:
            p_len = p if isinstance(p, int) else len(p)
            lo, hi = max(offset, p_off), min(end, p_off + p_len)
            if lo >= hi:
                continue
            if isinstance(p, int):
                view[lo - offset:hi - offset] = bytes(hi - lo)
            else:
                view[lo - offset:hi - offset] = p[lo - p_off:hi - p_off]
        return len(view)

    def map_readonly(self, offset: int, length: int) -> Mapping | None:
        """The base's private map with the replayed pages written into it (this copy only)."""
        mapping = self.base.map_readonly(offset, length)
        if mapping is None:
            return None
        for p_off, p in self.patches:
            p_len = p if isinstance(p, int) else len(p)
            lo, hi = max(offset, p_off), min(offset + length, p_off + p_len)
            if lo >= hi:
                continue
            if isinstance(p, int):
                ctypes.memset(mapping.address + lo - offset, 0, hi - lo)
            else:
                ctypes.memmove(mapping.address + lo - offset, bytes(p[lo - p_off:hi - p_off]), hi - lo)
        return mapping

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The base's data ranges and every replayed patch inside the range, merged."""
        end = offset + length
        ranges = list(self.base.data_ranges(offset, min(length, max(0, self.base.size() - offset))))
        for p_off, p in self.patches:
            p_len = p if isinstance(p, int) else len(p)
            lo, hi = max(offset, p_off), min(end, p_off + p_len)
            if lo < hi:
                ranges.append((lo, hi))
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def size(self) -> int:
        """The size the file would have after the replay."""
        return self._logical_size

    def fileno(self) -> int | None:
        """None: reads must go through the overlay."""
        return None

    def close(self) -> None:
        """Close the base storage."""
        self.base.close()
