"""Orphans: every disk of a folder, how they link, and which chains can be merged.

Rebuilds the forest of chains from the files alone (as after a Hyper-V host is gone):
bases, children, branches, missing parents, ID mismatches, parents outside the folder,
files in use and unreadable files, each with its reason.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from ..chains.resolve import Resolver
from ..chains.scan import VHDX_SUFFIXES, linkage_of, open_peek, regular_file_problem
from ..chains.search import Link, Peers
from ..errors import VhdxError, as_path
from .merge.journal import merge_in_progress


class NodeState(str, Enum):
    """How one disk of a folder links (``Node.state``); a ``str`` enum that prints as its value."""

    BASE = "base"              # no parent: the root of a chain
    OK = "ok"                  # its parent is in the folder and matches
    MISSING = "missing"        # its parent was not found (or another disk sits at its place)
    MISMATCH = "mismatch"      # its parent was found but was written after the child was made
    EXTERNAL = "external"      # a matching parent outside the folder
    UNREADABLE = "unreadable"  # not a VHDX we can read (``error`` says why)

    __str__ = str.__str__
    __format__ = str.__format__


@dataclass
class Node:
    """One disk of a folder: what it is, its parent (``state``: how it links) and its children."""
    path: str
    disk_type: str = "unreadable"
    data_write_guid: str | None = None
    parent_linkage: str | None = None
    virtual_size: int | None = None
    parent: str | None = None
    state: NodeState = NodeState.BASE
    children: list[str] = field(default_factory=list)
    error: str | None = None
    interrupted_merge: bool = False
    external_parent: str | None = None  # state "external": the parent exists outside the folder
    in_use: bool = False  # another process has it open for writing; read without a lock

    def to_dict(self) -> dict[str, Any]:
        """The node as a plain dict (for JSON)."""
        return asdict(self)


@dataclass
class Forest:
    """Every disk of a folder and how they link: bases, children, branches, broken links, leaves."""

    folder: str
    nodes: dict[str, Node]

    @property
    def roots(self) -> list[Node]:
        """Readable disks without a parent in the folder (bases, and children whose parent is not here)."""
        return [n for n in self.nodes.values() if n.parent is None and n.state != NodeState.UNREADABLE]

    @property
    def bases(self) -> list[Node]:
        """Disks that are not differencing disks."""
        return [n for n in self.nodes.values() if n.state == NodeState.BASE]

    @property
    def leaves(self) -> list[Node]:
        """Readable disks without children: where a VM writes, or the ends of branches."""
        return [n for n in self.nodes.values() if not n.children and n.state != NodeState.UNREADABLE]

    @property
    def branches(self) -> list[Node]:
        """Disks with more than one child."""
        return [n for n in self.nodes.values() if len(n.children) > 1]

    @property
    def broken(self) -> list[Node]:
        """Children whose parent is missing or has another DataWriteGuid."""
        return [n for n in self.nodes.values() if n.state in (NodeState.MISSING, NodeState.MISMATCH)]

    @property
    def unreadable(self) -> list[Node]:
        """Files named like disks that could not be read (with ``error`` saying why)."""
        return [n for n in self.nodes.values() if n.state == NodeState.UNREADABLE]

    def chain_of(self, path: str) -> list[Node]:
        """The nodes from ``path`` down through its parents in the folder (stopping at a loop)."""
        out, seen = [], set()
        node: Node | None = self.nodes[path]
        while node is not None and node.path not in seen:
            seen.add(node.path)
            out.append(node)
            node = self.nodes.get(node.parent) if node.parent else None
        return out

    def to_dict(self) -> dict[str, Any]:
        """The forest as a plain dict (for JSON)."""
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
    folder = os.path.abspath(as_path(folder, "folder"))
    paths: list[str] = []
    if recursive:
        for root, _dirs, files in os.walk(folder):  # followlinks=False: no loops through symlinks
            paths += [os.path.join(root, f) for f in files if f.lower().endswith(VHDX_SUFFIXES)]
    else:
        paths = [os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(VHDX_SUFFIXES)]
    paths.sort()
    nodes, locators, accept, disk_ids = _read_nodes(paths)
    _link_nodes(folder, nodes, locators, accept, disk_ids)
    for p, node in nodes.items():
        if node.parent:
            nodes[node.parent].children.append(p)
    return Forest(folder, nodes)


def _read_nodes(paths: list[str]) -> tuple[dict[str, Node], dict[str, dict[str, str]], dict[str, set[uuid.UUID]],
                                           dict[str, uuid.UUID]]:
    """A node for each file; the parent locators of the children; the DataWriteGuids their parents may have;
    the Virtual Disk IDs (page 83) of the files read."""
    nodes: dict[str, Node] = {}
    disk_ids: dict[str, uuid.UUID] = {}
    locators: dict[str, dict[str, str]] = {}
    accept: dict[str, set[uuid.UUID]] = {}
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
            node.error, node.state = problem, NodeState.UNREADABLE
            continue
        try:
            node.disk_type = image.disk_type
            node.data_write_guid = str(image.header.data_write_guid)
            disk_ids[p] = image.metadata.page83_data
            node.virtual_size = image.size
            node.interrupted_merge = merge_in_progress(image)
            if image.has_parent:
                l1, l2 = linkage_of(image)  # l2: a merge into the parent is under way (§9.5)
                node.parent_linkage = str(l1) if l1 else None
                accept[p] = {g for g in (l1, l2) if g is not None}
                locators[p] = dict(image.metadata.parent_locator or {})
                node.state = NodeState.MISSING
        finally:
            image.close()
    return nodes, locators, accept, disk_ids


def _link_nodes(folder: str, nodes: dict[str, Node], locators: dict[str, dict[str, str]],
                accept: dict[str, set[uuid.UUID]], disk_ids: dict[str, uuid.UUID]) -> None:
    """Set each child's parent and state, by the Resolver's steps among the files read.

    A parent found by the locator outside the folder is "external"; the parent stays unset. A file
    of another Virtual Disk ID where the parent should be is another disk: the parent is "missing".
    """
    resolver = Resolver(search_paths=[folder], strict=False)
    peers = Peers({p: uuid.UUID(n.data_write_guid) for p, n in nodes.items()
                   if n.state != NodeState.UNREADABLE and n.data_write_guid}, disk_ids)
    for p, locator in locators.items():
        node = nodes[p]
        found = resolver.locate_among(p, locator, accept[p], peers)
        if found.state in (Link.OK, Link.MISMATCH):
            node.parent, node.state = found.path, NodeState(found.state.value)
        elif found.state == Link.EXTERNAL:
            node.state, node.external_parent = NodeState.EXTERNAL, found.path
