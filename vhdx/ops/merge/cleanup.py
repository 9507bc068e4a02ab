"""The steps after a merge's copy, and the search for a merge that stopped before them.

After the copy the merged files are deleted nearest the destination first (or, when kept,
the layer above lets go of the destination), then the journal records the merge as "done";
each step is safe to repeat. Only files that :func:`verify_journal` ties to the destination
are touched. A merge that stopped after its copy (journal "copied"), or whose deletes a power
loss undid (journal "done"), is found again from the child by :func:`find_finish`.
"""

from __future__ import annotations

import gc
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from ...chains.paths import candidate_paths, file_key
from ...chains.scan import VHDX_SUFFIXES, open_peek
from ...errors import MergeError, VhdxError
from ...file.image import Image
from ...file.storage import FileStorage, Storage
from ...format import constants as C
from ...format.locator import format_linkage, parse_linkage
from .journal import (JOURNAL_MAX_SOURCES, MERGE_JOURNAL_GUID, Journal, JournalMember, JournalState, allowed_folders,
                      deletable_problem, done_item, journal_names, load_journal, parse_journal, verify_journal,
                      without_journal)
from .plan import MergePlan

Wrap = Callable[[Storage], Storage]

# The fault-injection seam of the tests, internal (not part of the API): while a test is inside
# ``with wrapping_merge_storage(wrap):``, every file a merge opens for writing is ``wrap(storage)``.
_WRAPPERS: list[Wrap] = []


@contextmanager
def wrapping_merge_storage(wrap: Wrap) -> Iterator[Wrap]:
    """Internal, for the fault tests: open every file that a merge writes through ``wrap`` in the block."""
    _WRAPPERS.append(wrap)
    try:
        yield wrap
    finally:
        _WRAPPERS.remove(wrap)


def storage_wrapper() -> Wrap | None:
    """The wrapper of :func:`wrapping_merge_storage` in force, if any (None outside the tests)."""
    return _WRAPPERS[-1] if _WRAPPERS else None


def open_writable(path: str, wrap: Wrap | None) -> Image:
    """Open a file of the merge for writing; ``wrap`` is the fault-injection seam of the tests."""
    storage: Storage = FileStorage(path, writable=True)
    return Image.open(path, "r+", storage=wrap(storage) if wrap else storage)


def hold_exclusive(paths: Sequence[str], held: list[Storage]) -> None:
    """Lock each file exclusively (this process's later opens of it share the lock), into ``held``."""
    for p in paths:
        held.append(FileStorage(p, lock="exclusive"))


def _same_file(image: Image, key: tuple[int, int]) -> bool:
    """Whether ``image`` is open on the file ``key`` (st_dev, st_ino) names (True if it cannot tell)."""
    fd = image.storage.fileno()
    return fd is None or (os.fstat(fd).st_dev, os.fstat(fd).st_ino) == key


def unlinked(storage: Storage) -> bool:
    """Whether the file under ``storage`` has no name left (the merge deleted it)."""
    fd = storage.fileno()
    try:
        return fd is not None and os.fstat(fd).st_nlink == 0
    except OSError:
        return False


_RELEASES: list[threading.Thread] = []


def release_in_background(storages: list[Storage]) -> None:
    """Close ``storages`` (the held descriptors of deleted files) in a thread.

    The last close of a deleted file frees its space, which takes seconds for a big file (the
    kernel drops its extents, and with the ``discard`` mount option trims them). The deletes are
    durable already (the folder was synced after each), so the merge need not wait: the thread
    is not a daemon (the interpreter waits for it at exit), and :func:`wait_for_release` waits
    for it in a long-running process that needs the space back.

    A closed image still maps its BAT (a private map keeps the file alive as a descriptor does)
    until the image is garbage, and an image is in a reference cycle with its writer: so the
    thread first collects garbage, while ``storages`` still hold the files (unmapping is cheap
    then), and only then closes them. Otherwise the last unmap, at some later collection in the
    caller's thread or at interpreter exit, would free the space there.
    """
    if not storages:
        return
    thread = threading.Thread(target=collect_and_close, args=(list(storages),), name="vhdx-merge-release")
    _RELEASES[:] = [t for t in _RELEASES if t.is_alive()] + [thread]
    thread.start()


