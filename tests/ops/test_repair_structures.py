"""Each structure destroyed on purpose, on our own disks and on specimens: what ``vhdx repair``
must make of it. The table below is the expectation; each row is checked end to end.

Outcomes:

* ``same``: repaired with nothing lost; the copy reads exactly as the original.
* ``partial``: repaired; the report lists lost ranges, and everything outside them reads as
  the original.
* ``unreplayed``: repaired with nothing listed lost, but the file's dirty log could not be
  replayed (the log, or the headers naming it, were destroyed): the copy reads as the original
  read before its log was replayed. The report says the log was lost.
* ``needs --size``: unrecoverable without ``--size``; with it, ``same``.
* ``needs --parent``: unrecoverable without ``--parent``; with it, ``same``.
* ``lost``: unrecoverable, with the reason (and no output).

Every repaired copy passes ``vhdx check``, and ``qemu-img check`` when qemu-img can open it
(512-byte sectors, no parent); the input is never changed. Specimens are read from
the shared folder (decompressed by the fixture into a temporary folder), never copied into
the repository.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import vhdx
from vhdx.file.image import Image
from vhdx.format import constants as C
from vhdx.format.records import build_header
from vhdx.ops.check import check_file

from support.repair import DESTROY, differs_outside_lost, file_sha256, make_child, make_dynamic, make_two_page_bat, places

STRUCTURES = list(DESTROY)

# disk -> the outcome for each structure, in the order of STRUCTURES:
#   header 1, header 2, both headers, region table 1, region table 2, both region tables, log,
#   metadata table, BAT page
EXPECTED: dict[str, tuple[str, ...]] = {
    "ours-dynamic": ("same", "same", "same", "same", "same", "same", "same", "needs --size", "lost"),
    "ours-4k": ("same", "same", "same", "same", "same", "same", "same", "needs --size", "lost"),
    "ours-child": ("same", "same", "same", "same", "same", "same", "same", "needs --parent", "lost"),
    "ours-two-page-bat": ("same", "same", "same", "same", "same", "same", "same", "needs --size", "partial"),
    "dissect-hypervisor-fixed-10M.vhdx": ("same", "same", "same", "same", "same", "same", "same", "needs --size",
                                          "lost"),
    "discutils-win10-dirtylog-dynamic-1G.vhdx": ("same", "same", "unreplayed", "same", "same", "same",
                                                 "unreplayed", "needs --size", "same"),
}
SPECIMENS = [name for name in EXPECTED if name.endswith(".vhdx")]


def _make(disk: str, folder: Path, specimen) -> tuple[Path, Path | None]:
    """(the disk, its parent or None) in ``folder``."""
    if disk == "ours-dynamic":
        return make_dynamic(folder / "disk.vhdx"), None
    if disk == "ours-4k":
        return make_dynamic(folder / "disk.vhdx", lss=4096), None
    if disk == "ours-child":
        return make_child(folder), folder / "parent.vhdx"
    if disk == "ours-two-page-bat":
        return make_two_page_bat(folder / "disk.vhdx"), None
    src = specimen(disk)
    path = folder / src.name
    subprocess.run(["cp", "--sparse=always", str(src), str(path)], check=True)
    return path, None


def _unreplayed(path: Path, folder: Path) -> Path:
    """A copy of ``path`` with its log marked clean: the disk as it read before its log's replay."""
    copy = folder / ("unreplayed-" + path.name)
    subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
    image = Image.open(str(copy))
    h = image.header
    image.close()
    with open(copy, "r+b") as f:
        for i, offset in enumerate(C.HEADER_OFFSETS):
            f.seek(offset)
            f.write(build_header(h.replace(log_guid=C.ZERO_GUID, sequence_number=h.sequence_number + 1 + i)))
    return copy


def _qemu_check(out: Path, qemu_img: str) -> str:
    """qemu-img check of a repaired copy it can open (512-byte sectors, no parent): "" when clean."""
    image = Image.open(str(out))
    opens = image.logical_sector_size == 512 and not image.has_parent
    image.close()
    if not opens:
        return ""
    r = subprocess.run([qemu_img, "check", "-f", "vhdx", str(out)], capture_output=True, text=True)
    return "" if r.returncode == 0 else f"qemu-img check exit {r.returncode}: {r.stdout}{r.stderr}"


def _judge(disk: str, structure: str, folder: Path, specimen, qemu_img: str) -> tuple[str, str]:
    """(outcome, problem or "")."""
    original, parent = _make(disk, folder, specimen)
    damaged = folder / ("damaged-" + original.name)
    subprocess.run(["cp", "--sparse=always", str(original), str(damaged)], check=True)
    DESTROY[structure](damaged, places(original))
    before = file_sha256(damaged)
    out = folder / ("repaired-" + original.name)
    report = vhdx.repair(damaged, out)
    outcome = ""
    if not report.ok and "--parent" in report.unrecoverable:
        outcome = "needs --parent"
        report = vhdx.repair(damaged, out, parent=parent)
    elif not report.ok and "--size" in report.unrecoverable:
        outcome = "needs --size"
        report = vhdx.repair(damaged, out, size=vhdx.open(original, missing_parent="zeros").size)
    if file_sha256(damaged) != before:
        return outcome or "?", "the input was changed"
    if not report.ok:
        return outcome or "lost", "" if report.unrecoverable and not out.exists() else "no reason, or an output"
    errors = check_file(out).errors
    if errors:
        return outcome or "?", f"vhdx check: {errors[0].message}"
    problem = _qemu_check(out, qemu_img)
    if problem:
        return outcome or "?", problem
    log_lost = any(s.name == "log" and s.status == "lost" for s in report.structures)
    reference = _unreplayed(original, folder) if log_lost and _was_dirty(original) else original
    where = differs_outside_lost(reference, out, report.lost_ranges())
    if where:
        return outcome or "?", f"reads differently at {where}; report: {report.lines()}"
    if outcome:
        return outcome, "" if not report.lost else "losses with the missing value given"
    if reference is not original:
        return "unreplayed", ""
    return ("partial" if report.lost else "same"), ""


def _was_dirty(path: Path) -> bool:
    image = Image.open(str(path))
    try:
        return image.log_was_dirty
    finally:
        image.close()


CASES = [(disk, structure, expected) for disk, row in EXPECTED.items() for structure, expected in zip(STRUCTURES, row)]


@pytest.mark.parametrize("disk,structure,expected", CASES, ids=[f"{d}-{s}".replace(" ", "_") for d, s, _ in CASES])
def test_destroyed_structure(disk, structure, expected, tmp_path, request, interop_tool):
    specimen = request.getfixturevalue("specimen") if disk in SPECIMENS else None
    outcome, problem = _judge(disk, structure, tmp_path, specimen, interop_tool("qemu-img"))
    assert not problem, f"{disk}, {structure} destroyed: {outcome}: {problem}"
    assert outcome == expected, f"{disk}, {structure} destroyed: {outcome}, expected {expected}"


def test_table_covers_every_structure():
    assert all(len(row) == len(STRUCTURES) for row in EXPECTED.values())
    assert shutil.which("cp")
