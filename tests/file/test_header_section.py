"""An open reads only the structures it parses: the identifier, both headers, both region
tables, and the metadata table with the bytes its items use (not the whole metadata region)."""

from __future__ import annotations

import struct
from contextlib import closing
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import CorruptError
from vhdx.file import headsection, parsecache
from vhdx.file.headsection import METADATA_PEEK
from vhdx.file.image import Image
from vhdx.file.storage import FileStorage
from vhdx.format import constants as C

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "d.vhdx"
    with vhdx.create(path, 64 * MiB, block_size=MiB) as d:
        d.pwrite(b"data" * 1024, 5 * MiB)
    return path


def reads_of(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record every (offset, length) FileStorage.read serves from now on."""
    seen: list[tuple[int, int]] = []
    original = FileStorage.read

    def read(self: FileStorage, offset: int, length: int) -> bytes:
        seen.append((offset, length))
        return original(self, offset, length)

    monkeypatch.setattr(FileStorage, "read", read)
    return seen


def metadata_offset(image: Image) -> tuple[int, int]:
    r = image.region(C.METADATA_REGION_GUID)
    return r.file_offset, r.length


def test_an_open_reads_the_structures_not_the_regions(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsecache.clear()
    seen = reads_of(monkeypatch)
    with closing(Image.open(disk)) as image:
        region_at, region_length = metadata_offset(image)
        assert image.creator.startswith("vhdx")
    assert region_length == MiB
    total = sum(n for _, n in seen)
    assert total <= 4096 + 2 * C.HEADER_SIZE + 2 * C.REGION_TABLE_SIZE + METADATA_PEEK
    assert [n for at, n in seen if at == region_at] == [METADATA_PEEK]  # one read of the table and items


def move_items(path: Path, to: int) -> list[bytes]:
    """Move every metadata item of ``path`` to ``to`` bytes into the region; their old bytes."""
    with closing(Image.open(path)) as image:
        region_at, region_length = metadata_offset(image)
    with open(path, "r+b") as f:
        f.seek(region_at)
        region = bytearray(f.read(region_length))
        count = struct.unpack_from("<H", region, 10)[0]
        at, old = to, []
        for i in range(count):
            entry = 32 + 32 * i
            offset, length = struct.unpack_from("<II", region, entry + 16)
            old.append(bytes(region[offset:offset + length]))
            region[at:at + length] = region[offset:offset + length]
            region[offset:offset + length] = bytes(length)
            struct.pack_into("<I", region, entry + 16, at)
            at += length
        f.seek(region_at)
        f.write(region)
    return old


def test_items_far_into_the_region_are_read(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with vhdx.open(disk) as d:
        before = (d.size, d.block_size, d.pread(5 * MiB, 4096))
    move_items(disk, 400 * 1024)
    parsecache.clear()
    seen = reads_of(monkeypatch)
    with vhdx.open(disk) as d:
        assert (d.size, d.block_size, d.pread(5 * MiB, 4096)) == before
    assert sum(n for _, n in seen) < 600 * 1024  # up to the last item: not the whole 1 MiB region


def test_an_item_past_the_region_is_refused(disk: Path) -> None:
    with closing(Image.open(disk)) as image:
        region_at, region_length = metadata_offset(image)
    with open(disk, "r+b") as f:  # the first entry's item now ends 4 KiB past the region
        f.seek(region_at + 32 + 16)
        f.write(struct.pack("<I", region_length - 4))
    parsecache.clear()
    with pytest.raises(CorruptError) as e:
        Image.open(disk)
    assert "outside" in str(e.value) and e.value.offset == region_at + 32


def test_a_huge_item_length_reads_no_more_than_the_limit(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with closing(Image.open(disk)) as image:
        region_at, _ = metadata_offset(image)
    with open(disk, "r+b") as f:  # a length of 4 GiB - 1
        f.seek(region_at + 32 + 20)
        f.write(struct.pack("<I", 0xFFFFFFFF))
    parsecache.clear()
    seen = reads_of(monkeypatch)
    with pytest.raises(CorruptError):
        Image.open(disk)
    assert sum(n for _, n in seen) < 2 * MiB


def parses_of_region_tables(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the file offset of every region table the open parses from now on."""
    seen: list[int] = []
    original = headsection.parse_region_table

    def parse(buf: bytes, *, path: str | None = None, offset: int | None = None):
        seen.append(offset)
        return original(buf, path=path, offset=offset)

    monkeypatch.setattr(headsection, "parse_region_table", parse)
    return seen


def test_a_second_region_table_like_the_first_is_parsed_once(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsecache.clear()
    seen = parses_of_region_tables(monkeypatch)
    with closing(Image.open(disk)) as image:
        assert image.region_table_errors == [None, None]
        assert {e.name for e in image.region_table} == {"BAT", "metadata"}
    assert seen == [C.REGION_TABLE1_OFFSET]


@pytest.mark.parametrize("table", [0, 1])
def test_a_region_table_that_differs_is_checked(disk: Path, monkeypatch: pytest.MonkeyPatch, table: int) -> None:
    """One byte changed in either table (its CRC-32C no longer matches): both are parsed, the bad
    one's error is kept (for check), and the open goes on with the other."""
    with open(disk, "r+b") as f:
        f.seek(C.REGION_TABLE_OFFSETS[table] + 4096)  # in the reserved bytes the CRC covers
        f.write(b"\x01")
    parsecache.clear()
    seen = parses_of_region_tables(monkeypatch)
    with closing(Image.open(disk)) as image:
        assert "CRC-32C" in (image.region_table_errors[table] or "")
        assert image.region_table_errors[1 - table] is None
        assert {e.name for e in image.region_table} == {"BAT", "metadata"}
    assert seen == list(C.REGION_TABLE_OFFSETS)
