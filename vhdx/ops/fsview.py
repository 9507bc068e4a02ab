"""File systems inside a virtual disk, read through The Sleuth Kit (``pip install 'vhdx[forensics]'``).

A :class:`~vhdx.chains.disk.Disk` (any layer of a chain) is handed to ``pytsk3`` as an image
whose reads go to :meth:`Disk.pread_into`; partition tables (MBR and GPT) are found by
``pytsk3.Volume_Info``, and each partition's file system (NTFS, FAT/exFAT, ext2/3/4, ...) by
``pytsk3.FS_Info``. :func:`walk` lists a file system: every allocated name with its metadata
and the disk ranges of its data. ``pytsk3`` is imported only here, inside functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from ..chains.disk import Disk
from ..errors import VhdxError

MAX_DEPTH = 4096          # folders deep; deeper is a loop (or a crafted file system)
TIME_FIELDS = ("mtime", "ctime", "crtime", "atime")


class ForensicsMissingError(VhdxError):
    """pytsk3 is not installed; the message says how to get it."""


def tsk_module(needs: str = "reading file systems") -> Any:
    """The ``pytsk3`` module, or :class:`ForensicsMissingError` saying that ``needs`` it and how
    to install it."""
    try:
        import pytsk3
    except ImportError:
        raise ForensicsMissingError(f"{needs} needs The Sleuth Kit's binding: "
                                    "pip install 'vhdx[forensics]' (pytsk3)") from None
    return pytsk3


def read_bytes(disk: Disk, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes of ``disk`` at ``offset`` (fewer at its end, none past it)."""
    buf = bytearray(max(0, min(length, disk.size - offset)))
    if buf:
        disk.pread_into(memoryview(buf), offset)
    return bytes(buf)


def disk_image(disk: Disk) -> Any:
    """A ``pytsk3.Img_Info`` whose reads are ``disk``'s (the disk as that layer reads)."""
    tsk = tsk_module()

    class DiskImage(tsk.Img_Info):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            super().__init__(url="", type=tsk.TSK_IMG_TYPE_EXTERNAL)

        def read(self, offset: int, size: int) -> bytes:
            return read_bytes(disk, offset, size)

        def get_size(self) -> int:
            return disk.size

        def close(self) -> None:
            pass

    return DiskImage()


@dataclass(frozen=True)
class Volume:
    """A partition (or the whole disk when there is no partition table): bytes and a label."""

    index: int
    offset: int
    length: int
    description: str

    def to_dict(self) -> dict[str, Any]:
        """The volume as JSON values."""
        return dict(index=self.index, offset=self.offset, length=self.length, description=self.description)


def volumes(image: Any, size: int) -> list[Volume]:
    """The allocated partitions of an MBR or GPT table, else the whole disk as one volume."""
    tsk = tsk_module()
    try:
        table = tsk.Volume_Info(image)
    except OSError:
        return [Volume(0, 0, size, "whole disk")]
    block = table.info.block_size
    out: list[Volume] = []
    for part in table:
        if part.flags & tsk.TSK_VS_PART_FLAG_ALLOC and part.len > 0:
            desc = part.desc.decode("utf-8", "replace") if isinstance(part.desc, bytes) else str(part.desc)
            out.append(Volume(len(out) + 1, part.start * block, part.len * block, desc))
    return out or [Volume(0, 0, size, "whole disk")]


def open_fs(image: Any, offset: int) -> Any | None:
    """The file system at byte ``offset`` of ``image``, or None where none is recognised."""
    tsk = tsk_module()
    try:
        return tsk.FS_Info(image, offset=offset)
    except OSError:
        return None


def fs_type_name(fs: Any) -> str:
    """``ext4``, ``ntfs``, ``fat32``...: the file system's TSK type name."""
    tsk = tsk_module()
    for name in dir(tsk):
        if name.startswith("TSK_FS_TYPE_") and not name.endswith(("_DETECT", "_ENUM")) \
                and getattr(tsk, name) == fs.info.ftype:
            return name[len("TSK_FS_TYPE_"):].lower()
    return str(fs.info.ftype)


@dataclass
class Entry:
    """One allocated name of a file system: its metadata and, for a file, where its data is."""

    path: str
    inode: int
    kind: str                   # "file", "dir", "link", "other"
    size: int
    mode: int
    uid: int
    gid: int
    times: dict[str, int]       # nanoseconds since 1970
    runs: list[tuple[int, int, int]] = field(default_factory=list)   # (file offset, disk offset, length)
    resident: bool = False      # data kept in the metadata record (NTFS resident, ext4 inline)

    def stat_fields(self) -> dict[str, Any]:
        """What is compared between two views, atime aside (a read changes it)."""
        d = dict(inode=self.inode, kind=self.kind, size=self.size, mode=self.mode, uid=self.uid, gid=self.gid)
        d.update({k: v for k, v in self.times.items() if k != "atime"})
        return d


