"""The merge journal's one home: the user metadata item a merge keeps in its destination.

The journal says which merge is under way and how far it got ("copying", "copied", "done").
Here it is written (:func:`journal_item`), read and checked against the one shape we write
(:func:`parse_journal`), and tied to real files: :func:`verify_journal` finds the files a
journal may act on, only in allowed folders and only when they link down to the destination.
``vhdx check`` audits a journal with :func:`audit_journal`; ``vhdx chain`` and the orphan scan
ask :func:`merge_in_progress` / :func:`interrupted_merge_at`.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from ...chains.paths import candidate_paths, file_key
from ...chains.scan import linkage_of, open_found, read_data_write_guid
from ...errors import MergeError, VhdxError
from ...file.image import Image
from ...format import constants as C
from ...format.records import MetadataItem, metadata_items
from .plan import MergePlan

MERGE_JOURNAL_GUID = uuid.UUID("5b1f2a4e-9c0d-4d7e-8a53-7d6c3e9b1a01")  # our user item (vhdx.merge)



class JournalState(str, Enum):
    """How far a merge got: "copying", "copied" (all data is in the destination), "done" (a record).

    A ``str`` enum: it compares equal to, prints as and serialises to its value."""

    COPYING = "copying"
    COPIED = "copied"
    DONE = "done"

    __str__ = str.__str__
    __format__ = str.__format__


JOURNAL_STATES = tuple(state.value for state in JournalState)
JOURNAL_MAX_BYTES = 1 << 20  # a metadata item holds at most 1 MiB (§4.1)
JOURNAL_MAX_SOURCES = 1024
JOURNAL_MAX_PATH = 4096
_JOURNAL_KEYS = {"tool", "state", "sources", "child", "new_data_write_guid", "original_data_write_guid",
                 "started", "finished", "keep"}
_SOURCE_KEYS = {"path", "relative", "data_write_guid"}


@dataclass(frozen=True)
class JournalSource:
    """One merged file as the journal records it (leaf first)."""

    path: str
    relative: str
    data_write_guid: uuid.UUID


@dataclass(frozen=True)
class Journal:
    """A merge journal that passed the schema check; ``body`` is the decoded JSON."""

    state: JournalState
    sources: tuple[JournalSource, ...]
    new_data_write_guid: uuid.UUID
    original_data_write_guid: uuid.UUID
    keep: bool | None
    body: dict[str, Any]


def journal_item(plan: MergePlan, new_guid: uuid.UUID, original: uuid.UUID, source_guids: list[str],
                 state: JournalState = JournalState.COPYING, keep: bool = False) -> MetadataItem:
    """Our user metadata item: which merge is under way, and how far it got.

    States: "copying", "copied" (all data is in the destination), "done" (kept as a record).
    Sources are recorded by DataWriteGuid and by path relative to the destination, so the
    journal still finds them after the folder was moved or copied. ``keep`` tells a kept
    (deliberately unlinked) file from one that a power loss brought back.
    """
    folder = os.path.dirname(os.path.abspath(plan.destination))
    sources = [dict(path=p, relative=os.path.relpath(p, folder), data_write_guid=g)
               for p, g in zip(plan.sources, source_guids)]
    data = json.dumps(dict(tool="vhdx", state=state, sources=sources, child=plan.child,
                           new_data_write_guid=str(new_guid), original_data_write_guid=str(original),
                           started=int(time.time()), keep=keep)).encode()
    return MetadataItem(MERGE_JOURNAL_GUID, data, C.METADATA_IS_USER)


def done_item(journal: Journal, keep: bool) -> MetadataItem:
    """The journal of a finished merge: it stays as a record ("done"), so that a re-run of the same
    command after an interruption can tell that the job is finished."""
    done = dict(journal.body, state=JournalState.DONE.value, finished=int(time.time()), keep=keep)
    return MetadataItem(MERGE_JOURNAL_GUID, json.dumps(done).encode(), C.METADATA_IS_USER)


def _guid_field(value: Any, what: str) -> uuid.UUID:
    if not isinstance(value, str) or len(value) != 36:
        raise ValueError(f"{what} is not a GUID string")
    try:
        guid = uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a GUID") from None
    if str(guid) != value.lower() or guid == C.ZERO_GUID:
        raise ValueError(f"{what} {value!r} is not a GUID")
    return guid


def _path_field(value: Any, what: str, *, absolute: bool) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= JOURNAL_MAX_PATH or "\0" in value:
        raise ValueError(f"{what} is not a path of 1 to {JOURNAL_MAX_PATH} characters")
    if os.path.isabs(value) != absolute:
        raise ValueError(f"{what} {value[:200]!r} must be {'an absolute' if absolute else 'a relative'} path")
    return value


def _journal_source(value: Any, i: int) -> JournalSource:
    if not isinstance(value, dict) or set(value) != _SOURCE_KEYS:
        raise ValueError(f"source {i} is not an object with exactly the keys {sorted(_SOURCE_KEYS)}")
    return JournalSource(_path_field(value["path"], f"source {i} path", absolute=True),
                         _path_field(value["relative"], f"source {i} relative path", absolute=False),
                         _guid_field(value["data_write_guid"], f"source {i} data_write_guid"))


def _check_shape(body: Any) -> None:
    """The journal is an object of our keys, written by us, in a known state."""
    if not isinstance(body, dict):
        raise ValueError("it is not a JSON object")
    unknown = sorted(set(body) - _JOURNAL_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown[:5]}")
    if body.get("tool") != "vhdx" or body.get("state") not in JOURNAL_STATES:
        raise ValueError(f"tool must be 'vhdx' and state one of {list(JOURNAL_STATES)}")


def _check_details(body: dict[str, Any]) -> None:
    """The journal's child, times and ``keep`` have the types we write."""
    if not isinstance(body.get("child", ""), str) or len(body.get("child", "")) > JOURNAL_MAX_PATH:
        raise ValueError("child is not a path")
    for key in ("started", "finished"):
        if key in body and (type(body[key]) is not int or not 0 <= body[key] < 1 << 63):
            raise ValueError(f"{key} is not a time")
    if "keep" in body and not isinstance(body["keep"], bool):
        raise ValueError("keep is not true or false")


