"""Looking at files without trusting them: regular files only, headers read once per command.

A folder scan or a parent search meets whatever the folder holds: FIFOs (opening one for
reading waits for ever), sockets, devices, dangling or looping symlinks, files another
process writes. Only regular files are opened; each file's headers and metadata (not its
BAT) are read once per command (:class:`ScanCache`), keyed by inode, size and mtime.
"""

from __future__ import annotations

import errno
import os
import uuid
from dataclasses import dataclass

from ..errors import LockedError, VhdxError
from ..file.image import Image
from ..file.storage import FileStorage, not_regular_reason
from ..format import constants as C
from ..format.locator import parse_linkage


VHDX_SUFFIXES = (".vhdx", ".avhdx")


def regular_file_problem(path: str, *, allow_block: bool = False) -> str | None:
    """Why a file met while scanning or resolving must be skipped, or None if it may be opened.

    Symlinks are followed, so a dangling link or a loop of links is a problem too. FIFOs,
    sockets and devices are never opened: opening a FIFO for reading waits for a writer.
    """
    return _stat_regular(path, allow_block)[1]


def _stat_regular(path: str, allow_block: bool) -> tuple[os.stat_result | None, str | None]:
    """(the file's stat, None) for a file that may be opened, else (None, why not)."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, "a loop of symbolic links"
        if os.path.islink(path):
            return None, "a dangling symbolic link"
        return None, e.strerror or str(e)
    problem = not_regular_reason(st.st_mode, allow_block=allow_block)
    return (None, problem) if problem else (st, None)


def open_found(path: str, *, allow_block: bool = False, share: bool = False) -> Image:
    """Open, read-only, a file that resolution or a scan found: a regular file only.

    A shared lock is taken unless ``share`` (--force-share)."""
    return Image.open(path, "r", storage=FileStorage(path, regular_only=not allow_block,
                                                     lock=None if share else "shared"))


@dataclass(frozen=True)
class Peek:
    """What a scan learns from a file's headers and metadata (its BAT is not read)."""

    data_write_guid: uuid.UUID
    has_parent: bool
    parent_linkage: uuid.UUID | None = None
    parent_linkage2: uuid.UUID | None = None  # None when absent or zero
    in_use: bool = False  # another process has it open for writing: read without a lock

    @property
    def linkages(self) -> set[uuid.UUID]:
        """The DataWriteGuids a parent of this file may have (parent_linkage and parent_linkage2)."""
        return {g for g in (self.parent_linkage, self.parent_linkage2) if g is not None}


def read_peek(path: str, *, allow_block: bool = False, share: bool = False) -> Peek | str:
    """The GUIDs of one file from its headers and metadata, or why it could not be read.

    A scan must not fail because another process writes one of the files (a running VM's
    disk): such a file is read without a lock, and its peek says ``in_use``."""
    in_use = False
    try:
        try:
            storage = FileStorage(path, regular_only=not allow_block, lock=None if share else "shared")
        except LockedError:
            storage, in_use = FileStorage(path, regular_only=not allow_block, lock=None), True
        image = Image.open_headers(storage)
    except (VhdxError, OSError) as e:
        return f"unreadable: {e.detail if isinstance(e, VhdxError) else e}"
    try:
        return _peek_of(image, in_use)
    finally:
        image.close()


def _peek_of(image: Image, in_use: bool = False) -> Peek:
    l1, l2 = linkage_of(image) if image.has_parent else (None, None)
    return Peek(image.header.data_write_guid, image.has_parent, l1, l2, in_use)


def _stat_key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ScanCache:
    """The header peeks of one command, so that a scanned folder is read once.

    Peeks are kept under the file's (st_dev, st_ino, st_size, st_mtime_ns): a file changed
    since is read again. Files change between commands, so each command (a resolver,
    ``find_chains``, a merge) owns its own cache; none outlives the command.
    """

    def __init__(self, *, share: bool = False) -> None:
        self.share = share  # --force-share: read every file without locks
        self._peeks: dict[tuple[int, int, int, int], Peek | str] = {}
        self._folders: dict[str, tuple[dict[uuid.UUID, list[str]], list[tuple[str, str]]]] = {}

    def scan(self, folder: str) -> tuple[dict[uuid.UUID, list[str]], list[tuple[str, str]]]:
        """The .vhdx/.avhdx files of ``folder`` by DataWriteGuid, and (path, why) for those skipped.

        Listed once per command (raises OSError if the folder cannot be listed). A file found
        here is only a candidate: whoever opens it checks its GUID again.
        """
        key = os.path.abspath(folder)
        if key not in self._folders:
            by_guid: dict[uuid.UUID, list[str]] = {}
            skipped: list[tuple[str, str]] = []
            for name in sorted(os.listdir(folder)):
                if not name.lower().endswith(VHDX_SUFFIXES):
                    continue
                path = os.path.join(folder, name)
                peek = self.peek(path)
                if isinstance(peek, str):
                    skipped.append((path, peek))
                else:
                    by_guid.setdefault(peek.data_write_guid, []).append(path)
            self._folders[key] = (by_guid, skipped)
        return self._folders[key]

    def peek(self, path: str, *, allow_block: bool = False) -> Peek | str:
        """The file's :class:`Peek`, or why it is skipped ("not a regular file (a FIFO)", ...)."""
        st, problem = _stat_regular(path, allow_block)
        if st is None:
            return problem or "cannot be read"
        key = _stat_key(st)
        found = self._peeks.get(key)
        if found is None:
            found = self._peeks[key] = read_peek(path, allow_block=allow_block, share=self.share)
        return found

    def open(self, path: str, *, allow_block: bool = False) -> Image | str:
        """Open a file that resolution found (read-only, a regular file only) and remember its
        peek; or say why it cannot be opened."""
        st, problem = _stat_regular(path, allow_block)
        if st is None:
            return problem or "cannot be read"
        try:
            image = open_found(path, allow_block=allow_block, share=self.share)
        except LockedError:
            raise  # a parent another process writes: the chain cannot be read safely
        except VhdxError as e:
            return f"unreadable: {e.detail}"
        self._peeks[_stat_key(st)] = _peek_of(image)
        return image


def linkage_of(image: Image) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """The child's parent_linkage and parent_linkage2 (None when absent, invalid or zero)."""
    loc = image.metadata.parent_locator or {}
    l1 = parse_linkage(loc.get("parent_linkage"))
    l2 = parse_linkage(loc.get("parent_linkage2"))
    if l2 == C.ZERO_GUID:
        l2 = None
    return l1, l2


def open_peek(path: str) -> tuple[Image, bool]:
    """Open ``path`` (a regular file) read-only, as folder scans do.

    A scan must not fail because another process writes one of the files (a running VM's
    disk): such a file is read without a lock instead, and the second value is True ("in
    use"; what it shows may be changing). Other errors are raised as usual.
    """
    try:
        return open_found(path), False
    except LockedError:
        return open_found(path, share=True), True


def read_data_write_guid(path: str, cache: ScanCache | None = None) -> uuid.UUID | None:
    """The current header's DataWriteGuid of a regular file, or None if it is not a readable VHDX.

    A file in use by another process is read without a lock (see :func:`read_peek`).
    """
    peek = (cache or ScanCache()).peek(path)
    return None if isinstance(peek, str) else peek.data_write_guid
