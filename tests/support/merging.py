"""Shared helpers of the merge tests: chains with a byte model, fault injection, judges.

A chain is built with the public API (``vhdx.create``, ``vhdx.snapshot``, ``vhdx.open(.., "r+")``),
each layer written *before* it is snapshotted (writing a layer later rotates its DataWriteGuid
and orphans its children). ``models[i]`` is what layer ``i`` reads through its parents, so a merge
of the leaf into any ancestor must leave that ancestor reading exactly ``models[-1]``.

:class:`FaultPlan` hands out :class:`FaultyStorage` wrappers (``merge_through(plan.wrap, ...)``)
that share one counter of mutating calls (write, truncate, flush) over every file the merge opens
for writing. At the ``fail_at``-th call the power is lost: that call fails, and so does every later
call on any of the files. With ``drop_unflushed`` the loss also drops a random subset of the 4 KiB
pages each file received since its last flush (a volatile disk cache).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import vhdx
import vhdx.ops.check
from support.chain import build_layers, check_errors, copy_folder, vhdx_files
from support.chain import check_problems as all_checks_pass
from support.chain import data_write_guid as chain_guid
from support.cli import REPO, cli_env, run_inprocess
from support.disk import MiB, assert_same, disk_bytes, first_difference, sha256_file, write_all
from support.faults import FaultPlan, FaultyStorage, PowerLoss, merge_through
from vhdx.format import bat as batmod
from vhdx.format import constants as C
from vhdx.file.image import Image
from vhdx.file.storage import Storage
from vhdx.ops.merge import run
from vhdx.ops.merge.plan import MergePlan

__all__ = ["REPO", "MiB", "FaultPlan", "FaultyStorage", "PowerLoss", "LayerSpec", "BuiltChain", "MergePlan",
           "MergeResult", "Wrapper", "all_checks_pass", "assert_same", "build_chain", "chain_paths",
           "check_errors", "cli", "copy_folder", "data_write_guid", "first_difference", "folder_hashes",
           "libvhdi_blind_spots", "libvhdi_read", "merge", "merge_through", "merging", "python_env", "python_exe",
           "qemu_check_and_convert", "rand_bytes", "read_disk", "sha256_file", "standard_writes", "vhdx_files"]

merging = run
merge = run.merge
MergeResult = run.MergeResult

ZERO_LIKE = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
             C.PAYLOAD_BLOCK_UNMAPPED_V095)


# ------------------------------------------------------------------------------ data

def rand_bytes(rng: np.random.Generator, n: int, *, zeros: bool = False) -> bytes:
    """``n`` random bytes, never 0 (so a lost write cannot pass for an unwritten sector)."""
    if zeros:
        return bytes(n)
    return rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()


read_disk = disk_bytes


def folder_hashes(folder: str | os.PathLike[str]) -> dict[str, str]:
    """name -> SHA-256 of every file of ``folder`` (the 'nothing changed' witness)."""
    folder = Path(folder)
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def data_write_guid(path: str | os.PathLike[str]) -> str:
    """The DataWriteGuid of one file, as text."""
    return str(chain_guid(path))


def cli(*args: str) -> tuple[int, str]:
    """``vhdx ARGS`` in-process; (exit code, stdout + stderr)."""
    result = run_inprocess(*args)
    return result.returncode, result.stdout + result.stderr


# ------------------------------------------------------------------------------ chains

@dataclass
class LayerSpec:
    """One layer: its block size, the writes it receives, blocks put into a zero-like state."""

    block_size: int
    writes: list[tuple[int, bytes]] = field(default_factory=list)
    zero_blocks: list[tuple[int, int]] = field(default_factory=list)  # (block, state)


@dataclass
class BuiltChain:
    paths: list[str]          # base first, leaf last
    models: list[bytes]       # what each layer reads through its parents
    size: int
    logical_sector_size: int
    base_fixed: bool
    specs: list[LayerSpec] = field(default_factory=list)

    @property
    def leaf(self) -> str:
        return self.paths[-1]

    @property
    def base(self) -> str:
        return self.paths[0]


def _apply_zero_states(image: Image, zero_blocks: list[tuple[int, int]], model: bytearray, size: int) -> None:
    """Put blocks that this layer does not hold into ZERO/UNMAPPED/UNDEFINED (they read as zeros)."""
    states = image.payload_states()
    bs = image.block_size
    updates = {}
    for block, state in zero_blocks:
        if block < len(states) and states[block] == C.PAYLOAD_BLOCK_NOT_PRESENT:
            updates[image.geometry.payload_bat_index(block)] = batmod.make_entry(state, 0)
            lo, hi = block * bs, min(size, (block + 1) * bs)
            model[lo:hi] = bytes(hi - lo)
    if updates:
        image.set_block_entries(updates)


def build_chain(folder: str | os.PathLike[str], *, size: int, logical_sector_size: int, base_fixed: bool,
                layers: Sequence[LayerSpec], base_name: str = "base.vhdx") -> BuiltChain:
    """Create ``layers[0]`` as the base and each further spec as a snapshot of the previous layer."""
    def fill(i: int, path: Path, disk: Any, model: bytearray) -> None:
        spec = layers[i]
        for offset, data in spec.writes:
            write_all(disk, offset, data)
            model[offset:offset + len(data)] = data
        if spec.zero_blocks and not (i == 0 and base_fixed):
            _apply_zero_states(disk.image, spec.zero_blocks, model, size)

    built = build_layers(folder, size=size, block_sizes=[spec.block_size for spec in layers], fill=fill,
                         logical_sector_size=logical_sector_size, fixed=base_fixed, base_name=base_name)
    return BuiltChain([str(p) for p in built.paths], built.contents, size, logical_sector_size, base_fixed,
                      list(layers))


def standard_writes(rng: np.random.Generator, size: int, block_size: int, sector: int,
                    count: int) -> list[tuple[int, bytes]]:
    """A mix of full blocks, aligned partial runs, unaligned pieces and block-crossing writes."""
    out = []
    blocks = -(-size // block_size)
    for _ in range(count):
        kind = int(rng.integers(0, 4))
        if kind == 0:      # a whole block (clipped at the end of the disk)
            b = int(rng.integers(0, blocks))
            lo, hi = b * block_size, min(size, (b + 1) * block_size)
        elif kind == 1:    # an aligned run of sectors
            n = int(rng.integers(1, max(2, min(block_size, 256 * 1024) // sector))) * sector
            lo = int(rng.integers(0, (size - n) // sector + 1)) * sector
            hi = lo + n
        elif kind == 2:    # unaligned, small
            n = int(rng.integers(1, 3 * sector))
            lo = int(rng.integers(0, size - n + 1))
            hi = lo + n
        else:              # across a block boundary
            b = int(rng.integers(1, blocks)) if blocks > 1 else 1
            lo = max(0, min(b * block_size, size) - int(rng.integers(1, 2 * sector + 1)) - 3)
            hi = min(size, lo + int(rng.integers(sector, 4 * sector)) + 7)
        if hi > lo:  # now and then zero bytes: data that happens to be zero is still data
            out.append((lo, rand_bytes(rng, hi - lo, zeros=bool(rng.random() < 0.1))))
    return out


# ------------------------------------------------------------------------------ faults

# ------------------------------------------------------------------------------ interop judges

def qemu_img() -> str | None:
    return shutil.which("qemu-img")


def qemu_check_and_convert(path: str, out_raw: str) -> tuple[int, str, bytes]:
    exe = qemu_img()
    assert exe
    r = subprocess.run([exe, "check", "-f", "vhdx", path], capture_output=True, text=True)
    c = subprocess.run([exe, "convert", "-f", "vhdx", "-O", "raw", path, out_raw], capture_output=True, text=True)
    if c.returncode:
        return r.returncode, r.stdout + r.stderr + c.stdout + c.stderr, b""
    data = Path(out_raw).read_bytes()
    os.unlink(out_raw)
    return r.returncode, r.stdout + r.stderr, data


def chain_paths(path: str) -> list[str]:
    """Leaf first: the files of ``path``'s chain as our resolver finds them."""
    return [layer.path for layer in vhdx.chain(path).layers]


