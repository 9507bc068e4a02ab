"""The merge's copy at disk speed: source-file order, joined runs, aligned buffers, each byte once.

* :func:`vhdx.file.copy.file_order` sorts a batch of copies by source file and offset and joins
  copies that continue each other in both files (and only those).
* The copy buffer is page aligned (mmap-backed), not a ``bytearray`` (16 bytes past a page).
* A merge reads each source front to back: a child whose blocks were written in reverse virtual
  order is read at rising file offsets (counted through a read-recording storage).
* A multi-layer merge reads each sector once, from the newest layer that holds it: an older
  layer whose data is all overwritten above it has none of its payload read.
* The deleted files are closed (their space freed) by a background thread; wait_for_release() waits.
* Nothing is cloned on tmpfs/ext4 and the CLI says how many bytes were cloned and copied.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import threading
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import vhdx
import vhdx.file.image
from vhdx.file.image import Image
from vhdx.file import battable
from vhdx.file import copy as copymod
from vhdx.file.storage import FileStorage, Storage
from vhdx.format import constants as C
from vhdx.format import bat as batmod
from vhdx.ops.merge import owners as ownersmod
from vhdx.ops.merge.owners import TRANSPARENT, BatView, extents, owners, planned, window_spans
from vhdx.ops.merge.run import wait_for_release

from support.faults import FaultPlan, merge_through
from support.merging import MiB, check_errors, cli, merge, read_disk


class Recorder(Storage):
    """A read-only storage that records every payload-sized read and hides its descriptor
    (so copies go through :meth:`readinto`, and every byte read is seen)."""

    reads: dict[str, list[tuple[int, int]]] = {}

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.path = inner.path
        self.writable = False

    def readinto(self, buf, offset: int) -> int:
        Recorder.reads.setdefault(os.path.basename(self.path), []).append((offset, len(memoryview(buf))))
        return self.inner.readinto(buf, offset)

    def read(self, offset: int, length: int) -> bytes:
        Recorder.reads.setdefault(os.path.basename(self.path), []).append((offset, length))
        return self.inner.read(offset, length)

    def size(self) -> int:
        return self.inner.size()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def recording(monkeypatch):
    """Every file opened read-only through Image.open records its reads; copies use the buffer."""
    real = vhdx.file.image.FileStorage

    def make(path, writable: bool = False, **kwargs):
        storage = real(path, writable, **kwargs)
        return storage if writable else Recorder(storage)

    Recorder.reads = {}
    monkeypatch.setattr(vhdx.file.image, "FileStorage", make)
    monkeypatch.setattr(copymod, "COPY_METHOD", "preadv")
    yield Recorder.reads


def payload_spans(path: Path) -> list[tuple[int, int]]:
    """(file offset, block size) of every allocated payload block of ``path``."""
    with vhdx.open(str(path)) as d:
        im = d.image
        states, offsets = im.payload_states(), im.payload_offsets()
        bs = im.block_size
    return [(int(offsets[b]), bs) for b in range(len(states))
            if states[b] in (C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)]


def payload_bytes_read(reads: list[tuple[int, int]], spans: list[tuple[int, int]]) -> int:
    """How many of the recorded bytes fall in the payload blocks ``spans``."""
    total = 0
    for off, n in reads:
        for lo, bs in spans:
            total += max(0, min(off + n, lo + bs) - max(off, lo))
    return total


# ------------------------------------------------------------------------------ the copy engine

class Named(Storage):
    def __init__(self, name: str) -> None:
        self.path = name


def test_file_order_sorts_per_source_and_joins_only_runs_contiguous_in_both() -> None:
    a, b = Named("a"), Named("b")
    copies = [
        (a, 300, 9000, 100),   # a: out of order
        (b, 50, 5000, 10),
        (a, 100, 7000, 100),
        (a, 200, 7100, 100),   # continues a@100 in source and destination: joined
        (b, 60, 6000, 10),     # continues b@50 in the source only: not joined
        (a, 0, 100, 100),
    ]
    got = copymod.file_order(copies)
    assert [(s.path, src, dst, n) for s, src, dst, n in got] == [
        ("a", 0, 100, 100), ("a", 100, 7000, 200), ("a", 300, 9000, 100),
        ("b", 50, 5000, 10), ("b", 60, 6000, 10)]
    assert sum(c[3] for c in got) == sum(c[3] for c in copies)


def test_copy_buffer_is_page_aligned(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(copymod, "COPY_METHOD", "preadv")
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = os.urandom(3 * MiB + 512)
    src.write_bytes(data)
    dst.write_bytes(b"")
    s, d = FileStorage(src), FileStorage(dst, writable=True)
    try:
        copier = copymod.Copier(d)
        copier.copy_all([(s, 512, 4096, 3 * MiB)])
        assert isinstance(copier.buffer, mmap.mmap)
        address = ctypes.addressof(ctypes.c_char.from_buffer(copier.buffer))
        assert address % mmap.PAGESIZE == 0
        assert copier.copied == 3 * MiB and copier.cloned == 0
    finally:
        s.close()
        d.close()
    assert dst.read_bytes()[4096:] == data[512:512 + 3 * MiB]


# ------------------------------------------------------------------------------ merges

def reversed_child(folder: Path) -> tuple[Path, Path, bytes]:
    """A base and a child whose 1 MiB blocks were written last block first (file order is the
    reverse of virtual order), plus a few partial blocks. Returns (base, child, model)."""
    size = 12 * MiB
    base = folder / "base.vhdx"
    model = bytearray(size)
    with vhdx.create(str(base), size, block_size=MiB) as d:
        d.seek(0)
        d.write(b"\x11" * (2 * MiB))
    model[:2 * MiB] = b"\x11" * (2 * MiB)
    child = Path(vhdx.snapshot(str(base), block_size=MiB))
    with vhdx.open(str(child), "r+") as d:
        for k in reversed(range(1, 10)):
            data = bytes([k + 1]) * MiB
            d.seek(k * MiB)
            d.write(data)
            model[k * MiB:(k + 1) * MiB] = data
        d.seek(10 * MiB + 4096)
        d.write(b"\xaa" * 8192)
        model[10 * MiB + 4096:10 * MiB + 12288] = b"\xaa" * 8192
    return base, child, bytes(model)


def test_merge_reads_the_child_front_to_back(tmp_path: Path, recording) -> None:
    base, child, model = reversed_child(tmp_path)
    spans = payload_spans(child)
    starts = sorted(lo for lo, _ in spans)
    assert [lo for lo, _ in spans] != starts, "the child's blocks should be out of virtual order in its file"
    recording.clear()
    result = merge(str(child), str(base))
    reads = [(off, n) for off, n in recording.get(child.name, []) if payload_bytes_read([(off, n)], spans)]
    offsets = [off for off, _ in reads]
    assert offsets == sorted(offsets), f"payload reads not in file order: {offsets}"
    # Blocks 1..9 lie back to back in the child's file: the copy joins them into big reads.
    assert len(reads) <= 12, reads
    assert result.bytes_copied == result.plan.bytes_to_copy and result.bytes_cloned == 0
    assert read_disk(base) == model
    assert check_errors(base) == []


def test_multi_layer_merge_reads_each_byte_once(tmp_path: Path, recording) -> None:
    """mid's blocks are all overwritten by leaf: none of mid's payload is read."""
    size = 8 * MiB
    base = tmp_path / "base.vhdx"
    model = bytearray(size)
    with vhdx.create(str(base), size, block_size=MiB) as d:
        d.write(b"\x01" * size)
    mid = Path(vhdx.snapshot(str(base), block_size=MiB))
    with vhdx.open(str(mid), "r+") as d:
        d.seek(2 * MiB)
        d.write(b"\x02" * (4 * MiB))            # whole blocks 2..5
        d.seek(7 * MiB + 512)
        d.write(b"\x03" * 4096)                  # a partial block
    leaf = Path(vhdx.snapshot(str(mid), block_size=MiB))
    with vhdx.open(str(leaf), "r+") as d:
        d.seek(2 * MiB)
        d.write(b"\x04" * (4 * MiB))            # overwrites all of mid's whole blocks
        d.seek(7 * MiB)
        d.write(b"\x05" * (64 * 1024))           # and its partial run
    model[:] = b"\x01" * size
    model[2 * MiB:6 * MiB] = b"\x04" * (4 * MiB)
    model[7 * MiB:7 * MiB + 65536] = b"\x05" * 65536
    mid_spans, leaf_spans = payload_spans(mid), payload_spans(leaf)
    recording.clear()
    result = merge(str(leaf), str(base))
    assert payload_bytes_read(recording.get(mid.name, []), mid_spans) == 0
    leaf_read = payload_bytes_read(recording.get(leaf.name, []), leaf_spans)
    assert leaf_read == result.bytes_copied == 4 * MiB + 65536
    assert result.plan.per_source_bytes.get(str(mid), 0) == 0
    assert read_disk(base) == bytes(model)
    assert check_errors(base) == []


def test_deleted_files_are_released_in_the_background(tmp_path: Path) -> None:
    """The delete is durable when merge() returns (the name is gone, the folder synced); the last
    close, which frees the space, runs in a thread that wait_for_release() (and exit) waits for.
    No map of the child's BAT is left either (a map keeps the file as a descriptor does)."""
    base, child, model = reversed_child(tmp_path)
    result = merge(str(child), str(base))
    assert result.deleted == [str(child)] and not child.exists()
    wait_for_release()
    assert not [t for t in threading.enumerate() if t.name == "vhdx-merge-release"]
    fds = os.listdir("/proc/self/fd")
    still_open = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(child)):
            still_open.append(target)
    assert still_open == [], "the deleted child is still open, its space not freed"
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if str(child) in line]
    assert mapped == [], f"the deleted child is still mapped, its space not freed: {mapped}"
    assert read_disk(base) == model


