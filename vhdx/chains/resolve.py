"""A disk and its parents: parent resolution, linkage checks, open(), chain().

Resolution (its steps in :mod:`.search`, run here over opened files or, for
``find_chains``, over files already read) tries, in the specification's order, the
relative path, the volume path and the absolute Win32 path (each mapped to this machine),
then scans the search paths for a file whose DataWriteGuid equals the child's
``parent_linkage`` (docs/format.md §9.3).
Every path tried is recorded, so a missing parent can be reported in full. Parents are
always opened read-only: opening a parent for writing would rotate its GUIDs and orphan
every child it has (§2.3). Only regular files are opened while resolving or scanning (a
FIFO would block the open for ever); a scan reads each file's headers once per command
(:class:`ScanCache`), and every walk along a chain is a loop bounded by ``MAX_DEPTH``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping

from ..errors import ChainCycleError, ChainError, ParentMismatchError, ParentNotFoundError, UsageError, as_path
from ..file.image import Image
from ..file.storage import Storage
from .disk import Disk
from .paths import PathArg, PathArgs, file_key, path_list
from .scan import ScanCache, linkage_of, open_found, regular_file_problem
from .search import CYCLE, EXTERNAL, MATCH, MISMATCH, SKIP, Found, Link, Peers, Search, Verdict, locate, other_disk

MAX_DEPTH = 1024  # layers of one chain; deeper is refused (a loop of files, or a crafted chain)
MissingParent = Literal["error", "zeros"]


@dataclass
class Layer:
    """One file of a chain, leaf first."""

    path: str
    disk_type: str = "unknown"
    data_write_guid: str | None = None
    parent_linkage: str | None = None
    parent_linkage2: str | None = None
    found_by: str = "given"
    linkage: Link = Link.OK  # of this layer to its parent: ok, mismatch, missing, none (base), cycle
    virtual_size: int | None = None
    tried: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The layer as a plain dict (for JSON); every field is a plain value but ``tried``."""
        return dict(vars(self), tried=list(self.tried))


def _check_sizes(child: Image, parent: Image | Disk, layer: Layer, strict: bool) -> None:
    """A parent's sectors must be the child's (``strict``) or are noted; a size difference is noted."""
    if parent.logical_sector_size != child.logical_sector_size:
        msg = (f"parent {parent.path} has {parent.logical_sector_size}-byte sectors, the child "
               f"{child.logical_sector_size}")
        if strict:
            raise ChainError(msg, path=child.path)
        layer.note = msg
    elif parent.size != child.size:
        layer.note = f"virtual size {child.size} differs from the parent's {parent.size}"


def layer_for(image: Image, found_by: str) -> Layer:
    """The :class:`Layer` of an opened image, found as ``found_by`` says."""
    l1, l2 = linkage_of(image) if image.has_parent else (None, None)
    return Layer(path=image.path, disk_type=image.disk_type, data_write_guid=str(image.header.data_write_guid),
                 parent_linkage=str(l1) if l1 else None, parent_linkage2=str(l2) if l2 else None,
                 found_by=found_by, linkage=Link.NONE if not image.has_parent else Link.OK,
                 virtual_size=image.size)


