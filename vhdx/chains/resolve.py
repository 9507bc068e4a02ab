"""Differencing chains: parent resolution, linkage checks, snapshots, reparenting, orphans.

Resolution tries, in the specification's order, the relative path, the volume path and
the absolute Win32 path (each mapped to this machine), then scans the search paths for a
file whose DataWriteGuid equals the child's ``parent_linkage`` (vhdx-format.md §9.3).
Every path tried is recorded, so a missing parent can be reported in full. Parents are
always opened read-only: opening a parent for writing would rotate its GUIDs and orphan
every child it has (§2.3). Only regular files are opened while resolving or scanning (a
FIFO would block the open for ever); a scan reads each file's headers once per command
(:class:`ScanCache`), and every walk along a chain is a loop bounded by ``MAX_DEPTH``.
"""

from __future__ import annotations

import errno
import ntpath
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from .disk import Disk
from ..errors import (ChainCycleError, ChainError, LockedError, ParentMismatchError, ParentNotFoundError,
                     UsageError, VhdxError)
from ..format import constants as C
from ..format.locator import KEY_ORDER, build_parent_locator, format_linkage, parse_linkage
from ..file.image import Image, create_image
from ..file.storage import FileStorage, Storage, not_regular_reason

MAX_DEPTH = 1024  # layers of one chain; deeper is refused (a loop of files, or a crafted chain)
VHDX_SUFFIXES = (".vhdx", ".avhdx")
_CHECKPOINT_NAME = re.compile(r"^(?P<stem>.+)_[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                              r"[0-9A-Fa-f]{12}\.avhdx$")
# Wine maps drive Z: to "/"; we write and read absolute paths of this machine that way.
POSIX_DRIVE = "Z:"


# --------------------------------------------------------------------------- paths

def win_relative_path(parent: str, child_dir: str) -> str:
    rel = os.path.relpath(parent, child_dir).replace(os.sep, "\\")
    return rel if rel.startswith("..") else ".\\" + rel


def win_absolute_path(path: str) -> str:
    """This machine's absolute path as a Win32 path: ``/a/b`` -> ``Z:\\a\\b`` (Wine's mapping)."""
    return POSIX_DRIVE + os.path.abspath(path).replace(os.sep, "\\")


def volume_guid(path: str) -> uuid.UUID:
    """A stable stand-in for the Windows volume GUID of the file system holding ``path``."""
    st = os.stat(os.path.dirname(os.path.abspath(path)) or ".")
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vhdx-volume:{st.st_dev}")


def win_volume_path(path: str) -> str:
    return f"\\\\?\\Volume{{{volume_guid(path)}}}" + os.path.abspath(path).replace(os.sep, "\\")


def _case_insensitive(path: str) -> str | None:
    """``path`` itself if it exists, else the one entry of its folder that matches it ignoring case."""
    if os.path.exists(path):
        return path
    folder, name = os.path.split(path)
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return None
    lower = name.lower()
    for entry in entries:
        if entry.lower() == lower:
            return os.path.join(folder, entry)
    return None


def candidate_paths(locator: dict[str, str], child_path: str, search_paths: Sequence[str]) -> list[tuple[str, str]]:
    """(how, local path) pairs to try, in order, for a child's parent locator."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    out: list[tuple[str, str]] = []

    def by_name(key: str, win_path: str) -> None:
        name = ntpath.basename(win_path)
        if not name:
            return
        out.append((f"{key} (file name beside the child)", os.path.join(child_dir, name)))
        for d in search_paths:
            out.append((f"{key} (file name in {d})", os.path.join(d, name)))

    rel = locator.get("relative_path")
    if rel:
        parts = [p for p in rel.replace("/", "\\").split("\\") if p not in ("", ".")]
        out.append(("relative_path", os.path.normpath(os.path.join(child_dir, *parts))))
    vol = locator.get("volume_path")
    if vol:
        m = re.match(r"^\\\\\?\\Volume\{[^}]*\}(\\.*)$", vol)
        if m:
            out.append(("volume_path", m.group(1).replace("\\", "/")))
        by_name("volume_path", vol)
    ab = locator.get("absolute_win32_path")
    if ab:
        p = ab[4:] if ab.startswith("\\\\?\\") else ab
        m = re.match(r"^([A-Za-z]):\\(.*)$", p)
        if m:
            drive, rest = m.group(1).upper(), m.group(2).replace("\\", "/")
            if drive + ":" == POSIX_DRIVE:
                out.append(("absolute_win32_path", "/" + rest))
            out.append(("absolute_win32_path (WSL mount)", f"/mnt/{drive.lower()}/{rest}"))
        by_name("absolute_win32_path", ab)
    seen: set[str] = set()
    unique = []
    for how, path in out:
        if path not in seen:
            seen.add(path)
            unique.append((how, path))
    return unique


def _file_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


# --------------------------------------------------------------------------- scanning

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
    l1, l2 = _linkage_of(image) if image.has_parent else (None, None)
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


# --------------------------------------------------------------------------- layers

@dataclass
class Layer:
    """One file of a chain, leaf first."""

    path: str
    disk_type: str = "unknown"
    data_write_guid: str | None = None
    parent_linkage: str | None = None
    parent_linkage2: str | None = None
    found_by: str = "given"
    linkage: str = "ok"  # of this layer to its parent: ok, mismatch, missing, none (base), cycle
    virtual_size: int | None = None
    interrupted_merge: bool = False
    tried: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _linkage_of(image: Image) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    loc = image.metadata.parent_locator or {}
    l1 = parse_linkage(loc.get("parent_linkage"))
    l2 = parse_linkage(loc.get("parent_linkage2"))
    if l2 == C.ZERO_GUID:
        l2 = None
    return l1, l2


def _layer_for(image: Image, found_by: str) -> Layer:
    l1, l2 = _linkage_of(image) if image.has_parent else (None, None)
    return Layer(path=image.path, disk_type=image.disk_type, data_write_guid=str(image.header.data_write_guid),
                 parent_linkage=str(l1) if l1 else None, parent_linkage2=str(l2) if l2 else None,
                 found_by=found_by, linkage="none" if not image.has_parent else "ok",
                 virtual_size=image.size, interrupted_merge=merge_in_progress(image))


def merge_in_progress(image: Image) -> bool:
    """Whether an interrupted merge left its journal in this file's metadata."""
    import json
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    if raw is None:
        return False
    try:
        return json.loads(raw.decode()).get("state") != "done"
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return True


MERGE_JOURNAL_GUID = uuid.UUID("5b1f2a4e-9c0d-4d7e-8a53-7d6c3e9b1a01")  # our user item (vhdx.merge)


class _Resolver:
    """Finds and opens the parents of one image, strictly (open) or leniently (describe).

    Only regular files are opened (a file the user names with ``parents`` may also be a block
    device). ``cache`` holds the header peeks of the command; by default the resolver has its own.
    """

    def __init__(self, *, search_paths: Iterable[str | os.PathLike[str]] = (),
                 parents: Sequence[str | os.PathLike[str]] | None = None, ignore_id_mismatch: bool = False,
                 missing_parent: str = "error", strict: bool = True, cache: ScanCache | None = None,
                 share: bool = False) -> None:
        if missing_parent not in ("error", "zeros"):
            raise UsageError(f"missing_parent={missing_parent!r}: 'error' or 'zeros'")
        self.search_paths = [os.fspath(p) for p in search_paths]
        self.parents = [os.fspath(p) for p in parents] if parents else []
        self.ignore = ignore_id_mismatch
        self.missing = missing_parent
        self.strict = strict
        self.share = share  # parents are read without locks (--force-share)
        self.cache = cache if cache is not None else ScanCache(share=share)

    def resolve(self, leaf: Image) -> tuple[list[Image], list[Layer], bool]:
        """Images leaf..base (the leaf included), their layers, and whether the base reads zeros."""
        images = [leaf]
        layers = [_layer_for(leaf, "given")]
        seen = {_file_key(leaf.path)} if os.path.exists(leaf.path) else set()
        zeros = False
        try:
            while images[-1].has_parent:
                child = images[-1]
                if len(images) >= MAX_DEPTH:
                    raise ChainCycleError(f"the chain is deeper than {MAX_DEPTH} layers", path=leaf.path)
                parent, how, state, tried = self._find_parent(child, len(images) - 1, seen)
                layers[-1].linkage = state
                layers[-1].tried = tried
                if parent is None:
                    zeros = state == "missing" and self.missing == "zeros"
                    break
                seen.add(_file_key(parent.path))
                images.append(parent)
                layer = _layer_for(parent, how)
                layers.append(layer)
                if parent.logical_sector_size != child.logical_sector_size:
                    msg = (f"parent {parent.path} has {parent.logical_sector_size}-byte sectors, the child "
                           f"{child.logical_sector_size}")
                    if self.strict:
                        raise ChainError(msg, path=child.path)
                    layers[-2].note = msg
                elif parent.size != child.size:
                    layers[-2].note = f"virtual size {child.size} differs from the parent's {parent.size}"
        except BaseException:
            for im in images[1:]:
                im.close()
            raise
        return images, layers, zeros

    def _find_parent(self, child: Image, depth: int, seen: set[tuple[int, int]]
                     ) -> tuple[Image | None, str, str, list[str]]:
        l1, l2 = _linkage_of(child)
        if l1 is None:
            raise ChainError("the parent locator has no valid parent_linkage", path=child.path)
        accept = {g for g in (l1, l2) if g is not None}
        tried: list[str] = []
        mismatches: list[tuple[str, str, uuid.UUID, bool]] = []
        cycle: list[str] = []

        def consider(how: str, path: str) -> Image | None:
            local = _case_insensitive(path)
            tried.append(f"{how}: {path}")
            if local is None:
                return None
            allow_block = how == "given"  # a file the user names may be a block device
            problem = regular_file_problem(local, allow_block=allow_block)
            if problem is not None:
                tried[-1] += f" ({problem})"
                return None
            if _file_key(local) in seen:
                if self.strict:
                    raise ChainCycleError(f"the chain refers back to {local}", path=child.path)
                tried[-1] += " (already in the chain: a cycle)"
                cycle.append(local)
                return None
            image = self.cache.open(local, allow_block=allow_block)
            if isinstance(image, str):
                tried[-1] += f" ({image})"
                return None
            if image.header.data_write_guid in accept:
                return image
            tried[-1] += f" (DataWriteGuid {image.header.data_write_guid})"
            mismatches.append((how, local, image.header.data_write_guid, allow_block))
            image.close()
            return None

        if depth < len(self.parents):
            given = self.parents[depth]
            image = consider("given", given)
            if image is not None:
                return image, "given", "ok", tried
            if not mismatches:
                raise ParentNotFoundError(f"the given parent {given} cannot be opened", path=child.path,
                                          tried=tried)
        else:
            for how, path in candidate_paths(child.metadata.parent_locator or {}, child.path, self.search_paths):
                image = consider(how, path)
                if image is not None:
                    return image, how, "ok", tried
            for d in self.search_paths + [os.path.dirname(os.path.abspath(child.path))]:
                try:
                    by_guid, skipped = self.cache.scan(d)
                except OSError:
                    tried.append(f"search {d}: not a readable folder")
                    continue
                tried.append(f"DataWriteGuid scan of {d}")
                tried += [f"  skipped {p}: {why}" for p, why in skipped]
                skip = {m[1] for m in mismatches} | {os.path.abspath(child.path)}
                for p in sorted(p for g in accept for p in by_guid.get(g, ())):
                    if p in skip or os.path.abspath(p) in skip:
                        continue
                    image = consider(f"DataWriteGuid scan of {d}", p)
                    if image is not None:
                        return image, f"DataWriteGuid scan of {d}", "ok", tried
        if mismatches:
            how, local, found, allow_block = mismatches[0]
            if self.ignore or not self.strict:
                if _file_key(local) in seen:
                    return None, how, "cycle", tried
                return open_found(local, allow_block=allow_block, share=self.share), how, "mismatch", tried
            raise ParentMismatchError(
                f"parent {local} has DataWriteGuid {found} but the child's parent_linkage is {l1} "
                f"(the parent was modified after the child was made; accept it with --ignore-id-mismatch / ignore_id_mismatch=True only if its data is unchanged)",
                path=child.path, expected=l1, found=found)
        if cycle:
            return None, "", "cycle", tried
        if self.strict and self.missing == "error":
            raise ParentNotFoundError(f"parent with DataWriteGuid {l1} not found; tried: " + "; ".join(tried),
                                      path=child.path, tried=tried)
        return None, "", "missing", tried


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


def attach_parents(image: Image, **options: Any) -> Disk:
    """Wrap an opened image in a Disk with its whole chain below it (parents read-only)."""
    resolver = _Resolver(**options)
    images, layers, zeros = resolver.resolve(image)
    if zeros and image.writable:
        for im in images[1:]:
            im.close()
        raise ChainError("refusing to open for writing while a parent is missing: a write that is not "
                         "sector aligned would copy zeros over the parent's data; open it read-only, or "
                         "find the parent (search_paths, parents)", path=image.path)
    disk = _build_disks(images, zeros)
    disk.chain_info = [l.to_dict() for l in layers]
    return disk


def open(path: str | os.PathLike[str], mode: str = "r", *, storage: Storage | None = None,
         share: bool = False, **chain_options: Any) -> Disk:
    """Open a VHDX or AVHDX file as a :class:`Disk` (``mode`` "r" or "r+").

    Every file of the chain is locked as QEMU locks images: shared for reading (the file
    and its parents), exclusive for writing (the file itself; its parents stay shared).
    A file another process writes raises :class:`LockedError`. ``share=True`` (read-only)
    takes no locks and ignores others': for inspecting a disk a running VM holds, whose
    content may be changing under you.
    """
    image = Image.open(path, mode, storage=storage, share=share)
    try:
        if image.has_parent or chain_options:
            if share:
                chain_options["share"] = True
            return attach_parents(image, **chain_options)
        return Disk(image)
    except BaseException:
        image.close(_failed=True)
        raise


def _build_disks(images: list[Image], zeros: bool) -> Disk:
    below: Disk | None = None
    built: list[Disk] = []
    for i, im in enumerate(reversed(images)):
        d = Disk(im, below, parent_zeros=zeros and i == 0)
        built.append(d)
        below = d
    leaf = built[-1]
    leaf._owned = list(reversed(built[:-1]))  # the leaf closes every parent it opened
    return leaf


# --------------------------------------------------------------------------- the Chain object

@dataclass
class Chain:
    """The layers of a chain from leaf to base, and how each parent was found."""

    layers: list[Layer]

    @property
    def leaf(self) -> Layer:
        return self.layers[0]

    @property
    def base(self) -> Layer:
        return self.layers[-1]

    @property
    def complete(self) -> bool:
        return all(l.linkage in ("ok", "none") for l in self.layers) and self.base.linkage == "none"

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return dict(complete=self.complete, layers=[l.to_dict() for l in self.layers])


def chain(path: str | os.PathLike[str], **options: Any) -> Chain:
    """Describe the chain of ``path`` without raising on broken links (they show in each layer)."""
    options.setdefault("missing_parent", "zeros")
    resolver = _Resolver(strict=False, **options)
    leaf = Image.open(path, "r", share=resolver.share)
    try:
        images, layers, _ = resolver.resolve(leaf)
    except BaseException:
        leaf.close()
        raise
    for im in images:
        im.close()
    return Chain(layers)


# --------------------------------------------------------------------------- creating children

def locator_for(parent_path: str, child_path: str, parent_guid: uuid.UUID) -> dict[str, str]:
    """Parent locator entries in the forms and order Hyper-V writes (vhdx-format.md §4.9)."""
    parent_abs = os.path.abspath(parent_path)
    values = {
        "parent_linkage": format_linkage(parent_guid),
        "absolute_win32_path": win_absolute_path(parent_abs),
        "relative_path": win_relative_path(parent_abs, os.path.dirname(os.path.abspath(child_path))),
        "volume_path": win_volume_path(parent_abs),
        "parent_linkage2": format_linkage(C.ZERO_GUID),
    }
    return {k: values[k] for k in KEY_ORDER}


def create_child(path: str | os.PathLike[str], parent: str | os.PathLike[str], *,
                 block_size: int | None = None) -> Disk:
    """A new differencing disk over ``parent``; returns the child open for writing (parents read-only)."""
    path, parent = os.fspath(path), os.fspath(parent)
    # The parent's whole chain must resolve before a child is made on top of it.
    with open(parent, "r") as pdisk:
        pimg = pdisk.image
        if pimg.log_was_dirty:
            raise ChainError("the parent's log needs replaying first (open it r+ once)", path=parent)
        locator = locator_for(parent, path, pimg.header.data_write_guid)
        image = create_image(path, pimg.size, block_size=block_size or 2 * C.MiB,
                             logical_sector_size=pimg.logical_sector_size,
                             physical_sector_size=pimg.physical_sector_size, page83_data=pimg.metadata.page83_data,
                             parent_locator=build_parent_locator(locator))
    try:
        return attach_parents(image, parents=[parent])
    except BaseException:
        image.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise


def checkpoint_stem(path: str) -> str:
    """The base disk's name: Hyper-V names checkpoints of checkpoints after the original .vhdx."""
    name = os.path.basename(path)
    m = _CHECKPOINT_NAME.match(name)
    return m.group("stem") if m else os.path.splitext(name)[0]


def snapshot(disk_path: str | os.PathLike[str], *, block_size: int | None = None) -> str:
    """Make ``<stem>_<GUID>.avhdx`` beside the disk, as Hyper-V names checkpoints; return its path."""
    disk_path = os.fspath(disk_path)
    folder = os.path.dirname(os.path.abspath(disk_path))
    child = os.path.join(folder, f"{checkpoint_stem(disk_path)}_{str(uuid.uuid4()).upper()}.avhdx")
    create_child(child, disk_path, block_size=block_size).close()
    return child


# --------------------------------------------------------------------------- reparenting

def reparent(child: str | os.PathLike[str], new_parent: str | os.PathLike[str], *,
             ignore_id_mismatch: bool = False) -> dict[str, Any]:
    """Point ``child`` at ``new_parent`` (like ``Set-VHD -ParentPath``); returns what changed.

    The paths are rewritten through the log. The linkage is rewritten to the new parent's
    DataWriteGuid only with ``ignore_id_mismatch`` (otherwise the GUIDs must already match).
    """
    child, new_parent = os.fspath(child), os.fspath(new_parent)
    pimg = Image.open(new_parent, "r")
    try:
        parent_guid = pimg.header.data_write_guid
        psize, plss = pimg.size, pimg.logical_sector_size
    finally:
        pimg.close()
    image = Image.open(child, "r+")
    try:
        if not image.has_parent:
            raise ChainError("not a differencing disk", path=child)
        if os.path.exists(new_parent) and _file_key(new_parent) == _file_key(child):
            raise ChainCycleError("a disk cannot be its own parent", path=child)
        if plss != image.logical_sector_size or psize != image.size:
            raise ChainError(f"new parent {new_parent} has {psize} bytes / {plss}-byte sectors, the child "
                             f"{image.size} / {image.logical_sector_size}", path=child)
        l1, l2 = _linkage_of(image)
        old = dict(image.metadata.parent_locator or {})
        linkage_changed = False
        if parent_guid not in {g for g in (l1, l2) if g is not None}:
            if not ignore_id_mismatch:
                raise ParentMismatchError(
                    f"new parent {new_parent} has DataWriteGuid {parent_guid}, the child's parent_linkage is "
                    f"{l1}; use --ignore-id-mismatch only if its contents equal the original parent's",
                    path=child, expected=l1, found=parent_guid)
            linkage_changed = True
        new = locator_for(new_parent, child, parent_guid if linkage_changed else (l1 or parent_guid))
        if not linkage_changed and l2 is not None:
            new["parent_linkage2"] = format_linkage(l2)
        for key, value in old.items():  # keep keys we do not write ourselves
            new.setdefault(key, value)
        image.write_parent_locator(new)
    finally:
        image.close()
    return dict(child=child, new_parent=new_parent, old_locator=old, new_locator=new,
                linkage_changed=linkage_changed)


# --------------------------------------------------------------------------- orphans

@dataclass
class Node:
    path: str
    disk_type: str = "unreadable"
    data_write_guid: str | None = None
    parent_linkage: str | None = None
    virtual_size: int | None = None
    parent: str | None = None
    state: str = "base"  # base, ok, missing, mismatch, external, unreadable
    children: list[str] = field(default_factory=list)
    error: str | None = None
    interrupted_merge: bool = False
    external_parent: str | None = None  # state "external": the parent exists outside the folder
    in_use: bool = False  # another process has it open for writing; read without a lock

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Forest:
    """Every disk of a folder and how they link: bases, children, branches, broken links, leaves."""

    folder: str
    nodes: dict[str, Node]

    @property
    def roots(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent is None and n.state != "unreadable"]

    @property
    def bases(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state == "base"]

    @property
    def leaves(self) -> list[Node]:
        return [n for n in self.nodes.values() if not n.children and n.state != "unreadable"]

    @property
    def branches(self) -> list[Node]:
        return [n for n in self.nodes.values() if len(n.children) > 1]

    @property
    def broken(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state in ("missing", "mismatch")]

    @property
    def unreadable(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state == "unreadable"]

    def chain_of(self, path: str) -> list[Node]:
        out, seen = [], set()
        node: Node | None = self.nodes[path]
        while node is not None and node.path not in seen:
            seen.add(node.path)
            out.append(node)
            node = self.nodes.get(node.parent) if node.parent else None
        return out

    def to_dict(self) -> dict[str, Any]:
        return dict(folder=self.folder, nodes=[n.to_dict() for n in self.nodes.values()],
                    roots=[n.path for n in self.roots], leaves=[n.path for n in self.leaves],
                    branches=[n.path for n in self.branches], broken=[n.path for n in self.broken],
                    unreadable=[n.path for n in self.unreadable])


def find_chains(folder: str | os.PathLike[str], recursive: bool = False) -> Forest:
    """Read every .vhdx/.avhdx in ``folder`` and rebuild the forest of chains.

    Only regular files are read: a FIFO, socket, device or broken symlink named like a disk is
    listed as unreadable, with the reason. ``recursive`` does not follow symlinked folders.
    Each file is read under a shared lock; a file another process writes is read without
    one and marked ``in_use`` rather than failing the scan.
    """
    folder = os.path.abspath(os.fspath(folder))
    paths: list[str] = []
    if recursive:
        for root, _dirs, files in os.walk(folder):  # followlinks=False: no loops through symlinks
            paths += [os.path.join(root, f) for f in files if f.lower().endswith(VHDX_SUFFIXES)]
    else:
        paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(VHDX_SUFFIXES)]
    paths.sort()
    nodes, locators, accept2 = _read_nodes(paths)
    _link_nodes(folder, nodes, locators, accept2)
    for p, node in nodes.items():
        if node.parent:
            nodes[node.parent].children.append(p)
    return Forest(folder, nodes)


