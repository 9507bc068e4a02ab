"""The host file: positional reads and writes, size, truncate, flush, close, and locks.

This is the only module that calls ``os.pread``/``os.pwrite``. Every layer above it
talks to a :class:`Storage`, so tests can swap in a wrapper that fails at the N-th
write or flush, and a read-only open can put the in-memory log overlay in between.

Locks are QEMU's image locks (block/file-posix.c), so that QEMU and vhdx see each other.
They are open-file-description (OFD) locks, all of them shared (``F_RDLCK``) on single
bytes: a holder of permission bit *i* locks byte ``100 + i``, and a holder that does not
let anyone else have permission *i* locks byte ``200 + i``. An open first places its bytes
and then asks (``F_OFD_GETLK``) whether anyone else holds the bytes that conflict with it:
``200 + i`` for each permission it wants, ``100 + i`` for each one it refuses to share.
Two opens racing each other can both fail, never both succeed.

============  ============================  ==========================  ===================
 open          permissions (bytes 100+i)     not shared (bytes 200+i)    as QEMU's
============  ============================  ==========================  ===================
 "shared"      consistent read (100)         write, resize (201, 203)    read-only open
 "exclusive"   read, write, resize           write, resize (201, 203)    read-write open
               (100, 101, 103)
 None          nothing                       nothing                     ``-U`` (force-share)
============  ============================  ==========================  ===================

So readers share with readers, a writer excludes readers and writers, and QEMU's
``-U``/``--force-share`` reads (which want only "consistent read") are never refused.
Bit 4, GRAPH_MOD, which QEMU 6.1 and older may still lock, is neither taken nor refused.

OFD locks belong to an open file description, so two descriptors of one process would
conflict with each other. A process therefore holds one lock per file, in a registry keyed
by (st_dev, st_ino): a second open of a file this process has locked shares that lock
(counted per mode; a "shared" holder is upgraded for an "exclusive" open and downgraded
when the last one closes). The locks keep other processes out; inside one process, the
callers coordinate (a merge opens the same files several times while it holds them).
File systems without lock support (``ENOLCK``, ``EOPNOTSUPP``, ``EINVAL``) open unlocked,
as do hosts other than 64-bit Linux.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
import threading

from ..errors import LockedError, ReadOnlyError, UsageError, VhdxError

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

# --------------------------------------------------------------------------- locks

LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
_PERM_BITS = 4
LOCK_MODES = ("shared", "exclusive")
_LOCK_PERMS = {  # mode -> (permissions wanted, permissions not shared)
    "shared": (PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE),
    "exclusive": (PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_WRITE | PERM_RESIZE),
}
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = struct.Struct("@hhqqi4x")  # struct flock of 64-bit Linux: type, whence, start, len, pid
_LOCKS_WORK = sys.platform.startswith("linux") and struct.calcsize("P") == 8 and _FLOCK.size == 32
_NO_LOCK_SUPPORT = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


def _bit_bytes(base: int, mask: int) -> set[int]:
    return {base + i for i in range(_PERM_BITS) if mask >> i & 1}


def lock_bytes(mode: str) -> set[int]:
    """The bytes an open in ``mode`` locks (shared locks, as QEMU places them)."""
    perm, unshared = _LOCK_PERMS[mode]
    return _bit_bytes(LOCK_PERM_BASE, perm) | _bit_bytes(LOCK_SHARED_BASE, unshared)


def conflict_bytes(mode: str) -> set[int]:
    """The bytes that, held by anyone else, refuse an open in ``mode``."""
    perm, unshared = _LOCK_PERMS[mode]
    return _bit_bytes(LOCK_SHARED_BASE, perm) | _bit_bytes(LOCK_PERM_BASE, unshared)


def _fcntl_byte(fd: int, cmd: int, kind: int, offset: int) -> int:
    """One fcntl lock call on one byte; returns the l_type the kernel hands back."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
    return _FLOCK.unpack(out)[0]


def _refusal(path: str, mode: str, offset: int) -> LockedError:
    who = "another process (a VM, qemu, or another vhdx)"
    if offset in _bit_bytes(LOCK_PERM_BASE, PERM_WRITE | PERM_RESIZE):
        held = f"{who} has it open for writing"
    elif offset in _bit_bytes(LOCK_SHARED_BASE, PERM_WRITE | PERM_RESIZE):
        held = f"{who} has it open and does not share writing"
    else:
        held = f"{who} has it open and does not share reading"
    if mode == "shared":
        return LockedError(f"locked: {held}; close it, or --force-share (share=True) to read anyway",
                           path=path, lock_byte=offset)
    return LockedError(f"locked: {held}; close it and try again", path=path, lock_byte=offset)


