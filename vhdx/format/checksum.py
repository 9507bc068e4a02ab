"""CRC-32C (Castagnoli) with the checksum field read as zero (docs/format.md §1.5)."""

from __future__ import annotations

import crcmod.predefined

_crc32c = crcmod.predefined.mkCrcFun("crc-32c")  # crcmod's C extension when built


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Plain CRC-32C of ``data``; check value of ``b"123456789"`` is 0xE3069283."""
    return _crc32c(data, crc) if crc else _crc32c(data)


def crc32c_zeroed(data: bytes | bytearray | memoryview, field_at: int = 4) -> int:
    """CRC-32C of ``data`` with the 4 bytes at ``field_at`` taken as zero."""
    view = memoryview(data)
    crc = _crc32c(view[:field_at])
    crc = _crc32c(b"\0\0\0\0", crc)
    return _crc32c(view[field_at + 4:], crc)


def stored_checksum(data: bytes | bytearray | memoryview, field_at: int = 4) -> int:
    """The checksum field at ``field_at`` as stored (little-endian)."""
    return int.from_bytes(bytes(memoryview(data)[field_at:field_at + 4]), "little")


def stamp(buf: bytearray, field_at: int = 4) -> bytearray:
    """Write the CRC-32C of ``buf`` into its checksum field, in place."""
    buf[field_at:field_at + 4] = crc32c_zeroed(buf, field_at).to_bytes(4, "little")
    return buf
