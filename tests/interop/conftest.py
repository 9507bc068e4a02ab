"""Fixtures of the interop tests: a builder of our disks that also returns the model.

Every disk here is small (a few MiB of virtual size). A disk is built by our library and a
plain ``bytearray`` model receives the same writes; the peers (qemu-img, qemu-io, libvhdi,
dissect.hypervisor) then judge the file against the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

import vhdx

from .support import Geometry, apply, pattern_writes


@pytest.fixture
def build_our_disk(write_all: Callable[[Any, int, bytes], None]) -> Callable[..., bytearray]:
    """Factory: create ``path`` with ``vhdx.create(geometry)``, write a seeded pattern; return
    the model. With ``second_session=True`` the file is reopened "r+" and written again."""
    def build(path: Path, geometry: Geometry, *, seed: int = 1,
              second_session: bool = False) -> bytearray:
        model = bytearray(geometry.size)
        writes = pattern_writes(geometry.size, geometry.block_size,
                                geometry.logical_sector_size, seed)
        with vhdx.create(path, geometry.size, block_size=geometry.block_size,
                         logical_sector_size=geometry.logical_sector_size,
                         physical_sector_size=geometry.physical_sector_size,
                         fixed=geometry.fixed) as disk:
            for offset, data in writes:
                write_all(disk, offset, data)
        apply(model, writes)
        if second_session:
            more = pattern_writes(geometry.size, geometry.block_size,
                                  geometry.logical_sector_size, seed + 1000)
            with vhdx.open(path, "r+") as disk:
                for offset, data in more:
                    write_all(disk, offset, data)
            apply(model, more)
        return model

    return build
