"""libvhdi (pyvhdi) as an independent judge of the disks we write.

libvhdi ignores the log, so it also shows that we leave nothing behind in the log after a
clean close. It reads 4096-byte logical sectors and differencing disks, which qemu-img 7.2
cannot. Its "identifier" is the header's DataWriteGuid, not the page-83 disk id. The libvhdi
version is printed in the run summary.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import vhdx

from .support import (ALL_GEOMETRIES, GEOMETRIES_4096, GEOMETRIES_512, Geometry, MiB, apply,
                      assert_same_bytes, geometry_params, pattern_writes)


def _libvhdi_read_all(pyvhdi, path: Path, geometry: Geometry, model: bytearray,
                      parent: Path | None = None) -> None:
    handles = []
    try:
        image = pyvhdi.file()
        image.open(str(path))
        handles.append(image)
        if parent is not None:
            parent_image = pyvhdi.file()
            parent_image.open(str(parent))
            handles.append(parent_image)
            image.set_parent(parent_image)
        assert image.media_size == len(model)
        assert image.bytes_per_sector == geometry.logical_sector_size
        assert_same_bytes(image.read_buffer_at_offset(len(model), 0), model, "libvhdi")
        # A few unaligned reads too, across sector and block boundaries.
        for offset, length in ((1, 1000), (geometry.block_size - 511, 1023),
                               (len(model) - 777, 777), (len(model) // 3 + 5, 70_001)):
            if 0 <= offset and offset + length <= len(model):
                assert image.read_buffer_at_offset(length, offset) == model[offset: offset + length], \
                    f"libvhdi read of {length} bytes at {offset}"
    finally:
        for handle in reversed(handles):
            handle.close()


def _disk_type(pyvhdi, geometry: Geometry) -> int:
    return pyvhdi.disk_types.FIXED if geometry.fixed else pyvhdi.disk_types.DYNAMIC


@pytest.mark.parametrize("geometry", geometry_params(ALL_GEOMETRIES))
def test_libvhdi_reads_our_disk(geometry, tmp_path, interop_tool, build_our_disk):
    pyvhdi = interop_tool("pyvhdi")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=3)
    _libvhdi_read_all(pyvhdi, path, geometry, model)

    image = pyvhdi.file()
    image.open(str(path))
    try:
        assert image.disk_type == _disk_type(pyvhdi, geometry)
        with vhdx.open(path) as disk:
            assert image.identifier.lower() == str(disk.data_write_guid)
    finally:
        image.close()


@pytest.mark.parametrize("geometry", geometry_params(GEOMETRIES_512[1::3] + GEOMETRIES_4096[:2]))
def test_libvhdi_reads_our_disk_after_a_second_rw_session(geometry, tmp_path, interop_tool,
                                                         build_our_disk):
    pyvhdi = interop_tool("pyvhdi")
    path = tmp_path / "ours.vhdx"
    model = build_our_disk(path, geometry, seed=4, second_session=True)
    _libvhdi_read_all(pyvhdi, path, geometry, model)


DIFFERENCING = [
    Geometry(6 * MiB + 512, 2 * MiB),
    Geometry(5 * MiB + 4096, 1 * MiB, logical_sector_size=4096),
]


@pytest.mark.parametrize("geometry", geometry_params(DIFFERENCING))
def test_libvhdi_reads_our_differencing_child_over_our_parent(geometry, tmp_path, interop_tool,
                                                              build_our_disk, write_all,
                                                              read_whole_disk):
    pyvhdi = interop_tool("pyvhdi")
    parent = tmp_path / "parent.vhdx"
    child = tmp_path / "child.avhdx"
    model = build_our_disk(parent, geometry, seed=5)
    parent_model = bytes(model)
    with vhdx.open(parent) as disk:
        parent_guid = disk.data_write_guid

    writes = pattern_writes(geometry.size, geometry.block_size, geometry.logical_sector_size, 6)
    with vhdx.create(child, parent=parent) as disk:
        assert disk.size == geometry.size
        for offset, data in writes:
            write_all(disk, offset, data)
    apply(model, writes)

    image = pyvhdi.file()
    image.open(str(child))
    try:
        assert image.disk_type == pyvhdi.disk_types.DIFFERENTIAL
        assert image.parent_identifier.lower() == str(parent_guid)
    finally:
        image.close()
    _libvhdi_read_all(pyvhdi, child, geometry, model, parent=parent)
    _libvhdi_read_all(pyvhdi, parent, geometry, bytearray(parent_model))  # parent untouched
    with vhdx.open(child) as disk:
        assert_same_bytes(read_whole_disk(disk), model, "vhdx.open of the child")
