"""QEMU-compatible image locks on one host file: which bytes an open locks, and the
process-wide registry that shares one lock per file.

Locks are QEMU's image locks (block/file-posix.c), so that QEMU and vhdx see each other.
They are open-file-description (OFD) locks, all of them shared (``F_RDLCK``) on single
bytes: a holder of permission bit *i* locks byte ``100 + i``, and a holder that does not
let anyone else have permission *i* locks byte ``200 + i``. An open first places its bytes
and then asks (``F_OFD_GETLK``) whether anyone else holds the bytes that conflict with it:
``200 + i`` for each permission it wants, ``100 + i`` for each one it refuses to share
(one question over the span from the first of those bytes to the last, then byte by byte
only when something in that span is held). Two opens racing each other can both fail, never both succeed.

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
The last release unlocks its bytes itself (one call over bytes 100 - 203) before closing the
descriptor: a private memory map of the file (the BAT's) keeps the open file description, and
with it its locks, alive after every descriptor is closed. A forked child's copy of a lock
never unlocks: the description, and so the locks, are the parent's too.
File systems without lock support (``ENOLCK``, ``EOPNOTSUPP``, ``EINVAL``) open unlocked,
as do hosts other than 64-bit Linux.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
import threading

from ..errors import LockedError, VhdxError

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


# mode -> (the bytes it locks, the bytes it checks), each in order: what every open places
_PLACES = {mode: (frozenset(lock_bytes(mode)), tuple(sorted(conflict_bytes(mode)))) for mode in LOCK_MODES}
_FIRST_BYTE, _LAST_BYTE = LOCK_PERM_BASE, LOCK_SHARED_BASE + _PERM_BITS - 1  # every byte a lock may hold


def _fcntl_byte(fd: int, cmd: int, kind: int, offset: int, length: int = 1) -> int:
    """One fcntl lock call on one byte (or ``length`` bytes); returns the l_type the kernel hands back."""
    out = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, length, 0))
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


class FileLock:
    """The locks this process holds on one file, on a descriptor of its own (see the module doc)."""

    def __init__(self, key: tuple[int, int], fd: int, path: str) -> None:
        self.key = key
        self.fd = fd
        self.path = path
        self.counts = {"shared": 0, "exclusive": 0}
        self.held: set[int] = set()
        self.supported = True
        self.pid = os.getpid()  # a forked child's copy must not unlock the bytes it shares with us

    def acquire(self, mode: str) -> None:
        """Count one more open in ``mode``; place and check the bytes it needs first."""
        if self.supported and not _PLACES[mode][0] <= self.held:
            self._place(mode)
        self.counts[mode] += 1

    def _place(self, mode: str) -> None:
        added: list[int] = []
        wanted, conflicts = _PLACES[mode]
        offset = min(wanted)
        try:
            for offset in sorted(wanted - self.held):
                _fcntl_byte(self.fd, F_OFD_SETLK, fcntl.F_RDLCK, offset)
                added.append(offset)
            offset = conflicts[0]
            span = conflicts[-1] + 1 - offset  # one question first: does anyone else lock a byte in between?
            if _fcntl_byte(self.fd, F_OFD_GETLK, fcntl.F_WRLCK, offset, span) != fcntl.F_UNLCK:
                for offset in conflicts:  # someone does: which bytes, one by one
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

    def _unlock_all(self) -> None:
        """Unlock every byte this lock may hold, in one call (all of them are ours)."""
        if self.held:
            try:
                _fcntl_byte(self.fd, F_OFD_SETLK, fcntl.F_UNLCK, _FIRST_BYTE, _LAST_BYTE + 1 - _FIRST_BYTE)
            except OSError:
                self._unlock(set(self.held))  # byte by byte, as placed
        self.held.clear()

    def release(self, mode: str) -> bool:
        """Count one open fewer; True when none is left: then every byte is unlocked here and the
        caller closes the descriptor (a memory map of the file may keep the open file description,
        and so its locks, alive after the close)."""
        self.counts[mode] -= 1
        done = not any(self.counts.values())
        if self.supported and self.pid == os.getpid():
            if done:
                self._unlock_all()
            elif mode == "exclusive" and not self.counts["exclusive"]:
                self._unlock(self.held - _PLACES["shared"][0])
        return done


_locks: dict[tuple[int, int], FileLock] = {}
# Reentrant, because the garbage collector may run a finalizer that closes a forgotten Disk
# (and so calls release_lock) in the middle of a registry change; such a release is put off
# until the change is complete (_deferred).
_locks_guard = threading.RLock()
_busy = [False]
_deferred: list[tuple[FileLock, str]] = []


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


def _acquire(fd: int, path: str, mode: str, key: tuple[int, int] | None) -> FileLock:
    if key is None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
    lock = _locks.get(key)
    if lock is not None:
        lock.acquire(mode)
        return lock
    lock = FileLock(key, os.dup(fd), path)
    lock.supported = _LOCKS_WORK
    try:
        lock.acquire(mode)
    except BaseException:
        os.close(lock.fd)
        raise
    _locks[key] = lock
    return lock


def _release(lock: FileLock, mode: str) -> None:
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


def acquire_lock(fd: int, path: str, mode: str, key: tuple[int, int] | None = None) -> FileLock:
    """Lock the file open on ``fd`` for ``mode``, sharing this process's lock on it if any.
    ``key`` is the file's (st_dev, st_ino), when the caller has them from ``fstat(fd)``.

    Raises :class:`LockedError` when another process holds a conflicting lock.
    """
    with _locks_guard:
        outer, _busy[0] = not _busy[0], True
        try:
            return _acquire(fd, path, mode, key)
        finally:
            _settle(outer)


def release_lock(lock: FileLock, mode: str) -> None:
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
