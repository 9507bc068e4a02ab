"""The one chain builder: a base and its children, each written before it gets a child.

A layer is written *before* it gets a child: a write rotates its DataWriteGuid and orphans its
children. :func:`build_layers` creates the base with ``vhdx.create`` and every further layer with
``vhdx.snapshot`` (Hyper-V naming) or ``vhdx.create(parent=...)``, hands each open layer to a
``fill`` callback together with the in-memory model of the disk, and keeps what the disk reads
as of every layer. The folders' kits (tests/chain, tests/forensics, tests/merge) add their own
bookkeeping (owned sectors, simulated block states, zero-like blocks) in their ``fill``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import vhdx
import vhdx.ops.check
from vhdx.chains.scan import read_data_write_guid

Fill = Callable[[int, Path, Any, bytearray], None]
"""``fill(index, path, disk, model)``: write layer ``index`` (open "r+") and keep ``model`` in step."""


@dataclass
class Layers:
    """Files of a built chain, base first, and what the disk reads as of each of them."""

    paths: list[Path] = field(default_factory=list)
    contents: list[bytes] = field(default_factory=list)


def build_layers(folder: str | os.PathLike[str], *, size: int, block_sizes: Sequence[int | None], fill: Fill,
                 logical_sector_size: int = 512, physical_sector_size: int = 4096, fixed: bool = False,
                 snapshots: bool | Sequence[bool] = True, base_name: str = "base.vhdx",
                 model: bytearray | None = None) -> Layers:
    """Create ``block_sizes[0]``'s base and one child per further block size (None: the default).

    Child ``i`` is made by ``vhdx.snapshot`` when ``snapshots`` (or ``snapshots[i - 1]``) is true,
    else by ``vhdx.create`` as ``layer{i}.avhdx``. ``model`` (zeros of ``size`` by default) is the
    bytearray the ``fill`` callbacks update.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = bytearray(size) if model is None else model
    built = Layers()
    for index, block_size in enumerate(block_sizes):
        if index == 0:
            path = folder / base_name
            disk = vhdx.create(path, size, block_size=block_size, logical_sector_size=logical_sector_size,
                               physical_sector_size=physical_sector_size, fixed=fixed)
        elif snapshots if isinstance(snapshots, bool) else snapshots[index - 1]:
            path = Path(vhdx.snapshot(built.paths[-1], block_size=block_size))
            disk = vhdx.open(path, "r+")
        else:
            path = folder / f"layer{index}.avhdx"
            disk = vhdx.create(path, parent=built.paths[-1], block_size=block_size)
        with disk:
            fill(index, path, disk, model)
        built.paths.append(path)
        built.contents.append(bytes(model))
    return built


def vhdx_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The .vhdx and .avhdx files of ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".vhdx", ".avhdx"))


def copy_folder(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Replace ``dst`` with a copy of ``src``."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def check_errors(path: str | os.PathLike[str]) -> list[str]:
    """The errors ``vhdx.ops.check.check_file`` finds (structure only; logs replayed in memory)."""
    report = vhdx.ops.check.check_file(os.fspath(path))
    out = [str(f) for f in report.errors]
    if not report.opened:
        out.append("check could not open the file")
    return out


def check_problems(folder: str | os.PathLike[str], files: Iterable[Path] | None = None) -> list[str]:
    """Errors ``vhdx check`` finds in ``files`` (every disk of ``folder`` by default), each named;
    warnings, a dirty log among them, are fine. A check that cannot run is a problem too."""
    problems = []
    for path in (files if files is not None else vhdx_files(folder)):
        try:
            errors = check_errors(path)
        except Exception as e:  # noqa: BLE001 - a check that cannot run is a problem
            errors = [f"check_file raised {type(e).__name__}: {e}"]
        problems += [f"{Path(path).name}: {e}" for e in errors]
    return problems


def data_write_guid(path: str | os.PathLike[str]) -> uuid.UUID:
    """The DataWriteGuid of one file (its parents are not opened)."""
    guid = read_data_write_guid(os.fspath(path))
    assert guid is not None, f"{path} is not readable"
    return guid
