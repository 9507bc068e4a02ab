"""Parse and build headers, region tables and the metadata region (§2 - §4).

Pure functions over bytes. Errors name the structure and the file offset handed in.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, replace
from struct import Struct
from typing import Any

import construct as cs

from ..errors import ChecksumError, CorruptError, UnsupportedError
from . import constants as C
from .checksum import crc32c_zeroed, stamp, stored_checksum
from .locator import parse_parent_locator
from .structs import (FileIdentifier, FileParameters, Flat, Header as HeaderStruct, MetadataTableEntry,
                      MetadataTableHeader, Page83Data, RegionTableEntry, RegionTableHeader,
                      SectorSize, VirtualDiskSize)


def parse_at(struct: cs.Construct, buf: bytes, *, what: str, path: str | None, offset: int | None) -> Any:
    """The one boundary between construct's errors and ours."""
    try:
        return struct.parse(buf)
    except cs.ConstructError as e:
        raise CorruptError(f"{what}: {e}", path=path, offset=offset) from e


def values_at(struct: Flat, buf: bytes, *, what: str, path: str | None, offset: int | None, at: int = 0) -> list[Any]:
    """:func:`parse_at` of the table at ``buf[at:]``, its fields as a list in declaration order."""
    try:
        return struct.values(buf, at)
    except cs.ConstructError as e:
        raise CorruptError(f"{what}: {e}", path=path, offset=offset) from e


def verify_checksum(buf: bytes, what: str, *, path: str | None, offset: int | None) -> None:
    """Raise ChecksumError unless the CRC-32C stored at byte 4 of ``buf`` matches its content."""
    stored, computed = stored_checksum(buf), crc32c_zeroed(buf)
    if stored != computed:
        raise ChecksumError(f"{what}: CRC-32C 0x{computed:08x}, stored 0x{stored:08x}",
                            path=path, offset=offset, stored=stored, computed=computed)


def _guid_dict(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in d.items()}


# ---------------------------------------------------------------- file identifier

def parse_creator(buf: bytes, *, path: str | None = None) -> str:
    """The creator text of the file type identifier (§1.2); raises unless it says 'vhdxfile'."""
    ident = parse_at(FileIdentifier, buf[:520], what="file type identifier", path=path, offset=0)
    raw = bytes(ident.creator)
    text = raw.decode("utf-16-le", errors="replace")
    return text.split("\0", 1)[0]


def build_file_identifier(creator: str) -> bytes:
    """The file type identifier naming ``creator`` (UTF-16LE, at most 255 characters)."""
    raw = creator.encode("utf-16-le")[:510]
    return FileIdentifier.build(dict(creator=raw + bytes(512 - len(raw))))


# ---------------------------------------------------------------- headers (§2)

