"""Structural check: every problem as a Finding with an offset, never stopping early.

Like ``qemu-img check``: reads only (the file is opened read-only, a dirty log is
replayed in memory) and never repairs anything.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..chains.resolve import chain
from ..errors import VhdxError
from ..file.image import Image
from ..file.storage import FileStorage, Storage
from ..format import bat as batmod
from ..format import constants as C
from ..format import layout
from .merge.journal import interrupted_merge_at
from .merge.journal import audit_journal

ERROR = "error"
WARNING = "warning"
INFO = "info"
LEAK = "leak"  # space the file holds but no structure refers to: wasted, no harm to data


@dataclass(frozen=True)
class Finding:
    """One problem: how bad, where (a file offset, or None), what, and what to do about it."""

    severity: str
    offset: int | None
    message: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The finding as JSON-ready values."""
        return asdict(self)

    def __str__(self) -> str:
        where = f"0x{self.offset:x}" if self.offset is not None else "-"
        text = f"{self.severity:7} {where:>12}  {self.message}"
        return text + (f"  (hint: {self.hint})" if self.hint else "")


@dataclass
class CheckReport:
    """Everything ``vhdx check`` found in one file; ``opened`` is False when it could not be parsed."""

    path: str
    findings: list[Finding]
    opened: bool

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity "error"."""
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """The findings of severity "warning"."""
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def leaks(self) -> list[Finding]:
        """The findings of severity "leak" (space no structure refers to)."""
        return [f for f in self.findings if f.severity == LEAK]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready values."""
        return dict(path=self.path, opened=self.opened, errors=len(self.errors), warnings=len(self.warnings),
                    leaks=len(self.leaks), findings=[f.to_dict() for f in self.findings])


def check_file(path: str | os.PathLike[str], *, storage: Storage | None = None,
               share: bool = False) -> CheckReport:
    """Check one file's structure. Raises VhdxError only when the file cannot be read at all.

    The file is read under a shared lock (:class:`LockedError` while another process writes
    it); ``share`` takes no lock, for a disk a running VM holds (the content may be changing).
    """
    path = os.fspath(path)
    own = storage is None
    if storage is None:
        storage = FileStorage(path, lock=None if share else "shared")  # raises when it cannot be opened
    findings: list[Finding] = []
    try:
        try:
            image = Image(storage, owns_storage=False)
            image.load(salvage=True)
        except VhdxError as e:
            if storage.size() >= 8 and storage.read(0, 8) != C.SIGNATURE_FILE:
                raise
            findings.append(Finding(ERROR, e.offset, e.detail, _hint_for(e)))
            return CheckReport(path, findings, opened=False)
        findings.extend(check_image(image))
        return CheckReport(path, findings, opened=True)
    finally:
        if own:
            storage.close()


def _hint_for(e: VhdxError) -> str:
    name = type(e).__name__
    return {
        "ChecksumError": "a structure was damaged; restore the file from a copy",
        "TruncatedError": "the file was cut short; copy it again from its source",
        "LogReplayError": "the log is damaged; the file's last metadata updates may be lost",
        "UnsupportedError": "the file uses a feature this tool does not know",
    }.get(name, "the file breaks the VHDX format")


def check_image(image: Image) -> list[Finding]:
    """Findings for an image that opened, one structure after another: headers, region tables,
    the log, BAT entries, sector bitmaps, overlaps, unused BAT entries, metadata."""
    bat = _PayloadEntries.of(image)
    return [*header_findings(image), *region_table_findings(image), *log_findings(image),
            *bat_entry_findings(image, bat), *end_of_file_findings(image, bat), *sector_bitmap_findings(image, bat),
            *overlap_findings(image), *unused_entry_findings(image), *metadata_findings(image),
            *leak_findings(image)]


