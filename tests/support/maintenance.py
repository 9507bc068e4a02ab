"""Shared by the compact / resize / convert tests: random disks and chains with a byte model,
the judges (our reader, ``vhdx check``, qemu-img, libvhdi) and the file-size rule of compact.

Disks are small (at most 24 MiB of virtual size, 1-4 MiB blocks) so that hypothesis runs and
fault sweeps stay fast.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import vhdx
from support.chain import build_layers, check_problems
from support.disk import assert_same, disk_bytes, nonzero_pattern
from vhdx.file.image import Image
from vhdx.format import bat as batmod
from vhdx.format import layout


@dataclass
class ChainSpec:
    """A base disk and its children: geometry and what each layer writes (seeded)."""

    size: int
    block_sizes: list[int]          # base first; one entry per layer
    logical_sector_size: int = 512
    fixed: bool = False
    seed: int = 0
    zero_fraction: float = 0.4      # of the blocks a layer writes, the share written with zeros
    notes: list[str] = field(default_factory=list)


def fill_layer(spec: ChainSpec, index: int, disk: Any, model: bytearray) -> None:
    """Write whole blocks (data or zeros) and unaligned pieces into one layer, and the model."""
    rng = random.Random(spec.seed * 101 + index)
    bs, size, ss = disk.block_size, spec.size, spec.logical_sector_size
    blocks = -(-size // bs)
    for block in rng.sample(range(blocks), k=max(1, blocks // 2)):
        start = block * bs
        n = min(bs, size - start)
        data = bytes(n) if rng.random() < spec.zero_fraction else nonzero_pattern(rng.randrange(1 << 30), n)
        disk.pwrite(data, start)
        model[start:start + n] = data
    for _ in range(rng.randrange(0, 4)):
        length = rng.randrange(1, 3 * ss)
        offset = rng.randrange(0, size - length)
        data = nonzero_pattern(rng.randrange(1 << 30), length)
        disk.pwrite(data, offset)
        model[offset:offset + length] = data


def build_chain(folder: Path, spec: ChainSpec) -> tuple[list[Path], bytearray]:
    """Build the chain (base first) and return its paths and the model of the leaf."""
    model = bytearray(spec.size)
    layers = build_layers(folder, size=spec.size, block_sizes=spec.block_sizes,
                          fill=lambda i, _p, d, m: fill_layer(spec, i, d, m),
                          logical_sector_size=spec.logical_sector_size, fixed=spec.fixed, model=model)
    return layers.paths, model


def judge(path: Path, want: bytes | bytearray, what: str) -> None:
    """Our reader gives ``want`` and ``vhdx check`` finds no error in ``path``'s folder."""
    assert_same(disk_bytes(path), bytes(want), what)
    problems = check_problems(path.parent)
    assert not problems, f"{what}: vhdx check: {problems}"


def packed_size(path: Path) -> tuple[int, int]:
    """(the file's size, the bytes its structures and allocated blocks take)."""
    im = Image.open(str(path))
    try:
        spans = layout.structure_spans(im.header, im.region_table)
        placed = layout.allocations(im.bat, im.geometry, bitmaps=im.has_parent)  # from the whole BAT
        used = sum(s.end - s.start for s in spans) + int((placed.ends - placed.starts).sum())
        return im.storage.size(), used
    finally:
        im.close()


def qemu_raw(qemu_img: str, path: Path, out: Path) -> bytes:
    """``qemu-img check`` passes on ``path`` and ``qemu-img convert -O raw`` gives its bytes."""
    check = subprocess.run([qemu_img, "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, f"qemu-img check {path}: {check.stdout}{check.stderr}"
    conv = subprocess.run([qemu_img, "convert", "-f", "vhdx", "-O", "raw", str(path), str(out)],
                          capture_output=True, text=True)
    assert conv.returncode == 0, f"qemu-img convert {path}: {conv.stdout}{conv.stderr}"
    data = out.read_bytes()
    out.unlink()
    return data


def libvhdi_bytes(pyvhdi: Any, paths_leaf_first: Sequence[Path], size: int) -> bytes:
    """The whole disk as libvhdi reads it, parents attached."""
    handles = []
    try:
        for p in paths_leaf_first:
            f = pyvhdi.file()
            f.open(str(p))
            handles.append(f)
        for child, parent in zip(handles[:-1], handles[1:]):
            child.set_parent(parent)
        assert handles[0].media_size == size, f"libvhdi media_size {handles[0].media_size} != {size}"
        return handles[0].read_buffer_at_offset(size, 0)
    finally:
        for f in reversed(handles):
            f.close()


def allocated_blocks(path: Path) -> int:
    """Payload blocks of ``path`` that hold data (FULLY or PARTIALLY_PRESENT)."""
    im = Image.open(str(path))
    try:
        return int(batmod.holds_data(im.payload_states()).sum())
    finally:
        im.close()


def nonzero_blocks(model: bytes | bytearray, block_size: int) -> int:
    """Blocks of the model that hold a non-zero byte."""
    arr = np.frombuffer(bytes(model), dtype=np.uint8)
    pad = (-arr.size) % block_size
    if pad:
        arr = np.concatenate([arr, np.zeros(pad, np.uint8)])
    return int(arr.reshape(-1, block_size).any(axis=1).sum())


def leaf_first(paths: list[Path]) -> list[Path]:
    """The chain's paths, leaf first."""
    return list(reversed(paths))


def data_write_guid(path: Path) -> Any:
    """The DataWriteGuid of ``path``."""
    with vhdx.open(str(path), missing_parent="zeros") as d:
        return d.data_write_guid


def last_data(model: bytes | bytearray) -> int:
    """Just past the model's last non-zero byte (0 when it is all zeros)."""
    nz = np.flatnonzero(np.frombuffer(bytes(model), dtype=np.uint8))
    return int(nz[-1]) + 1 if nz.size else 0


def env_examples(default: int) -> int:
    """The hypothesis example count (``VHDX_HYPOTHESIS_MAX``, else ``default``)."""
    return int(os.environ.get("VHDX_HYPOTHESIS_MAX", str(default)))
