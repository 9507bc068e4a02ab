"""Independent VHDX structure locator and mutator for the fault tests.

Deliberately does not import ``vhdx``: the hostile-input tests must be able to build
mutated files without trusting the code under test. Only what the mutations need is
here: find the current header, the region table, the metadata table and items, the BAT;
re-stamp the CRC-32C of headers and region tables after an edit; build log entries
(docs/format.md §2, §3, §4, §5, §8).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

import crcmod.predefined

_crc32c = crcmod.predefined.mkCrcFun("crc-32c")

MiB = 1 << 20
HEADER_OFFSETS = (0x10000, 0x20000)          # §1.1
REGION_TABLE_OFFSETS = (0x30000, 0x40000)    # §1.1
HEADER_SIZE = 4096                           # §2.1
REGION_TABLE_SIZE = 65536                    # §3.1
LOG_SECTOR = 4096                            # §8.1

BAT_GUID = uuid.UUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83 = uuid.UUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = uuid.UUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = uuid.UUID("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = uuid.UUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")

# BAT states, §5.4/§5.5
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7


def crc32c_zeroed(buf: bytes | bytearray | memoryview, field_at: int) -> int:
    view = memoryview(buf)
    crc = _crc32c(bytes(view[:field_at]))
    crc = _crc32c(b"\0\0\0\0", crc)
    return _crc32c(bytes(view[field_at + 4:]), crc)


def stamp_header(buf: bytearray, slot: int) -> None:
    """Recompute header ``slot`` (0 or 1) CRC-32C in place (§2.1)."""
    at = HEADER_OFFSETS[slot]
    struct.pack_into("<I", buf, at + 4, crc32c_zeroed(buf[at:at + HEADER_SIZE], 4))


def stamp_region_table(buf: bytearray, which: int) -> None:
    at = REGION_TABLE_OFFSETS[which]
    struct.pack_into("<I", buf, at + 4, crc32c_zeroed(buf[at:at + REGION_TABLE_SIZE], 4))


def stamp_all(buf: bytearray) -> None:
    for i in (0, 1):
        stamp_header(buf, i)
        stamp_region_table(buf, i)


@dataclass
class MetadataEntry:
    item_id: uuid.UUID
    entry_file_offset: int     # where the 32-byte table entry sits in the file
    offset: int                # from the start of the metadata region
    length: int
    flags: int

    @property
    def item_file_offset(self) -> int:  # filled by Layout
        return self._region + self.offset

    _region: int = 0


@dataclass
class Layout:
    """Where things are in a (valid) VHDX file held in memory."""

    current_header: int                 # 0 or 1
    header_fields: dict
    regions: dict                       # guid -> (entry_file_offset, file_offset, length, required)
    metadata: dict = field(default_factory=dict)   # guid -> MetadataEntry
    block_size: int = 0
    has_parent: bool = False
    leave_allocated: bool = False
    virtual_size: int = 0
    logical_sector_size: int = 0
    physical_sector_size: int = 0

    @property
    def bat_offset(self) -> int:
        return self.regions[BAT_GUID][1]

    @property
    def bat_length(self) -> int:
        return self.regions[BAT_GUID][2]

    @property
    def metadata_offset(self) -> int:
        return self.regions[METADATA_GUID][1]

    @property
    def log_offset(self) -> int:
        return self.header_fields["log_offset"]

    @property
    def log_length(self) -> int:
        return self.header_fields["log_length"]

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.logical_sector_size // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.virtual_size // self.block_size)

    def bat_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def sbm_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    def bat_entry_offset(self, block: int) -> int:
        return self.bat_offset + 8 * self.bat_index(block)


def parse_header(buf, at: int) -> dict | None:
    if bytes(buf[at:at + 4]) != b"head":
        return None
    stored = struct.unpack_from("<I", buf, at + 4)[0]
    if stored != crc32c_zeroed(buf[at:at + HEADER_SIZE], 4):
        return None
    seq, = struct.unpack_from("<Q", buf, at + 8)
    log_version, version, log_length, log_offset = struct.unpack_from("<HHIQ", buf, at + 64)
    return dict(sequence_number=seq,
                file_write_guid=uuid.UUID(bytes_le=bytes(buf[at + 16:at + 32])),
                data_write_guid=uuid.UUID(bytes_le=bytes(buf[at + 32:at + 48])),
                log_guid=uuid.UUID(bytes_le=bytes(buf[at + 48:at + 64])),
                log_version=log_version, version=version,
                log_length=log_length, log_offset=log_offset)


def parse_layout(buf) -> Layout:
    headers = [parse_header(buf, at) for at in HEADER_OFFSETS]
    if headers[0] is None and headers[1] is None:
        raise ValueError("no valid header")
    if headers[1] is None or (headers[0] is not None and
                              headers[0]["sequence_number"] >= headers[1]["sequence_number"]):
        current = 0
    else:
        current = 1
    rt = REGION_TABLE_OFFSETS[0]
    assert bytes(buf[rt:rt + 4]) == b"regi"
    count, = struct.unpack_from("<I", buf, rt + 8)
    regions = {}
    for i in range(count):
        e = rt + 16 + 32 * i
        guid = uuid.UUID(bytes_le=bytes(buf[e:e + 16]))
        off, length, req = struct.unpack_from("<QII", buf, e + 16)
        regions[guid] = (e, off, length, req)
    layout = Layout(current, headers[current], regions)
    md = layout.metadata_offset
    assert bytes(buf[md:md + 8]) == b"metadata"
    n, = struct.unpack_from("<H", buf, md + 10)
    for i in range(n):
        e = md + 32 + 32 * i
        guid = uuid.UUID(bytes_le=bytes(buf[e:e + 16]))
        off, length, flags = struct.unpack_from("<III", buf, e + 16)
        layout.metadata[guid] = MetadataEntry(guid, e, off, length, flags, _region=md)
    fp = layout.metadata[FILE_PARAMETERS].item_file_offset
    layout.block_size, bits = struct.unpack_from("<II", buf, fp)
    layout.leave_allocated = bool(bits & 1)
    layout.has_parent = bool(bits & 2)
    layout.virtual_size, = struct.unpack_from("<Q", buf, layout.metadata[VIRTUAL_DISK_SIZE].item_file_offset)
    layout.logical_sector_size, = struct.unpack_from(
        "<I", buf, layout.metadata[LOGICAL_SECTOR_SIZE].item_file_offset)
    layout.physical_sector_size, = struct.unpack_from(
        "<I", buf, layout.metadata[PHYSICAL_SECTOR_SIZE].item_file_offset)
    return layout


def set_header_fields(buf: bytearray, slots=(0, 1), *, stamp=True, **fields) -> None:
    """Overwrite header fields by name in the given slots, then re-stamp the CRC."""
    fmt = {"sequence_number": ("<Q", 8), "log_version": ("<H", 64), "version": ("<H", 66),
           "log_length": ("<I", 68), "log_offset": ("<Q", 72)}
    guids = {"file_write_guid": 16, "data_write_guid": 32, "log_guid": 48}
    for slot in slots:
        at = HEADER_OFFSETS[slot]
        for name, value in fields.items():
            if name in guids:
                buf[at + guids[name]:at + guids[name] + 16] = value.bytes_le
            else:
                f, rel = fmt[name]
                struct.pack_into(f, buf, at + rel, value)
        if stamp:
            stamp_header(buf, slot)


# ---------------------------------------------------------------- log entries (§8)

def build_log_entry(*, sequence_number: int, log_guid: uuid.UUID, tail: int,
                    pages: list[tuple[int, bytes]] = (), zeros: list[tuple[int, int]] = (),
                    flushed_file_offset: int, last_file_offset: int,
                    corrupt_crc: bool = False) -> bytes:
    """One log entry: ``pages`` are (file_offset, 4096 bytes) data descriptors, ``zeros``
    (file_offset, length) zero descriptors. The CRC-32C covers the whole entry."""
    descs = []
    data_sectors = []
    for file_offset, length in zeros:
        descs.append(b"zero" + b"\0" * 4 + struct.pack("<QQQ", length, file_offset, sequence_number))
    for file_offset, page in pages:
        assert len(page) == LOG_SECTOR
        descs.append(b"desc" + page[4092:4096] + page[0:8] +
                     struct.pack("<QQ", file_offset, sequence_number))
        data_sectors.append(b"data" + struct.pack("<I", sequence_number >> 32) + page[8:4092] +
                            struct.pack("<I", sequence_number & 0xFFFFFFFF))
    count = len(descs)
    desc_sectors = max(1, -(-(64 + 32 * count) // LOG_SECTOR))
    entry_length = LOG_SECTOR * (desc_sectors + len(data_sectors))
    head = bytearray(desc_sectors * LOG_SECTOR)
    head[0:4] = b"loge"
    struct.pack_into("<IIQII", head, 8, entry_length, tail, sequence_number, count, 0)
    head[32:48] = log_guid.bytes_le
    struct.pack_into("<QQ", head, 48, flushed_file_offset, last_file_offset)
    for i, d in enumerate(descs):
        head[64 + 32 * i:96 + 32 * i] = d
    entry = bytearray(head + b"".join(data_sectors))
    crc = crc32c_zeroed(entry, 4)
    if corrupt_crc:
        crc ^= 0xDEADBEEF
    struct.pack_into("<I", entry, 4, crc)
    return bytes(entry)


def restamp_log_entry(entry: bytearray) -> None:
    struct.pack_into("<I", entry, 4, crc32c_zeroed(entry, 4))
