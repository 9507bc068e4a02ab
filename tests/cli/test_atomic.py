"""Outputs appear atomically: complete under their final name, or not at all.

* ``vhdx export`` interrupted by SIGTERM or SIGINT in a real process, or failing on a write
  error (a file-size limit, the way a full disk fails mid-way), leaves nothing under the final
  name and no temporary file; the re-run works without ``--force``. With ``--force`` an
  interrupted export keeps the file it was going to replace.
* ``vhdx map --png`` failing on a write error leaves nothing behind either.

New disks: test_atomic_create.py.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vhdx
from vhdx.errors import DiskExistsError
from vhdx.file.outputs import atomic_output

from support.forensic_chain import REPO, cli_env, run_inprocess

MiB = 1 << 20


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def assert_one_line(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines() == [expected], stderr


# ------------------------------------------------------------------------------ the helper

def test_atomic_output_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with atomic_output(final) as out:
        out.write_at(b"hello", 0)
        assert not final.exists(), "the output appeared before it was complete"
        assert Path(out.path).parent == tmp_path and Path(out.path).name.startswith(".out.bin.")
    assert final.read_bytes() == b"hello"
    assert entries(tmp_path) == ["out.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o644 & ~umask


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_atomic_output_removes_the_temporary_file(tmp_path: Path, error: BaseException) -> None:
    final = tmp_path / "out.bin"
    with pytest.raises(type(error)):
        with atomic_output(final) as out:
            out.write_at(b"partial", 0)
            raise error
    assert entries(tmp_path) == []


def test_atomic_output_never_clobbers_without_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with pytest.raises(DiskExistsError):
        with atomic_output(final) as out:
            out.write_at(b"new", 0)
            final.write_bytes(b"someone else's")   # appears while we write
    assert final.read_bytes() == b"someone else's"
    assert entries(tmp_path) == ["out.bin"]
    with atomic_output(final, overwrite=True) as out:
        out.write_at(b"new", 0)
    assert final.read_bytes() == b"new"
    assert entries(tmp_path) == ["out.bin"]


# ------------------------------------------------------------------------------ export

@pytest.fixture(scope="module")
def big_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 MiB of incompressible data in 2 MiB blocks: an export takes about a second."""
    path = tmp_path_factory.mktemp("atomic-src") / "big.vhdx"
    chunk = np.random.default_rng(8).bytes(4 * MiB)
    with vhdx.create(path, 256 * MiB, block_size=2 * MiB) as disk:
        for offset in range(0, 256 * MiB, 4 * MiB):
            disk.seek(offset)
            disk.write(chunk)
    return path


def sizes(folder: Path) -> dict[str, int]:
    out = {}
    for name in os.listdir(folder):
        with contextlib.suppress(FileNotFoundError):
            out[name] = (folder / name).stat().st_size
    return out


def start_export(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``python -m vhdx export``; returns once the output folder changed (a file appeared or was cut)."""
    before = sizes(out.parent)
    proc = subprocess.Popen([sys.executable, "-m", "vhdx", "export", str(src), str(out), "--no-progress", *extra],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while proc.poll() is None and sizes(out.parent) == before and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.05)    # well inside the copy, which takes most of a second
    return proc


@pytest.mark.parametrize("sig,extra,code,line", [
    (signal.SIGTERM, (), 143, "vhdx: terminated"),                  # kernel copy
    (signal.SIGINT, ("--sha256",), 130, "vhdx: interrupted"),      # streaming through threads
])
def test_export_interrupted_leaves_nothing(tmp_path: Path, big_disk: Path, sig: int, extra: tuple,
                                           code: int, line: str) -> None:
    out = tmp_path / "disk.raw"
    proc = start_export(big_disk, out, *extra)
    assert proc.poll() is None, "the export finished before the signal: make the disk bigger"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert_one_line(err, line)
    assert entries(tmp_path) == [], "an interrupted export left files behind"
    again = run_inprocess("export", big_disk, out, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert entries(tmp_path) == ["disk.raw"]
    assert out.stat().st_size == 256 * MiB


def test_export_force_interrupted_keeps_the_old_file(tmp_path: Path, big_disk: Path) -> None:
    out = tmp_path / "disk.raw"
    out.write_bytes(b"the previous export")
    proc = start_export(big_disk, out, "--force")
    assert proc.poll() is None, "the export finished before the signal: make the disk bigger"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert entries(tmp_path) == ["disk.raw"]
    assert out.read_bytes() == b"the previous export"


def limited(max_bytes: int):
    """A preexec_fn: files of the child may not grow past ``max_bytes`` (writes then fail EFBIG)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return apply


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("atomic-small") / "small.vhdx"
    data = np.random.default_rng(3).bytes(6 * MiB)
    with vhdx.create(path, 8 * MiB, block_size=MiB) as disk:
        disk.seek(MiB)
        disk.write(data)
    return path


@pytest.mark.parametrize("extra", [(), ("--sha256",)], ids=["kernel-copy", "stream"])
def test_export_write_error_leaves_nothing(tmp_path: Path, small_disk: Path, extra: tuple) -> None:
    out = tmp_path / "disk.raw"
    proc = subprocess.run([sys.executable, "-m", "vhdx", "export", str(small_disk), str(out), "--no-progress",
                           *extra], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60,
                          preexec_fn=limited(3 * MiB))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert str(out) in proc.stderr, proc.stderr
    assert entries(tmp_path) == [], "a failed export left files behind"
    again = run_inprocess("export", small_disk, out, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert entries(tmp_path) == ["disk.raw"]
    with vhdx.open(small_disk) as disk:
        assert out.read_bytes() == disk.read()


def test_map_png_write_error_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    png = tmp_path / "map.png"
    proc = subprocess.run([sys.executable, "-m", "vhdx", "map", str(small_disk), "--png", str(png)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=60, preexec_fn=limited(40))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert str(png) in proc.stderr, proc.stderr
    assert entries(tmp_path) == [], "a failed map --png left files behind"
    again = run_inprocess("map", small_disk, "--png", png)
    assert again.returncode == 0, again.stderr
    assert png.read_bytes().startswith(b"\x89PNG") and entries(tmp_path) == ["map.png"]
