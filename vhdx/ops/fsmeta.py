"""Which metadata records of a file system a checkpoint changed, and the names of those files.

``vhdx diff --files`` must cost what the checkpoint changed, not what the disk holds. A file
system keeps one fixed-size record per file in tables at known places: ext2/3/4's inode tables
(one per block group, found through the group descriptors) and NTFS's $MFT (its data runs, from
record 0); FAT and exFAT keep it in directory entries, which :mod:`.fsfat` finds in the changed
folder sectors. :func:`record_tables` finds those tables from the file system's own structures (read
here, each field checked: a crafted file system must not make us loop or allocate without bound);
:func:`changed_records` intersects them with the checkpoint's ranges and compares the records
there between the parent's and the child's view, so only records whose bytes differ are
examined. A file that was created, deleted, renamed or changed has a changed record (its times,
size, links or allocation change with it).

Names: an NTFS record names itself (each ``$FILE_NAME`` holds the parent's record number), so a
path is a walk up a few records (:class:`NtfsNames`). An ext inode does not: :class:`ExtNames`
lists the folders among the changed records (a name created, deleted or renamed changes its
folder's inode: its mtime), walks up through ``..``, and only for an inode none of those folders
names (a file changed in place: its folder did not change) falls back to a walk of the folder tree,
which lists every folder's names (never a file's data) and stops once every inode is named. FAT
and exFAT entries are named the same way (their folders' listings, then the walk).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..chains.disk import Disk
from .extsuper import INCOMPAT_META_BG, ExtUnreadable, Superblock, parse_superblock, power_of_two_within
from .fsext import folder_entries
from .fsfat import FIRST_ENTRY_ADDRESS, SLOT, changed_entries, fat_area
from .fsview import MAX_DEPTH, data_runs, read_bytes, tsk_module

MAX_GROUP_TABLE = 64 << 20      # bytes of ext group descriptors we read at most (2^20 groups of 64 B)
COMPARE_CHUNK = 4 << 20         # bytes of records compared at a time
NTFS_ROOT = 5
NTFS_FIRST_USER = 24            # records below are NTFS metafiles ($MFT, $LogFile, ...)
FNAME = 48                      # $FILE_NAME attribute type
DOS_NAMESPACE = 2               # an 8.3 alias beside the long name: not a second path


class Ranges:
    """Sorted, disjoint [start, end) byte ranges with fast intersection."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        spans = sorted(spans)
        self.starts = np.array([s for s, _ in spans], dtype=np.int64)
        self.ends = np.array([e for _, e in spans], dtype=np.int64)

    def overlaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) inside the ranges."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        j = int(np.searchsorted(self.starts, end, side="left"))
        return [(max(start, int(s)), min(end, int(e))) for s, e in zip(self.starts[i:j], self.ends[i:j])
                if min(end, int(e)) > max(start, int(s))]

    def total(self) -> int:
        """Bytes covered."""
        return int((self.ends - self.starts).sum())


@dataclass(frozen=True)
class Table:
    """Consecutive records on the disk: ``count`` records of ``size`` bytes from byte ``offset``,
    the first numbered ``first``."""

    offset: int
    count: int
    size: int
    first: int
    ignored: tuple[tuple[int, int], ...] = ()    # bytes of a record not compared: [start, end)


# An ext inode's access time (i_atime, i_atime_extra) and the checksum that follows it
# (i_checksum_lo, i_checksum_hi): a read changes them and nothing else.
EXT_ATIME = ((0x08, 0x0C), (0x7C, 0x7E), (0x82, 0x84), (0x8C, 0x90))


@dataclass
class Tables:
    """A file system's record tables: ``kind`` is "ext" or "ntfs"."""

    kind: str
    tables: list[Table] = field(default_factory=list)


def ext_layout(raw: bytes) -> Superblock | None:
    """The superblock's numbers (:func:`vhdx.ops.extsuper.parse_superblock`) when this module can
    map its inode tables: None when out of range, for meta_bg (descriptors spread over the groups)
    and when the group descriptor table would be over :data:`MAX_GROUP_TABLE`."""
    try:
        sb = parse_superblock(raw)
    except ExtUnreadable:
        return None
    if sb.incompat & INCOMPAT_META_BG or sb.groups_by_inodes * sb.descriptor_size > MAX_GROUP_TABLE:
        return None
    return sb


