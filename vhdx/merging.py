"""Merge: fold differencing layers into an ancestor, like Hyper-V's Merge-VHD.

The plan is computed with numpy over the sources' BATs and sector bitmaps, one window
of the virtual disk at a time (a window holds whole blocks of every layer), so memory
stays bounded whatever the disk size. Each window becomes a list of extents (runs of
sectors owned by one source layer, or zeros) that the destination writes as one
transaction: blocks allocated in a batch, data copied with copy_file_range (or a reused buffer),
flushed, then BAT and bitmap changes through the log (vhdx-format.md §7.4, §9.5).

Crash safety and restart (§9.5): before the destination's DataWriteGuid changes, the new
GUID is stored as ``parent_linkage2`` in the layer right above it, so at every moment one
of its two linkage GUIDs matches and the chain stays readable. A journal item in the
destination's metadata marks the merge as in progress until it is done. Data reads through
the child never change during a merge: the destination only receives sectors that the
sources define, and the sources are not modified. Running the same merge again redoes the
copy (it is idempotent) and finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, overload

import numpy as np

from . import chains
from .errors import MergeError, VhdxError
from .format import bitmap as bitmapmod
from .format import constants as C
from .format.locator import format_linkage, parse_linkage
from .format.records import MetadataItem, metadata_items
from .image import Image
from .storage import FileStorage, Storage

TRANSPARENT = 255
ZERO = 254
BATCH_BYTES = 1 << 30  # destination data per transaction: each costs three flushes
BATCH_EXTENTS = 1 << 16  # ... and at most this many extents, to bound memory
WINDOW_MIN = 64 << 20
_ZERO_STATES = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
                C.PAYLOAD_BLOCK_UNMAPPED_V095)


@dataclass
class MergePlan:
    """What a merge will do; ``vhdx merge --dry-run`` prints it."""

    child: str
    destination: str
    sources: list[str]
    destination_type: str
    virtual_size: int
    bytes_to_copy: int = 0
    bytes_of_zeros: int = 0
    destination_blocks: int = 0
    allocations: int = 0
    bytes_to_allocate: int = 0
    per_source_bytes: dict[str, int] = field(default_factory=dict)
    dependents: list[str] = field(default_factory=list)
    resuming: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeResult:
    plan: MergePlan
    bytes_copied: int
    seconds: float
    deleted: list[str]
    broken_dependents: list[str]
    new_data_write_guid: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["throughput_mib_s"] = self.bytes_copied / max(self.seconds, 1e-9) / (1 << 20)
        return d


# --------------------------------------------------------------------------- planning

def _windows(sources: list[Image], window: int, size: int) -> np.ndarray:
    """Indexes of the windows in which any source defines anything (vectorised over the BATs)."""
    hits = []
    for im in sources:
        st = im.payload_states()
        used = np.flatnonzero(st != C.PAYLOAD_BLOCK_NOT_PRESENT)
        hits.append((used.astype(np.int64) * im.block_size) // window)
    if not hits:
        return np.zeros(0, np.int64)
    return np.unique(np.concatenate(hits))


def _owners(sources: list[Image], start: int, length: int) -> np.ndarray:
    """Per logical sector of [start, start+length): which source defines it (index), ZERO, or TRANSPARENT."""
    ss = sources[0].logical_sector_size
    n = length // ss
    owner = np.full(n, TRANSPARENT, dtype=np.uint8)
    for i, im in enumerate(sources):
        bs = im.block_size
        spb = bs // ss
        first_block = start // bs
        last_block = -(-(start + length) // bs)
        states = im.payload_states()[first_block:last_block]
        if not np.any(states != C.PAYLOAD_BLOCK_NOT_PRESENT):
            continue
        defined = np.isin(states, (C.PAYLOAD_BLOCK_FULLY_PRESENT,) + _ZERO_STATES)
        if not im.has_parent:
            defined |= states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
        value = np.where(np.isin(states, _ZERO_STATES), ZERO, i).astype(np.uint8)
        offset_sectors = (first_block * bs - start) // ss  # <= 0: the window starts inside the first block
        mask = np.repeat(defined, spb)
        vals = np.repeat(value, spb)
        if im.has_parent:
            for k in np.flatnonzero(states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT).tolist():
                bits = im._read_bitmap(first_block + k)
                mask[k * spb:(k + 1) * spb] = bits.astype(bool)
                vals[k * spb:(k + 1) * spb] = i
        lo = -offset_sectors
        mask = mask[lo:lo + n]
        vals = vals[lo:lo + n]
        take = mask & (owner == TRANSPARENT)
        owner[take] = vals[take]
    return owner


def _extents(sources: list[Image], start: int, length: int) -> Iterator[tuple[int, int, Any, int]]:
    """(virtual_offset, length, source, source_index) runs of one window; source None means zeros."""
    ss = sources[0].logical_sector_size
    owner = _owners(sources, start, length)
    starts, stops, values = bitmapmod.runs(owner)
    for s0, s1, v in zip(starts.tolist(), stops.tolist(), values.tolist()):
        if v == TRANSPARENT:
            continue
        voff, vlen = start + s0 * ss, (s1 - s0) * ss
        if v == ZERO:
            yield voff, vlen, None, -1
            continue
        im = sources[v]
        bs = im.block_size
        pos = voff
        end = voff + vlen
        offsets = im.payload_offsets()
        while pos < end:  # split at the source's block boundaries: each block has its own file offset
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, end - pos)
            yield pos, n, (im.storage, int(offsets[block]) + in_block), v
            pos += n


def _window_size(images: list[Image]) -> int:
    return max([WINDOW_MIN] + [im.block_size for im in images])


def plan_merge(sources: list[Image], dest: Image, plan: MergePlan) -> MergePlan:
    """Fill in the totals of ``plan`` (reads BATs and bitmaps, not data)."""
    window = _window_size(sources + [dest])
    size = dest.size
    dstates = dest.payload_states()
    dbs = dest.block_size
    touched: set[int] = set()
    for w in _windows(sources, window, size).tolist():
        start = w * window
        length = min(window, size - start)
        if length <= 0:
            continue
        for voff, vlen, src, v in _extents(sources, start, length):
            if src is None:
                plan.bytes_of_zeros += vlen
            else:
                plan.bytes_to_copy += vlen
                name = sources[v].path
                plan.per_source_bytes[name] = plan.per_source_bytes.get(name, 0) + vlen
            touched.update(range(voff // dbs, (voff + vlen - 1) // dbs + 1))
    plan.destination_blocks = len(touched)
    if touched:
        t = np.fromiter(touched, dtype=np.int64)
        allocated = np.isin(dstates[t], (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))
        plan.allocations = int((~allocated).sum())
        plan.bytes_to_allocate = plan.allocations * dbs
        if dest.has_parent:
            plan.bytes_to_allocate += dest.geometry.sector_bitmap_blocks * C.MiB
    return plan


# --------------------------------------------------------------------------- the merge

def _journal_item(plan: MergePlan, new_guid: uuid.UUID, original: uuid.UUID, source_guids: list[str],
                  state: str = "copying") -> MetadataItem:
    """Our user metadata item: which merge is under way, and how far it got.

    States: "copying", "copied" (all data is in the destination), "done" (kept as a record).
    Sources are recorded by DataWriteGuid and by path relative to the destination, so the
    journal still finds them after the folder was moved or copied.
    """
    folder = os.path.dirname(os.path.abspath(plan.destination))
    sources = [dict(path=p, relative=os.path.relpath(p, folder), data_write_guid=g)
               for p, g in zip(plan.sources, source_guids)]
    data = json.dumps(dict(tool="vhdx", state=state, sources=sources, child=plan.child,
                           new_data_write_guid=str(new_guid), original_data_write_guid=str(original),
                           started=int(time.time()))).encode()
    return MetadataItem(chains.MERGE_JOURNAL_GUID, data, C.METADATA_IS_USER)


def _journal_sources(journal: dict[str, Any], dest_path: str) -> list[str]:
    """The merged files that still exist, found beside the destination first, by GUID."""
    folder = os.path.dirname(os.path.abspath(dest_path))
    found = []
    for record in journal.get("sources", []):
        if not isinstance(record, dict):
            continue
        for cand in (os.path.join(folder, record.get("relative", "")), record.get("path", "")):
            if cand and os.path.isfile(cand) and str(chains.read_data_write_guid(cand)) == record.get("data_write_guid"):
                found.append(os.path.abspath(cand))
                break
    return found


def _journal_names(journal: dict[str, Any], child: str) -> bool:
    """Whether the journal lists ``child`` (by DataWriteGuid if it exists, else by file name)."""
    records = [r for r in journal.get("sources", []) if isinstance(r, dict)]
    if os.path.exists(child):
        guid = str(chains.read_data_write_guid(child))
        return any(r.get("data_write_guid") == guid for r in records)
    name = os.path.basename(child)
    return any(os.path.basename(r.get("relative", "")) == name for r in records)


def read_journal(image: Image) -> dict[str, Any] | None:
    raw = image.metadata.items.get((chains.MERGE_JOURNAL_GUID, True))
    if raw is None:
        return None
    try:
        return json.loads(raw.decode())
    except (ValueError, UnicodeDecodeError):
        return {}


def _open_rw(path: str, wrap: Callable[[Storage], Storage] | None) -> Image:
    """Open a file of the merge for writing; ``wrap`` is the fault-injection seam of the tests."""
    storage: Storage = FileStorage(path, writable=True)
    return Image.open(path, "r+", storage=wrap(storage) if wrap else storage)


def _set_linkage2(path: str, current: uuid.UUID, new: uuid.UUID, wrap: Callable[[Storage], Storage] | None) -> None:
    """Make ``path`` accept both its parent's ``current`` and ``new`` DataWriteGuid (§9.5).

    parent_linkage takes the GUID that matches now and parent_linkage2 the one that will,
    so the link holds at every moment of the change (through the log; its own GUIDs stay).
    """
    image = _open_rw(path, wrap)
    try:
        loc = dict(image.metadata.parent_locator or {})
        l1, l2 = parse_linkage(loc.get("parent_linkage")), parse_linkage(loc.get("parent_linkage2"))
        if l2 == new and (l1 == current or current == new):
            return
        if current != new:  # on a resumed merge the destination already carries ``new``: keep l1
            loc["parent_linkage"] = format_linkage(current)
        loc["parent_linkage2"] = format_linkage(new)
        image.write_parent_locator(loc)
    finally:
        image.close()


def _unlink_merged(path: str, original: uuid.UUID, wrap: Callable[[Storage], Storage] | None) -> None:
    """After the merge the merged layer is invalid: it links to the destination's old GUID only.

    Reading it over the merged destination would mix old and new data, so it must not open
    as a chain any more (as with Hyper-V, merged files are invalid afterwards).
    """
    image = _open_rw(path, wrap)
    try:
        loc = dict(image.metadata.parent_locator or {})
        if parse_linkage(loc.get("parent_linkage")) == original and \
                parse_linkage(loc.get("parent_linkage2")) in (None, C.ZERO_GUID):
            return
        loc["parent_linkage"] = format_linkage(original)
        loc["parent_linkage2"] = format_linkage(C.ZERO_GUID)
        image.write_parent_locator(loc)
    finally:
        image.close()


def _dependents(dest: Image, chain_images: list[Image], sources: list[Image], folders: Sequence[str],
                keep: bool) -> list[str]:
    """Other files that the merge would break.

    Children of the destination (its content changes) and of the merged layers, the child
    itself included: merged layers are invalid afterwards, even when ``keep`` leaves them.
    """
    ours = {os.path.abspath(im.path) for im in chain_images}
    guids = {im.header.data_write_guid: im for im in sources + [dest]}
    out = []
    seen: set[str] = set()
    for folder in folders:
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            p = os.path.abspath(os.path.join(folder, name))
            if p in ours or p in seen or not name.lower().endswith(chains.VHDX_SUFFIXES):
                continue
            seen.add(p)
            try:
                im, _in_use = chains.open_peek(p)  # a running VM's disk depends all the same
            except (VhdxError, OSError):
                continue
            try:
                if im.has_parent:
                    l1, l2 = chains._linkage_of(im)
                    if (l1 in guids) or (l2 in guids):
                        out.append(p)
            finally:
                im.close()
    return out


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: Literal[False] = False, storage_wrapper: Callable[[Storage], Storage] | None = None
          ) -> MergeResult: ...


@overload
def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: Literal[True], storage_wrapper: Callable[[Storage], Storage] | None = None
          ) -> MergePlan: ...


def merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None = None, *,
          progress: Callable[[int, int], None] | None = None, ignore_id_mismatch: bool = False,
          keep: bool = False, force: bool = False, search_paths: Sequence[str | os.PathLike[str]] = (),
          dry_run: bool = False, storage_wrapper: Callable[[Storage], Storage] | None = None
          ) -> MergeResult | MergePlan:
    """Merge ``child`` into its parent, or every layer down to the ancestor ``into``.

    Afterwards the destination reads exactly as the child did and has a new DataWriteGuid;
    the merged files are deleted unless ``keep``. Refuses (listing them) when other disks
    depend on the destination unless ``force``. ``dry_run`` returns the plan and writes nothing.
    ``storage_wrapper`` wraps every file opened for writing (fault-injection tests).

    Every file the merge writes or deletes (the sources and the destination) is locked
    exclusively before the plan is made and until the merge returns, the child first, before
    anything else is read: a second merge of the same chain, a writer, or a reader (qemu's or
    ours) is refused with :class:`LockedError`. A dry run takes shared locks only.
    """
    held: list[Storage] = []
    try:
        path = os.path.abspath(os.fspath(child))
        if not dry_run and os.path.isfile(path):
            _hold_exclusive([path], held)
        return _merge(child, into, progress=progress, ignore_id_mismatch=ignore_id_mismatch, keep=keep,
                      force=force, search_paths=search_paths, dry_run=dry_run, storage_wrapper=storage_wrapper,
                      held=held)
    finally:
        for storage in reversed(held):
            storage.close()


def _hold_exclusive(paths: Sequence[str], held: list[Storage]) -> None:
    """Lock each file exclusively (this process's later opens of it share the lock), into ``held``."""
    for p in paths:
        held.append(FileStorage(p, lock="exclusive"))


def _merge(child: str | os.PathLike[str], into: str | os.PathLike[str] | None, *,
           progress: Callable[[int, int], None] | None, ignore_id_mismatch: bool, keep: bool, force: bool,
           search_paths: Sequence[str | os.PathLike[str]], dry_run: bool,
           storage_wrapper: Callable[[Storage], Storage] | None, held: list[Storage]
           ) -> MergeResult | MergePlan:
    """The body of :func:`merge`; the locks it takes go into ``held``, which the caller releases."""
    child = os.path.abspath(os.fspath(child))
    search = [os.fspath(p) for p in search_paths]
    t0 = time.monotonic()
    # A merge that stopped after its copy only needs its last steps.
    finished = _finish_copied(child, into, keep, storage_wrapper, t0, dry_run=dry_run, held=held)
    if finished is not None:
        return finished
    leaf = Image.open(child, "r")
    if not leaf.has_parent:
        leaf.close()
        raise MergeError("not a differencing disk: nothing to merge", path=child)
    resolver = chains._Resolver(search_paths=search, ignore_id_mismatch=ignore_id_mismatch)
    try:
        images, layers, _ = resolver.resolve(leaf)
    except BaseException:
        leaf.close()
        raise
    try:
        if into is None:
            dest_index = 1
        else:
            target = os.fspath(into)
            keys = [chains._file_key(im.path) for im in images]
            if not os.path.exists(target) or chains._file_key(target) not in keys[1:]:
                raise MergeError(f"{target} is not an ancestor of the child; the chain is: "
                                 + " <- ".join(im.path for im in reversed(images)), path=child)
            dest_index = keys.index(chains._file_key(target))
        sources = images[:dest_index]
        dest_ro = images[dest_index]
        if not dry_run:  # every file the merge writes or deletes is ours alone before planning
            _hold_exclusive([im.path for im in sources + [dest_ro]], held)
        for im in sources + [dest_ro]:
            if im.size != leaf.size or im.logical_sector_size != leaf.logical_sector_size:
                raise MergeError(f"{im.path}: virtual size or sector size differs from the child's; "
                                 f"refusing to merge", path=child)
        for layer in layers[:dest_index]:
            if layer.linkage == "mismatch" and not ignore_id_mismatch:
                raise MergeError(f"{layer.path}: parent ID mismatch", path=child)
        plan = MergePlan(child=child, destination=dest_ro.path, sources=[im.path for im in sources],
                         destination_type=dest_ro.disk_type, virtual_size=leaf.size)
        journal = read_journal(dest_ro)
        if journal is not None and journal.get("state") == "done":
            journal = None  # the record of an earlier, finished merge
        plan.resuming = journal is not None
        folders = sorted({os.path.dirname(os.path.abspath(im.path)) for im in images[:dest_index + 1]} | set(search))
        plan.dependents = _dependents(dest_ro, images, sources, folders, keep)
        plan_merge(sources, dest_ro, plan)
        if dry_run:
            return plan
        if plan.dependents and not force:
            raise MergeError("other disks depend on the destination or on a layer that the merge deletes; "
                             "their content would change (--force / force=True merges anyway): "
                             + ", ".join(plan.dependents), path=child)
        st = os.stat(dest_ro.path)
        if not st.st_mode & 0o222 or not os.access(dest_ro.path, os.W_OK):
            raise MergeError("the destination file is read-only", path=dest_ro.path)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(dest_ro.path))).free
        if plan.bytes_to_allocate + (2 << 20) > free:
            raise MergeError(f"not enough free space: the merge needs up to {plan.bytes_to_allocate} bytes, "
                             f"{free} are free", path=dest_ro.path)
        dest_path = dest_ro.path
        for im in images[dest_index:]:
            im.close()
        try:
            result = _run(plan, sources, dest_path, journal, progress, storage_wrapper)
        except OSError as e:
            raise MergeError(f"the merge stopped: {e.strerror or e}; every file is still consistent, run the "
                             f"same merge again to finish it", path=dest_path) from e
    finally:
        for im in images:
            im.close()
    try:
        result.deleted = _complete(dest_path, keep, storage_wrapper)
    except OSError as e:
        raise MergeError(f"the data is merged but the cleanup stopped: {e.strerror or e}; run the same merge "
                         f"again to finish it", path=dest_path) from e
    result.seconds = time.monotonic() - t0
    return result


