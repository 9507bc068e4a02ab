"""The metadata region, item by item: what survives is kept, what is missing or damaged is
inferred where the file allows it (block size from the BAT's layout), taken from the user
(``--size``, ``--parent``) or, for values the guest does not depend on, chosen and reported."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from ...errors import VhdxError
from ...file.storage import Storage
from ...format import bat as batmod
from ...format import constants as C
from ...format.locator import parse_linkage, parse_parent_locator
from ...format.records import MetadataItem, RegionEntry, metadata_items, parse_metadata_region
from ...format.structs import MetadataTableEntry
from .report import FOUND, LOST, REPAIRED, SalvageReport


@dataclass
class Params:
    """The disk's parameters as recovered; None where unknown so far."""

    block_size: int | None = None
    logical_sector_size: int | None = None
    physical_sector_size: int | None = None
    virtual_disk_size: int | None = None
    page83_data: uuid.UUID | None = None
    has_parent: bool | None = None
    leave_block_allocated: bool = False
    locator: dict[str, str] | None = None
    locator_damaged: bool = False
    extra_items: list[MetadataItem] = field(default_factory=list)


_SYSTEM = {C.FILE_PARAMETERS_GUID, C.VIRTUAL_DISK_SIZE_GUID, C.PAGE83_DATA_GUID, C.LOGICAL_SECTOR_SIZE_GUID,
           C.PHYSICAL_SECTOR_SIZE_GUID, C.PARENT_LOCATOR_GUID}


def read_metadata(storage: Storage, region: RegionEntry, report: SalvageReport) -> Params:
    """The parameters from the metadata region: parsed whole when it is intact, else item by item."""
    length = max(C.METADATA_TABLE_SIZE, min(region.length, C.MAX_METADATA_REGION_SIZE,
                                            storage.size() - region.file_offset))
    buf = storage.read(region.file_offset, length)
    try:
        md = parse_metadata_region(buf, path=storage.path, offset=region.file_offset)
    except VhdxError as e:
        report.notes.append(f"metadata region: {e.detail}")
        return _item_by_item(buf, report)
    report.add("metadata table", FOUND)
    extras = [it for it in metadata_items(md) if it.item_id not in _SYSTEM or (it.flags & C.METADATA_IS_USER)]
    locator_ok = md.parent_locator is None or usable_locator(md.parent_locator)
    return Params(md.block_size, md.logical_sector_size, md.physical_sector_size, md.virtual_disk_size,
                  md.page83_data, md.has_parent, md.leave_block_allocated, md.parent_locator, not locator_ok, extras)


def usable_locator(pairs: dict[str, str]) -> bool:
    """A locator a parent can be found with: a valid parent_linkage and at least one path."""
    if parse_linkage(pairs.get("parent_linkage")) is None:
        return False
    return any(pairs.get(k) for k in ("relative_path", "volume_path", "absolute_win32_path"))


def _raw_items(buf: bytes) -> dict[uuid.UUID, bytes]:
    """The system items whose table entries are sane, first entry of each wins."""
    count = int.from_bytes(buf[10:12], "little") if len(buf) >= 12 else 0
    slots = count if 0 < count <= C.MAX_METADATA_ENTRIES else C.MAX_METADATA_ENTRIES
    items: dict[uuid.UUID, bytes] = {}
    for i in range(slots):
        at = 32 + 32 * i
        if at + 32 > min(len(buf), C.METADATA_TABLE_SIZE):
            break
        e = MetadataTableEntry.parse(bytes(buf[at:at + 32]))
        if e.item_id not in _SYSTEM or e.item_id in items:
            continue
        if e.length > C.MAX_METADATA_ITEM_SIZE or e.offset < C.METADATA_TABLE_SIZE or e.offset + e.length > len(buf):
            continue
        items[e.item_id] = bytes(buf[e.offset:e.offset + e.length])
    return items


def _u(data: bytes | None, size: int) -> int | None:
    return int.from_bytes(data, "little") if data is not None and len(data) == size else None


def _item_by_item(buf: bytes, report: SalvageReport) -> Params:
    """Each known item on its own; an invalid value counts as missing."""
    items = _raw_items(buf)
    p = Params()
    _file_parameters(p, items.get(C.FILE_PARAMETERS_GUID))
    lss = _u(items.get(C.LOGICAL_SECTOR_SIZE_GUID), 4)
    p.logical_sector_size = lss if lss in C.LOGICAL_SECTOR_SIZES else None
    pss = _u(items.get(C.PHYSICAL_SECTOR_SIZE_GUID), 4)
    p.physical_sector_size = pss if pss in C.PHYSICAL_SECTOR_SIZES else None
    size = _u(items.get(C.VIRTUAL_DISK_SIZE_GUID), 8)
    if size and size <= C.MAX_VIRTUAL_DISK_SIZE and size % (p.logical_sector_size or 512) == 0:
        p.virtual_disk_size = size
    page83 = items.get(C.PAGE83_DATA_GUID)
    if page83 is not None and len(page83) == 16:
        p.page83_data = uuid.UUID(bytes_le=page83)
    loc = items.get(C.PARENT_LOCATOR_GUID)
    if loc is not None:
        try:
            p.locator = parse_parent_locator(loc)
            p.locator_damaged = not usable_locator(p.locator)
        except VhdxError:
            p.locator_damaged = True
        if p.has_parent is None:
            p.has_parent = True
    report.add("metadata table", REPAIRED, "damaged; the items that survive were read one by one")
    return p


