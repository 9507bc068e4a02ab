"""New disks appear atomically: complete under their final name, or not at all.

``create``, ``create --parent`` and ``snapshot`` are killed with SIGKILL before each file-system
call they make, in turn (a forked process per call index, running the real CLI; the state on
disk changes only at those calls, so this covers every moment of the creation). After each kill
the final name holds a complete disk that ``vhdx check`` accepts, or nothing; a stray temporary
file is never listed by ``vhdx orphans``; and the re-run succeeds.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
from pathlib import Path

import pytest

import vhdx
import vhdx.cli
from vhdx.errors import DiskExistsError

from support.forensic_chain import run_inprocess

MiB = 1 << 20
# os functions wrapped in the forked processes: every call that changes the file system, and
# every open (so kills also land before the temporary file exists).
IO_CALLS = ("open", "ftruncate", "pwrite", "write", "fdatasync", "fsync", "link", "rename", "replace",
            "unlink")


def run_killed_before_call(index: int, argv: list[str]) -> bool:
    """Run ``vhdx ARGV`` in a forked process that SIGKILLs itself before its ``index``-th
    file-system call. Returns True when it was killed, False when it finished first."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            calls = [0]

            def wrap(real):
                def call(*args, **kwargs):
                    if calls[0] == index:
                        os.kill(os.getpid(), signal.SIGKILL)
                    calls[0] += 1
                    return real(*args, **kwargs)
                return call
            for name in IO_CALLS:
                setattr(os, name, wrap(getattr(os, name)))
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = vhdx.cli.main(argv)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"vhdx {argv} failed with {os.WEXITSTATUS(status)} before any kill"
    return False


def disks_in(folder: Path) -> set[str]:
    return {n for n in os.listdir(folder) if n.endswith((".vhdx", ".avhdx"))}


def assert_valid(path: Path, what: str) -> None:
    result = run_inprocess("check", path)
    assert result.returncode == 0, f"{what}: {path.name} is under its final name but fails check: {result.stdout}{result.stderr}"


def assert_strays_ignored(folder: Path, strays: set[str]) -> None:
    for name in strays:
        assert name.startswith(".") and not name.endswith((".vhdx", ".avhdx")), name
    listed = run_inprocess("orphans", folder, "--json")
    assert listed.returncode == 0, listed.stderr
    for name in strays:
        assert name not in listed.stdout, f"vhdx orphans lists the temporary file {name}"


def kill_at_every_call(folder_for, argv_for, final_for, label: str) -> dict[str, int]:
    """Kill the command before each of its file-system calls in turn, on a fresh folder each time."""
    outcomes = {"before": 0, "inside": 0, "after": 0}
    index = 0
    while True:
        folder = folder_for(index)
        before = set(os.listdir(folder))
        killed = run_killed_before_call(index, argv_for(folder))
        if not killed:
            break
        new = set(os.listdir(folder)) - before
        finals = {n for n in new if n.endswith((".vhdx", ".avhdx"))}
        strays = new - finals
        what = f"{label} killed before call {index}"
        for name in finals:
            assert_valid(folder / name, what)
        if strays:
            assert_strays_ignored(folder, strays)
        outcomes["after" if finals else "inside" if strays else "before"] += 1
        final = final_for(folder)
        if final is None or not final.exists():
            rerun = run_inprocess(*argv_for(folder))
            assert rerun.returncode == 0, f"{what}: the re-run failed: {rerun.stderr}"
            for name in disks_in(folder) - before:
                assert_valid(folder / name, f"{what}, re-run")
        index += 1
    print(f"{label}: {index} kills, {outcomes['inside']} inside the creation "
          f"({outcomes['before']} before it, {outcomes['after']} after the rename)")
    assert outcomes["inside"] >= 3, outcomes
    return outcomes


def test_create_killed_at_every_call(tmp_path: Path) -> None:
    kill_at_every_call(lambda i: fresh_folder(tmp_path / f"k{i}"),
                       lambda folder: ["create", str(folder / "new.vhdx"), "8M", "--block-size", "1M"],
                       lambda folder: folder / "new.vhdx", "create")


@pytest.fixture
def parent_folder(tmp_path: Path):
    """A fresh folder holding a small parent disk, one per call index."""
    template = tmp_path / "template"
    template.mkdir()
    with vhdx.create(template / "base.vhdx", 8 * MiB, block_size=MiB) as disk:
        disk.write(b"base data" * 1000)

    def make(index: int) -> Path:
        folder = fresh_folder(tmp_path / f"k{index}")
        data = (template / "base.vhdx").read_bytes()
        (folder / "base.vhdx").write_bytes(data)
        return folder
    return make


def test_create_child_killed_at_every_call(parent_folder) -> None:
    kill_at_every_call(parent_folder,
                       lambda folder: ["create", str(folder / "child.avhdx"), "--parent", str(folder / "base.vhdx")],
                       lambda folder: folder / "child.avhdx", "create --parent")


def test_snapshot_killed_at_every_call(parent_folder) -> None:
    kill_at_every_call(parent_folder, lambda folder: ["snapshot", str(folder / "base.vhdx")],
                       lambda folder: None, "snapshot")


def fresh_folder(folder: Path) -> Path:
    folder.mkdir()
    return folder


def test_create_refuses_an_existing_name(tmp_path: Path) -> None:
    existing = tmp_path / "taken.vhdx"
    existing.write_bytes(b"not a disk of ours")
    with pytest.raises(DiskExistsError):
        vhdx.create(existing, 8 * MiB)
    assert existing.read_bytes() == b"not a disk of ours"
    dangling = tmp_path / "link.vhdx"
    dangling.symlink_to(tmp_path / "nowhere.vhdx")
    with pytest.raises(DiskExistsError):
        vhdx.create(dangling, 8 * MiB)
    assert sorted(os.listdir(tmp_path)) == ["link.vhdx", "taken.vhdx"]


def test_a_new_disk_is_open_under_its_final_name(tmp_path: Path) -> None:
    """The returned disk names the final path, and a child's locator points from it."""
    store, work = fresh_folder(tmp_path / "store"), fresh_folder(tmp_path / "work")
    base = store / "base.vhdx"
    with vhdx.create(base, 8 * MiB, block_size=MiB) as disk:
        assert disk.path == str(base) and disk.image.storage.path == str(base)
        disk.write(b"written through the renamed file")
    child = work / "child.avhdx"
    with vhdx.create(child, parent=base) as disk:
        assert disk.path == str(child) and disk.image.storage.path == str(child)
        assert disk.image.metadata.parent_locator["relative_path"] == "..\\store\\base.vhdx"
        disk.seek(4096)
        disk.write(b"child data")
    assert os.listdir(store) == ["base.vhdx"] and os.listdir(work) == ["child.avhdx"]
    with vhdx.open(child) as disk:
        assert disk.read(32) == b"written through the renamed file"
        disk.seek(4096)
        assert disk.read(10) == b"child data"
