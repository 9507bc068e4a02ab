"""The compact, resize and convert verbs on the command line: output, JSON, refusals, exit codes,
a source that stays unchanged, an output that appears only when complete, a kill mid-way."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import vhdx
from support.chain import check_problems
from support.cli import assert_one_line_error, cli_env, run_inprocess
from support.disk import MiB, assert_same, disk_bytes, nonzero_pattern


def holey_disk(path: Path, size: int = 16 * MiB) -> bytes:
    model = bytearray(size)
    with vhdx.create(path, size, block_size=MiB) as d:
        for b in range(size // MiB):
            data = nonzero_pattern(b, MiB) if b % 2 else bytes(MiB)
            d.pwrite(data, b * MiB)
            model[b * MiB:(b + 1) * MiB] = data
    return bytes(model)


def test_compact_dry_run_then_compact_json(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhdx"
    model = holey_disk(disk)
    before = disk.read_bytes()
    r = run_inprocess("compact", "--dry-run", disk)
    assert r.returncode == 0, r.describe()
    assert "would reclaim 8.0 MiB" in r.stdout and "dry run: nothing was written" in r.stdout
    assert disk.read_bytes() == before
    d = run_inprocess("compact", "--json", disk).json()
    assert d["zero_blocks"] == 8 and d["bytes_reclaimed"] == 8 * MiB and not d["dry_run"]
    assert disk.stat().st_size == d["size_after"]
    assert_same(disk_bytes(disk), model, "after compact")


def test_compact_refuses_a_parent_unless_forced(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhdx"
    holey_disk(disk)
    vhdx.snapshot(disk)
    r = run_inprocess("compact", disk)
    assert r.returncode == 1
    assert_one_line_error(r, "depend on it", "--force")
    r = run_inprocess("compact", "--force", disk)
    assert r.returncode == 0 and "what they read has not changed" in r.stdout


def test_resize_min_and_grow_and_shrink(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhdx"
    model = holey_disk(disk)
    r = run_inprocess("resize", "--min", "--bytes", disk)
    assert r.stdout.strip() == str(16 * MiB)
    assert run_inprocess("resize", disk, "1T").returncode == 0
    with vhdx.open(disk) as d:
        assert d.size == 1 << 40
    assert run_inprocess("resize", "--min", "--json", disk).json()["minimum_size"] == 16 * MiB
    r = run_inprocess("resize", disk, "15M")
    assert r.returncode == 2
    assert_one_line_error(r, "would cut data", "--allow-data-loss")
    d = run_inprocess("resize", "--json", disk, "16M").json()
    assert d["new_size"] == 16 * MiB and d["old_size"] == 1 << 40
    assert_same(disk_bytes(disk), model, "after grow and shrink")
    r = run_inprocess("resize", disk)
    assert r.returncode == 2
    assert_one_line_error(r, "needs a SIZE")
    assert_one_line_error(run_inprocess("resize", disk, "1000"), "multiple of the 512-byte")


def test_convert_raw_with_sha256_and_no_overwrite(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    data = nonzero_pattern(7, 3 * MiB) + bytes(5 * MiB) + nonzero_pattern(8, MiB)
    raw.write_bytes(data)
    mtime = raw.stat().st_mtime_ns
    r = run_inprocess("convert", "--from", "raw", "--sha256", "--block-size", "1M", raw, tmp_path / "d.vhdx")
    assert r.returncode == 0, r.describe()
    assert f"sha256 {hashlib.sha256(data).hexdigest()}" in r.stdout
    assert "4 blocks of data" in r.stdout
    assert raw.stat().st_mtime_ns == mtime
    assert_same(disk_bytes(tmp_path / "d.vhdx"), data, "converted raw")
    r = run_inprocess("convert", "--from", "raw", raw, tmp_path / "d.vhdx")
    assert_one_line_error(r, "exists")
    d = run_inprocess("convert", "--json", "--fixed", "--new-id", "--overwrite", tmp_path / "d.vhdx",
                      tmp_path / "f.vhdx").json()
    assert d["disk_type"] == "fixed" and d["block_size"] == MiB
    assert_one_line_error(run_inprocess("convert", tmp_path / "f.vhdx", tmp_path / "f.vhdx", "--overwrite"),
                          "chain")


def test_convert_leaves_no_file_when_it_fails_or_is_killed(tmp_path: Path) -> None:
    raw = tmp_path / "big.img"
    with open(raw, "wb") as f:              # 3 GiB of data extents in a sparse file: slow enough to kill
        for i in range(0, 3 << 30, 64 * MiB):
            f.seek(i)
            f.write(b"x" * MiB)
    out = tmp_path / "out.vhdx"
    p = subprocess.Popen([sys.executable, "-m", "vhdx", "convert", "--from", "raw", "--block-size", "1M",
                          "--no-progress", raw, out], env=cli_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not any(n.startswith(".out.vhdx") for n in os.listdir(tmp_path)):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    if p.returncode == 0:                  # finished before the signal: then it must be complete
        assert_same(disk_bytes(out)[:MiB], b"x" * MiB, "finished")
    else:
        assert p.returncode == 143, err
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["big.img"] + (["out.vhdx"] if p.returncode == 0 else []))


def test_compact_killed_at_random_moments_reads_the_same_and_a_rerun_finishes(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine.vhdx"
    model = holey_disk(pristine, 48 * MiB)
    disk = tmp_path / "d.vhdx"
    for delay in (0.0, 0.15, 0.3, 0.45, 0.6):
        disk.write_bytes(pristine.read_bytes())
        p = subprocess.Popen([sys.executable, "-m", "vhdx", "compact", disk], env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert_same(disk_bytes(disk), model, f"killed after {delay} s")
        assert not check_problems(tmp_path, [disk]), f"killed after {delay} s"
        r = run_inprocess("compact", disk)
        assert r.returncode == 0, r.describe()
        assert_same(disk_bytes(disk), model, f"re-run after a kill at {delay} s")
        assert disk.stat().st_size < pristine.stat().st_size