def _read_nodes(paths: list[str]) -> tuple[dict[str, Node], dict[str, dict[str, str]], dict[str, str]]:
    """A node for each file; the parent locators of the children; their parent_linkage2 if set."""
    nodes: dict[str, Node] = {}
    locators: dict[str, dict[str, str]] = {}
    accept2: dict[str, str] = {}
    for p in paths:
        node = nodes[p] = Node(p)
        problem = regular_file_problem(p)
        image = None
        if problem is None:
            try:
                image, node.in_use = open_peek(p)
            except (VhdxError, OSError) as e:
                problem = str(e)
        if image is None:
            node.error, node.state = problem, "unreadable"
            continue
        try:
            node.disk_type = image.disk_type
            node.data_write_guid = str(image.header.data_write_guid)
            node.virtual_size = image.size
            node.interrupted_merge = merge_in_progress(image)
            if image.has_parent:
                l1, l2 = _linkage_of(image)
                node.parent_linkage = str(l1) if l1 else None
                if l2 is not None:  # a merge into the parent is under way (§9.5)
                    accept2[p] = str(l2)
                locators[p] = dict(image.metadata.parent_locator or {})
                node.state = "missing"
        finally:
            image.close()
    return nodes, locators, accept2


def _key_or_none(path: str) -> tuple[int, int] | None:
    try:
        return _file_key(path)
    except OSError:
        return None


