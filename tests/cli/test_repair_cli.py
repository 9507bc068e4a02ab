"""The command line of repair, replay and check --repair: what is printed, the exit codes,
what is written and what is not."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import vhdx
from support.cli import run_inprocess, run_subprocess
from vhdx.file.image import Image
from vhdx.format import constants as C

MiB = 1 << 20


def make_disk(path: Path) -> Path:
    with vhdx.create(str(path), 8 * MiB, block_size=MiB) as disk:
        disk.pwrite(random.Random(1).randbytes(2 * MiB), 0)
    return path


def make_dirty(path: Path) -> Path:
    make_disk(path)
    disk = vhdx.open(str(path), "r+")
    disk.pwrite(b"\x77" * 4096, 5 * MiB)
    disk.flush()
    disk.image.writer.fail(RuntimeError("simulated crash"))
    disk.close()
    return path


def damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_repair_prints_the_report_and_writes_the_copy(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    damage(src, C.HEADER1_OFFSET, bytes(4096))
    damage(src, C.REGION_TABLE1_OFFSET, bytes(4096))
    before = src.read_bytes()
    r = run_inprocess("repair", src, "-o", tmp_path / "fixed.vhdx")
    assert r.returncode == 0, r.describe()
    assert "header 1           repaired" in r.stdout and "region table 1     repaired" in r.stdout, r.stdout
    assert "lost: nothing" in r.stdout and "repaired copy written to" in r.stdout, r.stdout
    assert src.read_bytes() == before
    assert vhdx.hash(tmp_path / "fixed.vhdx") == vhdx.hash(src)
    assert run_inprocess("check", tmp_path / "fixed.vhdx").returncode == 0


def test_repair_json_lists_lost_ranges(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    image = Image.open(str(src))
    entry = image.bat_region.file_offset + 8 * image.bat_index(1)
    image.close()
    damage(src, entry, ((1 << 40) | 6).to_bytes(8, "little"))  # block 1 past the end of the file
    d = run_inprocess("repair", "--json", src, "-o", tmp_path / "fixed.vhdx").json()
    assert d["recoverable"] and d["lost"] == [dict(start=MiB, end=2 * MiB, length=MiB)], d
    assert d["lost_bytes"] == MiB
    assert {s["name"]: s["status"] for s in d["structures"]}["BAT"] == "repaired"


def test_unrecoverable_exits_2_with_the_reason_and_writes_nothing(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    want = vhdx.hash(src)
    image = Image.open(str(src))
    md = image.metadata_region.file_offset
    image.close()
    damage(src, md, bytes(0x10000))   # the metadata table: the virtual size is gone
    r = run_inprocess("repair", src, "-o", tmp_path / "fixed.vhdx")
    assert r.returncode == 2, r.describe()
    assert "unrecoverable: the virtual size is lost" in r.stdout and "--size" in r.stdout, r.stdout
    assert not (tmp_path / "fixed.vhdx").exists()
    assert os.listdir(tmp_path) == ["disk.vhdx"]
    r = run_inprocess("repair", "--size", "8M", src, "-o", tmp_path / "fixed.vhdx")
    assert r.returncode == 0, r.describe()
    assert vhdx.hash(tmp_path / "fixed.vhdx") == want


def test_repair_refuses_an_existing_output_and_a_missing_one(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    (tmp_path / "taken.vhdx").write_bytes(b"mine")
    r = run_inprocess("repair", src, "-o", tmp_path / "taken.vhdx")
    assert r.returncode != 0 and "exists" in r.stderr and len(r.stderr.splitlines()) == 1, r.describe()
    assert (tmp_path / "taken.vhdx").read_bytes() == b"mine"
    r = run_inprocess("repair", src)
    assert r.returncode == 2 and "-o OUT" in r.stderr, r.describe()


def test_repair_in_place(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    want = vhdx.hash(src)
    damage(src, C.REGION_TABLE2_OFFSET, b"junk" * 1024)
    with open(src, "r+b") as f:
        f.truncate(os.path.getsize(src) + 2 * MiB)
    r = run_inprocess("repair", "--in-place", src)
    assert r.returncode == 0 and "repaired in place" in r.stdout, r.describe()
    assert "leaked space" in r.stdout
    c = run_inprocess("check", src)
    assert c.returncode == 0 and "no errors were found" in c.stdout and "leak" not in c.stdout, c.describe()
    assert vhdx.hash(src) == want


def test_replay_prints_one_line(tmp_path):
    src = make_dirty(tmp_path / "disk.vhdx")
    r = run_inprocess("replay", src)
    assert r.returncode == 0, r.describe()
    assert r.stdout.count("\n") == 1 and "replayed 1 log entry" in r.stdout and "the log is clean" in r.stdout
    image = Image.open(str(src))
    assert image.header.log_guid == C.ZERO_GUID and not image.log_was_dirty
    image.close()
    r = run_inprocess("replay", "--json", src)
    assert json.loads(r.stdout) == dict(path=str(src), replayed=False, entries=0, sequence_numbers=[])


def test_replay_of_a_broken_log_is_one_error_line_and_changes_nothing(tmp_path):
    src = make_dirty(tmp_path / "disk.vhdx")
    image = Image.open(str(src))
    log_offset = image.header.log_offset
    image.close()
    damage(src, log_offset, bytes(MiB))
    before = src.read_bytes()
    r = run_subprocess("replay", str(src))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and src.name in r.stderr, r.stderr
    assert src.read_bytes() == before


def test_check_repair_fixes_a_stale_header_and_a_leaked_tail(tmp_path):
    src = make_disk(tmp_path / "disk.vhdx")
    damage(src, C.HEADER2_OFFSET, b"x")
    with open(src, "r+b") as f:
        f.truncate(os.path.getsize(src) + 3 * MiB)
    assert run_inprocess("check", src).returncode == 3
    r = run_inprocess("check", "--repair", src)
    assert r.returncode == 0, r.describe()
    assert "fixed: rewrote both headers" in r.stdout and f"fixed: gave back {3 * MiB} bytes" in r.stdout, r.stdout
    again = run_inprocess("check", "-r", src)
    assert again.returncode == 0 and "fixed: nothing" in again.stdout, again.describe()
    assert "warning" not in again.stdout


def test_snapshot_of_a_dirty_disk_points_to_replay(tmp_path):
    src = make_dirty(tmp_path / "disk.vhdx")
    r = run_inprocess("snapshot", src)
    assert r.returncode != 0 and "vhdx replay" in r.stderr, r.describe()
    assert run_inprocess("replay", src).returncode == 0
    assert run_inprocess("snapshot", src).returncode == 0
