"""``vhdx repair`` over the hostile-input corpus of test_hostile.py (docs/format.md §1.5).

Every mutation of the corpus (headers, region tables, metadata, BAT entries, hand-built logs,
parent locators), applied to both kinds of base disk (qemu-img's, 512-byte sectors, and
ours, 4096-byte sectors) and to a differencing child, must end one of two ways:

* repaired: the copy passes ``vhdx check`` (no error) and, for 512-byte sectors and no
  parent (what qemu-img opens), ``qemu-img check``; and every virtual byte outside the ranges the report lists as lost
  reads as the original disk (for a dirty log: as the disk after its replay, when the report
  says the log was replayed);
* unrecoverable, with a reason, and no output file.

Either way the input file is not changed (its SHA-256 before and after), and no exception
other than a one-line VhdxError comes out. The counts of each outcome are printed.
"""

from __future__ import annotations

import collections
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

import vhdxbits as vb
from conftest import PARENT_NAME, have
from test_hostile import CASES, LOCATOR_CASES, LOG_CASES, _dirty

import vhdx  # noqa: E402
from vhdx.file.image import Image  # noqa: E402

from support.repair import outside  # noqa: E402

BASES = ("qemu512", "ours4k", "child")


def qemu_can_open(out: Path) -> bool:
    """qemu-img opens VHDX files with 512-byte sectors and no parent only."""
    image = Image.open(str(out))
    try:
        return image.logical_sector_size == 512 and not image.has_parent
    finally:
        image.close()


def _differences(out: Path, expected: bytes, lost: list[tuple[int, int]], also: bytes | None = None,
                 parent: Path | None = None) -> list[str]:
    """Where ``out`` reads other than ``expected`` outside ``lost``. ``also`` is what the
    damaged file itself reads, when it opens: a mutation into another valid state (a block
    made ZERO, another valid block size) changes what the file says, and a repair keeps what
    the file says; so a byte may match either. A file whose metadata was mutated to another
    valid size is repaired at that size: the common part is compared."""
    problems = []
    chain = dict(parents=[str(parent)], ignore_id_mismatch=True) if parent is not None else {}
    with vhdx.open(str(out), **chain) as disk:
        common = min(disk.size, len(expected), len(also) if also is not None else disk.size)
        for s, e in outside(lost, common):
            disk.seek(s)
            got = disk.read(e - s)
            if got == expected[s:e] or (also is not None and got == also[s:e]):
                continue
            bad = [i for i in range(len(got)) if got[i] != expected[s + i] and (also is None or got[i] != also[s + i])]
            if bad:
                problems.append(f"virtual 0x{s + bad[0]:x} differs (not listed as lost)")
                break
    return problems


def _as_read(src: Path, limit: int) -> bytes | None:
    """The damaged file's first ``limit`` virtual bytes as our reader gives them (its log
    replayed in memory), or None."""
    try:
        with vhdx.open(str(src)) as disk:
            return disk.read(limit)
    except vhdx.VhdxError:
        return None


def judge(name: str, data: bytes, expected: bytes, folder: Path, *, parent: bytes | None,
          replayed_expected: bytes | None = None, name_parent: bool = False) -> tuple[str, list[str]]:
    """Repair one mutated file; returns (outcome, problems)."""
    folder.mkdir()
    if parent is not None:
        (folder / PARENT_NAME).write_bytes(parent)
    src, out = folder / f"{name}.vhdx", folder / f"{name}-repaired.vhdx"
    src.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    problems: list[str] = []
    try:
        report = vhdx.repair(str(src), str(out), parent=str(folder / PARENT_NAME) if name_parent else None)
    except vhdx.VhdxError as e:
        if "\n" in str(e):
            problems.append(f"error message not one line: {e!r}")
        report = None
        outcome = f"error: {type(e).__name__}"
    except Exception as e:   # noqa: BLE001 - what this test is for
        return "crash", [f"raised {type(e).__name__}: {e}"]
    if hashlib.sha256(src.read_bytes()).hexdigest() != before:
        problems.append("the input file was changed")
    if report is None:
        return outcome, problems
    if not report.ok and "--size" in (report.unrecoverable or ""):
        report = vhdx.repair(str(src), str(out), size=len(expected))  # as the user told to does
        if "--size" in (report.unrecoverable or ""):
            problems.append(f"--size given, still asked for: {report.unrecoverable}")
    if not report.ok:
        if not report.unrecoverable:
            problems.append("unrecoverable without a reason")
        if out.exists():
            problems.append("an output was written for an unrecoverable file")
        return f"unrecoverable ({report.unrecoverable.split(':')[0]})", problems
    check = vhdx.ops.check.check_file(str(out))
    problems += [f"vhdx check: {f.message}" for f in check.errors]
    if have("qemu-img") and qemu_can_open(out):
        r = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(out)], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"qemu-img check exit {r.returncode}: {(r.stdout + r.stderr).strip()[:200]}")
    log = next((st for st in report.structures if st.name == "log"), None)
    want = replayed_expected if replayed_expected is not None and log is not None and \
        log.status == "repaired" else expected
    problems += _differences(out, want, report.lost_ranges(), _as_read(src, len(want)),
                             parent=folder / PARENT_NAME if parent is not None else None)
    return "repaired" + (" with losses" if report.lost else ""), problems