@dataclass(frozen=True)
class Header:
    """One parsed header (§2.1); ``checksum`` is the stored CRC-32C."""

    sequence_number: int
    file_write_guid: uuid.UUID
    data_write_guid: uuid.UUID
    log_guid: uuid.UUID
    log_version: int
    version: int
    log_length: int
    log_offset: int
    checksum: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (GUIDs as text)."""
        return _guid_dict(asdict(self))

    def replace(self, **changes: Any) -> "Header":
        """A copy with ``changes`` applied."""
        return replace(self, **changes)


def parse_header(buf: bytes, *, path: str | None = None, offset: int | None = None) -> Header:
    """One 4 KiB header; raises on a bad signature or CRC-32C."""
    if len(buf) < C.HEADER_SIZE:
        raise CorruptError("header: file too short", path=path, offset=offset)
    buf = bytes(buf[:C.HEADER_SIZE])
    if buf[:4] != C.SIGNATURE_HEADER:
        raise CorruptError(f"header: signature {buf[:4]!r}, expected b'head'", path=path, offset=offset)
    verify_checksum(buf, "header", path=path, offset=offset)
    _, checksum, sequence_number, file_write_guid, data_write_guid, log_guid, log_version, version, log_length, \
        log_offset, _ = values_at(HeaderStruct, buf, what="header", path=path, offset=offset)
    return Header(sequence_number, file_write_guid, data_write_guid, log_guid, log_version, version, log_length,
                  log_offset, checksum)


def build_header(h: Header) -> bytes:
    """The 4 KiB header with its CRC-32C (``h.checksum`` is ignored)."""
    raw = bytearray(HeaderStruct.build(dict(
        checksum=0, sequence_number=h.sequence_number, file_write_guid=h.file_write_guid,
        data_write_guid=h.data_write_guid, log_guid=h.log_guid, log_version=h.log_version,
        version=h.version, log_length=h.log_length, log_offset=h.log_offset, reserved=bytes(4016))))
    return bytes(stamp(raw))


def validate_header_fields(h: Header, *, path: str | None, offset: int | None) -> None:
    """Refuse a header whose version, log version or log placement we cannot use."""
    if h.version != C.VERSION:
        raise UnsupportedError(f"header: version {h.version}, only 1 is known", path=path, offset=offset)
    if h.log_guid != C.ZERO_GUID and h.log_version != C.LOG_VERSION:
        raise UnsupportedError(f"header: log version {h.log_version}, only 0 is known", path=path, offset=offset)
    if h.log_length % C.ALIGNMENT or h.log_offset % C.ALIGNMENT:
        raise CorruptError(f"header: log at {h.log_offset}, {h.log_length} bytes, not 1 MiB aligned",
                           path=path, offset=offset)
    if h.log_length and h.log_offset < C.HEADER_SECTION_SIZE:
        raise CorruptError(f"header: log offset {h.log_offset} inside the header section",
                           path=path, offset=offset)
    if h.log_length > C.MAX_LOG_LENGTH:
        raise UnsupportedError(f"header: log length {h.log_length} is over our 1 GiB limit",
                               path=path, offset=offset)


def current_header(headers: list[Header | None], errors: list[str | None], *,
                   path: str | None) -> tuple[int, bool]:
    """Which of the two headers is current: a valid one with the highest sequence number;
    identical headers are tolerated (§2.2). Returns (index, both identical); ``errors`` say
    why an invalid header is None."""
    h1, h2 = headers
    if h1 is None and h2 is None:
        raise CorruptError(f"no valid header: header 1: {errors[0]}; header 2: {errors[1]}", path=path,
                           offset=C.HEADER1_OFFSET)
    if h1 is None or h2 is None:
        return (0 if h1 is not None else 1), False
    if h1.sequence_number != h2.sequence_number:
        return (0 if h1.sequence_number > h2.sequence_number else 1), False
    if h1.replace(checksum=0) != h2.replace(checksum=0):
        raise CorruptError(f"both headers carry sequence number {h1.sequence_number} but differ", path=path,
                           offset=C.HEADER1_OFFSET)
    return 0, True


# ---------------------------------------------------------------- region table (§3)

REGION_NAMES = {C.BAT_REGION_GUID: "BAT", C.METADATA_REGION_GUID: "metadata"}


@dataclass(frozen=True)
class RegionEntry:
    """One region table entry (§3.2)."""

    guid: uuid.UUID
    file_offset: int
    length: int
    required: int

    @property
    def name(self) -> str:
        """"BAT", "metadata" or the GUID of an unknown region."""
        return REGION_NAMES.get(self.guid) or str(self.guid)

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values."""
        return dict(region=self.name, guid=str(self.guid), file_offset=self.file_offset,
                    length=self.length, required=self.required)


def parse_region_table(buf: bytes, *, path: str | None = None, offset: int | None = None) -> list[RegionEntry]:
    """The entries of one 64 KiB region table; raises on a bad signature, CRC-32C or count."""
    buf = bytes(buf[:C.REGION_TABLE_SIZE])
    if len(buf) < C.REGION_TABLE_SIZE:
        raise CorruptError("region table: file too short", path=path, offset=offset)
    if buf[:4] != C.SIGNATURE_REGION:
        raise CorruptError(f"region table: signature {buf[:4]!r}, expected b'regi'", path=path, offset=offset)
    verify_checksum(buf, "region table", path=path, offset=offset)
    count = values_at(RegionTableHeader, buf, what="region table", path=path, offset=offset)[2]
    if count > C.MAX_REGION_ENTRIES:
        raise CorruptError(f"region table: {count} entries, at most 2047", path=path, offset=offset)
    return [RegionEntry(*RegionTableEntry.values(buf, 16 + 32 * i)) for i in range(count)]


