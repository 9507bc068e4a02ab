"""Kill tests for ``vhdx repair --in-place`` and ``vhdx replay``, as for merge: a power loss
at every point of the run (support.faults: every prefix of the recorded writes, truncates and
flushes, with the writes after the last flush landing page by page at random).

* replay: every prefix reads as the disk (its log replayed in memory, or already replayed),
  passes ``vhdx check``, and ``vhdx replay`` run again leaves a clean log and the same disk.
* repair --in-place: from every prefix, ``repair --in-place`` run again succeeds, the file
  passes ``vhdx check`` with no error, reads exactly as after an uninterrupted repair, and
  keeps its identity (the DataWriteGuid its children link to, and the disk id): a torn header
  write would lose them, since a file whose two headers are both lost gets new ones.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

import vhdx
from support.faults import FaultPlan, FaultyStorage, materialize
from vhdx.file.image import Image
from vhdx.file.storage import FileStorage
from vhdx.format import constants as C
from vhdx.ops.check import check_file
from vhdx.ops.repair import repair_in_place, replay, replay_on

from support.repair import MiB, make_dynamic

SEEDS = int(os.environ.get("VHDX_POWER_PREFIX_SEEDS", "1"))


def make_dirty(path: Path) -> Path:
    """A disk whose last write is only in its log (the writer failed before the clean close)."""
    make_dynamic(path)
    disk = vhdx.open(str(path), "r+")
    disk.pwrite(b"\xab" * (MiB + 4096), 6 * MiB)  # a new block: its BAT page goes through the log
    disk.flush()
    disk.image.writer.fail(RuntimeError("simulated crash"))
    disk.close()
    image = Image.open(str(path))
    assert image.log_was_dirty
    image.close()
    return path


def make_headless(path: Path) -> Path:
    """A disk whose two headers are lost (so its new header needs a log placed in free space),
    with 3 MiB of leaked space at its end."""
    make_dynamic(path)
    with open(path, "r+b") as f:
        f.seek(C.HEADER1_OFFSET)
        f.write(bytes(2 * 0x10000))
        f.truncate(os.path.getsize(path) + 3 * MiB)
    return path


def make_damaged(path: Path, dirty: bool) -> Path:
    """A disk (``dirty``: with a write only in its log) with header 1 and region table 2
    destroyed, a BAT entry past the end of the file and 3 MiB of leaked space at its end. The
    dirty log's replay rewrites the BAT page, and so mends the entry."""
    if dirty:
        make_dirty(path)
    else:
        make_dynamic(path)
    image = Image.open(str(path))
    bat_entry = image.bat_region.file_offset + 8 * image.bat_index(3)
    image.close()
    with open(path, "r+b") as f:
        f.seek(C.HEADER1_OFFSET)
        f.write(random.Random(1).randbytes(4096))
        f.seek(C.REGION_TABLE2_OFFSET)
        f.write(random.Random(2).randbytes(4096))
        f.seek(bat_entry)
        f.write(((1 << 40) | 6).to_bytes(8, "little"))
        f.truncate(os.path.getsize(path) + 3 * MiB)
    return path


def read_all(path: Path) -> bytes:
    with vhdx.open(str(path)) as disk:
        return disk.pread(0, disk.size)


def identity(path: Path) -> tuple:
    image = Image.open(str(path))
    try:
        return image.header.data_write_guid, image.metadata.page83_data
    finally:
        image.close()


def record(path: Path, run) -> list:
    plan = FaultPlan(None, record=True)
    storage = FaultyStorage(FileStorage(str(path), writable=True, lock="exclusive"), plan)
    try:
        run(storage)
    finally:
        storage.close()
    return plan.ops


def prefixes(ops: list, original: Path, work: Path):
    """Each power-loss prefix of ``ops`` written to ``work``: yields a label for messages."""
    originals = {str(original): original.read_bytes()}
    for cut in range(len(ops) + 1):
        for seed in range(SEEDS):
            files = materialize(ops, cut, originals, random.Random(cut * 1000 + seed))
            work.write_bytes(files.get(str(original), originals[str(original)]) or b"")
            yield f"cut {cut}/{len(ops)} seed {seed}" + (f" (after {ops[cut - 1].kind})" if cut else "")