def _kind(tsk: Any, meta_type: int) -> str:
    return {tsk.TSK_FS_META_TYPE_REG: "file", tsk.TSK_FS_META_TYPE_DIR: "dir",
            tsk.TSK_FS_META_TYPE_LNK: "link"}.get(meta_type, "other")


def _times(meta: Any) -> dict[str, int]:
    return {k: int(getattr(meta, k) or 0) * 1_000_000_000 + int(getattr(meta, k + "_nano", 0) or 0)
            for k in TIME_FIELDS}


def data_runs(tsk: Any, f: Any, base: int, block: int) -> tuple[list[tuple[int, int, int]], bool]:
    """(file offset, disk offset, length) of the default data stream's allocated runs, and
    whether the data is resident (inside the metadata record, no runs)."""
    runs: list[tuple[int, int, int]] = []
    data_types = (tsk.TSK_FS_ATTR_TYPE_DEFAULT, tsk.TSK_FS_ATTR_TYPE_NTFS_DATA)
    for attr in f:
        if attr.info.type not in data_types or attr.info.name not in (None, b"", b"$Data"):
            continue
        if not attr.info.flags & tsk.TSK_FS_ATTR_NONRES:
            return [], True
        for run in attr:
            if run.flags & (tsk.TSK_FS_ATTR_RUN_FLAG_SPARSE | tsk.TSK_FS_ATTR_RUN_FLAG_FILLER) or not run.len:
                continue
            runs.append((run.offset * block, base + run.addr * block, run.len * block))
        break
    return runs, False


def make_entry(tsk: Any, f: Any, path: str, base: int, block: int) -> Entry:
    """The :class:`Entry` of the TSK file ``f`` (its metadata loaded) under the name ``path``."""
    meta = f.info.meta
    kind = _kind(tsk, meta.type)
    e = Entry(path, int(meta.addr), kind, int(meta.size), int(meta.mode), int(meta.uid), int(meta.gid), _times(meta))
    if kind == "file":
        e.runs, e.resident = data_runs(tsk, f, base, block)
    return e


def hidden(name: str, at_root: bool, system: bool) -> bool:
    """TSK's virtual $OrphanFiles (listing it scans every inode), and, unless ``system``, the
    $-files at the root (NTFS metafiles, TSK's $MBR/$FAT1/$FAT2)."""
    return at_root and name.startswith("$") and (not system or name == "$OrphanFiles")


def _skipped(tsk: Any, f: Any, name: str, at_root: bool, system: bool) -> bool:
    """Names that are not files of the guest: '.', '..', unallocated names, TSK's virtual
    $OrphanFiles (listing it scans every inode), and, unless ``system``, the $-files at the
    root (NTFS metafiles, TSK's $MBR/$FAT1/$FAT2)."""
    if name in (".", "..") or f.info.meta is None or f.info.name.flags & tsk.TSK_FS_NAME_FLAG_UNALLOC:
        return True
    return hidden(name, at_root, system)


def walk(fs: Any, base: int, *, system: bool = False) -> dict[str, Entry]:
    """Every allocated name of ``fs`` (at disk offset ``base``), by path, without recursion."""
    tsk = tsk_module()
    block = fs.info.block_size
    out: dict[str, Entry] = {}
    seen = {fs.info.root_inum}
    stack: list[tuple[str, Any, int]] = [("", fs.open_dir(inode=fs.info.root_inum), 0)]
    while stack:
        parent, folder, depth = stack.pop()
        for f in folder:
            name = f.info.name.name.decode("utf-8", "surrogateescape")
            if _skipped(tsk, f, name, not parent, system):
                continue
            e = make_entry(tsk, f, f"{parent}/{name}", base, block)
            out[e.path] = e
            if e.kind == "dir" and e.inode not in seen and depth < MAX_DEPTH:
                seen.add(e.inode)
                try:
                    stack.append((e.path, f.as_directory(), depth + 1))
                except OSError:
                    continue
    return out


def read_file(fs: Any, inode: int, offset: int, length: int) -> bytes:
    """``length`` bytes of the file ``inode``'s default data at ``offset`` (short at its end)."""
    f = fs.open_meta(inode=inode)
    size = int(f.info.meta.size)
    n = max(0, min(length, size - offset))
    return f.read_random(offset, n) if n else b""


def pieces(start: int, end: int, step: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most ``step`` bytes covering [start, end)."""
    at = start
    while at < end:
        n = min(step, end - at)
        yield at, n
        at += n