def ext_tables(disk: Disk, base: int, length: int) -> Tables | None:
    """The inode tables of the ext2/3/4 file system at ``base`` (``length`` bytes), from its
    superblock and group descriptors; None when a field is out of range (see :func:`ext_layout`)."""
    lay = ext_layout(read_bytes(disk, base + 1024, 1024))
    if lay is None:
        return None
    dsize, bs, groups = lay.descriptor_size, lay.block_size, lay.groups_by_inodes
    raw = read_bytes(disk, base + lay.descriptors_at * bs, groups * dsize)
    if len(raw) < groups * dsize:
        return None
    out = Tables("ext")
    for g in range(groups):
        block = lay.descriptor_block(raw[g * dsize:(g + 1) * dsize], 8, 0x28)
        if block == 0 or block * bs + lay.inodes_per_group * lay.inode_size > length:
            return None
        out.tables.append(Table(base + block * bs, lay.inodes_per_group, lay.inode_size,
                                g * lay.inodes_per_group + 1, EXT_ATIME))
    return out


def ntfs_tables(fs: Any, disk: Disk, base: int) -> Tables | None:
    """The $MFT of the NTFS file system ``fs`` at ``base``: its data runs (from record 0, read
    by The Sleuth Kit) cut into records of the size the boot sector gives."""
    boot = read_bytes(disk, base, 512)
    if len(boot) < 512 or boot[3:11] != b"NTFS    ":
        return None
    bps, spc = struct.unpack_from("<HB", boot, 0x0B)
    if spc > 0x80:
        spc = 1 << (256 - spc)
    raw = struct.unpack_from("<b", boot, 0x40)[0]
    rsize = 1 << -raw if raw < 0 else raw * bps * spc
    if not power_of_two_within(rsize, 256, 1 << 16):
        return None
    tsk = tsk_module()
    try:
        runs, resident = data_runs(tsk, fs.open_meta(inode=0), base, fs.info.block_size)
    except OSError:
        return None
    out = Tables("ntfs")
    for file_off, disk_off, length in runs:
        if resident or file_off % rsize or length % rsize:
            return None                         # a record split across runs: not mapped here
        out.tables.append(Table(disk_off, length // rsize, rsize, file_off // rsize))
    return out if out.tables else None


def record_tables(fs_type: str, fs: Any, disk: Disk, base: int, length: int) -> Tables | None:
    """The record tables of the file system (``fs_type`` as :func:`.fsview.fs_type_name` says),
    or None where we have none (others: the caller walks the folder tree). FAT and exFAT: the
    area of their directory entries (see :mod:`.fsfat`)."""
    if fs_type.startswith("ext"):
        return ext_tables(disk, base, length)
    if fs_type.startswith("ntfs"):
        return ntfs_tables(fs, disk, base)
    if fs_type.startswith("fat") or fs_type == "exfat":
        area = fat_area(disk, base, length, fs_type == "exfat")
        if area is None:
            return None
        return Tables(fs_type if fs_type == "exfat" else "fat",
                      [Table(area[0], (area[1] - area[0]) // SLOT, SLOT, FIRST_ENTRY_ADDRESS)])
    return None


def records_meeting(table: Table, changed: Ranges) -> Iterator[tuple[int, int]]:
    """(first index, end index) of the table's records that meet the changed ranges."""
    end = table.offset + table.count * table.size
    for s, e in changed.overlaps(table.offset, end):
        yield (s - table.offset) // table.size, (e - 1 - table.offset) // table.size + 1


def changed_records(tables: list[Tables], changed: Ranges, old: Disk, new: Disk,
                    folders: list[tuple[int, int]] | None = None) -> set[int]:
    """Numbers of the records in changed sectors whose bytes differ between the two views
    (``tables`` from either view: a table that moved or grew is looked at in both). On FAT and
    exFAT the changed folder sectors are added to ``folders``."""
    out: set[int] = set()
    seen: set[Table] = set()
    for ts, t in ((ts, t) for ts in tables for t in ts.tables):
        if t in seen:
            continue
        seen.add(t)
        if ts.kind in ("fat", "exfat"):     # entries inside folder clusters: only folder sectors count
            spans = changed.overlaps(t.offset, t.offset + t.count * t.size)
            out |= changed_entries(t.offset, spans, old, new, ts.kind == "exfat", folders if folders is not None else [])
            continue
        for first, end in records_meeting(t, changed):
            step = max(1, COMPARE_CHUNK // t.size)
            for at in range(first, end, step):
                n = min(step, end - at)
                a = read_bytes(old, t.offset + at * t.size, n * t.size)
                b = read_bytes(new, t.offset + at * t.size, n * t.size)
                if len(a) != n * t.size or len(b) != n * t.size:
                    continue
                differ = np.frombuffer(a, np.uint8).reshape(n, t.size) != np.frombuffer(b, np.uint8).reshape(n, t.size)
                for lo, hi in t.ignored:
                    differ[:, lo:hi] = False
                out.update((t.first + at + np.flatnonzero(differ.any(axis=1))).tolist())
    return out


# --------------------------------------------------------------------------- one view of a file system

class View:
    """One file system in one view (the parent's or the child's), read through TSK, with counts
    of the records opened and the folder entries listed (what the cost follows)."""

    def __init__(self, fs: Any, base: int, disk: Disk | None = None) -> None:
        self.fs = fs
        self.base = base
        self.disk = disk            # given for ext: folders are read from their blocks (.fsext)
        self.tsk = tsk_module()
        self.root = int(fs.info.root_inum)
        self.records = 0
        self.names = 0
        self._files: dict[int, Any] = {}
        self._lists: dict[int, list[tuple[str, int, bool | None]]] = {}

    def file(self, inode: int) -> Any | None:
        """The TSK file of an allocated record, or None."""
        if inode not in self._files:
            self.records += 1
            try:
                f = self.fs.open_meta(inode=inode)
            except OSError:
                f = None
            meta = f.info.meta if f is not None else None
            if meta is None or not meta.flags & self.tsk.TSK_FS_META_FLAG_ALLOC:
                f = None
            self._files[inode] = f
        return self._files[inode]

    def is_dir(self, inode: int) -> bool:
        """The record is an allocated folder."""
        f = self.file(inode)
        return f is not None and f.info.meta.type == self.tsk.TSK_FS_META_TYPE_DIR

    def forget(self, inode: int) -> None:
        """Drop a folder's cached listing."""
        self._lists.pop(inode, None)

    def listing(self, inode: int) -> list[tuple[str, int, bool | None]]:
        """(name, inode, is a folder: None when the entry does not say) of the folder's
        allocated names, '.' and '..' included."""
        if inode not in self._lists:
            f = self.file(inode) if self.disk is not None else None
            raw = folder_entries(self.tsk, f, self.disk, self.base, self.fs.info.block_size) \
                if f is not None and self.disk is not None else None
            self.names += len(raw or ())
            self._lists[inode] = raw if raw is not None else self._tsk_listing(inode)
        return self._lists[inode]

    def _tsk_listing(self, inode: int) -> list[tuple[str, int, bool | None]]:
        out: list[tuple[str, int, bool | None]] = []
        try:
            for f in self.fs.open_dir(inode=inode):
                name = f.info.name
                self.names += 1
                if name.flags & self.tsk.TSK_FS_NAME_FLAG_UNALLOC:
                    continue
                kind = None if name.type == self.tsk.TSK_FS_NAME_TYPE_UNDEF else \
                    name.type == self.tsk.TSK_FS_NAME_TYPE_DIR
                out.append((name.name.decode("utf-8", "surrogateescape"), int(name.meta_addr), kind))
        except OSError:
            pass
        return out


def resolve_up(inode: int, cache: dict[int, str | None], step: Any) -> str | None:
    """A folder's path from ``cache`` (which holds the root as ''), going up with ``step(d)`` ->
    (parent, name) or None until a cached folder; every folder on the way is cached. Bounded by
    ``MAX_DEPTH``; a loop or an unnamed folder gives None."""
    chain: list[tuple[int, int, str]] = []
    at = inode
    seen: set[int] = set()
    while at not in cache:
        up = step(at) if len(chain) < MAX_DEPTH and at not in seen else None
        if up is None:
            cache[at] = None
            break
        seen.add(at)
        chain.append((at, up[0], up[1]))
        at = up[0]
    for d, parent, name in reversed(chain):
        above = cache.get(parent)
        cache[d] = None if above is None else f"{above}/{name}"
    return cache.get(inode)


class ExtNames:
    """Paths of inodes in one view of an ext2/3/4 file system (see the module's docstring)."""

    def __init__(self, view: View) -> None:
        self.view = view
        self.walked = False
        self._dir_paths: dict[int, str | None] = {view.root: ""}

    def _up(self, folder: int) -> tuple[int, str] | None:
        parent = next((i for n, i, _ in self.view.listing(folder) if n == ".."), None)
        if parent is None or parent == folder:
            return None
        name = next((n for n, i, _ in self.view.listing(parent) if i == folder and n not in (".", "..")), None)
        return None if name is None else (parent, name)

    def dir_path(self, inode: int) -> str | None:
        """The folder's path ('' for the root), up through '..' (None if it cannot be named)."""
        return resolve_up(inode, self._dir_paths, self._up)

    def paths(self, inodes: set[int], folders: set[int]) -> dict[int, list[str]]:
        """Every path of each inode in ``inodes``: from the listings of ``folders`` (the changed
        folders) first, then a walk of the folder tree for the inodes still unnamed."""
        out: dict[int, list[str]] = {}
        for d in sorted(folders):
            self._name_from(d, inodes, out)
        for i in inodes - set(out):
            if self.view.is_dir(i):
                p = self.dir_path(i)
                if p:
                    out[i] = [p]
        missing = inodes - set(out)
        if missing:
            self._walk(missing, out)
        return out

    def _name_from(self, folder: int, inodes: set[int], out: dict[int, list[str]]) -> None:
        if not self.view.is_dir(folder):
            return
        path = self.dir_path(folder)
        if path is None:
            return
        for name, inode, _ in self.view.listing(folder):
            if inode in inodes and name not in (".", ".."):
                full = f"{path}/{name}"
                if full not in out.setdefault(inode, []):
                    out[inode].append(full)

    def _walk(self, missing: set[int], out: dict[int, list[str]]) -> None:
        """Breadth-first over folders only, until every inode in ``missing`` is named."""
        self.walked = True
        left = set(missing)
        queue: list[tuple[int, str, int]] = [(self.view.root, "", 0)]
        seen = {self.view.root}
        while queue and left:
            folder, path, depth = queue.pop(0)
            for name, inode, is_dir in self.view.listing(folder):
                if name in (".", ".."):
                    continue
                if inode in left:
                    out.setdefault(inode, []).append(f"{path}/{name}")
                    left.discard(inode)
                if (is_dir or (is_dir is None and self.view.is_dir(inode))) and inode not in seen \
                        and depth < MAX_DEPTH:
                    seen.add(inode)
                    queue.append((inode, f"{path}/{name}", depth + 1))
            if folder != self.view.root:
                self.view.forget(folder)   # memory stays bounded: a walked folder is not listed again


class NtfsNames:
    """Paths of NTFS records in one view, from each record's $FILE_NAME parent references."""

    def __init__(self, view: View) -> None:
        self.view = view
        self._dir_paths: dict[int, str | None] = {view.root: ""}
        self._names: dict[int, list[tuple[int, int, str]]] = {}

    def names(self, inode: int) -> list[tuple[int, int, str]]:
        """(parent record, parent sequence, name) of the record's $FILE_NAMEs, 8.3 aliases aside."""
        if inode not in self._names:
            out: list[tuple[int, int, str]] = []
            f = self.view.file(inode)
            for attr in f if f is not None else ():
                if attr.info.type != FNAME or attr.info.size < 0x42 or attr.info.size > 0x242:
                    continue
                try:
                    raw = f.read_random(0, attr.info.size, attr.info.type, attr.info.id)
                except OSError:
                    continue
                if len(raw) < 0x42 or raw[0x41] == DOS_NAMESPACE or len(raw) < 0x42 + 2 * raw[0x40]:
                    continue
                ref = struct.unpack_from("<Q", raw, 0)[0]
                name = raw[0x42:0x42 + 2 * raw[0x40]].decode("utf-16-le", "surrogatepass")
                out.append((ref & 0xFFFFFFFFFFFF, ref >> 48, name.encode("utf-8", "surrogatepass")
                            .decode("utf-8", "surrogateescape")))
            self._names[inode] = out
        return self._names[inode]

    def _up(self, folder: int) -> tuple[int, str] | None:
        names = self.names(folder)
        return (names[0][0], names[0][2]) if names and names[0][0] != folder else None

    def dir_path(self, inode: int) -> str | None:
        """The folder's path ('' for the root), up through its $FILE_NAME parents."""
        return resolve_up(inode, self._dir_paths, self._up)

    def paths(self, inodes: set[int], folders: set[int]) -> dict[int, list[str]]:
        """Every path of each record in ``inodes`` (hard links: one path per name)."""
        del folders
        out: dict[int, list[str]] = {}
        for i in sorted(inodes):
            for parent, _, name in self.names(i):
                above = self.dir_path(parent)
                if above is not None and f"{above}/{name}" not in out.get(i, []):
                    out.setdefault(i, []).append(f"{above}/{name}")
        return out