class Resolver:
    """Finds and opens the parents of one image, strictly (open) or leniently (describe).

    The one parent-resolution algorithm (docs/format.md §9.3): a given parent, else the
    locator's paths in order, else a DataWriteGuid scan; then a mismatch, a cycle or a missing
    parent. :meth:`resolve` runs it over opened files; :meth:`locate_among` over files already
    read (``find_chains``), so that the two never disagree about a parent.

    Only regular files are opened (a file the user names with ``parents`` may also be a block
    device). ``cache`` holds the header peeks of the command; by default the resolver has its own.
    """

    def __init__(self, *, search_paths: PathArgs = (), parents: PathArgs | None = None,
                 ignore_id_mismatch: bool = False, missing_parent: str = "error", strict: bool = True,
                 cache: ScanCache | None = None, share: bool = False) -> None:
        if missing_parent not in ("error", "zeros"):
            raise UsageError(f"missing_parent={missing_parent!r}: 'error' or 'zeros'")
        self.search_paths = path_list(search_paths)
        self.parents = path_list(parents)
        self.ignore = ignore_id_mismatch
        self.missing = missing_parent
        self.strict = strict
        self.share = share  # parents are read without locks (--force-share)
        self.cache = cache if cache is not None else ScanCache(share=share)

    def resolve(self, leaf: Image) -> tuple[list[Image], list[Layer], bool]:
        """Images leaf..base (the leaf included), their layers, and whether the base reads zeros."""
        images = [leaf]
        layers = [layer_for(leaf, "given")]
        seen: set[tuple[int, int]] = set()  # the files of the chain (a base disk has no chain to walk)
        if leaf.has_parent:
            try:
                seen.add(file_key(leaf.path))
            except OSError:
                pass  # not a file of this machine (a storage of its own): nothing to meet again
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
                    zeros = state == Link.MISSING and self.missing == "zeros"
                    break
                seen.add(file_key(parent.path))
                images.append(parent)
                layers.append(layer_for(parent, how))
                _check_sizes(child, parent, layers[-2], self.strict)
        except BaseException:
            for im in images[1:]:
                im.close()
            raise
        return images, layers, zeros

    def locate_among(self, child_path: str, locator: Mapping[str, str], accept: set[uuid.UUID],
                     peers: Peers) -> Found:
        """The parent of ``child_path`` among ``peers``, by the same steps as :meth:`resolve`.

        A candidate that is not a peer is never the parent: when it exists and its DataWriteGuid
        is one of ``accept``, the outcome is "external" (unless a peer matches or mismatches).
        A candidate naming the child itself is passed over. Nothing is opened for writing.
        """
        def judge(how: str, local: str) -> Verdict:
            match = peers.find(local)
            if match == child_path:
                return Verdict(SKIP, note="the child itself")
            if match is None:
                peek = self.cache.peek(local)
                if not isinstance(peek, str) and peek.data_write_guid in accept:
                    return Verdict(EXTERNAL, os.path.abspath(local))
                return Verdict(SKIP, note="not among the files read")
            if peers.guids[match] in accept:
                return Verdict(MATCH, match)
            other = other_disk(match, peers.guids[match], peers.disk_ids.get(match), min(accept),
                               peers.disk_ids.get(child_path))
            if other is not None:
                return other
            return Verdict(MISMATCH, match, f"DataWriteGuid {peers.guids[match]}", guid=peers.guids[match])

        def scan(search: Search) -> Iterator[tuple[str, str]]:
            for path in sorted(p for g in accept for p in peers.by_guid.get(g, ()) if p != child_path):
                yield "DataWriteGuid among the files read", path

        return locate(Search(judge), child_path, locator, self.search_paths, scan)

    def _folder_scan(self, child_path: str, accept: set[uuid.UUID]
                     ) -> Callable[[Search], Iterator[tuple[str, str]]]:
        """The files of the search folders and the child's folder with a wanted DataWriteGuid."""
        def scan(search: Search) -> Iterator[tuple[str, str]]:
            for d in self.search_paths + [os.path.dirname(os.path.abspath(child_path))]:
                try:
                    by_guid, skipped = self.cache.scan(d)
                except OSError:
                    search.tried.append(f"search {d}: not a readable folder")
                    continue
                search.tried.append(f"DataWriteGuid scan of {d}")
                search.tried += [f"  skipped {p}: {why}" for p, why in skipped]
                skip = search.skip | {os.path.abspath(child_path)}
                for p in sorted(p for g in accept for p in by_guid.get(g, ())):
                    if p not in skip and os.path.abspath(p) not in skip:
                        yield f"DataWriteGuid scan of {d}", p
        return scan

    def _opener(self, child: Image, accept: set[uuid.UUID], seen: set[tuple[int, int]]
                ) -> Callable[[str, str], Verdict]:
        """Judges a candidate by opening it (read-only, a regular file unless given)."""
        def judge(how: str, local: str) -> Verdict:
            allow_block = how == "given"  # a file the user names may be a block device
            problem = regular_file_problem(local, allow_block=allow_block)
            if problem is not None:
                return Verdict(SKIP, note=problem)
            if file_key(local) in seen:
                if self.strict:
                    raise ChainCycleError(f"the chain refers back to {local}", path=child.path)
                return Verdict(CYCLE, local, "already in the chain: a cycle")
            image = self.cache.open(local, allow_block=allow_block)
            if isinstance(image, str):
                return Verdict(SKIP, note=image)
            if image.header.data_write_guid in accept:
                return Verdict(MATCH, local, image=image)
            found = image.header.data_write_guid
            other = other_disk(local, found, image.metadata.page83_data, linkage_of(child)[0] or found,
                               child.metadata.page83_data)
            image.close()
            if other is not None and how != "given":
                return other
            if other is not None:  # a parent the user named is theirs to accept (ignore_id_mismatch)
                return Verdict(MISMATCH, local, other.note, guid=found, other_disk=True)
            return Verdict(MISMATCH, local, f"DataWriteGuid {found}", guid=found)
        return judge

    def _find_parent(self, child: Image, depth: int, seen: set[tuple[int, int]]
                     ) -> tuple[Image | None, str, Link, list[str]]:
        """(the opened parent or None, how it was found, the child's linkage state, paths tried)."""
        l1, l2 = linkage_of(child)
        if l1 is None:
            raise ChainError("the parent locator has no valid parent_linkage", path=child.path)
        accept = {g for g in (l1, l2) if g is not None}
        search = Search(self._opener(child, accept, seen))
        if depth < len(self.parents):
            found = self._given_parent(search, self.parents[depth], child)
        else:
            found = locate(search, child.path, child.metadata.parent_locator or {}, self.search_paths,
                           self._folder_scan(child.path, accept))
        return self._open_outcome(found, child, l1, seen)

    def _given_parent(self, search: Search, given: str, child: Image) -> Found:
        """The parent the user named: it, or its mismatch; a file that cannot be opened is an error."""
        found = search.consider("given", given)
        if found is not None:
            return found
        if not search.mismatches:
            raise ParentNotFoundError(f"the given parent {given} cannot be opened", path=child.path,
                                      tried=search.tried)
        return search.outcome()

    def _open_outcome(self, found: Found, child: Image, l1: uuid.UUID, seen: set[tuple[int, int]]
                      ) -> tuple[Image | None, str, Link, list[str]]:
        """Open a mismatched parent if allowed, or raise as ``strict``, ``ignore`` and ``missing`` say."""
        tried = found.tried
        if found.state == Link.OK:
            return found.image, found.how, Link.OK, tried
        if found.state == Link.MISMATCH:
            if not (self.ignore or not self.strict):
                raise ParentMismatchError(mismatch_message(l1, found), path=child.path, expected=l1, found=found.guid)
            if file_key(found.path or "") in seen:
                return None, found.how, Link.CYCLE, tried
            image = open_found(found.path or "", allow_block=found.how == "given", share=self.share)
            return image, found.how, Link.MISMATCH, tried
        if found.state == Link.CYCLE:
            return None, "", Link.CYCLE, tried
        if self.strict and self.missing == "error":
            raise ParentNotFoundError(missing_message(l1, found), path=child.path, tried=tried)
        return None, "", Link.MISSING, tried


