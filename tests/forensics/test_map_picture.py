"""The map picture (issue 14, point 8): layers labelled, a legend of colours, an axis in bytes,
as a PNG (``--png``) and as an SVG (``--svg``)."""

from __future__ import annotations

import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

import vhdx

from support.forensic_chain import MiB, run_inprocess

STATES = ("present", "partial", "zero", "unmapped", "absent")
BYTES = re.compile(r"^\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)$")


@pytest.fixture()
def chain(tmp_path: Path) -> list[Path]:
    """base.vhdx <- mid.avhdx <- leaf.avhdx, 64 MiB, each layer with some data."""
    base, mid, leaf = tmp_path / "base.vhdx", tmp_path / "mid.avhdx", tmp_path / "leaf.avhdx"
    with vhdx.create(base, 64 * MiB) as disk:
        disk.write(b"b" * (8 * MiB))
    with vhdx.create(mid, parent=base) as disk:
        disk.seek(20 * MiB)
        disk.write(b"m" * (4 * MiB))
    with vhdx.create(leaf, parent=mid) as disk:
        disk.seek(40 * MiB)
        disk.write(b"l" * 4096)
    return [leaf, mid, base]


def decode_png(data: bytes) -> np.ndarray:
    """The pixels of an 8-bit RGB PNG without interlace, as an array (height, width, 3)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, header = 8, b"", b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour == 2
    raw = zlib.decompress(idat)
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any(), "only filter type 0 is expected"
    return rows[:, 1:].reshape(height, width, 3)


def bands(pixels: np.ndarray) -> list[tuple[int, int, int]]:
    """The layer bands: (first row, end row, first column) of each run of rows holding a long
    run of non-white, non-black colour (the bar of a layer)."""
    out: list[tuple[int, int, int]] = []
    for y, row in enumerate(pixels):
        coloured = ~(row == 255).all(axis=1) & (row.astype(int).sum(axis=1) > 200)
        if coloured.sum() < 400:
            continue
        x0 = int(np.argmax(coloured))
        if out and out[-1][1] == y:
            out[-1] = (out[-1][0], y + 1, out[-1][2])
        else:
            out.append((y, y + 1, x0))
    return out


def test_the_png_has_a_label_per_layer_an_axis_and_a_legend(chain: list[Path], tmp_path: Path) -> None:
    picture = tmp_path / "map.png"
    result = run_inprocess("map", chain[0], "--png", picture)
    assert result.returncode == 0, result.describe()
    pixels = decode_png(picture.read_bytes())
    found = bands(pixels)
    assert len(found) == 3, f"expected 3 layer bands, found {found}"
    for top, bottom, x0 in found:
        assert x0 > 40, f"the band at rows {top}..{bottom} starts at column {x0}: no room for a label"
        label = pixels[top:bottom, :x0]
        dark = (label.astype(int).sum(axis=2) < 200).sum()
        assert dark > 20, f"no label drawn left of the band at rows {top}..{bottom}"
    below = pixels[found[-1][1]:]
    dark_rows = (below.astype(int).sum(axis=2) < 200).any(axis=1).sum()
    assert dark_rows >= 14, "no axis labels or legend text under the bands"
    assert below.shape[0] > 40, "no room under the bands for an axis and a legend"


def test_the_svg_is_xml_with_layer_names_a_legend_and_an_axis_in_bytes(chain: list[Path], tmp_path: Path) -> None:
    picture = tmp_path / "map.svg"
    result = run_inprocess("map", chain[0], "--svg", picture)
    assert result.returncode == 0, result.describe()
    assert str(picture) in result.stdout
    root = ET.parse(picture).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    texts = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for path in chain:
        assert any(path.name in t for t in texts), f"{path.name} not labelled: {texts}"
    for state in STATES:
        assert state in texts, f"the legend lacks {state}: {texts}"
    axis = [t for t in texts if BYTES.match(t)]
    assert "0 B" in axis and "64 MiB" in axis and len(axis) >= 3, texts
    rects = list(root.iter("{http://www.w3.org/2000/svg}rect"))
    assert len({r.get("fill") for r in rects}) >= 5, "the bars and the legend should use the five colours"


def test_png_and_svg_together_and_force(chain: list[Path], tmp_path: Path) -> None:
    png, svg = tmp_path / "m.png", tmp_path / "m.svg"
    assert run_inprocess("map", chain[0], "--png", png, "--svg", svg).returncode == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and svg.read_text().lstrip().startswith("<?xml")
    again = run_inprocess("map", chain[0], "--svg", svg)
    assert again.returncode != 0 and "--force" in again.stderr
    assert run_inprocess("map", chain[0], "--svg", svg, "--force").returncode == 0
    refused = run_inprocess("map", chain[0], "--svg", chain[1], "--force")
    assert refused.returncode != 0
    with vhdx.open(chain[1]) as disk:  # the refused target is still a good disk
        assert disk.size == 64 * MiB
