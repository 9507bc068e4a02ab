"""Repairing a file in place, crash-safe: every step leaves a file that the next open (or the
next ``vhdx repair --in-place``) takes on from.

1. A damaged file identifier is rewritten (the first 64 KiB; nothing depends on it).
2. Headers: the current one (or one rebuilt, with a log placed in free space) goes into both
   slots, one slot and one flush at a time (§2.4), so a valid header always exists. A new
   FileWriteGuid marks the change; a lost log's LogGuid is cleared.
3. A dirty log is replayed up to its last valid entry; the header names it until the replay
   is durable.
4. Region tables, the metadata region and the BAT pages that change are written through a
   log session of our own: each entry is durable before any header names it, its pages are
   written to their places and flushed, and only then is the LogGuid cleared. An interrupted
   session is replayed by the next open.
5. Space past the last referenced structure is given back, unless BAT entries were dropped
   (it may hold their data).
"""

from __future__ import annotations

import secrets
import uuid

from ..._version import __version__
from ...errors import UnsupportedError
from ...file.log import LogWriter, ReplayPlan, apply_replay
from ...file.storage import Storage
from ...format import constants as C
from ...format import layout
from ...format.geometry import align_up
from ...format.locator import build_parent_locator
from ...format.records import (Header, MetadataItem, RegionEntry, build_file_identifier, build_header,
                               build_metadata_region, build_region_table, system_items)
from .batpages import changed_pages
from .report import FOUND, REPAIRED
from .salvage import Salvage
from .scan import blank_header

PAGE = C.LOG_SECTOR_SIZE


