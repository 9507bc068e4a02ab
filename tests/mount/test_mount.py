"""``vhdx mount`` / ``vhdx unmount`` over real FUSE: layers as files, read-only for real, --rw
through the write path, a dirty log replayed in memory only, one-line errors."""

from __future__ import annotations

import ctypes.util
import errno
import os
import random
import re
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

import vhdx
from support.mounting import force_unmount, is_mounted, mounted, require_fuse
from support.needs import need
from support.chain import build_layers, check_problems
from support.cli import assert_one_line_error, run_inprocess, run_subprocess
from support.faults import FaultPlan
from support.disk import MiB, pattern, sha256, sha256_file
from vhdx.file.image import Image
from vhdx.file.storage import FileStorage
from vhdx.ops import mount as mountmod

SIZE = 24 * MiB


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


def _chain(folder: Path):
    """base + two snapshots, each writing aligned and unaligned data over its parents."""
    def fill(index: int, path: Path, disk, model: bytearray) -> None:
        rng = random.Random(index)
        for k in range(6):
            offset = rng.randrange(0, SIZE - 300_000)
            data = pattern(index * 10 + k, rng.randrange(1, 300_000))
            disk.pwrite(data, offset)
            model[offset:offset + len(data)] = data
    return build_layers(folder, size=SIZE, block_sizes=[MiB, 2 * MiB, MiB], fill=fill)


def _hashes(paths) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in paths}


def _log_guid(path: Path) -> uuid.UUID:
    im = Image.open(str(path), share=True)
    try:
        return im.header.log_guid
    finally:
        im.close()


def test_a_three_layer_chain_mounts_as_one_file_per_layer(tmp_path: Path) -> None:
    built = _chain(tmp_path / "disks")
    leaf = built.paths[-1]
    before = _hashes(built.paths)
    with mounted(leaf, tmp_path / "mnt") as mnt:
        names = sorted(os.listdir(mnt))
        assert names == sorted(["disk", *(p.name for p in built.paths)])
        # each layer file is the disk as that layer reads; its hash is `vhdx hash --layer N`
        for n, path in enumerate(reversed(built.paths)):
            want = run_inprocess("hash", leaf, "--layer", n)
            assert want.returncode == 0, want.describe()
            assert sha256_file(mnt / path.name) == want.stdout.split()[0], path.name
            assert sha256_file(mnt / path.name) == sha256(built.contents[-1 - n])
        assert sha256_file(mnt / "disk") == sha256(built.contents[-1])
        for name in ("disk", built.paths[0].name):
            st = os.stat(mnt / name)
            assert st.st_size == SIZE and st.st_mode & 0o222 == 0
        # random offsets and sizes, through the kernel, equal vhdx.open's reads
        rng = random.Random(7)
        with vhdx.open(leaf) as disk:
            layers = [disk, disk.parent, disk.parent.parent]
            for _ in range(300):
                n = rng.randrange(3)
                name = "disk" if n == 0 and rng.random() < 0.5 else built.paths[-1 - n].name
                offset = rng.randrange(SIZE + 10)
                length = rng.choice([1, 511, 4096, 65537, 3 * MiB + 7])
                fd = os.open(mnt / name, os.O_RDONLY)
                try:
                    got = os.pread(fd, length, offset)
                finally:
                    os.close(fd)
                assert got == layers[n].pread(offset, length), (name, offset, length)
        # read-only for real: writes are refused by the kernel
        with pytest.raises(OSError) as info:
            os.open(mnt / "disk", os.O_WRONLY)
        assert info.value.errno in (errno.EROFS, errno.EACCES)
    assert _hashes(built.paths) == before, "a file of the chain changed under a read-only mount"
    assert not check_problems(tmp_path / "disks")