def build_region_table(entries: list[RegionEntry]) -> bytes:
    """A 64 KiB region table holding ``entries``, with its CRC-32C."""
    buf = bytearray(C.REGION_TABLE_SIZE)
    buf[:16] = RegionTableHeader.build(dict(checksum=0, entry_count=len(entries), reserved=0))
    for i, e in enumerate(entries):
        buf[16 + 32 * i:48 + 32 * i] = RegionTableEntry.build(
            dict(guid=e.guid, file_offset=e.file_offset, length=e.length, required=e.required))
    return bytes(stamp(buf))


# ---------------------------------------------------------------- metadata (§4)

@dataclass(frozen=True)
class MetadataEntry:
    """One metadata table entry (§4.1): where an item sits in the region and its flags."""

    item_id: uuid.UUID
    offset: int
    length: int
    flags: int

    @property
    def name(self) -> str:
        """The item's name, or its GUID when unknown."""
        return C.METADATA_ITEM_NAMES.get(self.item_id) or str(self.item_id)

    @property
    def is_user(self) -> bool:
        """IsUser: a user item rather than a system one."""
        return bool(self.flags & C.METADATA_IS_USER)

    @property
    def is_virtual_disk(self) -> bool:
        """IsVirtualDisk: the item describes the virtual disk, not this file."""
        return bool(self.flags & C.METADATA_IS_VIRTUAL_DISK)

    @property
    def is_required(self) -> bool:
        """IsRequired: a reader that does not know the item must refuse the file."""
        return bool(self.flags & C.METADATA_IS_REQUIRED)

    def to_dict(self) -> dict[str, Any]:
        """The entry as JSON-ready values."""
        return dict(item=self.name, item_id=str(self.item_id), offset=self.offset, length=self.length,
                    is_user=self.is_user, is_virtual_disk=self.is_virtual_disk, is_required=self.is_required)


@dataclass(frozen=True)
class Metadata:
    """The known system items, checked, plus the raw table for everything else."""

    entries: tuple[MetadataEntry, ...]
    items: dict[tuple[uuid.UUID, bool], bytes] = field(repr=False)
    block_size: int
    leave_block_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83_data: uuid.UUID
    parent_locator: dict[str, str] | None

    def to_dict(self) -> dict[str, Any]:
        """The known items and the table as JSON-ready values."""
        return dict(
            block_size=self.block_size, leave_block_allocated=self.leave_block_allocated,
            has_parent=self.has_parent, virtual_disk_size=self.virtual_disk_size,
            logical_sector_size=self.logical_sector_size, physical_sector_size=self.physical_sector_size,
            page83_data=str(self.page83_data), parent_locator=self.parent_locator,
            entries=[e.to_dict() for e in self.entries])


KNOWN_SYSTEM_ITEMS = {C.FILE_PARAMETERS_GUID, C.VIRTUAL_DISK_SIZE_GUID, C.PAGE83_DATA_GUID,
                      C.LOGICAL_SECTOR_SIZE_GUID, C.PHYSICAL_SECTOR_SIZE_GUID, C.PARENT_LOCATOR_GUID,
                      C.CHS_PARAMETERS_GUID, C.PMEM_LABEL_GUID}


def parse_metadata_region(buf: bytes, *, path: str | None = None, offset: int = 0,
                          region_length: int | None = None) -> Metadata:
    """The metadata table and its known items; ``offset`` is the region's file offset. ``buf`` is
    the region, or its first bytes up to :func:`metadata_items_end` of a ``region_length`` one."""
    entries, items = parse_metadata_table(buf, path=path, offset=offset, region_length=region_length)
    where = _ItemReader(items, path, offset)
    block_size, flags = FileParameters.values(where.item(C.FILE_PARAMETERS_GUID, 8))
    size, = VirtualDiskSize.values(where.item(C.VIRTUAL_DISK_SIZE_GUID, 8))
    lss, = SectorSize.values(where.item(C.LOGICAL_SECTOR_SIZE_GUID, 4))
    pss, = SectorSize.values(where.item(C.PHYSICAL_SECTOR_SIZE_GUID, 4))
    page83, = Page83Data.values(where.item(C.PAGE83_DATA_GUID, 16))
    validate_disk_parameters(block_size, lss, pss, size, path=path, offset=offset)
    has_parent = bool(flags & C.FILE_PARAMETERS_HAS_PARENT)
    locator = None
    if has_parent:
        loc_entry = next((e for e in entries if e.item_id == C.PARENT_LOCATOR_GUID and not e.is_user), None)
        locator = parse_parent_locator(where.item(C.PARENT_LOCATOR_GUID, None), path=path,
                                       offset=offset + (loc_entry.offset if loc_entry else 0))
    return Metadata(tuple(entries), items, block_size, bool(flags & C.FILE_PARAMETERS_LEAVE_BLOCK_ALLOCATED),
                    has_parent, size, lss, pss, page83, locator)


