"""Reading a damaged file into a :class:`Salvage`: everything a repair needs to write a good
file, and the report of what was found, repaired and lost. Nothing here writes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...file.log import LogEntry
from ...file.storage import Storage
from ...format import bat as batmod
from ...format import constants as C
from ...format import layout, sniff
from ...format.geometry import Geometry
from ...format.records import Header, RegionEntry
from .batfix import BatRepair, first_entries, kept_entries, read_bat
from .parentfit import fit_to_parent
from .meta import Params, blocks_apart, infer_block_size, looks_differencing, read_metadata, settle
from .report import FOUND, LOST, REPAIRED, SalvageReport
from .scan import blank_header, find_bat, find_metadata, read_headers, read_region_tables, replay_log

INFER_BAT_BYTES = 8 * C.MiB  # entries looked at to infer a lost block size


@dataclass
class Salvage:
    """A damaged file as repair sees it. ``source`` reads the file with the valid part of its
    log laid over it; ``bat`` is the cleaned BAT's non-zero entries (untrusted entries
    dropped); ``bat_kept`` the raw entries of a differencing disk's last chunk past its last
    block (:func:`~.batfix.kept_entries`)."""

    report: SalvageReport
    source: Storage
    file_size: int
    header: Header | None = None
    header_valid: list[bool] = field(default_factory=lambda: [False, False])
    header_slot: int = 0
    replayed: list[LogEntry] = field(default_factory=list)
    bat_region: RegionEntry | None = None
    metadata_region: RegionEntry | None = None
    regions_found: bool = False
    params: Params = field(default_factory=Params)
    geometry: Geometry | None = None
    bat: batmod.SparseBat | None = None
    bat_kept: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))


def salvage(storage: Storage, *, size: int | None = None, parent_locator: dict[str, str] | None = None,
            parent: str | None = None) -> Salvage:
    """Read ``storage`` (a damaged file) into a :class:`Salvage`; ``report.unrecoverable``
    says why when no good file can be made from it."""
    report = SalvageReport(storage.path)
    s = Salvage(report, storage, storage.size())
    if not _identify(s):
        return s
    s.header, s.header_valid, s.header_slot = read_headers(storage, report)
    if s.header is not None:
        log = replay_log(storage, s.header, report)
        s.source, s.replayed = log.storage, log.replayed
    else:
        report.add("log", LOST, "no valid header names it: if it was dirty, its last updates are lost")
    steps = (_regions, _metadata, _geometry, _locate_bat, _bat)
    for step in steps:
        step(s, size=size, parent_locator=parent_locator, parent=parent)
        if not report.ok:
            break
    return s


def _identify(s: Salvage) -> bool:
    """Is this a VHDX at all? A lost file identifier is repaired when headers or region tables remain."""
    report, storage = s.report, s.source
    head = storage.read(0, min(s.file_size, C.REGION_TABLE2_OFFSET + C.REGION_TABLE_SIZE))
    signs = [head[o:o + 4] for o in (*C.HEADER_OFFSETS, *C.REGION_TABLE_OFFSETS)]
    looks = any(sig in (C.SIGNATURE_HEADER, C.SIGNATURE_REGION) for sig in signs)
    if s.file_size < C.HEADER_SECTION_SIZE:
        report.fail(f"{s.file_size} bytes: too short for a VHDX file (the header section alone is 1 MiB)")
        return False
    if head[:8] != C.SIGNATURE_FILE:
        if not looks:
            tail = storage.read(max(0, s.file_size - sniff.TAIL_SIZE), min(s.file_size, sniff.TAIL_SIZE))
            report.fail(sniff.not_vhdx_message(head, tail, s.file_size))
            return False
        report.add("file identifier", REPAIRED, "damaged; rewritten")
    else:
        report.add("file identifier", FOUND)
    return True


def _spans(s: Salvage) -> list[layout.Span]:
    regions = [r for r in (s.bat_region, s.metadata_region) if r is not None]
    return layout.structure_spans(s.header or blank_header(), regions)


def _regions(s: Salvage, **_: object) -> None:
    table = read_region_tables(s.source, s.header or blank_header(), s.report)
    if table is not None:
        s.regions_found = True
        s.bat_region = next(e for e in table if e.guid == C.BAT_REGION_GUID)
        s.metadata_region = next(e for e in table if e.guid == C.METADATA_REGION_GUID)
        return
    s.metadata_region = find_metadata(s.source, _spans(s))
    if s.metadata_region is None:
        s.report.add("metadata region", LOST, "no 'metadata' signature found at a 64 KiB alignment")
        s.report.fail("both region tables are lost and no metadata region was found")
        return
    s.report.add("metadata region", REPAIRED, f"found by its signature at 0x{s.metadata_region.file_offset:x}")


def _metadata(s: Salvage, *, size: int | None, parent_locator: dict[str, str] | None, parent: str | None,
              **_: object) -> None:
    assert s.metadata_region is not None
    s.params = read_metadata(s.source, s.metadata_region, s.report)
    fit_to_parent(s.params, s.report, s.source.path, parent)
    settle(s.params, s.report, size=size, parent_locator=parent_locator)


def _geometry(s: Salvage, *, size: int | None = None, **_: object) -> None:
    p = s.params
    assert p.logical_sector_size is not None
    lss = p.logical_sector_size
    entries = np.zeros(0, dtype="<u8")
    if s.bat_region is not None:
        entries = first_entries(s.source, s.bat_region.file_offset, min(s.bat_region.length, INFER_BAT_BYTES) // 8)
        _block_size(s, entries)
    if p.block_size is None:
        s.report.add("block size", LOST, "cannot be inferred")
        s.report.fail("the block size is lost and the BAT's layout does not imply one")
        return
    if p.has_parent is None and not _decide_parent(s, entries):
        return
    if p.virtual_disk_size is None:
        s.report.add("virtual size", LOST, "cannot be inferred from the file")
        s.report.fail("the virtual size is lost and cannot be inferred; give it with --size")
        return
    s.geometry = Geometry(p.virtual_disk_size, p.block_size, lss, bool(p.has_parent))
    if s.geometry.bat_entries * 8 > C.MAX_BAT_REGION_SIZE:
        s.report.fail(f"a BAT of {s.geometry.bat_entries} entries is over the 513 MiB maximum")
    elif s.bat_region is not None and s.bat_region.length < s.geometry.bat_entries * 8:
        _size_against_bat(s, size)
    s.report.virtual_size = p.virtual_disk_size


def _block_size(s: Salvage, entries: np.ndarray) -> None:
    """A lost block size inferred from the BAT; one that does not fit the BAT replaced."""
    p = s.params
    assert s.bat_region is not None and p.logical_sector_size is not None
    lss = p.logical_sector_size
    if p.block_size is not None and p.virtual_disk_size is not None and not _fits_bat(entries, p, s.file_size):
        bs = infer_block_size(entries, lss, s.file_size, s.bat_region.length, p.virtual_disk_size)
        if bs is not None and bs != p.block_size:
            s.report.add("block size", REPAIRED, f"the metadata's {p.block_size} does not fit the BAT (blocks "
                         f"overlap, or entries lie past the disk's end); {bs}, from the BAT's layout")
            p.block_size = bs
    elif p.block_size is None:
        p.block_size = infer_block_size(entries, lss, s.file_size, s.bat_region.length, p.virtual_disk_size)
        if p.block_size is not None:
            s.report.add("block size", REPAIRED, f"{p.block_size}, inferred from the BAT's layout")


def _decide_parent(s: Salvage, entries: np.ndarray) -> bool:
    """File parameters lost and no --parent: a differencing disk (by its BAT) cannot go on."""
    p = s.params
    assert p.block_size is not None and p.logical_sector_size is not None
    p.has_parent = looks_differencing(entries, p.block_size, p.logical_sector_size)
    if p.has_parent:
        s.report.add("parent locator", LOST, "lost with the file parameters; the BAT's sector bitmaps show "
                     "a differencing disk")
        s.report.fail("this is a differencing disk whose parent locator is lost; name the parent with --parent FILE")
        return False
    return True


def _size_against_bat(s: Salvage, size: int | None) -> None:
    """The metadata's virtual size needs more BAT entries than the BAT region holds: it is
    damaged; ``--size`` replaces it."""
    p = s.params
    assert s.bat_region is not None and p.virtual_disk_size is not None and p.block_size is not None
    need = f"virtual size {p.virtual_disk_size} needs a BAT of {s.geometry.bat_entries * 8 if s.geometry else 0} " \
           f"bytes; the BAT region holds {s.bat_region.length}"
    if size is None or size == p.virtual_disk_size:
        s.report.add("virtual size", LOST, need)
        s.report.fail(f"the {need}: give the virtual size with --size")
        return
    p.virtual_disk_size = size
    s.geometry = Geometry(size, p.block_size, p.logical_sector_size or 512, bool(p.has_parent))
    s.report.add("virtual size", REPAIRED, f"the {need}; {size} from --size")
    if s.bat_region.length < s.geometry.bat_entries * 8:
        s.report.fail(f"--size {size} does not fit the BAT region either")


def _fits_bat(entries: np.ndarray, p: Params, file_size: int) -> bool:
    """Does the metadata's block size fit the BAT: blocks apart, no entry past the disk's end?"""
    assert p.block_size is not None and p.logical_sector_size is not None and p.virtual_disk_size is not None
    if not blocks_apart(entries, p.block_size, p.logical_sector_size, file_size, check_end=False):
        return False
    g = Geometry(p.virtual_disk_size, p.block_size, p.logical_sector_size, bool(p.has_parent))
    return not np.any(entries[g.bat_entries:])


def _locate_bat(s: Salvage, **_: object) -> None:
    if s.bat_region is not None:
        return
    assert s.geometry is not None
    s.bat_region = find_bat(s.source, s.geometry, _spans(s))
    if s.bat_region is None:
        s.report.add("BAT region", LOST, "no table of valid entries found at a 1 MiB alignment")
        s.report.fail("the BAT region is lost: blocks carry no identity to rebuild it from")
        return
    s.report.add("BAT region", REPAIRED, f"found by its content at 0x{s.bat_region.file_offset:x}")
    s.report.add("region tables", REPAIRED, "rebuilt from the metadata and BAT regions the scan found")


def _bat(s: Salvage, **_: object) -> None:
    assert s.geometry is not None and s.bat_region is not None
    bat, held = read_bat(s.source, s.bat_region, s.geometry)
    fix = BatRepair(bat, s.geometry, s.source.size(), _spans(s), s.report)
    fix.run(held)
    s.bat = fix.bat
    s.bat_kept = kept_entries(s.source, s.bat_region, s.geometry)
