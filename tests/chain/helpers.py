"""Small helpers of the chain tests: deterministic data, a chain builder with a model, comparisons.

Every disk here is a few MiB of virtual size. A chain is built layer by layer: a layer is
written *before* it gets a child (writing to a disk rotates its DataWriteGuid and orphans
its children), and a ``bytearray`` model follows every write. ``ChainModel.frozen[i]`` is
what layer ``i`` reads once its child exists; ``ChainModel.owned[i]`` marks the sectors that
layer ``i`` itself defines (what it reads over a missing parent).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from support.chain import build_layers, data_write_guid
from support.cli import REPO, assert_one_line_error
from support.cli import run_subprocess as run_cli
from support.disk import MiB, assert_same, disk_bytes, pattern, read_all, write_all
from vhdx.file.image import Image

__all__ = ["REPO", "MiB", "ChainModel", "assert_one_line_error", "assert_same", "build_chain", "data_write_guid",
           "default_writes", "disk_bytes", "locator_of", "pattern", "read_all", "run_cli", "set_locator",
           "write_all"]


def sectors_touched(offset: int, length: int, sector_size: int) -> range:
    return range(offset // sector_size, -(-(offset + length) // sector_size))


@dataclass
class ChainModel:
    """A chain on disk and what it must read: ``paths`` base..leaf, ``model`` the leaf's bytes."""

    folder: Path
    size: int
    logical_sector_size: int
    paths: list[Path] = field(default_factory=list)
    model: bytearray = field(default_factory=bytearray)
    frozen: list[bytes] = field(default_factory=list)
    owned: list[set[int]] = field(default_factory=list)

    def write(self, disk: Any, offset: int, data: bytes) -> None:
        write_all(disk, offset, data)
        self.model[offset:offset + len(data)] = data
        self.owned[-1].update(sectors_touched(offset, len(data), self.logical_sector_size))

    def layer_bytes(self, index: int) -> bytes:
        """What layer ``index`` reads with its whole chain below it."""
        return self.frozen[index] if index < len(self.frozen) else bytes(self.model)

    def own_over(self, index: int, below: bytes | None = None) -> bytes:
        """Layer ``index``'s own sectors laid over ``below`` (zeros by default): what it reads
        when its parent is missing or replaced. Sectors a write only partly covered belong to
        the layer too (the rest of the sector was copied up from the parent at the time)."""
        want = bytearray(self.size if below is None else below)
        ss = self.logical_sector_size
        data = self.layer_bytes(index)
        for s in self.owned[index]:
            want[s * ss:(s + 1) * ss] = data[s * ss:(s + 1) * ss]
        return bytes(want)

    @property
    def leaf(self) -> Path:
        return self.paths[-1]


def build_chain(folder: Path, *, size: int, base_block_size: int = MiB, logical_sector_size: int = 512,
                physical_sector_size: int = 4096, fixed: bool = False,
                child_block_sizes: Sequence[int | None] = (None, None),
                writes: Sequence[Iterable[tuple[int, bytes]]] | None = None, base_name: str = "base.vhdx",
                use_snapshot: bool = True) -> ChainModel:
    """A base and ``len(child_block_sizes)`` children, each written with ``writes[i]``.

    With ``writes`` None, every layer gets a few unaligned writes (partial blocks included)
    from ``default_writes``. A child whose block size is None is made by ``vhdx.snapshot``
    (Hyper-V naming, default block size) when ``use_snapshot``; otherwise by ``vhdx.create``.
    """
    cm = ChainModel(folder, size, logical_sector_size, model=bytearray(size))
    layers = 1 + len(child_block_sizes)
    if writes is None:
        writes = [default_writes(size, base_block_size if i == 0 else (child_block_sizes[i - 1] or 2 * MiB),
                                 seed=1000 + i) for i in range(layers)]
    assert len(writes) == layers

    def fill(index: int, path: Path, disk: Any, model: bytearray) -> None:
        cm.owned.append(set())
        for offset, data in writes[index]:
            cm.write(disk, offset, data)

    built = build_layers(folder, size=size, block_sizes=[base_block_size, *child_block_sizes], fill=fill,
                         logical_sector_size=logical_sector_size, physical_sector_size=physical_sector_size,
                         fixed=fixed, snapshots=[bs is None and use_snapshot for bs in child_block_sizes],
                         base_name=base_name, model=cm.model)
    cm.paths = built.paths
    cm.frozen = built.contents[:-1]
    return cm


def default_writes(size: int, block_size: int, seed: int) -> list[tuple[int, bytes]]:
    """A few writes that cover the awkward cases: unaligned start and end, a write across a block
    boundary, a whole block, the tail of the disk, and a run of zeros (which must still hide the
    parent's bytes)."""
    rng = random.Random(seed)
    out: list[tuple[int, bytes]] = []
    out.append((rng.randrange(1, 4096), pattern(seed, rng.randrange(1, 9000))))
    boundary = min(block_size, size // 2)
    out.append((max(0, boundary - 777), pattern(seed + 1, 1500)))
    if block_size < size:
        k = rng.randrange(0, size // block_size)
        start = k * block_size
        out.append((start, pattern(seed + 2, min(block_size, size - start))))
    tail = rng.randrange(1, 5000)
    out.append((size - tail, pattern(seed + 3, tail)))
    zero_at = rng.randrange(0, size - 3000)
    out.append((zero_at, bytes(rng.randrange(1, 3000))))
    return out


def locator_of(path: Path | str) -> dict[str, str]:
    """The parent locator's key/value pairs of one file (its parents are not opened)."""
    image = Image.open(os.fspath(path), "r")
    try:
        return dict(image.info()["metadata"]["parent_locator"] or {})
    finally:
        image.close()


def set_locator(path: Path | str, pairs: dict[str, str]) -> None:
    """Replace a child's parent locator with ``pairs`` (in that order), as a Hyper-V host would
    have written it. Uses the library's own metadata writer; DataWriteGuid is left alone."""
    image = Image.open(os.fspath(path), "r+")
    try:
        image.write_parent_locator(pairs)
    finally:
        image.close()
