"""The --rw mount's write buffer without FUSE: reads see buffered writes, runs join, one
transaction applies them all, and far fewer flushes than one transaction per write."""

from __future__ import annotations

import random
from pathlib import Path

import vhdx
from support.disk import MiB, pattern
from support.faults import FaultPlan
from vhdx.file.storage import FileStorage
from vhdx.ops.writebuffer import WriteBuffer

SIZE = 8 * MiB


def _child(folder: Path) -> tuple[Path, bytearray]:
    base = folder / "base.vhdx"
    model = bytearray(SIZE)
    with vhdx.create(base, SIZE, block_size=MiB) as d:
        d.pwrite(pattern(1, 3 * MiB), MiB)
        model[MiB:4 * MiB] = pattern(1, 3 * MiB)
    return Path(vhdx.snapshot(base)), model


def test_random_writes_read_back_before_and_after_one_transaction(tmp_path: Path) -> None:
    child, model = _child(tmp_path)
    rng = random.Random(5)
    with vhdx.open(child, "r+") as disk:
        buf = WriteBuffer(disk)
        for k in range(300):
            offset = rng.randrange(SIZE - 1)
            data = pattern(100 + k, min(rng.choice([1, 17, 512, 4096, 70_000]), SIZE - offset))
            buf.write(data, offset)
            model[offset:offset + len(data)] = data
            at, n = rng.randrange(SIZE - 9000), rng.choice([1, 513, 9000])
            got = bytearray(n)
            buf.read_into(memoryview(got), at)
            assert got == model[at:at + n], k
        assert all(a + len(r) < b for a, r, b in zip(buf.starts, buf.runs, buf.starts[1:])), "runs not disjoint"
        assert all(s % 512 == 0 and len(r) % 512 == 0 for s, r in zip(buf.starts, buf.runs))
        assert len(buf) == sum(len(r) for r in buf.runs)
        before = disk.pread(0, SIZE)
        assert before != bytes(model)          # nothing reached the disk yet
        buf.apply()
        assert buf.applied == 1 and len(buf) == 0 and not buf.starts
        assert disk.pread(0, SIZE) == bytes(model)
    with vhdx.open(child) as disk:
        assert disk.pread(0, SIZE) == bytes(model)


def test_sequential_pages_join_into_one_run_and_cost_a_few_flushes(tmp_path: Path) -> None:
    child, model = _child(tmp_path)
    data = pattern(7, 2 * MiB)
    flushes = {}
    for mode in ("direct", "buffered"):
        plan = FaultPlan()
        with vhdx.open(child, "r+", storage=plan.wrap(FileStorage(str(child), writable=True))) as disk:
            buf = WriteBuffer(disk)
            for at in range(0, len(data), 4096):   # a loop device's write-back: one page at a time
                page = data[at:at + 4096]
                if mode == "direct":
                    disk.pwrite(page, 5 * MiB + at)      # as fresh as the buffered run's blocks
                else:
                    buf.write(page, 3 * MiB + at)
            if mode == "buffered":
                assert len(buf.starts) == 1 and len(buf.runs[0]) == len(data)
                buf.apply()
                assert buf.applied == 1
        flushes[mode] = sum(1 for what in plan.history if what.endswith(": flush"))
    assert 1 <= flushes["buffered"] <= 12, flushes
    assert flushes["direct"] >= 20 * flushes["buffered"], flushes
    with vhdx.open(child) as disk:
        assert disk.pread(3 * MiB, 2 * MiB) == data


def test_a_full_buffer_says_so(tmp_path: Path) -> None:
    child, _ = _child(tmp_path)
    with vhdx.open(child, "r+") as disk:
        buf = WriteBuffer(disk, limit=MiB)
        buf.write(pattern(3, MiB - 512), 0)
        assert not buf.full()
        buf.write(b"x", MiB)
        assert buf.full()
        buf.apply()
        assert not buf.full() and disk.pread(MiB, 1) == b"x"
