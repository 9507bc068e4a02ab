"""``vhdx repair`` of a 64 TiB disk in memory that follows the data.

A 64 TiB disk with 1 MiB blocks has a 512 MiB BAT, almost all of it a hole in the file.
Before round 6, repair read it whole and worked on whole-BAT arrays: 2.9 GB of RSS, to a
copy and in place. Each repair runs here in a child process whose peak RSS, less that of a
child that only imports the same modules, must stay under 48 MiB (the BAT would show at
once); the repaired disk must read the same and pass ``check``.
"""

from __future__ import annotations

from pathlib import Path

import vhdx
from support.disk import MiB
from support.scale import child_rss_kib
from vhdx.ops.check import check_file

TiB = 1 << 40
IMPORTS = "import vhdx, vhdx.ops.repair, vhdx.ops.check"
STEPS = {
    "repair to a copy": "report = vhdx.repair(path, path + '.out.vhdx')",
    "repair in place": "report = vhdx.repair(path, in_place=True)",
}
PLACES = [i * 8 * TiB + 5 * MiB for i in range(8)] + [64 * TiB - 4096]


def _rss_kib(code: str, path: Path) -> int:
    return child_rss_kib(IMPORTS, code, path, "assert report.ok and not report.lost_ranges(), report.lines()")


def _reads_as_written(path: str) -> None:
    assert not check_file(path).errors
    with vhdx.open(path) as disk:
        assert disk.size == 64 * TiB
        for i, at in enumerate(PLACES):
            assert disk.pread(at, 4096) == bytes([65 + i]) * 4096, at
        assert disk.pread(3 * TiB, 4096) == bytes(4096)


def test_repair_of_a_64_tib_disk_stays_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "big.vhdx"
    with vhdx.create(path, 64 * TiB, block_size=MiB) as disk:
        for i, at in enumerate(PLACES):
            disk.pwrite(bytes([65 + i]) * 4096, at)
    baseline = _rss_kib("report = vhdx.ops.repair.SalvageReport(path)", path)
    for name, code in STEPS.items():
        grown_mib = (_rss_kib(code, path) - baseline) / 1024
        assert grown_mib < 48, f"{name}: {grown_mib:.0f} MiB more than the imports"
    _reads_as_written(str(path) + ".out.vhdx")
    _reads_as_written(str(path))
