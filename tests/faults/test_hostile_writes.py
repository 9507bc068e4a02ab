"""Positions: every positional API refuses a negative or non-integer offset or length.

Before, ``Disk.pread(-4096, 4096)`` returned the disk's last bytes (numpy indexes the BAT from
its end) and a float or None offset raised TypeError or IndexError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

vhdx = pytest.importorskip("vhdx")
from vhdx.errors import UsageError  # noqa: E402

MiB = 1 << 20


def make_disk(path: Path) -> Path:
    with vhdx.create(str(path), 8 * MiB, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(b"\x11" * (MiB + 4096), 0)
    return path


# ------------------------------------------------------------------ positions

BAD_POSITIONS = [-1, -4096, -(8 * MiB), 1.5, "0", None, 2 ** 70 * -1]


@pytest.mark.parametrize("offset", BAD_POSITIONS, ids=repr)
def test_positional_apis_refuse_bad_offsets(offset, tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(str(path)) as d:
        with pytest.raises(UsageError):
            d.pread(offset, 4096)
        with pytest.raises(UsageError):
            d.pread_into(bytearray(4096), offset)
        with pytest.raises(UsageError):
            d.image.readinto_at(memoryview(bytearray(4096)), offset)
    with vhdx.open(str(path), "r+") as d:
        with pytest.raises(UsageError):
            d.pwrite(b"\x01" * 512, offset)
        with pytest.raises(UsageError):
            d.image.write_at(memoryview(b"\x01" * 512), offset)
        with pytest.raises(UsageError):
            d.image.write_extents([(offset, 512, b"\x01" * 512)])
        with pytest.raises(UsageError):
            d.image.write_extents([(0, offset, None)])
        assert not d.image.failed
    with vhdx.open(str(path)) as d:
        assert d.pread(0, 4096) == b"\x11" * 4096 and d.pread(8 * MiB - 4096, 4096) == bytes(4096)


def test_pread_refuses_a_negative_length_and_reads_nothing_past_the_end(tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(str(path)) as d:
        with pytest.raises(UsageError):
            d.pread(0, -1)
        with pytest.raises(UsageError):
            d.pread(0, 2.0)
        assert d.pread(8 * MiB, 10) == b"" and d.pread(8 * MiB - 4, 10) == bytes(4)
        buf = bytearray(4096)
        assert d.pread_into(buf, 0) == 4096 and bytes(buf) == b"\x11" * 4096