def _link_nodes(folder: str, nodes: dict[str, Node], locators: dict[str, dict[str, str]],
                accept2: dict[str, str]) -> None:
    """Set each child's parent and state: by its locator's paths, else by DataWriteGuid."""
    readable = [p for p, n in nodes.items() if n.state != "unreadable"]
    by_key: dict[tuple[int, int], str] = {}
    by_guid: dict[str, list[str]] = {}
    for p in readable:
        key = _key_or_none(p)
        if key is not None:
            by_key.setdefault(key, p)
        by_guid.setdefault(str(nodes[p].data_write_guid), []).append(p)
    cache = ScanCache()
    for p, loc in locators.items():
        node = nodes[p]
        wanted = (node.parent_linkage, accept2.get(p))
        found: str | None = None
        mismatch: str | None = None
        for _how, cand in candidate_paths(loc, p, [folder]):
            local = _case_insensitive(cand)
            key = _key_or_none(local) if local is not None else None
            match = by_key.get(key) if key is not None else None
            if match is None or match == p:
                continue
            if nodes[match].data_write_guid in wanted:
                found = match
                break
            mismatch = mismatch or match
        if found is None:
            same = [q for g in wanted if g for q in by_guid.get(g, []) if q != p]
            found = same[0] if same else None
        if found is not None:
            node.parent, node.state = found, "ok"
        elif mismatch is not None:
            node.parent, node.state = mismatch, "mismatch"
        else:
            for _how, cand in candidate_paths(loc, p, []):
                local = _case_insensitive(cand)
                if local and str(read_data_write_guid(local, cache)) == node.parent_linkage:
                    node.state, node.external_parent = "external", os.path.abspath(local)
                    break


