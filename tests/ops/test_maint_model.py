"""compact, resize and convert against a byte model: random disks and chains (hypothesis).

Each example builds a chain of 1-3 layers (512- or 4096-byte sectors, 1-4 MiB blocks, a size
that is seldom a multiple of the block size, a base that is sometimes fixed), with whole blocks
written as data or as zeros and unaligned pieces. Then:

* compact (the leaf; the base of a chain with ``force``): every disk reads the model, ``vhdx
  check`` finds nothing, the file holds nothing but its structures and allocated blocks (base
  disks and 1 MiB-block children, where every hole fits a block), and the DataWriteGuid is kept;
* resize: grow (sometimes past the BAT region, which moves the BAT), then shrink to the minimum,
  which is the model's last non-zero byte rounded up to a sector;
* convert (dynamic or fixed, another block size): the result reads the model, holds exactly the
  model's non-zero blocks (dynamic), keeps the identity and the sector size.

The independent readers judge the results: ``qemu-img check`` and ``convert`` (512-byte sectors,
no parent) and libvhdi (every disk, parents attached). Example count: ``VHDX_HYPOTHESIS_MAX``
(default 8 each).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vhdx
from support.chain import check_problems
from support.disk import MiB, assert_same, disk_bytes, nonzero_pattern
from vhdx.file.image import Image
from vhdx.ops import convert as convert_module

from support.maintenance import (ChainSpec, allocated_blocks, build_chain, data_write_guid, env_examples, judge, last_data,
                       leaf_first, libvhdi_bytes, nonzero_blocks, packed_size, qemu_raw)

EXAMPLES = env_examples(8)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def chains(draw: st.DrawFn, max_layers: int = 3) -> ChainSpec:
    lss = draw(st.sampled_from([512, 4096]))
    layers = draw(st.integers(1, max_layers))
    block_sizes = [draw(st.sampled_from([MiB, 2 * MiB, 4 * MiB])) for _ in range(layers)]
    size = draw(st.integers(6, 20)) * MiB + draw(st.sampled_from([0, 1, 7])) * lss
    return ChainSpec(size=size, block_sizes=block_sizes, logical_sector_size=lss,
                     fixed=draw(st.booleans()), seed=draw(st.integers(0, 10_000)),
                     zero_fraction=draw(st.sampled_from([0.2, 0.5, 0.8])))


def peers(interop_tool, paths_leaf_first: list[Path], model: bytes, lss: int, scratch: Path) -> None:
    """qemu-img (no parent, 512-byte sectors) and libvhdi read ``model``."""
    if len(paths_leaf_first) == 1 and lss == 512:
        assert_same(qemu_raw(interop_tool("qemu-img"), paths_leaf_first[0], scratch / "q.raw"), model, "qemu-img")
    got = libvhdi_bytes(interop_tool("pyvhdi"), paths_leaf_first, len(model))
    assert_same(got, model, "libvhdi")


@SETTINGS
@given(spec=chains())
def test_compact_keeps_the_content_and_packs_the_file(spec: ChainSpec, interop_tool) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        folder = Path(tmp)
        paths, model = build_chain(folder, spec)
        contents = {p: disk_bytes(p) for p in paths}
        target = paths[-1] if len(paths) == 1 or spec.seed % 2 else paths[0]
        if spec.fixed and target == paths[0]:
            with pytest.raises(vhdx.UsageError, match="fixed"):
                vhdx.compact(target, force=True)
            if len(paths) == 1:
                return
            target = paths[-1]
        guid = data_write_guid(target)
        result = vhdx.compact(target, force=True)
        assert result.size_after <= result.size_before
        assert data_write_guid(target) == guid, "compact must keep the DataWriteGuid (children stay linked)"
        for p in paths:
            judge(p, contents[p], f"{p.name} after compacting {target.name}")
        again = vhdx.compact(target, force=True)
        assert again.zero_blocks == 0 and again.moved_blocks == 0 and again.bytes_reclaimed == 0
        if target == paths[0] or spec.block_sizes[-1] == MiB:
            size, used = packed_size(target)
            assert size == used, f"{target.name}: {size} bytes, but structures and blocks take {used}"
        peers(interop_tool, leaf_first(paths), bytes(model), spec.logical_sector_size, folder)


@SETTINGS
@given(spec=chains(max_layers=2), grow_to=st.sampled_from([1, 3, 0]))
def test_resize_grows_and_shrinks_to_the_minimum(spec: ChainSpec, grow_to: int, interop_tool) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        folder = Path(tmp)
        paths, model = build_chain(folder, spec)
        leaf = paths[-1]
        lss = spec.logical_sector_size
        # 0: 140,000 blocks, more than a 1 MiB BAT region holds: the BAT moves to the end
        bigger = spec.size + grow_to * MiB + lss if grow_to else 140_000 * spec.block_sizes[-1] + lss
        result = vhdx.resize(leaf, bigger)
        assert result.old_size == spec.size and result.new_size == bigger
        assert result.bat_moved == (grow_to == 0)
        grown = bytes(model) + bytes(min(bigger, spec.size + 4 * MiB) - spec.size)   # the head of it
        if bigger <= 64 * MiB:
            judge(leaf, grown, "after growing")
        else:
            assert_same(_read(leaf, 0, spec.size + MiB), grown[:spec.size + MiB], "after growing (head)")
            assert _read(leaf, bigger - MiB, MiB) == bytes(MiB), "after growing: the end reads zeros"
            assert not check_problems(folder)
        minimum = vhdx.minimum_size(leaf)
        assert minimum == max(lss, -(-last_data(model) // lss) * lss)
        vhdx.resize(leaf, minimum)
        judge(leaf, bytes(model[:minimum]), "after shrinking to the minimum")
        if len(paths) == 1 and not spec.fixed:
            vhdx.compact(leaf)             # the BAT a big grow moved to the end comes back down too
            size, used = packed_size(leaf)
            assert size == used, f"after compact: {size} bytes, {used} in use"
            judge(leaf, bytes(model[:minimum]), "compacted after shrinking")
        peers(interop_tool, leaf_first(paths), bytes(model[:minimum]), lss, folder)


def _read(path: Path, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    with vhdx.open(path) as d:
        d.pread_into(memoryview(buf), offset)
    return bytes(buf)


@SETTINGS
@given(spec=chains(), fixed=st.booleans(), block=st.sampled_from([None, MiB, 8 * MiB]), new_id=st.booleans())
def test_convert_gives_a_standalone_disk_reading_the_model(spec: ChainSpec, fixed: bool, block: int | None,
                                                          new_id: bool, interop_tool) -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        folder = Path(tmp)
        paths, model = build_chain(folder, spec)
        out_dir = folder / "out"
        out_dir.mkdir()
        out = out_dir / "converted.vhdx"
        before = {p: p.read_bytes() for p in paths}
        result = vhdx.convert(paths[-1], out, disk_type="fixed" if fixed else "dynamic", block_size=block,
                              new_id=new_id, sha256=True)
        assert {p: p.read_bytes() for p in paths} == before, "the source changed"
        assert result.sha256 == vhdx.hash(paths[-1])
        judge(out, model, "converted")
        with vhdx.open(out) as d, vhdx.open(paths[-1]) as src:
            assert d.logical_sector_size == spec.logical_sector_size
            assert (d.disk_id == src.disk_id) != new_id
            assert d.disk_type == ("fixed" if fixed else "dynamic")
            assert d.block_size == (block or spec.block_sizes[0])
        if not fixed:
            assert allocated_blocks(out) == nonzero_blocks(model, block or spec.block_sizes[0])
        peers(interop_tool, [out], bytes(model), spec.logical_sector_size, out_dir)


def test_convert_from_raw_keeps_holes_and_pads_to_a_sector(tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    data = bytearray(5 * MiB + 100)
    data[MiB:MiB + 10] = b"0123456789"
    data[-1] = 7
    raw.write_bytes(data)
    result = vhdx.convert(raw, tmp_path / "d.vhdx", source_format="raw", block_size=MiB, sha256=True)
    want = bytes(data) + bytes(-len(data) % 512)
    assert result.size == len(want)
    assert_same(disk_bytes(tmp_path / "d.vhdx"), want, "raw converted")
    assert allocated_blocks(tmp_path / "d.vhdx") == 2
    assert result.sha256 == hashlib.sha256(want).hexdigest()


@pytest.mark.parametrize("verb", ["compact", "resize"])
def test_a_disk_with_children_is_refused_unless_forced(tmp_path: Path, verb: str) -> None:
    paths, _model = build_chain(tmp_path, ChainSpec(size=8 * MiB, block_sizes=[MiB, MiB]))
    base = paths[0]
    before = base.read_bytes()
    with pytest.raises(vhdx.ChainError, match="depend on it"):
        vhdx.compact(base) if verb == "compact" else vhdx.resize(base, 16 * MiB)
    assert base.read_bytes() == before


def test_shrinking_below_the_data_needs_allow_data_loss(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, ChainSpec(size=8 * MiB, block_sizes=[MiB], zero_fraction=0.0, seed=3))
    disk = paths[0]
    minimum = vhdx.minimum_size(disk)
    with pytest.raises(vhdx.UsageError, match="cut data"):
        vhdx.resize(disk, minimum - 512)
    vhdx.resize(disk, 3 * MiB + 512, allow_data_loss=True)
    judge(disk, model[:3 * MiB + 512], "cut")
    vhdx.resize(disk, 8 * MiB)   # the cut part comes back as zeros, not as the old data
    judge(disk, bytes(model[:3 * MiB + 512]) + bytes(8 * MiB - 3 * MiB - 512), "grown again")


def test_a_fixed_disk_grows_with_its_blocks_allocated(tmp_path: Path) -> None:
    paths, model = build_chain(tmp_path, ChainSpec(size=6 * MiB + 512, block_sizes=[2 * MiB], fixed=True))
    vhdx.resize(paths[0], 12 * MiB)
    judge(paths[0], bytes(model) + bytes(12 * MiB - len(model)), "fixed grown")
    with vhdx.open(paths[0]) as d:
        assert d.disk_type == "fixed"
    assert allocated_blocks(paths[0]) == 6
    with pytest.raises(vhdx.UsageError, match="fixed"):
        vhdx.compact(paths[0])


def test_a_failed_write_leaves_no_output_and_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"".join(nonzero_pattern(i, MiB) + bytes(MiB) for i in range(8)))
    calls = []
    real = Image.write_extents

    def failing(self, extents, **kw):
        calls.append(len(extents))
        if len(calls) == 2:
            raise vhdx.VhdxError("disk full (simulated)", path=self.path)
        return real(self, extents, **kw)

    monkeypatch.setattr(Image, "write_extents", failing)
    monkeypatch.setattr(convert_module, "KERNEL_BATCH_BYTES", 2 * MiB)
    with pytest.raises(vhdx.VhdxError, match="simulated"):
        vhdx.convert(raw, tmp_path / "out.vhdx", source_format="raw", block_size=MiB)
    assert len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == ["disk.img"]
