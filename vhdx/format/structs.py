"""construct declarations, one per spec table, used to parse and to build.

Reserved areas are ``Bytes(n)`` so that parse-then-build returns the same bytes.
Parsed values leave this module as frozen dataclasses (see :mod:`vhdx.format.records`).

Every table here is flat (integers, byte strings, constants, GUIDs), so :class:`Flat` turns its
declaration into one ``struct.Struct`` for parsing: the same fields, about 20 x faster than
construct's interpreter, which matters on the open path (a chain of 64 files parses some 30
records each). Building goes through construct unchanged.
"""

from __future__ import annotations

import struct
import uuid
from typing import Any, Callable

import construct as cs

from . import constants as C


class GuidAdapter(cs.Adapter):
    """16 bytes in Microsoft's mixed-endian layout <-> uuid.UUID (docs/format.md §1.4)."""

    def _decode(self, obj, context, path):
        return uuid.UUID(bytes_le=bytes(obj))

    def _encode(self, obj, context, path):
        return obj.bytes_le


Guid = GuidAdapter(cs.Bytes(16))


class Record(dict):
    """A parsed table: its fields by name, as keys and as attributes (like construct's Container)."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _field_code(sub: cs.Construct) -> tuple[str, Callable[[Any], Any] | None, bytes | None]:
    """The struct code of one flat field, a converter for its raw value, and its constant if any."""
    if isinstance(sub, cs.FormatField):
        return sub.fmtstr[1:], None, None
    if isinstance(sub, cs.Const) and isinstance(sub.subcon, cs.Bytes):
        return f"{sub.subcon.length}s", None, sub.value
    if isinstance(sub, GuidAdapter):
        return "16s", _guid, None
    if isinstance(sub, cs.Bytes) and isinstance(sub.length, int):
        return f"{sub.length}s", None, None
    raise TypeError(f"{sub!r} is not a flat field")


MAX_GUIDS = 4096  # GUIDs remembered by their stored bytes
# The format's own GUIDs (regions, metadata items, locator type, zero) are in every file: known
# from the start, so that no open builds them again.
_GUIDS: dict[bytes, uuid.UUID] = {g.bytes_le: g for g in (
    C.BAT_REGION_GUID, C.METADATA_REGION_GUID, C.FILE_PARAMETERS_GUID, C.VIRTUAL_DISK_SIZE_GUID,
    C.PAGE83_DATA_GUID, C.LOGICAL_SECTOR_SIZE_GUID, C.PHYSICAL_SECTOR_SIZE_GUID, C.PARENT_LOCATOR_GUID,
    C.CHS_PARAMETERS_GUID, C.PMEM_LABEL_GUID, C.ZERO_GUID)}


def _guid(raw: bytes) -> uuid.UUID:
    """The GUID of 16 stored bytes; remembered: region, item and locator GUIDs repeat in every file."""
    found = _GUIDS.get(raw)
    if found is None:
        found = uuid.UUID(bytes_le=raw)
        if len(_GUIDS) < MAX_GUIDS:
            _GUIDS[raw] = found
    return found


class Flat:
    """A flat construct Struct with a fast ``parse``: one ``struct.unpack_from`` over its fields.

    ``parse`` raises construct's own errors (``StreamError`` when short, ``ConstError`` on a wrong
    constant), so callers handle both parsers alike; ``build`` and ``sizeof`` are construct's.
    """

    def __init__(self, declared: cs.Struct):
        self.declared = declared
        codes, self._names, self._convert, self._consts = [], [], [], []
        for i, sub in enumerate(declared.subcons):
            code, convert, const = _field_code(sub.subcon)
            codes.append(code)
            self._names.append(sub.name)
            if convert is not None:
                self._convert.append((i, convert))
            if const is not None:
                self._consts.append((i, const))
        self._struct = struct.Struct("<" + "".join(codes))
        self.size = self._struct.size

    def parse(self, data: bytes | bytearray | memoryview) -> Record:
        """The fields of the first :attr:`size` bytes of ``data``."""
        return Record(zip(self._names, self.values(data)))

    def values(self, data: bytes | bytearray | memoryview, offset: int = 0) -> list[Any]:
        """The fields of the :attr:`size` bytes of ``data`` at ``offset``, in declaration order
        (checked and converted as :meth:`parse` does, without naming them)."""
        if len(data) - offset < self.size:
            raise cs.StreamError(f"stream read less than specified amount, expected {self.size}, "
                                 f"found {max(0, len(data) - offset)}")
        values = list(self._struct.unpack_from(data, offset))
        for i, const in self._consts:
            if values[i] != const:
                raise cs.ConstError(f"parsing expected {const!r} but parsed {values[i]!r}")
        for i, convert in self._convert:
            values[i] = convert(values[i])
        return values

    def build(self, obj: dict[str, Any]) -> bytes:
        """The bytes of ``obj`` (construct's builder)."""
        return self.declared.build(obj)

    def sizeof(self) -> int:
        """The table's size in bytes."""
        return self.size

# §1.2
FileIdentifier = Flat(cs.Struct(
    "signature" / cs.Const(b"vhdxfile"),
    "creator" / cs.Bytes(512),
))

# §2.1 (4096 bytes, checksummed)
Header = Flat(cs.Struct(
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
))

# §3.1
RegionTableHeader = Flat(cs.Struct(
    "signature" / cs.Const(b"regi"),
    "checksum" / cs.Int32ul,
    "entry_count" / cs.Int32ul,
    "reserved" / cs.Int32ul,
))
RegionTableEntry = Flat(cs.Struct(
    "guid" / Guid,
    "file_offset" / cs.Int64ul,
    "length" / cs.Int32ul,
    "required" / cs.Int32ul,
))

# §4.1
MetadataTableHeader = Flat(cs.Struct(
    "signature" / cs.Const(b"metadata"),
    "reserved" / cs.Int16ul,
    "entry_count" / cs.Int16ul,
    "reserved2" / cs.Bytes(20),
))
MetadataTableEntry = Flat(cs.Struct(
    "item_id" / Guid,
    "offset" / cs.Int32ul,
    "length" / cs.Int32ul,
    "flags" / cs.Int32ul,
    "reserved2" / cs.Int32ul,
))

# §4.3 - §4.7
FileParameters = Flat(cs.Struct(
    "block_size" / cs.Int32ul,
    "flags" / cs.Int32ul,
))
VirtualDiskSize = Flat(cs.Struct("virtual_disk_size" / cs.Int64ul))
Page83Data = Flat(cs.Struct("page83_data" / Guid))
SectorSize = Flat(cs.Struct("sector_size" / cs.Int32ul))

# §4.8
ParentLocatorHeader = Flat(cs.Struct(
    "locator_type" / Guid,
    "reserved" / cs.Int16ul,
    "key_value_count" / cs.Int16ul,
))
ParentLocatorEntry = Flat(cs.Struct(
    "key_offset" / cs.Int32ul,
    "value_offset" / cs.Int32ul,
    "key_length" / cs.Int16ul,
    "value_length" / cs.Int16ul,
))

# §8.2 - §8.4
LogEntryHeader = Flat(cs.Struct(
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
))
ZeroDescriptor = Flat(cs.Struct(
    "signature" / cs.Const(b"zero"),
    "reserved" / cs.Int32ul,
    "zero_length" / cs.Int64ul,
    "file_offset" / cs.Int64ul,
    "sequence_number" / cs.Int64ul,
))
DataDescriptor = Flat(cs.Struct(
    "signature" / cs.Const(b"desc"),
    "trailing_bytes" / cs.Bytes(4),
    "leading_bytes" / cs.Bytes(8),
    "file_offset" / cs.Int64ul,
    "sequence_number" / cs.Int64ul,
))
DataSector = Flat(cs.Struct(
    "signature" / cs.Const(b"data"),
    "sequence_high" / cs.Int32ul,
    "data" / cs.Bytes(4084),
    "sequence_low" / cs.Int32ul,
))
