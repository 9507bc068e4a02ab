"""Random differencing chains against a bytearray model.

A plan is drawn first: the base's geometry (fixed or dynamic, 1-8 MiB blocks, 512 or 4096
logical sectors, a size that is not a multiple of the block size), then 1-5 layers, each with
its own block size and one to three write sessions of unaligned writes. Every session is
closed and the chain reopened and read whole against the model. At the end every layer is
opened on its own (read-only) and must read exactly what the model held when it got its child.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import vhdx

from .helpers import MiB, assert_same, pattern, read_all, write_all

MAX_EXAMPLES = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "15"))
CHECKPOINT_NAME = re.compile(r"^.+_[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\.avhdx$")
BLOCK_SIZES = [1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB]


@dataclass(frozen=True)
class Write:
    offset: int
    length: int
    seed: int
    zeros: bool

    def data(self) -> bytes:
        return bytes(self.length) if self.zeros else pattern(self.seed, self.length)


@st.composite
def writes(draw: st.DrawFn, size: int, block_size: int, sector: int) -> Write:
    kind = draw(st.sampled_from(["unaligned", "sectors", "block", "tail", "tiny"]))
    if kind == "unaligned":
        offset = draw(st.integers(0, size - 1))
        length = draw(st.integers(1, min(size - offset, 3 * block_size // 2)))
    elif kind == "sectors":
        first = draw(st.integers(0, size // sector - 1))
        count = draw(st.integers(1, min(size // sector - first, 2 * block_size // sector)))
        offset, length = first * sector, count * sector
    elif kind == "block":
        block = draw(st.integers(0, (size - 1) // block_size))
        offset = block * block_size
        length = min(block_size, size - offset)
    elif kind == "tail":
        length = draw(st.integers(1, min(size, block_size + sector + 3)))
        offset = size - length
    else:  # a few bytes straddling a sector or block boundary
        boundary = draw(st.sampled_from([sector, block_size, size // 2 // sector * sector]))
        boundary = min(boundary, size - 1)
        offset = max(0, boundary - draw(st.integers(0, 7)))
        length = draw(st.integers(1, min(16, size - offset)))
    return Write(offset, length, draw(st.integers(0, 2**32)), draw(st.integers(0, 7)) == 0)


@dataclass(frozen=True)
class Plan:
    size: int
    logical_sector_size: int
    physical_sector_size: int
    fixed: bool
    # per layer (base first): block size (None: vhdx.snapshot's default) and write sessions
    layers: tuple[tuple[int | None, tuple[tuple[Write, ...], ...]], ...]


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    lss = draw(st.sampled_from([512, 4096]))
    pss = draw(st.sampled_from([lss, 4096]))
    fixed = draw(st.booleans())
    base_bs = draw(st.sampled_from(BLOCK_SIZES))
    size = draw(st.integers(max(1, MiB // lss // 2), (6 * MiB) // lss)) * lss
    if size % base_bs == 0:
        size += lss
    count = draw(st.integers(1, 5))
    layers = []
    for i in range(count):
        bs = base_bs if i == 0 else draw(st.sampled_from([None] + BLOCK_SIZES))
        effective = bs or 2 * MiB
        sessions = draw(st.lists(st.lists(writes(size, effective, lss), max_size=4).map(tuple),
                                 min_size=1, max_size=3).map(tuple))
        layers.append((bs, sessions))
    return Plan(size, lss, pss, fixed, tuple(layers))


@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
          phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain phase: it writes patches
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan=plans())
def test_random_chain_matches_model(plan: Plan) -> None:
    with tempfile.TemporaryDirectory(prefix="vhdx-chain-model-") as tmp:
        run_plan(Path(tmp), plan)


def run_plan(folder: Path, plan: Plan) -> None:
    model = bytearray(plan.size)
    paths: list[Path] = []
    frozen: list[bytes] = []
    stem = ""  # Hyper-V names a checkpoint after the original disk, even for checkpoints of checkpoints
    for depth, (block_size, sessions) in enumerate(plan.layers):
        if depth == 0:
            path = folder / "base.vhdx"
            stem = "base"
            disk = vhdx.create(path, plan.size, block_size=block_size,
                               logical_sector_size=plan.logical_sector_size,
                               physical_sector_size=plan.physical_sector_size, fixed=plan.fixed)
        else:
            frozen.append(bytes(model))  # the parent is frozen from now on
            parent = paths[-1]
            if block_size is None:
                path = Path(vhdx.snapshot(parent))
                assert path.parent == parent.parent, path
                assert CHECKPOINT_NAME.match(path.name) and path.name.startswith(stem + "_"), (stem, path)
                disk = vhdx.open(path, "r+")
            else:
                path = folder / f"layer{depth}.avhdx"
                stem = path.stem
                disk = vhdx.create(path, parent=parent, block_size=block_size)
            assert disk.disk_type == "differencing"
            assert disk.size == plan.size
            assert disk.logical_sector_size == plan.logical_sector_size
            assert disk.physical_sector_size == plan.physical_sector_size
            assert disk.parent is not None and os.path.samefile(disk.parent.path, parent)
        paths.append(path)
        for number, session in enumerate(sessions):
            if number:  # the first session writes through the handle create/snapshot gave us
                disk = vhdx.open(path, "r+")
            with disk:
                for w in session:
                    data = w.data()
                    write_all(disk, w.offset, data)
                    model[w.offset:w.offset + w.length] = data
            with vhdx.open(path) as reopened:
                chain = reopened.info().get("chain", [])
                if depth:
                    assert [os.path.realpath(layer["path"]) for layer in chain] == \
                        [os.path.realpath(p) for p in reversed(paths)]
                    assert all(layer["linkage"] in ("ok", "none") for layer in chain), chain
                assert_same(read_all(reopened), bytes(model),
                            f"layer {depth} after session {number} ({path.name})")
    frozen.append(bytes(model))
    # Every layer, opened on its own, still reads what it held when its child was made.
    for depth, (path, want) in enumerate(zip(paths, frozen)):
        with vhdx.open(path) as disk:
            assert_same(read_all(disk), want, f"layer {depth} ({path.name}) reopened at the end")
            # a few reads that straddle block and sector boundaries, through the positional API
            for offset in (1, plan.logical_sector_size - 1, MiB - 3, plan.size - 5):
                if 0 <= offset < plan.size:
                    disk.seek(offset)
                    assert disk.read(9) == want[offset:offset + 9], (depth, offset)
    chain = vhdx.chain(paths[-1])
    assert chain.complete
    assert [os.path.realpath(layer.path) for layer in chain.layers] == \
        [os.path.realpath(p) for p in reversed(paths)]