def _file_parameters(p: Params, fp: bytes | None) -> None:
    """Block size and flags from a file parameters item, when it is whole and valid."""
    if fp is None or len(fp) != 8:
        return
    bs, flags = int.from_bytes(fp[:4], "little"), int.from_bytes(fp[4:], "little")
    if C.MIN_BLOCK_SIZE <= bs <= C.MAX_BLOCK_SIZE and not bs & (bs - 1):
        p.block_size = bs
    p.has_parent = bool(flags & C.FILE_PARAMETERS_HAS_PARENT)
    p.leave_block_allocated = bool(flags & C.FILE_PARAMETERS_LEAVE_BLOCK_ALLOCATED)


def infer_block_size(entries: np.ndarray, logical_sector_size: int, file_size: int,
                     bat_length: int, virtual_size: int | None) -> int | None:
    """The block size the BAT's layout implies: the largest power of two (1 to 256 MiB) that
    keeps the payload blocks it places apart and inside the file and lets the BAT hold the disk
    (None when none does)."""
    bs = C.MAX_BLOCK_SIZE
    while bs >= C.MIN_BLOCK_SIZE:
        fits = virtual_size is None or _bat_fits(virtual_size, bs, logical_sector_size, bat_length)
        if fits and blocks_apart(entries, bs, logical_sector_size, file_size):
            return bs
        bs //= 2
    return None


def blocks_apart(entries: np.ndarray, bs: int, lss: int, file_size: int, *, check_end: bool = True) -> bool:
    """True when, read with block size ``bs``, the payload blocks the BAT places share no bytes
    and the last one starts less than a block before the end of the file (1 MiB rounded)."""
    ratio = C.SECTORS_PER_CHUNK * lss // bs
    idx = _placing(entries)
    payload = entries[idx[(idx % (ratio + 1)) != ratio]]
    offs = np.unique(batmod.file_offsets(payload).astype(np.int64))
    offs = offs[(offs >= C.HEADER_SECTION_SIZE) & (offs < file_size)]
    if offs.size >= 2 and int(np.diff(offs).min()) < bs:
        return False
    return not (check_end and offs.size) or int(offs[-1]) + bs <= -(-file_size // C.MiB) * C.MiB


def looks_differencing(entries: np.ndarray, bs: int, lss: int) -> bool:
    """Does the BAT, read with block size ``bs``, hold what only a differencing disk holds:
    a present sector bitmap, or a PARTIALLY_PRESENT block?"""
    ratio = C.SECTORS_PER_CHUNK * lss // bs
    idx = _placing(entries)
    sbm = (idx % (ratio + 1)) == ratio
    st = batmod.states(entries[idx])
    return bool(np.any(sbm & (st == C.SB_BLOCK_PRESENT)) or np.any(~sbm & (st == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)))


def _placing(entries: np.ndarray) -> np.ndarray:
    """The indexes of the entries in state 6 or 7 (FULLY_PRESENT or PARTIALLY_PRESENT for a
    payload entry, SB_BLOCK_PRESENT for a sector bitmap: the states that place something in
    the file), found from each entry's low byte (no whole-array ``uint64`` temporaries: a BAT
    that qemu-img filled with ZERO has no zero entry to skip)."""
    low = np.ascontiguousarray(entries, dtype="<u8").view(np.uint8)[::8] & np.uint8(C.BAT_STATE_MASK)
    return np.flatnonzero((low == C.PAYLOAD_BLOCK_FULLY_PRESENT) | (low == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT))


def _bat_fits(size: int, bs: int, lss: int, bat_length: int) -> bool:
    blocks = -(-size // bs)
    ratio = C.SECTORS_PER_CHUNK * lss // bs
    return (blocks + blocks // max(ratio, 1) + 1) * 8 <= bat_length


def settle(p: Params, report: SalvageReport, *, size: int | None, parent_locator: dict[str, str] | None) -> None:
    """Fill what is still unknown, except the block size and a lost virtual size the user did
    not give: ``size`` and ``parent_locator`` from the user, sector sizes and the disk id chosen
    and reported. Marks the report unrecoverable when a differencing disk's locator cannot be had."""
    if p.virtual_disk_size is None and size is not None:
        p.virtual_disk_size = size
        report.add("virtual size", REPAIRED, f"{size} bytes, from --size")
    if p.logical_sector_size is None:
        p.logical_sector_size = 512
        report.add("logical sector", REPAIRED, "lost; 512 bytes assumed (the guest may see another sector size)")
    if p.physical_sector_size is None:
        p.physical_sector_size = 4096
        report.add("physical sector", REPAIRED, "lost; 4096 bytes assumed")
    if p.page83_data is None:
        p.page83_data = uuid.uuid4()
        report.add("disk id", REPAIRED, f"lost; a new page 83 id {p.page83_data} was made")
    _settle_locator(p, report, parent_locator)


def _settle_locator(p: Params, report: SalvageReport, parent_locator: dict[str, str] | None) -> None:
    if p.has_parent is False:
        if parent_locator is not None:
            report.notes.append("--parent ignored: the file is not a differencing disk")
        return
    if p.has_parent is None:
        if parent_locator is None:
            return  # decided from the BAT's layout once the block size is known
        p.has_parent = True
    if p.locator is not None and not p.locator_damaged:
        report.add("parent locator", FOUND)
        return
    if parent_locator is None:
        report.add("parent locator", LOST, "damaged or missing")
        report.fail("the parent locator is lost; name the parent with --parent FILE")
        return
    p.locator, p.has_parent = parent_locator, True
    report.add("parent locator", REPAIRED, "rebuilt from --parent")
