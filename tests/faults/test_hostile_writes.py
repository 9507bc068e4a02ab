"""Hostile logs and BATs are refused before anything is written; positions are checked.

* A log entry we did not write is bounded before replay (vhdx/log.py): a zero descriptor
  of 64 TiB, 4 GiB past the end, zero runs adding up to more than the file, a LastFileOffset
  of 1 TiB, a page at 100 GiB. ``vhdx.open(p, "r+")``, ``reparent`` and ``merge`` on such a file
  fail within 1 s and 100 MiB with a ``VhdxError`` and change no byte; the read-only open does
  not allocate the zeros either. A legitimately dirty log that grows the file by a block and
  a sector bitmap (what Windows logs) is still replayed.
* Sector-bitmap BAT entries are validated like payload entries before a write: one that
  points at the metadata region, the BAT, a payload block, or that has an invalid state makes
  "r+" fail with the BAT entry's offset, while a read-only open still reads and ``vhdx check``
  reports it. A payload entry in the reserved state 4 is refused for writing too (it reads
  as zeros).
* Every positional API refuses a negative or non-integer offset or length with UsageError.

While a case runs, the process may not write files past 256 MiB (RLIMIT_FSIZE, SIGXFSZ
ignored), so the unbounded writes of the old code fail fast instead of filling the disk.
"""

from __future__ import annotations

import hashlib
import resource
import signal
import struct
import uuid
from pathlib import Path

import pytest

import vhdxbits as vb
from conftest import Guard

import vhdx
import vhdx.ops.check  # noqa: E402
from vhdx.errors import LogReplayError, UsageError  # noqa: E402
from vhdx.file.image import Image  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
LOG_GUID = uuid.UUID("0badc0de-0000-4000-8000-00000000beef")
SEQ = 0x011CA264_063FE554
CASE_SECONDS = 1.0
CASE_PEAK = 100 * MiB


@pytest.fixture(autouse=True)
def _file_size_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    cap = 256 * MiB
    resource.setrlimit(resource.RLIMIT_FSIZE, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, old_handler)