def header_findings(image: Image) -> list[Finding]:
    """An invalid header (the other one is used); identical headers."""
    out = [Finding(WARNING, offset, f"header {i + 1} is invalid: {image.header_errors[i]}",
                   "the other header is used; the next write to the disk rewrites both")
           for i, offset in enumerate(C.HEADER_OFFSETS) if image.headers[i] is None]
    if image.headers_identical:
        out.append(Finding(INFO, C.HEADER1_OFFSET, "both headers are identical (same sequence number), as Disk2VHD "
                           "writes them", "harmless; the next write gives them distinct sequence numbers"))
    return out


def region_table_findings(image: Image) -> list[Finding]:
    """An invalid region table (the other copy is used)."""
    return [Finding(WARNING, offset, f"region table {i + 1} is invalid: {image.region_table_errors[i]}",
                    "the other copy is used")
            for i, offset in enumerate(C.REGION_TABLE_OFFSETS) if image.region_table_errors[i]]


def log_findings(image: Image) -> list[Finding]:
    """A dirty log (replayed in memory for this check)."""
    if not image.log_was_dirty:
        return []
    n = len(image.log_replayed)
    return [Finding(WARNING, image.header.log_offset,
                    f"the log is dirty: {n} {'entry' if n == 1 else 'entries'} to replay (this check replayed "
                    f"{'it' if n == 1 else 'them'} in memory)",
                    "vhdx replay DISK (or check --repair) writes it into the file; check alone is read-only, "
                    "qemu-img refuses it")]


@dataclass(frozen=True)
class _PayloadEntries:
    """The non-zero payload entries of an image's BAT as arrays, in block order (every other
    entry is zero: NOT_PRESENT at offset 0). Read in bounded chunks, past the file's holes, so
    checking a 64 TiB disk costs what its data costs."""

    image: Image
    sparse: batmod.SparseBat
    blocks: np.ndarray
    bat_indexes: np.ndarray
    states: np.ndarray
    offsets: np.ndarray  # int64
    present: np.ndarray  # holds data

    @classmethod
    def of(cls, image: Image) -> "_PayloadEntries":
        """The payload entries of ``image``."""
        sp = image.sparse()
        st = sp.states
        return cls(image, sp, sp.blocks, sp.payload_bat_indexes(image.geometry), st, sp.offsets, batmod.holds_data(st))

    def entry_offset(self, bat_index: int) -> int:
        """File offset of BAT entry ``bat_index``."""
        return self.image.bat_region.file_offset + 8 * bat_index

    def report(self, mask: np.ndarray, severity: str, what: str, hint: str, limit: int = 10) -> list[Finding]:
        """One finding per listed entry in ``mask`` (the first ``limit``), ``what`` formatted
        with the block and its file offset."""
        hits = np.flatnonzero(mask)
        out = [Finding(severity, self.entry_offset(int(self.bat_indexes[r])),
                       what.format(block=int(self.blocks[r]), offset=int(self.offsets[r])), hint)
               for r in hits[:limit].tolist()]
        return out + _more(hits.size, limit, severity, hint)

    def missing(self, limit: int = 10) -> tuple[list[int], int]:
        """The first ``limit`` blocks that hold no data, and how many there are."""
        have = self.blocks[self.present]
        count = self.image.geometry.payload_blocks - have.size
        edges = np.concatenate([[-1], have, [self.image.geometry.payload_blocks]])
        first: list[int] = []
        for g in np.flatnonzero(np.diff(edges) > 1)[:limit].tolist():  # a gap after edges[g]
            first.extend(range(int(edges[g]) + 1, min(int(edges[g + 1]), int(edges[g]) + 1 + limit - len(first))))
            if len(first) >= limit:
                break
        return first, count


def _more(hits: int, limit: int, severity: str, hint: str) -> list[Finding]:
    return [Finding(severity, None, f"... and {hits - limit} more like that", hint)] if hits > limit else []


