"""dissect.hypervisor as an independent judge of the disks we write.

dissect reads the header with the larger sequence number without checking CRCs and ignores
the log. Its ``VHDX.read_sectors`` takes ``min(count, sectors_per_block)`` sectors from the
first block even when the read starts inside a block, so a read that starts mid-block and
crosses into the next block returns wrong data: the whole disk is read here in one call from
offset 0, which only ever reads block-aligned runs. The dissect version is printed in the run
summary.
"""

from __future__ import annotations

import uuid

import pytest

import vhdx

from .support import (ALL_GEOMETRIES, GEOMETRIES_512, Geometry, MiB, apply, assert_same_bytes,
                      geometry_params, pattern_writes)


def _dissect_read_all(dissect_vhdx, path, geometry: Geometry, model: bytearray) -> None:
    with open(path, "rb") as handle:
        image = dissect_vhdx.VHDX(handle)
        assert image.size == len(model)
        assert image.sector_size == geometry.logical_sector_size
        assert image.block_size == geometry.block_size
        image.seek(0)
        assert_same_bytes(image.read(len(model)), model, "dissect.hypervisor")


@pytest.mark.parametrize("geometry", geometry_params(ALL_GEOMETRIES))
def test_dissect_reads_our_disk(geometry, tmp_path, interop_tool, build_our_disk):
    dissect_vhdx = interop_tool("dissect.hypervisor")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=7)
    _dissect_read_all(dissect_vhdx, path, geometry, model)
    with open(path, "rb") as handle, vhdx.open(path) as disk:
        image = dissect_vhdx.VHDX(handle)
        assert image.id == disk.disk_id  # dissect's id is the page-83 virtual disk id
        assert uuid.UUID(bytes_le=bytes(image.header.data_write_guid)) == disk.data_write_guid


@pytest.mark.parametrize("geometry", geometry_params(GEOMETRIES_512[::3]))
def test_dissect_reads_our_disk_after_a_second_rw_session(geometry, tmp_path, interop_tool,
                                                          build_our_disk):
    dissect_vhdx = interop_tool("dissect.hypervisor")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=8, second_session=True)
    _dissect_read_all(dissect_vhdx, path, geometry, model)


def test_dissect_reads_our_differencing_child_over_our_parent(tmp_path, interop_tool,
                                                              build_our_disk, write_all):
    dissect_vhdx = interop_tool("dissect.hypervisor")
    geometry = Geometry(6 * MiB + 512, 2 * MiB)
    parent = tmp_path / "parent.vhdx"
    child = tmp_path / "child.avhdx"
    model = build_our_disk(parent, geometry, seed=9)
    writes = pattern_writes(geometry.size, geometry.block_size, geometry.logical_sector_size, 10)
    with vhdx.create(child, parent=parent) as disk:
        for offset, data in writes:
            write_all(disk, offset, data)
    apply(model, writes)

    # dissect finds the parent through the locator's relative_path, next to the child.
    image = dissect_vhdx.VHDX(child)
    try:
        assert image.parent is not None
        assert image.size == len(model)
        image.seek(0)
        assert_same_bytes(image.read(len(model)), model, "dissect.hypervisor child")
    finally:
        image.fh.close()
        if image.parent is not None:
            image.parent.fh.close()
