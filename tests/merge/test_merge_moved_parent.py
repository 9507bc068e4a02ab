"""A parent that moved (issue 14, point 3).

* ``merge --into ANCESTOR``: the ancestor named, and its folder, are search places for the chain.
* A parent that is not found: the error says how to find it (``--search DIR``).
* Another disk at the parent's old path (another Virtual Disk ID, page 83): the parent is
  *missing*, not "modified"; the error says what was found where and why it is not the parent,
  and ``orphans``, ``chain`` and ``merge`` agree on "missing". The same disk whose DataWriteGuid
  changed stays a *mismatch*.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import ParentMismatchError, ParentNotFoundError

from support.merging import assert_same, check_errors, cli, merge, read_disk
from .test_merge_rails import SIZE, small_chain

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _moved(tmp_path: Path, children: int = 1):
    built = small_chain(tmp_path / "a", children=children)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    moved = elsewhere / "renamed-base.vhdx"
    shutil.move(built.base, moved)
    return built, moved


def test_merge_into_a_moved_ancestor_finds_it(tmp_path: Path) -> None:
    built, moved = _moved(tmp_path)
    result = merge(built.leaf, moved)
    assert Path(result.plan.destination).samefile(moved)
    assert_same(read_disk(moved), built.models[-1], "the moved base after merge --into")
    assert check_errors(moved) == []


def test_cli_merge_into_a_moved_ancestor_two_levels(tmp_path: Path) -> None:
    built, moved = _moved(tmp_path, children=2)
    rc, text = cli("merge", built.leaf, "--into", moved)
    assert rc == 0, text
    assert_same(read_disk(moved), built.models[-1], "the moved base after merging two levels")


def test_missing_parent_error_suggests_search(tmp_path: Path) -> None:
    built, _ = _moved(tmp_path)
    with pytest.raises(ParentNotFoundError) as info:
        merge(built.leaf)
    assert "--search DIR" in str(info.value)
    rc, text = cli("merge", built.leaf)
    assert rc != 0 and "--search DIR" in text and len(text.strip().splitlines()) == 1, text


def test_another_disk_at_the_old_path_is_missing_not_modified(tmp_path: Path) -> None:
    built, moved = _moved(tmp_path)
    impostor = vhdx.create(built.base, SIZE)        # a new disk where the parent was
    impostor_guid, impostor_id = str(impostor.data_write_guid), str(impostor.disk_id)
    impostor.close()
    expected = vhdx.chain(built.leaf).leaf.parent_linkage

    with pytest.raises(ParentNotFoundError) as info:
        merge(built.leaf)
    text = str(info.value)
    assert "modified" not in text, text
    assert "different disk" in text and str(Path(built.base).name) in text, text
    assert impostor_guid in text and impostor_id in text and expected in text, text
    assert "--search DIR" in text and "reparent" in text, text

    rc, out = cli("merge", built.leaf)
    assert rc != 0 and "modified" not in out and "different disk" in out, out
    assert vhdx.chain(built.leaf).leaf.linkage == "missing"
    node = vhdx.find_chains(tmp_path / "a").nodes[str(built.leaf)]
    assert node.state == "missing", node

    result = merge(built.leaf, search_paths=[str(moved.parent)])
    assert Path(result.plan.destination).samefile(moved)


def test_same_disk_modified_is_still_a_mismatch(tmp_path: Path) -> None:
    built = small_chain(tmp_path)
    with vhdx.open(built.base, "r+") as disk:
        disk.write(b"x" * 512)
    with pytest.raises(ParentMismatchError) as info:
        merge(built.leaf)
    assert "modified" in str(info.value)
    assert vhdx.chain(built.leaf).leaf.linkage == "mismatch"
    assert vhdx.find_chains(tmp_path).nodes[str(built.leaf)].state == "mismatch"
