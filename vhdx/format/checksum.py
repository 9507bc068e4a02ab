"""CRC-32C (Castagnoli) with the checksum field read as zero (docs/format.md §1.5).

The sums are computed by ``google_crc32c`` when its C extension is present (the processor's
CRC instructions: about 60 x crcmod's table on a 64 KiB region table), else by crcmod's C
extension. Both give the same values; ``tests/format/test_checksum.py`` holds them to that.
"""

from __future__ import annotations

import crcmod.predefined
import google_crc32c as _hw

HARDWARE = _hw.implementation == "c"  # its pure-Python fallback is slower than crcmod's table

_table_crc = crcmod.predefined.mkCrcFun("crc-32c")  # crcmod's C extension when built


def crc32c_table(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C by crcmod's table, continuing from ``crc``: the fallback, and the reference in tests."""
    return _table_crc(data, crc) if crc else _table_crc(data)


def _readonly(data: bytes | bytearray | memoryview) -> bytes:
    """``data`` as bytes (google_crc32c takes read-only bytes only)."""
    return data if type(data) is bytes else bytes(data)


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Plain CRC-32C of ``data`` continuing from ``crc``; check value of ``b"123456789"`` is 0xE3069283."""
    if HARDWARE:
        return _hw.extend(crc, _readonly(data))
    return crc32c_table(data, crc)


def crc32c_zeroed(data: bytes | bytearray | memoryview, field_at: int = 4) -> int:
    """CRC-32C of ``data`` with the 4 bytes at ``field_at`` taken as zero."""
    view = data if type(data) is bytes else memoryview(data).cast("B")
    head = bytes(view[:field_at]) + b"\0\0\0\0"
    if HARDWARE:
        return _hw.extend(_hw.extend(0, head), _readonly(view[field_at + 4:]))
    return crc32c_table(view[field_at + 4:], crc32c_table(head))


def stored_checksum(data: bytes | bytearray | memoryview, field_at: int = 4) -> int:
    """The checksum field at ``field_at`` as stored (little-endian)."""
    return int.from_bytes(data[field_at:field_at + 4], "little")


def stamp(buf: bytearray, field_at: int = 4) -> bytearray:
    """Write the CRC-32C of ``buf`` into its checksum field, in place."""
    buf[field_at:field_at + 4] = crc32c_zeroed(buf, field_at).to_bytes(4, "little")
    return buf