def test_rw_writes_the_leaf_through_the_write_path(tmp_path: Path) -> None:
    built = _chain(tmp_path / "disks")
    leaf = built.paths[-1]
    parents = _hashes(built.paths[:-1])
    model = bytearray(built.contents[-1])
    writes = [(3 * MiB + 17, pattern(90, 100_000)), (0, pattern(91, 512)), (SIZE - 1000, pattern(92, 1000)),
              (7 * MiB, pattern(93, 2 * MiB + 300))]
    with mounted(leaf, tmp_path / "mnt", "--rw") as mnt:
        assert os.stat(mnt / "disk").st_mode & 0o200
        for path in built.paths[:-1]:
            with pytest.raises(OSError):
                os.open(mnt / path.name, os.O_WRONLY)
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            for offset, data in writes:
                assert os.pwrite(fd, data, offset) == len(data)
                model[offset:offset + len(data)] = data
            # as a block device: a write across the end is short, one at the end fails
            assert os.pwrite(fd, b"x" * 10, SIZE - 5) == 5
            model[SIZE - 5:] = b"x" * 5
            with pytest.raises(OSError) as info:
                os.pwrite(fd, b"x" * 10, SIZE)
            assert info.value.errno in (errno.ENOSPC, errno.EFBIG)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert sha256_file(mnt / "disk") == sha256(model)
        assert _log_guid(leaf) != uuid.UUID(int=0), "the leaf is not open for writing (log in use)"
        # the lock is held: another writer is refused
        other = run_subprocess("mount", leaf, tmp_path / "second", "--rw")
        assert other.returncode != 0
    assert _log_guid(leaf) == uuid.UUID(int=0), "the log is not clean after unmount"
    check = run_subprocess("check", leaf)
    assert check.returncode == 0, check.stdout + check.stderr
    with vhdx.open(leaf) as disk:
        assert sha256(disk.pread(0, SIZE)) == sha256(model)
    assert _hashes(built.paths[:-1]) == parents, "a parent was written"


def _wait_gone(pid: int) -> None:
    for _ in range(500):
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                if f.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server {pid} did not die")


def test_a_killed_rw_server_loses_at_most_the_writes_not_yet_fsynced(tmp_path: Path) -> None:
    """Writes are buffered in the server; fsync makes them durable. SIGKILL the server with a
    buffered write pending: the fsynced writes are there, the pending one is lost whole (never
    half), the leaf passes ``vhdx check`` and the parents are unchanged."""
    built = _chain(tmp_path / "disks")
    leaf, mnt = built.paths[-1], tmp_path / "mnt"
    parents = _hashes(built.paths[:-1])
    model = bytearray(built.contents[-1])
    old = bytes(model)
    durable = [(2 * MiB + 100, pattern(80, 300_000)), (9 * MiB, pattern(81, 4096))]
    pending = (15 * MiB + 4096, pattern(82, 200_000))
    mnt.mkdir()
    done = run_subprocess("mount", leaf, mnt, "--rw", timeout=120)
    assert done.returncode == 0, done.stderr
    try:
        pid = mountmod.mounted_server(str(mnt))
        assert pid is not None
        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            for offset, data in durable:
                assert os.pwrite(fd, data, offset) == len(data)
                model[offset:offset + len(data)] = data
            os.fsync(fd)
            assert os.pwrite(fd, pending[1], pending[0]) == len(pending[1])
            # reads see the buffered write (through the same descriptor: a close would apply it)
            assert os.pread(fd, len(pending[1]), pending[0]) == pending[1]
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
    finally:
        force_unmount(mnt)
    assert not is_mounted(mnt)
    check = run_subprocess("check", leaf)
    assert check.returncode == 0, check.stdout + check.stderr
    with vhdx.open(leaf) as disk:
        got = disk.pread(0, SIZE)
    offset, data = pending
    assert got[offset:offset + len(data)] in (old[offset:offset + len(data)], data)
    model[offset:offset + len(data)] = got[offset:offset + len(data)]
    assert got == bytes(model), "an fsynced write is missing, or something else changed"
    assert _hashes(built.paths[:-1]) == parents, "a parent was written"