def bat_entry_findings(image: Image, bat: _PayloadEntries) -> list[Finding]:
    """Reserved bits, reserved or legacy states, states that do not fit the disk's type."""
    sp, g = bat.sparse, image.geometry
    reserved = np.sort(np.concatenate([bat.bat_indexes[batmod.reserved_bits(sp.entries) != 0],
                                       sp.sbm_bat_indexes(g)[batmod.reserved_bits(sp.sbm_entries) != 0]]))
    out = [Finding(ERROR, bat.entry_offset(k), f"BAT entry {k} has reserved bits set", "the BAT is damaged")
           for k in reserved[:10].tolist()]
    st, present = bat.states, bat.present
    out += bat.report(st == C.PayloadState.RESERVED_4, ERROR, "block {block}: reserved BAT state 4",
                      "the BAT is damaged")
    out += bat.report(st == C.PAYLOAD_BLOCK_UNMAPPED_V095, WARNING,
                      "block {block}: legacy UNMAPPED state 5 (draft 0.95)", "read as UNMAPPED")
    if not image.has_parent:
        out += bat.report(st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT, ERROR,
                          "block {block}: PARTIALLY_PRESENT in a disk without a parent", "read as FULLY_PRESENT")
    if image.metadata.leave_block_allocated and not image.has_parent:
        first, count = bat.missing()
        hint = "it reads as zeros; Windows keeps every block of a fixed disk allocated"
        out += [Finding(WARNING, bat.entry_offset(g.payload_bat_index(k)), f"block {k}: not allocated in a fixed disk",
                        hint) for k in first] + _more(count, 10, WARNING, hint)
    no_data = (st == C.PAYLOAD_BLOCK_ZERO) | (st == C.PAYLOAD_BLOCK_NOT_PRESENT)
    out += bat.report((~present) & no_data & (bat.offsets != 0), WARNING,
                      "block {block}: file offset 0x{offset:x} on a block that has no data (must be 0)",
                      "Hyper-V may refuse such a file")
    return out


def end_of_file_findings(image: Image, bat: _PayloadEntries) -> list[Finding]:
    """Blocks whose data runs past the end of the file (a warning for the disk's last block)."""
    file_size = image.storage.size()
    past = bat.present & layout.past_end(bat.offsets + image.block_size, file_size)
    is_last = bat.blocks == image.geometry.payload_blocks - 1
    beyond = bat.present & (bat.offsets >= file_size)
    return [*bat.report((past & ~is_last) | beyond, ERROR, "block {block}: data at 0x{offset:x} runs past the end "
                        "of the file", "the file was truncated; copy it again from its source"),
            *bat.report(past & is_last & ~beyond, WARNING, "block {block}: the last block runs past the end of the "
                        "file (read as zeros)", "an old qemu wrote such files")]


