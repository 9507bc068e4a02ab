"""The picture of ``vhdx map``: one labelled band per layer, an axis in bytes and a legend, as PNG or SVG.

:func:`drawing` lays the picture out once as rectangles and texts; :func:`render_png` paints
them (text in the 5x7 font of :mod:`.glyphs`, doubled) and :func:`render_svg` writes them as
plain SVG text. :func:`write_picture` writes either to a file, atomically.
"""

from __future__ import annotations

import os
import stat
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterator
from xml.sax.saxutils import escape

import numpy as np

from ..chains.disk import Disk
from ..errors import DiskExistsError, VhdxError
from ..file.outputs import atomic_output
from .export import refuse_chain_file
from .glyphs import ADVANCE, GLYPH_HEIGHT, text_mask
from .maps import ABSENT, PARTIAL, PRESENT, UNMAPPED, ZERO, LayerMap, Range

COLOURS = {PRESENT: (32, 96, 200), PARTIAL: (110, 170, 240), ZERO: (250, 215, 120), UNMAPPED: (200, 200, 200),
           ABSENT: (235, 235, 235)}
"""The colour of each state, in the order of the legend."""
INK, PAPER = (0, 0, 0), (255, 255, 255)
SCALE = 2                 # PNG text: each font pixel is SCALE x SCALE
CHAR_W, CHAR_H = ADVANCE * SCALE, GLYPH_HEIGHT * SCALE
PAD, GAP, MAX_LABEL = 12, 6, 32
_STATES = list(COLOURS)
_PRIORITY = [PRESENT, PARTIAL, ZERO, UNMAPPED]  # what a pixel column shows when its slice holds several


@dataclass(frozen=True)
class Text:
    """A line of text: ``x`` is its start, middle or end (``anchor``), ``y`` its top."""

    x: int
    y: int
    text: str
    anchor: str = "start"

    @property
    def left(self) -> int:
        """The first pixel column of the text in the PNG."""
        width = CHAR_W * len(self.text) - SCALE
        return self.x - {"start": 0, "middle": width // 2, "end": width}[self.anchor]


@dataclass
class Drawing:
    """A picture as filled rectangles ``(x, y, w, h, rgb)`` and texts on white paper."""

    width: int
    height: int
    rects: list[tuple[int, int, int, int, tuple[int, int, int]]] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


def axis_label(n: float) -> str:
    """``0`` -> ``0 B``, ``1.5 * 2**30`` -> ``1.5 GiB``: binary units, one decimal only when needed."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f}".rstrip("0").rstrip(".") + f" {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover (the loop returns)


def short_label(text: str) -> str:
    """``text`` cut in the middle to at most MAX_LABEL characters, so that a label fits its column."""
    if len(text) <= MAX_LABEL:
        return text
    keep = MAX_LABEL - 2
    return text[:keep // 2] + ".." + text[len(text) - (keep - keep // 2):]


def band_codes(ranges: list[Range], size: int, width: int) -> np.ndarray:
    """The state (an index into the legend) of each of ``width`` pixel columns of a layer.

    A column shows the most significant state found anywhere in its slice (present, then
    partial, zero, unmapped, absent), so a few sectors on a large disk still show.
    """
    codes = np.full(width, _STATES.index(ABSENT), np.uint8)
    decided = np.zeros(width, bool)
    scale = width / max(size, 1)
    for kind in _PRIORITY:
        hit = np.zeros(width + 1, np.int64)
        for r in ranges:
            if r.state == kind:
                hit[min(width - 1, int(r.start * scale))] += 1
                hit[min(width - 1, int((r.end - 1) * scale)) + 1] -= 1
        covered = np.cumsum(hit)[:width] > 0
        codes[covered & ~decided] = _STATES.index(kind)
        decided |= covered
    return codes


def _runs(codes: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(start, length, code)`` of each run of equal values of ``codes``."""
    edges = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(codes)]))
    for a, b in zip(starts.tolist(), ends.tolist()):
        yield a, b - a, int(codes[a])