def mismatch_message(expected: uuid.UUID, found: Found) -> str:
    """Why the parent at ``found.path`` does not match: modified since, or another disk altogether."""
    if found.why:
        return (f"parent {found.path} is {found.why}; name the right parent, or accept this one with "
                f"--ignore-id-mismatch / ignore_id_mismatch=True only if you know it holds the same data")
    return (f"parent {found.path} has DataWriteGuid {found.guid} but the child's parent_linkage is {expected} "
            f"(the parent was modified after the child was made; accept it with --ignore-id-mismatch / "
            f"ignore_id_mismatch=True only if its data is unchanged)")


def missing_message(expected: uuid.UUID, found: Found) -> str:
    """Why no parent with DataWriteGuid ``expected`` was found: what was found where, what was tried, the fix."""
    seen = "".join(f"; {other}" for other in found.others)
    return (f"parent with DataWriteGuid {expected} not found{seen}; tried: " + "; ".join(found.tried)
            + ". If the parent moved, name the folder it is in now with --search DIR (search_paths=[DIR]), "
              "or point the child at it with `vhdx reparent CHILD --parent FILE`")


def attach_parents(image: Image, resolver: Resolver) -> Disk:
    """Wrap an opened image in a Disk with its whole chain below it (parents read-only)."""
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


def stack(image: Image, parent: Disk, *, given: str | None = None) -> Disk:
    """``image`` as a Disk over ``parent``, an open Disk whose chain is already resolved.

    For a child just made over ``parent`` (``given``: the parent as the caller named it):
    the parent's chain is not resolved again. The child's parent_linkage must be the parent's
    DataWriteGuid and their sectors must agree. The new Disk owns ``parent`` and closes it.
    """
    l1, l2 = linkage_of(image)
    if parent.data_write_guid not in {g for g in (l1, l2) if g is not None}:
        raise ParentMismatchError(f"parent {parent.path} has DataWriteGuid {parent.data_write_guid} but the "
                                  f"child's parent_linkage is {l1}", path=image.path, expected=l1,
                                  found=parent.data_write_guid)
    layer = layer_for(image, "given")
    layer.tried = [f"given: {given if given is not None else parent.path}"]
    _check_sizes(image, parent, layer, strict=True)
    below = parent.chain_info or [layer_for(parent.image, "given").to_dict()]
    disk = Disk(image, parent, owned=[parent])
    disk.chain_info = [layer.to_dict()] + below
    return disk