_ITEM_PLACE = Struct("<II")  # a metadata table entry's offset and length, 16 bytes into it


def metadata_items_end(table: bytes) -> int:
    """Where the last item listed by the metadata ``table`` (the region's first 64 KiB or more)
    ends, counted from the region's start: how much of the region an open must read. Not a check:
    :func:`parse_metadata_table` refuses what lies outside the region."""
    end = C.METADATA_TABLE_SIZE
    if len(table) < C.METADATA_TABLE_SIZE:
        return end
    count = min(int.from_bytes(table[10:12], "little"), C.MAX_METADATA_ENTRIES)
    for i in range(count):
        item_offset, length = _ITEM_PLACE.unpack_from(table, 48 + 32 * i)
        end = max(end, item_offset + min(length, C.MAX_METADATA_ITEM_SIZE))
    return end


def parse_metadata_table(buf: bytes, *, path: str | None = None, offset: int = 0,
                         region_length: int | None = None
                         ) -> tuple[list[MetadataEntry], dict[tuple[uuid.UUID, bool], bytes]]:
    """The table's entries, checked against the region's length (``len(buf)`` unless given), and
    each item's bytes keyed by (item id, is user)."""
    region_length = len(buf) if region_length is None else region_length
    if len(buf) < C.METADATA_TABLE_SIZE or region_length < C.METADATA_TABLE_SIZE:
        raise CorruptError("metadata region: shorter than its 64 KiB table", path=path, offset=offset)
    count = values_at(MetadataTableHeader, buf, what="metadata table", path=path, offset=offset)[2]
    if count > C.MAX_METADATA_ENTRIES:
        raise CorruptError(f"metadata table: {count} entries, at most 2047", path=path, offset=offset)
    entries: list[MetadataEntry] = []
    items: dict[tuple[uuid.UUID, bool], bytes] = {}
    for i in range(count):
        at = 32 + 32 * i
        entry = MetadataEntry(*MetadataTableEntry.values(buf, at)[:4])
        key = (entry.item_id, entry.is_user)
        _check_metadata_entry(entry, region_length, key in items, path=path, offset=offset + at)
        if entry.offset + entry.length > len(buf) and entry.length:
            raise CorruptError(f"metadata item {entry.name}: past the {len(buf)} bytes read of the region",
                               path=path, offset=offset + at)
        entries.append(entry)
        items[key] = bytes(buf[entry.offset:entry.offset + entry.length])
    return entries, items


def _check_metadata_entry(entry: MetadataEntry, region_length: int, seen: bool, *, path: str | None,
                          offset: int) -> None:
    """Refuse an entry that lies outside the region, repeats an item or requires one we do not know."""
    if entry.length > C.MAX_METADATA_ITEM_SIZE:
        raise CorruptError(f"metadata item {entry.name}: {entry.length} bytes, over 1 MiB", path=path, offset=offset)
    if entry.length and (entry.offset < C.METADATA_TABLE_SIZE or entry.offset + entry.length > region_length):
        raise CorruptError(f"metadata item {entry.name}: at {entry.offset}, {entry.length} bytes, "
                           f"outside the {region_length}-byte region", path=path, offset=offset)
    if seen:
        raise CorruptError(f"metadata item {entry.name} listed twice", path=path, offset=offset)
    if entry.is_required and not entry.is_user and entry.item_id not in KNOWN_SYSTEM_ITEMS:
        raise UnsupportedError(f"unknown required metadata item {entry.item_id}", path=path, offset=offset)


@dataclass(frozen=True)
class _ItemReader:
    """The system items of a parsed table, each one required and checked for size."""

    items: dict[tuple[uuid.UUID, bool], bytes]
    path: str | None
    offset: int

    def item(self, guid: uuid.UUID, size: int | None) -> bytes:
        """The bytes of system item ``guid``; raises unless it is present (and ``size`` bytes long, if given)."""
        data = self.items.get((guid, False))
        name = C.METADATA_ITEM_NAMES[guid]
        if data is None:
            raise CorruptError(f"metadata: required item {name} is missing", path=self.path, offset=self.offset)
        if size is not None and len(data) != size:
            raise CorruptError(f"metadata item {name}: {len(data)} bytes, expected {size}",
                               path=self.path, offset=self.offset)
        return data


