"""Outputs appear atomically: complete under their final name, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vhdx.errors import DiskExistsError
from vhdx.outputs import atomic_output


def entries(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


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