def test_replay_survives_a_power_loss_at_every_point(tmp_path):
    pristine = make_dirty(tmp_path / "pristine.vhdx")
    expected = read_all(pristine)
    recorded = tmp_path / "recorded.vhdx"
    shutil.copyfile(pristine, recorded)
    ops = record(recorded, lambda storage: replay_on(str(recorded), storage))
    assert sum(o.kind == "flush" for o in ops) >= 3, [o.kind for o in ops]
    assert read_all(recorded) == expected
    work = tmp_path / "work.vhdx"
    failures, tried = [], 0
    for where in prefixes(ops, recorded.with_name("recorded.vhdx"), work):
        tried += 1
        shutil.copyfile(pristine, tmp_path / "base.vhdx")
        try:
            if read_all(work) != expected:
                failures.append(f"{where}: reads other data")
            errors = check_file(str(work)).errors
            if errors:
                failures.append(f"{where}: vhdx check: {errors[0].message}")
            replay(str(work))
            image = Image.open(str(work))
            clean = image.header.log_guid == C.ZERO_GUID and not image.log_was_dirty
            image.close()
            if not clean or read_all(work) != expected:
                failures.append(f"{where}: replay again did not leave a clean log and the same disk")
        except vhdx.VhdxError as e:
            failures.append(f"{where}: {e}")
    print(f"replay: {len(ops)} recorded calls, power-loss prefixes tried: {tried}")
    assert not failures, f"{len(failures)} of {tried} prefixes fail:\n" + "\n".join(failures[:12])


@pytest.mark.parametrize("kind", ["clean-log", "dirty-log", "headers-lost"])
def test_in_place_repair_survives_a_power_loss_at_every_point(kind, tmp_path):
    if kind == "headers-lost":
        pristine = make_headless(tmp_path / "pristine.vhdx")
    else:
        pristine = make_damaged(tmp_path / "pristine.vhdx", kind == "dirty-log")
    reference = tmp_path / "reference.vhdx"
    shutil.copyfile(pristine, reference)
    report = vhdx.repair(reference, in_place=True)
    assert report.ok and not report.notes, report.lines()
    assert report.lost_ranges() == ([(3 * MiB, 4 * MiB)] if kind == "clean-log" else []), report.lines()
    # the leak is given back, unless BAT entries were dropped (the space may hold their data)
    leak = ("leaked space", "found" if kind == "clean-log" else "repaired")
    assert leak in [(st.name, st.status) for st in report.structures], report.lines()
    expected = read_all(reference)
    # a file that lost both headers gets a new DataWriteGuid, drawn again by each run
    ident = identity(reference)[1:] if kind == "headers-lost" else identity(reference)
    recorded = tmp_path / "recorded.vhdx"
    shutil.copyfile(pristine, recorded)
    ops = record(recorded, lambda storage: repair_in_place(str(recorded), storage=storage))
    assert read_all(recorded) == expected
    assert sum(o.kind == "flush" for o in ops) >= (3 if kind == "headers-lost" else 6), [o.kind for o in ops]
    work = tmp_path / "work.vhdx"
    failures, tried = [], 0
    for where in prefixes(ops, recorded, work):
        tried += 1
        try:
            again = vhdx.repair(str(work), in_place=True)
            if not again.ok:
                failures.append(f"{where}: repair again: {again.unrecoverable}")
                continue
            errors = check_file(str(work)).errors
            if errors:
                failures.append(f"{where}: vhdx check: {errors[0].message}")
            if read_all(work) != expected:
                failures.append(f"{where}: reads other data than an uninterrupted repair")
            if (identity(work)[1:] if kind == "headers-lost" else identity(work)) != ident:
                failures.append(f"{where}: the DataWriteGuid or disk id changed")
        except vhdx.VhdxError as e:
            failures.append(f"{where}: {e}")
    print(f"repair --in-place: {len(ops)} recorded calls, power-loss prefixes tried: {tried}")
    assert not failures, f"{len(failures)} of {tried} prefixes fail:\n" + "\n".join(failures[:12])
