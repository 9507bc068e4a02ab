"""Geometries, deterministic write patterns and small helpers shared by the interop tests.

Every disk here is small (a few MiB of virtual size). A disk is built by our library and a
plain ``bytearray`` model receives the same writes; the peers (qemu-img, qemu-io, libvhdi,
dissect.hypervisor) then judge the file against the model.
"""

from __future__ import annotations

import random
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from support.disk import MiB, apply
from support.disk import assert_same as assert_same_bytes

__all__ = ["ALL_GEOMETRIES", "GEOMETRIES_4096", "GEOMETRIES_512", "Geometry", "MiB", "apply", "assert_same_bytes",
           "describe", "geometry_params", "pattern_writes", "run", "scattered_extents"]


@dataclass(frozen=True)
class Geometry:
    """What ``vhdx.create`` is given. ``size`` is never a multiple of ``block_size``."""

    size: int
    block_size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 4096
    fixed: bool = False

    @property
    def id(self) -> str:
        kind = "fixed" if self.fixed else "dynamic"
        return (f"{kind}-{self.block_size // MiB}M-block-{self.size}B-"
                f"{self.logical_sector_size}-{self.physical_sector_size}")


# 512-byte logical sectors: every peer, qemu included (qemu-img 7.2 refuses 4096).
GEOMETRIES_512 = [
    Geometry(5 * MiB + 3 * 512, 1 * MiB),
    Geometry(3 * MiB + 512, 1 * MiB, fixed=True),
    Geometry(7 * MiB + 512, 2 * MiB, physical_sector_size=512),
    Geometry(7 * MiB + 512, 2 * MiB, fixed=True),
    Geometry(3 * MiB + 1024, 32 * MiB),
    Geometry(5 * MiB + 7 * 512, 32 * MiB, fixed=True),
    Geometry(4 * MiB + 512, 256 * MiB),
    Geometry(2 * MiB + 9 * 512, 256 * MiB, fixed=True, physical_sector_size=512),
]

# 4096-byte logical sectors: libvhdi and dissect only.
GEOMETRIES_4096 = [
    Geometry(5 * MiB + 4096, 1 * MiB, logical_sector_size=4096),
    Geometry(3 * MiB + 3 * 4096, 2 * MiB, logical_sector_size=4096, fixed=True),
    Geometry(6 * MiB + 4096, 32 * MiB, logical_sector_size=4096),
    Geometry(2 * MiB + 4096, 256 * MiB, logical_sector_size=4096, fixed=True),
]

ALL_GEOMETRIES = GEOMETRIES_512 + GEOMETRIES_4096


def geometry_params(geometries: list[Geometry]) -> list[Any]:
    return [pytest.param(geometry, id=geometry.id) for geometry in geometries]


def scattered_extents(size: int, block_size: int, sector: int, seed: int) -> list[tuple[int, int]]:
    """(virtual_offset, length) pairs: aligned and unaligned, across sector and block
    boundaries, at the first and last bytes of the disk, plus seeded random ones."""
    rng = random.Random(seed)
    candidates = [
        (0, sector),                                    # the first sector
        (sector + 1, 1),                                # one byte, unaligned
        (3 * sector - 3, 10),                           # across a sector boundary
        (block_size - 700, 1500),                       # across the first block boundary
        (block_size + 5 * sector, 2 * sector),          # aligned, in the second block
        (2 * block_size - 4096 - 33, block_size + 77),  # over a whole block, unaligned ends
        (size // 2 + 123, 3 * sector + 45),
        (size - sector, sector),                        # the last sector
        (size - 1, 1),                                  # the last byte
        (size - 3 * sector - 5, 2 * sector),            # near the end, unaligned
    ]
    for _ in range(8):
        length = rng.randrange(1, 70_000)
        candidates.append((rng.randrange(0, size - length), length))
    return [(offset, length) for offset, length in candidates
            if 0 <= offset and length > 0 and offset + length <= size]


def pattern_writes(size: int, block_size: int, sector: int, seed: int) -> list[tuple[int, bytes]]:
    """Deterministic (virtual_offset, data) writes; one of them all zeros, one all 0xff."""
    rng = random.Random(seed * 7919 + 1)
    writes = []
    for index, (offset, length) in enumerate(scattered_extents(size, block_size, sector, seed)):
        if index == 4:
            data = bytes(length)
        elif index == 6:
            data = b"\xff" * length
        else:
            data = rng.randbytes(length)
        writes.append((offset, data))
    return writes


def run(args: list[Any], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a peer's command line; the caller asserts on the result."""
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, **kwargs)


def describe(result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(result.args)} -> exit {result.returncode}\n{result.stdout}{result.stderr}"