class _FileLock:
    """The locks this process holds on one file, on a descriptor of its own (see the module doc)."""

    def __init__(self, key: tuple[int, int], fd: int, path: str) -> None:
        self.key = key
        self.fd = fd
        self.path = path
        self.counts = {"shared": 0, "exclusive": 0}
        self.held: set[int] = set()
        self.supported = True

    def acquire(self, mode: str) -> None:
        """Count one more open in ``mode``; place and check the bytes it needs first."""
        if self.supported and not lock_bytes(mode) <= self.held:
            self._place(mode)
        self.counts[mode] += 1

    def _place(self, mode: str) -> None:
        added: list[int] = []
        offset = min(lock_bytes(mode))
        try:
            for offset in sorted(lock_bytes(mode) - self.held):
                _fcntl_byte(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, offset)
                added.append(offset)
            for offset in sorted(conflict_bytes(mode)):
                if _fcntl_byte(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, offset) != fcntl.F_UNLCK:
                    raise _refusal(self.path, mode, offset)
        except OSError as e:
            self._unlock(added)
            if e.errno in _NO_LOCK_SUPPORT:
                self.supported = False  # no locks on this file system: open unlocked
                return
            if e.errno in (errno.EAGAIN, errno.EACCES):  # a write lock on the byte: not ours to share
                raise _refusal(self.path, mode, offset) from e
            raise VhdxError(f"cannot lock: {e.strerror}", path=self.path) from e
        except BaseException:
            self._unlock(added)
            raise
        self.held.update(added)

    def _unlock(self, offsets: list[int] | set[int]) -> None:
        for offset in offsets:
            try:
                _fcntl_byte(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, offset)
            except OSError:
                pass
        self.held.difference_update(offsets)

    def release(self, mode: str) -> bool:
        """Count one open fewer; True when none is left (the caller closes the descriptor)."""
        self.counts[mode] -= 1
        if mode == "exclusive" and not self.counts["exclusive"] and self.supported:
            self._unlock(self.held - lock_bytes("shared"))
        return not any(self.counts.values())


_locks: dict[tuple[int, int], _FileLock] = {}
# Reentrant, because the garbage collector may run a finalizer that closes a forgotten Disk
# (and so calls release_lock) in the middle of a registry change; such a release is put off
# until the change is complete (_deferred).
_locks_guard = threading.RLock()
_busy = [False]
_deferred: list[tuple[_FileLock, str]] = []


def _forget_locks_after_fork() -> None:
    # A forked child shares its parent's lock descriptors but is another process: its own
    # opens must take (and be checked for) locks of their own.
    global _locks_guard
    _locks.clear()
    _deferred.clear()
    _busy[0] = False
    _locks_guard = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_after_fork)


def _acquire(fd: int, path: str, mode: str) -> _FileLock:
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    lock = _locks.get(key)
    if lock is not None:
        lock.acquire(mode)
        return lock
    lock = _FileLock(key, os.dup(fd), path)
    lock.supported = _LOCKS_WORK
    try:
        lock.acquire(mode)
    except BaseException:
        os.close(lock.fd)
        raise
    _locks[key] = lock
    return lock


def _release(lock: _FileLock, mode: str) -> None:
    if lock.release(mode):
        if _locks.get(lock.key) is lock:
            del _locks[lock.key]
        os.close(lock.fd)


def _settle(outer: bool) -> None:
    """End a registry change: run the releases put off meanwhile (outermost change only)."""
    if not outer:
        return
    try:
        while _deferred:
            _release(*_deferred.pop())
    finally:
        _busy[0] = False


def acquire_lock(fd: int, path: str, mode: str) -> _FileLock:
    """Lock the file open on ``fd`` for ``mode``, sharing this process's lock on it if any.

    Raises :class:`LockedError` when another process holds a conflicting lock.
    """
    with _locks_guard:
        outer, _busy[0] = not _busy[0], True
        try:
            return _acquire(fd, path, mode)
        finally:
            _settle(outer)


def release_lock(lock: _FileLock, mode: str) -> None:
    """Undo one :func:`acquire_lock`; the last one closes the lock's descriptor."""
    with _locks_guard:
        if _busy[0]:  # a finalizer in the middle of a registry change: after it
            _deferred.append((lock, mode))
            return
        _busy[0] = True
        try:
            _release(lock, mode)
        finally:
            _settle(True)


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
        self._lock: _FileLock | None = None
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
            from ..errors import DiskExistsError
            raise DiskExistsError("file exists; refusing to overwrite it", path=self.path) from e
        except OSError as e:
            raise VhdxError(f"cannot open: {e.strerror}", path=self.path) from e
        try:
            self._refuse_special(os.fstat(fd).st_mode, regular_only)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
            if lock is not None:
                self._lock = acquire_lock(fd, self.path, lock)
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
            lock, self._lock = self._lock, None
            try:
                if lock is not None:
                    release_lock(lock, self.lock_mode or "shared")
            finally:
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
