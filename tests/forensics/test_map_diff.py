"""`vhdx map` and `vhdx diff` against a model of what every layer wrote.

Chains of 2-4 layers (512 and 4096-byte sectors, 1-4 MiB blocks) are written with partial-block,
unaligned and whole-block writes, zero extents and ZERO/UNMAPPED block states; for every layer
``map --json`` must report exactly the sectors the layer holds, in sorted, non-overlapping,
merged ranges that cover the whole disk, and ``diff --json`` exactly the sectors a checkpoint
wrote. A hypothesis variant draws the chains (``VHDX_HYPOTHESIS_MAX`` examples, default 10).
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vhdx
from vhdx.format import constants as C

from support.forensic_chain import (CODE, MiB, BuiltChain, LayerSpec, Op, assert_sorted_disjoint, build,
                       describe_mismatch, paint, run_inprocess, run_subprocess)

TiB = 1 << 40
HYPOTHESIS_MAX = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "10"))
ZERO_STATE, UNMAPPED_STATE = C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED


def D(offset: int, length: int, seed: int = 0) -> Op:
    return Op("data", offset, length, seed or (offset * 7 + length))


def Z(offset: int, length: int) -> Op:
    return Op("zero", offset, length)


def S(block: int, state: int) -> Op:
    return Op("state", block, 0, state)


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------

def scenario_512() -> dict:
    size = 10 * MiB + 1536             # the last 1 MiB block and the last 2 MiB block are short
    return dict(size=size, sector_size=512, layers=[
        LayerSpec(1 * MiB, [D(100, 10), D(3 * MiB, MiB), D(size - 700, 700), S(5, ZERO_STATE),
                            S(6, UNMAPPED_STATE)]),
        LayerSpec(2 * MiB, [D(5000, 3000),                    # unaligned, inside a block: partial
                            D(4 * MiB, 2 * MiB),              # a whole block: present
                            Z(6 * MiB + 3 * 512, 10 * 512),   # zeros in part of a block: partial
                            Z(8 * MiB, 2 * MiB),              # zeros over a whole block: zero
                            S(1, UNMAPPED_STATE),             # unmapped
                            D(size - 1536, 1536)]),           # the whole short last block: present
        LayerSpec(1 * MiB, [D(MiB - 100, 200),                # unaligned across a block boundary
                            S(7, ZERO_STATE), D(7 * MiB + 4096, 512),   # data into a ZERO block
                            D(9 * MiB + 1, 1),                # one byte: one sector
                            D(2 * MiB + 512, 512 * 7)]),
    ])


def scenario_4096() -> dict:
    size = 12 * MiB + 8192
    return dict(size=size, sector_size=4096, layers=[
        LayerSpec(4 * MiB, [D(4097, 10), D(8 * MiB, 4 * MiB)]),
        LayerSpec(1 * MiB, [D(4 * MiB - 5, 10),                   # two sectors in two blocks
                            D(2 * MiB, MiB),                      # whole block
                            Z(5 * MiB, MiB),                      # whole block of zeros
                            Z(6 * MiB + 8192, 3 * 4096),
                            S(9, UNMAPPED_STATE),
                            D(size - 4096, 4096)]),               # last sector, short last block
        LayerSpec(2 * MiB, [D(123, 4096 * 3)]),                   # four sectors, unaligned
        LayerSpec(4 * MiB, [D(11 * MiB, 3 * 4096 + 1), S(1, ZERO_STATE), Z(8 * MiB, 8192)]),
    ])


def scenario_fixed_base() -> dict:
    return dict(size=6 * MiB, sector_size=512, fixed=True, layers=[
        LayerSpec(2 * MiB, [D(1000, 5000)]),
        LayerSpec(1 * MiB, [D(MiB + 77, 3000), Z(4 * MiB, MiB)]),
    ])


def scenario_untouched() -> dict:
    return dict(size=4 * MiB, sector_size=512, layers=[LayerSpec(1 * MiB), LayerSpec(2 * MiB),
                                                       LayerSpec(1 * MiB)])


SCENARIOS = {"512": scenario_512, "4096": scenario_4096, "fixed-base": scenario_fixed_base,
             "untouched": scenario_untouched}


def make(folder: Path, name: str) -> BuiltChain:
    spec = SCENARIOS[name]()
    return build(folder, size=spec["size"], sector_size=spec["sector_size"], layers=spec["layers"],
                 fixed=spec.get("fixed", False))


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def check_map_layer(chain: BuiltChain, layer: dict, index: int, what: str) -> None:
    """One layer of ``map --json`` against the model of ``chain.layers[index]``."""
    ss, size = chain.sector_size, chain.size
    model_layer = chain.layers[index]
    assert os.path.samefile(layer["path"], model_layer.path), f"{what}: path {layer['path']}"
    assert layer["virtual_size"] == size, what
    assert layer["sector_size"] == ss, what
    assert layer["disk_type"] == chain.disk_type(index), what
    ranges = layer["ranges"]
    assert_sorted_disjoint(ranges, what=what, size=size, merged=True)
    got = paint(ranges, size, ss, what=what)
    want = chain.expected_states(index)
    assert np.array_equal(got, want), f"{what}: {describe_mismatch(got, want, ss)}"
    totals: dict[str, int] = {}
    for r in ranges:
        totals[r["state"]] = totals.get(r["state"], 0) + r["length"]
    assert layer["totals"] == totals, f"{what}: totals {layer['totals']} but the ranges sum to {totals}"
    assert sum(layer["totals"].values()) == size, what
    if not model_layer.has_parent:
        assert CODE["partial"] not in got, f"{what}: a file without a parent shows partial sectors"
        if all(b in ("np", "full") for b in model_layer.blocks):
            # a dynamic base: written blocks present, never-written ones absent
            assert set(np.unique(got)) <= {CODE["present"], CODE["absent"]}, what


def check_diff(chain: BuiltChain, index: int, result: dict, what: str) -> None:
    ss, size = chain.sector_size, chain.size
    layer = chain.layers[index]
    assert result["sector_size"] == ss, what
    ranges = result["ranges"]
    assert_sorted_disjoint(ranges, what=what, merged=True)
    assert all(r["state"] != "absent" for r in ranges), f"{what}: diff lists absent ranges"
    got = paint(ranges, size, ss, what=what)
    changed = got != CODE["absent"]
    if layer.has_parent:
        assert np.array_equal(changed, layer.wrote), (
            f"{what}: diff and the sectors the checkpoint wrote differ: "
            f"{describe_mismatch(changed.astype(np.uint8), layer.wrote.astype(np.uint8), ss)}")
    want = chain.expected_states(index)
    assert np.array_equal(np.where(changed, got, CODE["absent"]), want), \
        f"{what}: {describe_mismatch(got, want, ss)}"
    total = sum(r["length"] for r in ranges)
    assert result["changed_bytes"] == total, what
    assert result["changed_sectors"] == total // ss == int(changed.sum()), what


def check_chain_maps(chain: BuiltChain, *, subprocess_too: bool = False) -> None:
    leaf = chain.leaf
    n = len(chain.layers)
    whole = run_inprocess("map", "--json", leaf).json()
    assert len(whole["layers"]) == n
    for k, layer in enumerate(whole["layers"]):
        assert layer["layer"] == k
        check_map_layer(chain, layer, n - 1 - k, f"map --json {leaf.name} layer {k}")
    for k in range(n):
        one = run_inprocess("map", "--json", "--layer", k, leaf).json()
        assert len(one["layers"]) == 1 and one["layers"][0]["layer"] == k
        assert one["layers"][0] == whole["layers"][k], f"map --layer {k} differs from the full map"
    for i, layer in enumerate(chain.layers):
        own = run_inprocess("map", "--json", "--layer", 0, layer.path).json()
        check_map_layer(chain, own["layers"][0], i, f"map --json {layer.path.name}")
        if layer.has_parent:
            check_diff(chain, i, run_inprocess("diff", "--json", layer.path).json(), f"diff {layer.path.name}")
    if subprocess_too:
        result = run_subprocess("map", "--json", leaf)
        assert result.returncode == 0, result.stderr
        import json
        assert json.loads(result.stdout)["layers"] == whole["layers"]
        result = run_subprocess("diff", "--json", leaf)
        assert result.returncode == 0, result.stderr
        check_diff(chain, n - 1, json.loads(result.stdout), "diff (subprocess)")


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_map_and_diff_match_the_model(tmp_path: Path, name: str) -> None:
    chain = make(tmp_path, name)
    check_chain_maps(chain, subprocess_too=name == "512")


def test_scenarios_reach_every_state(tmp_path: Path) -> None:
    """The fixed scenarios really exercise present, partial, absent, zero and unmapped."""
    seen: set[int] = set()
    for name in ("512", "4096"):
        chain = make(tmp_path / name, name)
        for i in range(len(chain.layers)):
            seen |= set(np.unique(chain.expected_states(i)).tolist())
    assert seen == set(CODE.values())


def test_diff_text_output_agrees_with_json(tmp_path: Path) -> None:
    chain = make(tmp_path, "512")
    for layer in chain.layers[1:]:
        as_json = run_inprocess("diff", "--json", layer.path).json()
        text = run_inprocess("diff", layer.path)
        assert text.returncode == 0, text.describe()
        lines = text.stdout.splitlines()
        assert f"{as_json['changed_sectors']} sectors" in lines[0]
        assert len(lines) == 1 + len(as_json["ranges"])
        for line, r in zip(lines[1:], as_json["ranges"]):
            assert f"sectors {r['first_sector']}..{r['first_sector'] + r['sectors'] - 1} " in line, line
            assert line.rstrip().endswith(r["state"]), line


def test_map_of_a_missing_layer_is_a_usage_error(tmp_path: Path) -> None:
    chain = make(tmp_path, "untouched")
    result = run_inprocess("map", "--json", "--layer", 3, chain.leaf)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error:") and "layer 3" in lines[0], result.stderr


# --- hypothesis ---------------------------------------------------------------------------------

@st.composite
def chains(draw: st.DrawFn) -> dict:
    ss = draw(st.sampled_from([512, 4096]))
    size = draw(st.integers(2 * MiB // ss, 9 * MiB // ss)) * ss
    nlayers = draw(st.integers(2, 4))
    layers = []
    for i in range(nlayers):
        bs = draw(st.sampled_from([1 * MiB, 2 * MiB, 4 * MiB]))
        nblocks = -(-size // bs)
        ops = []
        for _ in range(draw(st.integers(0 if i else 1, 4))):
            kind = draw(st.sampled_from(["data", "data", "data", "zero", "state"]))
            if kind == "state":
                ops.append(S(draw(st.integers(0, nblocks - 1)),
                             draw(st.sampled_from([ZERO_STATE, UNMAPPED_STATE]))))
                continue
            if kind == "zero":
                s0 = draw(st.integers(0, size // ss - 1))
                count = draw(st.integers(1, min(size // ss - s0, 2 * bs // ss)))
                if draw(st.booleans()):          # often a whole block
                    block = draw(st.integers(0, nblocks - 1))
                    s0, count = block * bs // ss, (min(size, (block + 1) * bs) - block * bs) // ss
                ops.append(Z(s0 * ss, count * ss))
                continue
            offset = draw(st.integers(0, size - 1))
            length = draw(st.integers(1, min(size - offset, bs + bs // 2)))
            ops.append(D(offset, length, seed=draw(st.integers(1, 1 << 30))))
        layers.append(LayerSpec(bs, ops))
    return dict(size=size, sector_size=ss, layers=layers)


@settings(max_examples=HYPOTHESIS_MAX, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=chains())
def test_map_and_diff_match_the_model_hypothesis(spec: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-mapdiff-") as folder:
        chain = build(folder, size=spec["size"], sector_size=spec["sector_size"], layers=spec["layers"])
        check_chain_maps(chain)


# --- pictures -----------------------------------------------------------------------------------

def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    chunks = []
    at = 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, f"bad CRC in chunk {kind!r}"
        chunks.append((kind, body))
        at += 12 + length
    assert at == len(data), "trailing bytes after the last chunk"
    return chunks


def test_map_png_is_a_valid_picture_of_every_layer(tmp_path: Path) -> None:
    chain = make(tmp_path / "chain", "4096")
    picture = tmp_path / "map.png"
    result = run_inprocess("map", chain.leaf, "--png", picture)
    assert result.returncode == 0, result.describe()
    assert str(picture) in result.stdout
    chunks = _png_chunks(picture.read_bytes())
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height, depth, colour, _comp, _filter, _interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    layers = len(chain.layers)
    assert width > 0 and depth == 8 and colour == 2
    assert height >= layers, f"{layers} layers drawn in {height} rows"
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + 3 * width), "pixel data does not match IHDR width/height"
    rows = [raw[y * (1 + 3 * width) + 1:(y + 1) * (1 + 3 * width)] for y in range(height)]
    # every layer of this chain holds something and leaves something absent: no band is one colour
    band_rows = [row for row in rows if len(set(row[i:i + 3] for i in range(0, len(row), 3))) > 1]
    assert band_rows, "the picture is a single colour"

    # --layer N draws only that layer, and --json still prints JSON
    one = tmp_path / "one.png"
    result = run_inprocess("map", chain.leaf, "--layer", 1, "--json", "--png", one)
    assert result.returncode == 0, result.describe()
    assert result.json()["layers"][0]["layer"] == 1
    chunks = _png_chunks(one.read_bytes())
    w1, h1 = struct.unpack(">II", chunks[0][1][:8])
    assert w1 == width and 0 < h1 < height


# --- a 64 TiB disk ------------------------------------------------------------------------------

def test_map_of_a_64_tib_sparse_disk_is_fast_and_right(tmp_path: Path) -> None:
    path = tmp_path / "huge.vhdx"
    size = 64 * TiB
    with vhdx.create(path, size) as disk:
        bs = disk.block_size
        disk.seek(5 * TiB + 12345)
        disk.write(b"forensic" * 100)
        disk.seek(size - 512)
        disk.write(b"\xee" * 512)
    assert os.stat(path).st_blocks * 512 < 1 << 30
    start = time.monotonic()
    result = run_subprocess("map", "--json", path, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 20, f"vhdx map --json took {elapsed:.1f} s on a 64 TiB sparse disk"
    import json
    layer = json.loads(result.stdout)["layers"][0]
    assert layer["virtual_size"] == size
    ranges = layer["ranges"]
    assert_sorted_disjoint(ranges, what="64 TiB map", size=size, merged=True)
    first = (5 * TiB + 12345) // bs * bs
    assert [(r["start"], r["length"], r["state"]) for r in ranges] == [
        (0, first, "absent"), (first, bs, "present"), (first + bs, size - bs - first - bs, "absent"),
        (size - bs, bs, "present")]
    assert layer["totals"] == {"absent": size - 2 * bs, "present": 2 * bs}
    assert ranges[-1]["first_sector"] + ranges[-1]["sectors"] == size // 512

    start = time.monotonic()
    diff = run_inprocess("diff", "--json", path).json()
    assert time.monotonic() - start < 20
    assert [(r["start"], r["length"]) for r in diff["ranges"]] == [(first, bs), (size - bs, bs)]


@pytest.mark.parametrize("which", ["the-file-mapped", "its-parent"])
def test_map_png_never_overwrites_a_file_of_the_chain(tmp_path: Path, which: str) -> None:
    """``map DISK --png DISK`` is a slip of the finger that must not destroy the evidence."""
    chain = make(tmp_path, "untouched")
    target = chain.leaf if which == "the-file-mapped" else chain.layers[-2].path
    before = {p: p.read_bytes() for p in chain.paths}
    result = run_inprocess("map", chain.leaf, "--png", target)
    changed = [p.name for p in chain.paths if p.read_bytes() != before[p]]
    assert not changed, f"map --png {which} overwrote {changed} (exit {result.returncode})"
    assert result.returncode != 0, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), result.stderr
