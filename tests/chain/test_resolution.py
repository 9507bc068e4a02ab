"""Finding parents: relative paths, Windows-only paths, search folders, DataWriteGuid scans,
ID mismatches, missing parents, cycles, deep chains, explicit parents, read-only parents and
reparenting (docs/format.md §4.8, §4.9, §9.3, §9.4)."""

from __future__ import annotations

import hashlib
import ntpath
import os
import shutil
import uuid
from pathlib import Path

import pytest
from support.needs import unavailable

import vhdx

from .helpers import (MiB, ChainModel, assert_same, build_chain, data_write_guid, disk_bytes, locator_of,
                      pattern, read_all, set_locator, write_all)

SIZE = 3 * MiB + 512
ZERO_LINKAGE = "{00000000-0000-0000-0000-000000000000}"


def three_layers(folder: Path, **kwargs) -> ChainModel:
    """base.vhdx and two checkpoints (Hyper-V names), each layer written before its child exists."""
    kwargs.setdefault("size", SIZE)
    kwargs.setdefault("child_block_sizes", [None, None])
    return build_chain(folder, **kwargs)


def open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def file_state(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def resolve_relative(child: Path, relative: str) -> Path:
    parts = [p for p in relative.split("\\") if p not in ("", ".")]
    return Path(os.path.normpath(child.parent.joinpath(*parts)))


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    return os.path.samefile(a, b)


# ------------------------------------------------------------------------------------------------
# How a child records its parent
# ------------------------------------------------------------------------------------------------

def test_child_locator_is_written_like_hyper_v(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, first, leaf = cm.paths
    for child, parent in ((first, base), (leaf, first)):
        loc = locator_of(child)
        assert list(loc) == ["parent_linkage", "absolute_win32_path", "relative_path", "volume_path",
                             "parent_linkage2"]
        assert loc["parent_linkage"] == "{" + str(data_write_guid(parent)) + "}"  # lowercase, braces
        assert loc["parent_linkage2"] == ZERO_LINKAGE
        assert loc["relative_path"] == ".\\" + parent.name
        assert ntpath.basename(loc["absolute_win32_path"]) == parent.name
        assert loc["volume_path"].startswith("\\\\?\\Volume{") and loc["volume_path"].endswith("\\" + parent.name)
    # checkpoints of checkpoints keep the original disk's name
    assert first.name.startswith("base_") and leaf.name.startswith("base_")
    with vhdx.open(leaf) as disk:
        chain = disk.info()["chain"]
        assert [c["found_by"] for c in chain] == ["given", "relative_path", "relative_path"]
        assert [c["linkage"] for c in chain] == ["ok", "ok", "none"]
        assert disk.parent is not None and disk.parent.parent is not None and disk.parent.parent.parent is None
        assert disk.info()["data_write_guid"] == str(disk.data_write_guid)


def test_create_child_refuses_geometry_arguments(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    vhdx.create(base, SIZE, block_size=MiB).close()
    for kwargs in (dict(size=SIZE), dict(logical_sector_size=512), dict(physical_sector_size=4096),
                   dict(fixed=True)):
        with pytest.raises(vhdx.UsageError):
            vhdx.create(tmp_path / "child.avhdx", parent=base, **kwargs)
    with pytest.raises((OSError, vhdx.VhdxError)):
        vhdx.create(tmp_path / "orphan.avhdx", parent=tmp_path / "no-such-parent.vhdx")


def test_open_with_a_relative_leaf_path_resolves_against_the_childs_folder(tmp_path: Path, monkeypatch) -> None:
    cm = three_layers(tmp_path / "vm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with vhdx.open(os.path.join("..", "vm", cm.leaf.name)) as disk:
        assert_same(read_all(disk), bytes(cm.model), "leaf opened by a path relative to the cwd")


# ------------------------------------------------------------------------------------------------
# Moving, searching, scanning
# ------------------------------------------------------------------------------------------------

def test_moved_folder_still_opens_by_relative_path(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "old" / "vm")
    new = tmp_path / "new" / "moved vm"
    new.parent.mkdir()
    shutil.move(str(tmp_path / "old" / "vm"), str(new))
    shutil.rmtree(tmp_path / "old")
    leaf = new / cm.leaf.name
    with vhdx.open(leaf) as disk:
        assert_same(read_all(disk), bytes(cm.model), "leaf of the moved folder")
        chain = disk.info()["chain"]
    assert [c["found_by"] for c in chain[1:]] == ["relative_path", "relative_path"]
    assert [Path(c["path"]).parent for c in chain] == [new, new, new]
    described = vhdx.chain(leaf)
    assert described.complete and len(described.layers) == 3
    assert same_file(described.base.path, new / "base.vhdx")


def test_moved_folder_with_parent_one_level_up(tmp_path: Path) -> None:
    """A child in a subfolder records ``..\\base.vhdx``; moving the whole tree keeps it valid."""
    vm = tmp_path / "vm"
    (vm / "Snapshots").mkdir(parents=True)
    base = vm / "base.vhdx"
    with vhdx.create(base, SIZE, block_size=MiB) as disk:
        write_all(disk, 5, pattern(1, 70_000))
    child = vm / "Snapshots" / "child.avhdx"
    with vhdx.create(child, parent=base, block_size=MiB) as disk:
        write_all(disk, 600_001, pattern(2, 5000))
        want = read_all(disk)
    assert locator_of(child)["relative_path"] == "..\\base.vhdx"
    shutil.move(str(vm), str(tmp_path / "vm2"))
    with vhdx.open(tmp_path / "vm2" / "Snapshots" / "child.avhdx") as disk:
        assert disk.info()["chain"][1]["found_by"] == "relative_path"
        assert_same(read_all(disk), want, "child one folder below its parent, moved")


def test_child_moved_away_from_its_parent_finds_it_by_absolute_path(tmp_path: Path) -> None:
    cm = build_chain(tmp_path / "vm", size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    away = tmp_path / "somewhere else" / "deeper"
    away.mkdir(parents=True)
    moved = away / child.name
    shutil.move(str(child), str(moved))
    with vhdx.open(moved) as disk:
        layer = disk.info()["chain"][1]
        # the spec's order: relative_path (now wrong), then volume_path, then absolute_win32_path
        assert layer["found_by"] == "volume_path", layer
        assert same_file(layer["path"], base)
        assert_same(read_all(disk), bytes(cm.model), "child moved away from its parent")
    chain = vhdx.chain(moved)
    assert chain.complete and chain.leaf.tried[0] == f"relative_path: {away / base.name}"


def windows_locator(parent_guid: uuid.UUID, name: str) -> dict[str, str]:
    """A parent locator as Hyper-V writes it on a Windows host: nothing resolves here."""
    folder = "C:\\Users\\Public\\Documents\\Hyper-V\\Virtual hard disks"
    return {
        "parent_linkage": "{" + str(parent_guid) + "}",
        "absolute_win32_path": folder + "\\" + name,
        "relative_path": ".\\Other folder\\" + name,
        "volume_path": "\\\\?\\Volume{0eba351e-5634-46d6-a8cf-4ddc2d6ac0b9}\\Users\\Public\\Documents\\Hyper-V"
                       "\\Virtual hard disks\\" + name,
        "parent_linkage2": ZERO_LINKAGE,
    }


@pytest.fixture
def windows_child(tmp_path: Path) -> tuple[ChainModel, Path, Path]:
    """A base and a child whose locator holds only Windows paths; the base moved to ``store``."""
    cm = build_chain(tmp_path / "host", size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    set_locator(child, windows_locator(data_write_guid(base), base.name))
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(str(base), str(store / base.name))
    return cm, child, store


def test_windows_only_paths_report_every_path_tried(windows_child) -> None:
    cm, child, store = windows_child
    with pytest.raises(vhdx.ParentNotFoundError) as caught:
        vhdx.open(child)
    error = caught.value
    assert isinstance(error, FileNotFoundError) and isinstance(error, vhdx.ChainError)
    tried = "\n".join(error.tried)
    assert str(child.parent / "Other folder" / "base.vhdx") in tried  # relative_path, mapped here
    assert str(child.parent / "base.vhdx") in tried  # the file name beside the child
    assert f"DataWriteGuid scan of {child.parent}" in tried
    assert str(store) not in tried  # not searched unless asked
    assert str(data_write_guid(store / "base.vhdx")) in str(error)
    # chain() describes the same thing without raising
    described = vhdx.chain(child)
    assert not described.complete
    assert described.leaf.linkage == "missing" and described.leaf.tried


def test_windows_only_paths_found_by_file_name_in_a_search_path(windows_child) -> None:
    cm, child, store = windows_child
    before = file_state(child)
    with vhdx.open(child, search_paths=[store]) as disk:
        layer = disk.info()["chain"][1]
        assert same_file(layer["path"], store / "base.vhdx")
        assert "file name" in layer["found_by"] and str(store) in layer["found_by"], layer["found_by"]
        assert_same(read_all(disk), bytes(cm.model), "child over a parent found by name")
    # a reader must not rewrite the stale locator (docs/format.md §9.3, step 6)
    assert file_state(child) == before
    described = vhdx.chain(child, search_paths=[store])
    assert described.complete and "file name" in described.base.found_by


def test_windows_path_file_name_matches_ignoring_case(windows_child) -> None:
    cm, child, store = windows_child
    (store / "base.vhdx").rename(store / "BASE.VHDX")
    with vhdx.open(child, search_paths=[store]) as disk:
        layer = disk.info()["chain"][1]
        assert "file name" in layer["found_by"], layer["found_by"]
        assert Path(layer["path"]).name == "BASE.VHDX"
        assert_same(read_all(disk), bytes(cm.model), "parent found by a case-insensitive name")


def test_parent_renamed_in_a_search_folder_is_found_by_guid_scan(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    search = tmp_path / "library"
    search.mkdir()
    middle = cm.paths[1]
    renamed = search / "not its old name.avhdx"
    shutil.move(str(middle), str(renamed))
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(cm.leaf)
    with vhdx.open(cm.leaf, search_paths=[search]) as disk:
        chain = disk.info()["chain"]
        assert same_file(chain[1]["path"], renamed)
        assert chain[1]["found_by"] == f"DataWriteGuid scan of {search}"
        # the middle's relative path now points into the search folder, where the base is not;
        # its absolute paths (volume or Win32, mapped to this machine) still lead to the base
        assert same_file(chain[2]["path"], cm.paths[0])
        assert chain[2]["found_by"] in ("volume_path", "absolute_win32_path"), chain[2]["found_by"]
        assert_same(read_all(disk), bytes(cm.model), "leaf over a parent found by scan")


def test_parent_renamed_beside_the_child_is_found_without_search_paths(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    renamed = cm.paths[0].with_name("renamed base.vhdx")
    cm.paths[0].rename(renamed)
    with vhdx.open(cm.leaf) as disk:
        chain = disk.info()["chain"]
        assert same_file(chain[2]["path"], renamed)
        assert chain[2]["found_by"].startswith("DataWriteGuid scan of")
        assert_same(read_all(disk), bytes(cm.model), "base renamed in place")


# ------------------------------------------------------------------------------------------------
# Wrong and missing parents
# ------------------------------------------------------------------------------------------------

def test_replaced_parent_is_another_disk_hence_missing(tmp_path: Path) -> None:
    """Another disk (another Virtual Disk ID) where the parent was is not the parent "modified": the
    parent is missing, and the error says what was found there (issue 14). Named as the parent, it
    may still be accepted with ignore_id_mismatch."""
    cm = build_chain(tmp_path / "vm", size=SIZE, child_block_sizes=[2 * MiB], use_snapshot=False)
    base, child = cm.paths
    original = data_write_guid(base)
    base.unlink()
    with vhdx.create(base, SIZE, block_size=MiB) as impostor:  # same name, same geometry
        write_all(impostor, 0, pattern(99, SIZE))
        impostor_bytes = read_all(impostor)
    impostor_guid = data_write_guid(base)
    with pytest.raises(vhdx.ParentNotFoundError) as caught:
        vhdx.open(child)
    error = str(caught.value)
    assert str(original) in error and str(impostor_guid) in error and "a different disk" in error, error
    assert "modified" not in error, error
    # lenient description: the link is reported, not raised
    described = vhdx.chain(child)
    assert described.leaf.linkage == "missing" and not described.complete
    assert described.leaf.parent_linkage == str(original)
    assert vhdx.chain(child, ignore_id_mismatch=True).leaf.linkage == "missing"
    # named as the parent, the caller may accept it (Set-VHD -IgnoreIdMismatch for reading)
    with pytest.raises(vhdx.ParentMismatchError) as named:
        vhdx.open(child, parents=[base])
    assert "a different disk" in str(named.value) and "modified" not in str(named.value)
    with vhdx.open(child, parents=[base], ignore_id_mismatch=True) as disk:
        chain = disk.info()["chain"]
        assert chain[0]["linkage"] == "mismatch"
        assert chain[1]["data_write_guid"] == str(impostor_guid)
        assert_same(read_all(disk), cm.own_over(1, impostor_bytes), "child over the impostor")


def test_writing_to_a_parent_orphans_its_children_but_opening_it_does_not(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    with vhdx.open(middle, "r+"):
        pass  # opened for writing, nothing written: the DataWriteGuid must not move
    assert data_write_guid(middle) == uuid.UUID(locator_of(leaf)["parent_linkage"])
    assert_same(disk_bytes(leaf), bytes(cm.model), "leaf after its parent was opened r+ and closed")
    before = data_write_guid(middle)
    with vhdx.open(middle, "r+") as disk:
        write_all(disk, 4096, b"changed")
    assert data_write_guid(middle) != before
    with pytest.raises(vhdx.ParentMismatchError) as caught:
        vhdx.open(leaf)
    assert caught.value.expected == before and caught.value.found == data_write_guid(middle)
    # the base below is untouched: the middle layer itself still opens
    with vhdx.open(middle) as disk:
        assert disk.info()["chain"][0]["linkage"] == "ok"


def test_missing_parent_lists_every_path_tried(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    middle.unlink()
    with pytest.raises(vhdx.ParentNotFoundError) as caught:
        vhdx.open(leaf)
    error = caught.value
    assert error.tried and all(isinstance(t, str) for t in error.tried)
    assert any(t == f"relative_path: {middle}" for t in error.tried), error.tried
    assert any(t.startswith("DataWriteGuid scan of") for t in error.tried)
    assert str(leaf) in str(error)
    linkage = locator_of(leaf)["parent_linkage"].strip("{}")
    assert linkage in str(error)
    with vhdx.open(leaf, missing_parent="zeros") as disk:
        assert disk.info()["chain"][0]["linkage"] == "missing"
        assert_same(read_all(disk), cm.own_over(2), "leaf over zeros")
    described = vhdx.chain(leaf)
    assert not described.complete and len(described.layers) == 1
    assert described.leaf.linkage == "missing" and described.leaf.tried == error.tried


def test_missing_base_below_a_found_parent_reads_zeros_only_at_the_bottom(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    base.unlink()
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(leaf)
    with vhdx.open(leaf, missing_parent="zeros") as disk:
        chain = disk.info()["chain"]
        assert [c["linkage"] for c in chain] == ["ok", "missing"]
        want = cm.own_over(2, cm.own_over(1))
        assert_same(read_all(disk), want, "leaf over middle over zeros")
    with pytest.raises(vhdx.UsageError):
        vhdx.open(leaf, missing_parent="maybe")


# ------------------------------------------------------------------------------------------------
# Cycles and depth
# ------------------------------------------------------------------------------------------------

def test_two_children_pointing_at_each_other_are_a_cycle(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    with vhdx.create(base, SIZE, block_size=MiB) as disk:
        write_all(disk, 0, pattern(1, 10_000))
    a, b = tmp_path / "a.avhdx", tmp_path / "b.avhdx"
    for child, seed in ((a, 2), (b, 3)):
        with vhdx.create(child, parent=base, block_size=MiB) as disk:
            write_all(disk, 512, pattern(seed, 2048))
    assert vhdx.reparent(a, b, ignore_id_mismatch=True)["linkage_changed"]
    assert vhdx.reparent(b, a, ignore_id_mismatch=True)["linkage_changed"]
    for start in (a, b):
        with pytest.raises(vhdx.ChainCycleError):
            vhdx.open(start)
        with pytest.raises(vhdx.ChainCycleError):
            vhdx.open(start, ignore_id_mismatch=True, missing_parent="zeros", search_paths=[tmp_path])
    described = vhdx.chain(a)  # describing a cycle must not raise or loop
    assert not described.complete
    assert len(described.layers) <= 3
    assert described.layers[-1].linkage == "cycle", [(l.path, l.linkage) for l in described.layers]


def test_a_disk_cannot_be_its_own_parent(tmp_path: Path) -> None:
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    with pytest.raises(vhdx.ChainCycleError):
        vhdx.reparent(cm.leaf, cm.leaf, ignore_id_mismatch=True)
    assert_same(disk_bytes(cm.leaf), bytes(cm.model), "child after a refused self-reparent")


def test_a_64_deep_chain_opens_and_reads_right(tmp_path: Path) -> None:
    """63 children over a base. Creating child k the usual way opens the k layers below it, so the
    chain is built in linear time instead: every child is made over the base and written
    (whole sectors, so nothing is read from a parent), then re-linked onto the previous child
    with ``reparent(..., ignore_id_mismatch=True)``, which leaves each child's own identity alone."""
    size = 2 * MiB + 512
    model = bytearray(size)
    base = tmp_path / "d00.vhdx"
    with vhdx.create(base, size, block_size=MiB) as disk:
        data = pattern(0, size)
        write_all(disk, 0, data)
        model[:] = data
    children = []
    for depth in range(1, 64):
        child = tmp_path / f"d{depth:02}.avhdx"
        with vhdx.create(child, parent=base, block_size=MiB if depth % 2 else 2 * MiB) as disk:
            # each layer overwrites a different slice, some across the block boundary
            offset = (depth * 33_331) % (size - 5000) // 512 * 512
            data = pattern(depth, 512 * (1 + depth % 9))
            write_all(disk, offset, data)
            model[offset:offset + len(data)] = data
        children.append(child)
    for lower, upper in zip([base] + children, children):
        if lower != base:
            assert vhdx.reparent(upper, lower, ignore_id_mismatch=True)["linkage_changed"]
    parent = children[-1]
    fds_before = open_fds()
    with vhdx.open(parent) as disk:
        assert len(disk.info()["chain"]) == 64
        assert_same(read_all(disk), bytes(model), "64-layer leaf")
    if fds_before is not None:
        assert open_fds() == fds_before, "closing the leaf left parents open"
    described = vhdx.chain(parent)
    assert described.complete and len(described) == 64


# ------------------------------------------------------------------------------------------------
# Explicit parents, read-only parents
# ------------------------------------------------------------------------------------------------

def test_explicit_parents(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    p1, p2 = hidden / "first.img", hidden / "second.img"  # names nothing would guess, and not .vhdx
    shutil.move(str(middle), str(p1))
    shutil.move(str(base), str(p2))
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(leaf, search_paths=[hidden])
    with vhdx.open(leaf, parents=[p1, p2]) as disk:
        chain = disk.info()["chain"]
        assert [c["found_by"] for c in chain[1:]] == ["given", "given"]
        assert same_file(chain[1]["path"], p1) and same_file(chain[2]["path"], p2)
        assert_same(read_all(disk), bytes(cm.model), "leaf over explicit parents")
    assert vhdx.chain(leaf, parents=[p1, p2]).complete
    # only the first given: the rest is looked up from p1's locator, which points at the old place
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(leaf, parents=[p1])
    with pytest.raises(vhdx.ParentNotFoundError) as caught:
        vhdx.open(leaf, parents=[hidden / "nope.vhdx"])
    assert any("nope.vhdx" in t for t in caught.value.tried)
    # a given parent with the wrong identity is a mismatch, acceptable only on request
    with pytest.raises(vhdx.ParentMismatchError):
        vhdx.open(leaf, parents=[p2])
    with vhdx.open(leaf, parents=[p2], ignore_id_mismatch=True) as disk:
        assert disk.info()["chain"][0]["linkage"] == "mismatch"
        assert_same(read_all(disk), cm.own_over(2, cm.layer_bytes(0)), "leaf given the base as parent")


def test_parents_stay_read_only_when_the_child_is_opened_for_writing(tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    before = {p: file_state(p) for p in (base, middle)}
    with vhdx.open(leaf, "r+") as disk:
        assert disk.writable()
        assert disk.parent is not None and not disk.parent.writable()
        assert disk.parent.parent is not None and not disk.parent.parent.writable()
        with pytest.raises(vhdx.ReadOnlyError):
            disk.parent.write(b"no")
        with pytest.raises(vhdx.ReadOnlyError):
            disk.parent.parent.write(b"no")
        for offset, length, seed in ((0, 1, 1), (511, 2, 2), (MiB - 100, 300, 3), (SIZE - 700, 700, 4),
                                     (MiB, MiB, 5)):
            cm.write(disk, offset, pattern(seed, length))
        disk.flush()
    assert {p: file_state(p) for p in (base, middle)} == before
    assert_same(disk_bytes(leaf), bytes(cm.model), "leaf after writing through r+")
    assert_same(disk_bytes(middle), cm.layer_bytes(1), "middle layer after its child was written")


# ------------------------------------------------------------------------------------------------
# Reparenting
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["subfolder", "sibling folder"])
def test_reparent_after_moving_the_parent(where: str, tmp_path: Path) -> None:
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    new_home = tmp_path / "vm" / "parents" if where == "subfolder" else tmp_path / "other"
    new_home.mkdir()
    moved = new_home / "the base.vhdx"
    shutil.move(str(base), str(moved))
    guid_before = data_write_guid(middle)
    linkage_before = locator_of(middle)["parent_linkage"]
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.open(leaf)
    result = vhdx.reparent(middle, moved)
    assert result["linkage_changed"] is False
    loc = locator_of(middle)
    assert loc["parent_linkage"] == linkage_before
    assert resolve_relative(middle, loc["relative_path"]) == moved
    assert loc["relative_path"] == (".\\parents\\the base.vhdx" if where == "subfolder"
                                    else "..\\other\\the base.vhdx")
    assert ntpath.basename(loc["absolute_win32_path"]) == "the base.vhdx"
    # reparenting touches only the locator: the middle's own identity stays, so the leaf still links
    assert data_write_guid(middle) == guid_before
    with vhdx.open(leaf) as disk:
        chain = disk.info()["chain"]
        assert [c["linkage"] for c in chain] == ["ok", "ok", "none"]
        assert chain[2]["found_by"] == "relative_path" and same_file(chain[2]["path"], moved)
        assert_same(read_all(disk), bytes(cm.model), "leaf after reparenting the middle layer")
    assert_same(disk_bytes(middle), cm.layer_bytes(1), "middle after reparent")


def test_reparent_to_a_different_disk_needs_ignore_id_mismatch(tmp_path: Path) -> None:
    cm = build_chain(tmp_path / "vm", size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    other = tmp_path / "vm" / "other.vhdx"
    with vhdx.create(other, SIZE, block_size=2 * MiB) as disk:
        write_all(disk, 0, pattern(42, SIZE))
        other_bytes = read_all(disk)
    locator_before = locator_of(child)
    child_guid = data_write_guid(child)
    with pytest.raises(vhdx.ParentMismatchError) as caught:
        vhdx.reparent(child, other)
    assert caught.value.expected == data_write_guid(base) and caught.value.found == data_write_guid(other)
    assert locator_of(child) == locator_before
    assert data_write_guid(child) == child_guid
    assert_same(disk_bytes(child), bytes(cm.model), "child after a refused reparent")

    result = vhdx.reparent(child, other, ignore_id_mismatch=True)
    assert result["linkage_changed"] is True
    loc = locator_of(child)
    assert loc["parent_linkage"] == "{" + str(data_write_guid(other)) + "}"
    assert loc["relative_path"] == ".\\other.vhdx"
    assert data_write_guid(child) == child_guid
    with vhdx.open(child) as disk:
        chain = disk.info()["chain"]
        assert chain[0]["linkage"] == "ok" and same_file(chain[1]["path"], other)
        assert_same(read_all(disk), cm.own_over(1, other_bytes), "child over its new parent")
    assert vhdx.chain(child).complete
    # and back: the original base no longer matches the rewritten linkage
    with pytest.raises(vhdx.ParentMismatchError):
        vhdx.reparent(child, base)


def test_reparent_refuses_other_geometry_and_non_children(tmp_path: Path) -> None:
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    bigger = tmp_path / "bigger.vhdx"
    vhdx.create(bigger, SIZE + 512, block_size=MiB).close()
    four_k = tmp_path / "4k.vhdx"
    vhdx.create(four_k, SIZE - SIZE % 4096 + 4096, block_size=MiB, logical_sector_size=4096).close()
    four_k_same_size = tmp_path / "4k-same.vhdx"
    vhdx.create(four_k_same_size, 3 * MiB + 4096, block_size=MiB, logical_sector_size=4096).close()
    locator_before = locator_of(child)
    for target in (bigger, four_k, four_k_same_size):
        with pytest.raises(vhdx.ChainError) as caught:
            vhdx.reparent(child, target, ignore_id_mismatch=True)
        assert not isinstance(caught.value, vhdx.ParentMismatchError)
    with pytest.raises(vhdx.ChainError):
        vhdx.reparent(base, child, ignore_id_mismatch=True)  # the base is no differencing disk
    assert locator_of(child) == locator_before
    assert_same(disk_bytes(child), bytes(cm.model), "child after refused reparents")


def test_failed_opens_leave_no_file_open(tmp_path: Path) -> None:
    """Every way an open can fail part-way up a chain closes what it had opened."""
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    if open_fds() is None:
        unavailable("no /proc/self/fd to count open files")
    # mismatch two levels down: the leaf and the middle were open when the base was refused
    with vhdx.open(base, "r+") as disk:
        write_all(disk, 0, b"orphan the middle layer")
    other = tmp_path / "other.vhdx"
    vhdx.create(other, SIZE, block_size=MiB).close()
    before = open_fds()
    leaf_state = file_state(leaf)
    for _ in range(3):
        with pytest.raises(vhdx.ParentMismatchError):
            vhdx.open(leaf, "r+")
        with pytest.raises(vhdx.ParentMismatchError):
            vhdx.open(leaf, parents=[middle, other])
        assert not vhdx.chain(leaf).complete
        shutil.move(str(base), str(tmp_path / "gone.bin"))
        with pytest.raises(vhdx.ParentNotFoundError):
            vhdx.open(leaf)
        with vhdx.open(leaf, missing_parent="zeros") as disk:
            disk.read(4096)
        shutil.move(str(tmp_path / "gone.bin"), str(base))
    assert open_fds() == before
    assert file_state(leaf) == leaf_state, "a refused r+ open changed the leaf file"


def test_writing_over_a_missing_parent_does_not_copy_up_zeros(tmp_path: Path) -> None:
    """A child opened "r+" with missing_parent="zeros" must not turn the parent's bytes into zeros.

    An unaligned write reads the rest of its edge sectors through the chain and writes them into
    the child. Over a stand-in of zeros that stores zeros in the child, which then hide the real
    parent's bytes for good once it is found again. The library may refuse the open, refuse the
    unaligned write, or keep the parent's bytes; it must not lose them silently.
    """
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[MiB], use_snapshot=False,
                     writes=[[(0, pattern(1, SIZE))], []])
    base, child = cm.paths
    hidden = tmp_path / "hidden.bin"
    shutil.move(str(base), str(hidden))
    try:
        disk = vhdx.open(child, "r+", missing_parent="zeros")
    except vhdx.VhdxError:
        return  # refusing to write over a missing parent is fine
    with disk:
        try:
            write_all(disk, 100, b"X" * 10)
        except vhdx.VhdxError:
            return  # refusing the unaligned write is fine too
    shutil.move(str(hidden), str(base))
    want = bytearray(cm.layer_bytes(0))
    want[100:110] = b"X" * 10
    got = disk_bytes(child)
    assert_same(got[:512], bytes(want[:512]), "first sector after an unaligned write over a missing parent")


def test_a_failed_snapshot_leaves_no_file_behind(tmp_path: Path) -> None:
    """Snapshotting (or creating a child of) a checkpoint whose own parent is missing fails, and
    must not leave a half-made child in the folder: it would show up as one more broken disk."""
    cm = three_layers(tmp_path / "vm")
    base, middle, leaf = cm.paths
    shutil.move(str(base), str(tmp_path / "away.bin"))
    before = sorted(os.listdir(leaf.parent))
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.snapshot(leaf)
    with pytest.raises(vhdx.ParentNotFoundError):
        vhdx.create(leaf.parent / "child.avhdx", parent=leaf)
    assert sorted(os.listdir(leaf.parent)) == before