def sector_bitmap_findings(image: Image, bat: _PayloadEntries) -> list[Finding]:
    """Invalid sector bitmap states; bitmaps in a disk without a parent; partial blocks without one."""
    g, sp = image.geometry, bat.sparse
    sidx, chunks = sp.sbm_bat_indexes(g), sp.chunks
    sst = batmod.states(sp.sbm_entries)
    bad_state = (sst != C.SB_BLOCK_NOT_PRESENT) & (sst != C.SB_BLOCK_PRESENT)
    out = [Finding(ERROR, bat.entry_offset(int(sidx[r])), f"sector bitmap entry of chunk {int(chunks[r])}: invalid "
                   f"state {int(sst[r])}", "the BAT is damaged") for r in np.flatnonzero(bad_state)[:10].tolist()]
    sbm_present = sst == C.SB_BLOCK_PRESENT
    if not image.has_parent:
        return out + [Finding(WARNING, bat.entry_offset(int(sidx[r])), f"sector bitmap of chunk {int(chunks[r])} is "
                              "present in a disk without a parent", "it is ignored")
                      for r in np.flatnonzero(sbm_present)[:10].tolist()]
    partial = np.flatnonzero(bat.states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    missing = partial[~np.isin(bat.blocks[partial] // g.chunk_ratio, chunks[sbm_present])]
    return out + [Finding(ERROR, bat.entry_offset(int(bat.bat_indexes[r])), f"block {int(bat.blocks[r])} is "
                          "PARTIALLY_PRESENT but its chunk's sector bitmap is not present",
                          "the sectors of this block cannot be read")
                  for r in missing[:10].tolist()]


def overlap_findings(image: Image) -> list[Finding]:
    """Structures, blocks and sector bitmaps that share space (the span map of format.layout)."""
    spans = layout.structure_spans(image.header, image.region_table)
    alloc = layout.allocations_of(image.sparse(), image.geometry, bitmaps=True)
    starts = np.concatenate([np.array([s.start for s in spans], dtype=np.int64), alloc.starts])
    ends = np.concatenate([np.array([s.end for s in spans], dtype=np.int64), alloc.ends])
    order, hits = layout.clashes(starts, ends)
    hint = "two BAT entries share space; data may be lost"
    out = []
    for k in hits[:10].tolist():
        row = int(order[k])
        start = int(starts[row])
        name = "structure" if row < len(spans) else alloc.owner_name(row - len(spans))
        out.append(Finding(ERROR, start, f"{name} at 0x{start:x} overlaps another structure", hint))
    if hits.size > 10:
        out.append(Finding(ERROR, None, f"... and {hits.size - 10} more overlaps", hint))
    return out


def leak_findings(image: Image) -> list[Finding]:
    """Space past the last referenced structure, payload block or sector bitmap (a leak)."""
    spans = layout.structure_spans(image.header, image.region_table)
    alloc = layout.allocations_of(image.sparse(), image.geometry)
    start, length = layout.leaked_tail(spans, alloc, image.storage.size())
    if not length:
        return []
    return [Finding(LEAK, start, f"{length} bytes past the last referenced structure are not used",
                    "wasted space, no harm to data: a write or merge that stopped while the file grew leaves such space")]


def unused_entry_findings(image: Image) -> list[Finding]:
    """Non-zero BAT entries past the last block of the disk."""
    k = image.sparse().tail
    if k < 0:
        return []
    return [Finding(WARNING, image.bat_region.file_offset + 8 * k, "BAT entries past the last block of the disk "
                    "are not zero", "they are ignored")]


_VIRTUAL_DISK_ITEMS = (C.VIRTUAL_DISK_SIZE_GUID, C.PAGE83_DATA_GUID, C.LOGICAL_SECTOR_SIZE_GUID,
                       C.PHYSICAL_SECTOR_SIZE_GUID)


def metadata_findings(image: Image) -> list[Finding]:
    """Known system items whose IsVirtualDisk flag is not the one the format gives them."""
    out = []
    for e in image.metadata.entries:
        if e.item_id not in C.METADATA_ITEM_NAMES or e.is_user:
            continue
        expect_vd = e.item_id in _VIRTUAL_DISK_ITEMS
        if (e.item_id in (C.FILE_PARAMETERS_GUID, C.PARENT_LOCATOR_GUID) or expect_vd) and \
                e.is_virtual_disk != expect_vd:
            out.append(Finding(WARNING, image.metadata_region.file_offset,
                               f"metadata item {e.name}: IsVirtualDisk flag is {e.is_virtual_disk}",
                               "other tools may refuse this file"))
    return out


def journal_findings(path: str | os.PathLike[str], search_paths: Sequence[str] = ()) -> list[Finding]:
    """An error when ``path`` holds a merge journal that names files outside its own chain."""
    try:
        problem = audit_journal(path, search_paths)
    except VhdxError:
        return []  # the file itself is reported elsewhere
    if problem is None:
        return []
    return [Finding(ERROR, None, f"{os.fspath(path)}: untrusted merge journal: {problem}",
                    "a merge will refuse it and delete nothing; if the files are yours and in another folder, "
                    "pass --search FOLDER")]


def check_chain(path: str | os.PathLike[str], **options: Any) -> list[Any]:
    """Findings about a file's chain: missing parents, ID mismatches, interrupted merges."""
    out = []
    missing_severity = WARNING if options.get("missing_parent") == "zeros" else ERROR
    try:
        ch = chain(path, **options)
    except VhdxError as e:
        return [Finding(ERROR, e.offset, f"chain: {e.detail}",
                        "see 'vhdx chain' for every path tried; --search DIR or --parent FILE may help")]
    for layer in ch.layers:
        if interrupted_merge_at(layer.path, share=bool(options.get("share"))):
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
