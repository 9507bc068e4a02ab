"""Hostile inputs: truncated and mutated files may only raise vhdx.VhdxError.

Each case starts from a small valid disk (made by qemu-img or by vhdx.create), changes
some bytes, and then opens it read-only and, on a fresh copy, read-write; reads every byte
of the virtual disk; in read-write mode also writes two probes (in place and into a new
block) and checks they read back, and that no write landed in the file identifier or the
metadata region. Allowed outcomes: it works, or it raises a ``vhdx.VhdxError`` subclass that
names the file. Never IndexError, ValueError, struct.error, OverflowError, MemoryError;
never more than CASE_SECONDS or CASE_PEAK_BYTES of Python allocations (conftest.Guard); and
a read-only open never changes the file.

Mutations of checksummed structures (headers, region tables) come in two forms: raw,
which only the CRC-32C check has to catch, and re-stamped with a correct CRC-32C, which
reaches the field validation behind it (docs/format.md §1.5). Cases marked ``raise`` break
a MUST of the format; cases marked ``ok`` are valid files (or recoverable by the rules, such
as one bad header) and must read as the base disk; ``either`` leaves the choice to the
library. Also here: hand-built logs (§8), parent locators (§4.8), random byte flips
(hypothesis; VHDX_HYPOTHESIS_MAX raises the example count) and the CLI's error output.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import tempfile
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import vhdxbits as vb
from support.cli import run_subprocess
from conftest import (PARENT_NAME, MiB, CaseTimeout, Guard, have, mark_unwritten, read_disk, sha256_file,
                      stamp_of)

import vhdx

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ running one case

@dataclass
class Outcome:
    mode: str
    error: BaseException | None = None
    digest: str | None = None
    size: int | None = None
    problems: list | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        if self.error is None:
            return f"[{self.mode}] opened and read {self.size} bytes"
        return f"[{self.mode}] {type(self.error).__name__}: {self.error}"


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    inside = [f for f in tb if "/vhdx/" in f.filename] or tb
    if not inside:
        return ""
    f = inside[-1]
    return f" (raised at {os.path.relpath(f.filename, REPO)}:{f.lineno} in {f.name})"


PROBE_WRITES = ((0, b"\xc3" * 4096), (3 * MiB + 512, b"\x3c" * 4096))   # block 0 in place, block 3 new


def exercise(path: Path, mode: str = "r") -> Outcome:
    """Open ``path`` with vhdx.open, call info(), read the whole virtual disk, close.

    With "r+", then also write PROBE_WRITES (an allocated block and, in dynamic bases, a new
    one), close, reopen read-only and check that they read back.
    """
    out = Outcome(mode)
    guard = Guard()
    out.problems = []
    try:
        with guard:
            try:
                disk = vhdx.open(str(path), mode)
                try:
                    str(disk.info())
                    out.digest, out.size = read_disk(disk)
                    if mode == "r+":
                        probes = [(at, data) for at, data in PROBE_WRITES if at + len(data) <= out.size]
                        for at, data in probes:
                            disk.seek(at)
                            disk.write(data)
                        disk.flush()
                finally:
                    disk.close()
                if mode == "r+":
                    with vhdx.open(str(path)) as again:
                        for at, data in probes:
                            again.seek(at)
                            if again.read(len(data)) != data:
                                out.problems.append(f"a {len(data)}-byte write at virtual 0x{at:x} "
                                                    f"did not read back after reopening")
            except vhdx.VhdxError as e:
                out.error = e
    except CaseTimeout as e:
        out.error = e
    except Exception as e:   # the thing these tests exist to catch
        out.error = e
    out.problems += guard.verdict()
    return out


def assert_clean(out: Outcome, path: Path) -> None:
    """Only VhdxError, with the path in it; within time and memory limits."""
    problems = list(out.problems or [])
    e = out.error
    if e is not None:
        if not isinstance(e, vhdx.VhdxError):
            problems.append(f"raised {type(e).__module__}.{type(e).__name__}: {e}{_where(e)}")
        else:
            if os.path.basename(str(path)) not in str(e):
                problems.append(f"message does not name the file: {str(e)!r} (e.path={e.path!r})")
            if "\n" in str(e):
                problems.append(f"message is not one line: {str(e)!r}")
    assert not problems, f"[{out.mode}] " + "; ".join(problems)


@dataclass
class Case:
    name: str
    mutate: Callable[[bytearray, vb.Layout], bytes | bytearray | None]
    expect: str = "either"                # "ok", "raise" or "either"
    bases: tuple = ("qemu512", "ours4k")
    error: type | None = None             # required VhdxError subclass when expect == "raise"
    rw: bool = True                       # also open "r+" on a fresh copy
    ro_ok: bool = False                   # read-only must work and read as the base, whatever ``expect``


def run_case(case: Case, base: str, base_disks, tmp_path: Path, *, with_parent: bool = True) -> None:
    file_bytes, virtual = base_disks(base)
    buf = bytearray(file_bytes)
    layout = vb.parse_layout(buf)
    mutated = case.mutate(buf, layout)
    data = bytes(buf if mutated is None else mutated)
    expected_digest = hashlib.sha256(virtual).hexdigest()

    if base == "child" and with_parent:     # the parent goes beside the child, where the locator points
        base_disks("child")
        (tmp_path / PARENT_NAME).write_bytes(base_disks("child:parent")[0])
    path = tmp_path / f"{case.name}.vhdx"
    path.write_bytes(data)
    before = mark_unwritten(path)
    ro = exercise(path, "r")
    assert_clean(ro, path)
    assert stamp_of(path) == before, "a read-only open changed the file (size or mtime)"

    outcomes = [ro]
    if case.rw:
        rw_path = tmp_path / f"{case.name}-rw.vhdx"
        rw_path.write_bytes(data)
        protected = [(0, 0x10000), (layout.metadata_offset, layout.regions[vb.METADATA_GUID][2])]
        rw = exercise(rw_path, "r+")
        assert_clean(rw, rw_path)
        for start, length in protected:
            with open(rw_path, "rb") as f:      # the file may now be huge and sparse: read ranges only
                f.seek(start)
                after = f.read(length)
            if after != data[start:start + length]:
                where = start + next(i for i in range(length) if i >= len(after) or after[i] != data[start + i])
                pytest.fail(f"[r+] writing the virtual disk changed the file at 0x{where:x}, inside "
                            f"{'the file identifier' if start == 0 else 'the metadata region'} "
                            f"({rw.describe()})")
        outcomes.append(rw)
        if ro.ok and rw.ok:
            assert ro.digest == rw.digest, (
                "read-only open (log replayed in memory) and read-write open read different data")

    if case.ro_ok:
        assert ro.ok, f"readable file refused: {ro.describe()}"
        assert ro.digest == expected_digest, "[r] read different data from the base disk"
    for out in outcomes:
        if case.expect == "ok":
            assert out.ok, f"valid or recoverable file refused: {out.describe()}"
            assert out.digest == expected_digest, f"[{out.mode}] read different data from the base disk"
        elif case.expect == "raise":
            assert not out.ok, f"file that breaks the format was accepted: {out.describe()}"
            if case.error is not None:
                assert isinstance(out.error, case.error), (
                    f"expected {case.error.__name__}, got {out.describe()}")


# ------------------------------------------------------------------ mutations

def truncate_at(where: Callable[[vb.Layout], int]):
    def mutate(buf, L):
        return bytes(buf[:where(L)])
    return mutate


def flip(at: Callable[[vb.Layout], int], mask: int = 0x01, stamp: Callable | None = None):
    def mutate(buf, L):
        buf[at(L)] ^= mask
        if stamp:
            stamp(buf)
    return mutate


def put(at: Callable[[vb.Layout], int], fmt: str, value, stamp: Callable | None = None):
    def mutate(buf, L):
        struct.pack_into(fmt, buf, at(L), value)
        if stamp:
            stamp(buf)
    return mutate


def both_tables(fn):
    """Apply a region-table edit to table 1 and table 2 and re-stamp both."""
    def mutate(buf, L):
        for which, rt in enumerate(vb.REGION_TABLE_OFFSETS):
            fn(buf, L, rt)
            vb.stamp_region_table(buf, which)
    return mutate


def region_entry(L, rt, guid):
    return rt + (L.regions[guid][0] - vb.REGION_TABLE_OFFSETS[0])


def set_region(guid, *, file_offset=None, length=None, required=None):
    def fn(buf, L, rt):
        e = region_entry(L, rt, guid)
        if file_offset is not None:
            struct.pack_into("<Q", buf, e + 16, file_offset)
        if length is not None:
            struct.pack_into("<I", buf, e + 24, length)
        if required is not None:
            struct.pack_into("<I", buf, e + 28, required)
    return both_tables(fn)


def add_region(guid: uuid.UUID, file_offset: int, length: int, required: int):
    def fn(buf, L, rt):
        count, = struct.unpack_from("<I", buf, rt + 8)
        e = rt + 16 + 32 * count
        buf[e:e + 16] = guid.bytes_le
        struct.pack_into("<QII", buf, e + 16, file_offset, length, required)
        struct.pack_into("<I", buf, rt + 8, count + 1)
    return both_tables(fn)


def md_item_at(guid, rel, fmt, value):
    def mutate(buf, L):
        struct.pack_into(fmt, buf, L.metadata[guid].item_file_offset + rel, value)
    return mutate


def md_item(guid, fmt, value):
    return md_item_at(guid, 0, fmt, value)


def md_entry(guid, *, offset=None, length=None, flags=None, item_id=None):
    def mutate(buf, L):
        e = L.metadata[guid].entry_file_offset
        if item_id is not None:
            buf[e:e + 16] = item_id.bytes_le
        if offset is not None:
            struct.pack_into("<I", buf, e + 16, offset)
        if length is not None:
            struct.pack_into("<I", buf, e + 20, length)
        if flags is not None:
            struct.pack_into("<I", buf, e + 24, flags)
    return mutate


def md_add_entry(item_id: uuid.UUID, flags: int, length: int = 8):
    def mutate(buf, L):
        md = L.metadata_offset
        count, = struct.unpack_from("<H", buf, md + 10)
        e = md + 32 + 32 * count
        # the last 4 KiB of the metadata region: unused by both makers in a small file
        item_off = L.regions[vb.METADATA_GUID][2] - 4096
        buf[e:e + 16] = item_id.bytes_le
        struct.pack_into("<IIII", buf, e + 16, item_off, length, flags, 0)
        struct.pack_into("<H", buf, md + 10, count + 1)
        buf[md + item_off:md + item_off + length] = b"\x42" * length
    return mutate


def bat_entry(block: int, value: int | Callable[[int], int]):
    def mutate(buf, L):
        at = L.bat_entry_offset(block)
        old, = struct.unpack_from("<Q", buf, at)
        struct.pack_into("<Q", buf, at, value(old) if callable(value) else value)
    return mutate


def compose(*fns):
    def mutate(buf, L):
        for fn in fns:
            r = fn(buf, L)
            if r is not None:
                buf[:] = r
    return mutate


def _truncate_mid_payload(buf, L):
    entry, = struct.unpack_from("<Q", buf, L.bat_entry_offset(0))
    return bytes(buf[:(entry & 0xFFFFFFFFFFF00000) + 12345])


def _truncate_mid_block1(buf, L):
    entry, = struct.unpack_from("<Q", buf, L.bat_entry_offset(1))
    return bytes(buf[:(entry & 0xFFFFFFFFFFF00000) + MiB // 2])


H1, H2 = vb.HEADER_OFFSETS
RT1, RT2 = vb.REGION_TABLE_OFFSETS
NEW_GUID = uuid.UUID("0badc0de-1111-2222-3333-444455556666")


def stamp_h(slots=(0, 1)):
    def s(buf):
        for slot in slots:
            vb.stamp_header(buf, slot)
    return s


def hdr(slots=(0, 1), **fields):
    def mutate(buf, L):
        vb.set_header_fields(buf, slots, **fields)
    return mutate


def current_slot_only(**fields):
    def mutate(buf, L):
        vb.set_header_fields(buf, (L.current_header,), **fields)
    return mutate


def garbage(at: Callable[[vb.Layout], int], length: int, seed: int = 1):
    def mutate(buf, L):
        import random
        rng = random.Random(seed)
        start = at(L)
        buf[start:start + length] = bytes(rng.randrange(256) for _ in range(length))
    return mutate


CASES: list[Case] = [
    # --- truncation
    Case("trunc-0", truncate_at(lambda L: 0), "raise"),
    Case("trunc-100", truncate_at(lambda L: 100), "raise"),
    Case("trunc-64K", truncate_at(lambda L: 0x10000), "raise"),
    Case("trunc-64K+100", truncate_at(lambda L: 0x10000 + 100), "raise"),
    Case("trunc-192K", truncate_at(lambda L: 0x30000), "raise"),
    Case("trunc-1M", truncate_at(lambda L: MiB), "raise"),
    Case("trunc-1M+1", truncate_at(lambda L: MiB + 1), "raise"),
    Case("trunc-mid-BAT", truncate_at(lambda L: L.bat_offset + 8), "either"),
    Case("trunc-mid-metadata-table", truncate_at(lambda L: L.metadata_offset + 40), "raise"),
    Case("trunc-mid-metadata-items", truncate_at(lambda L: L.metadata_offset + 0x10004), "raise"),
    Case("trunc-mid-payload", _truncate_mid_payload, "either"),
    Case("trunc-mid-block1", _truncate_mid_block1, "either"),
    Case("trunc-last-byte", lambda buf, L: bytes(buf[:-1]), "either"),

    # --- headers
    Case("header1-signature", flip(lambda L: H1), "ok"),
    Case("header2-signature", flip(lambda L: H2), "ok"),
    Case("header1-reserved-bit", flip(lambda L: H1 + 2000, 0x80), "ok"),
    Case("header2-crc", flip(lambda L: H2 + 5), "ok"),
    Case("header-current-guid-bit", lambda buf, L: flip(lambda L: vb.HEADER_OFFSETS[L.current_header] + 20)(buf, L), "ok"),
    Case("headers-both-signature", compose(flip(lambda L: H1), flip(lambda L: H2)), "raise", error=vhdx.CorruptError),
    Case("headers-both-zeroed", lambda buf, L: buf.__setitem__(slice(H1, RT1), bytes(RT1 - H1)), "raise"),
    Case("headers-version-2", hdr(version=2), "raise"),
    Case("header-current-version-2", current_slot_only(version=2), "either"),
    Case("headers-log-version-1", hdr(log_version=1), "either"),
    Case("headers-log-version-1-dirty", hdr(log_version=1, log_guid=NEW_GUID), "raise"),
    Case("headers-equal-sequence-different", compose(hdr((0,), sequence_number=5),
                                                     hdr((1,), sequence_number=5, file_write_guid=NEW_GUID)),
         "either"),
    # Readable; a writer cannot go past 2^64 - 1, so refusing to write (VhdxError) is fine.
    Case("headers-sequence-max", current_slot_only(sequence_number=2**64 - 1), "either", ro_ok=True),
    Case("headers-log-length-7fffffff", hdr(log_length=0x7FFFFFFF), "either"),
    Case("headers-log-length-7fffffff-dirty", hdr(log_length=0x7FFFFFFF, log_guid=NEW_GUID), "raise"),
    Case("headers-log-length-2G-dirty", hdr(log_length=0x7FF00000, log_guid=NEW_GUID), "raise"),
    Case("headers-log-length-0-dirty", hdr(log_length=0, log_guid=NEW_GUID), "raise"),
    Case("headers-log-offset-0", hdr(log_offset=0), "either"),
    Case("headers-log-offset-0-dirty", hdr(log_offset=0, log_guid=NEW_GUID), "raise"),
    Case("headers-log-offset-2^63-dirty", hdr(log_offset=2**63, log_guid=NEW_GUID), "raise"),
    Case("headers-log-offset-2^64-1", hdr(log_offset=2**64 - 1), "either"),
    Case("headers-log-offset-unaligned", hdr(log_offset=MiB + 512), "either"),

    # --- region tables
    Case("region1-signature", flip(lambda L: RT1), "either"),
    Case("region1-crc", flip(lambda L: RT1 + 4), "either"),
    Case("regions-both-signature", compose(flip(lambda L: RT1), flip(lambda L: RT2)), "raise"),
    Case("regions-both-zeroed", lambda buf, L: buf.__setitem__(slice(RT1, RT2 + 0x10000), bytes(0x20000)), "raise"),
    Case("regions-count-65535", both_tables(lambda buf, L, rt: struct.pack_into("<I", buf, rt + 8, 65535)), "raise"),
    Case("regions-count-2048", both_tables(lambda buf, L, rt: struct.pack_into("<I", buf, rt + 8, 2048)), "raise"),
    Case("regions-count-0", both_tables(lambda buf, L, rt: struct.pack_into("<I", buf, rt + 8, 0)), "raise"),
    Case("regions-count-1", both_tables(lambda buf, L, rt: struct.pack_into("<I", buf, rt + 8, 1)), "raise"),
    Case("regions-count-0x7fffffff-raw", put(lambda L: RT1 + 8, "<I", 0x7FFFFFFF), "either"),
    Case("bat-region-offset-0", set_region(vb.BAT_GUID, file_offset=0), "raise"),
    Case("bat-region-offset-64K", set_region(vb.BAT_GUID, file_offset=0x10000), "raise"),
    Case("bat-region-offset-unaligned", set_region(vb.BAT_GUID, file_offset=2 * MiB + 4096), "either"),
    Case("bat-region-offset-1T", set_region(vb.BAT_GUID, file_offset=1 << 40), "either"),
    Case("bat-region-offset-2^63", set_region(vb.BAT_GUID, file_offset=2**63), "raise"),
    Case("bat-region-offset-2^64-1M", set_region(vb.BAT_GUID, file_offset=2**64 - MiB), "raise"),
    Case("bat-region-length-0", set_region(vb.BAT_GUID, length=0), "raise"),
    Case("bat-region-length-4G", set_region(vb.BAT_GUID, length=0xFFF00000), "either"),
    Case("bat-region-length-unaligned", set_region(vb.BAT_GUID, length=4096), "either"),
    Case("bat-region-over-metadata", lambda buf, L: set_region(vb.BAT_GUID, file_offset=L.metadata_offset)(buf, L), "raise"),
    Case("bat-region-over-log", lambda buf, L: set_region(vb.BAT_GUID, file_offset=L.log_offset)(buf, L), "raise"),
    Case("metadata-region-offset-0", set_region(vb.METADATA_GUID, file_offset=0), "raise"),
    Case("metadata-region-offset-2^64-1M", set_region(vb.METADATA_GUID, file_offset=2**64 - MiB), "raise"),
    Case("metadata-region-length-0", set_region(vb.METADATA_GUID, length=0), "raise"),
    Case("metadata-region-length-4G", set_region(vb.METADATA_GUID, length=0xFFF00000), "either"),
    Case("regions-required-reserved-bits", set_region(vb.BAT_GUID, required=0xFFFFFFFF), "either"),
    Case("regions-unknown-required", add_region(NEW_GUID, 60 * MiB, MiB, 1), "raise", error=vhdx.UnsupportedError),
    Case("regions-unknown-optional", add_region(NEW_GUID, 60 * MiB, MiB, 0), "either"),
    Case("regions-duplicate-bat", lambda buf, L: add_region(vb.BAT_GUID, L.bat_offset, L.bat_length, 1)(buf, L), "either"),

    # --- metadata table and items (no checksum: every edit reaches the parser)
    Case("metadata-signature", flip(lambda L: L.metadata_offset), "raise"),
    Case("metadata-count-65535", put(lambda L: L.metadata_offset + 10, "<H", 65535), "raise"),
    Case("metadata-count-2048", put(lambda L: L.metadata_offset + 10, "<H", 2048), "raise"),
    Case("metadata-count-0", put(lambda L: L.metadata_offset + 10, "<H", 0), "raise"),
    Case("virtual-size-2^64-1", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 2**64 - 1), "raise"),
    Case("virtual-size-2^63", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 2**63), "raise"),
    Case("virtual-size-64T+1M", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", (64 << 40) + MiB), "raise"),
    Case("virtual-size-64T", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 64 << 40), "raise"),   # BAT region too small
    Case("virtual-size-1T", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 1 << 40), "raise"),     # BAT region too small
    Case("virtual-size-100G", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 100 << 30), "either"),  # fits a 1 MiB BAT with 512
    Case("virtual-size-0", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 0), "either"),
    Case("virtual-size-1000", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 1000), "raise"),
    Case("virtual-size-8M+512", md_item(vb.VIRTUAL_DISK_SIZE, "<Q", 8 * MiB + 512), "either"),
    Case("block-size-0", md_item(vb.FILE_PARAMETERS, "<I", 0), "raise"),
    Case("block-size-3M", md_item(vb.FILE_PARAMETERS, "<I", 3 * MiB), "raise"),
    Case("block-size-1M+1", md_item(vb.FILE_PARAMETERS, "<I", MiB + 1), "raise"),
    Case("block-size-512K", md_item(vb.FILE_PARAMETERS, "<I", MiB // 2), "raise"),
    Case("block-size-2^31", md_item(vb.FILE_PARAMETERS, "<I", 2**31), "raise"),
    Case("block-size-2^32-1", md_item(vb.FILE_PARAMETERS, "<I", 2**32 - 1), "raise"),
    Case("block-size-256M", md_item(vb.FILE_PARAMETERS, "<I", 256 * MiB), "either"),
    Case("file-params-has-parent-no-locator", md_item_at(vb.FILE_PARAMETERS, 4, "<I", 2), "raise"),
    Case("file-params-reserved-bits",
         lambda buf, L: md_item_at(vb.FILE_PARAMETERS, 4, "<I", 0xFFFFFFFC | int(L.leave_allocated))(buf, L),
         "either"),
    Case("logical-sector-1000", md_item(vb.LOGICAL_SECTOR_SIZE, "<I", 1000), "raise"),
    Case("logical-sector-0", md_item(vb.LOGICAL_SECTOR_SIZE, "<I", 0), "raise"),
    Case("logical-sector-2^31", md_item(vb.LOGICAL_SECTOR_SIZE, "<I", 2**31), "raise"),
    Case("logical-sector-swapped", lambda buf, L: md_item(vb.LOGICAL_SECTOR_SIZE, "<I", 4608 - L.logical_sector_size)(buf, L), "either"),
    Case("physical-sector-1000", md_item(vb.PHYSICAL_SECTOR_SIZE, "<I", 1000), "either"),
    Case("item-offset-past-region", md_entry(vb.VIRTUAL_DISK_SIZE, offset=0xFFFFFFF0), "raise"),
    Case("item-offset-end-of-region", lambda buf, L: md_entry(vb.VIRTUAL_DISK_SIZE, offset=L.regions[vb.METADATA_GUID][2] - 4)(buf, L), "raise"),
    Case("item-offset-inside-table", md_entry(vb.VIRTUAL_DISK_SIZE, offset=16), "either"),
    Case("item-length-4G", md_entry(vb.VIRTUAL_DISK_SIZE, length=0xFFFFFFFF), "raise"),
    Case("item-length-1M+1", md_entry(vb.FILE_PARAMETERS, length=MiB + 1), "raise"),
    Case("item-length-0-required", md_entry(vb.FILE_PARAMETERS, length=0, offset=0), "raise"),
    Case("item-length-short", md_entry(vb.VIRTUAL_DISK_SIZE, length=4), "raise"),
    Case("item-missing-virtual-size", md_entry(vb.VIRTUAL_DISK_SIZE, item_id=NEW_GUID, flags=0), "raise"),
    Case("item-missing-file-params", md_entry(vb.FILE_PARAMETERS, item_id=NEW_GUID, flags=0), "raise"),
    Case("item-unknown-required", md_add_entry(NEW_GUID, 0x4), "raise", error=vhdx.UnsupportedError),
    Case("item-unknown-optional", md_add_entry(NEW_GUID, 0x0), "ok"),
    Case("item-unknown-user", md_add_entry(NEW_GUID, 0x1), "ok"),
    Case("item-duplicate-virtual-size", md_add_entry(vb.VIRTUAL_DISK_SIZE, 0x6), "either"),
    Case("item-flags-all", md_entry(vb.VIRTUAL_DISK_SIZE, flags=0xFFFFFFFF), "either"),

    # --- BAT entries (block 0 and 1 hold data in every base; block 3 is unallocated in dynamic bases)
    Case("bat-offset-past-eof", bat_entry(0, (1 << 40) | 6), "either"),
    Case("bat-offset-max", bat_entry(0, 0xFFFFFFFFFFF00000 | 6), "either"),
    Case("bat-offset-2^63", bat_entry(0, (1 << 63) | 6), "either"),
    Case("bat-offset-in-headers", bat_entry(0, 6), "either"),
    Case("bat-offset-log", bat_entry(0, MiB | 6), "either"),
    Case("bat-offset-self", lambda buf, L: bat_entry(0, L.bat_offset | 6)(buf, L), "either"),
    Case("bat-offset-last-block-past-eof", lambda buf, L: bat_entry(7, ((len(buf) + MiB - 1) & ~(MiB - 1)) | 6)(buf, L), "either"),
    Case("bat-two-blocks-same-offset", lambda buf, L: bat_entry(3, struct.unpack_from("<Q", buf, L.bat_entry_offset(0))[0])(buf, L), "either"),
    Case("bat-reserved-bits", bat_entry(0, lambda old: old | 0xFFFF8), "either"),
    Case("bat-state-4", bat_entry(0, lambda old: (old & ~7) | 4), "either"),
    Case("bat-state-5-legacy-unmapped", bat_entry(0, lambda old: (old & ~7) | 5), "either"),
    Case("bat-state-7-in-dynamic", bat_entry(0, lambda old: (old & ~7) | 7), "either"),
    Case("bat-state-7-unallocated", bat_entry(3, 7), "either"),
    Case("bat-state-1-with-offset", bat_entry(1, lambda old: (old & ~7) | 1), "either"),
    Case("bat-state-2-with-offset", bat_entry(1, lambda old: (old & ~7) | 2), "either"),
    Case("bat-state-3-with-offset", bat_entry(1, lambda old: (old & ~7) | 3), "either"),
    Case("bat-sbm-present-in-dynamic", lambda buf, L: struct.pack_into("<Q", buf, L.bat_offset + 8 * L.sbm_index(0), (5 * MiB) | 6)
         if 8 * L.sbm_index(0) < L.bat_length else None, "either"),
    Case("bat-all-ff", lambda buf, L: buf.__setitem__(slice(L.bat_offset, L.bat_offset + 4096), b"\xff" * 4096), "either"),
    Case("bat-all-garbage", garbage(lambda L: L.bat_offset, 4096), "either"),
]

for _c in CASES:
    if _c.name.startswith("bat-") and not _c.name.startswith("bat-region"):
        _c.bases = ("qemu512", "ours4k", "qemufixed")


@pytest.mark.parametrize("base", ["qemu512", "ours4k", "qemufixed", "ours512"])
def test_unmutated_base_reads_as_written(base, base_disks, tmp_path):
    """Sanity check of the bases themselves and of the harness: no mutation, must read back."""
    run_case(Case("identity", lambda buf, L: None, "ok"), base, base_disks, tmp_path)


@pytest.mark.parametrize("case,base", [(c, b) for c in CASES for b in c.bases],
                         ids=[f"{c.name}-{b}" for c in CASES for b in c.bases])
def test_mutated_file_raises_only_vhdx_errors(case, base, base_disks, tmp_path):
    run_case(case, base, base_disks, tmp_path)


# ------------------------------------------------------------------ parent locators (§4.8, §4.9, §9.3)

VHDX_LOCATOR_TYPE = uuid.UUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")


def _u16(text: str) -> bytes:
    return text.encode("utf-16-le", errors="surrogatepass")


def read_locator(buf, L) -> tuple[uuid.UUID, list[tuple[bytes, bytes]]]:
    at = L.metadata[vb.PARENT_LOCATOR].item_file_offset
    count, = struct.unpack_from("<H", buf, at + 18)
    pairs = []
    for i in range(count):
        ko, vo, kl, vl = struct.unpack_from("<IIHH", buf, at + 20 + 12 * i)
        pairs.append((bytes(buf[at + ko:at + ko + kl]), bytes(buf[at + vo:at + vo + vl])))
    return uuid.UUID(bytes_le=bytes(buf[at:at + 16])), pairs


def write_locator(buf, L, locator_type: uuid.UUID, pairs: list[tuple[bytes, bytes]],
                  entries: list[tuple[int, int, int, int]] | None = None) -> None:
    """Rebuild the locator item in place (same item offset) and fix its table entry length.
    ``entries`` overrides the (key_offset, value_offset, key_length, value_length) rows."""
    rows, blob = [], b""
    at = 20 + 12 * len(pairs)
    for key, value in pairs:
        rows.append((at, at + len(key), len(key), len(value)))
        blob += key + value
        at += len(key) + len(value)
    rows = entries if entries is not None else rows
    item = (locator_type.bytes_le + struct.pack("<HH", 0, len(pairs)) +
            b"".join(struct.pack("<IIHH", *r) for r in rows) + blob)
    e = L.metadata[vb.PARENT_LOCATOR]
    start = e.item_file_offset
    buf[start:start + max(len(item), e.length)] = item + bytes(max(0, e.length - len(item)))
    struct.pack_into("<I", buf, e.entry_file_offset + 20, len(item))


def locator(edit):
    """Mutation: ``edit(pairs: dict[str, str]) -> dict`` on the decoded key/value pairs."""
    def mutate(buf, L):
        kind, pairs = read_locator(buf, L)
        d = {k.decode("utf-16-le"): v.decode("utf-16-le") for k, v in pairs}
        d = edit(dict(d))
        write_locator(buf, L, kind, [(_u16(k), _u16(v)) for k, v in d.items()])
    return mutate


def locator_raw(edit):
    """Mutation on the raw item bytes (header and entry rows)."""
    def mutate(buf, L):
        at = L.metadata[vb.PARENT_LOCATOR].item_file_offset
        edit(buf, at)
    return mutate


def only_paths(**paths):
    def edit(d):
        keep = {k: v for k, v in d.items() if k.startswith("parent_linkage")}
        keep.update(paths)
        return keep
    return edit


LOCATOR_CASES = [
    Case("loc-unchanged", lambda buf, L: None, "ok"),
    Case("loc-count-65535", locator_raw(lambda b, at: struct.pack_into("<H", b, at + 18, 65535)), "either"),
    Case("loc-count-0", locator_raw(lambda b, at: struct.pack_into("<H", b, at + 18, 0)), "raise"),
    Case("loc-key-offset-past-item", locator_raw(lambda b, at: struct.pack_into("<I", b, at + 20, 0xFFFFFFF0)), "either"),
    Case("loc-value-offset-0", locator_raw(lambda b, at: struct.pack_into("<I", b, at + 24, 0)), "either"),
    Case("loc-value-length-ffff", locator_raw(lambda b, at: struct.pack_into("<H", b, at + 30, 0xFFFF)), "either"),
    Case("loc-key-length-odd", locator_raw(lambda b, at: struct.pack_into("<H", b, at + 28, 27)), "either"),
    Case("loc-type-unknown", locator_raw(lambda b, at: b.__setitem__(slice(at, at + 16), NEW_GUID.bytes_le)), "raise"),
    Case("loc-item-length-10", md_entry(vb.PARENT_LOCATOR, length=10), "raise"),
    Case("loc-item-length-0", md_entry(vb.PARENT_LOCATOR, length=0, offset=0), "raise"),
    Case("loc-no-linkage", locator(lambda d: {k: v for k, v in d.items() if k != "parent_linkage"}), "raise"),
    Case("loc-linkage-garbage", locator(lambda d: {**d, "parent_linkage": "{zzzz-not-a-guid}"}), "raise"),
    Case("loc-linkage-empty-braces", locator(lambda d: {**d, "parent_linkage": "{}"}), "raise"),
    Case("loc-linkage-mismatch", locator(lambda d: {**d, "parent_linkage": "{" + str(NEW_GUID) + "}"}), "raise",
         error=vhdx.ChainError),
    Case("loc-linkage2-garbage", locator(lambda d: {**d, "parent_linkage2": "garbage"}), "either"),
    Case("loc-no-paths", locator(only_paths()), "raise"),
    Case("loc-path-to-self", lambda buf, L: None, "raise"),        # filled in by the test (needs the name)
    Case("loc-path-to-directory", locator(only_paths(relative_path=".\\")), "raise"),
    Case("loc-path-to-dev-zero", locator(only_paths(absolute_win32_path="/dev/zero", relative_path="/dev/zero")), "raise"),
    Case("loc-path-to-fifo", locator(only_paths(relative_path=".\\evil.fifo")), "raise"),
    Case("loc-path-traversal", locator(only_paths(relative_path="..\\" * 40 + "etc\\passwd")), "raise"),
    Case("loc-path-embedded-nul", locator(only_paths(relative_path=".\\parent.vhdx\0.x")), "either"),
    Case("loc-path-lone-surrogate", locator(only_paths(relative_path=".\\parent\ud800.vhdx")), "raise"),
    Case("loc-path-30000-chars", locator(only_paths(relative_path="a" * 30000)), "raise"),
    Case("loc-path-unmapped-volume", locator(only_paths(volume_path="\\\\?\\Volume{00000000-1111-2222-3333-444444444444}\\x.vhdx")), "raise"),
    Case("loc-duplicate-keys", lambda buf, L: write_locator(buf, L, VHDX_LOCATOR_TYPE,
         read_locator(buf, L)[1] + [(_u16("relative_path"), _u16("elsewhere.vhdx"))]), "either"),
]


@pytest.mark.parametrize("case", LOCATOR_CASES, ids=[c.name for c in LOCATOR_CASES])
def test_hostile_parent_locator_raises_only_vhdx_errors(case, base_disks, tmp_path):
    """A child's locator decides which files get opened: it may only lead to VhdxError
    (ParentNotFoundError, ParentMismatchError, ChainCycleError, CorruptError...), in time."""
    if case.name == "loc-path-to-fifo":
        os.mkfifo(tmp_path / "evil.fifo")
    if case.name == "loc-path-to-self":
        case = Case(case.name, locator(only_paths(relative_path=f".\\{case.name}.vhdx")), "raise")
    # Except for the control case, the real parent is absent: only the mutated locator decides.
    run_case(case, "child", base_disks, tmp_path, with_parent=case.name == "loc-unchanged")


# ------------------------------------------------------------------ hand-built logs (§8)

LOG_GUID = uuid.UUID("5ca1ab1e-0000-4000-8000-00000000feed")
SEQ = 0x011CA264_063FE554       # high half non-zero, as Windows writes (§8.2)


def _dirty(buf: bytearray, L: vb.Layout, *, block: int = 3, place: str = "start",
           tweak: Callable[[dict], None] | None = None, raw_entry_edit: Callable[[bytearray], None] | None = None,
           log_guid_in_entries: uuid.UUID = LOG_GUID, header_guid: uuid.UUID = LOG_GUID) -> bytes:
    """Make ``buf`` a file with an unreplayed log whose entry maps ``block`` to new data.

    The data (a 0x5A fill) is appended at the end of the file as a real writer would; the BAT
    page change lives only in the log. ``place="wrapping"`` puts the second entry across the
    end of the log region (§8.1). Returns the new file bytes.
    """
    file_end = (len(buf) + MiB - 1) & ~(MiB - 1)
    new_data_at = file_end
    buf.extend(bytes(file_end - len(buf)))
    buf.extend(b"\x5a" * L.block_size)
    last = len(buf)
    page_at = L.bat_entry_offset(block) & ~4095
    page = bytearray(buf[page_at:page_at + 4096])
    struct.pack_into("<Q", page, L.bat_entry_offset(block) - page_at, new_data_at | vb.PAYLOAD_BLOCK_FULLY_PRESENT)
    p = dict(pages=[(page_at, bytes(page))], zeros=[], flushed=last, last=last, seq=SEQ)
    if tweak:
        tweak(p)
    log_len = L.log_length
    first_at = 0 if place == "start" else log_len - 8192
    second_at = (first_at + 4096) % log_len
    e1 = vb.build_log_entry(sequence_number=p["seq"], log_guid=log_guid_in_entries, tail=first_at,
                            flushed_file_offset=p["flushed"], last_file_offset=p["last"])
    e2 = bytearray(vb.build_log_entry(sequence_number=p["seq"] + 1, log_guid=log_guid_in_entries, tail=first_at,
                                      pages=p["pages"], zeros=p["zeros"],
                                      flushed_file_offset=p["flushed"], last_file_offset=p["last"]))
    if raw_entry_edit:
        raw_entry_edit(e2)
    log = bytearray(buf[L.log_offset:L.log_offset + log_len])
    log[:] = bytes(log_len)
    for at, entry in ((first_at, e1), (second_at, bytes(e2))):
        for i in range(0, len(entry), 4096):
            pos = (at + i) % log_len
            log[pos:pos + 4096] = entry[i:i + 4096]
    buf[L.log_offset:L.log_offset + log_len] = log
    vb.set_header_fields(buf, (0, 1), log_guid=header_guid)
    return bytes(buf)


def _expected_after(virtual: bytes, L: vb.Layout, block: int = 3) -> str:
    model = bytearray(virtual)
    start = block * L.block_size
    model[start:start + L.block_size] = b"\x5a" * min(L.block_size, len(model) - start)
    return hashlib.sha256(model).hexdigest()


@pytest.mark.parametrize("base", ["qemu512", "ours4k"])
@pytest.mark.parametrize("place", ["start", "wrapping"])
def test_handbuilt_dirty_log_is_replayed(base, place, base_disks, tmp_path):
    """A valid unreplayed log: read-only must replay in memory (and not write), r+ on disk."""
    file_bytes, virtual = base_disks(base)
    buf = bytearray(file_bytes)
    L = vb.parse_layout(buf)
    data = _dirty(buf, L, place=place)
    path = tmp_path / "dirty.vhdx"
    path.write_bytes(data)
    before = sha256_file(path)
    ro = exercise(path, "r")
    assert_clean(ro, path)
    assert ro.ok, ro.describe()
    assert sha256_file(path) == before, "read-only open of a dirty file changed the file"
    assert ro.digest == _expected_after(virtual, L), "in-memory replay did not give the replayed contents"
    rw = exercise(path, "r+")
    assert_clean(rw, path)
    assert rw.ok, rw.describe()
    assert rw.digest == ro.digest
    after = vb.parse_layout(bytearray(path.read_bytes()))
    assert after.header_fields["log_guid"] == uuid.UUID(int=0), "clean close left a non-zero LogGuid"
    if base.startswith("qemu") and have("qemu-img"):
        r = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def _edit_desc_count(e):
    struct.pack_into("<I", e, 24, 0xFFFFFFFF)
    vb.restamp_log_entry(e)


def _edit_entry_length(e):
    struct.pack_into("<I", e, 8, 0x7FFFF000)
    vb.restamp_log_entry(e)


def _edit_tail_outside(e):
    struct.pack_into("<I", e, 12, 0x7FFFF000)
    vb.restamp_log_entry(e)


def _edit_desc_seq(e):
    struct.pack_into("<Q", e, 64 + 24, 12345)
    vb.restamp_log_entry(e)


def _edit_data_sector_seq(e):
    struct.pack_into("<I", e, 4096 + 4, 7)
    vb.restamp_log_entry(e)


def _edit_desc_signature(e):
    e[64:68] = b"XXXX"
    vb.restamp_log_entry(e)


def _edit_crc(e):
    e[100] ^= 1


LOG_CASES = [
    # (name, expectation, kwargs for _dirty)
    ("flushed-offset-past-eof", "raise", dict(tweak=lambda p: p.update(flushed=1 << 40))),
    ("flushed-offset-2^64-1M", "raise", dict(tweak=lambda p: p.update(flushed=2**64 - MiB))),
    ("last-offset-2^62", "either", dict(tweak=lambda p: p.update(last=1 << 62))),
    ("last-offset-2^64-1M", "either", dict(tweak=lambda p: p.update(last=2**64 - MiB))),
    ("page-target-0", "either", dict(tweak=lambda p: p["pages"].append((0, bytes(4096))))),
    ("page-target-header1", "either", dict(tweak=lambda p: p["pages"].append((0x10000, bytes(4096))))),
    ("page-target-1T", "either", dict(tweak=lambda p: p["pages"].append((1 << 40, b"\x33" * 4096)))),
    ("page-target-2^63", "either", dict(tweak=lambda p: p["pages"].append((2**63, b"\x33" * 4096)))),
    ("page-target-unaligned", "either", dict(tweak=lambda p: p["pages"].append((0x300001, b"\x33" * 4096)))),
    ("page-target-inside-log", "either", dict(tweak=lambda p: p["pages"].append((MiB, b"\x33" * 4096)))),
    ("zero-length-2^50", "either", dict(tweak=lambda p: p["zeros"].append((64 * MiB, 1 << 50)))),
    ("zero-length-2^64-4K", "either", dict(tweak=lambda p: p["zeros"].append((64 * MiB, 2**64 - 4096)))),
    ("zero-length-unaligned", "either", dict(tweak=lambda p: p["zeros"].append((64 * MiB, 100)))),
    ("zero-target-2^64-4K", "either", dict(tweak=lambda p: p["zeros"].append((2**64 - 4096, 4096)))),
    ("many-descriptors", "either", dict(tweak=lambda p: p["pages"].extend(
        [(64 * MiB + 4096 * i, b"\x44" * 4096) for i in range(300)]))),
    ("descriptor-count-ffffffff", "either", dict(raw_entry_edit=_edit_desc_count)),
    ("entry-length-7ffff000", "either", dict(raw_entry_edit=_edit_entry_length)),
    ("tail-outside-log", "either", dict(raw_entry_edit=_edit_tail_outside)),
    ("descriptor-sequence-mismatch", "either", dict(raw_entry_edit=_edit_desc_seq)),
    ("data-sector-sequence-mismatch", "either", dict(raw_entry_edit=_edit_data_sector_seq)),
    ("descriptor-signature", "either", dict(raw_entry_edit=_edit_desc_signature)),
    ("entry-crc", "either", dict(raw_entry_edit=_edit_crc)),
    ("sequence-0", "either", dict(tweak=lambda p: p.update(seq=0))),
    ("sequence-2^64-1", "either", dict(tweak=lambda p: p.update(seq=2**64 - 2))),
    ("stale-log-guid-only", "raise", dict(log_guid_in_entries=NEW_GUID)),
]


@pytest.mark.parametrize("base", ["qemu512", "ours4k"])
@pytest.mark.parametrize("name,expect,kw", LOG_CASES, ids=[c[0] for c in LOG_CASES])
def test_hostile_log_raises_only_vhdx_errors(name, expect, kw, base, base_disks, tmp_path):
    file_bytes, virtual = base_disks(base)
    buf = bytearray(file_bytes)
    L = vb.parse_layout(buf)
    data = _dirty(buf, L, **kw)
    run_case(Case(f"log-{name}", lambda b, _L: data, expect), base,
             lambda _n: (file_bytes, virtual), tmp_path)


@pytest.mark.parametrize("base", ["qemu512", "ours4k"])
@pytest.mark.parametrize("log_fill", ["garbage", "zeros", "loge-signatures"])
def test_dirty_log_guid_with_unusable_log_is_refused(log_fill, base, base_disks, tmp_path):
    """LogGuid != 0 but no valid entry: the file is corrupt (docs/format.md §8.5)."""
    file_bytes, virtual = base_disks(base)
    buf = bytearray(file_bytes)
    L = vb.parse_layout(buf)
    import random
    rng = random.Random(5)
    if log_fill == "garbage":
        fill = bytes(rng.randrange(256) for _ in range(L.log_length))
    elif log_fill == "zeros":
        fill = bytes(L.log_length)
    else:
        sector = bytearray(4096)
        sector[0:4] = b"loge"
        struct.pack_into("<IIQ", sector, 8, 4096, 0, 1)
        sector[32:48] = LOG_GUID.bytes_le
        fill = bytes(sector) * (L.log_length // 4096)
    buf[L.log_offset:L.log_offset + L.log_length] = fill
    vb.set_header_fields(buf, (0, 1), log_guid=LOG_GUID)
    run_case(Case(f"dirty-{log_fill}", lambda b, _L: None, "raise"), base,
             lambda _n: (bytes(buf), virtual), tmp_path)


# ------------------------------------------------------------------ random byte flips

def _hot_ranges(L: vb.Layout) -> list[tuple[int, int]]:
    md = L.metadata_offset
    return [(H1, H1 + 80), (H2, H2 + 80), (RT1, RT1 + 16 + 32 * len(L.regions)),
            (md, md + 32 + 32 * len(L.metadata)), (md + 0x10000, md + 0x10000 + 64),
            (L.bat_offset, L.bat_offset + 64), (L.log_offset, L.log_offset + 8192)] + (
        [(L.metadata[vb.PARENT_LOCATOR].item_file_offset,
          L.metadata[vb.PARENT_LOCATOR].item_file_offset + L.metadata[vb.PARENT_LOCATOR].length)]
        if vb.PARENT_LOCATOR in L.metadata else [])


try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:   # pragma: no cover
    st = None

if st is not None:
    _MAX = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "50"))

    @pytest.mark.parametrize("base", ["qemu512-dirty", "ours4k", "child"])
    def test_random_byte_flips_raise_only_vhdx_errors(base, base_disks):
        name = base.split("-")[0]
        file_bytes, virtual = base_disks(name)
        buf0 = bytearray(file_bytes)
        L = vb.parse_layout(buf0)
        if base.endswith("-dirty"):
            buf0 = bytearray(_dirty(buf0, L))
        hot = _hot_ranges(L)
        limit = min(4 * MiB, len(buf0))
        offset = st.one_of(st.integers(0, limit - 1),
                           st.sampled_from(hot).flatmap(lambda r: st.integers(r[0], r[1] - 1)))
        flips = st.lists(st.tuples(offset, st.integers(1, 255)), min_size=1, max_size=8)

        @settings(max_examples=_MAX, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(flips=flips, restamp=st.booleans(), mode=st.sampled_from(["r", "r", "r+"]))
        def check(flips, restamp, mode):
            buf = bytearray(buf0)
            for at, mask in flips:
                buf[at] ^= mask
            if restamp:
                vb.stamp_all(buf)
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "flipped.vhdx"
                path.write_bytes(buf)
                if name == "child":
                    (Path(d) / PARENT_NAME).write_bytes(base_disks("child:parent")[0])
                out = exercise(path, mode)
                assert_clean(out, path)

        check()


# ------------------------------------------------------------------ the command line

def _cli(*args: str) -> subprocess.CompletedProcess:
    return run_subprocess(*args, timeout=60)


def _bad_files(tmp_path: Path, base_disks) -> dict[str, Path]:
    file_bytes, _ = base_disks("qemu512")
    files = {}
    files["missing"] = tmp_path / "does-not-exist.vhdx"
    (tmp_path / "empty.vhdx").write_bytes(b"")
    files["empty"] = tmp_path / "empty.vhdx"
    (tmp_path / "garbage.vhdx").write_bytes(os.urandom(2 * MiB))
    files["garbage"] = tmp_path / "garbage.vhdx"
    (tmp_path / "short.vhdx").write_bytes(file_bytes[:100])
    files["short"] = tmp_path / "short.vhdx"
    b = bytearray(file_bytes)
    b[H1] ^= 1
    b[H2] ^= 1
    (tmp_path / "no header.vhdx").write_bytes(b)       # a space, to check quoting
    files["no-header"] = tmp_path / "no header.vhdx"
    b = bytearray(file_bytes)
    b[vb.parse_layout(b).metadata_offset] ^= 1
    (tmp_path / "bad-metadata.vhdx").write_bytes(b)
    files["bad-metadata"] = tmp_path / "bad-metadata.vhdx"
    d = tmp_path / "a-directory.vhdx"
    d.mkdir()
    files["directory"] = d
    return files


UNOPENABLE = ("missing", "directory")                    # not a file we can read at all
CORRUPT = ("empty", "garbage", "short", "no-header", "bad-metadata")


@pytest.mark.parametrize("verb", ["info", "check"])
@pytest.mark.parametrize("kind", UNOPENABLE + CORRUPT)
def test_cli_reports_unreadable_file_in_one_line(verb, kind, tmp_path, base_disks):
    """info: exit non-zero, one line on stderr naming the file. check (the exit codes of qemu-img
    check): 1 when the file cannot be read at all; for a corrupt file 2 (findings on stdout) or 1
    (the check could not be completed: one line on stderr)."""
    path = _bad_files(tmp_path, base_disks)[kind]
    r = _cli(verb, str(path))
    assert r.returncode != 0, f"exit 0 for an unreadable file; stdout={r.stdout!r}"
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    if verb == "check":
        allowed = (1,) if kind in UNOPENABLE else (1, 2)
        assert r.returncode in allowed, f"check exit {r.returncode}, expected {allowed}: {r.stdout!r} {r.stderr!r}"
        if r.returncode == 2:
            assert path.name in r.stdout, f"check findings do not name the file: {r.stdout!r}"
            assert not r.stderr, f"check with findings wrote to stderr: {r.stderr!r}"
            return
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {r.stderr!r}"
    assert path.name in lines[0], f"stderr does not name the file: {lines[0]!r}"


def test_cli_check_reports_bat_entry_past_eof(tmp_path, base_disks):
    """A structural error inside an openable file: check finds it and exits 2, no traceback."""
    file_bytes, _ = base_disks("qemu512")
    buf = bytearray(file_bytes)
    L = vb.parse_layout(buf)
    struct.pack_into("<Q", buf, L.bat_entry_offset(1), (1 << 40) | 6)
    path = tmp_path / "bat-past-eof.vhdx"
    path.write_bytes(buf)
    r = _cli("check", str(path))
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, f"check exit {r.returncode}; stdout={r.stdout!r} stderr={r.stderr!r}"


@pytest.mark.parametrize("base", ["qemu512", "ours4k"])
def test_cli_info_and_check_on_valid_file(base, tmp_path, base_disks):
    file_bytes, _ = base_disks(base)
    path = tmp_path / "ok.vhdx"
    path.write_bytes(file_bytes)
    for verb in ("info", "check"):
        r = _cli(verb, str(path))
        assert r.returncode == 0, f"{verb}: exit {r.returncode}; {r.stderr!r}"
        assert r.stdout.strip(), f"{verb} printed nothing"


def test_cli_debug_flag_shows_traceback(tmp_path):
    path = tmp_path / "empty.vhdx"
    path.write_bytes(b"")
    r = _cli("--debug", "info", str(path))
    if r.returncode == 2 and "unrecognized arguments" in r.stderr or "invalid choice" in r.stderr:
        r = _cli("info", "--debug", str(path))
    assert r.returncode != 0
    assert "Traceback" in r.stderr, f"--debug should show the traceback: {r.stderr!r}"
