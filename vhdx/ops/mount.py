"""``vhdx mount``: every layer of a chain as a file, over FUSE (``pip install 'vhdx[mount]'``).

The mount point holds one read-only file per layer, named after the layer's file, each the
whole virtual disk as it reads at that layer (the base alone, the base plus the first
checkpoint, ... up to the leaf), and ``disk``, the leaf. The chain is opened with
:func:`vhdx.open`, so files are opened read-only (O_RDONLY), a dirty log is replayed in memory
and locks are held as for any reader. With ``rw`` the leaf is opened ``"r+"`` and ``disk`` is
writable through the normal write path (log, locks); parents are never written. Writes are
gathered in a :class:`~.writebuffer.WriteBuffer` and applied as one transaction per 32 MiB, at
each flush, fsync (durable when it returns) and release, and at unmount.

The binding is ``mfusepy`` (ctypes over libfuse 3, or libfuse 2 when that is installed too: it
looks for ``libfuse.so.2`` first; the maintained successor of fusepy). It is
imported only here, inside functions, so the package works without it. The file system runs
single-threaded (a :class:`~vhdx.chains.disk.Disk` is not shared between threads; a lock guards
it all the same, and a multi-threaded loop measured slower, the callbacks contending for the
GIL). A read request is served with no per-sector Python work, straight into a page-aligned
reply that libfuse sends and frees (``read_buf``, :mod:`.fusebuf`). libfuse 3 lets the kernel send
1 MiB requests; libfuse 2's are at most 128 KiB (32 pages), so a sequential reader is served from
a 4 MiB read-ahead window (:class:`Window`) and costs one pass down the chain per window.

In the background (the default) :func:`mount` forks a server process that opens the chain,
mounts and reports back through a pipe once the kernel has handshaked (FUSE ``init``): when
:func:`mount` returns, the mount is ready. :func:`unmount` unmounts and waits for that server
to exit, so the leaf is closed (clean log, locks released) when it returns.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from ..chains.disk import Disk
from ..chains.resolve import open as open_disk
from ..errors import UsageError, VhdxError
from .fusebuf import ReplyMemory, keep_freed_memory
from .maps import chain_layers
from .writebuffer import WriteBuffer

FSNAME = "vhdx"
MAX_READ = 1 << 20          # bytes per FUSE read request (the kernel's largest with 256 pages)
LEAF_NAME = "disk"
WINDOW, DIRECT_READ = 4 << 20, 1 << 20   # read-ahead bytes; requests this large (libfuse 3) skip it
UNMOUNT_WAIT = 120.0        # seconds unmount waits for the server to close the chain


class FuseMissingError(VhdxError):
    """FUSE cannot be used here; the message names what to install."""


def fuse_module() -> Any:
    """The ``mfusepy`` module, or :class:`FuseMissingError` naming what is missing.

    libfuse 3 is loaded where it is installed (mfusepy would take libfuse 2 first when both are):
    only libfuse 3 lets the kernel send reads of up to 1 MiB (``max_pages``), where libfuse 2's
    are 128 KiB each, and each request costs a Python callback. ``FUSE_LIBRARY_PATH`` chooses."""
    if not os.path.exists("/dev/fuse"):
        raise FuseMissingError("FUSE is not available: /dev/fuse is missing (modprobe fuse, or run the "
                               "container with --device /dev/fuse)")
    libfuse3 = "FUSE_LIBRARY_PATH" not in os.environ and ctypes.util.find_library("fuse3")
    if libfuse3:
        os.environ["FUSE_LIBRARY_PATH"] = libfuse3  # read by mfusepy when it is imported
    try:
        import mfusepy
    except ImportError:
        raise FuseMissingError("the FUSE binding is missing: pip install 'vhdx[mount]' (mfusepy)") from None
    except OSError:  # mfusepy found no libfuse
        raise FuseMissingError("libfuse is missing: apt-get install fuse3 (Debian/Ubuntu), "
                               "dnf install fuse3 (Fedora)") from None
    return mfusepy


def layer_names(disks: list[Disk]) -> list[str]:
    """One file name per layer (leaf first): the file's name, made unique and never ``disk``."""
    names: list[str] = []
    for n, disk in enumerate(disks):
        name = os.path.basename(disk.path) or f"layer{n}"
        if name == LEAF_NAME or name in names:
            name = f"{name}~layer{n}"
        names.append(name)
    return names


