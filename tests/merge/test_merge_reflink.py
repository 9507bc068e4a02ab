"""Reflink merges: on XFS (reflink=1) and btrfs a merge clones whole blocks instead of copying.

Each file system is a small sparse image file in a temporary folder, formatted with
``mkfs.xfs -m reflink=1`` (xfsprogs) or ``mkfs.btrfs`` (btrfs-progs), attached to a loop device
and mounted; the fixture always unmounts and detaches it. A chain built there is merged; then
the destination reads exactly the model, ``check`` finds nothing, ``bytes_cloned`` is above 0
(whole 1 MiB blocks; the partial runs are copied), and the data is really shared: with
``keep`` the destination's extents show as ``shared`` in ``filefrag -v``, and the file system's
used space grows by far less than the bytes merged. On tmpfs and ext4 nothing is cloned and the
content is the same.

Needs root, loop devices, ``mount``, ``losetup`` and the mkfs tools: without them the tests
skip locally and FAIL under ``CI=true`` (``.ci/run`` installs xfsprogs and btrfs-progs).
"""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Iterator

import pytest

import vhdx
from vhdx.ops.merge.run import wait_for_release

from support.merging import MiB, check_errors, cli, merge, read_disk
from support.needs import unavailable

IMAGE_SIZE = 320 * MiB  # XFS wants about 300 MiB at least


def _unavailable(reason: str) -> None:
    unavailable(f"reflink test cannot run: {reason}")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


MKFS = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}


@pytest.fixture
def mounted(request, tmp_path: Path) -> Iterator[Path]:
    """A freshly made file system of kind ``request.param`` on a loop device, mounted in tmp_path."""
    kind = request.param
    for tool in (MKFS[kind][0], "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} not found")
    if os.geteuid() != 0:
        _unavailable("loop mounts need root")
    image, mnt = tmp_path / f"{kind}.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    made = _run(MKFS[kind] + [str(image)])
    if made.returncode:
        _unavailable(f"{MKFS[kind][0]} failed: {made.stderr.strip()}")
    attached = _run(["losetup", "--find", "--show", str(image)])
    if attached.returncode:
        _unavailable(f"no loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    try:
        done = _run(["mount", device, str(mnt)])
        if done.returncode:
            _unavailable(f"mount of {kind} failed: {done.stderr.strip()}")
        try:
            yield mnt
        finally:
            _unmount(mnt)
    finally:
        _run(["losetup", "-d", device])


def _unmount(mnt: Path) -> None:
    """Unmount, after the merge's background release of deleted files and any unreachable open
    file; retried, then detached lazily (the loop device goes when nothing uses it), never left."""
    wait_for_release()
    gc.collect()
    for _ in range(5):
        done = _run(["umount", str(mnt)])
        if done.returncode == 0:
            return
        time.sleep(0.5)
        gc.collect()
    lazy = _run(["umount", "-l", str(mnt)])
    warnings.warn(f"{mnt} was busy ({done.stderr.strip()}); detached lazily: {lazy.returncode == 0}")


def make_chain(folder: Path) -> tuple[Path, Path, bytes]:
    """A dynamic base with 1 MiB blocks and a child with 6 whole blocks and 2 partial runs."""
    size = 16 * MiB
    base = folder / "base.vhdx"
    model = bytearray(size)
    with vhdx.create(str(base), size, block_size=MiB) as d:
        d.write(b"\x01" * (3 * MiB))
    model[:3 * MiB] = b"\x01" * (3 * MiB)
    child = Path(vhdx.snapshot(str(base), block_size=MiB))
    with vhdx.open(str(child), "r+") as d:
        for k in (2, 4, 5, 6, 9, 15):
            data = os.urandom(MiB)
            d.seek(k * MiB)
            d.write(data)
            model[k * MiB:(k + 1) * MiB] = data
        for off, n in ((11 * MiB + 512, 3 * 4096), (12 * MiB + 8192, 777)):
            data = os.urandom(n)
            d.seek(off)
            d.write(data)
            model[off:off + n] = data
    return base, child, bytes(model)


def shared_extents(path: Path) -> int:
    """How many extents of ``path`` filefrag reports as shared."""
    out = _run(["filefrag", "-v", str(path)])
    assert out.returncode == 0, out.stderr
    return sum(1 for line in out.stdout.splitlines() if "shared" in line.split(":")[-1])


@pytest.mark.parametrize("mounted", ["xfs", "btrfs"], indirect=True)
def test_merge_clones_whole_blocks(mounted: Path) -> None:
    base, child, model = make_chain(mounted)
    os.sync()
    used_before = shutil.disk_usage(mounted).used
    result = merge(str(child), str(base), keep=True)
    os.sync()
    grown = shutil.disk_usage(mounted).used - used_before
    assert result.bytes_copied == result.plan.bytes_to_copy
    assert result.bytes_cloned >= 6 * MiB, result   # the whole blocks
    assert result.bytes_cloned < result.bytes_copied  # the partial runs' edges are copied
    assert read_disk(base) == model
    assert check_errors(base) == []
    if shutil.which("filefrag"):
        assert shared_extents(base) > 0
    # Cloned blocks take no new data space (the log, BAT pages and the copied runs do).
    assert grown < result.bytes_cloned // 2, (grown, result.bytes_cloned)


@pytest.mark.parametrize("mounted", ["xfs", "btrfs"], indirect=True)
def test_cli_merge_with_delete_on_a_reflink_file_system(mounted: Path) -> None:
    base, child, model = make_chain(mounted)
    code, out = cli("merge", "--no-progress", str(child))
    assert code == 0, out
    assert not child.exists()
    cloned = re.search(r"cloned ([0-9.]+) MiB .*, copied ([0-9.]+) KiB", out)
    assert cloned and float(cloned.group(1)) >= 6, out
    assert read_disk(base) == model
    assert check_errors(base) == []


def test_nothing_is_cloned_on_tmpfs_or_ext4(fast_tmp: Path, tmp_path: Path) -> None:
    for folder in (fast_tmp / "ram", tmp_path / "disk"):
        folder.mkdir()
        base, child, model = make_chain(folder)
        result = merge(str(child), str(base))
        assert result.bytes_cloned == 0 and result.bytes_copied == result.plan.bytes_to_copy > 0
        assert read_disk(base) == model
        assert check_errors(base) == []