def wait_for_release() -> None:
    """Wait until the files earlier merges deleted are closed, and their space is free."""
    while _RELEASES:
        _RELEASES.pop().join()


def collect_and_close(storages: list[Storage]) -> None:
    """Unmap what garbage still maps (see :func:`release_in_background`), then close ``storages``."""
    gc.collect()
    close_all(storages)


def close_all(storages: list[Storage]) -> None:
    """Close each storage (a close that fails leaves the others to close)."""
    for storage in storages:
        try:
            storage.close()
        except Exception:  # noqa: BLE001 - a read-only descriptor of a deleted file: nothing is lost
            pass


def announce(path: str, current: uuid.UUID, new: uuid.UUID, wrap: Wrap | None) -> Image:
    """Step 1 of a merge (:mod:`.run`): make ``path`` accept both its parent's ``current`` and
    ``new`` DataWriteGuid (§9.5).

    parent_linkage takes the GUID that matches now and parent_linkage2 the one that will,
    so the link holds at every moment of the change (through the log; its own GUIDs stay).
    The change is durable when this returns (its log entry is flushed); the image stays open
    for writing, its log session too, until the merge ends (:func:`let_go`): with ``keep`` the
    same session lets go of the destination at the end, and a deleted file is never closed
    cleanly at all, so the session's closing flush and header updates are paid at most once.
    """
    image = open_writable(path, wrap)
    try:
        loc = dict(image.metadata.parent_locator or {})
        l1, l2 = parse_linkage(loc.get("parent_linkage")), parse_linkage(loc.get("parent_linkage2"))
        if l2 == new and (l1 == current or current == new):
            return image
        if current != new:  # on a resumed merge the destination already carries ``new``: keep l1
            loc["parent_linkage"] = format_linkage(current)
        loc["parent_linkage2"] = format_linkage(new)
        image.write_parent_locator(loc)
    except BaseException:
        image.close()
        raise
    return image


def let_go(image: Image) -> None:
    """Close the layer that step 1 opened: cleanly (flush, LogGuid cleared) while it has a name;
    a file the merge deleted is only closed, without flushes (its log would only matter to a
    reader of the file, and there is none: a power loss that brings the name back leaves the
    log to replay, as after any interruption)."""
    if unlinked(image.storage) or not os.path.lexists(image.path):
        image.abort()
    else:
        image.close()


def unlink_merged(member: JournalMember, original: uuid.UUID, wrap: Wrap | None, above: Image | None = None) -> None:
    """After the merge the merged layer is invalid: it links to the destination's old GUID only.

    Reading it over the merged destination would mix old and new data, so it must not open
    as a chain any more (as with Hyper-V, merged files are invalid afterwards). ``above`` is
    that layer already open for writing (the merge's own, in its log session; left open),
    else the file is opened and closed here.
    """
    image = open_writable(member.path, wrap) if above is None else above
    try:
        if not _same_file(image, member.key):
            raise MergeError("the file changed while the merge checked it; it was left alone", path=member.path)
        loc = dict(image.metadata.parent_locator or {})
        if parse_linkage(loc.get("parent_linkage")) == original and \
                parse_linkage(loc.get("parent_linkage2")) in (None, C.ZERO_GUID):
            return
        loc["parent_linkage"] = format_linkage(original)
        loc["parent_linkage2"] = format_linkage(C.ZERO_GUID)
        image.write_parent_locator(loc)
    finally:
        if above is None:
            image.close()


def delete_members(members: Sequence[JournalMember]) -> list[str]:
    """Delete checked files in the order given; each delete is made durable (folder fsync) before
    the next, so a power loss never brings back a file nearer the destination than one it kept away.
    A file already gone is skipped; a file replaced since it was checked stops the cleanup."""
    deleted = []
    for m in members:
        folder, name = os.path.split(m.path)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # deleted already (by another run of the same merge)
            if (st.st_dev, st.st_ino) != m.key:
                raise MergeError("the file changed while the merge checked it; it was not deleted", path=m.path)
            os.unlink(name, dir_fd=dfd)
            os.fsync(dfd)
        finally:
            os.close(dfd)
        deleted.append(m.path)
    return deleted


