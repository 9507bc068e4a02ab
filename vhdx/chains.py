"""Differencing chains: parent resolution, linkage checks, snapshots, reparenting, orphans.

Resolution tries, in the specification's order, the relative path, the volume path and
the absolute Win32 path (each mapped to this machine), then scans the search paths for a
file whose DataWriteGuid equals the child's ``parent_linkage`` (vhdx-format.md §9.3).
Every path tried is recorded, so a missing parent can be reported in full. Parents are
always opened read-only: opening a parent for writing would rotate its GUIDs and orphan
every child it has (§2.3).
"""

from __future__ import annotations

import ntpath
import os
import re
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from .disk import Disk
from .errors import (ChainCycleError, ChainError, LockedError, ParentMismatchError, ParentNotFoundError,
                     UsageError, VhdxError)
from .format import constants as C
from .format.locator import KEY_ORDER, build_parent_locator, format_linkage, parse_linkage
from .image import Image, create_image

MAX_DEPTH = 256  # OpenVMM's cap (vhdx-format.md §9.3)
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
    except (ValueError, UnicodeDecodeError, AttributeError):
        return True


MERGE_JOURNAL_GUID = uuid.UUID("5b1f2a4e-9c0d-4d7e-8a53-7d6c3e9b1a01")  # our user item (vhdx.merge)


class _Resolver:
    """Finds and opens the parents of one image, strictly (open) or leniently (describe)."""

    def __init__(self, *, search_paths: Iterable[str | os.PathLike[str]] = (),
                 parents: Sequence[str | os.PathLike[str]] | None = None, ignore_id_mismatch: bool = False,
                 missing_parent: str = "error", strict: bool = True, share: bool = False) -> None:
        if missing_parent not in ("error", "zeros"):
            raise UsageError(f"missing_parent={missing_parent!r}: 'error' or 'zeros'")
        self.search_paths = [os.fspath(p) for p in search_paths]
        self.parents = [os.fspath(p) for p in parents] if parents else []
        self.ignore = ignore_id_mismatch
        self.missing = missing_parent
        self.strict = strict
        self.share = share  # parents are read without locks (--force-share)

    def resolve(self, leaf: Image) -> tuple[list[Image], list[Layer], bool]:
        """Images leaf..base (the leaf included), their layers, and whether the base reads zeros."""
        images = [leaf]
        layers = [_layer_for(leaf, "given")]
        seen = {_file_key(leaf.path)} if os.path.exists(leaf.path) else set()
        zeros = False
        try:
            while images[-1].has_parent:
                child = images[-1]
                if len(images) > MAX_DEPTH:
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
        mismatches: list[tuple[str, str, uuid.UUID]] = []
        cycle: list[str] = []

        def consider(how: str, path: str) -> Image | None:
            local = _case_insensitive(path)
            tried.append(f"{how}: {path}")
            if local is None or not os.path.isfile(local):
                return None
            if _file_key(local) in seen:
                if self.strict:
                    raise ChainCycleError(f"the chain refers back to {local}", path=child.path)
                tried[-1] += " (already in the chain: a cycle)"
                cycle.append(local)
                return None
            try:
                image = Image.open(local, "r", share=self.share)
            except LockedError:
                raise  # a parent another process writes: the chain cannot be read safely
            except VhdxError as e:
                tried[-1] += f" (unreadable: {e.detail})"
                return None
            if image.header.data_write_guid in accept:
                return image
            tried[-1] += f" (DataWriteGuid {image.header.data_write_guid})"
            mismatches.append((how, local, image.header.data_write_guid))
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
                    names = sorted(os.listdir(d))
                except OSError:
                    tried.append(f"search {d}: not a readable folder")
                    continue
                tried.append(f"DataWriteGuid scan of {d}")
                for name in names:
                    if not name.lower().endswith(VHDX_SUFFIXES):
                        continue
                    p = os.path.join(d, name)
                    if any(p == m[1] for m in mismatches) or os.path.abspath(p) == os.path.abspath(child.path):
                        continue
                    guid = read_data_write_guid(p)
                    if guid in accept:
                        image = consider(f"DataWriteGuid scan of {d}", p)
                        if image is not None:
                            return image, f"DataWriteGuid scan of {d}", "ok", tried
        if mismatches:
            how, local, found = mismatches[0]
            if self.ignore or not self.strict:
                if _file_key(local) in seen:
                    return None, how, "cycle", tried
                return Image.open(local, "r", share=self.share), how, "mismatch", tried
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
    """Open ``path`` read-only for a look at its headers and metadata, as folder scans do.

    A scan must not fail because another process writes one of the files (a running VM's
    disk): such a file is read without a lock instead, and the second value is True ("in
    use"; what it shows may be changing). Other errors are raised as usual.
    """
    try:
        return Image.open(path, "r"), False
    except LockedError:
        return Image.open(path, "r", share=True), True


