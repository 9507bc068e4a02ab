"""Merge against a byte model: random chains, merged from the leaf into a random ancestor.

A chain of 2-5 layers is built with random geometry (base block 1-8 MiB, fixed or dynamic; child
blocks 1-8 MiB, sometimes 32 or 256 MiB; 512- or 4096-byte sectors; a virtual size that is never a multiple of the block
size) and random writes (whole blocks, aligned partial runs, unaligned pieces, block-crossing
writes; a few blocks of some layers put into ZERO/UNMAPPED/UNDEFINED). The flattened content
never changes under a merge, so afterwards the destination must read exactly what the leaf read,
pass ``vhdx check``, carry a new DataWriteGuid, and satisfy the independent readers:
``qemu-img check``/``convert`` (non-differencing destinations with 512-byte sectors) and libvhdi
(every destination; parents attached with ``set_parent``). Optionally a second round snapshots the
destination, writes again and merges again (a merged disk must be a normal parent).

Example count: ``VHDX_HYPOTHESIS_MAX`` (default 10).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import vhdx
from vhdx.errors import MergeError
from vhdx.format import constants as C

from support.merging import (MiB, LayerSpec, MergeResult, assert_same, build_chain, chain_paths, check_errors, cli,
                       data_write_guid, first_difference, folder_hashes, libvhdi_blind_spots, libvhdi_read, merge,
                       qemu_check_and_convert, read_disk, standard_writes)

MAX_EXAMPLES = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "10"))
BLOCKS = [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB]
# Now and then a block far bigger than the disk (the plan's window grows to hold it).
CHILD_BLOCKS = BLOCKS * 4 + [32 * MiB, 256 * MiB]
ZERO_STATES = [C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED, C.PAYLOAD_BLOCK_UNDEFINED]


@dataclass
class Scenario:
    logical_sector_size: int
    base_block: int
    base_fixed: bool
    child_blocks: list[int]
    size: int
    writes_per_layer: list[int]
    zero_blocks: list[list[tuple[int, int]]]   # per layer: (block, state)
    seed: int
    depth: int                 # 1: into the parent, 2: the grandparent, ...
    into_none: bool            # depth 1 only: call merge(child) without ``into``
    keep: bool
    second_round: bool = False
    second_block: int = MiB
    second_depth: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def layers(self) -> int:
        return 1 + len(self.child_blocks)


@st.composite
def scenarios(draw) -> Scenario:
    lss = draw(st.sampled_from([512, 4096]))
    base_block = draw(st.sampled_from(BLOCKS))
    children = draw(st.lists(st.sampled_from(CHILD_BLOCKS), min_size=1, max_size=4))
    size = draw(st.integers(2, 6)) * MiB + draw(st.integers(1, MiB // lss - 1)) * lss
    n = 1 + len(children)
    writes = [draw(st.integers(0, 6)) for _ in range(n)]
    zeros = [draw(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(ZERO_STATES)), max_size=2))
             for _ in range(n)]
    depth = draw(st.integers(1, len(children)))
    return Scenario(
        logical_sector_size=lss, base_block=base_block, base_fixed=draw(st.booleans()),
        child_blocks=children, size=size, writes_per_layer=writes, zero_blocks=zeros,
        seed=draw(st.integers(0, 2 ** 32 - 1)), depth=depth,
        into_none=depth == 1 and draw(st.booleans()), keep=draw(st.booleans()),
        second_round=draw(st.booleans()), second_block=draw(st.sampled_from(BLOCKS)),
        second_depth=draw(st.integers(1, 3)))


def build(folder: Path, sc: Scenario):
    rng = np.random.default_rng(sc.seed)
    specs = []
    for i, bs in enumerate([sc.base_block] + sc.child_blocks):
        specs.append(LayerSpec(bs, standard_writes(rng, sc.size, bs, sc.logical_sector_size,
                                                   sc.writes_per_layer[i]), sc.zero_blocks[i]))
    return build_chain(folder, size=sc.size, logical_sector_size=sc.logical_sector_size,
                       base_fixed=sc.base_fixed, layers=specs), rng


def judge_destination(dest: str, model: bytes, sc: Scenario, interop_tool, scratch: Path) -> None:
    """Our reader, vhdx check, and the independent readers agree with the model."""
    assert_same(read_disk(dest), model, f"{os.path.basename(dest)} read through vhdx after the merge")
    assert check_errors(dest) == [], f"vhdx check of {dest}"
    rc, text = cli("check", dest)
    assert rc == 0, f"vhdx check {dest} exit {rc}:\n{text}"
    assert "was interrupted" not in text, text
    dest_img = vhdx.open(dest)
    try:
        differencing = dest_img.image.has_parent
    finally:
        dest_img.close()
    if not differencing and sc.logical_sector_size == 512:
        interop_tool("qemu-img")
        qrc, qtext, raw = qemu_check_and_convert(dest, str(scratch / "dest.raw"))
        assert qrc == 0, f"qemu-img check {dest}: exit {qrc}\n{qtext}"
        assert_same(raw, model, "qemu-img convert -O raw of the destination")
    pyvhdi = interop_tool("pyvhdi")
    paths = chain_paths(dest)
    got = libvhdi_read(pyvhdi, paths, len(model))
    blind = libvhdi_blind_spots(paths, len(model))
    a = np.frombuffer(got, np.uint8)
    b = np.frombuffer(model, np.uint8)
    bad = np.flatnonzero((a != b) & ~blind)
    assert not len(bad), (f"libvhdi reads the destination differently: {len(bad)} bytes, first at 0x{bad[0]:x} "
                          f"(got 0x{a[bad[0]]:02x}, want 0x{b[bad[0]]:02x}); chain {paths}")


def merge_and_judge(leaf: str, paths: list[str], dest_index: int, model: bytes, sc: Scenario, *,
                    into_none: bool, keep: bool, interop_tool, scratch: Path,
                    expect_dependents: list[str] = ()) -> MergeResult:
    """Merge ``leaf`` (= paths[-1]) into paths[dest_index] and judge everything."""
    dest = paths[dest_index]
    sources = list(reversed(paths[dest_index + 1:]))        # leaf first, as the merge reports them
    folder = Path(dest).parent
    untouched = {Path(p).name for p in paths[:dest_index]}
    before = folder_hashes(folder)
    guid_before = data_write_guid(dest)
    assert_same(read_disk(leaf), model, "the leaf before the merge")

    plan = merge(leaf, None if into_none else dest, dry_run=True)
    assert folder_hashes(folder) == before, "a dry run changed a file"
    assert os.path.samefile(plan.destination, dest)
    assert [os.path.realpath(s) for s in plan.sources] == [os.path.realpath(s) for s in sources]

    if expect_dependents:
        with pytest.raises(MergeError) as info:
            merge(leaf, None if into_none else dest, keep=keep)
        for d in expect_dependents:
            assert os.path.basename(d) in str(info.value)
        assert folder_hashes(folder) == before, "a refused merge changed a file"

    result = merge(leaf, None if into_none else dest, keep=keep, force=bool(expect_dependents))
    assert isinstance(result, MergeResult)
    assert sorted(map(os.path.realpath, result.broken_dependents)) == \
        sorted(map(os.path.realpath, expect_dependents))
    if keep:
        assert result.deleted == []
        assert all(os.path.exists(s) for s in sources)
    else:
        assert sorted(map(os.path.realpath, result.deleted)) == sorted(map(os.path.realpath, sources))
        assert not any(os.path.exists(s) for s in sources), "a merged file was not deleted"
    assert result.bytes_copied == plan.bytes_to_copy
    guid_after = data_write_guid(dest)
    assert guid_after != guid_before, "the destination's DataWriteGuid did not change"
    assert guid_after == result.new_data_write_guid
    after = folder_hashes(folder)
    for name in untouched:
        assert after[name] == before[name], f"{name}, below the destination, changed"
    judge_destination(dest, model, sc, interop_tool, scratch)
    return result


def run_scenario(sc: Scenario, interop_tool) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-merge-model-") as tmp:
        tmp = Path(tmp)
        built, rng = build(tmp / "chain", sc)
        paths = built.paths
        dest_index = len(paths) - 1 - sc.depth
        model = built.models[-1]
        merge_and_judge(built.leaf, paths, dest_index, model, sc, into_none=sc.into_none, keep=sc.keep,
                        interop_tool=interop_tool, scratch=tmp)
        if not sc.second_round:
            return
        # Round 2: the merged disk is an ordinary parent again.
        dest = paths[dest_index]
        remaining = paths[:dest_index + 1]
        if sc.keep:
            # Kept files are invalid after the merge: the layer above let go of the destination,
            # so it neither opens over the merged data nor counts as one of its dependents.
            assert not vhdx.chain(paths[dest_index + 1]).complete
        kept_above: list[str] = []
        child = vhdx.snapshot(dest, block_size=sc.second_block)
        writes = standard_writes(rng, sc.size, sc.second_block, sc.logical_sector_size, 4)
        model2 = bytearray(model)
        with vhdx.open(child, "r+") as disk:
            for off, data in writes:
                disk.seek(off)
                disk.write(data)
                model2[off:off + len(data)] = data
        paths2 = remaining + [child]
        depth2 = min(sc.second_depth, len(paths2) - 1)
        merge_and_judge(child, paths2, len(paths2) - 1 - depth2, bytes(model2), sc, into_none=False, keep=False,
                        interop_tool=interop_tool, scratch=tmp, expect_dependents=kept_above)


EXAMPLES = [
    # 4096-byte sectors, differencing destination receiving partial blocks from smaller blocks.
    Scenario(4096, 2 * MiB, False, [8 * MiB, 1 * MiB, 2 * MiB], 5 * MiB + 3 * 4096, [3, 4, 5, 6],
             [[], [(1, C.PAYLOAD_BLOCK_ZERO)], [], [(4, C.PAYLOAD_BLOCK_UNMAPPED)]], seed=1, depth=2,
             into_none=False, keep=False, second_round=True, second_block=4 * MiB, second_depth=2),
    # Fixed 512 base with 8 MiB blocks, two 1 MiB children, merged all the way (qemu judges it).
    Scenario(512, 8 * MiB, True, [1 * MiB, 1 * MiB], 6 * MiB + 7 * 512, [4, 5, 5],
             [[], [(0, C.PAYLOAD_BLOCK_ZERO)], [(3, C.PAYLOAD_BLOCK_UNDEFINED)]], seed=2, depth=2,
             into_none=False, keep=True, second_round=True, second_block=2 * MiB, second_depth=1),
    # Dynamic 512 base, one child, merge(child) without ``into``.
    Scenario(512, 1 * MiB, False, [4 * MiB], 3 * MiB + 512, [2, 6], [[(2, C.PAYLOAD_BLOCK_ZERO)], []],
             seed=3, depth=1, into_none=True, keep=False),
]


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(sc=scenarios())
@example(sc=EXAMPLES[0])
@example(sc=EXAMPLES[1])
@example(sc=EXAMPLES[2])
def test_merge_matches_model(sc: Scenario, interop_tool) -> None:
    run_scenario(sc, interop_tool)


def test_merge_reports_what_it_copied(tmp_path) -> None:
    """bytes_copied / bytes_to_copy count exactly the sectors the sources define."""
    rng = np.random.default_rng(5)
    size = 6 * MiB + 512
    specs = [LayerSpec(1 * MiB, [(0, bytes(range(1, 256)) * 100)]),
             LayerSpec(2 * MiB, [(0, rng.integers(1, 256, 2 * MiB, dtype=np.uint8).tobytes()),
                                 (4 * MiB + 64 * 1024, b"\x07" * 64 * 1024)]),
             LayerSpec(1 * MiB, [(5 * MiB, b"\x09" * 4096), (1 * MiB, b"\x0a" * 512)])]
    built = build_chain(tmp_path, size=size, logical_sector_size=512, base_fixed=False, layers=specs)
    plan = merge(built.leaf, built.base, dry_run=True)
    # Layer 1: 2 MiB full block + 64 KiB; layer 2: 4 KiB + one sector inside layer 1's full block.
    assert plan.bytes_to_copy == 2 * MiB + 64 * 1024 + 4096, plan
    assert plan.bytes_of_zeros == 0
    result = merge(built.leaf, built.base)
    assert result.bytes_copied == plan.bytes_to_copy
    assert_same(read_disk(built.base), built.models[-1], "base after the merge")


def test_merge_of_a_non_differencing_disk_is_refused(tmp_path) -> None:
    path = tmp_path / "plain.vhdx"
    vhdx.create(str(path), 2 * MiB, block_size=MiB).close()
    before = folder_hashes(tmp_path)
    with pytest.raises(MergeError):
        merge(str(path))
    with pytest.raises(MergeError):
        merge(str(path), str(path))
    assert folder_hashes(tmp_path) == before


def test_into_must_be_an_ancestor(tmp_path) -> None:
    built = build_chain(tmp_path / "a", size=3 * MiB + 512, logical_sector_size=512, base_fixed=False,
                        layers=[LayerSpec(MiB, [(0, b"x" * 4096)]), LayerSpec(MiB, [(MiB, b"y" * 4096)])])
    other = tmp_path / "other.vhdx"
    vhdx.create(str(other), 3 * MiB + 512, block_size=MiB).close()
    before = folder_hashes(tmp_path / "a")
    for bad in (str(other), built.leaf, str(tmp_path / "missing.vhdx")):
        with pytest.raises(MergeError):
            merge(built.leaf, bad)
    assert folder_hashes(tmp_path / "a") == before
    assert first_difference(read_disk(built.leaf), built.models[-1]) == "equal"


# ------------------------------------------------------------------ windows, batches, bitmap chunks

def _region_model(layer_writes: list[list[tuple[int, bytes]]], lo: int, hi: int) -> bytes:
    """What [lo, hi) reads after every layer's writes, in order (the base reads zeros elsewhere)."""
    out = bytearray(hi - lo)
    for writes in layer_writes:
        for off, data in writes:
            a, b = max(lo, off), min(hi, off + len(data))
            if a < b:
                out[a - lo:b - lo] = data[a - off:b - off]
    return bytes(out)