def validate_disk_parameters(block_size: int, logical_sector_size: int, physical_sector_size: int,
                             virtual_disk_size: int, *, path: str | None, offset: int | None) -> None:
    """Refuse parameters outside the format's limits (§1.3, §4.3 - §4.7)."""
    bs, lss, pss, size = block_size, logical_sector_size, physical_sector_size, virtual_disk_size
    if bs < C.MIN_BLOCK_SIZE or bs > C.MAX_BLOCK_SIZE or bs & (bs - 1):
        raise CorruptError(f"file parameters: block size {bs}, not a power of two from 1 to 256 MiB",
                           path=path, offset=offset)
    if lss not in C.LOGICAL_SECTOR_SIZES:
        raise CorruptError(f"logical sector size {lss}, not 512 or 4096", path=path, offset=offset)
    if pss not in C.PHYSICAL_SECTOR_SIZES:
        raise CorruptError(f"physical sector size {pss}, not 512 or 4096", path=path, offset=offset)
    if size == 0 or size > C.MAX_VIRTUAL_DISK_SIZE or size % lss:
        raise CorruptError(f"virtual disk size {size}: not a non-zero multiple of {lss} up to 64 TiB",
                           path=path, offset=offset)


@dataclass(frozen=True)
class MetadataItem:
    """An item to write into a metadata region: its id, its bytes and its table flags."""

    item_id: uuid.UUID
    data: bytes
    flags: int


def system_items(*, block_size: int, leave_block_allocated: bool, has_parent: bool, virtual_disk_size: int,
                 logical_sector_size: int, physical_sector_size: int, page83_data: uuid.UUID,
                 parent_locator: bytes | None = None) -> list[MetadataItem]:
    """The known items with the flags Windows writes, in Windows' order (§4.2)."""
    req, vd = C.METADATA_IS_REQUIRED, C.METADATA_IS_VIRTUAL_DISK
    flags = (C.FILE_PARAMETERS_LEAVE_BLOCK_ALLOCATED if leave_block_allocated else 0) | \
            (C.FILE_PARAMETERS_HAS_PARENT if has_parent else 0)
    out = [
        MetadataItem(C.FILE_PARAMETERS_GUID, FileParameters.build(dict(block_size=block_size, flags=flags)), req),
        MetadataItem(C.VIRTUAL_DISK_SIZE_GUID, VirtualDiskSize.build(dict(virtual_disk_size=virtual_disk_size)),
                     req | vd),
        MetadataItem(C.LOGICAL_SECTOR_SIZE_GUID, SectorSize.build(dict(sector_size=logical_sector_size)), req | vd),
        MetadataItem(C.PHYSICAL_SECTOR_SIZE_GUID, SectorSize.build(dict(sector_size=physical_sector_size)),
                     req | vd),
        MetadataItem(C.PAGE83_DATA_GUID, Page83Data.build(dict(page83_data=page83_data)), req | vd),
    ]
    if parent_locator is not None:
        out.append(MetadataItem(C.PARENT_LOCATOR_GUID, parent_locator, req))
    return out


def build_metadata_region(items: list[MetadataItem], region_length: int) -> bytes:
    """A metadata region of ``region_length`` bytes: the table, then the items packed at 64 KiB."""
    if len(items) > C.MAX_METADATA_ENTRIES:
        raise ValueError("too many metadata items")
    buf = bytearray(region_length)
    buf[:32] = MetadataTableHeader.build(dict(reserved=0, entry_count=len(items), reserved2=bytes(20)))
    at = C.METADATA_TABLE_SIZE
    for i, it in enumerate(items):
        length = len(it.data)
        if at + length > region_length:
            raise ValueError("metadata items do not fit in the region")
        buf[32 + 32 * i:64 + 32 * i] = MetadataTableEntry.build(dict(
            item_id=it.item_id, offset=at if length else 0, length=length, flags=it.flags, reserved2=0))
        buf[at:at + length] = it.data
        at += length
    return bytes(buf)


def metadata_items(md: Metadata) -> list[MetadataItem]:
    """Every item of a parsed region, in table order, for rebuilding it."""
    return [MetadataItem(e.item_id, md.items[(e.item_id, e.is_user)], e.flags) for e in md.entries]
