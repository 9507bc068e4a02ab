"""Reads into every kind of buffer, at every alignment, against the model (issue 10, point 4).

The read path has two shortcuts: the short path of :class:`vhdx.Disk` (a read inside one block
of each layer: one BAT lookup per layer and one ``preadv``) and the slow-buffer path of
:mod:`vhdx.file.buffers` (a large read into a buffer the kernel copies into slowly is copied
from a transient map of the file, or else through an aligned bounce buffer of ours). Both must give exactly what the general path gives: the bytes of
the model of a three-layer chain with partially present blocks, zeros past each layer's data,
and short reads at the end of the disk.
"""

from __future__ import annotations

import array
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vhdx
from support.chain import build_layers
from support.disk import MiB, assert_same, pattern
from vhdx.chains.locate import layers_of, locate
from vhdx.file import buffers
from vhdx.file.maps import copy_through_map
from vhdx.file.storage import FileStorage

SIZE = 6 * MiB + 3 * 512  # not a whole number of blocks: the last block is short
MAX_EXAMPLES = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "25")) * 2


def _fill(index: int, path: Path, disk: Any, model: bytearray) -> None:
    """Layer 0 (2 MiB blocks): a few MiB of data; layers 1 and 2 (1 MiB blocks): scattered
    sectors (partially present blocks) and one whole block each."""
    writes = {0: [(0, 3 * MiB + 512), (4 * MiB + 4096, 100_000)],
              1: [(512, 1536), (2 * MiB, MiB), (5 * MiB + 512 * 7, 512 * 3), (SIZE - 512, 512)],
              2: [(4096 * 3, 4096), (3 * MiB - 512, 1024), (6 * MiB, 512)]}[index]
    for k, (offset, length) in enumerate(writes):
        data = pattern(100 * index + k, length)
        disk.seek(offset)
        assert disk.write(data) == length
        model[offset:offset + length] = data


class Chain(tuple):
    """(leaf of a 3-layer chain, what it reads; the base alone, what it reads); a short repr."""

    def __repr__(self) -> str:
        return f"Chain({self[0].name}, {self[2].name})"


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Chain:
    """The chain every test here reads."""
    built = build_layers(tmp_path_factory.mktemp("buffers"), size=SIZE, block_sizes=[2 * MiB, MiB, MiB], fill=_fill,
                         snapshots=False)
    return Chain((built.paths[-1], built.contents[-1], built.paths[0], built.contents[0]))


def make_buffer(kind: str, length: int, skew: int) -> tuple[Any, memoryview]:
    """A buffer of ``kind`` with room for ``length`` bytes, ``skew`` bytes past where it would
    start; returns (what is passed to readinto, a byte view of the same memory)."""
    if kind == "bytearray":
        buf: Any = memoryview(bytearray(length + skew))[skew:]
        return buf, buf
    if kind == "mmap":
        m = memoryview(mmap.mmap(-1, length + skew + 1))[skew:skew + length]
        return m, m
    if kind == "numpy":
        arr = np.zeros(length + skew, np.uint8)[skew:]
        return arr, memoryview(arr)
    if kind == "numpy-u32":  # not bytes: readinto takes its byte length
        arr = np.zeros(length // 4, np.uint32)
        return arr, memoryview(arr).cast("B")
    if kind == "array":
        arr2 = array.array("B", bytes(length))
        return arr2, memoryview(arr2)
    raise AssertionError(kind)


KINDS = ["bytearray", "mmap", "numpy", "numpy-u32", "array"]


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), skew=st.sampled_from([0, 1, 8, 16, 48, 64, 4095]),
       offset=st.one_of(st.integers(0, SIZE), st.sampled_from([0, MiB - 512, 2 * MiB, SIZE - 4096, SIZE - 1])),
       length=st.one_of(st.integers(1, 8192), st.integers(1, 3 * MiB), st.sampled_from([4096, 512 << 10, 2 * MiB])),
       positional=st.booleans(), leaf=st.booleans())
def test_every_buffer_kind_reads_the_model(chain, kind, skew, offset, length, positional, leaf) -> None:
    path, model = (chain[0], chain[1]) if leaf else (chain[2], chain[3])
    if kind == "numpy-u32":
        length = max(4, length - length % 4)
    buf, view = make_buffer(kind, length, skew)
    with vhdx.open(path) as disk:
        if positional:
            n = disk.pread_into(view, offset)
        else:
            disk.seek(offset)
            n = disk.readinto(buf)
            assert disk.tell() == offset + n
    want = model[offset:offset + length]
    assert n == len(want)
    assert_same(bytes(view[:n]), want, f"{kind}+{skew} at {offset}, {length} bytes")


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=st.sampled_from(["read", "pread", "read-rest", "readall"]),
       offset=st.one_of(st.integers(0, SIZE), st.sampled_from([0, MiB - 512, 2 * MiB, SIZE - 4096, SIZE - 1, SIZE])),
       length=st.one_of(st.integers(0, 8192), st.integers(1, 5 * MiB), st.sampled_from([2 * MiB, 4 * MiB])),
       leaf=st.booleans())
