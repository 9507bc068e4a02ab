"""compact and resize under faults: a power loss or an I/O error at every write index, and every
power-loss prefix of a recorded run (unflushed pages landing at random).

Each scenario builds small files, records how many mutating calls (writes, truncates, flushes)
the operation makes, then fails it at each of them in turn. Afterwards the files must open (a
dirty log replayed in memory), read the state before or after the operation, pass ``vhdx check``
with no error, and running the operation again must finish it: the state after, and for compact
a file holding nothing but its structures and blocks.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import vhdx
from vhdx.ops import compact as compact_module
from support.chain import check_problems, copy_folder
from support.disk import MiB, nonzero_pattern
from support.needs import need_tool
from support.faults import FaultPlan, power_loss_prefixes, record, wrapping_writable_files
from support.scratch import scratch_folder

from support.maintenance import packed_size

HEAD = 16 * MiB
BIG = 140_000 * MiB + 512      # more blocks (1 MiB) than a 1 MiB BAT region holds: the BAT moves


def disk_state(path: Path) -> tuple[int, str, str]:
    """(virtual size, SHA-256 of the first 16 MiB, SHA-256 of the last MiB): what a user reads."""
    with vhdx.open(str(path)) as d:
        size = d.size
        head = bytearray(min(HEAD, size))
        d.pread_into(memoryview(head), 0)
        tail = bytearray(min(MiB, size))
        d.pread_into(memoryview(tail), size - len(tail))
    return size, hashlib.sha256(head).hexdigest(), hashlib.sha256(tail).hexdigest()


@dataclass
class Scenario:
    name: str
    build: Callable[[Path], None]
    run: Callable[[Path], Any]
    target: str = "base.vhdx"
    packs: bool = False          # after compact: file size == structures + blocks

    def state(self, folder: Path) -> tuple[int, str, str]:
        return disk_state(folder / self.target)


def build_holey(folder: Path) -> None:
    """A 12 MiB dynamic disk, 1 MiB blocks: data blocks with zero blocks between them."""
    folder.mkdir(parents=True, exist_ok=True)
    with vhdx.create(str(folder / "base.vhdx"), 12 * MiB, block_size=MiB) as d:
        for b in range(12):
            d.pwrite(nonzero_pattern(b + 1, MiB) if b % 3 == 2 or b >= 9 else bytes(MiB), b * MiB)


def build_child(folder: Path) -> None:
    """A parent with data in blocks 0-3 and a checkpoint that writes zeros over blocks 0 (over the
    parent's data: must stay), 5 and 6 (over zeros: go) and data into 4 and 7."""
    folder.mkdir(parents=True, exist_ok=True)
    with vhdx.create(str(folder / "parent.vhdx"), 8 * MiB, block_size=MiB) as d:
        d.pwrite(nonzero_pattern(1, 4 * MiB), 0)
    with vhdx.create(str(folder / "child.avhdx"), parent=str(folder / "parent.vhdx"), block_size=MiB) as d:
        for b in (0, 5, 6):
            d.pwrite(bytes(MiB), b * MiB)
        d.pwrite(nonzero_pattern(2, MiB), 4 * MiB)
        d.pwrite(nonzero_pattern(3, 4096), 7 * MiB + 8192)


def build_small(folder: Path) -> None:
    """A 6 MiB + 512 dynamic disk with data up to 4 MiB + 1000."""
    folder.mkdir(parents=True, exist_ok=True)
    with vhdx.create(str(folder / "base.vhdx"), 6 * MiB + 512, block_size=MiB) as d:
        d.pwrite(nonzero_pattern(4, 2 * MiB), MiB)
        d.pwrite(nonzero_pattern(5, 1000), 4 * MiB)


def build_fat(folder: Path) -> None:
    """A 12 MiB FAT16 disk made over random bytes (its free space holds old data), with one file
    kept and one deleted: ``compact --trim`` drops the blocks in free space, plain compact none."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "fat.raw"
    raw.write_bytes(nonzero_pattern(9, 12 * MiB))
    subprocess.run([need_tool("mkfs.fat", "dosfstools"), "-F", "16", str(raw)], check=True, capture_output=True)
    for name, seed, size in (("keep.bin", 10, 2 * MiB + 100), ("gone.bin", 11, 3 * MiB)):
        (folder / name).write_bytes(nonzero_pattern(seed, size))
        subprocess.run([need_tool("mcopy", "mtools"), "-i", str(raw), str(folder / name), f"::{name}"], check=True)
        (folder / name).unlink()
    subprocess.run([need_tool("mdel", "mtools"), "-i", str(raw), "::gone.bin"], check=True)
    vhdx.convert(raw, folder / "base.vhdx", source_format="raw", block_size=MiB)
    raw.unlink()


def compact_one_move_per_batch(folder: Path) -> Any:
    """compact with one block per log transaction: many batches of moves (data, flush, entry)."""
    saved = compact_module.MOVE_BATCH_UNITS
    compact_module.MOVE_BATCH_UNITS = 1
    try:
        return vhdx.compact(folder / "base.vhdx")
    finally:
        compact_module.MOVE_BATCH_UNITS = saved


SCENARIOS = {
    "compact-base": Scenario("compact-base", build_holey, lambda f: vhdx.compact(f / "base.vhdx"), packs=True),
    "compact-batched": Scenario("compact-batched", build_holey, compact_one_move_per_batch, packs=True),
    "compact-child": Scenario("compact-child", build_child, lambda f: vhdx.compact(f / "child.avhdx"),
                              target="child.avhdx", packs=True),
    "compact-trim": Scenario("compact-trim", build_fat, lambda f: vhdx.compact(f / "base.vhdx", trim=True),
                             packs=True),
    "grow": Scenario("grow", build_small, lambda f: vhdx.resize(f / "base.vhdx", 10 * MiB)),
    "grow-moving-the-bat": Scenario("grow-moving-the-bat", build_small, lambda f: vhdx.resize(f / "base.vhdx", BIG)),
    "shrink-to-minimum": Scenario("shrink-to-minimum", build_small,
                                  lambda f: vhdx.resize(f / "base.vhdx", vhdx.minimum_size(f / "base.vhdx"))),
}


@pytest.fixture
def scratch(tmp_path: Path):
    yield from scratch_folder(tmp_path, "maint-faults-")


def prepare(scenario: Scenario, scratch: Path) -> tuple[Path, Any, Any, int]:
    """Build the pristine folder; run once on a copy to learn the new state and the call count."""
    pristine, probe = scratch / "pristine", scratch / "probe"
    scenario.build(pristine)
    old = scenario.state(pristine)
    copy_folder(pristine, probe)
    plan = FaultPlan(None)
    with wrapping_writable_files(plan):
        scenario.run(probe)
    return pristine, old, scenario.state(probe), plan.calls


def verify_after_fault(scenario: Scenario, work: Path, old: Any, new: Any, where: str) -> list[str]:
    """The folder opens to the old or new state, checks clean, and a re-run finishes."""
    failures = []
    try:
        state = scenario.state(work)
        if state not in (old, new):
            failures.append(f"{where}: reads neither the old nor the new state")
    except Exception as e:  # noqa: BLE001 - a file that does not open is what this looks for
        return [f"{where}: does not open: {type(e).__name__}: {e}"]
    failures += [f"{where}: {p}" for p in check_problems(work)]
    try:
        scenario.run(work)
        if scenario.state(work) != new:
            failures.append(f"{where}: the re-run does not give the new state")
        if scenario.packs:
            size, used = packed_size(work / scenario.target)
            if size != used:
                failures.append(f"{where}: after the re-run the file has {size} bytes, {used} in use")
    except Exception as e:  # noqa: BLE001
        failures.append(f"{where}: the re-run raised {type(e).__name__}: {e}")
    return failures


@pytest.mark.parametrize("mode", ["power-loss", "eio", "enospc"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_fault_at_every_write_index(name: str, mode: str, scratch: Path) -> None:
    scenario = SCENARIOS[name]
    pristine, old, new, calls = prepare(scenario, scratch)
    assert calls > 5, f"only {calls} mutating calls recorded"
    error = {"power-loss": None, "eio": errno.EIO, "enospc": errno.ENOSPC}[mode]
    work = scratch / "work"
    failures: list[str] = []
    for fail_at in range(1, calls + 1):
        copy_folder(pristine, work)
        plan = FaultPlan(fail_at, error=error)
        with pytest.raises(Exception):
            with wrapping_writable_files(plan):
                scenario.run(work)
        failures += verify_after_fault(scenario, work, old, new, f"{mode} at call {fail_at}/{calls}")
    print(f"{name} {mode}: {calls} fault indices")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:12])


@pytest.mark.parametrize("name", ["compact-base", "compact-batched", "compact-child", "compact-trim",
                                  "grow-moving-the-bat",
                                  "shrink-to-minimum"])
def test_every_power_loss_prefix(name: str, scratch: Path) -> None:
    scenario = SCENARIOS[name]
    pristine = scratch / "pristine"
    scenario.build(pristine)
    old = scenario.state(pristine)

    def run(folder: Path, plan: FaultPlan) -> None:
        with wrapping_writable_files(plan):
            scenario.run(folder)

    rec = record(pristine, scratch / "recorded", run)
    new = scenario.state(rec.recorded)
    ops = rec.ops
    failures: list[str] = []
    for where in power_loss_prefixes(rec, scratch / "work"):
        failures += verify_after_fault(scenario, scratch / "work", old, new, where)
    print(f"{name}: {len(ops)} recorded calls, {len(ops) + 1} prefixes")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:12])
