"""Parent locator: a typed list of UTF-16LE key/value pairs (docs/format.md §4.8, §4.9)."""

from __future__ import annotations

import struct
import uuid

from ..errors import CorruptError, UnsupportedError
from .constants import VHDX_PARENT_LOCATOR_TYPE
from .structs import ParentLocatorEntry, ParentLocatorHeader

# ParentLocatorEntry's layout for the parse loop: struct is ~50 x faster than construct per entry,
# which matters for a crafted locator with thousands of entries (§4.8).
_ENTRY = struct.Struct("<IIHH")
assert _ENTRY.size == ParentLocatorEntry.sizeof()

LOCATOR_HEADER_SIZE = 20
LOCATOR_ENTRY_SIZE = 12
# The order Hyper-V writes (docs/format.md §4.8).
KEY_ORDER = ("parent_linkage", "absolute_win32_path", "relative_path", "volume_path", "parent_linkage2")


def parse_parent_locator(item: bytes, *, path: str | None = None, offset: int | None = None) -> dict[str, str]:
    """Key/value pairs of a VHDX parent locator item, in file order."""
    if len(item) < LOCATOR_HEADER_SIZE:
        raise CorruptError(f"parent locator: {len(item)} bytes, shorter than its header",
                           path=path, offset=offset)
    header = ParentLocatorHeader.parse(item[:LOCATOR_HEADER_SIZE])
    if header.locator_type != VHDX_PARENT_LOCATOR_TYPE:
        raise UnsupportedError(f"parent locator type {header.locator_type} is not the VHDX type",
                               path=path, offset=offset)
    count = header.key_value_count
    if LOCATOR_HEADER_SIZE + count * LOCATOR_ENTRY_SIZE > len(item):
        raise CorruptError(f"parent locator: {count} entries do not fit in {len(item)} bytes",
                           path=path, offset=offset)
    pairs: dict[str, str] = {}
    for i in range(count):
        at = LOCATOR_HEADER_SIZE + i * LOCATOR_ENTRY_SIZE
        key_offset, value_offset, key_length, value_length = _ENTRY.unpack_from(item, at)
        where = None if offset is None else offset + at
        for what, off, length in (("key", key_offset, key_length), ("value", value_offset, value_length)):
            if length == 0 or length % 2 or off < LOCATOR_HEADER_SIZE or off + length > len(item):
                raise CorruptError(f"parent locator entry {i}: {what} at {off}, {length} bytes, "
                                   f"outside the {len(item)}-byte item", path=path, offset=where)
        try:
            key = item[key_offset:key_offset + key_length].decode("utf-16-le")
            value = item[value_offset:value_offset + value_length].decode("utf-16-le")
        except UnicodeDecodeError as exc:
            raise CorruptError(f"parent locator entry {i}: not UTF-16LE", path=path, offset=where) from exc
        if key in pairs:
            raise CorruptError(f"parent locator: key {key!r} twice", path=path, offset=where)
        pairs[key] = value
    return pairs


def build_parent_locator(pairs: dict[str, str]) -> bytes:
    """Encode key/value pairs in the order given (use :data:`KEY_ORDER` for Hyper-V's)."""
    entries = []
    blob = bytearray()
    base = LOCATOR_HEADER_SIZE + LOCATOR_ENTRY_SIZE * len(pairs)
    for key, value in pairs.items():
        k, v = key.encode("utf-16-le"), value.encode("utf-16-le")
        if not k or not v or len(k) > 0xFFFF or len(v) > 0xFFFF:
            raise ValueError(f"parent locator: bad length for {key!r}")
        key_offset = base + len(blob)
        blob += k
        value_offset = base + len(blob)
        blob += v
        entries.append(dict(key_offset=key_offset, value_offset=value_offset,
                            key_length=len(k), value_length=len(v)))
    head = ParentLocatorHeader.build(dict(locator_type=VHDX_PARENT_LOCATOR_TYPE, reserved=0,
                                          key_value_count=len(pairs)))
    return head + b"".join(ParentLocatorEntry.build(e) for e in entries) + bytes(blob)


def format_linkage(guid: uuid.UUID) -> str:
    """GUID text as Hyper-V writes it: lowercase, in braces."""
    return "{" + str(guid).lower() + "}"


def parse_linkage(text: str | None) -> uuid.UUID | None:
    """The GUID of a parent_linkage value, or None when it is missing or not a GUID."""
    if not text:
        return None
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        return None


__all__ = ["parse_parent_locator", "build_parent_locator", "format_linkage", "parse_linkage", "KEY_ORDER"]