def flushes_and_header_writes(history: list[str], name: str) -> tuple[int, int]:
    """(flushes, header writes) that one file received, from a FaultPlan's history."""
    ops = [h.split(": ", 1)[1] for h in history if h.split(": ", 1)[0] == name]
    headers = [op for op in ops if op.startswith("write ") and op.endswith(("at 0x10000", "at 0x20000"))]
    return ops.count("flush"), len(headers)


@pytest.mark.parametrize("keep", [False, True], ids=["delete", "keep"])
def test_the_protocol_costs_few_flushes(keep: bool, tmp_path: Path) -> None:
    """The fixed cost of a one-batch merge, counted per file through the fault seam (the delete's
    folder fsync is not a file's). The destination: log start 1, headers 2, journal "copying" 1,
    the batch's data and its log entry 2, "copied" 1, "done" 1, closing flush 1 and headers 2 = 11
    (was 16: each log entry's pages were flushed again after they were applied, and "copied" once
    more). The layer above: its log start, headers and the entry that announces the new GUID = 4,
    then, deleted, nothing more (was 8: it was closed cleanly first); kept, the entry that lets go
    of the destination in the same session, the closing flush and headers = 8 (was 16: two sessions)."""
    base, child, model = reversed_child(tmp_path)
    plan = FaultPlan(None)
    merge_through(plan.wrap, str(child), str(base), keep=keep)
    assert flushes_and_header_writes(plan.history, base.name) == (11, 4)
    assert flushes_and_header_writes(plan.history, child.name) == ((8, 4) if keep else (4, 2))
    assert read_disk(base) == model and check_errors(base) == []
    assert child.exists() == keep