def _complete(dest_path: str, keep: bool, wrap: Callable[[Storage], Storage] | None) -> list[str]:
    """The steps after the copy, each safe to repeat: the merged files go (or, with ``keep``,
    let go of the destination), then the journal records the merge as done."""
    image = Image.open(dest_path, "r")
    try:
        journal = read_journal(image) or {}
    finally:
        image.close()
    records = [r for r in journal.get("sources", []) if isinstance(r, dict)]
    sources = _journal_sources(journal, dest_path)
    original = journal.get("original_data_write_guid")
    deleted = []
    if keep:
        # Kept files are invalid now: the layer above lets go of the destination, so neither
        # it nor anything above it opens over data that no longer matches.
        above = _journal_sources(dict(sources=records[-1:]), dest_path)
        if above and original:
            _unlink_merged(above[0], uuid.UUID(original), wrap)
    else:
        # Nearest the destination first: if this stops half way, what is left has a missing
        # parent (plainly broken), never a stale link to the merged destination.
        for p in reversed(sources):
            os.unlink(p)
            deleted.append(p)
    image = _open_rw(dest_path, wrap)
    try:
        # The journal stays as a record of the last merge ("done"): a re-run of the same command
        # after an interruption here can tell that the job is finished.
        items = [it for it in metadata_items(image.metadata) if it.item_id != chains.MERGE_JOURNAL_GUID]
        done = dict(journal, state="done", finished=int(time.time()))
        items.append(MetadataItem(chains.MERGE_JOURNAL_GUID, json.dumps(done).encode(), C.METADATA_IS_USER))
        image.write_metadata_items(items, data_change=False)
    finally:
        image.close()
    return deleted