def libvhdi_read(pyvhdi: Any, paths_leaf_first: Sequence[str], size: int) -> bytes:
    """Read the whole disk with libvhdi, parents attached with set_parent."""
    handles = []
    try:
        for p in paths_leaf_first:
            f = pyvhdi.file()
            f.open(p)
            handles.append(f)
        for child, parent in zip(reversed(handles[:-1]), reversed(handles[1:])):
            child.set_parent(parent)
        top = handles[0]
        assert top.media_size == size, f"libvhdi media_size {top.media_size} != {size}"
        return top.read_buffer_at_offset(size, 0)
    finally:
        for f in handles:
            try:
                f.close()
            except Exception:
                pass


def libvhdi_blind_spots(paths_leaf_first: Sequence[str], size: int) -> np.ndarray:
    """Bytes libvhdi reads differently by design or by known limitation, in differencing layers:

    * ZERO/UNMAPPED/UNDEFINED blocks: it falls through to the parent (docs/format.md §6, §11);
    * blocks that are not FULLY_PRESENT in a chunk whose sector bitmap is SB_BLOCK_NOT_PRESENT:
      it reads the bitmap at file offset 0 anyway (see tests/chain/test_libvhdi_chains.py).
    """
    mask = np.zeros(size, dtype=bool)
    for p in paths_leaf_first:
        im = Image.open(p, "r")
        try:
            if not im.has_parent:
                continue
            st = im.payload_states()
            bs = im.block_size
            ratio = im.geometry.chunk_ratio
            sbm = batmod.states(im.bat[batmod.sbm_indices(im.geometry)])
            blocks = np.arange(len(st))
            chunk = blocks // ratio
            no_sbm = np.array([c >= len(sbm) or sbm[c] != C.SB_BLOCK_PRESENT for c in chunk.tolist()], dtype=bool)
            blind = np.isin(st, ZERO_LIKE) | (no_sbm & (st != C.PAYLOAD_BLOCK_FULLY_PRESENT))
            for b in np.flatnonzero(blind).tolist():
                mask[b * bs:min(size, (b + 1) * bs)] = True
        finally:
            im.close()
    return mask


python_env = cli_env


def python_exe() -> str:
    return sys.executable


Wrapper = Callable[[Storage], Storage]