def test_cli_reports_cloned_and_copied_on_a_file_system_without_clones(fast_tmp: Path) -> None:
    base, child, model = reversed_child(fast_tmp)
    code, out = cli("merge", "--json", "--no-progress", str(child))
    assert code == 0, out
    d = json.loads(out[out.index("{"):])
    assert d["bytes_cloned"] == 0 and d["bytes_written"] == d["bytes_copied"] > 0
    assert read_disk(base) == model


def test_next_batch_is_hinted_to_the_kernel_after_the_copy(tmp_path: Path, monkeypatch) -> None:
    """While a batch commits, the kernel reads ahead the next batch's first source ranges (WILLNEED),
    in file order and at most PREFETCH_BYTES; nothing is hinted for a batch with no successor."""
    calls = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        calls.append((offset, length, advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    monkeypatch.setattr(copymod, "PREFETCH_BYTES", 3 * MiB)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(8 * MiB))
    dst.write_bytes(bytes(MiB))
    s, d = FileStorage(src), FileStorage(dst, writable=True)
    try:
        copier = copymod.Copier(d)
        copier.upcoming = [(s, 6 * MiB, 0, 2 * MiB), (s, 2 * MiB, 0, 2 * MiB)]
        copier.copy_all([(s, 0, 0, MiB)])
        hints = [(off, n) for off, n, advice in calls if advice == os.POSIX_FADV_WILLNEED]
        assert hints == [(2 * MiB, 2 * MiB), (6 * MiB, MiB)]
    finally:
        s.close()
        d.close()
    assert dst.read_bytes() == src.read_bytes()[:MiB]


def test_windows_of_whole_blocks_are_planned_as_intervals_and_partial_ones_per_sector(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's unit: intervals of whole blocks where no differencing source has a partially
    present block in the window (a sparse 1 TiB merge plans in milliseconds), sectors where one
    has; both give the same extents as planning every sector."""
    base = tmp_path / "base.vhdx"
    vhdx.create(str(base), 256 * MiB, block_size=MiB).close()
    child = vhdx.snapshot(str(base), block_size=MiB)
    with vhdx.open(child, "r+") as d:
        d.pwrite(b"\x07" * MiB, 3 * MiB)             # a whole block
        d.pwrite(b"\x09" * 4096, 70 * MiB + 8192)    # a partial block, in the second 64 MiB window
    per_sector_windows = []
    real = ownersmod.sector_extents

    def counted(views, start, length):
        per_sector_windows.append(start)
        return real(views, start, length)

    monkeypatch.setattr(ownersmod, "sector_extents", counted)
    with closing(Image.open(child)) as im:
        views = [BatView.of(im)]
        found = list(planned(views, [(0, 64 * MiB), (64 * MiB, 64 * MiB)]))
        assert per_sector_windows == [64 * MiB]
        for start, length, fast in found:
            per_sector = owners(views, start, length)
            defined = int((per_sector != TRANSPARENT).sum())
            assert sum(n for _, n, _, _ in fast) == defined * im.logical_sector_size
        assert [(o, n) for o, n, _, _ in extents(views, 0, 64 * MiB)] == [(3 * MiB, MiB)]
        assert [(o, n) for o, n, _, _ in extents(views, 64 * MiB, 64 * MiB)] == [(70 * MiB + 8192, 4096)]


class FakeImage:
    """What the planner asks of an image: block size, sector size, parent, storage, bitmaps."""

    def __init__(self, name: str, block_size: int, bitmaps: dict[int, np.ndarray]) -> None:
        self.path = self.storage = name
        self.block_size, self.logical_sector_size, self.has_parent = block_size, 512, True
        self.bitmaps = bitmaps

    def read_bitmap(self, block: int) -> np.ndarray:
        return self.bitmaps[block]


def random_source(rng: np.random.Generator, name: str, size: int, block_size: int) -> BatView:
    """A source with a random BAT: FULLY, PARTIALLY (random bitmaps), ZERO, UNMAPPED, NOT_PRESENT
    with a stray offset, and runs of plain ZERO/UNMAPPED blocks."""
    nblocks = size // block_size
    listed, entries, bitmaps = [], [], {}
    run_starts, run_stops, run_states = [], [], []
    b = 0
    while b < nblocks:
        kind = rng.integers(0, 9)
        if kind == 0:  # a run of plain zero-state blocks
            n = int(rng.integers(1, 6))
            run_starts.append(b)
            run_stops.append(min(b + n, nblocks))
            run_states.append(int(rng.choice([C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED])))
            b += n
            continue
        offset = (1 + int(rng.integers(0, 1 << 12))) << 20
        state = [None, None, None, C.PAYLOAD_BLOCK_FULLY_PRESENT, C.PAYLOAD_BLOCK_FULLY_PRESENT,
                 C.PAYLOAD_BLOCK_PARTIALLY_PRESENT, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_NOT_PRESENT,
                 C.PAYLOAD_BLOCK_UNMAPPED][kind]
        if state is not None:
            if state == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                bits = np.zeros(block_size // 512, np.uint8)
                for _ in range(3):
                    lo = int(rng.integers(0, bits.size))
                    bits[lo:lo + int(rng.integers(1, 300))] = 1
                bitmaps[b] = bits
            listed.append(b)
            entries.append(offset | state)
        b += 1
    sparse = batmod.SparseBat(np.array(listed, np.int64), np.array(entries, np.uint64), np.zeros(0, np.int64),
                              np.zeros(0, np.uint64), -1, np.array(run_starts, np.int64),
                              np.array(run_stops, np.int64), np.array(run_states, np.uint8))
    return BatView(FakeImage(name, block_size, bitmaps), sparse)  # type: ignore[arg-type]


def per_sector_map(views, found, start: int, length: int) -> np.ndarray:
    """(source or -1 for zeros or -2 for nothing, file offset) of every sector, from extents."""
    out = np.full((length // 512, 2), -2, dtype=np.int64)
    for voff, vlen, src, v in found:
        assert start <= voff and voff + vlen <= start + length and vlen > 0
        rows = slice((voff - start) // 512, (voff + vlen - start) // 512)
        assert (out[rows, 0] == -2).all(), "extents overlap"
        out[rows, 0] = v if src is not None else -1
        if src is not None:
            assert src[0] == views[v].image.storage
            out[rows, 1] = src[1] + np.arange(vlen // 512) * 512
    return out


@pytest.mark.parametrize("seed", range(6))
def test_interval_plan_equals_the_sector_by_sector_plan(seed: int) -> None:
    """Random chains of three sources with different block sizes and every block state: the
    interval planner gives every sector the same owner and file offset as planning every sector."""
    rng = np.random.default_rng(seed)
    size = 512 * MiB
    views = [random_source(rng, f"s{i}", size, int(rng.choice([MiB, 2 * MiB, 4 * MiB]))) for i in range(3)]
    if seed % 2:  # and a chain without any partial block: every window planned as intervals
        for v in views:
            keep = v.sparse.states != C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
            object.__setattr__(v, "sparse", replace(v.sparse, blocks=v.sparse.blocks[keep],
                                                    entries=v.sparse.entries[keep]))
    spans = list(window_spans(views, 64 * MiB, size))
    assert spans
    for start, length, found in planned(views, spans):
        fast = per_sector_map(views, found, start, length)
        slow = per_sector_map(views, ownersmod.sector_extents(views, start, length), start, length)
        assert (fast == slow).all(), start


class CountingStorage(Storage):
    """Counts the reads of a file storage and reports as data only the 4 KiB pages of ``pages``
    (what SEEK_DATA/SEEK_HOLE says of a sparse BAT on a file system that tracks holes)."""

    def __init__(self, inner: FileStorage, pages: list[int]) -> None:
        self.inner, self.path, self.writable, self.reads, self.pages = inner, inner.path, False, [], pages

    def readinto(self, buf, offset: int) -> int:
        self.reads.append((offset, len(memoryview(buf).cast("B"))))
        return self.inner.readinto(buf, offset)

    def data_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(p, p + 4096) for p in self.pages if offset <= p < offset + length]

    def size(self) -> int:
        return self.inner.size()


def test_a_sparse_bat_is_read_in_few_large_reads(tmp_path: Path) -> None:
    """A child with one block every GiB has a data page every other page of its BAT: the scan
    reads across the small holes, one read per MiB of BAT instead of one per page, and finds the
    same entries."""
    base = tmp_path / "base.vhdx"
    vhdx.create(str(base), 64 << 30, block_size=MiB).close()
    child = vhdx.snapshot(str(base), block_size=MiB)
    with vhdx.open(child, "r+") as d:
        for k in range(64):
            d.pwrite(b"\x05" * 4096, k * (1 << 30) + 5 * MiB)
    with closing(Image.open(child)) as im:
        region, g = im.bat_region, im.geometry
        entries = np.asarray(im.bat[:g.bat_entries])
        pages = sorted({region.file_offset + (int(i) * 8 // 4096) * 4096 for i in np.flatnonzero(entries)})
        assert len(pages) >= 64
        counting = CountingStorage(im.storage, pages)
        found = battable.scan(counting, region.file_offset, g.bat_entries, g)
        assert len(counting.reads) <= -(-g.bat_entries * 8 // MiB), counting.reads
        assert found.blocks.tolist() == [k * 1024 + 5 for k in range(64)]
        assert (found.entries == im.sparse().entries).all()
        far = CountingStorage(im.storage, [pages[0], pages[0] + battable.JOIN_GAP + 8192])
        battable.scan(far, region.file_offset, g.bat_entries, g)
        assert [n for _, n in far.reads] == [4096, 4096]  # holes longer than JOIN_GAP are skipped
