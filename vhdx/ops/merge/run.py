"""Merge: fold differencing layers into an ancestor, like Hyper-V's Merge-VHD.

The protocol, in numbered steps over files opened once (docs/format.md §7.4, §9.5): the chain
is resolved and planned read-only (:mod:`.plan`); then (1) the layer right above the
destination learns, as ``parent_linkage2``, the GUID the destination will carry, so at every
moment one of its two linkage GUIDs matches and the chain stays readable; (2) the destination
gets its journal (:mod:`.journal`) and new DataWriteGuid in one go; (3) the data is copied one
batch of windows per transaction: blocks allocated in a batch, data copied with
copy_file_range (or a reused buffer), flushed, then BAT and bitmap changes through the log;
(4) the destination takes the child's virtual-disk items and its journal says "copied";
(5) the merged files go and the journal says "done" (:mod:`.cleanup`). Data reads through the
child never change during a merge: the destination only receives sectors that the sources
define, and the sources are not modified. Running the same merge again redoes the copy (it is
idempotent) or, past the copy, only the last steps. The layer of step (1) stays open in one log
session until (5): a deleted one is never closed cleanly, a kept one lets go in the same session.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, overload

from ...chains.paths import PathArgs, file_key, path_list
from ...chains.resolve import Layer, Resolver
from ...chains.scan import ScanCache
from ...errors import MergeError, VhdxError, as_callback, as_path
from ...file.copy import Copier
from ...file.image import Image
from ...file.storage import Storage
from ...format import constants as C
from ...format.records import MetadataItem, metadata_items
from .cleanup import (Wrap, announce, complete, delete_members, find_finish, hold_exclusive, let_go, nearest_first,
                      open_writable, plan_deletes, release_in_background, storage_wrapper, unlinked, wait_for_release)
from .journal import Journal, JournalState, allowed_folders, journal_item, load_journal, read_journal, resumable, without_journal
from .owners import BatView, window_size, window_spans
from .owners import planned as _planned  # the copy's one seam: tests/cli/test_demo.py patches run._planned
from .plan import MergePlan, check_free_space, dependents, no_space, plan_merge, stopped_error, used_bytes

__all__ = ["MergePlan", "MergeResult", "merge", "read_journal", "wait_for_release"]  # read_journal: for older imports from here

BATCH_BYTES = 1 << 30  # destination data per transaction: each costs three flushes
BATCH_EXTENTS = 1 << 16  # ... and at most this many extents, to bound memory
Progress = Callable[[int, int], None]


@dataclass
class MergeResult:
    """What a merge did: its plan, the bytes copied and how fast, the files deleted.

    ``bytes_copied`` counts every byte of data the destination received from the sources
    (zeros not counted); ``bytes_cloned`` is the part of it that shares the sources' extents
    (a reflink clone on XFS or btrfs: no data moved), the rest was copied.
    """

    plan: MergePlan
    bytes_copied: int
    seconds: float
    deleted: list[str]
    broken_dependents: list[str]
    new_data_write_guid: str
    bytes_cloned: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON-ready values, with the throughput in MiB/s."""
        d = asdict(self)
        d["throughput_mib_s"] = self.bytes_copied / max(self.seconds, 1e-9) / (1 << 20)
        return d


@dataclass
class _Job:
    """One call of :func:`merge`: what was asked, and the locks it holds (released by the caller)."""

    child: str
    into: str | os.PathLike[str] | None
    progress: Progress | None
    ignore_id_mismatch: bool
    keep: bool
    force: bool
    search: list[str]
    dry_run: bool
    wrap: Wrap | None
    on_plan: Callable[[MergePlan], None] | None
    held: list[Storage] = field(default_factory=list)
    t0: float = 0.0
    above: Image | None = None  # the layer right above the destination, open for writing from step 1



@dataclass
class _Chain:
    """The resolved chain, open read-only, and what planning made of it."""

    images: list[Image]  # leaf .. base
    dest_index: int
    plan: MergePlan
    journal: Journal | None  # of an unfinished run of this same merge, to resume
    views: list[BatView]  # of the sources, leaf first
    windows: list[Any]  # (start, length, extents) of each window, as planned; empty: plan them again

    @property
    def sources(self) -> list[Image]:
        """The images merged into the destination, leaf first."""
        return self.images[:self.dest_index]


@dataclass(frozen=True)
class _Stamp:
    """What the journal records about this merge, in every state it writes."""

    plan: MergePlan
    new_guid: uuid.UUID
    original: uuid.UUID
    source_guids: list[str]
    keep: bool

    def item(self, state: JournalState) -> MetadataItem:
        """The journal item in ``state``."""
        return journal_item(self.plan, self.new_guid, self.original, self.source_guids, state, self.keep)


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Progress | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: PathArgs = (),
          dry_run: Literal[False] = False, on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult:
    """Merge, and say what was done."""


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Progress | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: PathArgs = (),
          dry_run: Literal[True], on_plan: Callable[[MergePlan], None] | None = None) -> MergePlan:
    """Plan the merge and write nothing."""


