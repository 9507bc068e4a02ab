"""Writing the repaired copy: a new file laid out as ``vhdx create`` lays one out, with the
recovered identity (DataWriteGuid, disk id, parent locator, user metadata) and every block
the cleaned BAT still trusts copied over through the ordinary write path (data, then the BAT
through the log). The copy appears under its name only when complete."""

from __future__ import annotations

from typing import Iterator

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
from .batfix import NO_DATA_STATES, lookup
from .salvage import Salvage

WINDOW = 1 << 17  # blocks looked at at a time, for a differencing disk's runs


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
    """Every block the cleaned BAT trusts, into ``image``, in block order, in transactions of
    at most MAX_TX_BLOCKS blocks."""
    pending: list[tuple[int, int]] = []
    for block, entry in wanted_blocks(s):
        pending.append((block, entry))
        if len(pending) == MAX_TX_BLOCKS:
            _write_blocks(image, s, pending)
            pending = []
    _write_blocks(image, s, pending)


def _write_blocks(image: Image, s: Salvage, blocks: list[tuple[int, int]]) -> None:
    extents: list[Extent] = []
    for block, entry in blocks:
        extents += block_extents(s, block, entry)
    if extents:
        image.write_extents(extents)


def wanted_blocks(s: Salvage) -> Iterator[tuple[int, int]]:
    """``(block, entry)`` of each block to copy, in block order: those holding data and, in a
    differencing disk, those that read as zeros (not as the parent's). Looked at from the
    BAT's non-zero entries, a window of blocks at a time (runs of a plain state may be long)."""
    g, bat = s.geometry, s.bat
    assert g is not None and bat is not None
    if not g.has_parent:
        keep = batmod.holds_data(bat.states)
        yield from zip(bat.blocks[keep].tolist(), bat.entries[keep].tolist())
        return
    starts = np.concatenate([bat.blocks, bat.run_starts])
    stops = np.concatenate([bat.blocks + 1, bat.run_stops])
    for first in _windows(starts, stops):
        st, offsets = batmod.dense(bat, first, min(first + WINDOW, g.payload_blocks))
        wanted = batmod.holds_data(st) | np.isin(st, NO_DATA_STATES)
        rows = np.flatnonzero(wanted)
        yield from zip((rows + first).tolist(), (offsets[rows] | st[rows]).tolist())


def _windows(starts: np.ndarray, stops: np.ndarray) -> Iterator[int]:
    """The first block of each window of WINDOW blocks that holds a listed block or a run."""
    if not starts.size:
        return
    w0, w1 = starts // WINDOW, (stops - 1) // WINDOW + 1
    marks = np.zeros(int(w1.max()) + 1, dtype=np.int64)
    np.add.at(marks, w0, 1)
    np.add.at(marks, w1, -1)
    for w in np.flatnonzero(np.cumsum(marks) > 0).tolist():
        yield w * WINDOW


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
    pos, found = lookup(s.bat.chunks, np.array([block // g.chunk_ratio], np.int64))
    assert found[0]  # the cleaning dropped every partial block whose chunk has no sector bitmap
    sbm = int(s.bat.sbm_entries[pos[0]]) & C.BAT_FILE_OFFSET_MASK
    lo, hi = g.bitmap_byte_range(block)
    bits = bitmapmod.unpack(s.source.read(sbm + lo, hi - lo))[:n // ss]
    starts, stops, values = bitmapmod.runs(bits)
    return [(start + a * ss, (b - a) * ss, (s.source, offset + a * ss))
            for a, b, v in zip(starts.tolist(), stops.tolist(), values.tolist()) if v]
