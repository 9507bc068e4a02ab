"""QEMU as an independent judge: qemu-img check/convert/info on our disks, and our reads and
writes on disks that qemu-img created and qemu-io wrote.

qemu-img 7.2 refuses 4096-byte logical sectors and differencing VHDX, so only 512-byte
geometries are used here. The qemu version is printed in the run summary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import vhdx

from .support import (GEOMETRIES_512, MiB, apply, assert_same_bytes, describe, geometry_params,
                      pattern_writes, run, scattered_extents)


def _qemu_check(qemu_img: str, path: Path) -> None:
    result = run([qemu_img, "check", "-f", "vhdx", path])
    assert result.returncode == 0, describe(result)
    assert "No errors were found on the image." in result.stdout, describe(result)


def _qemu_info(qemu_img: str, path: Path) -> dict:
    result = run([qemu_img, "info", "-f", "vhdx", "--output=json", path])
    assert result.returncode == 0, describe(result)
    return json.loads(result.stdout)


def _qemu_convert(qemu_img: str, path: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / (path.stem + ".raw")
    result = run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", path, raw])
    assert result.returncode == 0, describe(result)
    return raw.read_bytes()


# --------------------------------------------------------------------------------------------
# Our disks, judged by qemu-img
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", geometry_params(GEOMETRIES_512))
def test_qemu_img_checks_and_converts_our_disk(geometry, tmp_path, interop_tool, build_our_disk,
                                              read_whole_disk):
    qemu_img = interop_tool("qemu-img")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry)

    _qemu_check(qemu_img, path)
    info = _qemu_info(qemu_img, path)
    assert info["virtual-size"] == geometry.size
    assert info["cluster-size"] == geometry.block_size
    assert info.get("dirty-flag") is False
    assert_same_bytes(_qemu_convert(qemu_img, path, tmp_path), model, "qemu-img convert")
    with vhdx.open(path) as disk:
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open")


@pytest.mark.parametrize("geometry", geometry_params(GEOMETRIES_512[::2]))
def test_qemu_img_checks_and_converts_our_disk_after_a_second_rw_session(
        geometry, tmp_path, interop_tool, build_our_disk, read_whole_disk):
    qemu_img = interop_tool("qemu-img")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=2, second_session=True)

    _qemu_check(qemu_img, path)
    assert_same_bytes(_qemu_convert(qemu_img, path, tmp_path), model, "qemu-img convert")
    with vhdx.open(path) as disk:
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open")


# --------------------------------------------------------------------------------------------
# qemu-made disks, read and written by us
# --------------------------------------------------------------------------------------------

QEMU_MADE = [
    pytest.param(1 * MiB, "dynamic", 5 * MiB + 3 * 512, id="dynamic-1M-block"),
    pytest.param(2 * MiB, "fixed", 7 * MiB + 512, id="fixed-2M-block"),
    pytest.param(32 * MiB, "dynamic", 3 * MiB + 1024, id="dynamic-32M-block"),
    pytest.param(256 * MiB, "dynamic", 4 * MiB + 512, id="dynamic-256M-block"),
    pytest.param(1 * MiB, "fixed", 3 * MiB + 5 * 512, id="fixed-1M-block"),
]


def _qemu_made(tmp_path: Path, qemu_img: str, block_size: int, subformat: str,
               size: int) -> tuple[Path, bytearray]:
    path = tmp_path / f"qemu-{subformat}.vhdx"
    result = run([qemu_img, "create", "-f", "vhdx", "-o",
                  f"block_size={block_size},subformat={subformat}", path, size])
    assert result.returncode == 0, describe(result)
    info = _qemu_info(qemu_img, path)
    assert info["cluster-size"] == block_size
    return path, bytearray(info["virtual-size"])


def _qemu_io_writes(qemu_io: str, path: Path, model: bytearray, block_size: int,
                    seed: int) -> None:
    """Write a different fill byte per extent with qemu-io, and the same into the model."""
    rng = random.Random(seed)
    commands = []
    for offset, length in scattered_extents(len(model), block_size, 512, seed):
        fill = rng.randrange(1, 256)
        commands += ["-c", f"write -P 0x{fill:02x} {offset} {length}"]
        apply(model, [(offset, bytes([fill]) * length)])
    result = run([qemu_io, "-f", "vhdx", *commands, path])
    assert result.returncode == 0 and "error" not in result.stdout.lower(), describe(result)


@pytest.mark.parametrize("block_size, subformat, size", QEMU_MADE)
def test_we_read_what_qemu_io_wrote(block_size, subformat, size, tmp_path, interop_tool,
                                    read_whole_disk):
    qemu_img, qemu_io = interop_tool("qemu-img"), interop_tool("qemu-io")
    path, model = _qemu_made(tmp_path, qemu_img, block_size, subformat, size)
    _qemu_io_writes(qemu_io, path, model, block_size, seed=10)

    with vhdx.open(path) as disk:
        assert disk.size == len(model)
        assert disk.block_size == block_size
        assert disk.logical_sector_size == 512
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open")
    assert_same_bytes(_qemu_convert(qemu_img, path, tmp_path), model, "qemu-img convert")


@pytest.mark.parametrize("block_size, subformat, size", QEMU_MADE)
def test_qemu_accepts_our_writes_into_a_qemu_made_disk(block_size, subformat, size, tmp_path,
                                                       interop_tool, read_whole_disk,
                                                       write_all):
    qemu_img, qemu_io = interop_tool("qemu-img"), interop_tool("qemu-io")
    path, model = _qemu_made(tmp_path, qemu_img, block_size, subformat, size)
    _qemu_io_writes(qemu_io, path, model, block_size, seed=20)

    ours = pattern_writes(len(model), block_size, 512, seed=21)
    with vhdx.open(path, "r+") as disk:
        for offset, data in ours:
            write_all(disk, offset, data)
    apply(model, ours)

    _qemu_check(qemu_img, path)
    assert _qemu_info(qemu_img, path).get("dirty-flag") is False
    assert_same_bytes(_qemu_convert(qemu_img, path, tmp_path), model, "qemu-img convert")
    with vhdx.open(path) as disk:
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open")

    # And qemu can go on writing after us.
    _qemu_io_writes(qemu_io, path, model, block_size, seed=22)
    _qemu_check(qemu_img, path)
    with vhdx.open(path) as disk:
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open after qemu-io wrote again")


@pytest.mark.parametrize("geometry", geometry_params([GEOMETRIES_512[0], GEOMETRIES_512[3],
                                                      GEOMETRIES_512[6]]))
def test_alternating_sessions_of_qemu_io_and_ours_agree_with_the_model(
        geometry, tmp_path, interop_tool, build_our_disk, read_whole_disk, write_all):
    """Each tool takes over a file the other just wrote: BAT, log and headers must be mutual."""
    qemu_img, qemu_io = interop_tool("qemu-img"), interop_tool("qemu-io")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=30)
    for round_number in range(3):
        _qemu_io_writes(qemu_io, path, model, geometry.block_size, seed=31 + round_number)
        _qemu_check(qemu_img, path)
        ours = pattern_writes(geometry.size, geometry.block_size, 512, seed=40 + round_number)
        with vhdx.open(path, "r+") as disk:
            assert_same_bytes(read_whole_disk(disk), model, f"round {round_number}: before our writes")
            for offset, data in ours:
                write_all(disk, offset, data)
        apply(model, ours)
        _qemu_check(qemu_img, path)
        assert_same_bytes(_qemu_convert(qemu_img, path, tmp_path), model,
                          f"round {round_number}: qemu-img convert")
