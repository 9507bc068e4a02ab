"""Creating one new, empty .vhdx file: the layout Windows writes, published under its name
only once complete (docs/format.md §1.1)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .._version import __version__
from ..errors import UsageError, VhdxError
from ..format import bat as batmod
from ..format import constants as C
from ..format.geometry import Geometry, align_up
from ..format.records import (Header, MetadataItem, RegionEntry, build_file_identifier, build_header,
                              build_metadata_region, build_region_table, system_items)
from .image import Image
from .outputs import publish, refuse_existing, remove_quietly, temporary_path
from .storage import FileStorage, Storage

EAGER_BITMAP_CHUNKS = 64  # differencing disks up to 256 GiB (512-byte sectors) get their bitmaps at creation
LOG_OFFSET, LOG_LENGTH = 1 * C.MiB, 1 * C.MiB
METADATA_OFFSET, METADATA_LENGTH = 2 * C.MiB, 1 * C.MiB
BAT_OFFSET = 3 * C.MiB


def create_image(path: str | os.PathLike[str], size: int, *, block_size: int = 32 * C.MiB,
                 logical_sector_size: int = 512, physical_sector_size: int = 4096, fixed: bool = False,
                 page83_data: uuid.UUID | None = None, parent_locator: bytes | None = None,
                 storage: Storage | None = None) -> Image:
    """Write a new, empty VHDX file and return it open for writing.

    Layout as Windows writes it: log at 1 MiB (1 MiB), metadata at 2 MiB (1 MiB),
    BAT at 3 MiB, payload after (docs/format.md §1.1).
    """
    path = os.fspath(path)
    has_parent = parent_locator is not None
    _check_parameters(path, size, block_size, logical_sector_size, physical_sector_size, fixed, has_parent)
    g = Geometry(size, block_size, logical_sector_size, has_parent)
    items = system_items(block_size=block_size, leave_block_allocated=fixed, has_parent=has_parent,
                         virtual_disk_size=size, logical_sector_size=logical_sector_size,
                         physical_sector_size=physical_sector_size, page83_data=page83_data or uuid.uuid4(),
                         parent_locator=parent_locator)
    metadata = build_metadata_region(items, METADATA_LENGTH)
    plan = _plan_bat(g, fixed)
    temporary = None
    if storage is None:
        storage, temporary = _create_temporary(path)
    try:
        _write_new_file(storage, plan, items, metadata)
        if temporary is not None:
            # Only a complete file takes the final name, so a killed creation leaves none there.
            publish(temporary, path)
            storage.path = path
    except BaseException:
        if temporary is not None:
            storage.close()
            remove_quietly(temporary)
        raise
    return Image.loaded(storage, owns_storage=True)


def _check_parameters(path: str, size: int, block_size: int, logical_sector_size: int,
                      physical_sector_size: int, fixed: bool, has_parent: bool) -> None:
    """Refuse a geometry the format does not allow (a UsageError: the caller chose it)."""
    for what, value in (("block size", block_size), ("logical sector size", logical_sector_size),
                        ("physical sector size", physical_sector_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{what} {value!r}: a whole number of bytes", path=path)
    if block_size < C.MIN_BLOCK_SIZE or block_size > C.MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise UsageError(f"block size {block_size}: a power of two from 1 MiB to 256 MiB", path=path)
    if logical_sector_size not in C.LOGICAL_SECTOR_SIZES:
        raise UsageError(f"logical sector size {logical_sector_size}: 512 or 4096", path=path)
    if physical_sector_size not in C.PHYSICAL_SECTOR_SIZES:
        raise UsageError(f"physical sector size {physical_sector_size}: 512 or 4096", path=path)
    if not isinstance(size, int) or size <= 0 or size > C.MAX_VIRTUAL_DISK_SIZE or size % logical_sector_size:
        raise UsageError(f"size {size}: a multiple of {logical_sector_size} bytes from 1 sector to 64 TiB",
                         path=path)
    if fixed and has_parent:
        raise UsageError("a differencing disk cannot be fixed", path=path)


@dataclass
class _NewBat:
    """The BAT of a new file, described rather than built (a 64 TiB disk's BAT is 512 MiB of
    zeros, which the newly sized file reads already): ``sbm_chunks`` eager sector bitmaps, or
    (``fixed``) every block placed, from ``payload_start``; and the size the file takes."""

    geometry: Geometry
    length: int
    payload_start: int
    sbm_chunks: int
    fixed: bool
    file_size: int

    @property
    def used_entries(self) -> int:
        """Entries up to the last non-zero one (0 when every entry is zero)."""
        g = self.geometry
        if self.fixed:
            return g.bat_entries
        return g.sbm_bat_index(self.sbm_chunks - 1) + 1 if self.sbm_chunks else 0

    def pieces(self, chunk: int = 1 << 19) -> Iterator[tuple[int, np.ndarray]]:
        """``(first index, entries)`` of the non-zero part of the BAT, ``chunk`` entries at a time."""
        g = self.geometry
        period = g.chunk_ratio + 1
        for a in range(0, self.used_entries, chunk):
            idx = np.arange(a, min(self.used_entries, a + chunk), dtype=np.int64)
            is_sbm = idx % period == g.chunk_ratio
            entries = np.zeros(idx.size, dtype="<u8")
            if self.fixed:
                blocks = (idx - idx // period)[~is_sbm]
                entries[~is_sbm] = (self.payload_start + blocks * g.block_size).astype(np.uint64) | \
                    np.uint64(C.PAYLOAD_BLOCK_FULLY_PRESENT)
            else:
                chunks = (idx // period)[is_sbm]
                entries[is_sbm] = (self.payload_start + chunks * C.SECTOR_BITMAP_BLOCK_SIZE).astype(np.uint64) | \
                    np.uint64(C.SB_BLOCK_PRESENT)
            yield a, entries


def _plan_bat(g: Geometry, fixed: bool) -> _NewBat:
    """The new file's BAT: empty, but with eager sector bitmaps or (fixed) every block placed."""
    bat_length = align_up(g.bat_entries * 8)
    payload_start = BAT_OFFSET + bat_length
    file_size = payload_start
    sbm_chunks = 0
    if g.has_parent and g.sector_bitmap_blocks <= EAGER_BITMAP_CHUNKS:
        # Zeroed (sparse) sector bitmaps for every chunk up front. Hyper-V allocates them
        # lazily, which the spec allows, but libvhdi then reads a chunk's bitmap from file
        # offset 0 and returns garbage for an untouched checkpoint. 1 MiB per 4 GiB chunk.
        sbm_chunks = batmod.counted_sbm_slots(g)
        file_size = payload_start + sbm_chunks * C.SECTOR_BITMAP_BLOCK_SIZE
    if fixed:
        file_size = payload_start + g.payload_blocks * g.block_size
    return _NewBat(g, bat_length, payload_start, sbm_chunks, fixed, file_size)