class Window:
    """One read-ahead window: ``WINDOW`` bytes of one file, from ``start``."""

    def __init__(self) -> None:
        self.buffer = bytearray(WINDOW)
        self.name = ""
        self.start = 0
        self.length = 0

    def clear(self) -> None:
        """Forget the window (after a write)."""
        self.name, self.length = "", 0

    def fill(self, name: str, disk: Disk, offset: int) -> None:
        """Read ``WINDOW`` bytes (fewer at the end of the disk) of ``disk`` from ``offset``."""
        self.clear()
        n = max(0, min(WINDOW, disk.size - offset))
        disk.pread_into(memoryview(self.buffer)[:n], offset)
        self.name, self.start, self.length = name, offset, n

    def serve(self, name: str, offset: int, view: memoryview) -> bool:
        """Copy into ``view`` if the window holds all of it; False otherwise."""
        at = offset - self.start
        if name != self.name or at < 0 or at + len(view) > self.length:
            return False
        view[:] = memoryview(self.buffer)[at:at + len(view)]
        return True


class DiskFiles:
    """The file system's content: a flat folder of whole-disk files (FUSE-agnostic)."""

    def __init__(self, leaf: Disk, writable: bool) -> None:
        self.leaf = leaf
        self.writable = writable
        layers = chain_layers(leaf)
        self.files: dict[str, Disk] = {LEAF_NAME: leaf}
        self.files.update(zip(layer_names(layers), layers))
        self.stats = {name: os.stat(disk.path) for name, disk in self.files.items()}
        self.errors = 0
        self.lock = threading.Lock()       # one request at a time in the chain (a Disk is not thread-safe)
        self.window = Window()  # read-ahead for a sequential reader
        self.next_read: tuple[str, int] = ("", -1)
        self.pending = WriteBuffer(leaf) if writable else None

    def attributes(self, name: str) -> dict[str, Any]:
        """stat(2) fields of ``/name`` (``""`` is the folder)."""
        if not name:  # the folder: the times of its newest file (not 1970)
            newest = max(self.stats.values(), key=lambda st: st.st_mtime_ns)
            return dict(st_mode=stat.S_IFDIR | 0o555, st_nlink=2, st_uid=os.getuid(), st_gid=os.getgid(),
                        st_atime=newest.st_atime_ns, st_mtime=newest.st_mtime_ns, st_ctime=newest.st_ctime_ns)
        disk = self.files[name]
        st = self.stats[name]
        mode = 0o644 if (self.writable and name == LEAF_NAME) else 0o444
        return dict(st_mode=stat.S_IFREG | mode, st_nlink=1, st_size=disk.size, st_blocks=-(-disk.size // 512),
                    st_uid=st.st_uid, st_gid=st.st_gid, st_atime=st.st_atime_ns,  # nanoseconds (use_ns)
                    st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns, st_blksize=MAX_READ)

    def length(self, name: str, size: int, offset: int) -> int:
        """How many of ``size`` bytes at ``offset`` a read of ``/name`` returns (none past the end)."""
        return max(0, min(size, self.files[name].size - offset))

    def read_into(self, name: str, view: memoryview, offset: int) -> None:
        """Fill ``view`` (at most :meth:`length` bytes) with ``/name``'s bytes at ``offset``.

        A read that continues the previous one is served from a read-ahead window of ``WINDOW``
        bytes, one pass down the chain per window, not per 128 KiB request (libfuse 2; libfuse 3's
        1 MiB ones, ``DIRECT_READ``, are read straight into the reply); others read exactly."""
        disk, n = self.files[name], len(view)
        with self.lock:
            if n and not self.window.serve(name, offset, view):
                if (name, offset) == self.next_read and n < DIRECT_READ:
                    self.window.fill(name, disk, offset)
                    self.window.serve(name, offset, view)
                else:
                    disk.pread_into(view, offset)
            if n and disk is self.leaf and self.pending:
                self.pending.overlay(view, offset)   # buffered writes over the file's (or window's) bytes
            self.next_read = (name, offset + n)

    def write(self, name: str, data: bytes, offset: int) -> int:
        """Write ``data`` to the leaf at ``offset`` (only ``disk``, only with ``rw``): into the
        write buffer, applied as one transaction when it is full (see :meth:`commit`)."""
        if not (self.writable and name == LEAF_NAME) or self.pending is None:
            raise PermissionError(errno.EROFS, "read-only")
        fits = max(0, min(len(data), self.leaf.size - offset))
        if not fits and data:  # as a block device: a write at the end is ENOSPC, one across it is short
            raise OSError(errno.ENOSPC, "past the end of the disk")
        with self.lock:
            self.window.clear()   # every file shows the leaf's bytes through the window: drop it
            self.pending.write(memoryview(data)[:fits], offset)
            if self.pending.full():
                self.pending.apply()
        return fits

    def commit(self, durable: bool = False) -> None:
        """Apply the buffered writes (one transaction); with ``durable``, flush the leaf too
        (fsync: the writes are on stable storage when this returns)."""
        if self.pending is None:
            return
        with self.lock:
            self.window.clear()
            self.pending.apply()
            if durable:
                self.leaf.flush()


def _errno_of(e: BaseException) -> int:
    if isinstance(e, KeyError):
        return errno.ENOENT
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0 and not isinstance(e, VhdxError):
        return e.errno
    return errno.EIO


def operations(files: DiskFiles, ready: Callable[[], None], mountpoint: str = "") -> Any:
    """An ``mfusepy.Operations`` over ``files``; ``ready`` is called once the kernel has handshaked."""
    fuse = fuse_module()
    opened: list[bool] = []
    replies = ReplyMemory()
    keep_freed_memory()

    def guarded(func: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, path: str, *args: Any) -> Any:
            try:
                return func(path.lstrip("/"), *args)
            except Exception as e:
                files.errors += 1 if not isinstance(e, KeyError) else 0
                raise fuse.FuseOSError(_errno_of(e)) from None
        return call

    def do_open(name: str, flags: int) -> int:
        files.attributes(name)
        if not opened:  # the kernel sets a file's read-ahead after this reply: raise it first
            opened.append(raise_readahead(mountpoint))
        if flags & os.O_ACCMODE != os.O_RDONLY and not (files.writable and name == LEAF_NAME):
            raise PermissionError(errno.EROFS, "read-only")
        return 0

    def do_truncate(name: str, length: int, fh: Any = None) -> int:
        if not files.writable or name != LEAF_NAME or length != files.leaf.size:
            raise PermissionError(errno.EPERM, "the disk's size is fixed")
        return 0

    def do_fsync(name: str, datasync: int, fh: Any) -> int:
        if files.writable and name == LEAF_NAME:
            files.commit(durable=True)
        return 0

    def do_flush(name: str, fh: Any) -> int:    # each close(2), and release: apply what is buffered
        if files.writable and name == LEAF_NAME:
            files.commit()
        return 0

    def do_init(self: Any, conn: Any, config: Any) -> None:
        tune(conn, config, files.writable)
        ready()

    body = dict(
        use_ns=True,
        init_with_config=do_init,
        getattr=guarded(lambda name, fh=None: files.attributes(name)),
        readdir=guarded(lambda name, fh: [".", "..", *files.files]),
        open=guarded(do_open),
        read_buf=guarded(lambda name, bufpp, size, offset, fh: replies.reply(
            bufpp, files.length(name, size, offset), lambda view: files.read_into(name, view, offset))),
        write=guarded(lambda name, data, offset, fh: files.write(name, data, offset)),
        truncate=guarded(do_truncate),
        fsync=guarded(do_fsync),
        flush=guarded(do_flush),
        release=guarded(do_flush),
        statfs=guarded(lambda name: dict(f_bsize=MAX_READ, f_frsize=512, f_namemax=255)),
    )
    return type("VhdxFiles", (fuse.Operations,), body)()


def tune(conn: Any, config: Any, writable: bool) -> None:
    """Read-ahead of up to ``MAX_READ`` bytes (the kernel and libfuse's buffer may lower it: 128 KiB
    with libfuse 3.14). Read-only, the kernel keeps a file's pages between opens (nothing changes);
    with ``rw`` it drops them at each open, since the leaf's layer file shows what ``disk`` writes."""
    if conn is not None:
        conn.max_readahead = max(conn.max_readahead, MAX_READ)
        if hasattr(conn, "max_read"):  # libfuse 3 refuses to start unless it equals the max_read option
            conn.max_read = MAX_READ
            conn.max_write = MAX_READ  # libfuse 3 offers the kernel requests of this many pages, reads too
    if config is not None and hasattr(config, "auto_cache") and not writable:
        config.auto_cache = 1


def fuse_options(rw: bool, allow_other: bool) -> dict[str, Any]:
    """The mount options: large reads, read-only unless ``rw``, permissions checked by the kernel."""
    opts: dict[str, Any] = dict(foreground=True, nothreads=True, fsname=f"{FSNAME}@{os.getpid()}",
                                subtype=FSNAME, max_read=MAX_READ, default_permissions=True)
    if not rw:
        opts["ro"] = True
    elif getattr(fuse_module(), "fuse_version_major", 3) == 2:
        # libfuse 2 (which mfusepy loads when both are installed) hands writes over one page
        # (4 KiB) at a time unless asked for big writes; libfuse 3 always does them.
        opts.update(big_writes=True, max_write=MAX_READ)
    if allow_other:
        opts["allow_other"] = True
    return opts


def serve(path: str, mountpoint: str, *, rw: bool = False, allow_other: bool = False,
          ready: Callable[[], None] = lambda: None, **chain_options: Any) -> int:
    """Open the chain, mount it at ``mountpoint`` and serve until unmounted; returns the error count."""
    fuse = fuse_module()
    check_mountpoint(mountpoint)
    with open_disk(path, "r+" if rw else "rb", **chain_options) as leaf:
        files = DiskFiles(leaf, rw)
        ops = operations(files, ready, mountpoint)
        try:
            fuse.FUSE(ops, mountpoint, **fuse_options(rw, allow_other))
        finally:
            files.commit()   # unmounted (or stopped): what is still buffered goes in before the close
        return files.errors


def raise_readahead(mountpoint: str) -> bool:
    """Let the kernel read ahead ``MAX_READ`` bytes on this mount (default 128 KiB; a FUSE handshake
    can only lower it): its ``read_ahead_kb`` in sysfs (root only). True when it was set."""
    try:
        fields = mount_entry(mountpoint)  # not a stat of the mount point: that would wait on this server
        if fields is None:
            return False
        with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(MAX_READ // 1024))
        return True
    except (OSError, ValueError):
        return False


def mount_entry(mountpoint: str) -> list[str] | None:
    """The fields of the /proc/self/mountinfo line of the mount visible at ``mountpoint`` (the last;
    the device is field 2, type and source follow the ``-``), or None when nothing is mounted there."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        found = [fields for fields in map(str.split, f)
                 if "-" in fields and fields[4].encode().decode("unicode_escape") == target]
    return found[-1] if found else None


def check_mountpoint(mountpoint: str) -> None:
    """A mount point must be an existing folder."""
    if not os.path.isdir(mountpoint):
        raise UsageError("the mount point is not a folder", path=mountpoint)


def _child(path: str, mountpoint: str, write_end: int, options: dict[str, Any]) -> None:
    """The server process: serve, tell the parent ``ok`` once mounted (or the error), then exit."""
    os.setsid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)  # libfuse installs its own (unmount and exit) over the defaults
    status = 1
    reported = []

    def ready() -> None:
        os.write(write_end, b"ok\n")
        os.close(write_end)
        reported.append(True)   # the descriptor number may be reused from here on: never write to it
        _detach_stdio()

    try:
        status = 1 if serve(path, mountpoint, ready=ready, **options) else 0
    except BaseException as e:  # reported to the parent while it is still waiting, then exit
        if not reported:
            try:
                os.write(write_end, f"error {e}\n".encode("utf-8", "replace"))
            except OSError:
                pass
    finally:
        os._exit(status)


def _detach_stdio() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def mount(path: str, mountpoint: str, *, foreground: bool = False, **options: Any) -> int:
    """Mount ``path``'s chain at ``mountpoint``. In the background, return once it is mounted
    (the server's pid); in the foreground, serve until unmounted (returns 0)."""
    fuse_module()
    check_mountpoint(mountpoint)
    if foreground:
        serve(path, mountpoint, **options)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(path, mountpoint, write_end, options)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.readline().decode("utf-8", "replace").strip()
    if answer == "ok":
        return pid
    os.waitpid(pid, 0)
    raise VhdxError(answer[len("error "):] if answer.startswith("error ") else
                    "the mount server exited before the mount was ready", path=path)


def mounted_server(mountpoint: str) -> int | None:
    """The pid of the vhdx server mounted at ``mountpoint`` (from its fsname), or None if not ours."""
    fields = mount_entry(mountpoint) or ["-"]
    sep = fields.index("-")
    kind, source = (fields[sep + 1:sep + 3] + ["", ""])[:2]
    ours = kind.startswith(f"fuse.{FSNAME}") and source.startswith(f"{FSNAME}@")
    return int(source.split("@", 1)[1]) if ours else None


def unmount(mountpoint: str, *, wait: float = UNMOUNT_WAIT) -> None:
    """Unmount a vhdx mount and wait until its server has closed the chain."""
    pid = mounted_server(mountpoint)
    if pid is None:
        raise UsageError("not a vhdx mount point", path=mountpoint)
    tool = ["umount", mountpoint] if os.geteuid() == 0 and shutil.which("umount") else None
    if tool is None:
        if not shutil.which("fusermount3"):
            raise FuseMissingError("fusermount3 is missing: apt-get install fuse3", path=mountpoint)
        tool = ["fusermount3", "-u", mountpoint]
    done = subprocess.run(tool, capture_output=True, text=True)
    if done.returncode:
        raise VhdxError(f"{tool[0]} failed: {(done.stderr or done.stdout).strip()}", path=mountpoint)
    _wait_for_exit(pid, wait, mountpoint)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaps counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_for_exit(pid: int, wait: float, mountpoint: str) -> None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)  # our own child (tests, API use)
            if waited == pid:
                return
        except ChildProcessError:
            pass
        if _gone(pid):
            return
        time.sleep(0.02)
    raise VhdxError(f"unmounted, but the server (pid {pid}) has not exited after {wait:.0f} s", path=mountpoint)
