"""Files that appear atomically: built under a temporary name, renamed into place when complete.

A temporary file sits in the folder of its final name (a rename never crosses file systems),
starts with a dot and never ends in ``.vhdx``/``.avhdx``, so folder scans do not take a
leftover for a disk. Publishing a file makes its data durable, renames it into place without
replacing anything unless asked to, then makes the folder entry durable.
"""

from __future__ import annotations

import errno
import os
import secrets
from contextlib import contextmanager
from typing import Iterator

from ..errors import DiskExistsError, VhdxError

_NAME_BYTES = 180           # of the final name kept in a temporary name (NAME_MAX is 255 bytes)
# link(2) errors that mean "this file system has no hard links" (FAT, exFAT, some FUSE and SMB mounts)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}
# fsync(2) errors of folders on file systems that cannot sync a folder
_NO_FOLDER_SYNC = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF}


def temporary_path(final_path: str | os.PathLike[str], tag: str) -> str:
    """A fresh name ``.<final name>.<tag>-<random>`` in the folder of ``final_path``."""
    folder, name = os.path.split(os.fspath(final_path))
    short = os.fsdecode(os.fsencode(name)[:_NAME_BYTES])
    return os.path.join(folder, f".{short}.{tag}-{secrets.token_hex(6)}")


def refuse_existing(path: str | os.PathLike[str]) -> None:
    """Raise :class:`DiskExistsError` if anything (a dangling symbolic link too) is named ``path``."""
    if os.path.lexists(path):
        raise DiskExistsError("file exists; refusing to overwrite it", path=path)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Make the entries of ``folder`` durable (created, renamed or deleted names)."""
    folder = os.fspath(folder) or "."
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise VhdxError(f"cannot open the folder to sync it: {e.strerror}", path=folder) from e
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _NO_FOLDER_SYNC:
            raise VhdxError(f"cannot sync the folder: {e.strerror}", path=folder) from e
    finally:
        os.close(fd)


def publish(temporary: str, final: str, *, overwrite: bool = False) -> None:
    """Rename the complete file ``temporary`` to ``final``, then sync the folder.

    Without ``overwrite`` an existing ``final`` (even one that appears meanwhile) is never
    replaced: the file is hard-linked to its final name, which fails if the name exists, and
    the temporary name is then removed. On a file system without hard links the name is
    checked and then renamed, which a file created in between could lose to.
    """
    try:
        if overwrite:
            os.replace(temporary, final)
        else:
            _rename_no_replace(temporary, final)
    except FileExistsError:
        raise DiskExistsError("file exists; refusing to overwrite it", path=final) from None
    except OSError as e:
        raise VhdxError(f"cannot rename {temporary} into place: {e.strerror}", path=final) from e
    sync_folder(os.path.dirname(final))


def _rename_no_replace(temporary: str, final: str) -> None:
    try:
        os.link(temporary, final, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "File exists", final) from None
        os.rename(temporary, final)
        return
    try:
        os.unlink(temporary)
    except OSError:
        pass  # the output is in place; only a second name of it remains


def remove_quietly(path: str) -> None:
    """Remove a temporary file after a failure; a file that is already gone is fine."""
    try:
        os.unlink(path)
    except OSError:
        pass


class Output:
    """A temporary file being written: ``fd`` open for writing, ``path`` its name."""

    def __init__(self, fd: int, path: str, final: str) -> None:
        self.fd = fd
        self.path = path
        self.final = final

    def write_at(self, data: bytes | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)


@contextmanager
def atomic_output(final_path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Output]:
    """Write a file that appears under ``final_path`` only when complete.

    Yields an :class:`Output` on a new temporary file in the same folder (mode 0o644 less
    the umask). When the block ends normally the file is synced, renamed into place (an
    existing ``final_path`` is replaced only with ``overwrite``; a symbolic link there is then
    followed, so the file it names is replaced) and the folder synced. When the block raises
    anything, KeyboardInterrupt included, the temporary file is removed and the error goes on.
    """
    final = os.fspath(final_path)
    if overwrite and os.path.islink(final):
        final = os.path.realpath(final)
    temporary = temporary_path(final, "writing")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(temporary, flags, 0o644)
    except OSError as e:
        raise VhdxError(f"cannot create a temporary file beside it: {e.strerror}", path=final) from e
    out = Output(fd, temporary, final)
    try:
        yield out
        try:
            os.fsync(fd)
        except OSError as e:
            raise VhdxError(f"cannot sync the output: {e.strerror}", path=final) from e
        out.fd = -1
        os.close(fd)
        publish(temporary, final, overwrite=overwrite)
    except BaseException:
        if out.fd >= 0:
            os.close(out.fd)
        remove_quietly(temporary)
        raise
