"""The header section of an :class:`~vhdx.file.image.Image`: identifier, headers, region tables
and the metadata region (docs/format.md §1 - §4).

:class:`HeaderSection` is the part of ``Image`` that reads them. An open reads only what it
parses: the first 4 KiB (the identifier), the two 4 KiB headers, the two 64 KiB region tables,
and of the metadata region (often 1 MiB, at most 128 MiB) its 64 KiB table and the bytes its
items use. The creator text is decoded when asked for.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..errors import CorruptError, TruncatedError, UnsupportedError, VhdxError
from ..format import constants as C
from ..format import layout, sniff
from ..format.geometry import Geometry
from ..format.records import (Header, Metadata, RegionEntry, current_header, metadata_items_end, parse_creator,
                              parse_header, parse_metadata_region, parse_region_table, validate_header_fields)

IDENTIFIER_READ = 4096     # the file type identifier lies in the first 520 bytes
METADATA_PEEK = 96 * 1024  # the metadata table and, in every file seen, its items: one read


class HeaderSection:
    """Headers, region tables and metadata of an image (mixed into Image, which sets the rest)."""

    storage: Any
    path: str
    headers: list[Header | None]
    header_errors: list[str | None]
    current_header_index: int
    headers_identical: bool
    region_table: list[RegionEntry]
    region_table_errors: list[str | None]
    creator_field: bytes = b""

    @property
    def creator(self) -> str:
        """The creator text of the file type identifier (decoded on first use)."""
        return parse_creator(self.creator_field, path=self.path) if self.creator_field else ""

    def read_identifier(self, file_size: int) -> None:
        """Read the file type identifier; refuse a file that is not a VHDX (naming what it is, if
        we can) or too short for the header section."""
        head = self.storage.read(0, min(file_size, IDENTIFIER_READ))
        if head[:8] != C.SIGNATURE_FILE:
            head = self.storage.read(0, min(file_size, sniff.HEAD_SIZE))
            tail = self.storage.read(max(0, file_size - sniff.TAIL_SIZE), min(file_size, sniff.TAIL_SIZE))
            raise CorruptError(sniff.not_vhdx_message(head, tail, file_size), path=self.path, offset=0)
        if file_size < C.HEADER_SECTION_SIZE:
            raise TruncatedError(f"{file_size} bytes: too short for a VHDX file (the header section "
                                 f"alone is 1 MiB)", path=self.path, offset=file_size)
        self.creator_field = bytes(head[:520])

    def read_headers(self) -> bytes:
        """The two 4 KiB headers, one after the other."""
        return b"".join(self.storage.read(offset, C.HEADER_SIZE) for offset in C.HEADER_OFFSETS)

    def select_header(self, pair: bytes) -> None:
        """Valid CRC-32C, highest sequence number wins; identical headers are tolerated (§2.2).
        ``pair`` is :meth:`read_headers`'s result."""
        for i, offset in enumerate(C.HEADER_OFFSETS):
            try:
                h = parse_header(pair[i * C.HEADER_SIZE:(i + 1) * C.HEADER_SIZE], path=self.path, offset=offset)
                validate_header_fields(h, path=self.path, offset=offset)
                self.headers[i] = h
            except VhdxError as e:
                self.header_errors[i] = e.detail
        self.current_header_index, self.headers_identical = current_header(self.headers, self.header_errors,
                                                                            path=self.path)

    @property
    def header(self) -> Header:
        """The current header."""
        h = self.headers[self.current_header_index]
        assert h is not None
        return h

    def load_regions(self) -> None:
        """Parse both region tables; the first valid one is used, errors are kept for ``check``.
        A second table that is byte for byte the valid first one is that table: valid too."""
        errors: list[VhdxError] = []
        file_size = self.storage.size()
        valid: bytes | None = None
        for i, offset in enumerate(C.REGION_TABLE_OFFSETS):
            raw = self.storage.read(offset, C.REGION_TABLE_SIZE)
            if raw == valid:
                continue  # the same bytes, the same header and file size: the same entries and checks
            try:
                entries = parse_region_table(raw, path=self.path, offset=offset)
                layout.validate_region_table(entries, self.header, file_size, path=self.path, offset=offset)
            except VhdxError as e:
                self.region_table_errors[i] = e.detail
                errors.append(e)
                continue
            valid = raw
            if not self.region_table:
                self.region_table = entries
        if not self.region_table:
            raise errors[0]

    def region(self, guid: uuid.UUID) -> RegionEntry:
        """The region table entry of region ``guid``."""
        return next(e for e in self.region_table if e.guid == guid)

    def load_metadata(self) -> None:
        """(Re)read the metadata region (its table and the bytes its items use) and the geometry."""
        r = self.region(C.METADATA_REGION_GUID)
        if r.length > C.MAX_METADATA_REGION_SIZE:
            raise UnsupportedError(f"metadata region of {r.length} bytes is over our 128 MiB limit",
                                   path=self.path, offset=r.file_offset)
        self.metadata_region = r
        raw = self.storage.read(r.file_offset, min(r.length, METADATA_PEEK))
        end = min(metadata_items_end(raw), r.length)
        if end > len(raw):
            raw += self.storage.read(r.file_offset + len(raw), end - len(raw))
        self.metadata: Metadata = parse_metadata_region(raw, path=self.path, offset=r.file_offset,
                                                        region_length=r.length)
        md = self.metadata
        self.geometry = Geometry(md.virtual_disk_size, md.block_size, md.logical_sector_size, md.has_parent)