def digest(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def make_disk(path: Path) -> Path:
    with vhdx.create(str(path), 8 * MiB, block_size=MiB, logical_sector_size=512) as d:
        d.pwrite(b"\x11" * (MiB + 4096), 0)
    return path


def make_chain(folder: Path) -> tuple[Path, Path]:
    parent = make_disk(folder / "parent.vhdx")
    child = folder / "child.avhdx"
    with vhdx.create(str(child), parent=str(parent), block_size=MiB) as d:
        d.pwrite(b"\x22" * 65536, 5 * MiB + 128 * 1024)     # PARTIALLY_PRESENT block 5
    return parent, child


def plant_log(path: Path, *, pages=(), zeros=(), last: int | None = None, flushed: int | None = None) -> None:
    """Give ``path`` an unreplayed log: an empty entry, then one with ``pages`` and ``zeros``."""
    buf = bytearray(path.read_bytes())
    L = vb.parse_layout(buf)
    size = len(buf)
    flushed = size // MiB * MiB if flushed is None else flushed
    last = -(-size // MiB) * MiB if last is None else last
    e1 = vb.build_log_entry(sequence_number=SEQ, log_guid=LOG_GUID, tail=0, flushed_file_offset=flushed,
                            last_file_offset=flushed)
    e2 = vb.build_log_entry(sequence_number=SEQ + 1, log_guid=LOG_GUID, tail=0, pages=list(pages),
                            zeros=list(zeros), flushed_file_offset=flushed, last_file_offset=last)
    log = bytearray(L.log_length)
    log[:len(e1)] = e1
    log[len(e1):len(e1) + len(e2)] = e2
    buf[L.log_offset:L.log_offset + L.log_length] = log
    vb.set_header_fields(buf, (0, 1), log_guid=LOG_GUID)
    path.write_bytes(bytes(buf))


def bat_page(path: Path, block: int, entry: int) -> tuple[int, bytes]:
    """The 4 KiB BAT page holding ``block``'s entry, with that entry replaced."""
    buf = path.read_bytes()
    L = vb.parse_layout(bytearray(buf))
    at = L.bat_entry_offset(block)
    page_at = at & ~4095
    page = bytearray(buf[page_at:page_at + 4096])
    struct.pack_into("<Q", page, at - page_at, entry)
    return page_at, bytes(page)


def guarded(fn) -> tuple[BaseException | None, Guard]:
    """Run ``fn`` under the 1 s / 100 MiB guard; return what it raised."""
    error = None
    with Guard(CASE_SECONDS, CASE_PEAK) as g:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - judged by the caller
            error = e
    return error, g


# ------------------------------------------------------------------ hostile logs

HOSTILE_LOGS = {
    "zero-64TiB-inside": dict(zeros=[(4 * MiB, 1 << 46)]),
    "zero-4GiB": dict(zeros=[(4 * MiB, 4 * GiB)]),
    "zero-runs-add-up": dict(zeros=[(2 * MiB + 4096 * (i % 4), 8 * MiB) for i in range(120)]),
    "last-file-offset-1TiB": dict(last=1 << 40),
    "page-at-100GiB": dict(pages=[(100 * GiB, b"\x33" * 4096)]),
    "zero-past-last-offset": dict(zeros=[(9 * MiB, 2 * GiB)], last=16 * MiB),
}


@pytest.mark.parametrize("case", list(HOSTILE_LOGS))
def test_hostile_log_is_refused_before_any_write(case: str, tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    plant_log(path, **HOSTILE_LOGS[case])
    before = digest(path)
    for mode in ("r+", "r"):
        error, g = guarded(lambda: vhdx.open(str(path), mode).close())
        assert isinstance(error, LogReplayError), f"[{mode}] {type(error).__name__}: {error}"
        assert str(path) in str(error) and error.offset is not None
        assert not g.verdict(), f"[{mode}] " + "; ".join(g.verdict())
        assert digest(path) == before, f"[{mode}] the file changed"
    report = vhdx.ops.check.check_file(str(path))
    assert report.errors, "vhdx check does not report the hostile log"
    assert digest(path) == before


def test_reparent_and_merge_refuse_a_child_with_a_hostile_log(tmp_path: Path) -> None:
    parent, child = make_chain(tmp_path)
    plant_log(child, zeros=[(4 * MiB, 1 << 46)])
    before = {p.name: digest(p) for p in (parent, child)}
    for what, fn in (("reparent", lambda: vhdx.reparent(str(child), str(parent))),
                     ("merge", lambda: vhdx.merge(str(child), str(parent)))):
        error, g = guarded(fn)
        assert isinstance(error, vhdx.VhdxError), f"{what}: {type(error).__name__}: {error}"
        assert not g.verdict(), f"{what}: " + "; ".join(g.verdict())
        assert {p.name: digest(p) for p in (parent, child)} == before, f"{what} changed a file"


def test_dirty_log_that_grows_the_file_by_a_block_is_replayed(tmp_path: Path) -> None:
    """What Windows logs: LastFileOffset one 32 MiB block and a 1 MiB bitmap past the durable
    end, the new block's BAT entry, and zeros for the bitmap. The bounds let it through."""
    path = make_disk(tmp_path / "d.vhdx")
    size = path.stat().st_size
    end = -(-size // MiB) * MiB
    block_at = end + MiB
    page = bat_page(path, 3, block_at | vb.PAYLOAD_BLOCK_FULLY_PRESENT)
    plant_log(path, pages=[page], zeros=[(end, MiB)], last=block_at + 32 * MiB)
    with vhdx.open(str(path)) as d:
        assert d.pread(3 * MiB, 4096) == bytes(4096)      # the block is beyond the end: zeros
    with vhdx.open(str(path), "r+") as d:
        d.pwrite(b"\x44" * 4096, 3 * MiB)
    assert path.stat().st_size >= block_at + 32 * MiB
    with vhdx.open(str(path)) as d:
        assert d.pread(3 * MiB, 8192) == b"\x44" * 4096 + bytes(4096)
        assert d.pread(0, 4096) == b"\x11" * 4096
    assert not vhdx.ops.check.check_file(str(path)).errors


# ------------------------------------------------------------------ sector-bitmap and reserved BAT entries

def set_bat_entry(path: Path, bat_index: int, entry: int) -> int:
    buf = bytearray(path.read_bytes())
    L = vb.parse_layout(buf)
    at = L.bat_offset + 8 * bat_index
    struct.pack_into("<Q", buf, at, entry)
    path.write_bytes(bytes(buf))
    return at


def _child_block_offset(child: Path, block: int) -> int:
    im = Image.open(str(child))
    try:
        return int(im.payload_offsets()[block])
    finally:
        im.close()


SB_PRESENT = 6
SBM_CASES = {
    "metadata-region": lambda child: 2 * MiB | SB_PRESENT,
    "bat-region": lambda child: 3 * MiB | SB_PRESENT,
    "payload-block": lambda child: _child_block_offset(child, 5) | SB_PRESENT,
    "invalid-state-3": lambda child: _child_block_offset(child, 5) + MiB | 3,
}


@pytest.mark.parametrize("case", list(SBM_CASES))
def test_bad_sector_bitmap_entry_refuses_writable_open(case: str, tmp_path: Path) -> None:
    parent, child = make_chain(tmp_path)
    if case == "invalid-state-3":   # a second MiB after block 5 so that the offset is inside the file
        with vhdx.open(str(child), "r+") as d:
            d.pwrite(b"\x55" * MiB, 6 * MiB)
    L = vb.parse_layout(bytearray(child.read_bytes()))
    sbm_index = L.sbm_index(0)
    entry_at = set_bat_entry(child, sbm_index, SBM_CASES[case](child))
    before = digest(child)
    with pytest.raises(vhdx.VhdxError) as info:
        with vhdx.open(str(child), "r+") as d:
            d.pwrite(b"\x66" * 512, 2 * MiB)             # a new partial block: its bits go to the bitmap
    assert info.value.offset == entry_at, str(info.value)
    assert "refusing to write" in str(info.value) and str(child) in str(info.value)
    assert digest(child) == before, "the refused open changed the file"
    with vhdx.open(str(child)) as d:                     # read-only still opens (and reads what it can)
        assert d.pread(0, 4096) == b"\x11" * 4096
    assert vhdx.ops.check.check_file(str(child)).errors, "vhdx check does not report the bad entry"


def test_reserved_payload_state_refuses_writes_and_reads_as_zeros(tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    entry_at = set_bat_entry(path, 0, 4)     # block 0 (holds data) -> reserved state 4
    before = digest(path)
    with pytest.raises(vhdx.VhdxError) as info:
        vhdx.open(str(path), "r+").close()
    assert info.value.offset == entry_at and "refusing to write" in str(info.value)
    assert digest(path) == before
    with vhdx.open(str(path)) as d:
        assert d.pread(0, 4096) == bytes(4096) and d.pread(MiB, 4096) == b"\x11" * 4096


# ------------------------------------------------------------------ positions

BAD_POSITIONS = [-1, -4096, -(8 * MiB), 1.5, "0", None, 2 ** 70 * -1]


@pytest.mark.parametrize("offset", BAD_POSITIONS, ids=repr)
def test_positional_apis_refuse_bad_offsets(offset, tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(str(path)) as d:
        with pytest.raises(UsageError):
            d.pread(offset, 4096)
        with pytest.raises(UsageError):
            d.pread_into(bytearray(4096), offset)
        with pytest.raises(UsageError):
            d.image.readinto_at(memoryview(bytearray(4096)), offset)
    with vhdx.open(str(path), "r+") as d:
        with pytest.raises(UsageError):
            d.pwrite(b"\x01" * 512, offset)
        with pytest.raises(UsageError):
            d.image.write_at(memoryview(b"\x01" * 512), offset)
        with pytest.raises(UsageError):
            d.image.write_extents([(offset, 512, b"\x01" * 512)])
        with pytest.raises(UsageError):
            d.image.write_extents([(0, offset, None)])
        assert not d.image.failed
    with vhdx.open(str(path)) as d:
        assert d.pread(0, 4096) == b"\x11" * 4096 and d.pread(8 * MiB - 4096, 4096) == bytes(4096)


def test_pread_refuses_a_negative_length_and_reads_nothing_past_the_end(tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(str(path)) as d:
        with pytest.raises(UsageError):
            d.pread(0, -1)
        with pytest.raises(UsageError):
            d.pread(0, 2.0)
        assert d.pread(8 * MiB, 10) == b"" and d.pread(8 * MiB - 4, 10) == bytes(4)
        buf = bytearray(4096)
        assert d.pread_into(buf, 0) == 4096 and bytes(buf) == b"\x11" * 4096
