"""The mount's content without FUSE: names, attributes, the read-ahead window, writes."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

import vhdx
from support.chain import build_layers
from support.disk import MiB, pattern
from vhdx.ops.mount import LEAF_NAME, WINDOW, DiskFiles, layer_names

SIZE = 12 * MiB


def _read(files: DiskFiles, name: str, size: int, offset: int) -> bytes:
    view = memoryview(bytearray(files.length(name, size, offset)))
    files.read_into(name, view, offset)
    return bytes(view)


def _chain(folder: Path):
    def fill(index: int, path: Path, disk, model: bytearray) -> None:
        for k in range(4):
            offset = (index * 7 + k * 3) * 700_000 % (SIZE - 200_000)
            data = pattern(index * 10 + k, 150_000 + k)
            disk.pwrite(data, offset)
            model[offset:offset + len(data)] = data
    return build_layers(folder, size=SIZE, block_sizes=[MiB, MiB, 2 * MiB], fill=fill)


def test_names_are_the_layer_files_unique_and_never_disk(tmp_path: Path) -> None:
    class D:
        def __init__(self, path: str) -> None:
            self.path = path
    names = layer_names([D("/a/disk"), D("/a/x.avhdx"), D("/b/x.avhdx"), D("/c/base.vhdx")])
    assert names == ["disk~layer0", "x.avhdx", "x.avhdx~layer2", "base.vhdx"]


def test_sequential_and_random_reads_equal_the_disk(tmp_path: Path) -> None:
    built = _chain(tmp_path)
    with vhdx.open(built.paths[-1]) as leaf:
        files = DiskFiles(leaf, writable=False)
        assert set(files.files) == {LEAF_NAME, *(p.name for p in built.paths)}
        assert files.attributes(LEAF_NAME)["st_size"] == SIZE
        folder = files.attributes("")   # the folder carries its newest file's times, not 1970's
        assert folder["st_mtime"] == max(os.stat(p).st_mtime_ns for p in built.paths) > 0
        for n, path in enumerate(reversed(built.paths)):   # sequential, 128 KiB at a time, through the window
            got = bytearray()
            for offset in range(0, SIZE + 131072, 131072):
                got += _read(files, path.name, 131072, offset)
            assert bytes(got) == built.contents[-1 - n], path.name
        rng = random.Random(3)
        names = [p.name for p in built.paths] + [LEAF_NAME]
        for _ in range(400):    # interleaved files, sequential runs broken at random
            name = rng.choice(names)
            offset = rng.randrange(SIZE + 5)
            size = rng.choice([1, 4096, 131072, WINDOW + 1])
            want = built.contents[-1 if name == LEAF_NAME else names.index(name)][offset:offset + size]
            assert _read(files, name, size, offset) == want, (name, offset, size)


def test_writes_go_to_the_leaf_and_clear_the_window(tmp_path: Path) -> None:
    built = _chain(tmp_path)
    model = bytearray(built.contents[-1])
    with vhdx.open(built.paths[-1], "r+") as leaf:
        files = DiskFiles(leaf, writable=True)
        _read(files, LEAF_NAME, 131072, 0)
        _read(files, LEAF_NAME, 131072, 131072)        # fills the window from 131072
        data = pattern(77, 5000)
        assert files.write(LEAF_NAME, data, 300_000) == 5000     # inside the window, ahead of the reader
        model[300_000:305_000] = data
        # the next sequential read covers the write: it must not come from a stale window
        assert _read(files, LEAF_NAME, 131072, 262144) == bytes(model[262144:262144 + 131072])
        assert _read(files, built.paths[-1].name, 8192, 298_000) == bytes(model[298_000:306_192])
        assert files.write(LEAF_NAME, b"x" * 10, SIZE - 4) == 4
        with pytest.raises(OSError) as info:
            files.write(LEAF_NAME, b"x", SIZE)
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            files.write(built.paths[0].name, b"x", 0)
        assert info.value.errno == errno.EROFS
        assert files.pending is not None and len(files.pending) > 0     # buffered, not yet written
        files.commit()
        assert len(files.pending) == 0 and files.pending.applied == 1   # one transaction for them all
    with vhdx.open(built.paths[-1]) as leaf:
        assert leaf.pread(0, SIZE)[:SIZE - 4] == bytes(model[:SIZE - 4])
