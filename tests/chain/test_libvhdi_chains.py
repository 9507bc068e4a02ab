"""libvhdi (pyvhdi) as an independent reader of the chains we make.

Each chain is opened in libvhdi from its base up, every child given its parent with
``set_parent`` (libvhdi checks the child's parent_linkage against the parent's DataWriteGuid,
which it calls the identifier). Every layer must read exactly what our model says it holds.

libvhdi reads a differencing file's sector bitmap from the offset in the chunk's SBM entry even
when that entry is SB_BLOCK_NOT_PRESENT (offset 0), so it would take the file's first bytes for a
bitmap. Our children therefore get zeroed sector bitmaps when they are created; the last test
checks that a child never partly written (empty, or written in whole blocks only) reads right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vhdx

from .helpers import MiB, ChainModel, assert_same, build_chain, data_write_guid, pattern

CONFIGS = [
    # (id, logical sector size, virtual size, base block size, fixed base, child block sizes)
    ("512-dyn-1M-children-2M-1M-4M", 512, 5 * MiB + 3 * 512, 1 * MiB, False, [None, 1 * MiB, 4 * MiB]),
    ("4096-fixed-2M-children-1M-2M-8M", 4096, 5 * MiB + 4096, 2 * MiB, True, [1 * MiB, None, 8 * MiB]),
    ("512-dyn-8M-block-larger-than-disk", 512, 3 * MiB + 512, 8 * MiB, False, [1 * MiB, 1 * MiB]),
    ("4096-dyn-4M-four-children", 4096, 7 * MiB + 3 * 4096, 4 * MiB, False, [None, 2 * MiB, 1 * MiB, 4 * MiB]),
    ("512-fixed-1M-512-physical", 512, 2 * MiB + 7 * 512, 1 * MiB, True, [2 * MiB, 8 * MiB]),
]


def open_in_libvhdi(pyvhdi: Any, paths: list[Path]) -> list[Any]:
    """libvhdi handles for ``paths`` (base first), each child linked to its parent."""
    handles: list[Any] = []
    try:
        for path in paths:
            handle = pyvhdi.file()
            handle.open(str(path))
            if handles:
                handle.set_parent(handles[-1])
            handles.append(handle)
    except BaseException:
        close_all(handles)
        raise
    return handles


def close_all(handles: list[Any]) -> None:
    for handle in reversed(handles):
        handle.close()


def check_layers_in_libvhdi(pyvhdi: Any, cm: ChainModel) -> None:
    expected = cm.frozen + [bytes(cm.model)]
    for depth in range(len(cm.paths)):
        handles = open_in_libvhdi(pyvhdi, cm.paths[:depth + 1])
        try:
            top = handles[-1]
            assert top.media_size == cm.size
            assert top.bytes_per_sector == cm.logical_sector_size
            assert top.identifier.lower() == str(data_write_guid(cm.paths[depth]))
            if depth:
                assert top.disk_type == pyvhdi.disk_types.DIFFERENTIAL
                assert top.parent_identifier.lower() == str(data_write_guid(cm.paths[depth - 1]))
                assert top.parent_filename.replace("\\", "/").endswith("/" + cm.paths[depth - 1].name)
            want = expected[depth]
            assert_same(top.read_buffer_at_offset(cm.size, 0), want,
                        f"libvhdi, layer {depth} ({cm.paths[depth].name})")
            ss = cm.logical_sector_size
            for offset, length in ((1, 1000), (ss - 3, 7), (MiB - 511, 1023), (2 * MiB - 1, 2),
                                   (cm.size - 777, 777), (cm.size // 3 + 5, 70_001)):
                if 0 <= offset and offset + length <= cm.size:
                    assert top.read_buffer_at_offset(length, offset) == want[offset:offset + length], \
                        f"libvhdi read of {length} bytes at {offset}, layer {depth}"
        finally:
            close_all(handles)


@pytest.mark.parametrize("config", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_libvhdi_reads_our_chain(config, tmp_path: Path, interop_tool) -> None:
    pyvhdi = interop_tool("pyvhdi")
    _id, lss, size, base_bs, fixed, children = config
    cm = build_chain(tmp_path, size=size, base_block_size=base_bs, logical_sector_size=lss, fixed=fixed,
                     child_block_sizes=children)
    # our own reading agrees with the model first, so a failure below is about the peer
    with vhdx.open(cm.leaf) as disk:
        assert_same(disk.read(), bytes(cm.model), "our read of the leaf")
    check_layers_in_libvhdi(pyvhdi, cm)


def test_libvhdi_reads_a_chain_after_several_sessions(tmp_path: Path, interop_tool) -> None:
    """Layers written in several open/close sessions (each one a new log session and GUID
    rotation) before they get children; the bitmaps of partly written blocks grow between
    sessions."""
    pyvhdi = interop_tool("pyvhdi")
    cm = build_chain(tmp_path, size=4 * MiB + 4096, base_block_size=2 * MiB, logical_sector_size=4096,
                     child_block_sizes=[1 * MiB, 2 * MiB])
    # add a second session to the leaf, overlapping what the first wrote
    with vhdx.open(cm.leaf, "r+") as disk:
        for offset, length, seed in ((4096 * 3 + 100, 20_000, 7), (MiB - 4096, 3 * 4096, 8),
                                     (cm.size - 4096 - 9, 4096 + 9, 9)):
            cm.write(disk, offset, pattern(seed, length))
    check_layers_in_libvhdi(pyvhdi, cm)


@pytest.mark.parametrize("writes", ["empty", "whole-blocks-only"])
def test_libvhdi_reads_a_child_never_partly_written(writes: str, tmp_path: Path, interop_tool) -> None:
    pyvhdi = interop_tool("pyvhdi")
    size = 3 * MiB + 512
    child_writes: list[tuple[int, bytes]] = [] if writes == "empty" else [(MiB, pattern(5, MiB))]
    cm = build_chain(tmp_path, size=size, base_block_size=1 * MiB, child_block_sizes=[1 * MiB],
                     writes=[[(1000, pattern(4, 50_000))], child_writes])
    with vhdx.open(cm.leaf) as disk:
        bat = disk.info()["bat"]
        assert bat["sector_bitmap_states"].get("NOT_PRESENT", 0) == 0, bat  # allocated at creation
        assert "PARTIALLY_PRESENT" not in bat["payload_states"], bat
    check_layers_in_libvhdi(pyvhdi, cm)
