"""compact --trim: blocks wholly in a file system's free space are unallocated, nothing else.

Real file systems (ext4, FAT, NTFS; no table, MBR or GPT) are made with their own tools, files
written and some deleted (the deleted files' data stays in free space), and the chain's leaf
converted into one standalone disk. After ``compact(trim=True)``:

* the files that remain read identically (hashed through pytsk3 before and after);
* every block either reads as before, or was dropped, reads zeros, and (ext4: an independent
  oracle, ``dumpe2fs``'s free-block list) lies wholly in free space;
* the file system's own checker passes (``e2fsck -fn``, ``fsck.fat -n``);
* ``--dry-run`` predicts exactly what the run does.

A differencing disk drops a free block only where its parent reads zeros. Crafted superblocks,
boot sectors and partition tables give "nothing trimmed" with a reason, never a dropped block in
use or an unbounded read.
"""

from __future__ import annotations

import hashlib
import re
import struct
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest

import vhdx
from support.cli import assert_one_line_error, run_inprocess as run_cli
from support.disk import MiB, disk_bytes
from support.filesystems import PART_OFFSET, Step, build, mbr, require
from support.needs import need_tool
from vhdx.ops.fsbitmaps import FsUnreadable, ext_free, fat_free
from vhdx.ops.fsfree import Coverage, free_blocks, tsk
from vhdx.ops.fsview import disk_image

FS_SIZE = 24 * MiB
KEEP = {"/keep.bin": 1_500_000, "/small.txt": 3000}
GONE = {"/gone1.bin": 3 * MiB + 4321, "/gone2.bin": 5 * MiB}


def payload(name: str, size: int) -> bytes:
    """Non-zero bytes, a different pattern per file."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def make_chain(folder: Path, fs: str, table: str) -> list[Path]:
    """Base: mkfs and every file; checkpoint: the GONE files deleted."""
    require(fs)
    files = {**KEEP, **GONE}
    steps = [Step([("write", p, payload(p, n)) for p, n in files.items()]),
             Step([("delete", p, b"") for p in GONE])]
    return build(folder, fs, table, steps, fs_size=FS_SIZE).paths


def file_hashes(path: Path, offset: int) -> dict[str, str]:
    """SHA-256 of each KEEP file, read through pytsk3 from the disk at ``path``."""
    with vhdx.open(path) as d:
        fs = tsk().FS_Info(disk_image(d), offset=offset)
        out = {}
        for name in KEEP:
            f = fs.open(name)
            out[name] = hashlib.sha256(f.read_random(0, int(f.info.meta.size))).hexdigest()
        return out


def ext4_free_bytes(raw: bytes, offset: int, folder: Path) -> np.ndarray:
    """One flag per KiB of the disk: True where dumpe2fs says the ext4 block there is free."""
    image = folder / "oracle.raw"
    image.write_bytes(raw[offset:offset + FS_SIZE])
    out = subprocess.run([need_tool("dumpe2fs", "e2fsprogs"), str(image)], capture_output=True, text=True).stdout
    bs = int(re.search(r"Block size:\s+(\d+)", out).group(1))
    k = bs // 1024
    free = np.zeros(len(raw) // 1024, dtype=bool)
    for line in re.findall(r"^\s+Free blocks: (.*)$", out, re.M):
        for part in filter(None, (p.strip() for p in line.split(","))):
            lo, _, hi = part.partition("-")
            free[offset // 1024 + int(lo) * k:offset // 1024 + (int(hi or lo) + 1) * k] = True
    image.unlink()
    assert free.any(), out[:2000]
    return free


def fsck(fs: str, raw: bytes, offset: int, folder: Path) -> None:
    """The file system's own checker, read-only, finds nothing to fix."""
    image = folder / "fsck.raw"
    image.write_bytes(raw[offset:offset + FS_SIZE])
    argv = {"ext4": [need_tool("e2fsck", "e2fsprogs"), "-fn"], "fat": [need_tool("fsck.fat", "dosfstools"), "-n"],
            "ntfs": [need_tool("ntfsfix", "ntfs-3g"), "-n"]}[fs]
    done = subprocess.run(argv + [str(image)], capture_output=True, text=True)
    image.unlink()
    assert done.returncode == 0, f"{fs} check after trim: {done.stdout}{done.stderr}"