def drawing(layers: list[tuple[str, list[Range], int]], width: int = 1024, band: int = 24) -> Drawing:
    """Lay out the picture of ``layers`` (label, ranges, virtual size), leaf first.

    Left: each layer's label; then one band per layer, ``width`` pixels for the whole virtual
    disk; under the bands an axis with offsets in bytes, then a legend of the colours.
    """
    labels = [short_label(name) for name, _, _ in layers]
    x0 = PAD + CHAR_W * max([len("offset"), *map(len, labels)]) + PAD
    bottom = PAD + len(layers) * (band + GAP) - GAP
    axis_y = bottom + 4
    legend_y = axis_y + 10 + CHAR_H + 14
    d = Drawing(x0 + width + PAD, legend_y + CHAR_H + PAD)
    for i, (label, (_, ranges, size)) in enumerate(zip(labels, layers)):
        top = PAD + i * (band + GAP)
        d.texts.append(Text(PAD, top + (band - CHAR_H) // 2, label))
        for start, length, code in _runs(band_codes(ranges, size, width)):
            d.rects.append((x0 + start, top, length, band, COLOURS[_STATES[code]]))
    _axis(d, x0, width, axis_y, max((size for _, _, size in layers), default=0))
    _legend(d, x0, legend_y)
    return d


def _axis(d: Drawing, x0: int, width: int, y: int, size: int) -> None:
    """A line under the bands with five ticks labelled with their offset in the virtual disk."""
    d.rects.append((x0, y, width, SCALE, INK))
    d.texts.append(Text(PAD, y + 10, "offset"))
    for k in range(5):
        x = x0 + min(width - SCALE, k * width // 4)
        d.rects.append((x, y, SCALE, 6, INK))
        anchor = "start" if k == 0 else "end" if k == 4 else "middle"
        d.texts.append(Text(x0 + k * width // 4, y + 10, axis_label(size * k / 4), anchor))


def _legend(d: Drawing, x: int, y: int) -> None:
    """A swatch and a name for every state's colour."""
    for state, colour in COLOURS.items():
        d.rects.append((x, y, CHAR_H, CHAR_H, INK))
        d.rects.append((x + 1, y + 1, CHAR_H - 2, CHAR_H - 2, colour))
        d.texts.append(Text(x + CHAR_H + 6, y, state))
        x += CHAR_H + 6 + CHAR_W * len(state) + 3 * CHAR_W


def _png(width: int, height: int, pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (height, width, 3)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, 3 * width)], axis=1).tobytes()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def render_png(layers: list[tuple[str, list[Range], int]], width: int = 1024, band: int = 24) -> bytes:
    """The picture of :func:`drawing` as PNG bytes."""
    d = drawing(layers, width, band)
    pixels = np.full((d.height, d.width, 3), 255, np.uint8)
    for x, y, w, h, colour in d.rects:
        pixels[y:y + h, x:x + w] = colour
    for t in d.texts:
        mask = text_mask(t.text).repeat(SCALE, axis=0).repeat(SCALE, axis=1)
        x = max(0, t.left)
        mask = mask[:, :max(0, d.width - x)]
        pixels[t.y:t.y + mask.shape[0], x:x + mask.shape[1]][mask] = INK
    return _png(d.width, d.height, pixels)


def render_svg(layers: list[tuple[str, list[Range], int]], width: int = 1024, band: int = 24) -> bytes:
    """The picture of :func:`drawing` as an SVG document (UTF-8 bytes)."""
    d = drawing(layers, width, band)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{d.width}" height="{d.height}" '
           f'viewBox="0 0 {d.width} {d.height}" font-family="monospace" font-size="{CHAR_H}">',
           f'<rect x="0" y="0" width="{d.width}" height="{d.height}" fill="#ffffff"/>']
    for x, y, w, h, colour in d.rects:
        out.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="#{bytes(colour).hex()}"/>')
    for t in d.texts:
        out.append(f'<text x="{t.x}" y="{t.y + CHAR_H}" text-anchor="{t.anchor}">{escape(t.text)}</text>')
    out.append("</svg>\n")
    return "\n".join(out).encode("utf-8")


def write_picture(path: str, maps: list[LayerMap], disk: Disk, *, overwrite: bool = False,
                  kind: str = "png") -> None:
    """Draw ``maps`` into the file ``path`` as ``kind`` ``"png"`` or ``"svg"``.

    A file of ``disk``'s chain is refused; an existing file is replaced only with
    ``overwrite``. The picture appears under ``path`` complete, or not at all; a device or
    a pipe is written to.
    """
    refuse_chain_file(path, disk)
    if os.path.lexists(path) and not overwrite:
        raise DiskExistsError("the picture file exists; pass overwrite=True to replace it", path=path)
    layers = [(f"layer {m.layer}: {os.path.basename(m.image.path)}", m.ranges, m.image.size) for m in maps]
    data = render_svg(layers) if kind == "svg" else render_png(layers)
    try:
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            with open(path, "wb") as f:
                f.write(data)
            return
        with atomic_output(path, overwrite=overwrite) as out:
            out.write_at(data, 0)
    except VhdxError:
        raise
    except OSError as e:
        raise VhdxError(f"cannot write the picture: {e.strerror or e}", path=path) from e
