"""``vhdx diff --files``: the files a checkpoint created, changed or deleted.

The checkpoint's own ranges (:func:`.maps.changed_ranges`, from its BAT and sector bitmaps)
bound the work: a partition that none of them touches is not opened. In the others the file
system is listed in the parent's view and in the child's (:func:`.fsview.walk`: names,
metadata and data runs, read by The Sleuth Kit in C), and paths are matched:

* a path only in the child is ``created``, only in the parent ``deleted``;
* a path in both is ``changed`` when its metadata differs (inode, type, size, mode, owner,
  mtime, ctime, crtime: atime aside, since a read changes it), or when its bytes differ where its
  data runs (in either view) meet the checkpoint's ranges. Only those bytes are read and
  compared, so the cost of the content comparison follows the size of the change, not of the
  disk; resident (NTFS) or inline (ext4) data, a few hundred bytes, is compared whole.

Folders are reported when created or deleted; a folder whose listing changed shows as the
names created and deleted in it. Names that are not guest files (TSK's $OrphanFiles, NTFS
metafiles and TSK's $MBR/$FAT at the root) are left out unless ``system`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..chains.disk import Disk
from ..errors import UsageError
from .fsfat import uncovered
from .fsmeta import NTFS_FIRST_USER, ExtNames, NtfsNames, Ranges, View, changed_records, record_tables
from .fsview import (Entry, Volume, data_runs, disk_image, fs_type_name, hidden, make_entry, open_fs, pieces,
                     read_file, tsk_module, volumes, walk)
from .maps import changed_ranges

CREATED, CHANGED, DELETED = "created", "changed", "deleted"
COMPARE_PIECE = 1 << 20
GRAIN = 512   # changed byte ranges of a file are reported in 512-byte granules


@dataclass
class FileChange:
    """One file the checkpoint created, changed or deleted."""

    change: str
    path: str
    volume: int
    fs_type: str
    before: Entry | None
    after: Entry | None
    what: list[str] = field(default_factory=list)           # changed fields, "content" among them
    ranges: list[tuple[int, int]] = field(default_factory=list)   # changed bytes of the file (offset, length)

    def to_dict(self) -> dict[str, Any]:
        """The change as JSON values."""
        def side(e: Entry | None) -> dict[str, Any] | None:
            if e is None:
                return None
            return dict(inode=e.inode, type=e.kind, size=e.size, mode=e.mode, uid=e.uid, gid=e.gid,
                        times={k: iso_time(v) for k, v in e.times.items()})
        now = self.after or self.before
        assert now is not None
        return dict(path=self.path, change=self.change, volume=self.volume, fs_type=self.fs_type, inode=now.inode,
                    type=now.kind, size=now.size, what=self.what, before=side(self.before), after=side(self.after),
                    changed_ranges=[dict(offset=o, length=n) for o, n in self.ranges])


@dataclass
class FileDiff:
    """What :func:`file_changes` found: the volumes looked at and the files changed in them."""

    child: str
    parent: str | None
    changed_bytes: int
    volumes: list[dict[str, Any]] = field(default_factory=list)
    changes: list[FileChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The diff as JSON values."""
        return dict(child=self.child, parent=self.parent, changed_bytes=self.changed_bytes, volumes=self.volumes,
                    files=[c.to_dict() for c in self.changes])


def iso_time(ns: int) -> str | None:
    """Nanoseconds since 1970 as ISO 8601 UTC with nanoseconds (None for 0, a time not kept)."""
    if not ns:
        return None
    seconds, frac = divmod(ns, 1_000_000_000)
    try:
        stamp = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ns)
    return f"{stamp}.{frac:09d}Z"