def test_reads_returning_bytes_match_the_model(chain, how, offset, length, leaf) -> None:
    """``read``, ``pread``, ``read()`` to the end and ``readall`` return ``bytes`` equal to the
    model, whichever path (one ``os.pread``, zeros, the scratch buffer) serves them."""
    path, model = (chain[0], chain[1]) if leaf else (chain[2], chain[3])
    with vhdx.open(path) as disk:
        if how == "pread":
            got, want = disk.pread(offset, length), model[offset:offset + length]
        else:
            disk.seek(offset)
            got = disk.read(length) if how == "read" else disk.read() if how == "read-rest" else disk.readall()
            want = model[offset:offset + length] if how == "read" else model[offset:]
            assert disk.tell() == offset + len(want)
    assert type(got) is bytes
    assert_same(got, want, f"{how} at {offset}, {length} bytes")


def test_where_reads_are_found_in_one_place(chain) -> None:
    """The lookups behind the fast paths: a run of blocks that follow each other in the base's
    file is one place; a range of zeros is zeros; a range over a block of the parent or a
    partially present block is left to the general path (None)."""
    with vhdx.open(chain[2]) as base:
        layers = layers_of(base)
        fd, at = locate(layers, 4096, 3 * MiB)  # the base's first two 2 MiB blocks, written in order
        assert fd == base.image.storage.fileno()
        assert os.pread(fd, 3 * MiB, at) == bytes(chain[3][4096:4096 + 3 * MiB])
        assert locate(layers, 6 * MiB, 1024) == (None, 0) and not any(chain[3][6 * MiB:6 * MiB + 1024])
    with vhdx.open(chain[0]) as leaf:
        layers = layers_of(leaf)
        assert len(layers) == 3
        assert locate(layers, 0, 4096) is None  # sectors 1-3 are in the leaf's middle layer: partial
        assert locate(layers, MiB, 2 * MiB) is None  # two blocks, not all in the leaf: the general path
        place = locate(layers, 4 * MiB, MiB)  # absent from the leaf and the middle layer: the base's block
        assert place is not None and place[0] is not None
        assert os.pread(place[0], MiB, place[1]) == bytes(chain[1][4 * MiB:5 * MiB])