def _copied_journal(path: str, child: str) -> dict[str, Any] | None:
    try:
        # A file in use is read without a lock: if its journal names the child, the exclusive
        # lock taken before the cleanup refuses to go on while the other process holds it.
        image, _in_use = chains.open_peek(path)
    except (VhdxError, OSError):
        return None
    try:
        journal = read_journal(image)
    finally:
        image.close()
    if not journal or not _journal_names(journal, child):
        return None
    if journal.get("state") == "done" and os.path.exists(child):
        raise MergeError(f"this disk was already merged into {path} (and kept with --keep); kept files are "
                         f"invalid and must not be merged again", path=child)
    if journal.get("state") in ("copied", "done"):
        return journal
    return None


def _finish_copied(child: str, into: str | os.PathLike[str] | None, keep: bool,
                   wrap: Callable[[Storage], Storage] | None, t0: float, *, dry_run: bool = False,
                   held: list[Storage] | None = None) -> MergeResult | MergePlan | None:
    """Finish a merge that stopped after its copy, or None if there is none to finish.

    The destination holds a journal in state "copied" that lists this child: the data is all
    there, and only the steps of :func:`_complete` are left. State "done" with the child gone:
    the merge finished before, and there is nothing left to do. The destination is ``into``, the
    file the child's relative path names, or (when the child is already gone) the file of
    its folder whose journal names it.
    """
    candidates: list[str] = []
    if into is not None:
        candidates.append(os.path.abspath(os.fspath(into)))
    elif os.path.exists(child):
        try:
            leaf = Image.open(child, "r")
            try:
                loc = leaf.metadata.parent_locator or {}
            finally:
                leaf.close()
            candidates += [p for how, p in chains.candidate_paths(loc, child, []) if how == "relative_path"]
        except VhdxError:
            return None
    else:
        folder = os.path.dirname(child)
        try:
            candidates += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                           if n.lower().endswith(chains.VHDX_SUFFIXES)]
        except OSError:
            return None
    for dest_path in candidates:
        journal = _copied_journal(dest_path, child) if os.path.isfile(dest_path) else None
        if journal is None:
            continue
        if held is not None and not dry_run and journal.get("state") == "copied":
            # _complete reads the journal again under these locks
            _hold_exclusive([dest_path] + _journal_sources(journal, dest_path), held)
        image = Image.open(dest_path, "r")
        try:
            plan = MergePlan(child=child, destination=dest_path,
                             sources=[r.get("path", "") for r in journal.get("sources", []) if isinstance(r, dict)],
                             destination_type=image.disk_type, virtual_size=image.size, resuming=True)
            guid = str(image.header.data_write_guid)
        finally:
            image.close()
        if dry_run:
            return plan
        deleted = _complete(dest_path, keep, wrap) if journal.get("state") == "copied" else []
        return MergeResult(plan=plan, bytes_copied=0, seconds=time.monotonic() - t0, deleted=deleted,
                           broken_dependents=[], new_data_write_guid=guid)
    return None


