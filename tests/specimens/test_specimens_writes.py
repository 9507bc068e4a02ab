"""Writing into copies of the real specimens, judged by qemu-img.

The baseline is what qemu-img reads from a pristine copy (after ``qemu-img check -r all``
replays a dirty log on it); the expected disk is that baseline with our writes laid over it.
qemu-img check must accept the file we leave, and both qemu-img convert and our own read must
give the expected bytes. Comparison is chunk by chunk, so no disk is held in memory.
"""

from __future__ import annotations

import os
import random
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest

import vhdx

from .test_specimens import _current_header, _params

MiB = 1 << 20
CHUNK = 4 * MiB

# Small enough to convert and compare quickly; between them: NOT_PRESENT, ZERO and
# FULLY_PRESENT blocks (coreos), a fixed disk, a disk smaller than one block, Disk2VHD's
# identical headers, and a Windows dirty log replayed by the same "r+" open.
WRITABLE = _params(lambda entry: not entry["has_parent"] and entry["virtual_size"] <= 1 << 30
                   and "hyperv2012" not in entry["file"])


def _run(args: list[object]) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True)


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(result.args)} -> exit {result.returncode}\n{result.stdout}{result.stderr}"


def _writes(size: int, block_size: int, seed: int) -> list[tuple[int, bytes]]:
    """Unaligned writes at block edges, at the start and end of the disk, and at random."""
    rng = random.Random(seed)
    extents = [(0, 4096 + 3), (block_size - 1000, 3000), (size // 2 + 777, 100_000),
               (size - 5000, 5000), (size - 1, 1), (3 * block_size - 17, 2 * 4096)]
    for _ in range(10):
        length = rng.randrange(1, 300_000)
        extents.append((rng.randrange(0, size - length), length))
    return [(offset, rng.randbytes(length)) for offset, length in extents
            if offset >= 0 and offset + length <= size]


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """The file in CHUNK pieces; chunks inside a hole are not read (reading holes is slow)."""
    with open(path, "rb") as handle:
        for offset in range(0, size, CHUNK):
            length = min(CHUNK, size - offset)
            try:
                in_hole = os.lseek(handle.fileno(), offset, os.SEEK_DATA) >= offset + length
            except OSError:  # ENXIO: nothing but holes from here on
                in_hole = True
            if in_hole:
                yield bytes(length)
            else:
                handle.seek(offset)
                yield handle.read(length)


def _disk_chunks(disk, size: int) -> Iterator[bytes]:
    for offset in range(0, size, CHUNK):
        buffer = bytearray(min(CHUNK, size - offset))
        disk.seek(offset)
        done = 0
        while done < len(buffer):
            count = disk.readinto(memoryview(buffer)[done:])
            assert count, f"short read at {offset + done}"
            done += count
        yield bytes(buffer)


def _expected_chunks(baseline: Path, size: int, writes: list[tuple[int, bytes]]) -> Iterator[bytes]:
    for index, chunk in enumerate(_file_chunks(baseline, size)):
        start = index * CHUNK
        stop = start + len(chunk)
        patched = bytearray(chunk)
        for offset, data in writes:
            low, high = max(offset, start), min(offset + len(data), stop)
            if low < high:
                patched[low - start: high - start] = data[low - offset: high - offset]
        yield bytes(patched)


def _compare(actual: Iterator[bytes], expected: Iterator[bytes], who: str) -> None:
    for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got != want:
            first = next(i for i in range(len(got)) if got[i] != want[i])
            pytest.fail(f"{who}: first difference at virtual offset {index * CHUNK + first}")


def _qemu_raw(qemu_img: str, path: Path, raw: Path) -> Path:
    result = _run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", path, raw])
    assert result.returncode == 0, _describe(result)
    return raw


@pytest.mark.parametrize("name", WRITABLE)
def test_our_writes_into_a_specimen_copy_pass_qemu_img_check_and_read_back(
        name, specimen_copy, manifest_entry, interop_tool, tmp_path):
    entry = manifest_entry(name)
    qemu_img = interop_tool("qemu-img")
    size = entry["virtual_size"]

    pristine = specimen_copy(name)
    if entry["log_dirty"]:
        result = _run([qemu_img, "check", "-r", "all", "-f", "vhdx", pristine])
        assert result.returncode == 0, _describe(result)
    baseline = _qemu_raw(qemu_img, pristine, tmp_path / "baseline.raw")
    os.rename(pristine, tmp_path / "pristine.vhdx")

    path = specimen_copy(name)
    writes = _writes(size, entry["block_size"], seed=len(name))
    with vhdx.open(path, "r+") as disk:
        for offset, data in writes:
            disk.seek(offset)
            view = memoryview(data)
            while view:
                view = view[disk.write(view):]

    header = _current_header(path)
    assert header["log_guid"] == uuid.UUID(int=0)
    assert header["data_write_guid"] != uuid.UUID(entry["current_header"]["data_write_guid"]), \
        "a write a reader can see must renew DataWriteGuid (docs/format.md §2.3)"
    result = _run([qemu_img, "check", "-f", "vhdx", path])
    assert result.returncode == 0, _describe(result)

    converted = _qemu_raw(qemu_img, path, tmp_path / "written.raw")
    _compare(_file_chunks(converted, size), _expected_chunks(baseline, size, writes),
             "qemu-img convert")
    with vhdx.open(path) as disk:
        _compare(_disk_chunks(disk, size), _expected_chunks(baseline, size, writes), "vhdx.open")


@pytest.mark.parametrize("name", WRITABLE)
def test_rw_open_and_close_without_writes_keeps_data_write_guid_and_content(
        name, specimen_copy, manifest_entry, interop_tool, sha256_of_disk):
    # Opening a parent "r+" by mistake must not orphan its children: DataWriteGuid changes only
    # with a change a reader can see (docs/format.md §2.3).
    entry = manifest_entry(name)
    path = specimen_copy(name)
    with vhdx.open(path, "r+"):
        pass
    header = _current_header(path)
    assert header["data_write_guid"] == uuid.UUID(entry["current_header"]["data_write_guid"])
    assert header["log_guid"] == uuid.UUID(int=0)
    result = _run([interop_tool("qemu-img"), "check", "-f", "vhdx", path])
    assert result.returncode == 0, _describe(result)
    with vhdx.open(path) as disk:
        assert sha256_of_disk(disk) == entry["sha256_of_virtual_disk"]
