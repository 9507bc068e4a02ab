"""The cleanup of a merge: listed before it happens, durable, and finished by a re-run.

* Power loss undoing a delete: the merged file comes back (``os.link`` before the merge,
  ``os.rename`` after it); the same command run again recognises it by its GUIDs and deletes it,
  in one- and two-level merges, so the folder ends up holding exactly the destination.
* A kept file (``--keep``) stays refused: it was explicitly let go of, and the journal says so.
* Every file a merge will delete is in the plan (``to_delete``), in the dry run and in the CLI
  output before the copy starts.
* Deletes are followed by an fsync of the folder.
* The free-space check counts what the merge may allocate, holes of sparse blocks included, and
  its refusal gives real numbers; a disk that fills up during the merge stops it with one line
  naming the file and the space still needed, and the same command finishes after space is freed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import MergeError
from vhdx.file.image import Image
from vhdx.ops.merge import cleanup
from vhdx.ops.merge.journal import read_journal

from support.merging import MiB, cli, merge
from support.needs import unavailable

Usage = namedtuple("Usage", "total used free")


def chain_of(folder: Path, levels: int) -> tuple[list[str], bytes]:
    """base.vhdx and ``levels`` checkpoints above it (base first), and what the leaf reads."""
    folder.mkdir(parents=True, exist_ok=True)
    base = str(folder / "base.vhdx")
    model = bytearray(4 * MiB)
    with vhdx.create(base, 4 * MiB, block_size=MiB) as d:
        d.write(b"A" * MiB)
    model[:MiB] = b"A" * MiB
    paths = [base]
    for i in range(levels):
        paths.append(vhdx.snapshot(paths[-1]))
        with vhdx.open(paths[-1], "r+") as d:
            d.seek(MiB + i * 8192)
            d.write(bytes([0x41 + i + 1]) * 4096)
        model[MiB + i * 8192:MiB + i * 8192 + 4096] = bytes([0x41 + i + 1]) * 4096
    return paths, bytes(model)


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def read_all(path: str) -> bytes:
    with vhdx.open(path) as d:
        return d.read()


# ------------------------------------------------------------------ power loss undoing a delete

def test_power_loss_undoing_the_delete_of_a_one_level_merge(tmp_path: Path) -> None:
    (base, leaf), model = chain_of(tmp_path / "vm", 1)
    saved = str(tmp_path / "saved")
    os.link(leaf, saved)
    merge(leaf)
    os.rename(saved, leaf)  # the unlink did not survive the power loss
    rc, text = cli("merge", leaf)
    assert rc == 0, text
    print(text.strip())
    assert names(tmp_path / "vm") == ["base.vhdx"]
    assert read_all(base) == model


@pytest.mark.parametrize("restored, rerun", [
    ("both", "into"), ("both", "parent"), ("middle", "into"), ("leaf", "into"),
])
def test_power_loss_undoing_the_deletes_of_a_two_level_merge(restored: str, rerun: str, tmp_path: Path) -> None:
    (base, mid, leaf), model = chain_of(tmp_path / "vm", 2)
    saved = {p: str(tmp_path / f"saved-{i}") for i, p in enumerate((mid, leaf))}
    for p, s in saved.items():
        os.link(p, s)
    result = merge(leaf, base)
    assert result.deleted == [mid, leaf]
    back = {"both": (mid, leaf), "middle": (mid,), "leaf": (leaf,)}[restored]
    for p in back:
        os.rename(saved[p], p)
    again = merge(leaf, base if rerun == "into" else None)
    print(f"restored {restored}, re-run by {rerun}: deleted {[os.path.basename(p) for p in again.deleted]}")
    assert sorted(again.deleted) == sorted(back)
    assert names(tmp_path / "vm") == ["base.vhdx"], "a merged layer stayed behind"
    assert read_all(base) == model
    assert merge(leaf, base).deleted == []  # and now there is nothing left to do


def test_a_kept_file_stays_refused_after_the_fix(tmp_path: Path) -> None:
    (base, mid, leaf), model = chain_of(tmp_path / "vm", 2)
    merge(leaf, base, keep=True)
    image = Image.open(base)
    try:
        assert read_journal(image)["keep"] is True
    finally:
        image.close()
    for child in (leaf, mid):
        with pytest.raises(MergeError, match="kept with --keep"):
            merge(child, base)
    assert names(tmp_path / "vm") == sorted(os.path.basename(p) for p in (base, mid, leaf))
    assert read_all(base) == model


def test_deletes_fsync_the_folder(tmp_path: Path, monkeypatch) -> None:
    (base, mid, leaf), _model = chain_of(tmp_path / "vm", 2)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            synced.append(path)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    merge(leaf, base)
    print(f"folder fsyncs: {len(synced)}")
    assert synced.count(str(tmp_path / "vm")) >= 2, synced


def test_a_file_another_run_deleted_first_is_not_an_error(tmp_path: Path, monkeypatch) -> None:
    """Two runs of one merge that reach the cleanup together: the second finds the files gone
    between its check and its delete, and finishes without a 'cleanup stopped' error."""
    (base, mid, leaf), model = chain_of(tmp_path / "vm", 2)
    real = cleanup.verify_journal

    def the_other_run_was_faster(*args, **kwargs):
        members = real(*args, **kwargs)
        for m in members:
            if m is not None:
                os.unlink(m.path)
        return members

    monkeypatch.setattr(cleanup, "verify_journal", the_other_run_was_faster)
    result = merge(leaf, base)
    assert result.deleted == []
    assert names(tmp_path / "vm") == ["base.vhdx"] and read_all(base) == model


def test_a_merged_file_named_through_a_symlink_is_refused_not_half_deleted(tmp_path: Path) -> None:
    (base, leaf), model = chain_of(tmp_path / "vm", 1)
    link = tmp_path / "vm" / "link.avhdx"
    os.symlink(os.path.basename(leaf), link)
    before = names(tmp_path / "vm")
    with pytest.raises(MergeError, match="symbolic link") as info:
        merge(str(link))
    print(info.value)
    assert names(tmp_path / "vm") == before and read_all(leaf) == model
    merge(leaf)  # named as itself, it merges and goes
    assert names(tmp_path / "vm") == ["base.vhdx", "link.avhdx"]


# ------------------------------------------------------------------ the plan lists the deletes

def test_the_plan_lists_every_file_to_delete(tmp_path: Path) -> None:
    (base, mid, leaf), _model = chain_of(tmp_path / "vm", 2)
    plan = merge(leaf, base, dry_run=True)
    assert plan.to_delete == [mid, leaf]  # nearest the destination first
    assert merge(leaf, base, dry_run=True, keep=True).to_delete == []
    rc, text = cli("merge", leaf, "--into", base, "--dry-run")
    assert rc == 0 and f"delete      {mid}" in text and f"delete      {leaf}" in text, text
    rc, text = cli("merge", leaf, "--into", base, "--dry-run", "--json")
    assert rc == 0 and json.loads(text[text.index("{"):])["to_delete"] == [mid, leaf], text
    events: list[str] = []
    merge(leaf, base, on_plan=lambda p: events.append(f"plan {p.to_delete}"),
          progress=lambda done, total: events.append("progress"))
    assert events[0] == f"plan {[mid, leaf]}" and "progress" in events[1:], events


def test_the_cli_prints_the_files_to_delete_before_the_copy(tmp_path: Path) -> None:
    (base, mid, leaf), _model = chain_of(tmp_path / "vm", 2)
    rc, text = cli("merge", leaf, "--into", base)
    assert rc == 0, text
    print(text)
    assert text.index(f"will delete {mid}") < text.index(f"will delete {leaf}") < text.index("merged ")


# ------------------------------------------------------------------ free space

def test_free_space_refusal_gives_real_numbers(tmp_path: Path, monkeypatch) -> None:
    (base, leaf), _model = chain_of(tmp_path / "vm", 1)
    plan = merge(leaf, base, dry_run=True)
    assert 0 < plan.bytes_needed
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 300 * 1024))
    with pytest.raises(MergeError) as info:
        merge(leaf, base)
    message = str(info.value)
    print(message)
    m = re.search(r"needs up to (\d+(?:\.\d)?) (KiB|MiB|GiB), (\d+(?:\.\d)?) (KiB|MiB|GiB|bytes) (?:are|is) free",
                  message)
    assert m, message
    assert m.group(3) == "300.0" and m.group(4) == "KiB", message
    assert " 0 bytes" not in message


def test_free_space_counts_writes_into_sparse_blocks(tmp_path: Path, monkeypatch) -> None:
    """A fixed destination created sparse: every block is allocated, but the merge fills holes."""
    folder = tmp_path / "vm"
    folder.mkdir()
    base = str(folder / "base.vhdx")
    vhdx.create(base, 16 * MiB, block_size=MiB, fixed=True).close()
    leaf = vhdx.snapshot(base)
    with vhdx.open(leaf, "r+") as d:
        d.write(b"L" * (12 * MiB))
    plan = merge(leaf, base, dry_run=True)
    print(f"allocations {plan.allocations}, bytes needed {plan.bytes_needed}")
    assert plan.allocations == 0 and plan.bytes_needed >= 12 * MiB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 4 * MiB))
    with pytest.raises(MergeError, match=r"needs up to 1\d\.\d MiB, 4\.0 MiB are free"):
        merge(leaf, base)


def test_nothing_to_allocate_is_never_refused(tmp_path: Path, monkeypatch) -> None:
    """A destination whose target blocks and log are all written needs no new space."""
    (base, leaf), model = chain_of(tmp_path / "vm", 1)
    merge(leaf, base)  # fills the log region and the block the next merge writes to
    leaf2 = vhdx.snapshot(base)
    with vhdx.open(leaf2, "r+") as d:
        d.seek(MiB)
        d.write(b"Z" * 4096)
    plan = merge(leaf2, base, dry_run=True)
    print(f"bytes needed {plan.bytes_needed}, blocks to allocate {plan.allocations}")
    assert plan.bytes_needed == 0 and plan.allocations == 0
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 0))
    merge(leaf2, base)
    model = model[:MiB] + b"Z" * 4096 + model[MiB + 4096:]
    assert read_all(base) == model


# ------------------------------------------------------------------ disk full during the merge

def test_disk_full_during_the_merge_names_the_file_and_the_space(tmp_path: Path, monkeypatch) -> None:
    """ENOSPC from the data writes into the destination (past its old end), from the OS calls."""
    (base, mid, leaf), model = chain_of(tmp_path / "vm", 2)
    end = os.path.getsize(base)
    real_pwrite = os.pwrite
    real_copy_file_range = os.copy_file_range
    hits = []

    def full(fd: int, offset: int) -> bool:
        if os.readlink(f"/proc/self/fd/{fd}") == base and offset >= end:
            hits.append(offset)
            return True
        return False

    def pwrite(fd, data, offset):
        if full(fd, offset):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
        if full(dst, offset_dst):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_copy_file_range(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    with pytest.raises(MergeError) as info:
        merge(leaf, base)
    monkeypatch.undo()
    message = str(info.value)
    print(message)
    assert hits
    assert "\n" not in message and message.startswith(base + ": disk full"), message
    assert re.search(r"still needs up to \d+(\.\d)? (bytes|KiB|MiB|GiB)", message), message
    assert "run the same merge again" in message
    assert read_all(leaf) == model  # nothing is lost
    rc, text = cli("merge", leaf, "--into", base)  # space is free again: the same command finishes
    assert rc == 0, text
    assert names(tmp_path / "vm") == ["base.vhdx"]
    assert read_all(base) == model


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 24 MiB tmpfs (needs root): a real file system that runs out of space."""
    if os.geteuid() != 0:
        unavailable("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        unavailable(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_file_system_then_the_same_command_finishes(small_tmpfs: Path) -> None:
    folder = small_tmpfs / "vm"
    (base, mid, leaf), _ = chain_of(folder, 2)
    with vhdx.open(leaf, "r+") as d:
        d.seek(2 * MiB)
        d.write(b"D" * (2 * MiB))
    model = read_all(leaf)
    filler = small_tmpfs / "filler"

    def fill_the_disk(plan) -> None:  # after the free-space check, before the copy
        with open(filler, "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * (256 * 1024))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC

    with pytest.raises(MergeError) as info:
        merge(leaf, base, on_plan=fill_the_disk)
    print(info.value)
    assert "disk full" in str(info.value) and "\n" not in str(info.value)
    assert read_all(leaf) == model  # nothing already merged is lost
    filler.unlink()
    rc, text = cli("merge", leaf, "--into", base)
    assert rc == 0, text
    assert names(folder) == ["base.vhdx"] and read_all(base) == model