def _run(plan: MergePlan, sources: list[Image], dest_path: str, journal: dict[str, Any] | None,
         progress: Callable[[int, int], None] | None, wrap: Callable[[Storage], Storage] | None) -> MergeResult:
    above = sources[-1]  # the layer whose parent is the destination
    if journal and journal.get("new_data_write_guid"):
        new_guid = uuid.UUID(journal["new_data_write_guid"])
    else:
        new_guid = uuid.uuid4()
    source_guids = [str(im.header.data_write_guid) for im in sources]
    dest = _open_rw(dest_path, wrap)
    if journal and journal.get("original_data_write_guid"):
        original = uuid.UUID(journal["original_data_write_guid"])
    else:
        original = dest.header.data_write_guid
    if journal:
        # Blocks an interrupted run allocated but never put in the BAT: give them back first.
        try:
            dest.trim_unreferenced_tail()
        except BaseException:
            dest.close()
            raise
    try:
        # 1. The layer above learns the destination's next GUID before the destination changes.
        _set_linkage2(above.path, dest.header.data_write_guid, new_guid, wrap)
    except BaseException:
        dest.close()
        raise
    copied = 0
    try:
        if dest.header.data_write_guid != new_guid:
            # 2. Journal and new DataWriteGuid in one go (the first change to the destination).
            dest.begin_session(data_change=True, data_write_guid=new_guid)
            items = [it for it in metadata_items(dest.metadata) if it.item_id != chains.MERGE_JOURNAL_GUID]
            dest.write_metadata_items(items + [_journal_item(plan, new_guid, original, source_guids)])
        else:
            dest.begin_session(data_change=True, data_write_guid=new_guid)
        # 3. Copy, one batch of windows per transaction.
        total = plan.bytes_to_copy + plan.bytes_of_zeros
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        window = _window_size(sources + [dest])
        batch: list[tuple[int, int, Any]] = []
        batch_bytes = 0
        for w in _windows(sources, window, dest.size).tolist():
            start = w * window
            length = min(window, dest.size - start)
            if length <= 0:
                continue
            for voff, vlen, src, _v in _extents(sources, start, length):
                batch.append((voff, vlen, src))
                batch_bytes += vlen
                if src is not None:
                    copied += vlen
            if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_EXTENTS:
                zeros = sum(e[1] for e in batch if e[2] is None)
                dest.write_extents(batch, progress=tick)
                tick(zeros)
                batch, batch_bytes = [], 0
        if batch:
            zeros = sum(e[1] for e in batch if e[2] is None)
            dest.write_extents(batch, progress=tick)
            tick(zeros)
        # 4. Virtual-disk items come from the child (§4.1); the journal says "copied".
        child_items = {(it.item_id, bool(it.flags & C.METADATA_IS_USER)): it
                       for it in metadata_items(sources[0].metadata) if it.flags & C.METADATA_IS_VIRTUAL_DISK}
        items = []
        for it in metadata_items(dest.metadata):
            if it.item_id == chains.MERGE_JOURNAL_GUID:
                continue
            key = (it.item_id, bool(it.flags & C.METADATA_IS_USER))
            items.append(child_items.pop(key, it) if it.flags & C.METADATA_IS_VIRTUAL_DISK else it)
        items.extend(child_items.values())
        dest.write_metadata_items(items + [_journal_item(plan, new_guid, original, source_guids, "copied")])
        dest.flush()
    finally:
        dest.close()
    return MergeResult(plan=plan, bytes_copied=copied, seconds=0.0, deleted=[], broken_dependents=plan.dependents,
                       new_data_write_guid=str(new_guid))