class FailAt(FaultPlan):
    """EIO at the first storage call whose description matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__(None, error=errno.EIO)
        self.pattern = re.compile(pattern)

    def tick(self, what: str) -> bool:
        super().tick(what)
        return self.raised is None and bool(self.pattern.search(what))


def _dirty_disk(folder: Path) -> tuple[Path, bytes]:
    """A disk whose last transaction is only in its log (the BAT page write failed)."""
    folder.mkdir()
    path = folder / "dirty.vhdx"
    with vhdx.create(str(path), 8 * MiB, block_size=MiB) as d:
        d.pwrite(pattern(1, MiB), 0)
    plan = FailAt(r"write 4096 bytes at 0x300000$")   # BAT page 0, after its log entry
    disk = vhdx.open(str(path), "r+", storage=plan.wrap(FileStorage(str(path), writable=True)))
    with pytest.raises(vhdx.VhdxError):
        disk.pwrite(pattern(2, 8192), 3 * MiB)
    disk.close()
    assert _log_guid(path) != uuid.UUID(int=0)
    with vhdx.open(str(path)) as d:
        replayed = d.pread(0, 8 * MiB)
    assert replayed[3 * MiB:3 * MiB + 8192] == pattern(2, 8192)
    return path, replayed


def test_a_dirty_log_is_replayed_in_memory_and_the_file_stays_as_it_was(tmp_path: Path) -> None:
    path, replayed = _dirty_disk(tmp_path / "disks")
    before = sha256_file(path)
    with mounted(path, tmp_path / "mnt") as mnt:
        assert sha256_file(mnt / "disk") == sha256(replayed)
        assert sha256_file(mnt / "dirty.vhdx") == sha256(replayed)
    assert sha256_file(path) == before
    assert _log_guid(path) != uuid.UUID(int=0), "the log was replayed into the file"


def test_mount_errors_are_one_line_and_mount_nothing(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    missing = run_subprocess("mount", tmp_path / "nope.vhdx", tmp_path / "mnt")
    assert_one_line_error(missing, "nope.vhdx")
    assert not is_mounted(tmp_path / "mnt")
    with vhdx.create(str(tmp_path / "d.vhdx"), 4 * MiB):
        pass
    not_a_folder = run_subprocess("mount", tmp_path / "d.vhdx", tmp_path / "d.vhdx")
    assert_one_line_error(not_a_folder, "not a folder")
    assert_one_line_error(run_subprocess("unmount", tmp_path / "mnt"), "not a vhdx mount point")


@pytest.mark.parametrize("what", ["device", "binding"])
def test_missing_fuse_names_what_to_install(what: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if what == "device":
        real = os.path.exists
        monkeypatch.setattr(mountmod.os.path, "exists", lambda p: False if p == "/dev/fuse" else real(p))
        needle = "/dev/fuse"
    else:
        monkeypatch.setitem(sys.modules, "mfusepy", None)   # import mfusepy raises ImportError
        needle = "pip install 'vhdx[mount]'"
    (tmp_path / "mnt").mkdir()
    with vhdx.create(str(tmp_path / "d.vhdx"), 4 * MiB):
        pass
    result = run_inprocess("mount", tmp_path / "d.vhdx", tmp_path / "mnt")
    assert_one_line_error(result, needle)
    assert not is_mounted(tmp_path / "mnt")


def test_chain_options_find_a_moved_parent_or_read_over_zeros(tmp_path: Path) -> None:
    built = _chain(tmp_path / "disks")
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in built.paths[:-1]:
        path.rename(moved / path.name)
    leaf = built.paths[-1]
    (tmp_path / "mnt0").mkdir()
    assert_one_line_error(run_subprocess("mount", leaf, tmp_path / "mnt0"), "not found")
    assert not is_mounted(tmp_path / "mnt0")
    with mounted(leaf, tmp_path / "mnt1", "--search", moved) as mnt:
        assert sha256_file(mnt / "disk") == sha256(built.contents[-1])
        assert sorted(os.listdir(mnt)) == sorted(["disk", *(p.name for p in built.paths)])
    with mounted(leaf, tmp_path / "mnt2", "--missing-parent", "zeros") as mnt:
        assert sorted(os.listdir(mnt)) == sorted(["disk", leaf.name])
        with vhdx.open(leaf, missing_parent="zeros") as disk:
            assert sha256_file(mnt / "disk") == sha256(disk.pread(0, SIZE))


@pytest.mark.parametrize("soname", ["fuse3", "fuse"])
def test_each_libfuse_mounts_reads_and_writes(soname: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libfuse 3 is the default (its reads come 1 MiB at a time); libfuse 2 (which mfusepy would
    take first when both are installed: exfat-fuse pulls it in) works too. libfuse 3 refuses to
    start unless the read size the server asks for at init equals the max_read option."""
    library = ctypes.util.find_library(soname)
    need(library is not None, f"lib{soname} is missing: apt-get install {'fuse3' if soname == 'fuse3' else 'libfuse2'}")
    monkeypatch.setenv("FUSE_LIBRARY_PATH", str(library))
    built = _chain(tmp_path / "disks")
    leaf = built.paths[-1]
    with mounted(leaf, tmp_path / "ro") as mnt:
        assert sha256_file(mnt / "disk") == sha256(built.contents[-1])
        if os.geteuid() == 0:  # root: the server raised the mount's read-ahead (from 128 KiB) at the first open
            device = os.stat(mnt).st_dev
            with open(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb") as f:
                assert int(f.read()) == mountmod.MAX_READ // 1024
    model = bytearray(built.contents[-1])
    data = pattern(77, 3 * MiB + 5)
    model[MiB - 3:MiB - 3 + len(data)] = data
    with mounted(leaf, tmp_path / "rw", "--rw") as mnt:
        fd = os.open(mnt / "disk", os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, MiB - 3) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert sha256_file(mnt / "disk") == sha256(model)
    assert run_subprocess("check", leaf).returncode == 0
    with vhdx.open(leaf) as disk:
        assert sha256(disk.pread(0, SIZE)) == sha256(model)
