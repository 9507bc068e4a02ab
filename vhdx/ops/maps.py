"""Allocation maps: which virtual ranges each layer holds, and what a checkpoint changed.

Everything is computed from BAT states with numpy run detection; only PARTIALLY_PRESENT
blocks read their sector bitmaps, so a 64 TiB sparse disk answers at once. ``vhdx map``
asks :func:`map_layers` (and :func:`.pictures.write_picture` for ``--png``/``--svg``); ``vhdx diff`` asks
:func:`changed_ranges`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np

from ..chains.disk import Disk
from ..errors import UsageError
from ..file.image import Image
from ..format import bat as batmod
from ..format import bitmap as bitmapmod
from ..format import constants as C

PRESENT = "present"
PARTIAL = "partial"      # inside a PARTIALLY_PRESENT block: sectors of this file
ABSENT = "absent"        # falls through to the parent (or zeros without one)
ZERO = "zero"
UNMAPPED = "unmapped"    # UNMAPPED and UNDEFINED: read as zeros
_STATE_KIND = {
    C.PAYLOAD_BLOCK_NOT_PRESENT: ABSENT, C.PAYLOAD_BLOCK_UNDEFINED: UNMAPPED, C.PAYLOAD_BLOCK_ZERO: ZERO,
    C.PAYLOAD_BLOCK_UNMAPPED: UNMAPPED, C.PAYLOAD_BLOCK_UNMAPPED_V095: UNMAPPED, 4: UNMAPPED,
    C.PAYLOAD_BLOCK_FULLY_PRESENT: PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT: PARTIAL,
}
_KIND_CODE = {PRESENT: 0, PARTIAL: 1, ABSENT: 2, ZERO: 3, UNMAPPED: 4}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}


@dataclass(frozen=True)
class Range:
    """A run of the virtual disk with one state: bytes and logical sectors."""

    start: int
    length: int
    state: str
    sector_size: int

    @property
    def end(self) -> int:
        """The first byte after the range."""
        return self.start + self.length

    def to_dict(self) -> dict[str, Any]:
        """``start``, ``length``, ``state``, ``first_sector`` and ``sectors`` (a partial sector counts)."""
        d = asdict(self)
        del d["sector_size"]
        d["first_sector"] = self.start // self.sector_size
        d["sectors"] = self.length // self.sector_size if self.length % self.sector_size == 0 else \
            -(-self.length // self.sector_size)
        return d


def layer_ranges(image: Image) -> Iterator[Range]:
    """Ranges of one file, in order, covering the whole virtual disk.

    Inside PARTIALLY_PRESENT blocks of a differencing file, sectors with their bit set are
    ``partial`` and the others ``absent``. Without a parent, PARTIALLY_PRESENT reads as present.
    """
    g = image.geometry
    bs, ss, size = g.block_size, g.logical_sector_size, image.size
    for b0, b1, v in block_runs(image):
        kind = _CODE_KIND[v]
        if kind != PARTIAL:
            start = b0 * bs
            yield Range(start, min(b1 * bs, size) - start, kind, ss)
            continue
        pending: Range | None = None
        for block in range(b0, b1):
            bits = image.read_bitmap(block)
            limit = min(bs, size - block * bs) // ss
            s0s, s1s, vals = bitmapmod.runs(bits[:limit])
            for s0, s1, bit in zip(s0s.tolist(), s1s.tolist(), vals.tolist()):
                r = Range(block * bs + s0 * ss, (s1 - s0) * ss, PARTIAL if bit else ABSENT, ss)
                if pending is not None and pending.state == r.state and pending.end == r.start:
                    pending = Range(pending.start, pending.length + r.length, r.state, ss)
                else:
                    if pending is not None:
                        yield pending
                    pending = r
        if pending is not None:
            yield pending


def block_runs(image: Image) -> Iterator[tuple[int, int, int]]:
    """``(first block, stop block, kind code)`` runs covering every block, from the BAT's
    non-zero entries (every other block is NOT_PRESENT): as many runs as the data has pieces."""
    sp = image.sparse()
    kinds = np.array([_KIND_CODE[_STATE_KIND.get(s, UNMAPPED)] for s in range(8)], dtype=np.uint8)
    codes = kinds[sp.states]
    if not image.has_parent:
        codes[codes == _KIND_CODE[PARTIAL]] = _KIND_CODE[PRESENT]
    pieces = [(int(a), int(b), int(c)) for a, b, c in zip(*batmod.block_runs(sp.blocks, codes))]
    pieces += [(a, b, int(kinds[s])) for a, b, s in zip(sp.run_starts.tolist(), sp.run_stops.tolist(),
                                                        sp.run_states.tolist())]
    pieces.sort()
    absent, pos, run = _KIND_CODE[ABSENT], 0, None
    for b0, b1, code in pieces + [(image.geometry.payload_blocks, image.geometry.payload_blocks, absent)]:
        for piece in ((pos, b0, absent), (b0, b1, code)):
            if piece[1] <= piece[0]:
                continue
            if run is not None and run[2] == piece[2]:
                run = (run[0], piece[1], run[2])
                continue
            if run is not None:
                yield run
            run = piece
        pos = b1
    if run is not None:
        yield run


def merged_ranges(ranges: Iterator[Range]) -> list[Range]:
    """``ranges`` with each run of adjacent ranges of one state joined into one."""
    out: list[Range] = []
    for r in ranges:
        if out and out[-1].state == r.state and out[-1].end == r.start:
            last = out[-1]
            out[-1] = Range(last.start, last.length + r.length, r.state, r.sector_size)
        else:
            out.append(r)
    return out


def changed_ranges(image: Image) -> list[Range]:
    """What a file defines on top of its parent: every range that is not ``absent``."""
    out = []
    for r in merged_ranges(layer_ranges(image)):
        if r.state != ABSENT:
            out.append(r)
    # Adjacent defined ranges of different kinds are still one changed extent for diff purposes.
    return out


def summary(ranges: list[Range]) -> dict[str, int]:
    """Bytes per state, in the order the states first appear."""
    totals: dict[str, int] = {}
    for r in ranges:
        totals[r.state] = totals.get(r.state, 0) + r.length
    return totals


# --------------------------------------------------------------------------- the layers of a chain

@dataclass(frozen=True)
class LayerMap:
    """The map of one layer of a chain: its number (0 = the file itself), its file and its ranges."""

    layer: int
    image: Image
    ranges: list[Range]

    def to_dict(self) -> dict[str, Any]:
        """What ``vhdx map --json`` prints for the layer."""
        im = self.image
        return dict(layer=self.layer, path=im.path, disk_type=im.disk_type, virtual_size=im.size,
                    sector_size=im.logical_sector_size, totals=summary(self.ranges),
                    ranges=[r.to_dict() for r in self.ranges])


def chain_layers(disk: Disk) -> list[Disk]:
    """``disk`` and every parent below it, leaf first."""
    out = []
    layer: Disk | None = disk
    while layer is not None:
        out.append(layer)
        layer = layer.parent
    return out


def map_layers(disk: Disk, layer: int | None = None) -> list[LayerMap]:
    """The map of every layer of ``disk``'s chain, leaf first, or of layer ``layer`` only."""
    layers = chain_layers(disk)
    chosen = range(len(layers)) if layer is None else [layer]
    out = []
    for n in chosen:
        if n < 0 or n >= len(layers):
            raise UsageError(f"the chain has {len(layers)} layers; no layer {n}", path=disk.path)
        image = layers[n].image
        out.append(LayerMap(n, image, merged_ranges(layer_ranges(image))))
    return out