def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Progress | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: PathArgs = (),
          dry_run: bool = False, on_plan: Callable[[MergePlan], None] | None = None) -> MergeResult | MergePlan:
    """Merge ``child`` into its parent, or every layer down to the ancestor ``into``.

    Afterwards the destination reads exactly as the child did and has a new DataWriteGuid;
    the merged files are deleted unless ``keep``. Refuses (listing them) when other disks
    depend on the destination unless ``force``. ``dry_run`` returns the plan and writes nothing.
    ``on_plan`` is called with the plan (its ``to_delete`` lists every file that will be deleted)
    before anything is written. Files are deleted only in the destination's folder, the child's
    and the ``search_paths`` (one folder, a str or PathLike, or a list of them).

    Every file the merge writes or deletes (the sources and the destination) is locked
    exclusively before the plan is made and until the merge returns, the child first, before
    anything else is read: a second merge of the same chain, a writer, or a reader (qemu's or
    ours) is refused with :class:`LockedError`. A dry run takes shared locks only.
    """
    into = as_path(into, "into") if into is not None else None
    progress, on_plan = as_callback(progress), as_callback(on_plan, "on_plan")
    job = _Job(os.path.abspath(as_path(child, "child")), into, progress, ignore_id_mismatch, keep, force,
               path_list(search_paths), dry_run, storage_wrapper(), on_plan)
    try:
        if not dry_run and os.path.isfile(job.child):
            hold_exclusive([job.child], job.held)
        return _merge(job)
    finally:
        if job.above is not None and not job.above.closed:  # a failed merge: close it, quietly
            try:
                let_go(job.above)
            except (OSError, VhdxError):
                job.above.abort()
        job.above = None  # garbage now: the release thread's collection unmaps its BAT
        # Deleted files (no name left) are closed in the background: their deletes are durable
        # already, and the last close, which frees their space, can take seconds.
        gone = [s for s in job.held if unlinked(s)]
        for storage in reversed(job.held):
            if storage not in gone:
                storage.close()
        release_in_background(gone)


def _merge(job: _Job) -> MergeResult | MergePlan:
    """The body of :func:`merge`: resolve, finish an interrupted merge or plan, copy, clean up."""
    job.t0 = time.monotonic()
    try:
        images, layers, cache = _resolve(job)
    except (VhdxError, OSError) as e:
        failure: BaseException = e
    else:
        return _merge_chain(job, images, layers, cache)
    # A merge that stopped after its copy only needs its last steps, even when its chain is gone.
    finished = _finish(job)
    if finished is None:
        raise failure
    return finished


def _merge_chain(job: _Job, images: list[Image], layers: list[Layer], cache: ScanCache
                 ) -> MergeResult | MergePlan:
    """Finish or run the merge over the resolved chain (``images``, closed here)."""
    try:
        finished = _finish(job, images)
        if finished is not None:
            return finished
        chain = _plan(job, images, layers, cache)
        if job.dry_run:
            return chain.plan
        dest, result = _execute(job, chain)
    finally:
        for im in images:
            im.close()
    return _clean_up(job, chain.plan, dest, result)


def _resolve(job: _Job) -> tuple[list[Image], list[Layer], ScanCache]:
    """Open the child and its whole chain read-only (leaf first)."""
    leaf = Image.open(job.child, "r")
    if not leaf.has_parent:
        leaf.close()
        raise MergeError("not a differencing disk: nothing to merge", path=job.child)
    # The ancestor named by ``into`` and its folder are search places too: a parent that moved.
    places = job.search + ([os.path.dirname(os.path.abspath(job.into))] if job.into is not None else [])
    resolver = Resolver(search_paths=places, ignore_id_mismatch=job.ignore_id_mismatch)
    try:
        images, layers, _ = resolver.resolve(leaf)
    except BaseException:
        leaf.close()
        raise
    return images, layers, resolver.cache


def _finish(job: _Job, images: Sequence[Image] = ()) -> MergeResult | MergePlan | None:
    """Finish a merge of the child that stopped after its copy, or None if there is none.

    ``images``, the child's chain when it opens, are read instead of opening the files again."""
    found = find_finish(job.child, job.into, job.keep, job.search, images)
    if found is None:
        return None
    if job.dry_run:
        return found.plan
    # Lock the destination and the files to delete; complete() reads the journal again.
    hold_exclusive([found.dest.path] + [m.path for m in found.members if m is not None], job.held)
    if job.on_plan is not None:
        job.on_plan(found.plan)
    if found.done:
        deleted = delete_members(nearest_first(found.members))
    else:
        dest = open_writable(found.dest.path, job.wrap)
        try:
            deleted = complete(dest, found.dest.path, job.keep, job.wrap, found.allowed, job.child)
        finally:
            dest.close()
    return MergeResult(plan=found.plan, bytes_copied=0, seconds=time.monotonic() - job.t0, deleted=deleted,
                       broken_dependents=[], new_data_write_guid=str(found.dest.data_write_guid))


