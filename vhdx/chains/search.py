"""One child's parent search: candidates in the specification's order, and what each look found.

:func:`locate` tries a child's parent locator paths in order (relative, volume, absolute,
then by file name), then the candidates of a DataWriteGuid scan; a *judge* looks at each
candidate and returns a :class:`Verdict`; :class:`Search` remembers every path tried and
turns what it met into a :class:`Found` (ok, mismatch, cycle, external or missing). The
Resolver judges by opening files; ``find_chains`` judges among files already read
(:class:`Peers`): both run this one algorithm.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterator, Mapping, Sequence

from ..file.image import Image
from .paths import candidate_paths, case_insensitive, file_key



class Link(str, Enum):
    """How a layer links to its parent (``Layer.linkage``), and what a look at a candidate found.

    A ``str`` enum: it compares equal to, prints as and serialises to its value ("ok", ...).
    """

    OK = "ok"              # the parent was found and matches
    MISMATCH = "mismatch"  # the same disk, but its DataWriteGuid changed since the child was made
    MISSING = "missing"    # no parent found
    CYCLE = "cycle"        # the chain refers back to one of its own files
    EXTERNAL = "external"  # a matching parent outside the scanned folder (orphans)
    NONE = "none"          # a base disk: no parent to link to
    SKIP = "skip"          # a candidate passed over (not a regular file, unreadable, ...)
    OTHER = "other"        # another disk (another Virtual Disk ID): passed over, named if the parent is missing

    __str__ = str.__str__
    __format__ = str.__format__


MATCH, MISMATCH, CYCLE, EXTERNAL, SKIP, OTHER = (Link.OK, Link.MISMATCH, Link.CYCLE, Link.EXTERNAL, Link.SKIP,
                                                 Link.OTHER)


@dataclass
class Verdict:
    """What a look at one candidate file says: MATCH, MISMATCH, CYCLE, EXTERNAL, OTHER or SKIP.

    ``path`` is the file's own path (a candidate may name it by another spelling); ``note``
    goes into the list of paths tried; ``image`` is the opened parent of a MATCH, if opened.
    """

    kind: str
    path: str = ""
    note: str = ""
    image: Image | None = None
    guid: uuid.UUID | None = None  # the DataWriteGuid of a MISMATCH
    other_disk: bool = False  # a MISMATCH that is another disk (a parent the user named): ``note`` says so


@dataclass
class Found:
    """How the search for one child's parent ended.

    ``state``: "ok" (``path`` is the parent), "mismatch" (``path`` is where the parent should
    be, with DataWriteGuid ``guid``), "cycle", "external" (``path`` is a matching parent
    outside the files searched, see :meth:`Resolver.locate_among`) or "missing". ``how`` says
    which locator entry or scan found it; ``tried`` lists every path tried; ``others`` says
    which other disks (another Virtual Disk ID) were found where, and why each is not the parent.
    """

    state: Link
    path: str | None = None
    how: str = ""
    tried: list[str] = field(default_factory=list)
    image: Image | None = None
    guid: uuid.UUID | None = None
    others: list[str] = field(default_factory=list)
    why: str = ""  # of a mismatch with another disk: what it is


class Search:
    """One child's parent search: the paths tried, and what each look found."""

    def __init__(self, judge: Callable[[str, str], Verdict]) -> None:
        self.judge = judge
        self.tried: list[str] = []
        self.mismatches: list[tuple[str, Verdict]] = []
        self.skip: set[str] = set()  # mismatched files: a DataWriteGuid scan does not look at them again
        self.cycle = False
        self.external: tuple[str, Verdict] | None = None
        self.others: list[str] = []  # "found X at the relative_path, but it is a different disk (...)"

    def consider(self, how: str, path: str) -> Found | None:
        """Look at one candidate; the Found if it is the parent, else None (and remember why not)."""
        self.tried.append(f"{how}: {path}")
        local = case_insensitive(path)
        if local is None:
            return None
        verdict = self.judge(how, local)
        if verdict.note:
            self.tried[-1] += " (a different disk)" if verdict.kind == OTHER else f" ({verdict.note})"
        if verdict.kind == MATCH:
            return Found(Link.OK, verdict.path, how, self.tried, verdict.image)
        if verdict.kind == MISMATCH:
            self.mismatches.append((how, verdict))
            self.skip.add(verdict.path)
        elif verdict.kind == CYCLE:
            self.cycle = True
        elif verdict.kind == EXTERNAL and self.external is None:
            self.external = (how, verdict)
        elif verdict.kind == OTHER:
            where = how.replace("_path", " path").replace("_", " ")
            self.others.append(f"found {verdict.path} at the {where}, but it is {verdict.note}")
        return None

    def outcome(self) -> Found:
        """What the search found when no candidate matched: a mismatch, a cycle, an external parent
        or nothing."""
        if self.mismatches:
            how, verdict = self.mismatches[0]
            return Found(Link.MISMATCH, verdict.path, how, self.tried, guid=verdict.guid,
                         why=verdict.note if verdict.other_disk else "")
        if self.cycle:
            return Found(Link.CYCLE, None, "", self.tried)
        if self.external is not None:
            how, verdict = self.external
            return Found(Link.EXTERNAL, verdict.path, how, self.tried)
        return Found(Link.MISSING, None, "", self.tried, others=self.others)