def read_data_write_guid(path: str) -> uuid.UUID | None:
    """The current header's DataWriteGuid of a file, or None if it is not a readable VHDX.

    A file in use by another process is read without a lock (see :func:`open_peek`).
    """
    try:
        image, _in_use = open_peek(path)
    except (VhdxError, OSError):
        return None
    try:
        return image.header.data_write_guid
    finally:
        image.close()


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
    from .api import open as open_disk
    # The parent's whole chain must resolve before a child is made on top of it.
    with open_disk(parent, "r") as pdisk:
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

    Each file is read under a shared lock; a file another process writes is read without
    one and marked ``in_use`` (see :func:`open_peek`) rather than failing the scan.
    """
    folder = os.path.abspath(os.fspath(folder))
    paths: list[str] = []
    if recursive:
        for root, _dirs, files in os.walk(folder):
            paths += [os.path.join(root, f) for f in files if f.lower().endswith(VHDX_SUFFIXES)]
    else:
        paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(VHDX_SUFFIXES)]
    paths.sort()
    nodes: dict[str, Node] = {}
    locators: dict[str, dict[str, str]] = {}
    accept2: dict[str, str] = {}
    by_guid: dict[str, list[str]] = {}
    for p in paths:
        node = Node(p)
        try:
            image, node.in_use = open_peek(p)
        except (VhdxError, OSError) as e:
            node.error = str(e)
            node.state = "unreadable"
            nodes[p] = node
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
        nodes[p] = node
        by_guid.setdefault(node.data_write_guid, []).append(p)
    keys = {p: _file_key(p) for p in nodes}
    for p, loc in locators.items():
        node = nodes[p]
        found: str | None = None
        mismatch: str | None = None
        for _how, cand in candidate_paths(loc, p, [folder]):
            local = _case_insensitive(cand)
            if local is None:
                continue
            local = os.path.abspath(local)
            match = next((q for q in nodes if keys[q] == _file_key(local)), None) if os.path.exists(local) else None
            if match is None or match == p:
                continue
            if nodes[match].data_write_guid in (node.parent_linkage, accept2.get(p)):
                found = match
                break
            mismatch = mismatch or match
        if found is None:
            same = [q for g in (node.parent_linkage, accept2.get(p)) if g for q in by_guid.get(g, []) if q != p]
            found = same[0] if same else None
        if found is not None:
            node.parent, node.state = found, "ok"
        elif mismatch is not None:
            node.parent, node.state = mismatch, "mismatch"
        else:
            for _how, cand in candidate_paths(loc, p, []):
                local = _case_insensitive(cand)
                if local and os.path.isfile(local) and str(read_data_write_guid(local)) == node.parent_linkage:
                    node.state, node.external_parent = "external", os.path.abspath(local)
                    break
    for p, node in nodes.items():
        if node.parent:
            nodes[node.parent].children.append(p)
    return Forest(folder, nodes)


# --------------------------------------------------------------------------- check

def check_chain(path: str | os.PathLike[str], **options: Any) -> list[Any]:
    """Findings about a file's chain: missing parents, ID mismatches, interrupted merges."""
    from .check import ERROR, WARNING, Finding
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
