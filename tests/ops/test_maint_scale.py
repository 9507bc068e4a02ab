"""compact, resize and convert of a 64 TiB disk in memory that follows the data (issue 10).

A 64 TiB disk with 1 MiB blocks has a 512 MiB BAT. Before round 6, ``compact --dry-run``
of such a disk took 1.1 GiB (a copy of the BAT, whole-BAT state arrays), growing it to
64 TiB 1.9 GiB and shrinking it 0.5 GiB. Each runs here in a child process whose peak RSS,
less that of a child that only imports the same modules, must stay under 48 MiB (the BAT
would show at once), and the disk must still read right and pass ``check``.
"""

from __future__ import annotations

from pathlib import Path

import vhdx
from support.disk import MiB
from support.scale import child_rss_kib
from vhdx.ops.check import check_file

TiB = 1 << 40
IMPORTS = "import vhdx, vhdx.ops.compact, vhdx.ops.resize, vhdx.ops.convert, vhdx.ops.check"
STEPS = {
    "compact --dry-run": "vhdx.compact(path, dry_run=True)",
    "compact": "vhdx.compact(path)",
    "shrink to 32 TiB": "vhdx.resize(path, 32 << 40, allow_data_loss=True)",
    "grow to 64 TiB": "vhdx.resize(path, 64 << 40)",
    "shrink to 1 TiB": "vhdx.resize(path, 1 << 40, allow_data_loss=True)",
    "grow to 64 TiB again": "vhdx.resize(path, 64 << 40)",
    "convert": "vhdx.convert(path, path + '.copy.vhdx')",
}


def _rss_kib(code: str, path: Path) -> int:
    return child_rss_kib(IMPORTS, code, path)


def test_maintenance_of_a_64_tib_disk_stays_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.vhdx"
    with vhdx.create(path, 64 * TiB, block_size=MiB) as disk:
        for i in range(8):
            disk.pwrite(bytes([65 + i]) * 4096, i * 8 * TiB + 5 * MiB)
        disk.pwrite(bytes(4096), 3 * TiB)        # a block of zeros: compact unallocates it
    baseline = _rss_kib("pass", path)
    for name, code in STEPS.items():
        grown_mib = (_rss_kib(code, path) - baseline) / 1024
        assert grown_mib < 48, f"{name}: {grown_mib:.0f} MiB more than the imports"
    assert not check_file(str(path)).errors
    with vhdx.open(path) as disk:
        assert disk.size == 64 * TiB
        assert disk.pread(5 * MiB, 4096) == b"A" * 4096          # below the 1 TiB cut: kept
        assert disk.pread(8 * TiB + 5 * MiB, 4096) == bytes(4096)  # cut by the shrink, zeros since
    with vhdx.open(str(path) + ".copy.vhdx") as copy:
        assert copy.size == 64 * TiB and copy.pread(5 * MiB, 4096) == b"A" * 4096
