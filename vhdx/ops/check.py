"""Structural check: every problem as a Finding with an offset, never stopping early.

Like ``qemu-img check``: reads only (the file is opened read-only, a dirty log is
replayed in memory) and never repairs anything.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import VhdxError
from ..format import bat as batmod
from ..format import constants as C
from ..chains.resolve import chain
from ..file.image import Image
from .merge.journal import interrupted_merge_at
from .merge.journal import audit_journal
from ..file.storage import FileStorage, Storage

ERROR = "error"
WARNING = "warning"
INFO = "info"


@dataclass(frozen=True)
class Finding:
    severity: str
    offset: int | None
    message: str
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"0x{self.offset:x}" if self.offset is not None else "-"
        text = f"{self.severity:7} {where:>12}  {self.message}"
        return text + (f"  (hint: {self.hint})" if self.hint else "")


@dataclass
class CheckReport:
    path: str
    findings: list[Finding]
    opened: bool

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    def to_dict(self) -> dict[str, Any]:
        return dict(path=self.path, opened=self.opened, errors=len(self.errors), warnings=len(self.warnings),
                    findings=[f.to_dict() for f in self.findings])


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
    """Findings for an image that opened (headers, regions, log, BAT, bitmaps)."""
    out: list[Finding] = []
    add = out.append
    for i, offset in enumerate(C.HEADER_OFFSETS):
        if image.headers[i] is None:
            add(Finding(WARNING, offset, f"header {i + 1} is invalid: {image.header_errors[i]}",
                        "the other header is used; the next write to the disk rewrites both"))
    if image.headers_identical:
        add(Finding(INFO, C.HEADER1_OFFSET, "both headers are identical (same sequence number), as Disk2VHD "
                    "writes them", "harmless; the next write gives them distinct sequence numbers"))
    for i, offset in enumerate(C.REGION_TABLE_OFFSETS):
        if image.region_table_errors[i]:
            add(Finding(WARNING, offset, f"region table {i + 1} is invalid: {image.region_table_errors[i]}",
                        "the other copy is used"))
    if image.log_was_dirty:
        add(Finding(WARNING, image.header.log_offset,
                    f"the log is dirty: {len(image.log_replayed)} "
                    f"{'entry' if len(image.log_replayed) == 1 else 'entries'} to replay (this check replayed "
                    f"{'it' if len(image.log_replayed) == 1 else 'them'} in memory)",
                    "open the disk read-write (vhdx check is read-only) to replay it; qemu-img refuses it"))
    g = image.geometry
    file_size = image.storage.size()
    bat_base = image.bat_region.file_offset
    entries = image.bat[: g.bat_entries]
    pidx = batmod.payload_indices(g)
    pe = entries[pidx]
    st = batmod.states(pe)
    offs = batmod.file_offsets(pe).astype(np.int64)

    def entry_offset(bat_index: int) -> int:
        return bat_base + 8 * bat_index

    def report(mask: np.ndarray, severity: str, what: str, hint: str, limit: int = 10,
               index_of=lambda k: int(pidx[k])) -> None:
        hits = np.flatnonzero(mask)
        for k in hits[:limit].tolist():
            add(Finding(severity, entry_offset(index_of(k)), what.format(block=k, offset=int(offs[k]) if
                                                                       k < offs.size else 0), hint))
        if hits.size > limit:
            add(Finding(severity, None, f"... and {hits.size - limit} more like that", hint))

    reserved = batmod.reserved_bits(entries) != 0
    for k in np.flatnonzero(reserved)[:10].tolist():
        add(Finding(ERROR, entry_offset(k), f"BAT entry {k} has reserved bits set", "the BAT is damaged"))
    report(st == 4, ERROR, "block {block}: reserved BAT state 4", "the BAT is damaged")
    report(st == C.PAYLOAD_BLOCK_UNMAPPED_V095, WARNING, "block {block}: legacy UNMAPPED state 5 (draft 0.95)",
           "read as UNMAPPED")
    present = (st == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    if not image.has_parent:
        report(st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT, ERROR,
               "block {block}: PARTIALLY_PRESENT in a disk without a parent", "read as FULLY_PRESENT")
    if image.metadata.leave_block_allocated and not image.has_parent:
        report(~present, WARNING, "block {block}: not allocated in a fixed disk",
               "it reads as zeros; Windows keeps every block of a fixed disk allocated")
    report((~present) & ((st == C.PAYLOAD_BLOCK_ZERO) | (st == C.PAYLOAD_BLOCK_NOT_PRESENT)) & (offs != 0),
           WARNING, "block {block}: file offset 0x{offset:x} on a block that has no data (must be 0)",
           "Hyper-V may refuse such a file")
    bs = g.block_size
    last_block = g.payload_blocks - 1
    ends = offs + bs
    past = present & (ends > file_size)
    is_last = np.zeros_like(past)
    if is_last.size:
        is_last[last_block] = True
    beyond = present & (offs >= file_size)
    report((past & ~is_last) | beyond, ERROR, "block {block}: data at 0x{offset:x} runs past the end of the file",
           "the file was truncated; copy it again from its source")
    report(past & is_last & ~beyond, WARNING, "block {block}: the last block runs past the end of the file (read as zeros)",
           "an old qemu wrote such files")
    # Overlaps: every allocated structure sorted by offset.
    spans = [(0, C.HEADER_SECTION_SIZE, "header section")]
    h = image.header
    if h.log_length:
        spans.append((h.log_offset, h.log_offset + h.log_length, "log"))
    for r in image.region_table:
        spans.append((r.file_offset, r.file_offset + r.length, f"region {r.name}"))
    sidx = batmod.sbm_indices(g)
    se = entries[sidx]
    sst = batmod.states(se)
    soff = batmod.file_offsets(se).astype(np.int64)
    bad_sbm_state = (sst != C.SB_BLOCK_NOT_PRESENT) & (sst != C.SB_BLOCK_PRESENT)
    for k in np.flatnonzero(bad_sbm_state)[:10].tolist():
        add(Finding(ERROR, entry_offset(int(sidx[k])), f"sector bitmap entry of chunk {k}: invalid state "
                    f"{int(sst[k])}", "the BAT is damaged"))
    sbm_present = sst == C.SB_BLOCK_PRESENT
    if not image.has_parent:
        for k in np.flatnonzero(sbm_present)[:10].tolist():
            add(Finding(WARNING, entry_offset(int(sidx[k])), f"sector bitmap of chunk {k} is present in a disk "
                        "without a parent", "it is ignored"))
    else:
        partial_blocks = np.flatnonzero(st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
        chunks = partial_blocks // g.chunk_ratio
        present_chunks = np.zeros(g.sector_bitmap_blocks, dtype=bool)
        present_chunks[: sbm_present.size] = sbm_present
        missing = partial_blocks[~present_chunks[chunks]]
        for k in missing[:10].tolist():
            add(Finding(ERROR, entry_offset(int(pidx[k])), f"block {k} is PARTIALLY_PRESENT but its chunk's "
                        "sector bitmap is not present", "the sectors of this block cannot be read"))
    block_spans = np.stack([offs[present], offs[present] + bs, np.flatnonzero(present)], axis=1) \
        if present.any() else np.zeros((0, 3), dtype=np.int64)
    sbm_spans = np.stack([soff[sbm_present], soff[sbm_present] + C.MiB, -1 - np.flatnonzero(sbm_present)], axis=1) \
        if sbm_present.any() else np.zeros((0, 3), dtype=np.int64)
    allspans = np.concatenate([np.array([(a, b, -10**9) for a, b, _ in spans], dtype=np.int64).reshape(-1, 3),
                               block_spans.astype(np.int64), sbm_spans.astype(np.int64)])
    order = np.argsort(allspans[:, 0], kind="stable")
    allspans = allspans[order]
    if allspans.shape[0] > 1:
        prev_end = np.maximum.accumulate(allspans[:-1, 1])
        overlap = np.flatnonzero(allspans[1:, 0] < prev_end) + 1
        for k in overlap[:10].tolist():
            start, _, who = (int(v) for v in allspans[k])
            name = f"block {who}" if who >= 0 else (f"sector bitmap {-1 - who}" if who > -10**9 else "structure")
            add(Finding(ERROR, start, f"{name} at 0x{start:x} overlaps another structure",
                        "two BAT entries share space; data may be lost"))
        if overlap.size > 10:
            add(Finding(ERROR, None, f"... and {overlap.size - 10} more overlaps",
                                "two BAT entries share space; data may be lost"))
    tail = image.bat[g.bat_entries:]
    if tail.size and np.any(tail):
        k = int(np.flatnonzero(tail)[0]) + g.bat_entries
        add(Finding(WARNING, entry_offset(k), "BAT entries past the last block of the disk are not zero",
                    "they are ignored"))
    md = image.metadata
    for e in md.entries:
        if e.item_id in C.METADATA_ITEM_NAMES and not e.is_user:
            expect_vd = e.item_id in (C.VIRTUAL_DISK_SIZE_GUID, C.PAGE83_DATA_GUID, C.LOGICAL_SECTOR_SIZE_GUID,
                                      C.PHYSICAL_SECTOR_SIZE_GUID)
            if e.item_id in (C.FILE_PARAMETERS_GUID, C.PARENT_LOCATOR_GUID) or expect_vd:
                if e.is_virtual_disk != expect_vd:
                    add(Finding(WARNING, image.metadata_region.file_offset,
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