@pytest.mark.parametrize("layer", ["leaf", "base"])
def test_random_small_reads_take_the_short_path_and_match(chain, monkeypatch, layer) -> None:
    """4 KiB reads all over the chain (present, partially present, not present, the short last
    block): the same bytes as the model; in the base (no partially present blocks) nearly all
    by the short path, in the leaf both paths are taken."""
    path, model = (chain[0], chain[1]) if layer == "leaf" else (chain[2], chain[3])
    taken = []
    short = vhdx.Disk._read_short

    def spy(self: Any, view: memoryview, offset: int) -> bool:
        ok = short(self, view, offset)
        taken.append(ok)
        return ok
    monkeypatch.setattr(vhdx.Disk, "_read_short", spy)
    rng = np.random.default_rng(5)
    buf = bytearray(4096)
    offsets = [int(x) * 512 for x in rng.integers(0, SIZE // 512, 400)] + [SIZE - 4096, SIZE - 100, SIZE]
    with vhdx.open(path) as disk:
        for offset in offsets:
            disk.seek(offset)
            n = disk.readinto(buf)
            assert_same(bytes(buf[:n]), model[offset:offset + 4096], f"4 KiB at {offset}")
    assert len(taken) == len(offsets)
    assert True in taken and False in taken, "the end of the disk takes the general path, the rest may not"
    if layer == "base":
        assert sum(taken) > 0.9 * len(taken), f"short path taken {sum(taken)} of {len(taken)} times"


def test_writable_disk_never_takes_the_short_path(chain, tmp_path) -> None:
    """A disk open for writing reads what it just wrote (its BAT changes under the short path)."""
    path = tmp_path / "w.vhdx"
    with vhdx.create(str(path), 4 * MiB, block_size=MiB) as disk:
        buf = bytearray(4096)
        assert disk.pread_into(memoryview(buf), 8192) == 4096 and not any(buf)
        disk.pwrite(b"\x07" * 4096, 8192)
        assert disk.pread_into(memoryview(buf), 8192) == 4096 and buf == b"\x07" * 4096
        assert disk._short == []


def test_closed_disk_refuses_reads(chain) -> None:
    disk = vhdx.open(chain[0])
    buf = bytearray(4096)
    assert disk.readinto(buf) == 4096
    disk.close()
    with pytest.raises(ValueError):
        disk.readinto(buf)


def _two_buffers() -> tuple[memoryview, memoryview]:
    """3 MiB 16 bytes past a page boundary (read from a block start: the slow kernel copy), and
    3 MiB page-aligned."""
    m = mmap.mmap(-1, 4 * MiB)
    return memoryview(m)[16:16 + 3 * MiB], memoryview(m)[:3 * MiB]


def _spy(calls: list, real: Any) -> Any:
    """``real``, recording each call's result in ``calls``."""
    def spy(*args: Any) -> Any:
        result = real(*args)
        calls.append(result)
        return result
    return spy


def _read_each(path: Path, model: bytearray, views: tuple[memoryview, ...], calls: list) -> list[int]:
    """Read 3 MiB from 0 into each view (filled with 0xff first) and compare with the model;
    how many calls ``calls`` gained during each read."""
    gained = []
    with vhdx.open(path) as disk:
        for view in views:
            view[:] = b"\xff" * len(view)
            before = len(calls)
            assert disk.pread_into(view, 0) == len(view)
            assert_same(bytes(view), model[:len(view)], "3 MiB from 0")
            gained.append(len(calls) - before)
    return gained


def test_the_slow_case_is_copied_from_a_map_and_reads_the_same(chain, monkeypatch) -> None:
    """The slow case is copied from a map of the file; a page-aligned buffer is read directly.
    Same bytes."""
    mapped: list[bool] = []
    monkeypatch.setattr(FileStorage, "copy_mapped", _spy(mapped, FileStorage.copy_mapped))
    misaligned_calls, aligned_calls = _read_each(chain[2], chain[3], _two_buffers(), mapped)
    assert misaligned_calls > 0 and aligned_calls == 0 and all(mapped), mapped


def test_an_unlocked_open_bounces_instead_of_mapping(chain) -> None:
    """Without a lock another process may cut the file short under a map: no map, the bounce
    buffer instead, and the same bytes."""
    view, _ = _two_buffers()
    path, model = chain[2], chain[3]
    with vhdx.open(path, share=True) as disk:
        storage = disk.image.storage
        assert storage.copy_mapped(buffers.address_of(view), len(view), 1 << 20) is False
        assert disk.pread_into(view, 0) == len(view)
        assert_same(bytes(view), model[:len(view)], "3 MiB from 0, unlocked")


def test_a_map_past_the_end_of_file_fails_softly(tmp_path) -> None:
    """Pages past the end of file cannot be read: populating the map fails and the copy says
    so (False, the destination untouched), where touching the map would raise SIGBUS; a range
    inside the file still copies afterwards."""
    path = tmp_path / "short.bin"
    path.write_bytes(pattern(7, 3 * 4096 + 100))
    dest = bytearray(b"\xee" * (8 * 4096))
    address = buffers.address_of(memoryview(dest))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert copy_through_map(fd, 4096, address, 6 * 4096) is False
        assert dest == b"\xee" * (8 * 4096)
        assert copy_through_map(fd, 100, address, 3 * 4096) is True
        assert dest[:3 * 4096] == pattern(7, 3 * 4096 + 100)[100:]
        assert copy_through_map(fd, 0, address, 0) is False
    finally:
        os.close(fd)
    storage = FileStorage(path)  # the storage keeps ranges inside the file itself
    try:
        assert storage.copy_mapped(address, 4 * 4096, 0) is False
        assert storage.copy_mapped(address, 3 * 4096, 100) is True
    finally:
        storage.close()


def test_the_bounce_buffer_is_used_for_the_slow_case_and_reads_the_same(chain, monkeypatch) -> None:
    """Where no map can be made, the slow case goes through the bounce buffer; a page-aligned
    buffer does not. Same bytes either way."""
    monkeypatch.setattr(FileStorage, "copy_mapped", lambda self, address, length, offset: False)
    misaligned, aligned = _two_buffers()
    assert buffers.slow_to_copy_into(misaligned, 1 << 20)
    assert not buffers.slow_to_copy_into(aligned, 1 << 20)
    assert not buffers.slow_to_copy_into(memoryview(aligned.obj)[64:], 0)
    assert not buffers.slow_to_copy_into(memoryview(bytes(8)), 0)  # read-only: no address, no bounce
    bounced: list[bool] = []
    monkeypatch.setattr(buffers, "slow_to_copy_into", _spy(bounced, buffers.slow_to_copy_into))
    _read_each(chain[2], chain[3], (misaligned, aligned), bounced)
    assert True in bounced and False in bounced, bounced


def test_aligned_buffer_is_page_aligned_and_zeroed() -> None:
    view = buffers.aligned_buffer(3 * 4096 + 5)
    assert len(view) == 3 * 4096 + 5 and not any(view)
    address = buffers.address_of(view)
    assert address is not None and address % mmap.PAGESIZE == 0
    assert len(buffers.aligned_buffer(0)) == 0


def test_the_scratch_buffer_is_reused_aligned_and_never_shared() -> None:
    """One page-aligned buffer per thread, handed out again and again; a nested use or a size
    above SCRATCH_MAX gets a buffer of its own."""
    with buffers.scratch(4096) as a:
        first = buffers.address_of(a)
        assert len(a) == 4096 and first is not None and first % mmap.PAGESIZE == 0
        with buffers.scratch(100) as nested:
            assert len(nested) == 100 and buffers.address_of(nested) != first
    with buffers.scratch(buffers.SCRATCH_MAX) as again:
        assert buffers.address_of(again) == first
    with buffers.scratch(buffers.SCRATCH_MAX + 1) as big:
        assert len(big) == buffers.SCRATCH_MAX + 1 and buffers.address_of(big) != first