def open(path: PathArg, mode: str = "r", *, search_paths: PathArgs = (), parents: PathArgs | None = None,
         ignore_id_mismatch: bool = False, missing_parent: MissingParent = "error", share: bool = False,
         storage: Storage | None = None) -> Disk:
    """Open a VHDX or AVHDX file as a :class:`Disk`, its parents below it (read-only).

    ``mode`` is "r" (or "rb") to read, "r+" (or "r+b") to read and write the file itself.
    A parent is found by the paths its child records, else among the files of the child's
    folder and of ``search_paths`` (one folder, a str or PathLike, or a list of them) by its
    DataWriteGuid. ``parents`` names the parents instead, nearest first (one file or a list).
    ``ignore_id_mismatch=True`` accepts a parent whose DataWriteGuid is not the child's
    parent_linkage (only if its data is unchanged since the child was made).
    ``missing_parent="zeros"`` reads zeros where a parent is missing (read-only) instead of
    raising :class:`ParentNotFoundError`. A file that does not exist raises
    :class:`DiskNotFoundError`, both a :class:`VhdxError` and a ``FileNotFoundError``.

    Every file of the chain is locked as QEMU locks images: shared for reading (the file
    and its parents), exclusive for writing (the file itself; its parents stay shared).
    A file another process writes raises :class:`LockedError`. ``share=True`` (read-only)
    takes no locks and ignores others': for inspecting a disk a running VM holds, whose
    content may be changing under you. ``storage`` reads the file through another
    :class:`~vhdx.file.storage.Storage` than the file at ``path`` (its parents are files).
    """
    path = as_path(path)
    resolver = Resolver(search_paths=search_paths, parents=parents, ignore_id_mismatch=ignore_id_mismatch,
                        missing_parent=missing_parent, share=share)
    image = Image.open(path, mode, storage=storage, share=share)
    try:
        return attach_parents(image, resolver)
    except BaseException:
        image.abort()
        raise


def _build_disks(images: list[Image], zeros: bool) -> Disk:
    below: Disk | None = None
    built: list[Disk] = []
    for i, im in enumerate(reversed(images[1:])):
        d = Disk(im, below, parent_zeros=zeros and i == 0)
        built.append(d)
        below = d
    # The leaf closes every parent it opened.
    return Disk(images[0], below, parent_zeros=zeros and len(images) == 1, owned=reversed(built))


# --------------------------------------------------------------------------- the Chain object

@dataclass
class Chain:
    """The layers of a chain from leaf to base, and how each parent was found."""

    layers: list[Layer]

    @property
    def leaf(self) -> Layer:
        """The file the chain was asked for."""
        return self.layers[0]

    @property
    def base(self) -> Layer:
        """The last layer found (the base disk when the chain is complete)."""
        return self.layers[-1]

    @property
    def complete(self) -> bool:
        """Every parent found with a matching DataWriteGuid, down to a base disk."""
        return all(l.linkage in (Link.OK, Link.NONE) for l in self.layers) and self.base.linkage == Link.NONE

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The chain as a plain dict (for JSON)."""
        return dict(complete=self.complete, layers=[l.to_dict() for l in self.layers])


def chain(path: PathArg, *, search_paths: PathArgs = (), parents: PathArgs | None = None,
          ignore_id_mismatch: bool = False, missing_parent: MissingParent = "zeros", share: bool = False) -> Chain:
    """Describe the chain of ``path`` without raising on broken links (they show in each layer).

    The keywords are those of :func:`open`; a missing parent is a layer whose ``linkage`` is
    "missing" (with every path ``tried``), not an error.
    """
    path = as_path(path)
    resolver = Resolver(strict=False, search_paths=search_paths, parents=parents,
                        ignore_id_mismatch=ignore_id_mismatch, missing_parent=missing_parent, share=share)
    leaf = Image.open(path, "r", share=resolver.share)
    try:
        images, layers, _ = resolver.resolve(leaf)
    except BaseException:
        leaf.close()
        raise
    for im in images:
        im.close()
    return Chain(layers)


