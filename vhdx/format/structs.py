"""construct declarations, one per spec table, used to parse and to build.

Reserved areas are ``Bytes(n)`` so that parse-then-build returns the same bytes.
Parsed values leave this module as frozen dataclasses (see :mod:`vhdx.format.records`).
"""

from __future__ import annotations

import uuid

import construct as cs


class GuidAdapter(cs.Adapter):
    """16 bytes in Microsoft's mixed-endian layout <-> uuid.UUID (docs/format.md §1.4)."""

    def _decode(self, obj, context, path):
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj, context, path):
        return obj.bytes_le


Guid = GuidAdapter(cs.Bytes(16))

# §1.2
FileIdentifier = cs.Struct(
    "signature" / cs.Const(b"vhdxfile"),
    "creator" / cs.Bytes(512),
)

# §2.1 (4096 bytes, checksummed)
Header = cs.Struct(
    "signature" / cs.Const(b"head"),
    "checksum" / cs.Int32ul,
    "sequence_number" / cs.Int64ul,
    "file_write_guid" / Guid,
    "data_write_guid" / Guid,
    "log_guid" / Guid,
    "log_version" / cs.Int16ul,
    "version" / cs.Int16ul,
    "log_length" / cs.Int32ul,
    "log_offset" / cs.Int64ul,
    "reserved" / cs.Bytes(4016),
)

# §3.1
RegionTableHeader = cs.Struct(
    "signature" / cs.Const(b"regi"),
    "checksum" / cs.Int32ul,
    "entry_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
)
RegionTableEntry = cs.Struct(
    "guid" / Guid,
    "file_offset" / cs.Int64ul,
    "length" / cs.Int32ul,
    "required" / cs.Int32ul,
)

# §4.1
MetadataTableHeader = cs.Struct(
    "signature" / cs.Const(b"metadata"),
    "reserved" / cs.Int16ul,
    "entry_count" / cs.Int16ul,
    "reserved2" / cs.Bytes(20),
)
MetadataTableEntry = cs.Struct(
    "item_id" / Guid,
    "offset" / cs.Int32ul,
    "length" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "reserved2" / cs.Int32ul,
)

# §4.3 - §4.7
FileParameters = cs.Struct(
    "block_size" / cs.Int32ul,
    "flags" / cs.Int32ul,
)
VirtualDiskSize = cs.Struct("virtual_disk_size" / cs.Int64ul)
Page83Data = cs.Struct("page83_data" / Guid)
SectorSize = cs.Struct("sector_size" / cs.Int32ul)

# §4.8
ParentLocatorHeader = cs.Struct(
    "locator_type" / Guid,
    "reserved" / cs.Int16ul,
    "key_value_count" / cs.Int16ul,
)
ParentLocatorEntry = cs.Struct(
    "key_offset" / cs.Int32ul,
    "value_offset" / cs.Int32ul,
    "key_length" / cs.Int16ul,
    "value_length" / cs.Int16ul,
)

# §8.2 - §8.4
LogEntryHeader = cs.Struct(
    "signature" / cs.Const(b"loge"),
    "checksum" / cs.Int32ul,
    "entry_length" / cs.Int32ul,
    "tail" / cs.Int32ul,
    "sequence_number" / cs.Int64ul,
    "descriptor_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
    "log_guid" / Guid,
    "flushed_file_offset" / cs.Int64ul,
    "last_file_offset" / cs.Int64ul,
)
ZeroDescriptor = cs.Struct(
    "signature" / cs.Const(b"zero"),
    "reserved" / cs.Int32ul,
    "zero_length" / cs.Int64ul,
    "file_offset" / cs.Int64ul,
    "sequence_number" / cs.Int64ul,
)
DataDescriptor = cs.Struct(
    "signature" / cs.Const(b"desc"),
    "trailing_bytes" / cs.Bytes(4),
    "leading_bytes" / cs.Bytes(8),
    "file_offset" / cs.Int64ul,
    "sequence_number" / cs.Int64ul,
)
DataSector = cs.Struct(
    "signature" / cs.Const(b"data"),
    "sequence_high" / cs.Int32ul,
    "data" / cs.Bytes(4084),
    "sequence_low" / cs.Int32ul,
)