# --------------------------------------------------------------------------- check

def check_chain(path: str | os.PathLike[str], **options: Any) -> list[Any]:
    """Findings about a file's chain: missing parents, ID mismatches, interrupted merges."""
    from ..ops.check import ERROR, WARNING, Finding, journal_findings
    out = []
    missing_severity = WARNING if options.get("missing_parent") == "zeros" else ERROR
    try:
        ch = chain(path, **options)
    except VhdxError as e:
        return [Finding(ERROR, e.offset, f"chain: {e.detail}",
                        "see 'vhdx chain' for every path tried; --search DIR or --parent FILE may help")]
    for layer in ch.layers:
        if layer.interrupted_merge:
            out.append(Finding(WARNING, None, f"{layer.path}: a merge into this disk was interrupted",
                               "run the same 'vhdx merge' command again to finish it"))
        out.extend(journal_findings(layer.path, options.get("search_paths", ())))
        if layer.linkage == "missing":
            out.append(Finding(missing_severity, None, f"{layer.path}: parent with DataWriteGuid {layer.parent_linkage} "
                               f"not found", "use --search DIR, or 'vhdx reparent' to point it at its parent"))
        elif layer.linkage == "mismatch":
            out.append(Finding(ERROR, None, f"{layer.path}: parent found but its DataWriteGuid does not match "
                               f"parent_linkage {layer.parent_linkage}",
                               "the parent was modified; reparent with --ignore-id-mismatch only if its data "
                               "is unchanged"))
        elif layer.linkage == "cycle":
            out.append(Finding(ERROR, None, f"{layer.path}: the chain refers back to itself",
                               "use 'vhdx reparent' to point this disk at its real parent"))
        if layer.note:
            out.append(Finding(WARNING, None, f"{layer.path}: {layer.note}",
                               "a child must have its parent's geometry; check that this is the right parent"))
    return out