def _write_new_file(storage: Storage, plan: _NewBat, items: list[MetadataItem], metadata: bytes) -> None:
    """Identifier, region tables, metadata and BAT, flushed; then the headers, flushed."""
    bat_length = plan.length
    regions = [RegionEntry(C.BAT_REGION_GUID, BAT_OFFSET, bat_length, C.REGION_REQUIRED),
               RegionEntry(C.METADATA_REGION_GUID, METADATA_OFFSET, METADATA_LENGTH, C.REGION_REQUIRED)]
    header = Header(sequence_number=1, file_write_guid=uuid.uuid4(), data_write_guid=uuid.uuid4(),
                    log_guid=C.ZERO_GUID, log_version=C.LOG_VERSION, version=C.VERSION,
                    log_length=LOG_LENGTH, log_offset=LOG_OFFSET)
    storage.truncate(plan.file_size)
    storage.write(build_file_identifier(f"vhdx-python {__version__}"), 0)
    rt = build_region_table(regions)
    storage.write(rt, C.REGION_TABLE1_OFFSET)
    storage.write(rt, C.REGION_TABLE2_OFFSET)
    # Only the table and the items packed after it: the rest of the region is zeros, which
    # the newly sized file reads already, so it stays sparse.
    used = C.METADATA_TABLE_SIZE + sum(len(it.data) for it in items)
    storage.write(metadata[:align_up(used, C.LOG_SECTOR_SIZE)], METADATA_OFFSET)
    for first, entries in plan.pieces():  # the rest of the BAT is zeros: holes of the sized file
        storage.write(entries.tobytes(), BAT_OFFSET + 8 * first)
    storage.flush()
    # Headers last: until they are written the file is not a VHDX.
    storage.write(build_header(header), C.HEADER1_OFFSET)
    storage.write(build_header(header.replace(sequence_number=2)), C.HEADER2_OFFSET)
    storage.flush()


def _create_temporary(path: str) -> tuple[FileStorage, str]:
    """A new file under a temporary name beside ``path`` (which must not exist yet)."""
    refuse_existing(path)
    temporary = temporary_path(path, "creating")
    try:
        return FileStorage(temporary, writable=True, create=True), temporary
    except VhdxError as e:
        raise VhdxError(e.detail, path=path) from e