# --------------------------------------------------------------------------- planning

def _destination_index(job: _Job, images: list[Image]) -> int:
    """Where the destination is in the chain: the parent, or the ancestor ``into``."""
    if job.into is None:
        return 1
    target = os.fspath(job.into)
    keys = [file_key(im.path) for im in images]
    if not os.path.exists(target) or file_key(target) not in keys[1:]:
        raise MergeError(f"{target} is not an ancestor of the child; the chain is: "
                         + " <- ".join(im.path for im in reversed(images)), path=job.child)
    return keys.index(file_key(target))


def _check_layers(job: _Job, images: list[Image], layers: list[Layer], dest_index: int) -> None:
    """Refuse layers of another size or sector size, and parent ID mismatches unless ignored."""
    leaf = images[0]
    for im in images[:dest_index + 1]:
        if im.size != leaf.size or im.logical_sector_size != leaf.logical_sector_size:
            raise MergeError(f"{im.path}: virtual size or sector size differs from the child's; "
                             f"refusing to merge", path=job.child)
    for layer in layers[:dest_index]:
        if layer.linkage == "mismatch" and not job.ignore_id_mismatch:
            raise MergeError(f"{layer.path}: parent ID mismatch", path=job.child)


def _plan(job: _Job, images: list[Image], layers: list[Layer], cache: ScanCache) -> _Chain:
    """Check the chain and plan the merge over it (read-only; takes the exclusive locks first)."""
    dest_index = _destination_index(job, images)
    sources, dest = images[:dest_index], images[dest_index]
    if not job.dry_run:  # every file the merge writes or deletes is ours alone before planning
        hold_exclusive([im.path for im in sources + [dest]], job.held)
    _check_layers(job, images, layers, dest_index)
    plan = MergePlan(child=job.child, destination=dest.path, sources=[im.path for im in sources],
                     destination_type=dest.disk_type, virtual_size=images[0].size)
    journal = resumable(load_journal(dest), sources, dest.path)
    plan.resuming = journal is not None
    plan.to_delete = plan_deletes(plan, job.keep, allowed_folders(dest.path, job.child, folders=job.search))
    folders = sorted({os.path.dirname(os.path.abspath(im.path)) for im in images[:dest_index + 1]} | set(job.search))
    plan.dependents = dependents(dest, images, sources, folders, cache)
    views = [BatView.of(im) for im in sources]  # the sources' BATs, read once for planning and copy
    windows: list[Any] = []  # the copy's extents, planned once
    plan_merge(views, dest, plan, planner=_planned, keep=None if job.dry_run else windows)
    return _Chain(images, dest_index, plan, journal, views, windows)


# --------------------------------------------------------------------------- the steps

def _execute(job: _Job, chain: _Chain) -> tuple[Image, MergeResult]:
    """Last refusals, then steps 1 to 4; returns the destination, still open for writing."""
    plan = chain.plan
    dest_path = plan.destination
    if plan.dependents and not job.force:
        raise MergeError("other disks depend on the destination or on a layer that the merge deletes; "
                         "their content would change (--force / force=True merges anyway): "
                         + ", ".join(plan.dependents), path=job.child)
    st = os.stat(dest_path)
    if not st.st_mode & 0o222 or not os.access(dest_path, os.W_OK):
        raise MergeError("the destination file is read-only", path=dest_path)
    check_free_space(plan, dest_path)
    for im in chain.images[chain.dest_index:]:
        im.close()  # the destination is opened for writing next, its ancestors are done with
    if job.on_plan is not None:
        job.on_plan(plan)
    used_before = used_bytes(dest_path)
    try:
        return _run(job, chain, dest_path)
    except (OSError, VhdxError) as e:
        if isinstance(e, VhdxError) and not no_space(e):
            raise
        raise stopped_error(e, plan, dest_path, used_before) from e


