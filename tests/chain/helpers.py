"""Small helpers of the chain tests: deterministic data, a chain builder with a model, comparisons.

Every disk here is a few MiB of virtual size. A chain is built layer by layer: a layer is
written *before* it gets a child (writing to a disk rotates its DataWriteGuid and orphans
its children), and a ``bytearray`` model follows every write. ``ChainModel.frozen[i]`` is
what layer ``i`` reads once its child exists; ``ChainModel.owned[i]`` marks the sectors that
layer ``i`` itself defines (what it reads over a missing parent).
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import vhdx

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def pattern(seed: int, length: int) -> bytes:
    """``length`` pseudo-random bytes, the same for the same seed."""
    return random.Random(seed).randbytes(length)


def write_all(disk: Any, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset``, looping over short writes (RawIOBase)."""
    disk.seek(offset)
    view = memoryview(data)
    while view:
        count = disk.write(view)
        assert count, f"write at {offset} returned {count!r}"
        view = view[count:]


def read_all(disk: Any) -> bytes:
    """Every byte of the virtual disk through ``readinto`` (short reads allowed)."""
    size = disk.size
    buffer = bytearray(size)
    view = memoryview(buffer)
    disk.seek(0)
    done = 0
    while done < size:
        count = disk.readinto(view[done:])
        if not count:
            break
        done += count
    assert done == size, f"read {done} bytes from a disk of size {size}"
    return bytes(buffer)


def first_difference(got: bytes, want: bytes) -> int | None:
    if got == want:
        return None
    if len(got) != len(want):
        return min(len(got), len(want))
    # Find the first differing byte by halving (no Python loop over megabytes).
    lo, hi = 0, len(got)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if got[lo:mid] != want[lo:mid]:
            hi = mid
        else:
            lo = mid
    return lo


def assert_same(got: bytes, want: bytes, what: str) -> None:
    """A one-line failure naming the first differing offset, instead of a megabyte diff."""
    at = first_difference(got, want)
    if at is None:
        return
    raise AssertionError(
        f"{what}: {len(got)} bytes read, {len(want)} expected; first difference at offset {at} "
        f"(got {got[at:at + 16].hex()}, want {want[at:at + 16].hex()}); "
        f"sha256 got {hashlib.sha256(got).hexdigest()[:16]} want {hashlib.sha256(want).hexdigest()[:16]}")


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
    folder.mkdir(parents=True, exist_ok=True)
    cm = ChainModel(folder, size, logical_sector_size, model=bytearray(size))
    layers = 1 + len(child_block_sizes)
    if writes is None:
        writes = [default_writes(size, base_block_size if i == 0 else (child_block_sizes[i - 1] or 2 * MiB),
                                 seed=1000 + i) for i in range(layers)]
    assert len(writes) == layers
    base = folder / base_name
    cm.owned.append(set())
    with vhdx.create(base, size, block_size=base_block_size, logical_sector_size=logical_sector_size,
                     physical_sector_size=physical_sector_size, fixed=fixed) as disk:
        for offset, data in writes[0]:
            cm.write(disk, offset, data)
    cm.paths.append(base)
    for i, block_size in enumerate(child_block_sizes, start=1):
        cm.frozen.append(bytes(cm.model))
        cm.owned.append(set())
        parent = cm.paths[-1]
        if block_size is None and use_snapshot:
            child = Path(vhdx.snapshot(parent))
            disk = vhdx.open(child, "r+")
        else:
            child = folder / f"layer{i}.avhdx"
            disk = vhdx.create(child, parent=parent, block_size=block_size)
        with disk:
            for offset, data in writes[i]:
                cm.write(disk, offset, data)
        cm.paths.append(child)
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


def disk_bytes(path: Path | str, **options: Any) -> bytes:
    with vhdx.open(path, **options) as disk:
        return read_all(disk)


def locator_of(path: Path | str) -> dict[str, str]:
    """The parent locator's key/value pairs of one file (its parents are not opened)."""
    from vhdx.file.image import Image

    image = Image.open(os.fspath(path), "r")
    try:
        return dict(image.info()["metadata"]["parent_locator"] or {})
    finally:
        image.close()


def set_locator(path: Path | str, pairs: dict[str, str]) -> None:
    """Replace a child's parent locator with ``pairs`` (in that order), as a Hyper-V host would
    have written it. Uses the library's own metadata writer; DataWriteGuid is left alone."""
    from vhdx.file.image import Image

    image = Image.open(os.fspath(path), "r+")
    try:
        image.write_parent_locator(pairs)
    finally:
        image.close()


def data_write_guid(path: Path | str) -> uuid.UUID:
    from vhdx.chains.scan import read_data_write_guid
    guid = read_data_write_guid(os.fspath(path))
    assert guid is not None, f"{path} is not readable"
    return guid


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m vhdx ARGS`` with this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "vhdx", *map(os.fspath, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback, naming ``needles``."""
    assert result.returncode != 0, f"expected failure, got 0; stdout={result.stdout!r}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("vhdx: error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]
