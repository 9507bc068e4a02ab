"""Whole virtual disks: deterministic data, writing and reading every byte, and comparing with a model.

The model of a disk is a plain ``bytearray`` of its virtual size that receives the same writes
(:func:`apply`); a test then reads the whole disk (:func:`read_all`, :func:`disk_bytes`) and
compares (:func:`assert_same`), which names the first differing offset instead of printing
megabytes. Reads go through ``readinto`` and loop over short reads (``RawIOBase`` semantics).
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Iterable

import numpy as np

import vhdx

MiB = 1 << 20
READ_CHUNK = 8 * MiB


def pattern(seed: int, length: int) -> bytes:
    """``length`` pseudo-random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(length)


def nonzero_pattern(seed: int, length: int) -> bytes:
    """``length`` random bytes, never 0 (a lost write cannot pass for an unwritten sector)."""
    return np.random.default_rng(seed).integers(1, 256, size=length, dtype=np.uint8).tobytes()


def write_all(disk: Any, offset: int, data: bytes | memoryview) -> None:
    """Write ``data`` at ``offset``, looping over short writes (RawIOBase semantics)."""
    disk.seek(offset)
    view = memoryview(data)
    while view:
        count = disk.write(view)
        assert count, f"write at {offset} returned {count!r}"
        view = view[count:]


def apply(model: bytearray, writes: Iterable[tuple[int, bytes]]) -> None:
    """Lay ``(offset, data)`` writes over the in-memory model of a disk."""
    for offset, data in writes:
        model[offset:offset + len(data)] = data


def read_all(disk: Any, *, check_end: bool = True) -> bytes:
    """Every byte of an open virtual disk, by repeated ``readinto`` from offset 0.

    Fails the test if fewer than ``disk.size`` bytes come back or, with ``check_end``, if a
    read at the virtual size returns data.
    """
    size = disk.size
    buffer = bytearray(size)
    view = memoryview(buffer)
    disk.seek(0)
    done = 0
    while done < size:
        count = disk.readinto(view[done:done + READ_CHUNK])
        assert count, f"readinto returned {count!r} at {done} of {size}"
        done += count
    if check_end:
        assert disk.readinto(bytearray(1)) in (0, None), "read past the end of the disk returned data"
    return bytes(buffer)


def disk_bytes(path: str | os.PathLike[str], **options: Any) -> bytes:
    """Every virtual byte of ``path`` read through its chain (``vhdx.open`` read-only by default)."""
    with vhdx.open(os.fspath(path), **options) as disk:
        return read_all(disk)


def first_difference(got: bytes, want: bytes) -> str:
    """How two byte strings differ, in one line ("equal" when they do not)."""
    if len(got) != len(want):
        return f"lengths differ: {len(got)} != {len(want)}"
    x = np.frombuffer(got, np.uint8)
    y = np.frombuffer(want, np.uint8)
    bad = np.flatnonzero(x != y)
    if not len(bad):
        return "equal"
    at = int(bad[0])
    return (f"{len(bad)} bytes differ, first at virtual {at} (0x{at:x}) (got {got[at:at + 16].hex()}, "
            f"want {want[at:at + 16].hex()}), last at 0x{int(bad[-1]):x}; sha256 got {sha256(got)[:16]} "
            f"want {sha256(want)[:16]}")


def assert_same(got: bytes, want: bytes | bytearray, what: str) -> None:
    """A one-line failure naming the first differing offset, instead of a megabyte diff."""
    if got != want:
        raise AssertionError(f"{what}: {first_difference(bytes(got), bytes(want))}")


def sha256(data: bytes | bytearray | memoryview) -> str:
    """SHA-256 of bytes in memory, as hex."""
    return hashlib.sha256(data).hexdigest()


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of the data extents of a file; holes are left out. The whole file when
    the host cannot say (no SEEK_DATA, or a filesystem that does not report holes)."""
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    extents = []
    position = 0
    try:
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            extents.append((start, stop))
            position = stop
    except OSError:
        return [(0, size)]
    return extents


def sha256_file(path: str | os.PathLike[str], chunk: int = 4 * MiB) -> str:
    """SHA-256 of a host file's bytes.

    Holes are hashed from a zero buffer instead of being read: reading 10 GiB of holes costs
    about 25 s of system time on the CI machine, hashing them about 7 s.
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    zeros = memoryview(bytes(chunk))
    with open(path, "rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        position = 0
        for start, stop in _data_extents(handle.fileno(), size) + [(size, size)]:
            while position < start:  # a hole
                count = min(chunk, start - position)
                digest.update(zeros[:count])
                position += count
            handle.seek(position)
            while position < stop:
                count = handle.readinto(view[: min(chunk, stop - position)])
                if not count:
                    raise AssertionError(f"{path}: short read at {position} of {size}")
                digest.update(view[:count])
                position += count
    return digest.hexdigest()