class Peers:
    """Files already read (path -> DataWriteGuid, and their Virtual Disk IDs), found by their path or by
    file identity."""

    def __init__(self, guids: Mapping[str, uuid.UUID], disk_ids: Mapping[str, uuid.UUID] | None = None) -> None:
        self.guids = dict(guids)
        self.disk_ids = dict(disk_ids or {})  # path -> Virtual Disk ID (page 83), where known
        self.by_key: dict[tuple[int, int], str] = {}
        self.by_guid: dict[uuid.UUID, list[str]] = {}
        for path, guid in self.guids.items():
            key = _key_or_none(path)
            if key is not None:
                self.by_key.setdefault(key, path)
            self.by_guid.setdefault(guid, []).append(path)

    def find(self, path: str) -> str | None:
        """The peer that ``path`` names (itself, or the same file by another name), or None."""
        if path in self.guids:
            return path
        key = _key_or_none(path)
        return self.by_key.get(key) if key is not None else None


def _key_or_none(path: str) -> tuple[int, int] | None:
    try:
        return file_key(path)
    except OSError:
        return None


def locate(search: Search, child_path: str, locator: Mapping[str, str], search_paths: Sequence[str],
           scan: Callable[[Search], Iterator[tuple[str, str]]]) -> Found:
    """The locator's paths in order (docs/format.md §9.3), then the scan's candidates; else what the
    search met. ``scan`` yields (how, path) pairs of files whose DataWriteGuid is wanted."""
    for how, path in candidate_paths(dict(locator), child_path, search_paths):
        found = search.consider(how, path)
        if found is not None:
            return found
    for how, path in scan(search):
        found = search.consider(how, path)
        if found is not None:
            return found
    return search.outcome()


def other_disk(path: str, guid: uuid.UUID, disk_id: uuid.UUID | None, expected: uuid.UUID,
               child_disk_id: uuid.UUID | None) -> Verdict | None:
    """OTHER when a candidate with DataWriteGuid ``guid`` is another disk than the parent a child
    expects: its Virtual Disk ID (page 83) is not the child's (a checkpoint keeps its parent's);
    None when it is the same disk (then a changed DataWriteGuid means the parent was modified)."""
    if child_disk_id is None or disk_id is None or disk_id == child_disk_id:
        return None
    return Verdict(OTHER, path, note=f"a different disk (DataWriteGuid {guid}, disk id {disk_id}) from the parent this "
                               f"checkpoint expects (DataWriteGuid {expected}, disk id {child_disk_id})")
