"""The log under repair: replayed up to its last valid entry, the rest reported (docs/format.md §8.5)."""

from __future__ import annotations

import vhdx
from vhdx.file.image import Image

from support.repair import MiB, make_dynamic


def dirty_with_two_entries(path):
    """A disk whose last two changes are only in its log: a write to block 2, then to block 6."""
    make_dynamic(path)
    disk = vhdx.open(str(path), "r+")
    disk.pwrite(b"\x11" * MiB, 2 * MiB)
    disk.flush()
    disk.pwrite(b"\x22" * MiB, 6 * MiB)
    disk.flush()
    disk.image.writer.fail(RuntimeError("simulated crash"))
    disk.close()
    image = Image.open(str(path))
    entries = image.log_replayed
    log_offset = image.header.log_offset
    image.close()
    return entries, log_offset


def test_a_damaged_last_entry_is_reported_and_the_rest_replayed(tmp_path):
    src = tmp_path / "disk.vhdx"
    entries, log_offset = dirty_with_two_entries(src)
    assert entries  # each entry is applied before the next: only the last one is active
    last = entries[-1]
    with open(src, "r+b") as f:          # one byte of the last entry's data sector
        f.seek(log_offset + (last.position + last.entry_length - 100) % (1 * MiB))
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = vhdx.repair(src, tmp_path / "fixed.vhdx")
    assert report.ok, report.lines()
    log = next(s for s in report.structures if s.name == "log")
    assert log.status == "lost" and "1 later entry of this log damaged" in log.detail, log
    with vhdx.open(str(tmp_path / "fixed.vhdx")) as disk:
        assert disk.pread(2 * MiB, 4) == b"\x11" * 4      # from the entries before it
        assert disk.pread(6 * MiB, 4) == bytes(4)           # its update is lost with it


def test_a_valid_dirty_log_is_replayed_whole(tmp_path):
    src = tmp_path / "disk.vhdx"
    dirty_with_two_entries(src)
    report = vhdx.repair(src, tmp_path / "fixed.vhdx")
    log = next(s for s in report.structures if s.name == "log")
    assert log.status == "repaired" and "damaged" not in log.detail, log
    assert vhdx.hash(tmp_path / "fixed.vhdx") == vhdx.hash(src)