def nearest_first(members: Sequence[JournalMember | None]) -> list[JournalMember]:
    """The files that are still there, nearest the destination first (the order they are deleted in)."""
    return [m for m in reversed(members) if m is not None]


def refuse_kept(members: Sequence[JournalMember | None], dest_path: str, child: str) -> None:
    """Kept files (``--keep``) let go of the destination: they are invalid, never merged or deleted."""
    if any(m is not None and m.status == "unlinked" for m in members):
        raise MergeError(f"this disk was already merged into {dest_path} (and kept with --keep); kept files "
                         f"are invalid and must not be merged again", path=child)


def plan_deletes(plan: MergePlan, keep: bool, allowed: set[str]) -> list[str]:
    """The files the merge will delete, nearest the destination first; refused if one may not be."""
    if keep:
        return []
    for path in plan.sources:
        problem = deletable_problem(path, allowed)
        if problem:
            raise MergeError(f"the merge may not delete a file it merges: {problem}; name the file itself, or "
                             f"its folder with --search, or merge with --keep; nothing was changed", path=plan.child)
    return list(reversed(plan.sources))


def complete(dest: Image, dest_path: str, keep: bool, wrap: Wrap | None, allowed: set[str],
             child: str = "", above: Image | None = None) -> list[str]:
    """The steps after the copy, each safe to repeat: the merged files go (or, with ``keep``,
    let go of the destination), then the journal records the merge as done.

    ``dest`` is the destination open for writing; its journal is read from it again here.
    Only files that :func:`verify_journal` ties to the destination are touched. ``above`` is the
    layer right above the destination if the caller has it open for writing already."""
    journal = load_journal(dest)
    if journal is None:
        return []
    members = verify_journal(journal, dest_path, allowed)
    deleted = []
    if keep:
        # Kept files are invalid now: the layer above lets go of the destination, so neither
        # it nor anything above it opens over data that no longer matches.
        if members[-1] is not None and members[-1].status == "linked":
            unlink_merged(members[-1], journal.original_data_write_guid, wrap, above)
    else:
        refuse_kept(members, dest_path, child or dest_path)
        # Nearest the destination first: if this stops half way, what is left has a missing
        # parent (plainly broken), never a stale link to the merged destination.
        deleted = delete_members(nearest_first(members))
    if journal.state != JournalState.DONE:
        dest.write_metadata_items(without_journal(dest) + [done_item(journal, keep)], data_change=False)
    return deleted


# --------------------------------------------------------------------------- finding a merge to finish

@dataclass
class Candidate:
    """What the search for a merge to finish needs from one file."""

    path: str
    raw_journal: bytes | None
    data_write_guid: uuid.UUID
    disk_type: str
    size: int
    parent: str | None

    @classmethod
    def of(cls, image: Image, path: str | None = None) -> "Candidate":
        """The candidate an open image is (under ``path`` if given, else its own)."""
        path = image.path if path is None else path
        raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
        loc = image.metadata.parent_locator or {} if image.has_parent else {}
        parent = next((p for how, p in candidate_paths(loc, path, []) if how == "relative_path"), None)
        return cls(path, None if raw is None else bytes(raw), image.header.data_write_guid, image.disk_type,
                   image.size, parent)


def _peek(path: str) -> Candidate | None:
    """Read-only look at a regular VHDX file; None if it is not one."""
    try:
        # A file in use is read without a lock: if its journal names the child, the exclusive
        # lock taken before the cleanup refuses to go on while the other process holds it.
        image, _in_use = open_peek(path)
    except (VhdxError, OSError):
        return None
    try:
        return Candidate.of(image, path)
    finally:
        image.close()


def _into_candidate(into: str, images: Sequence[Image]) -> Candidate | None:
    """The file ``into`` names: one of the open ``images`` if it is one, else a peek."""
    path = os.path.abspath(into)
    if images and os.path.exists(path):
        key = file_key(path)
        for image in images:
            if file_key(image.path) == key:
                return Candidate.of(image, path)
    return _peek(path)


def _walk(child: str, images: Sequence[Image]) -> Iterator[Candidate]:
    """The files below ``child`` by relative path; the open ``images`` (child first) while they are those."""
    here = Candidate.of(images[0]) if images else _peek(child)
    for i in range(1, JOURNAL_MAX_SOURCES + 1):
        if here is None or not here.parent:
            return
        if i < len(images) and images[i].path == here.parent:
            here = Candidate.of(images[i])
        else:
            here, images = _peek(here.parent), ()
        if here is None:
            return
        yield here