def _differing(a: bytes, b: bytes, at: int) -> list[tuple[int, int]]:
    """(offset, length) granules where ``a`` and ``b`` differ (lengths may differ: the tail differs)."""
    n = max(len(a), len(b))
    pad = -n % GRAIN
    x = np.zeros(n + pad, dtype=np.uint8)
    y = np.zeros(n + pad, dtype=np.uint8)
    x[:len(a)] = np.frombuffer(a, dtype=np.uint8)
    y[:len(b)] = np.frombuffer(b, dtype=np.uint8)
    bad = (x.reshape(-1, GRAIN) != y.reshape(-1, GRAIN)).any(axis=1)
    if len(a) != len(b):
        bad[min(len(a), len(b)) // GRAIN:] = True
    out: list[tuple[int, int]] = []
    for g in np.flatnonzero(bad).tolist():
        start, length = at + g * GRAIN, min(GRAIN, n - g * GRAIN)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def _touched(e: Entry, changed: Ranges) -> list[tuple[int, int]]:
    """File offsets [start, end) of ``e`` whose data lies in the changed ranges."""
    out = []
    for file_off, disk_off, length in e.runs:
        for s, t in changed.overlaps(disk_off, disk_off + length):
            out.append((file_off + s - disk_off, file_off + t - disk_off))
    if e.resident:
        out.append((0, e.size))
    return out


def content_ranges(old_fs: Any, new_fs: Any, before: Entry, after: Entry, changed: Ranges) -> list[tuple[int, int]]:
    """(offset, length) of the file's bytes that differ, reading only where the checkpoint wrote."""
    spans = _merge(_touched(before, changed) + _touched(after, changed))
    common = min(before.size, after.size)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        for at, n in pieces(s, min(e, common), COMPARE_PIECE):
            out += _differing(read_file(old_fs, before.inode, at, n), read_file(new_fs, after.inode, at, n), at)
    if before.size != after.size:
        out.append((common, max(before.size, after.size) - common))
    return [(s, e - s) for s, e in _merge([(o, o + n) for o, n in out])]


def compare(old: dict[str, Entry], new: dict[str, Entry], old_fs: Any, new_fs: Any, changed: Ranges,
            volume: int, fs_type: str) -> list[FileChange]:
    """The changes between two listings of one file system."""
    out = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a is None and b is not None:
            out.append(FileChange(CREATED, path, volume, fs_type, None, b, ranges=[(0, b.size)] if b.size else []))
        elif b is None and a is not None:
            out.append(FileChange(DELETED, path, volume, fs_type, a, None))
        elif a is not None and b is not None:
            found = _changed(a, b, old_fs, new_fs, changed)
            if found is not None:
                out.append(FileChange(CHANGED, path, volume, fs_type, a, b, *found))
    return out


def _changed(a: Entry, b: Entry, old_fs: Any, new_fs: Any,
             changed: Ranges) -> tuple[list[str], list[tuple[int, int]]] | None:
    """(what changed, changed byte ranges) of a path in both views, or None when it did not change."""
    fa, fb = a.stat_fields(), b.stat_fields()
    what = [k for k in fa if fa[k] != fb[k]]
    ranges: list[tuple[int, int]] = []
    if a.kind == b.kind == "file":
        ranges = content_ranges(old_fs, new_fs, a, b, changed)
        if any(o < min(a.size, b.size) for o, _ in ranges):
            what.append("content")
    if b.kind == "dir" and "inode" not in what and "kind" not in what:
        return None   # a folder's listing shows as its entries
    return (what, ranges) if what else None


def file_changes(disk: Disk, *, system: bool = False) -> FileDiff:
    """The files the checkpoint ``disk`` (a differencing disk, opened with its parent) created,
    changed or deleted, in every partition its own ranges touch."""
    tsk_module()   # say how to install it before any work
    if disk.parent is None:
        raise UsageError("diff --files compares a checkpoint with its parent; this disk has none", path=disk.path)
    changed = Ranges([(r.start, r.end) for r in changed_ranges(disk.image)])
    result = FileDiff(disk.path, disk.parent.path, changed.total())
    old_img, new_img = disk_image(disk.parent), disk_image(disk)
    vols = volumes(new_img, disk.size)
    for vol in vols:
        if not changed.overlaps(vol.offset, vol.offset + vol.length):
            result.volumes.append(dict(vol.to_dict(), fs_type=None, note="not touched by the checkpoint"))
            continue
        views = Views(disk.parent, disk, old_img, new_img, changed, system)
        result.volumes.append(_diff_volume(vol, views, result.changes))
    return result


@dataclass
class Views:
    """The two views of a disk (the parent's and the checkpoint's) and what the diff needs of them."""

    old_disk: Disk
    new_disk: Disk
    old_img: Any
    new_img: Any
    changed: Ranges
    system: bool


def _entries_of_volume(vol: Volume, v: Views, old_fs: Any, new_fs: Any,
                       fs_type: str) -> tuple[dict[str, Entry], dict[str, Entry], dict[str, Any]]:
    """Both views' entries to compare, by path: from the changed metadata records where the file
    system has tables we map (:func:`by_records`), else from a walk of every name."""
    both = old_fs is not None and new_fs is not None
    tables = [t for t in (record_tables(fs_type, fs, d, vol.offset, vol.length)
                          for fs, d in ((old_fs, v.old_disk), (new_fs, v.new_disk)) if fs is not None) if t]
    found = by_records(tables, old_fs, new_fs, vol.offset, v) if both and tables else None
    if found is not None:
        return found
    old = walk(old_fs, vol.offset, system=v.system) if old_fs is not None else {}
    new = walk(new_fs, vol.offset, system=v.system) if new_fs is not None else {}
    cost: dict[str, Any] = dict(method="walk", files_before=len(old), files_after=len(new))
    if both and tables:
        cost["why"] = "data rewritten in place with its directory entry unchanged"
    return old, new, cost


def _diff_volume(vol: Volume, v: Views, changes: list[FileChange]) -> dict[str, Any]:
    old_fs, new_fs = open_fs(v.old_img, vol.offset), open_fs(v.new_img, vol.offset)
    info = vol.to_dict()
    if new_fs is None and old_fs is None:
        return dict(info, fs_type=None, note="no file system recognised in either view")
    fs_type = fs_type_name(new_fs if new_fs is not None else old_fs)
    old, new, cost = _entries_of_volume(vol, v, old_fs, new_fs, fs_type)
    found = compare(old, new, old_fs, new_fs, v.changed, vol.index, fs_type)
    changes.extend(found)
    note = "" if old_fs is not None and new_fs is not None else \
        ("no file system in the parent's view" if old_fs is None else "no file system in the checkpoint's view")
    return dict(info, fs_type=fs_type, **cost, changes=len(found), **({"note": note} if note else {}))


def _changed_entries(records: set[int], views: tuple[View, View],
                     base: int) -> tuple[list[dict[int, Entry]], list[set[int]]]:
    """Per view: the entries of the changed records (by record; an access time alone was not
    counted as a change, :data:`.fsmeta.EXT_ATIME`), and the changed records that are folders."""
    tsk = tsk_module()
    entries: list[dict[int, Entry]] = [{}, {}]
    folders: list[set[int]] = [set(), set()]
    for r in sorted(records):
        pair: list[Entry | None] = []
        for k, view in enumerate(views):
            f = view.file(r)
            pair.append(make_entry(tsk, f, "", base, view.fs.info.block_size) if f is not None else None)
            if f is not None and pair[-1].kind == "dir":   # type: ignore[union-attr]
                folders[k].add(r)
        if r != views[0].root:      # a changed record may be a renamed file with its times kept
            for k in (0, 1):
                if pair[k] is not None:
                    entries[k][r] = pair[k]   # type: ignore[assignment]
    return entries, folders


def _named(namer: Any, entries: dict[int, Entry], folders: set[int], system: bool) -> dict[str, Entry]:
    """The entries by path (a record with several names under each), guest files only."""
    out: dict[str, Entry] = {}
    for r, paths in namer.paths(set(entries), folders).items():
        for p in paths:
            if not hidden(p[1:], p.count("/") == 1, system):
                out[p] = replace(entries[r], path=p)
    return out


def _unexplained(area: Any, records: set[int], views: tuple[View, View], folders: list[tuple[int, int]],
                 changed: Ranges) -> int:
    """FAT/exFAT: bytes the checkpoint changed in the data area that neither a changed folder
    sector nor the data of a changed entry (either view) nor exFAT's bitmap and up-case table
    holds: data rewritten in place with its entry unchanged (times kept in 2-second steps)."""
    tsk = tsk_module()
    cover = list(folders)
    for view in views:
        block = view.fs.info.block_size
        files = [view.file(r) for r in sorted(records)]
        for name in ("/$ALLOC_BITMAP", "/$UPCASE_TABLE"):
            try:
                files.append(view.fs.open(name))
            except OSError:
                pass
        for f in files:
            if f is not None:
                cover += [(d, d + n) for _, d, n in data_runs(tsk, f, view.base, block)[0]]
    spans = changed.overlaps(area.offset, area.offset + area.count * area.size)
    return uncovered(spans, cover)


def _views(kind: str, old_fs: Any, new_fs: Any, base: int, v: Views) -> tuple[View, View]:
    """Both views of the file system; ext folders are read from their blocks (names only, no
    inode per entry: :mod:`.fsext`)."""
    if kind == "ext":
        return View(old_fs, base, v.old_disk), View(new_fs, base, v.new_disk)
    return View(old_fs, base), View(new_fs, base)


def by_records(tables: list[Any], old_fs: Any, new_fs: Any, base: int,
               v: Views) -> tuple[dict[str, Entry], dict[str, Entry], dict[str, Any]] | None:
    """The two views' entries of the files whose metadata records the checkpoint changed (see
    :mod:`.fsmeta`), by path, and what it cost (records opened, folder entries listed); None
    when the records do not explain the change (FAT/exFAT: then the caller walks)."""
    tsk = tsk_module()
    kind = tables[0].kind
    folder_sectors: list[tuple[int, int]] = []
    records = changed_records(tables, v.changed, v.old_disk, v.new_disk, folder_sectors)
    if kind == "ntfs" and not v.system:
        records = {r for r in records if r >= NTFS_FIRST_USER}
    views = _views(kind, old_fs, new_fs, base, v)
    if kind in ("fat", "exfat") and _unexplained(tables[0].tables[0], records, views, folder_sectors, v.changed):
        return None
    entries, folders = _changed_entries(records, views, base)
    namers = [(NtfsNames if kind == "ntfs" else ExtNames)(view) for view in views]
    maps = [_named(namers[k], entries[k], folders[k], v.system) for k in (0, 1)]
    for k in (0, 1):      # a path seen in one view only: is it there in the other?
        found = {p: _lookup(tsk, views[k], p) for p in set(maps[1 - k]) - set(maps[k])}
        maps[k].update({p: e for p, e in found.items() if e is not None})
    cost = dict(method="records", records_changed=len(records),
                records_examined=sum(w.records for w in views), names_listed=sum(w.names for w in views),
                folder_walk=any(getattr(n, "walked", False) for n in namers))
    return maps[0], maps[1], cost


def _lookup(tsk: Any, view: View, path: str) -> Entry | None:
    """The entry at ``path`` in ``view`` (TSK resolves it folder by folder), or None."""
    view.records += 1
    try:
        f = view.fs.open(path.encode("utf-8", "surrogateescape").decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    meta = f.info.meta
    if meta is None or not meta.flags & tsk.TSK_FS_META_FLAG_ALLOC:
        return None
    return make_entry(tsk, f, path, view.base, view.fs.info.block_size)
