"""``vhdx diff --files`` on chains whose layers hold real file systems (ext4, FAT, exFAT, NTFS; no
table, MBR, GPT): each checkpoint reports exactly the files it created, changed and deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.cli import assert_one_line_error, run_inprocess, run_subprocess

from support.filesystems import Step, build, require


def _random(seed: int, n: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


def _steps() -> list[Step]:
    return [
        Step([("mkdir", "/docs", b""), ("write", "/docs/keep.txt", b"unchanged\n" * 50),
              ("write", "/docs/edit.txt", b"first version\n"), ("write", "/big.bin", _random(1, 700_000)),
              ("write", "/gone.txt", b"to be deleted\n"), ("write", "/same-size.bin", _random(2, 200_000)),
              ("mkdir", "/old", b""), ("write", "/old/a.txt", b"a" * 5000), ("write", "/tail.log", b"log\n" * 100),
              ("mkdir", "/empty", b"")]),
        Step([("append", "/docs/edit.txt", b"second version\n"), ("delete", "/gone.txt", b""),
              ("mkdir", "/new", b""), ("write", "/new/n1.bin", _random(3, 300_000)),
              ("overwrite", "/same-size.bin", _random(4, 4096))]),
        Step([("delete", "/old/a.txt", b""), ("write", "/docs/added.txt", b"late\n"),
              ("rename", "/docs/keep.txt", b"/docs/kept.txt"), ("mkdir", "/old/sub", b""),
              ("rename", "/old/sub", b"/moved"), ("rename", "/empty", b"/renamed"),
              ("append", "/tail.log", b"more\n" * 10), ("overwrite", "/big.bin", _random(5, 65536))]),
    ]


def _reported(child: Path) -> dict[str, set[str]]:
    out = run_inprocess("diff", child, "--files", "--json").json()
    got: dict[str, set[str]] = {"created": set(), "changed": set(), "deleted": set(),
                                "fs_type": {v["fs_type"] for v in out["volumes"]}}
    for f in out["files"]:
        got[f["change"]].add(f["path"])
    return got


@pytest.mark.parametrize("fs, table", [("ext4", "none"), ("ext4", "gpt"), ("fat", "mbr"), ("ntfs", "gpt"),
                                       ("exfat", "mbr"), ("exfat", "gpt")])
def test_each_checkpoint_reports_exactly_its_files(fs: str, table: str, tmp_path: Path) -> None:
    require(fs)
    chain = build(tmp_path / "disks", fs, table, _steps())
    for n in (1, 2):
        step = chain.steps[n]
        got = _reported(chain.paths[n])
        case = f"{fs}/{table} checkpoint {n}"
        assert len(got["fs_type"]) == 1 and got["fs_type"].pop().startswith(fs), case   # read as the fs made
        assert got["created"] == step.created, case
        assert got["deleted"] == step.deleted, case
        assert got["changed"] == step.changed, case


def test_json_has_inodes_sizes_times_and_changed_ranges(tmp_path: Path) -> None:
    require("ext4")
    chain = build(tmp_path / "disks", "ext4", "gpt", _steps())
    out = run_inprocess("diff", chain.paths[2], "--files", "--json").json()
    assert out["volumes"][0]["offset"] == 1 << 20 and out["volumes"][0]["fs_type"] == "ext4"
    files = {f["path"]: f for f in out["files"]}
    big = files["/big.bin"]
    assert big["change"] == "changed" and "content" in big["what"] and big["inode"] > 0
    assert big["size"] == 700_000 and big["before"]["size"] == 700_000
    assert big["changed_ranges"] and big["changed_ranges"][0]["offset"] == 0
    assert sum(r["length"] for r in big["changed_ranges"]) <= 65536 + 512
    assert big["after"]["times"]["mtime"].endswith("Z")
    tail = files["/tail.log"]
    assert tail["before"]["size"] == 400 and tail["after"]["size"] == 450
    assert tail["changed_ranges"] == [{"offset": 400, "length": 50}]
    created = files["/docs/added.txt"]
    assert created["before"] is None and created["changed_ranges"] == [{"offset": 0, "length": 5}]
    assert files["/old/a.txt"]["after"] is None
    human = run_inprocess("diff", chain.paths[2], "--files")
    assert human.returncode == 0, human.describe()
    assert "changed  /big.bin" in human.stdout and "deleted  /old/a.txt" in human.stdout
    assert "volume 1 at 1048576" in human.stdout


def test_diff_files_needs_the_parent_and_names_pytsk3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import vhdx
    with vhdx.create(tmp_path / "base.vhdx", 8 << 20):
        pass
    child = vhdx.snapshot(tmp_path / "base.vhdx")
    assert_one_line_error(run_inprocess("diff", tmp_path / "base.vhdx", "--files"), "has none")
    monkeypatch.setitem(sys.modules, "pytsk3", None)
    assert_one_line_error(run_inprocess("diff", child, "--files"), "pip install 'vhdx[forensics]'")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "base.vhdx").rename(tmp_path / "elsewhere" / "base.vhdx")
    assert_one_line_error(run_subprocess("diff", child, "--files"), "not found")
    assert json.loads(run_inprocess("diff", child, "--json").stdout)["changed_bytes"] == 0


def _many_files_steps(folders: int = 20) -> list[Step]:
    """100 files in each of ``folders`` folders and a small folder; then one file created, then
    one changed in place."""
    base: list[tuple[str, str, bytes]] = [("mkdir", "/small", b""), ("write", "/small/a.txt", b"a\n")]
    for d in range(folders):
        base.append(("mkdir", f"/d{d}", b""))
        base += [("write", f"/d{d}/f{f}.txt", b"%d %d\n" % (d, f) * 20) for f in range(100)]
    return [Step(base), Step([("write", "/small/new.txt", b"created\n")]),
            Step([("overwrite", "/d7/f42.txt", b"CHANGED")])]


@pytest.mark.parametrize("fs", ["ext4", "ntfs", "fat", "exfat"])
def test_the_cost_follows_the_change_not_the_number_of_files(fs: str, tmp_path: Path) -> None:
    """Among 2,000 files (800 on FAT, written one mtools call each), a checkpoint that creates
    one file or changes one opens a handful of metadata records, not every file; on ext4 the
    created file is named from its folder's listing alone."""
    require(fs)
    chain = build(tmp_path / "disks", fs, "gpt", _many_files_steps(8 if fs == "fat" else 20))
    for n in (1, 2):
        out = run_inprocess("diff", chain.paths[n], "--files", "--json").json()
        step = chain.steps[n]
        got = {c: {f["path"] for f in out["files"] if f["change"] == c} for c in ("created", "changed", "deleted")}
        assert got == {"created": step.created, "changed": step.changed, "deleted": step.deleted}, (fs, n)
        vol = out["volumes"][0]
        if fs in ("fat", "exfat") and n == 2 and vol["method"] == "walk":
            # times in 2-second steps: an overwrite soon after the write may leave the entry as
            # it was; then only a walk finds the file, and the volume says so
            assert vol["why"].startswith("data rewritten in place"), vol
            continue
        assert vol["method"] == "records", vol
        assert vol["records_changed"] <= 8 and vol["records_examined"] <= 40, vol
        if fs in ("fat", "exfat"):
            assert vol["names_listed"] < 2 * 1000, vol   # the folder walk stops once the file is named
        elif fs == "ntfs":
            assert vol["names_listed"] == 0 and not vol["folder_walk"], vol
        elif n == 1:     # ext: named from the changed folders (/small and the root) alone
            assert not vol["folder_walk"] and vol["names_listed"] <= 60, vol
        else:            # ext, a file changed in place: its folder did not change; a folder walk names it
            assert vol["folder_walk"], vol
