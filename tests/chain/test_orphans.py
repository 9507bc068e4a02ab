"""find_chains and ``vhdx orphans``: a folder of several VMs' disks, rebuilt into a forest.

The folder holds:
- VM A: ``vma.vhdx`` with two checkpoints (a checkpoint of a checkpoint): one straight chain.
- VM B: ``vmb.vhdx`` with one checkpoint that has two children (a branch).
- VM E: ``vme.vhdx`` with a single checkpoint (the two-file form of the merge command).
- a broken link: ``vmc_<GUID>.avhdx`` whose parent ``vmc.vhdx`` was deleted.
- an ID mismatch: ``vmd_<GUID>.avhdx`` whose parent ``vmd.vhdx`` was written after the snapshot.
- ``junk.vhdx``: random bytes; and ``notes.txt``, which is no disk at all.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhdx

from .helpers import MiB, locator_of, pattern, run_cli, set_locator, write_all

SIZE = 2 * MiB + 512


@dataclass
class Folder:
    root: Path
    a: list[Path]  # base, checkpoint 1, checkpoint 2
    b: list[Path]  # base, checkpoint, branch child 1, branch child 2
    e: list[Path]  # base, checkpoint
    broken: Path
    mismatched: Path
    mismatched_parent: Path
    junk: Path

    def rel(self, path: str | Path) -> str:
        return os.path.relpath(path, self.root)


def make_base(path: Path, seed: int) -> Path:
    with vhdx.create(path, SIZE, block_size=MiB) as disk:
        write_all(disk, seed * 1000, pattern(seed, 5000))
    return path


def checkpoint(parent: Path, seed: int) -> Path:
    child = Path(vhdx.snapshot(parent))
    with vhdx.open(child, "r+") as disk:
        write_all(disk, seed * 512, pattern(seed, 3000))
    return child


@pytest.fixture
def folder(tmp_path: Path) -> Folder:
    root = tmp_path / "Virtual Hard Disks"
    root.mkdir()
    a0 = make_base(root / "vma.vhdx", 1)
    a1 = checkpoint(a0, 2)
    a2 = checkpoint(a1, 3)
    b0 = make_base(root / "vmb.vhdx", 4)
    b1 = checkpoint(b0, 5)
    b2 = Path(vhdx.snapshot(b1))  # two children of one checkpoint, neither written after the other
    b3 = Path(vhdx.snapshot(b1))
    e0 = make_base(root / "vme.vhdx", 6)
    e1 = checkpoint(e0, 7)
    c0 = make_base(root / "vmc.vhdx", 8)
    broken = checkpoint(c0, 9)
    c0.unlink()
    d0 = make_base(root / "vmd.vhdx", 10)
    mismatched = checkpoint(d0, 11)
    with vhdx.open(d0, "r+") as disk:  # the parent changed after the snapshot
        write_all(disk, 0, b"changed after the checkpoint")
    junk = root / "junk.vhdx"
    junk.write_bytes(pattern(12, MiB + 300_000))  # past the 1 MiB header section
    (root / "notes.txt").write_text("not a disk\n")
    return Folder(root, [a0, a1, a2], [b0, b1, b2, b3], [e0, e1], broken, mismatched, d0, junk)


def paths(nodes) -> set[str]:
    return {os.path.realpath(n.path if hasattr(n, "path") else n) for n in nodes}


def real(*items: Path) -> set[str]:
    return {os.path.realpath(p) for p in items}


def test_find_chains_reports_the_forest_exactly(folder: Folder) -> None:
    forest = vhdx.find_chains(folder.root)
    a, b, e = folder.a, folder.b, folder.e
    every_disk = a + b + e + [folder.broken, folder.mismatched, folder.mismatched_parent, folder.junk]
    assert paths(forest.nodes) == real(*every_disk)  # notes.txt is not looked at
    # a file that does not open is "unreadable", and so neither a base, a root nor a leaf
    assert paths(forest.unreadable) == real(folder.junk), \
        {p: (n.state, n.disk_type, n.error) for p, n in forest.nodes.items() if n.error}
    assert paths(forest.bases) == real(a[0], b[0], e[0], folder.mismatched_parent)
    assert paths(forest.branches) == real(b[1])
    assert paths(forest.broken) == real(folder.broken, folder.mismatched)
    assert paths(forest.leaves) == real(a[2], b[2], b[3], e[1], folder.broken, folder.mismatched)
    assert paths(forest.unreadable) == real(folder.junk)
    assert paths(forest.roots) == real(a[0], b[0], e[0], folder.mismatched_parent, folder.broken)

    node = {os.path.realpath(p): n for p, n in forest.nodes.items()}

    def at(p: Path) -> vhdx.Node:
        return node[os.path.realpath(p)]

    assert at(a[2]).state == "ok" and os.path.samefile(at(a[2]).parent, a[1])
    assert at(a[1]).state == "ok" and os.path.samefile(at(a[1]).parent, a[0])
    assert paths(at(b[1]).children) == real(b[2], b[3])
    assert at(b[2]).parent == at(b[3]).parent
    assert at(folder.broken).state == "missing" and at(folder.broken).parent is None
    assert at(folder.mismatched).state == "mismatch"
    assert os.path.samefile(at(folder.mismatched).parent, folder.mismatched_parent)
    assert at(folder.mismatched).parent_linkage != at(folder.mismatched_parent).data_write_guid
    assert at(folder.junk).state == "unreadable" and at(folder.junk).error
    assert at(a[0]).disk_type == "dynamic" and at(a[1]).disk_type == "differencing"
    assert at(a[0]).virtual_size == SIZE
    chain = forest.chain_of(next(p for p in forest.nodes if os.path.samefile(p, a[2])))
    assert [os.path.realpath(n.path) for n in chain] == [os.path.realpath(p) for p in reversed(a)]
    # the forest agrees with what vhdx.chain finds file by file
    for leaf, state in ((a[2], True), (b[3], True), (e[1], True), (folder.broken, False),
                        (folder.mismatched, False)):
        assert vhdx.chain(leaf).complete is state, leaf


def test_find_chains_recursive(folder: Folder) -> None:
    sub = folder.root / "Snapshots"
    sub.mkdir()
    # move VM E's checkpoint into a subfolder, with its parent reachable by the absolute path
    moved = sub / folder.e[1].name
    folder.e[1].rename(moved)
    flat = vhdx.find_chains(folder.root)
    assert not any(os.path.samefile(p, moved) for p in flat.nodes)
    deep = vhdx.find_chains(folder.root, recursive=True)
    node = next(n for p, n in deep.nodes.items() if os.path.samefile(p, moved))
    assert node.state == "ok" and os.path.samefile(node.parent, folder.e[0])


def expected_merge_commands(folder: Folder) -> list[str]:
    a, e = folder.a, folder.e
    return sorted([f"vhdx merge {shlex.quote(str(a[2]))} --into {shlex.quote(str(a[0]))}",
                   f"vhdx merge {shlex.quote(str(e[1]))}"])


def test_orphans_json_matches_the_api(folder: Folder) -> None:
    result = run_cli("orphans", folder.root, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    forest = vhdx.find_chains(folder.root)
    assert os.path.samefile(data["folder"], folder.root)
    for key, nodes in (("roots", forest.roots), ("leaves", forest.leaves), ("branches", forest.branches),
                       ("broken", forest.broken), ("unreadable", forest.unreadable)):
        assert paths(data[key]) == paths(nodes), key
    by_path = {os.path.realpath(n["path"]): n for n in data["nodes"]}
    assert set(by_path) == paths(forest.nodes)
    for p, n in forest.nodes.items():
        got = by_path[os.path.realpath(p)]
        assert got["state"] == n.state and got["disk_type"] == n.disk_type
        assert got["data_write_guid"] == n.data_write_guid and got["parent_linkage"] == n.parent_linkage
        assert paths(got["children"]) == paths(n.children)
        assert (got["parent"] is None) == (n.parent is None)
    assert sorted(data["merge_commands"]) == expected_merge_commands(folder)
    assert paths(data["unreadable"]) == real(folder.junk)


def test_orphans_human_output_shows_trees_and_merge_commands(folder: Folder) -> None:
    result = run_cli("orphans", folder.root)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    lines = out.splitlines()
    rel = folder.rel

    def line_of(path: Path) -> str:
        name = rel(path)
        found = [l for l in lines if l.lstrip(" └─").startswith(name + "  [") or l.lstrip(" └─") == name]
        assert len(found) == 1, f"{name!r} appears {len(found)} times in:\n{out}"
        return found[0]

    def depth(line: str) -> int:
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 4 == 0 and (indent == 0) != line.lstrip(" ").startswith("└── "), line
        return indent // 4

    # VM A: a straight line, each checkpoint one level deeper, directly after its parent
    a_lines = [line_of(p) for p in folder.a]
    assert [depth(l) for l in a_lines] == [0, 1, 2]
    assert lines.index(a_lines[1]) == lines.index(a_lines[0]) + 1
    assert lines.index(a_lines[2]) == lines.index(a_lines[1]) + 1
    assert "leaf" in a_lines[2] and "leaf" not in a_lines[0]
    # VM B: the branch is tagged, both children sit one level below it
    b_lines = [line_of(p) for p in folder.b]
    assert [depth(l) for l in b_lines] == [0, 1, 2, 2]
    assert "branch: 2 children" in b_lines[1]
    # broken links
    assert "PARENT MISSING" in line_of(folder.broken) and depth(line_of(folder.broken)) == 0
    mismatch = line_of(folder.mismatched)
    assert "ID MISMATCH" in mismatch and rel(folder.mismatched_parent) in mismatch
    assert depth(mismatch) == 1
    assert "[unreadable: " in line_of(folder.junk)  # with the reason it could not be read
    assert "notes.txt" not in out
    # the merge commands, one per complete unbranched chain, and none for B, C or D
    assert "to merge each complete chain into its base:" in out
    commands = sorted(l.strip() for l in lines if l.strip().startswith("vhdx merge "))
    assert commands == expected_merge_commands(folder)


def test_orphans_of_an_empty_folder(tmp_path: Path) -> None:
    result = run_cli("orphans", tmp_path)
    assert result.returncode == 0
    assert "no .vhdx or .avhdx files" in result.stdout
    data = json.loads(run_cli("orphans", tmp_path, "--json").stdout)
    assert data["nodes"] == [] and data["merge_commands"] == []
    missing = run_cli("orphans", tmp_path / "nowhere")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_checkpoint_names_follow_hyper_v(folder: Folder) -> None:
    pattern_ = re.compile(r"^(vma|vmb|vme)_[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\.avhdx$")
    for p in folder.a[1:] + folder.b[1:] + folder.e[1:]:
        assert pattern_.match(p.name), p.name
    assert len({p.name for p in folder.b}) == 4  # two snapshots of one disk get different names


def test_find_chains_and_chain_agree_about_every_parent(folder: Folder, tmp_path: Path) -> None:
    """One resolution algorithm: the parent the forest shows is the one ``vhdx.chain`` finds."""
    # vme.vhdx renamed: its checkpoint's locator names nothing, the DataWriteGuid scan finds it
    renamed = folder.e[0].with_name("vme-renamed.vhdx")
    folder.e[0].rename(renamed)
    # vmb's checkpoint moved out of the folder: its children's parent is outside ("external")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    moved = outside / folder.b[1].name
    folder.b[1].rename(moved)
    child_of_moved = folder.b[2]
    pairs = locator_of(child_of_moved)
    set_locator(child_of_moved, {**pairs, "relative_path": "..\\elsewhere\\" + moved.name,
                                 "absolute_win32_path": "Z:" + str(moved).replace("/", "\\")})

    forest = vhdx.find_chains(folder.root)
    node = {os.path.realpath(p): n for p, n in forest.nodes.items()}
    assert os.path.samefile(node[os.path.realpath(folder.e[1])].parent, renamed)
    ext = node[os.path.realpath(child_of_moved)]
    assert ext.state == "external" and ext.parent is None and os.path.samefile(ext.external_parent, moved)
    for path, n in forest.nodes.items():
        if n.state in ("base", "unreadable"):
            continue
        layers = vhdx.chain(path).layers
        assert layers[0].linkage == {"external": "ok"}.get(n.state, n.state), (path, n.state)
        if n.state in ("ok", "mismatch"):
            assert os.path.samefile(layers[1].path, n.parent), path
        elif n.state == "external":
            assert os.path.samefile(layers[1].path, n.external_parent), path