def _run(cases, base: str, base_disks, tmp_path: Path, build, *, name_parent: bool = False) -> None:
    file_bytes, virtual = base_disks(base)
    parent = base_disks("child:parent")[0] if base == "child" else None
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    failures = []
    for i, case in enumerate(cases):
        data, replayed = build(case, bytearray(file_bytes), virtual)
        name = f"{case.name}@{base}"
        outcome, problems = judge(name, data, virtual, tmp_path / f"c{i}", parent=parent,
                                  replayed_expected=replayed, name_parent=name_parent)
        if getattr(case, "expect", None) == "ok" and outcome != "repaired":
            problems.append(f"a valid or recoverable file gave {outcome}")
        kind = outcome.split(" (")[0]
        counts[kind] += 1
        if os.environ.get("VHDX_REPAIR_VERBOSE"):
            print(f"  {name}: {outcome}")
        if kind != outcome:
            reasons[outcome] += 1
        failures += [f"{name}: {p}" for p in problems]
    print(f"\nrepair corpus on {base}: {len(cases)} files: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for reason, n in sorted(reasons.items()):
        print(f"  {n:3} {reason}")
    assert "crash" not in counts, "\n".join(failures)
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures[:20])


def _mutated(case, buf: bytearray, virtual: bytes):
    layout = vb.parse_layout(buf)
    r = case.mutate(buf, layout)
    return bytes(buf if r is None else r), None


@pytest.mark.parametrize("base", BASES + ("qemufixed",))
def test_every_corpus_mutation_repairs_or_is_reported_unrecoverable(base, base_disks, tmp_path):
    cases = [c for c in CASES if base != "qemufixed" or c.name.startswith("bat-")]
    _run(cases, base, base_disks, tmp_path, _mutated)


@pytest.mark.parametrize("base", BASES)
def test_every_hostile_log_repairs_or_is_reported_unrecoverable(base, base_disks, tmp_path):
    class LogCase:
        def __init__(self, name, kw):
            self.name, self.kw = f"log-{name}", kw

    def build(case, buf, virtual):
        L = vb.parse_layout(buf)
        data = _dirty(buf, L, **case.kw)
        model = bytearray(virtual)
        start = 3 * L.block_size
        model[start:start + L.block_size] = b"\x5a" * min(L.block_size, len(model) - start)
        return data, bytes(model)

    _run([LogCase(n, kw) for n, _e, kw in LOG_CASES], base, base_disks, tmp_path, build)


def test_every_locator_mutation_of_a_child_repairs_or_is_reported_unrecoverable(base_disks, tmp_path):
    """With --parent, as a user whose child lost its locator runs it: every locator mutation repairs."""
    _run(LOCATOR_CASES, "child", base_disks, tmp_path, _mutated, name_parent=True)


def test_a_damaged_locator_is_rebuilt_from_parent(base_disks, tmp_path):
    """--parent FILE rebuilds a locator the corpus damages beyond reading."""
    file_bytes, virtual = base_disks("child")
    buf = bytearray(file_bytes)
    L = vb.parse_layout(buf)
    at = L.metadata[vb.PARENT_LOCATOR].item_file_offset
    buf[at:at + 16] = bytes(16)  # the locator type: no longer a VHDX locator
    (tmp_path / PARENT_NAME).write_bytes(base_disks("child:parent")[0])
    src, out = tmp_path / "child.avhdx", tmp_path / "fixed.avhdx"
    src.write_bytes(buf)
    report = vhdx.repair(str(src), str(out))
    assert not report.ok and "--parent" in report.unrecoverable
    assert not out.exists()
    report = vhdx.repair(str(src), str(out), parent=str(tmp_path / PARENT_NAME))
    assert report.ok, report.lines()
    assert ("parent locator", "repaired") in [(s.name, s.status) for s in report.structures]
    assert not report.lost
    assert not _differences(out, virtual, [])
    assert os.path.getsize(src) == len(buf)


def judge_in_place(name: str, data: bytes, expected: bytes, folder: Path) -> tuple[str, list[str]]:
    """``repair --in-place`` of one mutated file: repaired (check clean, reads as ``expected``
    or as the damaged file read, outside the lost ranges), or refused with the file unchanged."""
    folder.mkdir()
    src = folder / f"{name}.vhdx"
    src.write_bytes(data)
    also = _as_read(src, len(expected))
    try:
        report = vhdx.repair(str(src), in_place=True)
    except vhdx.VhdxError as e:
        problems = [] if src.read_bytes() == data else [f"refused ({e}) but the file was changed"]
        return f"refused: {type(e).__name__}", problems
    except Exception as e:   # noqa: BLE001 - what this test is for
        return "crash", [f"raised {type(e).__name__}: {e}"]
    if not report.ok:
        return "unrecoverable", [] if src.read_bytes() == data else ["unrecoverable but the file was changed"]
    problems = [f"vhdx check: {f.message}" for f in vhdx.ops.check.check_file(str(src)).errors]
    if not problems:
        problems += _differences(src, expected, report.lost_ranges(), also)
    return "repaired", problems


@pytest.mark.parametrize("base", ["qemu512", "ours4k"])
def test_every_corpus_mutation_repairs_in_place_or_is_left_unchanged(base, base_disks, tmp_path):
    file_bytes, virtual = base_disks(base)
    counts: collections.Counter[str] = collections.Counter()
    failures = []
    for i, case in enumerate(CASES):
        data, _ = _mutated(case, bytearray(file_bytes), virtual)
        outcome, problems = judge_in_place(f"{case.name}@{base}", data, virtual, tmp_path / f"c{i}")
        counts[outcome.split(":")[0]] += 1
        if os.environ.get("VHDX_REPAIR_VERBOSE"):
            print(f"  {case.name}@{base}: {outcome}")
        failures += [f"{case.name}@{base}: {p}" for p in problems]
    print(f"\nrepair --in-place over the corpus on {base}: {len(CASES)} files: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert "crash" not in counts, "\n".join(failures)
    assert not failures, f"{len(failures)} problems:\n" + "\n".join(failures[:20])