def finish_candidates(child: str, into: str | os.PathLike[str] | None,
                      images: Sequence[Image] = ()) -> Iterator[Candidate]:
    """Files that may hold the journal of a merge of ``child`` to finish: ``into``; else the files
    below the child by relative path (a restored file may sit above a layer that is back too);
    else, when the child is gone, every regular VHDX file of its folder. ``images`` are the child's
    chain, already open (child first): they are read instead of opening their files again."""
    if into is not None:
        found = _into_candidate(os.fspath(into), images)
        if found is not None:
            yield found
    elif images or os.path.exists(child):
        yield from _walk(child, images)
    else:
        folder = os.path.dirname(child)
        try:
            names = [n for n in sorted(os.listdir(folder)) if n.lower().endswith(VHDX_SUFFIXES)]
        except OSError:
            names = []
        for name in names:
            found = _peek(os.path.join(folder, name))
            if found is not None:
                yield found


@dataclass
class Finish:
    """A merge to finish: its destination, journal, the files it ties to it, and the plan."""

    dest: Candidate
    journal: Journal
    members: list[JournalMember | None]
    allowed: set[str]
    plan: MergePlan

    @property
    def done(self) -> bool:
        """Whether the merge finished before (only deletes a power loss undid are left)."""
        return self.journal.state == JournalState.DONE


def _finish_plan(journal: Journal, members: list[JournalMember | None], dest: Candidate, child: str,
                 keep: bool) -> MergePlan:
    """The plan of a finish: nothing to copy; ``to_delete`` the files that are still there."""
    existing = nearest_first(members)
    if journal.state == JournalState.DONE or not keep:
        refuse_kept(members, dest.path, child)
    if journal.state == JournalState.DONE and os.path.exists(child) and \
            file_key(child) not in {m.key for m in existing}:
        raise MergeError(f"this disk was already merged into {dest.path}, and this copy of it is not a file "
                         f"that merge left behind; it is not deleted", path=child)
    return MergePlan(child=child, destination=dest.path, sources=[s.path for s in journal.sources],
                     destination_type=dest.disk_type, virtual_size=dest.size, resuming=True,
                     to_delete=[] if keep and journal.state != JournalState.DONE else [m.path for m in existing])


def _finishable(found: Candidate, child: str, child_guid: uuid.UUID | None) -> Journal | None:
    """The journal of ``found`` if it is a merge of ``child`` past its copy, else None."""
    if found.raw_journal is None:
        return None
    try:
        journal = parse_journal(found.raw_journal, found.path)
    except MergeError:
        return None  # refused by the merge itself if this is its destination
    if journal.state == JournalState.COPYING or not journal_names(journal, child, child_guid):
        return None
    return journal


def find_finish(child: str, into: str | os.PathLike[str] | None, keep: bool, folders: Sequence[str] = (),
                images: Sequence[Image] = ()) -> Finish | None:
    """The merge of ``child`` that stopped after its copy, or None if there is none to finish.

    The destination holds a journal in state "copied" that lists this child: the data is all
    there, and only the steps of :func:`complete` are left. State "done": the merge finished
    before; files of it that are still there (a power loss undid their deletion) are to delete.
    Either way only files that :func:`verify_journal` ties to the destination are named.
    """
    child_guid = images[0].header.data_write_guid if images else None
    for found in finish_candidates(child, into, images):
        journal = _finishable(found, child, child_guid)
        if journal is None:
            continue
        allowed = allowed_folders(found.path, child, folders=folders)
        if journal.state == JournalState.DONE and found.data_write_guid != journal.new_data_write_guid:
            if os.path.exists(child):
                raise MergeError(f"this disk was already merged into {found.path}, which has changed since; "
                                 f"it is invalid and must not be merged again", path=child)
            members: list[JournalMember | None] = []
        else:
            members = verify_journal(journal, found.path, allowed)
        plan = _finish_plan(journal, members, found, child, keep)
        return Finish(found, journal, members, allowed, plan)
    return None
