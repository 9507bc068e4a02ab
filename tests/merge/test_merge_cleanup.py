"""The cleanup of a merge: listed before it happens, durable, and finished by a re-run.

* Power loss undoing a delete: the merged file comes back (``os.link`` before the merge,
  ``os.rename`` after it); the same command run again recognises it by its GUIDs and deletes it,
  in one- and two-level merges, so the folder ends up holding exactly the destination.
* A kept file (``--keep``) stays refused: it was explicitly let go of, and the journal says so.
* Every file a merge will delete is in the plan (``to_delete``), in the dry run and in the CLI
  output before the copy starts.
* Deletes are followed by an fsync of the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import MergeError
from vhdx.image import Image
from vhdx.merging import read_journal

from .mergekit import MiB, cli, merge, merging


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

    monkeypatch.setattr(merging.os, "fsync", fsync)
    merge(leaf, base)
    print(f"folder fsyncs: {len(synced)}")
    assert synced.count(str(tmp_path / "vm")) >= 2, synced


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