def _run(job: _Job, chain: _Chain, dest_path: str) -> tuple[Image, MergeResult]:
    """Steps 1 to 4 on the destination opened for writing (returned open; closed on failure)."""
    sources = chain.sources
    new_guid = chain.journal.new_data_write_guid if chain.journal else uuid.uuid4()
    dest = open_writable(dest_path, job.wrap)
    try:
        original = chain.journal.original_data_write_guid if chain.journal else dest.header.data_write_guid
        if chain.journal:
            # Blocks an interrupted run allocated but never put in the BAT: give them back first.
            dest.trim_unreferenced_tail()
        stamp = _Stamp(chain.plan, new_guid, original, [str(im.header.data_write_guid) for im in sources], job.keep)
        job.above = announce(sources[-1].path, dest.header.data_write_guid, new_guid, job.wrap)  # 1.
        _start(dest, stamp)  # 2.
        copied = _copy(dest, chain, job.progress)  # 3.
        _copied(dest, sources[0], stamp)  # 4.
    except BaseException:
        dest.close()
        raise
    cloned = dest.writer.copier.cloned if dest.writer.copier is not None else 0
    return dest, MergeResult(plan=chain.plan, bytes_copied=copied, seconds=0.0, deleted=[],
                             broken_dependents=chain.plan.dependents, new_data_write_guid=str(new_guid),
                             bytes_cloned=cloned)


def _start(dest: Image, stamp: _Stamp) -> None:
    """Step 2: the journal and the new DataWriteGuid in one go (the first change to the destination)."""
    fresh = dest.header.data_write_guid != stamp.new_guid
    dest.begin_session(data_change=True, data_write_guid=stamp.new_guid)
    if fresh:
        dest.write_metadata_items(without_journal(dest) + [stamp.item(JournalState.COPYING)])


Batch = list[tuple[int, int, Any]]  # (virtual offset, length, (storage, file offset) or None for zeros)


def _batches(chain: _Chain, dest: Image) -> Iterator[Batch]:
    """The extents of step 3, window by window, in batches of up to BATCH_BYTES / BATCH_EXTENTS."""
    batch: Batch = []
    size = 0
    windows = chain.windows or _planned(chain.views, window_spans(chain.views, window_size(chain.sources + [dest]),
                                                                  dest.size))
    for _start, _length, found in windows:
        for voff, vlen, src, _v in found:
            batch.append((voff, vlen, src))
            size += vlen
        if size >= BATCH_BYTES or len(batch) >= BATCH_EXTENTS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _copy(dest: Image, chain: _Chain, progress: Progress | None) -> int:
    """Step 3: copy, one batch of windows per transaction; returns the bytes copied (zeros not counted).

    Each batch is planned before the one ahead of it is written, so that the copier can ask the
    kernel to start reading the next batch's first source ranges while this batch's data is
    flushed and its BAT pages go through the log (:attr:`Copier.upcoming`): the disk keeps
    reading during the commit, and no metadata is written any earlier than before.
    """
    plan = chain.plan
    total, done = plan.bytes_to_copy + plan.bytes_of_zeros, 0
    copier = dest.writer.copier or Copier(dest.storage)
    dest.writer.copier = copier

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    copied = 0
    ahead: Batch | None = None
    for batch in itertools.chain(_batches(chain, dest), [None]):
        if ahead is not None:
            copier.upcoming = [(src[0], src[1], 0, vlen) for _voff, vlen, src in batch or () if src is not None]
            dest.write_extents(ahead, progress=tick)
            tick(sum(e[1] for e in ahead if e[2] is None))
            copied += sum(e[1] for e in ahead if e[2] is not None)
        ahead = batch
    copier.upcoming = []
    return copied


def _copied(dest: Image, child: Image, stamp: _Stamp) -> None:
    """Step 4: virtual-disk items come from the child (§4.1); the journal says "copied"."""
    def key(it: MetadataItem) -> tuple[Any, bool]:
        return it.item_id, bool(it.flags & C.METADATA_IS_USER)

    child_items = {key(it): it for it in metadata_items(child.metadata) if it.flags & C.METADATA_IS_VIRTUAL_DISK}
    items = [child_items.pop(key(it), it) if it.flags & C.METADATA_IS_VIRTUAL_DISK else it
             for it in without_journal(dest)]
    items.extend(child_items.values())
    dest.write_metadata_items(items + [stamp.item(JournalState.COPIED)])  # durable: the log flushes


def _clean_up(job: _Job, plan: MergePlan, dest: Image, result: MergeResult) -> MergeResult:
    """Step 5 (:func:`complete`) with the destination still open for writing; closes it."""
    dest_path = plan.destination
    try:
        try:
            result.deleted = complete(dest, dest_path, job.keep, job.wrap,
                                      allowed_folders(dest_path, job.child, folders=job.search), job.child,
                                      job.above)
            if job.above is not None:
                let_go(job.above)
        finally:
            dest.close()
    except OSError as e:
        raise MergeError(f"the data is merged but the cleanup stopped: {e.strerror or e}; run the same merge "
                         f"again to finish it", path=dest_path) from e
    result.seconds = time.monotonic() - job.t0
    return result
