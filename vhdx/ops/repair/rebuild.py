"""Writing the repaired copy: a new file laid out as ``vhdx create`` lays one out, with the
recovered identity (DataWriteGuid, disk id, parent locator, user metadata) and every block
the cleaned BAT still trusts copied over through the ordinary write path (data, then the BAT
through the log). The copy appears under its name only when complete."""

from __future__ import annotations

import numpy as np

from ...file.create import create_image
from ...file.extents import Extent
from ...file.image import Image
from ...file.outputs import publish, refuse_existing, remove_quietly, temporary_path
from ...file.writer import MAX_TX_BLOCKS
from ...format import bat as batmod
from ...format import bitmap as bitmapmod
from ...format import constants as C
from ...format.locator import build_parent_locator
from ...format.records import metadata_items
from .salvage import Salvage


def write_copy(s: Salvage, out: str) -> None:
    """Write the repaired file ``out`` (which must not exist) from ``s``."""
    p, g = s.params, s.geometry
    assert g is not None and p.virtual_disk_size is not None and p.block_size is not None
    refuse_existing(out)
    temporary = temporary_path(out, "repairing")
    locator = build_parent_locator(p.locator) if p.has_parent and p.locator is not None else None
    image = create_image(temporary, p.virtual_disk_size, block_size=p.block_size,
                         logical_sector_size=g.logical_sector_size,
                         physical_sector_size=p.physical_sector_size or 4096,
                         fixed=p.leave_block_allocated and not p.has_parent, page83_data=p.page83_data,
                         parent_locator=locator)
    try:
        image.begin_session(data_change=True,
                            data_write_guid=s.header.data_write_guid if s.header is not None else None)
        if p.extra_items:
            image.write_metadata_items(metadata_items(image.metadata) + p.extra_items, data_change=False)
        copy_blocks(image, s)
        image.close()
    except BaseException:
        image.abort()
        remove_quietly(temporary)
        raise
    try:
        publish(temporary, out)
    except BaseException:
        remove_quietly(temporary)
        raise


def copy_blocks(image: Image, s: Salvage) -> None:
    """Every block the cleaned BAT trusts, into ``image``, in transactions of at most
    MAX_TX_BLOCKS blocks."""
    g, bat = s.geometry, s.bat
    assert g is not None and bat is not None
    entries = bat[batmod.payload_indices(g)]
    st = batmod.states(entries)
    wanted = batmod.holds_data(st)
    if g.has_parent:
        wanted |= np.isin(st, (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
                               C.PAYLOAD_BLOCK_UNMAPPED_V095))
    blocks = np.flatnonzero(wanted).tolist()
    for i in range(0, len(blocks), MAX_TX_BLOCKS):
        extents: list[Extent] = []
        for k in blocks[i:i + MAX_TX_BLOCKS]:
            extents += block_extents(s, k, int(entries[k]))
        if extents:
            image.write_extents(extents)


def block_extents(s: Salvage, block: int, entry: int) -> list[Extent]:
    """What block ``block`` holds, as extents: its data from the source file (zeros past the
    file's end), the set sectors of a partial block, or zeros for a block that reads as zeros."""
    g = s.geometry
    assert g is not None and s.bat is not None
    bs, size = g.block_size, g.virtual_disk_size
    start = block * bs
    n = min(bs, size - start)
    state = entry & C.BAT_STATE_MASK
    offset = entry & C.BAT_FILE_OFFSET_MASK
    if state not in C.HOLDS_DATA:
        return [(start, n, None)]
    if state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT and g.has_parent:
        return _partial_extents(s, block, start, n, offset)
    inside = max(0, min(n, s.source.size() - offset))
    out: list[Extent] = [(start, inside, (s.source, offset))] if inside else []
    if inside < n and g.has_parent:
        out.append((start + inside, n - inside, None))
    return out


def _partial_extents(s: Salvage, block: int, start: int, n: int, offset: int) -> list[Extent]:
    g = s.geometry
    assert g is not None and s.bat is not None
    ss = g.logical_sector_size
    sbm = int(s.bat[g.sbm_bat_index(block // g.chunk_ratio)]) & C.BAT_FILE_OFFSET_MASK
    lo, hi = g.bitmap_byte_range(block)
    bits = bitmapmod.unpack(s.source.read(sbm + lo, hi - lo))[:n // ss]
    starts, stops, values = bitmapmod.runs(bits)
    return [(start + a * ss, (b - a) * ss, (s.source, offset + a * ss))
            for a, b, v in zip(starts.tolist(), stops.tolist(), values.tolist()) if v]