class InPlace:
    """The in-place writes for one salvaged file on a writable, exclusively locked storage."""

    def __init__(self, storage: Storage, s: Salvage) -> None:
        self.storage = storage
        self.s = s
        self.header = s.header or self._new_header()
        self.slot = s.header_slot  # the slot holding the current header: written last

    def _used(self) -> list[tuple[int, int]]:
        """The spans structures, payload blocks and sector bitmaps use (not the log)."""
        s = self.s
        spans = layout.structure_spans(blank_header(), [r for r in (s.bat_region, s.metadata_region) if r])
        used = [(sp.start, sp.end) for sp in spans]
        if s.bat is not None and s.geometry is not None:
            alloc = layout.allocations_of(s.bat, s.geometry, bitmaps=s.geometry.has_parent)
            used += list(zip(alloc.starts.tolist(), alloc.ends.tolist()))
        return used

    def _new_header(self) -> Header:
        """A header for a file whose two headers are lost, with a log placed by :meth:`_log_place`."""
        return blank_header(self._log_place(), C.MiB)

    def _log_place(self) -> int:
        """The first 1 MiB of the file that nothing uses, for a log."""
        at = C.HEADER_SECTION_SIZE
        for start, end in sorted(self._used()):
            if start >= at + C.MiB:
                break
            at = max(at, align_up(end))
        if at + C.MiB > self.storage.size():
            raise UnsupportedError("no free space for a log; repair to a copy (-o OUT) instead", path=self.storage.path)
        return at

    def _usable_log(self) -> None:
        """Move the log to free space when the header's does not lie inside the file, clear of
        everything else (a damaged header field must not aim the log's writes anywhere)."""
        h = self.header
        end = h.log_offset + h.log_length
        clash = any(start < end and h.log_offset < stop for start, stop in self._used())
        if h.log_length < C.MiB or h.log_offset < C.HEADER_SECTION_SIZE or end > self.storage.size() or clash:
            self.header = h.replace(log_offset=self._log_place(), log_length=C.MiB)
            self.s.report.add("log placement", REPAIRED, f"the header's log at 0x{h.log_offset:x} ({h.log_length} "
                              f"bytes) is not usable; moved to 0x{self.header.log_offset:x}")

    def _extend(self) -> None:
        """Grow the file to the end of its last block: a block cut short by a truncation then
        lies inside the file, its missing part zeros (and reported lost)."""
        s = self.s
        assert s.bat is not None and s.geometry is not None
        alloc = layout.allocations_of(s.bat, s.geometry, bitmaps=s.geometry.has_parent)
        end = int(alloc.ends.max()) if alloc.ends.size else 0
        if end > self.storage.size():
            self.storage.truncate(align_up(end))
            self._flush()

    def run(self) -> None:
        """Every step of the module docstring, in order."""
        s = self.s
        if any(st.name == "file identifier" and st.status == REPAIRED for st in s.report.structures):
            self._write(build_file_identifier(f"vhdx-python {__version__}"), 0)
            self._flush()
        log_clean = not s.replayed
        if log_clean:
            self._usable_log()
        self._headers(file_write_guid=uuid.uuid4(), **({"log_guid": C.ZERO_GUID} if log_clean else {}))
        self._extend()
        if s.replayed:
            head = s.replayed[-1]
            plan = ReplayPlan(s.replayed, [w for e in s.replayed for w in e.writes], head.flushed_file_offset,
                              head.last_file_offset)
            apply_replay(self.storage, plan)
            self._headers(log_guid=C.ZERO_GUID)
        self._usable_log()
        self._logged(self._pages())
        self._trim()

    # ------------------------------------------------------------------ primitives

    def _write(self, data: bytes, offset: int) -> None:
        self.storage.write(data, offset)

    def _flush(self) -> None:
        self.storage.flush()

    def _headers(self, **changes: object) -> None:
        """Both header slots, the other one first, a flush after each (§2.4)."""
        h = self.header
        if h.sequence_number + 2 > 0xFFFFFFFFFFFFFFFF:
            raise UnsupportedError("the header sequence number is exhausted", path=self.storage.path)
        new = h.replace(sequence_number=h.sequence_number + 1, **changes)
        for slot in (1 - self.slot, self.slot):
            self._write(build_header(new), C.HEADER_OFFSETS[slot])
            self._flush()
            self.header, self.slot = new, slot
            new = new.replace(sequence_number=new.sequence_number + 1)

    # ------------------------------------------------------------------ the pages to change

    def _pages(self) -> dict[int, bytes]:
        s = self.s
        assert s.bat_region is not None and s.metadata_region is not None and s.bat is not None
        pages: dict[int, bytes] = {}
        table = build_region_table([s.bat_region, s.metadata_region])
        for offset in C.REGION_TABLE_OFFSETS:
            self._diff(pages, offset, table)
        self._diff(pages, s.metadata_region.file_offset, self._metadata(s.metadata_region))
        assert s.geometry is not None
        pages.update(changed_pages(self.storage, s.bat_region.file_offset, s.bat, s.bat_kept, s.geometry))
        return pages

    def _diff(self, pages: dict[int, bytes], offset: int, new: bytes) -> None:
        """The 4 KiB pages of ``new`` (to go at ``offset``) that differ from the file."""
        old = self.storage.read(offset, len(new))
        for at in range(0, len(new), PAGE):
            if new[at:at + PAGE] != old[at:at + PAGE]:
                pages[offset + at] = new[at:at + PAGE]

    def _metadata(self, region: RegionEntry) -> bytes:
        """The metadata region as it must be: the current bytes when intact, else rebuilt."""
        p = self.s.params
        intact = any(st.name == "metadata table" and st.status != REPAIRED for st in self.s.report.structures)
        rebuilt = any(st.status == REPAIRED and st.name in ("virtual size", "block size", "logical sector",
                                                             "physical sector", "disk id", "parent locator")
                      for st in self.s.report.structures)
        if intact and not rebuilt:
            return self.storage.read(region.file_offset, min(region.length, C.MAX_METADATA_REGION_SIZE))
        assert p.block_size and p.virtual_disk_size and p.logical_sector_size and p.page83_data
        items: list[MetadataItem] = system_items(
            block_size=p.block_size, leave_block_allocated=p.leave_block_allocated, has_parent=bool(p.has_parent),
            virtual_disk_size=p.virtual_disk_size, logical_sector_size=p.logical_sector_size,
            physical_sector_size=p.physical_sector_size or 4096, page83_data=p.page83_data,
            parent_locator=build_parent_locator(p.locator) if p.has_parent and p.locator else None)
        try:
            return build_metadata_region(items + p.extra_items, region.length)
        except ValueError as e:
            raise UnsupportedError(f"the rebuilt metadata does not fit its region ({e}); repair to a copy "
                                   "(-o OUT) instead", path=self.storage.path, offset=region.file_offset) from e

    # ------------------------------------------------------------------ the logged session

    def _logged(self, pages: dict[int, bytes]) -> None:
        """Write ``pages`` through a log session of our own (see the module docstring)."""
        if not pages:
            return
        h = self.header
        log_guid = uuid.uuid4()
        writer = LogWriter(self.storage, h.log_offset, h.log_length, log_guid, first_sequence=secrets.randbits(40) + 1)
        if writer.max_pages < 1:
            raise UnsupportedError("the log is too small to carry a page", path=self.storage.path)
        items = sorted(pages.items())
        named = False
        for i in range(0, len(items), writer.max_pages):
            group = items[i:i + writer.max_pages]
            writer.write_entry(group, file_size=self.storage.size())
            if not named:
                self._headers(log_guid=log_guid)
                named = True
            for target, page in group:
                self._write(page, target)
            self._flush()
        self._headers(log_guid=C.ZERO_GUID)

    def _trim(self) -> None:
        """Give back space past the last referenced structure (an interrupted write's leak),
        unless BAT entries were dropped: the space may hold their data, for a human to look at."""
        s = self.s
        assert s.bat is not None and s.geometry is not None and s.bat_region is not None and s.metadata_region
        spans = layout.structure_spans(self.header, [s.bat_region, s.metadata_region])
        end = align_up(layout.referenced_end(spans, layout.allocations_of(s.bat, s.geometry,
                                                                            bitmaps=s.geometry.has_parent)))
        size = self.storage.size()
        if size - end >= C.ALIGNMENT and any(st.name == "BAT" and st.status != FOUND for st in s.report.structures):
            s.report.add("leaked space", FOUND, f"{size - end} bytes past the last structure kept: they may hold "
                         "the data of dropped BAT entries")
        elif size - end >= C.ALIGNMENT:
            self.storage.truncate(end)
            self._flush()
            s.report.add("leaked space", REPAIRED, f"{size - end} bytes past the last structure given back")


def check_in_place(s: Salvage) -> str | None:
    """Why ``s`` cannot be repaired in place (it can be to a copy), or None."""
    if s.bat is None or s.bat_region is None or s.metadata_region is None:
        return "nothing to repair from"
    g = s.geometry
    assert g is not None
    if s.bat_region.length < g.bat_entries * 8:
        return "the BAT region is too small for the disk"
    if s.bat_region.file_offset + s.bat_region.length > s.source.size():
        return "the BAT region runs past the end of the file"
    if s.metadata_region.file_offset + s.metadata_region.length > s.source.size():
        return "the metadata region runs past the end of the file"
    return None
