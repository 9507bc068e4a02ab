"""The BAT at any size: never read whole, checked from its non-zero entries, parsed once per process.

A 64 TiB dynamic disk with 1 MiB blocks has a 512 MiB BAT; the file our create makes is sparse
(its BAT is a hole), so such a disk costs no space and these tests stay fast. They prove the
properties the benchmark (benchmarks/bench_scale.py) measures: opening reads a few MiB, not the
BAT; check/info/open stay in bounded memory (measured in a subprocess); hostile entries deep in a
large BAT are still refused; a cached parse is dropped when the file changes.
"""

from __future__ import annotations

import json
from contextlib import closing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import vhdx
from vhdx.errors import CorruptError
from vhdx.file import parsecache
from vhdx.file.image import Image
from vhdx.file.storage import FileStorage, Storage
from vhdx.format import bat as batmod
from vhdx.format import constants as C
from vhdx.ops.check import check_file

MiB = 1 << 20
TiB = 1 << 40
BIG = 64 * TiB
REPO = Path(__file__).resolve().parents[2]


class CountingStorage(Storage):
    """A FileStorage that counts the bytes read through it (maps and hole queries pass through)."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner
        self.path = inner.path
        self.writable = inner.writable
        self.lock_mode = inner.lock_mode
        self.bytes_read = 0

    def readinto(self, buf, offset: int) -> int:
        self.bytes_read += len(memoryview(buf).cast("B"))
        return self.inner.readinto(buf, offset)

    def size(self) -> int:
        return self.inner.size()

    def fileno(self):
        return self.inner.fileno()

    def map_readonly(self, offset: int, length: int):
        return self.inner.map_readonly(offset, length)

    def data_ranges(self, offset: int, length: int):
        return self.inner.data_ranges(offset, length)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def big(tmp_path: Path) -> Path:
    """A 64 TiB dynamic disk, 1 MiB blocks, with data in its first and last blocks."""
    path = tmp_path / "big.vhdx"
    t = time.monotonic()
    with vhdx.create(path, BIG, block_size=MiB) as disk:
        disk.pwrite(b"head" * 1024, 0)
        disk.pwrite(b"tail" * 1024, BIG - 4096)
    assert time.monotonic() - t < 10
    assert os.stat(path).st_blocks * 512 < 32 * MiB  # the 512 MiB BAT is a hole
    return path


def test_opening_a_large_sparse_bat_reads_far_less_than_the_bat(big: Path) -> None:
    parsecache.clear()
    storage = CountingStorage(FileStorage(big))
    image = Image.open(big, storage=storage)
    try:
        assert image.bat_region.length >= 512 * MiB
        assert isinstance(image.bat, np.ndarray) and image.bat.dtype == np.dtype("<u8")
        assert storage.bytes_read < 8 * MiB, storage.bytes_read
        blocks, offsets, states = image.allocated()
        assert blocks.tolist() == [0, image.geometry.payload_blocks - 1]
        assert (states == C.PAYLOAD_BLOCK_FULLY_PRESENT).all() and (offsets >= 4 * MiB).all()
        buf = bytearray(4096)
        image.readinto_at(memoryview(buf), BIG - 4096)
        assert bytes(buf) == b"tail" * 1024
        payload, sbm = image.count_states()
        assert payload == {"NOT_PRESENT": image.geometry.payload_blocks - 2, "FULLY_PRESENT": 2}
        assert storage.bytes_read < 8 * MiB
    finally:
        image.close()


CHILD = r"""
import json, resource, sys, time
import vhdx
from vhdx.ops.check import check_file
from vhdx.file.image import Image
path = sys.argv[1]
t = time.perf_counter()
report = check_file(path)
image = Image.open(path)
info = image.info()
image.close()
with vhdx.open(path) as d:
    tail = d.pread(d.size - 4096, 4096)
print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "errors": len(report.errors),
                  "states": info["bat"]["payload_states"], "tail": tail[:4].decode(),
                  "seconds": time.perf_counter() - t}))
