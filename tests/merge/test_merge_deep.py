"""A merge of more layers than a byte can number (issue 10's planner, found in round 6).

The sector-by-sector planner numbered each sector's owner in a ``uint8``, with 254 and 255
kept for "zeros" and "nothing here": a merge of 255 layers with partially present blocks took
the 255th layer's sectors for zeros, and one of 257 layers failed with OverflowError. Here 260
layers, each writing one sector of its own (so every block is partially present), are merged
into the base, and the base must read exactly as the leaf did.
"""

from __future__ import annotations

from pathlib import Path

import vhdx
from support.disk import assert_same, disk_bytes

LAYERS = 260
SIZE = 1 << 20


def test_a_merge_of_260_layers_keeps_every_layers_sectors(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    model = bytearray(SIZE)
    with vhdx.create(base, SIZE, block_size=1 << 20) as disk:
        disk.pwrite(b"\x01" * 4096, SIZE - 4096)
        model[SIZE - 4096:] = b"\x01" * 4096
    parent = base
    for i in range(1, LAYERS + 1):
        child = tmp_path / f"l{i:03d}.avhdx"
        with vhdx.create(child, parent=parent) as disk:
            sector = bytes([i % 251 + 2]) * 512
            disk.pwrite(sector, i * 512)
            model[i * 512:(i + 1) * 512] = sector
        parent = child
    assert_same(disk_bytes(parent), bytes(model), "the leaf before the merge")
    result = vhdx.merge(parent, into=base)
    assert len(result.deleted) == LAYERS
    assert_same(disk_bytes(base), bytes(model), f"the base after merging {LAYERS} layers")
