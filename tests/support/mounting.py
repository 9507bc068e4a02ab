"""Mounting in tests: FUSE must be usable (a failure under CI=true, a skip locally), and every
mount is unmounted in a ``finally``, even when the test fails."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator


from support.cli import run_subprocess
from support.needs import need_tool, unavailable


def fuse_problem() -> str | None:
    """Why FUSE cannot be used here, or None."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return f"/dev/fuse cannot be opened ({e.strerror}): load the fuse module / pass the device"
    try:
        import mfusepy
        del mfusepy
    except ImportError:
        return "mfusepy is not installed: pip install 'vhdx[mount]'"
    except OSError as e:
        return f"libfuse is missing ({e}): apt-get install fuse3"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing: apt-get install fuse3"
    return None


def require_fuse() -> None:
    """Skip (fail under CI=true) when FUSE is unusable."""
    problem = fuse_problem()
    if problem:
        unavailable(problem)


def require_tool(name: str, package: str) -> str:
    """The path of a command-line tool; skip (fail under CI=true) without it."""
    return need_tool(name, package)


def is_mounted(mountpoint: Path) -> bool:
    """``mountpoint`` is listed in this process's mount table."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def force_unmount(mountpoint: Path) -> None:
    """Last resort in a ``finally``: lazy-unmount whatever is left."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(disk: Path, mountpoint: Path, *options: str) -> Iterator[Path]:
    """``vhdx mount DISK MOUNTPOINT OPTIONS`` in the background; ``vhdx unmount`` on the way out
    (asserted clean when the body succeeded), a forced unmount in any case."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = run_subprocess("mount", disk, mountpoint, *options, timeout=120)
    assert done.returncode == 0, f"mount failed: {done.stderr}"
    assert is_mounted(mountpoint), "vhdx mount returned before the mount was ready"
    try:
        yield mountpoint
        gone = run_subprocess("unmount", mountpoint, timeout=180)
        assert gone.returncode == 0, f"unmount failed: {gone.stderr}"
        assert gone.stderr == "", gone.stderr
        assert not is_mounted(mountpoint)
    finally:
        force_unmount(mountpoint)


@contextlib.contextmanager
def eio_mounted(backing: Path, mountpoint: Path, lo: int, hi: int) -> Iterator[Path]:
    """``backing`` served read-only through FUSE (:mod:`support.eiofs`), every read touching
    ``[lo, hi)`` failing with EIO; yields the served file's path, unmounts on the way out."""
    require_fuse()
    mountpoint.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("eiofs.py")), str(backing),
                               str(mountpoint), str(lo), str(hi)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not is_mounted(mountpoint):
            assert server.poll() is None, f"the EIO file system exited: {server.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the EIO file system did not mount in 20 s"
            time.sleep(0.05)
        yield mountpoint / "disk.vhdx"
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, check=False)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        force_unmount(mountpoint)
