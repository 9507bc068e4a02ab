"""Build-then-parse of every structure, CRC-32C vectors, GUID byte order, error branches."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from vhdx.errors import ChecksumError, CorruptError, UnsupportedError
from vhdx.format import bat as batmod
from vhdx.format import bitmap
from vhdx.format import constants as C
from vhdx.format.checksum import crc32c, crc32c_zeroed, stamp
from vhdx.format.geometry import Geometry
from vhdx.format.locator import build_parent_locator, format_linkage, parse_linkage, parse_parent_locator
from vhdx.format.records import (Header, RegionEntry, build_header, build_metadata_region, build_region_table,
                                 parse_header, parse_metadata_region, parse_region_table, system_items)
from vhdx.format.structs import DataDescriptor, Guid, LogEntryHeader, ZeroDescriptor


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_crc32c_known_vectors():
    # RFC 3720 B.4 vectors
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def test_crc32c_zeroed_ignores_the_field():
    buf = bytearray(b"head" + b"\x12\x34\x56\x78" + bytes(100))
    assert crc32c_zeroed(buf) == crc32c(b"head" + bytes(104))
    stamp(buf)
    assert int.from_bytes(buf[4:8], "little") == crc32c(b"head" + bytes(104))


def test_guid_byte_order_is_mixed_endian():
    raw = bytes.fromhex("6677C22D23F600429D64115E9BFD4A08")
    assert Guid.parse(raw) == C.BAT_REGION_GUID
    assert Guid.build(C.BAT_REGION_GUID) == raw


def make_header(seq=7):
    return Header(seq, uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), 0, 1, C.MiB, C.MiB)


def test_header_roundtrip():
    h = make_header()
    raw = build_header(h)
    assert len(raw) == 4096
    parsed = parse_header(raw)
    assert parsed.replace(checksum=0) == h


def test_header_bad_crc():
    raw = bytearray(build_header(make_header()))
    raw[100] ^= 1
    with pytest.raises(ChecksumError) as e:
        parse_header(bytes(raw), path="x.vhdx", offset=0x10000)
    assert "x.vhdx" in str(e.value) and "0x10000" in str(e.value)


def test_header_bad_signature():
    raw = bytearray(build_header(make_header()))
    raw[0:4] = b"HEAD"
    with pytest.raises(CorruptError):
        parse_header(bytes(raw))


def test_region_table_roundtrip():
    entries = [RegionEntry(C.BAT_REGION_GUID, 3 * C.MiB, C.MiB, 1),
               RegionEntry(C.METADATA_REGION_GUID, 2 * C.MiB, C.MiB, 1)]
    raw = build_region_table(entries)
    assert len(raw) == 65536 and raw[:4] == b"regi"
    assert parse_region_table(raw) == entries


def test_region_table_too_many_entries():
    raw = bytearray(build_region_table([]))
    raw[8:12] = (5000).to_bytes(4, "little")
    stamp(raw)
    with pytest.raises(CorruptError):
        parse_region_table(bytes(raw))


def test_metadata_roundtrip_with_locator():
    loc = build_parent_locator({"parent_linkage": "{ff34003b-11ed-4cf8-a166-b2be05e20b80}",
                                "relative_path": r".\parent.vhdx"})
    disk_id = uuid.uuid4()
    items = system_items(block_size=2 * C.MiB, leave_block_allocated=False, has_parent=True,
                         virtual_disk_size=8 << 30, logical_sector_size=512, physical_sector_size=4096,
                         page83_data=disk_id, parent_locator=loc)
    md = parse_metadata_region(build_metadata_region(items, C.MiB))
    assert md.block_size == 2 * C.MiB and md.has_parent and not md.leave_block_allocated
    assert md.virtual_disk_size == 8 << 30 and md.page83_data == disk_id
    assert md.parent_locator == {"parent_linkage": "{ff34003b-11ed-4cf8-a166-b2be05e20b80}",
                                 "relative_path": r".\parent.vhdx"}
    flags = {e.name: (e.is_virtual_disk, e.is_required) for e in md.entries}
    assert flags["file_parameters"] == (False, True)
    assert flags["virtual_disk_size"] == (True, True)
    assert flags["parent_locator"] == (False, True)


def test_metadata_unknown_required_item_is_refused():
    from vhdx.format.records import MetadataItem
    items = system_items(block_size=C.MiB, leave_block_allocated=False, has_parent=False,
                         virtual_disk_size=C.MiB, logical_sector_size=512, physical_sector_size=512,
                         page83_data=uuid.uuid4())
    items.append(MetadataItem(uuid.uuid4(), b"x", C.METADATA_IS_REQUIRED))
    with pytest.raises(UnsupportedError):
        parse_metadata_region(build_metadata_region(items, C.MiB))


@pytest.mark.parametrize("block_size,ok", [(C.MiB, True), (256 * C.MiB, True), (3 * C.MiB, False),
                                           (512 * C.MiB, False), (0, False)])
def test_metadata_block_size_rules(block_size, ok):
    items = system_items(block_size=block_size, leave_block_allocated=False, has_parent=False,
                         virtual_disk_size=C.MiB, logical_sector_size=512, physical_sector_size=512,
                         page83_data=uuid.uuid4())
    raw = build_metadata_region(items, C.MiB)
    if ok:
        assert parse_metadata_region(raw).block_size == block_size
    else:
        with pytest.raises(CorruptError):
            parse_metadata_region(raw)


def test_parent_locator_offsets_are_item_relative_and_utf16():
    raw = build_parent_locator({"parent_linkage": "{00000000-0000-0000-0000-000000000001}"})
    assert raw[:16] == C.VHDX_PARENT_LOCATOR_TYPE.bytes_le
    key_offset = int.from_bytes(raw[20:24], "little")
    assert key_offset == 32  # 20-byte header + one 12-byte entry
    assert raw[32:32 + 28].decode("utf-16-le") == "parent_linkage"


def test_parent_locator_rejects_entries_outside_the_item():
    raw = bytearray(build_parent_locator({"a": "b"}))
    raw[24:28] = (1000).to_bytes(4, "little")
    with pytest.raises(CorruptError):
        parse_parent_locator(bytes(raw))


def test_linkage_format():
    g = uuid.UUID("FF34003B-11ED-4CF8-A166-B2BE05E20B80")
    assert format_linkage(g) == "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"
    assert parse_linkage("{FF34003B-11ED-4CF8-A166-B2BE05E20B80}") == g
    assert parse_linkage("garbage") is None


@pytest.mark.parametrize("size,bs,lss,parent,cr,entries", [
    (10 << 30, 32 << 20, 512, False, 128, 322),
    (10 << 30, 32 << 20, 512, True, 128, 387),
    (8 << 30, 2 << 20, 512, True, 2048, 4098),
    (4 << 30, 1 << 20, 512, False, 4096, 4096),
    (4 << 30, 1 << 20, 512, True, 4096, 4097),
    (32 << 30, 32 << 20, 4096, False, 1024, 1024),
])
def test_geometry_worked_examples(size, bs, lss, parent, cr, entries):
    g = Geometry(size, bs, lss, parent)
    assert g.chunk_ratio == cr
    assert g.bat_entries == entries


def test_bat_indexes_interleave_bitmaps():
    g = Geometry(8 << 30, 2 << 20, 512, True)
    assert g.payload_bat_index(2047) == 2047
    assert g.payload_bat_index(2048) == 2049
    assert g.sbm_bat_index(0) == 2048 and g.sbm_bat_index(1) == 4097
    idx = batmod.payload_indices(g)
    assert idx[2048] == 2049 and len(idx) == 4096
    assert list(batmod.sbm_indices(g)) == [2048, 4097]


def test_bat_entry_fields():
    e = batmod.make_entry(C.PAYLOAD_BLOCK_FULLY_PRESENT, 5 * C.MiB)
    arr = batmod.decode_bat(np.array([e], dtype="<u8").tobytes())
    assert batmod.states(arr)[0] == 6 and batmod.file_offsets(arr)[0] == 5 * C.MiB
    assert batmod.encode_bat(arr) == e.to_bytes(8, "little")


def test_bitmap_is_lsb_first():
    bits = bitmap.unpack(bytes([0b00000101, 0x80]))
    assert list(bits[:3]) == [1, 0, 1] and bits[15] == 1
    arr = np.zeros(4, np.uint8)
    bitmap.set_bits(arr, 3, 7)
    assert list(arr) == [0b11111000, 0b00000011, 0, 0]
    bitmap.set_bits(arr, 4, 2, False)
    assert arr[0] == 0b11001000
    starts, stops, values = bitmap.runs(bitmap.unpack(arr.tobytes())[:12])
    assert list(zip(starts, stops, values)) == [(0, 3, 0), (3, 4, 1), (4, 6, 0), (6, 10, 1), (10, 12, 0)]


def test_log_descriptors_roundtrip():
    g = uuid.uuid4()
    hdr = dict(checksum=0, entry_length=8192, tail=0, sequence_number=(5 << 32) + 3, descriptor_count=1,
               reserved=0, log_guid=g, flushed_file_offset=C.MiB, last_file_offset=2 * C.MiB)
    parsed = LogEntryHeader.parse(LogEntryHeader.build(hdr))
    assert parsed.log_guid == g and parsed.sequence_number == (5 << 32) + 3
    z = dict(reserved=0, zero_length=8192, file_offset=4096, sequence_number=9)
    assert ZeroDescriptor.parse(ZeroDescriptor.build(z)).zero_length == 8192
    d = dict(trailing_bytes=b"abcd", leading_bytes=b"01234567", file_offset=3 * C.MiB, sequence_number=9)
    assert DataDescriptor.build(d)[:4] == b"desc"
