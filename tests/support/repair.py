"""Shared by the repair tests: small disks, where their structures are, ways to destroy each
one, and a comparison of a repaired disk with the original outside the ranges reported lost."""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import vhdx
from vhdx.file.image import Image
from vhdx.format import constants as C
from vhdx.format.records import build_header

MiB = 1 << 20


@dataclass(frozen=True)
class Places:
    """Where a file keeps its log, metadata region and BAT."""

    log_offset: int
    log_length: int
    metadata_offset: int
    bat_offset: int
    bat_length: int
    header: object


def places(path: Path) -> Places:
    image = Image.open(str(path))
    try:
        md, bat = image.metadata_region, image.bat_region
        return Places(image.header.log_offset, image.header.log_length, md.file_offset, bat.file_offset,
                      bat.length, image.header)
    finally:
        image.close()


def _put(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _garbage(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def destroy_log(path: Path, p: Places) -> None:
    """Garbage over the log, and both headers naming a LogGuid: a dirty log that cannot be read."""
    _put(path, p.log_offset, _garbage(p.log_length))
    h = p.header.replace(log_guid=uuid.UUID("5eed0000-0000-4000-8000-000000000001"))
    _put(path, C.HEADER1_OFFSET, build_header(h.replace(sequence_number=h.sequence_number + 1)))
    _put(path, C.HEADER2_OFFSET, build_header(h.replace(sequence_number=h.sequence_number + 2)))


DESTROY: dict[str, Callable[[Path, Places], None]] = {
    "header 1": lambda f, p: _put(f, C.HEADER1_OFFSET, _garbage(4096)),
    "header 2": lambda f, p: _put(f, C.HEADER2_OFFSET, _garbage(4096)),
    "both headers": lambda f, p: _put(f, C.HEADER1_OFFSET, bytes(2 * 0x10000)),
    "region table 1": lambda f, p: _put(f, C.REGION_TABLE1_OFFSET, _garbage(0x10000)),
    "region table 2": lambda f, p: _put(f, C.REGION_TABLE2_OFFSET, _garbage(0x10000)),
    "both region tables": lambda f, p: _put(f, C.REGION_TABLE1_OFFSET, bytes(0x20000)),
    "log": destroy_log,
    "metadata table": lambda f, p: _put(f, p.metadata_offset, bytes(0x10000)),
    "BAT page": lambda f, p: _put(f, p.bat_offset, _garbage(4096)),
}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def outside(lost: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The complement of the sorted ranges ``lost`` in [0, size)."""
    out, at = [], 0
    for s, e in lost:
        if s > at:
            out.append((at, s))
        at = max(at, e)
    if at < size:
        out.append((at, size))
    return out


def differs_outside_lost(original: Path, repaired: Path, lost: list[tuple[int, int]], **options) -> str | None:
    """Where ``repaired`` reads other than ``original`` outside ``lost`` (4 MiB at a time), or None."""
    with vhdx.open(str(original), **options) as a, vhdx.open(str(repaired), **options) as b:
        if a.size != b.size:
            return f"sizes {a.size} and {b.size}"
        for s, e in outside(lost, a.size):
            for at in range(s, e, 4 * MiB):
                n = min(4 * MiB, e - at)
                if a.pread(at, n) != b.pread(at, n):
                    return f"virtual 0x{at:x}..0x{at + n:x}"
    return None


def make_dynamic(path: Path, *, size: int = 8 * MiB, lss: int = 512, writes=((0, 1536 * 1024, 1),
                                                                              (5 * MiB + 4096, 65536, 2))) -> Path:
    with vhdx.create(str(path), size, block_size=MiB, logical_sector_size=lss) as disk:
        for at, n, seed in writes:
            disk.pwrite(random.Random(seed).randbytes(n), at)
    return path


def make_child(folder: Path) -> Path:
    """parent.vhdx (data in blocks 0-1) and child.avhdx over it (a partial write in block 5)."""
    parent = make_dynamic(folder / "parent.vhdx", writes=((0, 2 * MiB, 3),))
    child = folder / "child.avhdx"
    with vhdx.create(str(child), parent=str(parent), block_size=MiB) as disk:
        disk.pwrite(random.Random(4).randbytes(65536), 5 * MiB + 8192)
        disk.pwrite(random.Random(5).randbytes(MiB), 3 * MiB)
    return child


def make_two_page_bat(path: Path) -> Path:
    """600 MiB with 1 MiB blocks: a BAT of two 4 KiB pages, data in block 0 and block 550."""
    return make_dynamic(path, size=600 * MiB, writes=((0, 65536, 6), (550 * MiB, 65536, 7)))
