"""The record tables of diff --files from crafted bytes: every field that drives a read, an
allocation or a loop is checked, and a loop among folders ends."""

from __future__ import annotations

import struct

import pytest

from vhdx.ops.fsmeta import MAX_GROUP_TABLE, Ranges, Table, records_meeting, ext_layout, resolve_up


def _superblock(**fields: int) -> bytearray:
    sb = bytearray(1024)
    values = dict(inodes=8192, first_data=0, log_bs=2, bpg=32768, ipg=8192, rev=1, isize=256, incompat=0x2C2,
                  dsize=64)
    values.update(fields)
    struct.pack_into("<I", sb, 0, values["inodes"])
    struct.pack_into("<II", sb, 20, values["first_data"], values["log_bs"])
    struct.pack_into("<I", sb, 32, values["bpg"])
    struct.pack_into("<I", sb, 40, values["ipg"])
    struct.pack_into("<H", sb, 56, 0xEF53)
    struct.pack_into("<I", sb, 76, values["rev"])
    struct.pack_into("<H", sb, 88, values["isize"])
    struct.pack_into("<I", sb, 96, values["incompat"])
    struct.pack_into("<H", sb, 254, values["dsize"])
    return sb


def test_a_sane_superblock_gives_its_layout() -> None:
    lay = ext_layout(bytes(_superblock()))
    assert lay is not None and lay.block_size == 4096 and lay.groups_by_inodes == 1 and lay.wide
    assert lay.descriptors_at == 1 and lay.inode_size == 256


@pytest.mark.parametrize("fields", [
    dict(log_bs=7),                          # 128 KiB blocks
    dict(incompat=0x2C2 | 0x10),             # meta_bg: descriptors elsewhere
    dict(isize=300), dict(isize=8192), dict(isize=64),
    dict(ipg=0), dict(ipg=4096 * 8 + 1), dict(bpg=0),
    dict(dsize=16), dict(dsize=4096),
    dict(first_data=7),
    dict(inodes=0xFFFFFFFF, ipg=1),          # 4 G groups: a 256 GiB descriptor table
])
def test_a_crafted_superblock_is_refused(fields: dict[str, int]) -> None:
    assert ext_layout(bytes(_superblock(**fields))) is None


def test_the_descriptor_table_is_bounded() -> None:
    lay = ext_layout(bytes(_superblock(inodes=(MAX_GROUP_TABLE // 64) * 8, ipg=8)))
    assert lay is not None and lay.groups_by_inodes * lay.descriptor_size <= MAX_GROUP_TABLE
    assert ext_layout(bytes(_superblock(inodes=(MAX_GROUP_TABLE // 64 + 1) * 8, ipg=8))) is None
    assert ext_layout(b"\0" * 1024) is None and ext_layout(b"") is None


def test_changed_sectors_map_to_the_records_they_hold() -> None:
    table = Table(offset=1 << 20, count=100, size=256, first=1)
    changed = Ranges([(0, 512), ((1 << 20) + 256 * 10, (1 << 20) + 256 * 10 + 1), ((1 << 20) + 256 * 99, 1 << 30)])
    assert list(records_meeting(table, changed)) == [(10, 11), (99, 100)]


def test_a_loop_among_folders_ends_unnamed() -> None:
    """Folder 10's parent is 11, 11's is 10 (a crafted '..'): no path, no endless walk."""
    up = {10: (11, "a"), 11: (10, "b"), 12: (2, "c"), 13: (12, "d")}
    cache: dict[int, str | None] = {2: ""}
    assert resolve_up(10, cache, up.get) is None
    assert resolve_up(13, cache, up.get) == "/c/d"
    deep = {i: (i + 1, f"n{i}") for i in range(100, 100_000)}
    assert resolve_up(100, {2: ""}, deep.get) is None      # deeper than MAX_DEPTH: given up, not recursed


def test_uncovered_counts_the_bytes_no_range_covers() -> None:
    from vhdx.ops.fsfat import uncovered
    assert uncovered([(0, 100)], []) == 100
    assert uncovered([(0, 100)], [(0, 100)]) == 0
    assert uncovered([(0, 100), (200, 300)], [(50, 250), (10, 20), (290, 400)]) == 50 - 10 + 40
    assert uncovered([(0, 10), (20, 30)], [(5, 5), (25, 26)]) == 19


def _sfn(name: bytes, attr: int = 0x20) -> bytes:
    e = bytearray(32)
    e[0:11] = name
    e[11] = attr
    return bytes(e)


def test_folder_sectors_are_told_from_file_data() -> None:
    """Sixteen well-formed entries make a folder sector; random data, text and zeros do not."""
    import random
    import numpy as np
    from vhdx.ops import fsfat

    def rows(data: bytes):
        return np.frombuffer(data, np.uint8).reshape(-1, 16, 32)
    folder = _sfn(b".          ", 0x10) + _sfn(b"..         ", 0x10) + _sfn(b"KEEP    TXT") + \
        _sfn(b"\xe5DIT    TXT") + bytes(32 * 12)
    assert fsfat.folder_rows(rows(folder), False).tolist() == [True]
    rng = random.Random(1)
    noise = rng.randbytes(512 * 2000)
    text = (b"The quick brown fox jumps over the lazy dog 0123456789.\n" * 20)[:512]
    assert not fsfat.folder_rows(rows(noise), False).any()
    assert not fsfat.folder_rows(rows(noise), True).any()
    assert fsfat.folder_rows(rows(text + bytes(512)), False).tolist() == [False, False]
    exfat = bytes([0x85, 2]) + bytes(30) + bytes([0xC0]) + bytes(31) + bytes([0xC1]) + bytes(31) + bytes(32 * 13)
    assert fsfat.folder_rows(rows(exfat), True).tolist() == [True]
    assert fsfat.folder_rows(rows(bytes(512)), True).tolist() == [False]


def test_ext_folder_blocks_parse_and_a_crafted_record_length_ends_the_block() -> None:
    from vhdx.ops.fsext import parse_block

    def entry(inode: int, name: bytes, kind: int, rec_len: int | None = None) -> bytes:
        n = rec_len or (8 + len(name) + 3) // 4 * 4
        return struct.pack("<IHBB", inode, n, len(name), kind) + name + bytes(n - 8 - len(name))
    head = entry(2, b".", 2) + entry(2, b"..", 2) + entry(12, b"docs", 2) + entry(0, b"gone", 1) + entry(13, b"a.txt", 1)
    block = head + entry(14, b"last", 0, 1024 - len(head))
    assert parse_block(block) == [(".", 2, True), ("..", 2, True), ("docs", 12, True), ("a.txt", 13, False),
                                  ("last", 14, None)]
    assert parse_block(entry(5, b"x", 1) + struct.pack("<IHBB", 6, 0, 1, 1) + bytes(1000)) == [("x", 5, False)]
    assert parse_block(entry(5, b"x", 1) + struct.pack("<IHBB", 6, 4000, 1, 1) + bytes(1000)) == [("x", 5, False)]
    assert parse_block(struct.pack("<IHBB", 0, 1024, 0, 0) + bytes(1016)) == []      # an htree index block
