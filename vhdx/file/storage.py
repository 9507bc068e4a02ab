"""The host file: positional reads and writes, size, truncate, flush, close.

This is the only module that calls ``os.pread``/``os.pwrite``. Every layer above it
talks to a :class:`Storage`, so tests can swap in a wrapper that fails at the N-th
write or flush, and a read-only open can put the in-memory log overlay in between.
"""

from __future__ import annotations

import os
import stat

from ..errors import ReadOnlyError, VhdxError

_READ_CHUNK = 1 << 30  # preadv is limited to 2 GiB per call on Linux


class Storage:
    """Interface of a host file. Offsets are bytes in the host file."""

    path: str = "<storage>"
    writable: bool = False

    def readinto(self, buf: memoryview, offset: int) -> int:  # pragma: no cover - interface
        """Fill ``buf`` from ``offset``; bytes past the end of file read as zeros. Returns len(buf)."""
        raise NotImplementedError

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def write(self, data: bytes | memoryview, offset: int) -> None:
        raise ReadOnlyError("opened read-only", path=self.path, offset=offset)

    def size(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def truncate(self, size: int) -> None:
        raise ReadOnlyError("opened read-only", path=self.path, offset=size)

    def flush(self) -> None:
        """Make every earlier write durable."""

    def close(self) -> None:
        """Release the file; idempotent."""

    def fileno(self) -> int | None:
        return None


class FileStorage(Storage):
    """A host file opened with ``os.open``: ``O_RDONLY`` unless ``writable``."""

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, *,
                 create: bool = False, durable: bool = True) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self.durable = durable
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        flags |= getattr(os, "O_CLOEXEC", 0)
        try:
            self._fd: int | None = os.open(self.path, flags, 0o644)
        except FileExistsError as e:
            from ..errors import DiskExistsError
            raise DiskExistsError("file exists; refusing to overwrite it", path=self.path) from e
        except OSError as e:
            raise VhdxError(f"cannot open: {e.strerror}", path=self.path) from e
        mode = os.fstat(self._fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self._fd)
            self._fd = None
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise VhdxError(f"cannot open: {kind}", path=self.path)

    def _fd_or_raise(self) -> int:
        if self._fd is None:
            raise VhdxError("file is closed", path=self.path)
        return self._fd

    def fileno(self) -> int | None:
        return self._fd

    def readinto(self, buf: memoryview, offset: int) -> int:
        fd = self._fd_or_raise()
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

    def write(self, data: bytes | memoryview, offset: int) -> None:
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
        fd = self._fd_or_raise()
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size

    def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path, offset=size)
        try:
            os.ftruncate(self._fd_or_raise(), size)
        except OSError as e:
            raise VhdxError(f"cannot resize the file to {size} bytes: {e.strerror}",
                            path=self.path) from e

    def flush(self) -> None:
        if self.writable and self.durable and self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise VhdxError(f"flush failed: {e.strerror}", path=self.path) from e

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class MemoryStorage(Storage):
    """A host file held in a ``bytearray``: for tests and for building images in memory."""

    def __init__(self, data: bytes = b"", *, path: str = "<memory>", writable: bool = True) -> None:
        self.data = bytearray(data)
        self.path = path
        self.writable = writable

    def readinto(self, buf: memoryview, offset: int) -> int:
        view = memoryview(buf).cast("B")
        n = len(view)
        avail = max(0, min(n, len(self.data) - offset))
        view[:avail] = self.data[offset:offset + avail]
        if avail < n:
            view[avail:] = bytes(n - avail)
        return n

    def write(self, data: bytes | memoryview, offset: int) -> None:
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path, offset=offset)
        data = bytes(data)
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def size(self) -> int:
        return len(self.data)

    def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError("opened read-only", path=self.path, offset=size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))


class OverlayStorage(Storage):
    """Read-only view of a storage with replayed log pages laid over it (vhdx-format.md §8.6).

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

    def size(self) -> int:
        return self._logical_size

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        self.base.close()