def _journal_from(body: Any) -> Journal:
    """Check the decoded JSON against the one shape we write; ValueError says what is wrong."""
    _check_shape(body)
    raw_sources = body.get("sources")
    if not isinstance(raw_sources, list) or not 0 < len(raw_sources) <= JOURNAL_MAX_SOURCES:
        raise ValueError(f"sources must be a list of 1 to {JOURNAL_MAX_SOURCES} files")
    sources = tuple(_journal_source(s, i) for i, s in enumerate(raw_sources))
    new = _guid_field(body.get("new_data_write_guid"), "new_data_write_guid")
    original = _guid_field(body.get("original_data_write_guid"), "original_data_write_guid")
    guids = [s.data_write_guid for s in sources] + [new, original]
    if len(set(guids)) != len(guids):
        raise ValueError("a DataWriteGuid appears twice")
    _check_details(body)
    return Journal(JournalState(body["state"]), sources, new, original, body.get("keep"), body)


def parse_journal(raw: bytes, path: str) -> Journal:
    """A journal read from ``path``'s metadata, validated; MergeError when it is not one we wrote."""
    try:
        if len(raw) > JOURNAL_MAX_BYTES:
            raise ValueError(f"{len(raw)} bytes, over {JOURNAL_MAX_BYTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise ValueError("it is not JSON") from None
        return _journal_from(body)
    except ValueError as e:
        raise MergeError(f"untrusted merge journal: {e}; nothing was deleted", path=path) from None


def read_journal(image: Image) -> dict[str, Any] | None:
    """The decoded JSON of ``image``'s merge journal as stored (unvalidated; {} if not JSON)."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    if raw is None:
        return None
    try:
        body = json.loads(raw.decode())
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def load_journal(image: Image) -> Journal | None:
    """``image``'s merge journal, validated (MergeError if it fails), or None if there is none."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    return None if raw is None else parse_journal(bytes(raw), image.path)


def without_journal(image: Image) -> list[MetadataItem]:
    """``image``'s metadata items but the merge journal, to write back with a new one."""
    return [it for it in metadata_items(image.metadata) if it.item_id != MERGE_JOURNAL_GUID]


def resumable(journal: Journal | None, sources: Sequence[Image], dest_path: str) -> Journal | None:
    """The destination's journal if it records this same merge unfinished (to resume it), else None.

    A finished merge's record ("done") is ignored; an unfinished merge of other files is refused.
    """
    if journal is None or journal.state == JournalState.DONE:
        return None
    if [s.data_write_guid for s in journal.sources] != [im.header.data_write_guid for im in sources]:
        names = ", ".join(os.path.basename(s.path) for s in journal.sources[:4])
        raise MergeError(f"the merge journal records an unfinished merge of other files into this disk "
                         f"({names}); run that merge again to finish it; nothing was changed", path=dest_path)
    return journal


# --------------------------------------------------------------------------- whom a journal may name

@dataclass
class JournalMember:
    """A file that holds one journal record: checked, with what it links to."""

    index: int
    path: str
    key: tuple[int, int]  # (st_dev, st_ino): the file deleted must be the file checked
    linkage: tuple[uuid.UUID | None, uuid.UUID | None]
    parent_paths: list[str]
    status: str = ""  # for the record next to the destination: "linked" or "unlinked"


def _places(record: JournalSource, dest_folder: str) -> list[str]:
    """Where a record's file may be: beside the destination by relative path, then its old path."""
    out = []
    for p in (os.path.join(dest_folder, record.relative), record.path):
        p = os.path.normpath(p)
        if p not in out:
            out.append(p)
    return out


def deletable_problem(path: str, allowed: set[str]) -> str | None:
    """Why the merge may not delete ``path`` (None if it may): regular files in allowed folders only."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"{path} cannot be examined: {e.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if os.path.realpath(os.path.dirname(path)) not in allowed:
        return f"{path} is outside the destination's folder and the folders named with --search"
    return None


def _member_at(path: str, index: int, record: JournalSource, allowed: set[str]) -> JournalMember | None:
    """The checked member at ``path``, None if another disk is there; ValueError if it may not be one."""
    problem = deletable_problem(path, allowed)
    if problem:
        raise ValueError(problem)
    st = os.lstat(path)
    try:
        image = Image.open(path, "r")
    except (VhdxError, OSError):
        raise ValueError(f"{path} is not a VHDX file") from None
    try:
        fd = image.storage.fileno()
        if fd is not None and (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
            raise ValueError(f"{path} changed while it was examined")
        if image.header.data_write_guid != record.data_write_guid:
            return None
        if not image.has_parent:
            raise ValueError(f"{path} is not a differencing disk")
        loc = image.metadata.parent_locator or {}
        parents = [p for how, p in candidate_paths(loc, path, [])
                   if how in ("relative_path", "volume_path", "absolute_win32_path")]
        return JournalMember(index, path, (st.st_dev, st.st_ino), linkage_of(image), parents)
    finally:
        image.close()


def _locate(index: int, record: JournalSource, dest_folder: str, allowed: set[str]) -> JournalMember | None:
    """The file holding ``record`` in an allowed folder, or None.

    Places outside the allowed folders are never acted on (a folder copied elsewhere keeps
    its files there); what sits at a place inside them must pass :func:`_member_at`.
    """
    for place in _places(record, dest_folder):
        if not os.path.lexists(place) or os.path.realpath(os.path.dirname(place)) not in allowed:
            continue
        member = _member_at(place, index, record, allowed)
        if member is not None:
            return member
    return None


def _check_links(journal: Journal, members: list[JournalMember | None], dest_folder: str) -> None:
    """The records must be one chain down to the destination: each file links to the next record.

    A file whose next record is gone must name, as its parent's, a place of that record where
    nothing is (a deleted parent, not one merely left out). The file next to the destination
    must link to its new DataWriteGuid (``linked``), or, after ``keep``, be let go of
    (``unlinked``: parent_linkage back to the original, parent_linkage2 zero).
    """
    last = len(journal.sources) - 1
    for i, m in enumerate(members):
        if m is None:
            continue
        l1, l2 = m.linkage
        if i < last:
            if journal.sources[i + 1].data_write_guid not in (l1, l2):
                raise ValueError(f"{m.path} is not a child of the next file the journal lists")
            if members[i + 1] is None and not any(
                    not os.path.lexists(p) for p in set(m.parent_paths) & set(_places(journal.sources[i + 1],
                                                                                      dest_folder))):
                raise ValueError(f"{m.path} does not name the journal's next file, deleted, as its parent")
        elif l2 == journal.new_data_write_guid:
            m.status = "linked"
        elif l1 == journal.original_data_write_guid and l2 is None and journal.keep is not False:
            m.status = "unlinked"
        else:
            raise ValueError(f"{m.path} does not link to the destination")


def verify_journal(journal: Journal, dest_path: str, allowed: set[str]) -> list[JournalMember | None]:
    """The files a journal may act on, one per record (None: gone); MergeError if it names others.

    Only allowed folders are looked in (real paths). There, every record's file must be a
    regular file (never a symbolic link), open as a VHDX with the recorded DataWriteGuid, and be
    tied to the destination through the others by parent linkage (:func:`_check_links`).
    """
    dest_folder = os.path.dirname(os.path.abspath(dest_path))
    dest_key = file_key(dest_path)
    members: list[JournalMember | None] = []
    try:
        for i, record in enumerate(journal.sources):
            m = _locate(i, record, dest_folder, allowed)
            if m is not None and m.key == dest_key:
                raise ValueError(f"{m.path} is the destination itself")
            members.append(m)
        _check_links(journal, members, dest_folder)
    except ValueError as e:
        raise MergeError(f"untrusted merge journal: {e}; nothing was deleted", path=dest_path) from None
    return members


def allowed_folders(*paths: str, folders: Sequence[str] = ()) -> set[str]:
    """The real folders a merge may delete in: those of ``paths`` (files) and ``folders``."""
    out = {os.path.realpath(os.path.dirname(os.path.abspath(p))) for p in paths}
    return out | {os.path.realpath(f) for f in folders}


def journal_names(journal: Journal, child: str, child_guid: uuid.UUID | None = None) -> bool:
    """Whether the journal lists ``child`` (by DataWriteGuid if it exists, else by file name);
    ``child_guid`` is the child's DataWriteGuid when its caller has it open already."""
    if child_guid is not None or os.path.exists(child):
        guid = child_guid if child_guid is not None else read_data_write_guid(child)
        return any(r.data_write_guid == guid for r in journal.sources)
    name = os.path.basename(child)
    return any(os.path.basename(r.relative) == name for r in journal.sources)


def audit_journal(path: str | os.PathLike[str], search_paths: Sequence[str] = ()) -> str | None:
    """What is wrong with ``path``'s merge journal (None if nothing, or if it has none); reads only.

    A journal in progress must pass :func:`verify_journal`; a "done" one is a record that a
    merge acts on only while the destination still carries its new DataWriteGuid.
    """
    path = os.fspath(path)
    image = Image.open(path, "r")
    try:
        raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
        guid = image.header.data_write_guid
    finally:
        image.close()
    if raw is None:
        return None
    try:
        journal = parse_journal(bytes(raw), path)
        if journal.state == JournalState.DONE and guid != journal.new_data_write_guid:
            return None
        verify_journal(journal, path, allowed_folders(path, journal.sources[0].path, folders=search_paths))
    except MergeError as e:
        return e.detail.replace("untrusted merge journal: ", "").replace("; nothing was deleted", "")
    return None


# --------------------------------------------------------------------------- interrupted merges

def merge_in_progress(image: Image) -> bool:
    """Whether an interrupted merge left its journal in this file's metadata."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    if raw is None:
        return False
    try:
        return json.loads(raw.decode()).get("state") != "done"
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return True


def interrupted_merge_at(path: str, *, share: bool = False) -> bool:
    """Whether the file at ``path`` holds the journal of an interrupted merge (False if unreadable)."""
    try:
        image = open_found(path, share=share)
    except (VhdxError, OSError):
        return False
    try:
        return merge_in_progress(image)
    finally:
        image.close()