@pytest.mark.parametrize("fs,table", [("ext4", "gpt"), ("fat", "mbr"), ("ntfs", "none"), ("ext4", "none")])
def test_trim_reclaims_free_space_and_keeps_every_file(tmp_path: Path, fs: str, table: str) -> None:
    leaf = make_chain(tmp_path / "chain", fs, table)[-1]
    flat = tmp_path / "flat.vhdx"
    vhdx.convert(leaf, flat)
    offset = 0 if table == "none" else PART_OFFSET
    hashes, before = file_hashes(flat, offset), disk_bytes(flat)
    plain = vhdx.compact(flat, dry_run=True)
    planned = vhdx.compact(flat, dry_run=True, trim=True)
    assert disk_bytes(flat) == before
    result = vhdx.compact(flat, trim=True)
    assert result.trimmed_blocks > 0 and result.bytes_reclaimed > plain.bytes_reclaimed
    assert (planned.zero_blocks, planned.trimmed_blocks, planned.size_after) == \
        (result.zero_blocks, result.trimmed_blocks, result.size_after)
    assert [v["kind"] for v in result.trim] == [{"ext4": "ext", "fat": "fat", "ntfs": "ntfs"}[fs]]
    after = disk_bytes(flat)
    assert file_hashes(flat, offset) == hashes
    a = np.frombuffer(before, dtype=np.uint8).reshape(-1, MiB)
    b = np.frombuffer(after, dtype=np.uint8).reshape(-1, MiB)
    changed = np.flatnonzero((a != b).any(axis=1))
    assert changed.size > 0
    assert not b[changed].any(), "a changed block does not read zeros"
    if fs == "ext4":
        free = ext4_free_bytes(before, offset, tmp_path).reshape(-1, MiB // 1024)
        in_use = changed[~free[changed].all(axis=1)]
        assert not in_use.size, f"blocks {in_use.tolist()} hold allocated ext4 blocks but were dropped"
    fsck(fs, after, offset, tmp_path)
    assert not run_cli("check", str(flat)).returncode


def test_a_child_drops_a_free_block_only_where_its_parent_reads_zeros(tmp_path: Path) -> None:
    base, leaf = make_chain(tmp_path, "ext4", "mbr")
    with vhdx.open(leaf) as d:
        free = free_blocks(d, MiB).free
    parent = disk_bytes(base)
    over_data = [b for b in np.flatnonzero(free).tolist() if any(parent[b * MiB:(b + 1) * MiB])]
    assert over_data, "no free block over the parent's data (the deleted files)"
    with vhdx.open(leaf, "r+") as d:               # garbage in free space, over the parent's old data
        d.pwrite(payload("garbage", MiB), over_data[0] * MiB)
    before = disk_bytes(leaf)
    result = vhdx.compact(leaf, trim=True)
    assert result.kept_nonzero_parent >= 1
    after = disk_bytes(leaf)
    for blk in range(len(before) // MiB):
        old, new = before[blk * MiB:(blk + 1) * MiB], after[blk * MiB:(blk + 1) * MiB]
        if old != new:
            assert free[blk] and not any(new) and not any(parent[blk * MiB:(blk + 1) * MiB]), blk
    assert after[over_data[0] * MiB:(over_data[0] + 1) * MiB] == payload("garbage", MiB)


def crafted_ext(**fields: int) -> bytes:
    """An ext superblock (in a 64 KiB volume) with chosen fields."""
    raw = bytearray(64 * 1024)
    sb = {"inodes": (0x0, 16), "blocks": (0x4, 64), "first": (0x14, 1), "inodes_per_group": (0x28, 16), "log": (0x18, 0), "per_group": (0x20, 8192),
          "magic": (0x38, 0xEF53), "incompat": (0x60, 0), "ro": (0x64, 0), "state": (0x3A, 1)}
    for name, (at, value) in sb.items():
        value = fields.get(name, value)
        struct.pack_into("<H" if name in ("magic", "state") else "<I", raw, 1024 + at, value)
    struct.pack_into("<I", raw, 2048, fields.get("bitmap", 3))          # group 0's bitmap block
    return bytes(raw)


@pytest.mark.parametrize("fields", [dict(blocks=0xFFFFFFFF), dict(log=40),
                                    dict(per_group=0), dict(per_group=1 << 20), dict(bitmap=1 << 30),
                                    dict(incompat=0x4), dict(first=64), dict(ro=0x200), dict(per_group=8),
                                    dict(state=0), dict(state=3)])
def test_a_crafted_ext_superblock_is_refused(fields: dict[str, int]) -> None:
    raw = crafted_ext(**fields)

    def read(offset: int, length: int) -> bytes:
        assert length <= len(raw), f"asked for {length} bytes"
        if offset + length > len(raw):
            raise FsUnreadable("past the end")
        return raw[offset:offset + length]

    with pytest.raises(FsUnreadable):
        list(ext_free(read, len(raw)))


def test_a_sane_crafted_ext_reads_its_bitmap() -> None:
    raw = bytearray(crafted_ext())
    raw[3 * 1024:3 * 1024 + 8] = b"\xff" * 7 + b"\x0f"     # blocks 1..60 used, 61..64 free
    runs = list(ext_free(lambda o, n: bytes(raw[o:o + n]), len(raw)))
    assert [(s.tolist(), e.tolist()) for s, e in runs] == [([61 * 1024], [64 * 1024])]


FAT_SECTORS = 8400          # 1-sector clusters: some 8300 of them, a FAT16


def crafted_fat(patch: dict[int, int], clean: bool = True) -> bytes:
    """A FAT16 volume of ``FAT_SECTORS`` 512-byte sectors, its boot sector bytes patched."""
    boot = bytearray(512)
    boot[0], boot[510], boot[511] = 0xEB, 0x55, 0xAA
    struct.pack_into("<HBHBHHBH", boot, 11, 512, 1, 1, 2, 512, 0, 0xF8, 40)
    struct.pack_into("<I", boot, 32, FAT_SECTORS)
    for at, value in patch.items():
        boot[at] = value
    raw = bytearray(boot) + bytearray(FAT_SECTORS * 512 - 512)
    for fat in (1, 41):                                   # entries 0 and 1 of both FATs
        raw[fat * 512:fat * 512 + 4] = b"\xf8\xff" + (b"\xff\xff" if clean else b"\xff\x7f")
    return bytes(raw)


@pytest.mark.parametrize("patch", [{13: 3}, {16: 9}, {22: 0, 36: 0}, {22: 1}, {19: 0xFF, 20: 0xFF, 32: 0}])
def test_a_crafted_fat_boot_sector_is_refused(patch: dict[int, int]) -> None:
    raw = crafted_fat(patch)
    with pytest.raises(FsUnreadable):
        list(fat_free(lambda o, n: raw[o:o + n], len(raw)))


def test_a_fat_marked_dirty_is_refused() -> None:
    volume = crafted_fat({}, clean=True)
    runs = list(fat_free(lambda o, n: volume[o:o + n], len(volume)))      # a clean one reads: all free
    assert [(s.tolist(), e.tolist()) for s, e in runs] == [([(1 + 80 + 32) * 512], [FAT_SECTORS * 512])]
    raw = crafted_fat({}, clean=False)
    with pytest.raises(FsUnreadable, match="dirty"):
        list(fat_free(lambda o, n: raw[o:o + n], len(raw)))


def test_unknown_data_and_overlapping_partitions_trim_nothing(tmp_path: Path) -> None:
    path = tmp_path / "d.vhdx"
    with vhdx.create(path, 16 * MiB, block_size=MiB) as d:
        d.pwrite(payload("junk", 12 * MiB), 2 * MiB)
    result = vhdx.compact(path, trim=True, dry_run=True)
    assert result.trimmed_blocks == 0 and result.trim[0]["kind"] == "unknown"
    assert "nothing trimmed" in result.trim[0]["note"]
    table = bytearray(mbr("ext4", 2048, 8192))
    table[462:478] = table[446:462]                       # a second partition over the first
    with vhdx.open(path, "r+") as d:
        d.pwrite(bytes(table), 0)
    result = vhdx.compact(path, trim=True, dry_run=True)
    assert result.trimmed_blocks == 0 and all(v["kind"] == "overlapping" for v in result.trim), result.trim


def test_the_cli_dry_run_reports_what_trim_would_reclaim(tmp_path: Path) -> None:
    leaf = make_chain(tmp_path / "chain", "fat", "none")[-1]
    flat = tmp_path / "flat.vhdx"
    vhdx.convert(leaf, flat)
    raw = flat.read_bytes()
    done = run_cli("compact", "--trim", "--dry-run", str(flat))
    assert done.returncode == 0, done.stderr
    assert "would reclaim" in done.stdout and "in file-system free space)" in done.stdout
    assert re.search(r"volume at 0 \(.*\): fat, .* free", done.stdout), done.stdout
    assert flat.read_bytes() == raw


def test_trim_without_pytsk3_is_one_readable_error_and_changes_nothing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.vhdx"
    with vhdx.create(path, 8 * MiB, block_size=MiB) as d:
        d.pwrite(bytes(MiB), 0)
    raw = path.read_bytes()
    monkeypatch.setitem(sys.modules, "pytsk3", None)          # import pytsk3 -> ImportError
    done = run_cli("compact", "--trim", str(path))
    assert_one_line_error(done, "pip install", "forensics")
    assert path.read_bytes() == raw


def test_coverage_flags_a_block_only_when_every_byte_of_it_is_free() -> None:
    cover = Coverage(10 * MiB, MiB)
    half = MiB // 2
    cover.add(np.array([half, 3 * MiB + half, 9 * MiB + half]), np.array([3 * MiB + half, 4 * MiB, 10 * MiB]))
    cover.add(np.array([8 * MiB]), np.array([9 * MiB + half]))
    cover.add(np.array([5 * MiB + 1]), np.array([6 * MiB]))          # one byte short
    assert np.flatnonzero(cover.free()).tolist() == [1, 2, 3, 8, 9]
    short = Coverage(9 * MiB + half, MiB)                             # a last block of half a MiB
    short.add(np.array([9 * MiB, 0]), np.array([20 * MiB, MiB - 1]))   # clipped at the disk's end
    assert np.flatnonzero(short.free()).tolist() == [9]