"""


def test_check_info_and_open_of_a_64_tib_disk_stay_in_bounded_memory(big: Path) -> None:
    baseline = subprocess.run([sys.executable, "-c", "import json, resource, numpy, vhdx.ops.check; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, check=True, env=_env())
    out = subprocess.run([sys.executable, "-c", CHILD, str(big)], capture_output=True, text=True, check=True,
                         env=_env())
    result = json.loads(out.stdout)
    assert result["errors"] == 0 and result["tail"] == "tail"
    assert result["states"]["FULLY_PRESENT"] == 2
    # The old whole-BAT code needed 2-3 GiB here; the BAT's 512 MiB would show at once.
    grown_mib = (result["rss_kib"] - int(baseline.stdout)) / 1024
    assert grown_mib < 48, result


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _poke_entry(path: Path, bat_index: int, entry: int, *, keep_mtime: bool = False) -> None:
    """Write one raw BAT entry straight into the file (a hostile or foreign change)."""
    with closing(Image.open(path)) as image:
        at = image.bat_region.file_offset + 8 * bat_index
    st = os.stat(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, entry.to_bytes(8, "little"), at)
    finally:
        os.close(fd)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_hostile_entry_deep_in_a_large_sparse_bat_is_refused(big: Path) -> None:
    with closing(Image.open(big)) as image:
        block = image.geometry.payload_blocks // 2
        index = image.bat_index(block)
    _poke_entry(big, index, batmod.make_entry(C.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 45))
    with closing(Image.open(big)) as image:  # read-only: checked by the read that uses it, and whole
        with pytest.raises(CorruptError) as e:
            image.readinto_at(memoryview(bytearray(4096)), block * image.block_size)
        assert f"block {block}" in str(e.value)
        with pytest.raises(CorruptError) as e:
            image.count_states()
        assert f"block {block}" in str(e.value)
    with pytest.raises(CorruptError) as e:
        Image.open(big, "r+")  # a writer checks every entry at open
    assert f"block {block}" in str(e.value)
    report = check_file(big)
    assert any(f"block {block}" in f.message for f in report.errors)


def test_a_qemu_style_zero_filled_bat_is_one_run(tmp_path: Path) -> None:
    """qemu-img marks every block of a new disk ZERO: the entries are not zero but cost nothing."""
    path = tmp_path / "z.vhdx"
    with vhdx.create(path, 4 * TiB, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, 5 * MiB)
    with closing(Image.open(path)) as image:
        g, at = image.geometry, image.bat_region.file_offset
        keep = int(image.bat[image.bat_index(5)])
    entries = np.full(g.bat_entries, C.PAYLOAD_BLOCK_ZERO, dtype="<u8")
    entries[batmod.sbm_indices(g)] = 0
    entries[g.payload_bat_index(5)] = keep
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, entries.tobytes(), at)
    finally:
        os.close(fd)
    with closing(Image.open(path)) as image:
        sparse = image.sparse()
        assert sparse.blocks.tolist() == [5] and sparse.run_starts.size == 2
        assert image.count_states()[0] == {"ZERO": g.payload_blocks - 1, "FULLY_PRESENT": 1}
        assert image.payload_states()[4:7].tolist() == [2, 6, 2]
    with vhdx.open(path) as disk:
        assert disk.pread(5 * MiB, 4096) == b"x" * 4096 and disk.pread(0, 4096) == bytes(4096)
        assert disk.data_extents() == [(5 * MiB, MiB)]


def test_a_cached_parse_is_used_for_an_unchanged_file_and_dropped_when_it_changes(big: Path) -> None:
    parsecache.clear()
    first = CountingStorage(FileStorage(big))
    Image.open(big, storage=first).close()
    again = CountingStorage(FileStorage(big))
    Image.open(big, storage=again).close()
    assert again.bytes_read < first.bytes_read  # no metadata region, no region-table CRCs the second time
    # A change through the library: the next read-only open sees it.
    with vhdx.open(big, "r+") as disk:
        disk.pwrite(b"more" * 1024, 7 * MiB)
    with closing(Image.open(big)) as image:
        assert 7 in image.allocated()[0].tolist()
    # A change behind our back that even puts the mtime back: ctime still tells.
    with closing(Image.open(big)) as image:
        block = image.geometry.payload_blocks // 3
        index = image.bat_index(block)
    _poke_entry(big, index, batmod.make_entry(C.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 45), keep_mtime=True)
    with closing(Image.open(big)) as image, pytest.raises(CorruptError):
        image.allocated()  # parsed again: the new entry is seen and refused


def test_writable_opens_never_take_the_cache(big: Path) -> None:
    parsecache.clear()
    Image.open(big).close()
    assert parsecache.size() == 1
    storage = CountingStorage(FileStorage(big, writable=True))
    Image.open(big, "r+", storage=storage).close()
    assert storage.bytes_read >= 2 * C.REGION_TABLE_SIZE + C.METADATA_TABLE_SIZE  # parsed from the file


def test_writes_through_the_mapped_bat_reach_the_file(big: Path) -> None:
    with vhdx.open(big, "r+") as disk:
        disk.pwrite(b"abcd" * 1024, 40 * TiB)
        assert disk.pread(40 * TiB, 4096) == b"abcd" * 1024
    parsecache.clear()
    with vhdx.open(big) as disk:
        assert disk.pread(40 * TiB, 4096) == b"abcd" * 1024
        assert disk.image.count_states()[0]["FULLY_PRESENT"] == 3


def test_planning_a_merge_of_a_64_tib_chain_follows_the_data(big: Path) -> None:
    child = vhdx.snapshot(big)
    with vhdx.open(child, "r+") as disk:
        for k in range(64):
            disk.pwrite(b"c" * MiB, k * TiB)
    t = time.perf_counter()
    plan = vhdx.merge(child, dry_run=True)
    assert time.perf_counter() - t < 2.0
    assert plan.bytes_to_copy == 64 * MiB


class NoMapStorage(CountingStorage):
    """The same file, but no map and no hole queries: the BAT is read into memory."""

    def map_readonly(self, offset: int, length: int):
        return None

    def data_ranges(self, offset: int, length: int):
        return Storage.data_ranges(self, offset, length)


def _dirty_copy(tmp_path: Path) -> Path:
    """A disk whose log holds a BAT update not yet applied to the file (power lost after the log
    entry was written and flushed)."""
    from support.faults import FaultyStorage, PowerLoss  # the shared fault kit

    base = tmp_path / "d.vhdx"
    with vhdx.create(base, TiB, block_size=MiB) as disk:  # an 8 MiB BAT
        disk.pwrite(b"a" * 4096, 0)
    for n in range(1, 40):
        probe = tmp_path / f"dirty-{n}.vhdx"
        shutil.copyfile(base, probe)
        storage = FaultyStorage(FileStorage(probe, writable=True, durable=False), n)
        try:
            with vhdx.open(probe, "r+", storage=storage) as disk:
                disk.pwrite(b"b" * 4096, TiB - 4 * MiB)
        except (PowerLoss, vhdx.VhdxError):
            pass
        finally:
            storage.inner.close()
        with closing(Image.open(probe)) as image:
            if image.log_was_dirty and (TiB - 4 * MiB) // MiB in image.allocated()[0].tolist():
                return probe
    raise AssertionError("no crash point left a BAT update in the log")


def test_a_replayed_log_is_laid_into_the_private_map(tmp_path: Path) -> None:
    """Read-only opens of a dirty log map the file and write the replayed pages into their own
    copy: the same entries as reading the BAT into memory, and the file is not changed."""
    path = _dirty_copy(tmp_path)
    before = path.read_bytes()[:16 * MiB]
    parsecache.clear()
    mapped = Image.open(path, storage=CountingStorage(FileStorage(path)))
    read = Image.open(path, storage=NoMapStorage(FileStorage(path)))
    try:
        assert mapped.log_replayed_in_memory and read.log_replayed_in_memory
        assert mapped.bat.base is not None and read.bat.base is None  # a map, and the fallback's own array
        block = (TiB - 4 * MiB) // MiB
        assert int(mapped.bat[mapped.bat_index(block)]) == int(read.bat[read.bat_index(block)]) != 0
        assert np.array_equal(mapped.bat[:1 << 16], read.bat[:1 << 16])
        assert mapped.count_states() == read.count_states()
        buf = bytearray(4096)
        mapped.readinto_at(memoryview(buf), TiB - 4 * MiB)
        assert bytes(buf) == b"b" * 4096
    finally:
        mapped.close()
        read.close()
    assert path.read_bytes()[:16 * MiB] == before


def _zero_filled(path: Path, size: int, data_block: int) -> tuple[int, int]:
    """A disk whose BAT is written out in full, every entry ZERO (as qemu-img makes them) but
    ``data_block``, which holds data; returns (BAT offset, payload blocks)."""
    with vhdx.create(path, size, block_size=MiB) as disk:
        disk.pwrite(b"x" * 4096, data_block * MiB)
    with closing(Image.open(path)) as image:
        g, at = image.geometry, image.bat_region.file_offset
        keep = int(image.bat[image.bat_index(data_block)])
    entries = np.full(g.bat_entries, C.PAYLOAD_BLOCK_ZERO, dtype="<u8")
    entries[batmod.sbm_indices(g)] = 0
    entries[g.payload_bat_index(data_block)] = keep
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, entries.tobytes(), at)
    finally:
        os.close(fd)
    return at, g.payload_blocks


def test_a_large_written_bat_is_checked_as_reads_use_it(tmp_path: Path) -> None:
    """Over 16 MiB of BAT data, a read-only open checks entries lazily: the open reads little,
    but no read uses an unchecked entry, and whole-disk questions check the whole BAT."""
    path = tmp_path / "lazy.vhdx"
    at, blocks = _zero_filled(path, 4 * TiB, 5)  # a 32 MiB BAT, all of it data
    bad = blocks // 2
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, batmod.make_entry(C.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 45).to_bytes(8, "little"),
                  at + 8 * (bad + bad // (4096)))  # chunk ratio 4096 at 1 MiB blocks, 512-byte sectors
    finally:
        os.close(fd)
    parsecache.clear()
    storage = CountingStorage(FileStorage(path))
    image = Image.open(path, storage=storage)
    try:
        assert image.bat_lazy and storage.bytes_read < 8 * MiB
        buf = bytearray(4096)
        image.readinto_at(memoryview(buf), 5 * MiB)
        assert bytes(buf) == b"x" * 4096
        with pytest.raises(CorruptError) as e:
            image.readinto_at(memoryview(buf), bad * MiB)
        assert f"block {bad}" in str(e.value)
        with pytest.raises(CorruptError):
            image.count_states()  # the whole BAT, checked
        with pytest.raises(CorruptError):
            image.readinto_at(memoryview(buf), bad * MiB)  # still refused after the failed whole check
    finally:
        image.close()
    with pytest.raises(CorruptError):
        Image.open(path, "r+")  # writers check everything at open
    assert any(f"block {bad}" in f.message for f in check_file(path).errors)


def test_a_lazily_checked_block_past_the_end_of_the_file_needs_the_whole_check(tmp_path: Path) -> None:
    path = tmp_path / "cut.vhdx"
    _zero_filled(path, 4 * TiB, 5)
    with vhdx.open(path, "r+") as disk:
        disk.pwrite(b"y" * 4096, 9 * MiB)  # block 9 is now last in the file, block 5 before it
    os.truncate(path, os.stat(path).st_size - MiB // 2)  # cut block 9 short: tolerated (old qemu)
    parsecache.clear()
    with closing(Image.open(path)) as image:
        assert image.bat_lazy
        buf = bytearray(4096)
        image.readinto_at(memoryview(buf), 9 * MiB)
        assert bytes(buf) == b"y" * 4096 and not image.bat_lazy  # checked whole, and it passed
    os.truncate(path, os.stat(path).st_size - MiB)  # now block 5 runs past the end, block 9 is gone: cut short
    parsecache.clear()
    with closing(Image.open(path)) as image:
        with pytest.raises(vhdx.VhdxError) as e:
            image.readinto_at(memoryview(bytearray(4096)), 5 * MiB)
        assert type(e.value).__name__ in ("TruncatedError", "CorruptError")


def test_the_disk_short_read_path_checks_lazy_entries_too(tmp_path: Path) -> None:
    """vhdx.open's few-KiB fast path reads with one preadv: on a lazily checked BAT it must
    refuse the hostile entry exactly as the image's own read path does."""
    path = tmp_path / "lazy-short.vhdx"
    at, blocks = _zero_filled(path, 4 * TiB, 5)
    bad = blocks // 2
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, batmod.make_entry(C.PAYLOAD_BLOCK_FULLY_PRESENT, 1 << 45).to_bytes(8, "little"),
                  at + 8 * (bad + 1 + (bad + 1) // 4096))  # past the end of the file
    finally:
        os.close(fd)
    parsecache.clear()
    with vhdx.open(path) as disk:
        assert disk.image.bat_lazy
        assert disk.pread(5 * MiB, 4096) == b"x" * 4096
        with pytest.raises(CorruptError):
            disk.pread((bad + 1) * MiB, 4096)
        assert disk.pread(bad * MiB, 4096) == bytes(4096)  # its neighbour, unallocated, reads zeros
        with pytest.raises(CorruptError):
            disk.pread(bad * MiB, 2 * MiB)  # a run over both (one lookup per block): checked too
        disk.seek(bad * MiB + 4096)
        with pytest.raises(CorruptError):
            disk.read(2 * MiB)
        assert disk.pread((bad - 2) * MiB, 2 * MiB) == bytes(2 * MiB)  # a run of zeros
