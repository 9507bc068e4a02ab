"""Chains with a model of what every layer holds: the ground truth of the forensic tests.

A chain is built layer by layer (a layer is written *before* it gets a child: a write rotates
its DataWriteGuid and orphans its children). For every layer the model keeps

* ``contents[i]``: the bytes the disk reads as of layer ``i`` (through its parents);
* ``expected_states(i)``: the state ``vhdx map`` must report for every logical sector of the
  file of layer ``i`` alone, from a simulation of the BAT: a block is allocated FULLY_PRESENT
  when its first write covers it whole (or when the file has no parent), PARTIALLY_PRESENT
  otherwise; writing into a ZERO/UNMAPPED block allocates it whole; a zero extent over a whole
  NOT_PRESENT block of a child makes it ZERO;
* ``wrote[i]``: the sectors layer ``i`` wrote itself (an unaligned write widens to whole sectors).

Operations of a layer (``Op``):

* ``Op("data", offset, length, seed)``: ``Disk.write`` of pseudo-random bytes (any alignment);
* ``Op("zero", offset, length)``: ``Image.write_extents([(offset, length, None)])``, sector
  aligned: the library's "write zeros" primitive (used by merge);
* ``Op("state", block, 0, state)``: ``Image.set_block_entries`` puts a NOT_PRESENT block into
  ZERO / UNMAPPED (as Hyper-V leaves them after a trim).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from support.chain import build_layers
from support.cli import REPO, Result, cli_env, run_inprocess, run_subprocess
from support.disk import MiB, pattern, sha256, write_all
from vhdx.format import bat as batmod
from vhdx.format import constants as C

__all__ = ["CODE", "REPO", "STATES", "MiB", "BuiltChain", "Layer", "LayerSpec", "Op", "Result",
           "assert_sorted_disjoint", "build", "cli_env", "describe_mismatch", "paint", "pattern",
           "run_inprocess", "run_subprocess", "sha256"]

# map states, as codes in the per-sector arrays
STATES = ("present", "partial", "absent", "zero", "unmapped")
CODE = {name: i for i, name in enumerate(STATES)}

# simulated block states
NP, FULL, PART, ZERO, UNMAPPED = "np", "full", "partial", "zero", "unmapped"
_STATE_OPS = {C.PAYLOAD_BLOCK_ZERO: ZERO, C.PAYLOAD_BLOCK_UNMAPPED: UNMAPPED}


@dataclass(frozen=True)
class Op:
    kind: str          # "data", "zero", "state"
    offset: int        # bytes (data/zero) or block index (state)
    length: int = 0
    arg: int = 0       # seed (data) or BAT state (state)


@dataclass
class LayerSpec:
    block_size: int
    ops: Sequence[Op] = ()


@dataclass
class Layer:
    path: Path
    block_size: int
    has_parent: bool
    blocks: list[str]
    bits: np.ndarray          # per-sector bitmap bits (meaningful in PART blocks)
    wrote: np.ndarray         # per-sector: this layer defines it


@dataclass
class BuiltChain:
    folder: Path
    size: int
    sector_size: int
    layers: list[Layer] = field(default_factory=list)     # base first
    contents: list[bytes] = field(default_factory=list)   # as of each layer
    fixed: bool = False                                   # the base is a fixed disk

    def disk_type(self, index: int) -> str:
        return "differencing" if index else ("fixed" if self.fixed else "dynamic")

    @property
    def paths(self) -> list[Path]:
        return [layer.path for layer in self.layers]

    @property
    def leaf(self) -> Path:
        return self.layers[-1].path

    @property
    def sectors(self) -> int:
        return self.size // self.sector_size

    def expected_states(self, index: int) -> np.ndarray:
        """Per-sector map state codes of the file of layer ``index`` alone."""
        layer = self.layers[index]
        ss, bs = self.sector_size, layer.block_size
        per_block = bs // ss
        out = np.full(self.sectors, CODE["absent"], np.uint8)
        for block, state in enumerate(layer.blocks):
            lo, hi = block * per_block, min(self.sectors, (block + 1) * per_block)
            if state == FULL:
                out[lo:hi] = CODE["present"]
            elif state == ZERO:
                out[lo:hi] = CODE["zero"]
            elif state == UNMAPPED:
                out[lo:hi] = CODE["unmapped"]
            elif state == PART:
                assert layer.has_parent, "a file without a parent never gets partial blocks"
                out[lo:hi] = np.where(layer.bits[lo:hi], CODE["partial"], CODE["absent"])
        return out

    def own_over_zeros(self, index: int) -> bytes:
        """What layer ``index`` reads when its parent is missing (``--missing-parent zeros``)."""
        ss = self.sector_size
        mask = np.repeat(self.layers[index].wrote, ss)
        data = np.frombuffer(self.contents[index], np.uint8)
        return np.where(mask, data, 0).astype(np.uint8).tobytes()

    def layer_index_from_leaf(self, n: int) -> int:
        """``--layer n`` of the leaf is ``layers[len - 1 - n]``."""
        return len(self.layers) - 1 - n


def _apply(chain: BuiltChain, layer: Layer, model: bytearray, disk: Any, op: Op) -> None:
    ss, bs, size = chain.sector_size, layer.block_size, chain.size
    per_block = bs // ss
    if op.kind == "state":
        block = op.offset
        if block >= len(layer.blocks) or layer.blocks[block] != NP:
            return                                    # only NOT_PRESENT blocks are put into a state
        im = disk.image
        im.set_block_entries({int(im.bat_index(block)): batmod.make_entry(op.arg, 0)})
        layer.blocks[block] = _STATE_OPS[op.arg]
        lo, hi = block * bs, min(size, (block + 1) * bs)
        model[lo:hi] = bytes(hi - lo)
        layer.wrote[lo // ss:-(-hi // ss)] = True
        return
    offset, length = op.offset, op.length
    assert 0 <= offset and length > 0 and offset + length <= size
    if op.kind == "data":
        data = pattern(op.arg, length)
        write_all(disk, offset, data)
    elif op.kind == "zero":
        assert offset % ss == 0 and length % ss == 0, "zero extents are sector aligned"
        disk.image.write_extents([(offset, length, None)])
        data = bytes(length)
    else:
        raise ValueError(op.kind)
    s0, s1 = offset // ss, -(-(offset + length) // ss)       # widened to whole sectors
    for block in range(s0 // per_block, (s1 - 1) // per_block + 1):
        b_lo, b_hi = block * per_block, min(chain.sectors, (block + 1) * per_block)
        lo, hi = max(s0, b_lo), min(s1, b_hi)
        whole = lo == b_lo and hi == b_hi
        state = layer.blocks[block]
        if state in (FULL, PART):
            pass
        elif op.kind == "zero" and state != NP:
            continue                                  # ZERO/UNMAPPED already read as zeros
        elif op.kind == "zero" and not layer.has_parent:
            continue                                  # a NOT_PRESENT block of a base reads as zeros
        elif state in (ZERO, UNMAPPED):
            layer.blocks[block] = FULL                # allocated whole; the rest still reads zeros
        elif op.kind == "zero":                       # NOT_PRESENT in a child
            layer.blocks[block] = ZERO if whole else PART
        else:                                         # data into NOT_PRESENT
            layer.blocks[block] = FULL if (whole or not layer.has_parent) else PART
        if layer.blocks[block] == PART:
            layer.bits[lo:hi] = True
        layer.wrote[lo:hi] = True
    model[offset:offset + length] = data


def build(folder: str | os.PathLike[str], *, size: int, sector_size: int, layers: Sequence[LayerSpec],
          fixed: bool = False) -> BuiltChain:
    """Create ``layers[0]`` as a dynamic (or fixed) base and each further one as a snapshot."""
    chain = BuiltChain(Path(folder), size, sector_size, fixed=fixed)
    nsect = size // sector_size

    def fill(i: int, path: Path, disk: Any, model: bytearray) -> None:
        spec = layers[i]
        blocks = [FULL if fixed and i == 0 else NP] * -(-size // spec.block_size)
        layer = Layer(path, spec.block_size, i > 0, blocks, np.zeros(nsect, bool), np.zeros(nsect, bool))
        if fixed and i == 0:
            layer.wrote[:] = True
        chain.layers.append(layer)
        for op in spec.ops:
            _apply(chain, layer, model, disk, op)

    chain.contents = build_layers(folder, size=size, block_sizes=[spec.block_size for spec in layers], fill=fill,
                                  logical_sector_size=sector_size, fixed=fixed).contents
    return chain


# --------------------------------------------------------------------------------------------
# Range lists
# --------------------------------------------------------------------------------------------

def paint(ranges: list[dict[str, Any]], size: int, sector_size: int, *, fill: str = "absent",
          what: str = "ranges") -> np.ndarray:
    """Per-sector state codes from JSON ranges, checking each range's own consistency."""
    out = np.full(size // sector_size, CODE[fill], np.uint8)
    for r in ranges:
        assert r["state"] in CODE, f"{what}: unknown state in {r}"
        assert r["length"] > 0, f"{what}: empty range {r}"
        assert r["start"] % sector_size == 0 and r["length"] % sector_size == 0, \
            f"{what}: range not sector aligned: {r}"
        assert r["first_sector"] == r["start"] // sector_size, f"{what}: first_sector wrong in {r}"
        assert r["sectors"] == r["length"] // sector_size, f"{what}: sectors wrong in {r}"
        assert r["start"] + r["length"] <= size, f"{what}: range past the end of the disk: {r}"
        out[r["first_sector"]:r["first_sector"] + r["sectors"]] = CODE[r["state"]]
    return out


def assert_sorted_disjoint(ranges: list[dict[str, Any]], *, what: str, size: int | None = None,
                           merged: bool = True) -> None:
    """Sorted, non-overlapping; with ``size``: contiguous from 0 to ``size``; ``merged``: no two
    touching ranges of the same state."""
    end = 0
    prev = None
    for r in ranges:
        if size is not None:
            assert r["start"] == end, f"{what}: gap or overlap before {r} (previous ended at {end})"
        else:
            assert r["start"] >= end, f"{what}: not sorted / overlapping at {r} (previous ended at {end})"
        if merged and prev is not None and prev["state"] == r["state"]:
            assert prev["start"] + prev["length"] != r["start"], f"{what}: unmerged neighbours {prev} {r}"
        end = r["start"] + r["length"]
        prev = r
    if size is not None:
        assert end == size, f"{what}: ranges end at {end}, the disk at {size}"


def describe_mismatch(got: np.ndarray, want: np.ndarray, sector_size: int) -> str:
    bad = np.flatnonzero(got != want)
    if not len(bad):
        return "same"
    first = int(bad[0])
    return (f"{len(bad)} sectors differ; first at sector {first} (byte {first * sector_size}): "
            f"got {STATES[got[first]]}, want {STATES[want[first]]}; "
            f"differing sectors {int(bad[0])}..{int(bad[-1])}")