def _read_region(path: str, lo: int, hi: int) -> bytes:
    with vhdx.open(path) as disk:
        return disk.pread(lo, hi - lo)


def _build_sparse_chain(folder: Path, size: int, lss: int, blocks: list[int], layer_writes) -> list[str]:
    paths = []
    for i, (bs, writes) in enumerate(zip(blocks, layer_writes)):
        if i == 0:
            disk = vhdx.create(str(folder / "base.vhdx"), size, block_size=bs, logical_sector_size=lss)
            path = str(folder / "base.vhdx")
        else:
            path = vhdx.snapshot(paths[-1], block_size=bs)
            disk = vhdx.open(path, "r+")
        with disk:
            for off, data in writes:
                disk.seek(off)
                disk.write(data)
        paths.append(path)
    return paths


@pytest.mark.parametrize("case", ["windows-and-batches", "bitmap-chunks"])
def test_merge_across_windows_and_chunks(case: str, tmp_path: Path) -> None:
    """The merge plans 64 MiB windows and copies 128 MiB batches; a differencing destination has
    one sector bitmap per chunk (4 GiB of 512-byte sectors). Writes straddle all those edges."""
    rng = np.random.default_rng(17)
    W = 64 * MiB
    if case == "windows-and-batches":
        lss, size = 512, 130 * MiB + 3 * 512
        blocks = [32 * MiB, 1 * MiB, 8 * MiB]
        layer_writes = [
            [(W - 5 * MiB, rand(rng, 10 * MiB))],
            [(0, rand(rng, size)), (2 * W - 700, rand(rng, 1500)), (size - 2 * lss, rand(rng, 2 * lss))],
            [(W - 3 * lss, rand(rng, 6 * lss)), (W + 8 * MiB - 1, rand(rng, 9 * MiB)),
             (2 * W, rand(rng, size - 2 * W))],
        ]
        into = 0
    else:
        lss, size = 512, 4 * 1024 * MiB + 3 * MiB + 512
        chunk = 4 * 1024 * MiB
        blocks = [32 * MiB, 1 * MiB, 2 * MiB]
        layer_writes = [
            [(chunk - MiB, rand(rng, 2 * MiB))],
            [(chunk - 2 * MiB + 4096, rand(rng, 8192)), (chunk + MiB, rand(rng, MiB))],
            [(chunk - 3 * lss, rand(rng, 7 * lss)), (chunk - MiB + 512, rand(rng, 64 * 1024)),
             (chunk + 2 * MiB + 100, rand(rng, 3000)), (size - lss, rand(rng, lss)), (W - 512, rand(rng, 1024))],
        ]
        into = 1   # a differencing destination: PARTIALLY_PRESENT blocks in two bitmap chunks
    paths = _build_sparse_chain(tmp_path, size, lss, blocks, layer_writes)
    regions = sorted({(max(0, off - 2 * MiB) // lss * lss, min(size, off + len(d) + 2 * MiB))
                      for ws in layer_writes for off, d in ws} | {(0, MiB), (size - MiB, size)})
    if case == "windows-and-batches":
        regions = [(0, size)]
    expected = {r: _region_model(layer_writes, *r) for r in regions}
    for r in regions:
        assert_same(_read_region(paths[-1], *r), expected[r], f"the leaf before the merge, {r}")
    result = merge(paths[-1], paths[into])
    assert not os.path.exists(paths[-1])
    for r in regions:
        assert_same(_read_region(paths[into], *r), expected[r], f"the destination after the merge, {r}")
    assert check_errors(paths[into]) == []
    if case == "windows-and-batches":
        assert result.bytes_copied > 128 * MiB  # more than one batch


def rand(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()
