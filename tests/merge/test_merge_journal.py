"""A merge journal can only name its own chain.

The journal is JSON in a user metadata item of the destination, so it is as untrusted as any
other byte of the file. Each test plants a journal (state "copied", as if a merge had copied its
data and stopped before the cleanup) through the library, naming files that are not the merged
chain: a non-VHDX file, a VHDX of no chain, a file outside the folder, a symbolic link, a record
whose DataWriteGuid is "None". In every case nothing is deleted or changed, ``merge`` refuses
with one clear line, and ``vhdx check`` reports the journal as an error.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import vhdx
from vhdx.errors import MergeError
from vhdx.format import constants as C
from vhdx.format.records import MetadataItem, metadata_items
from vhdx.file.image import Image

from support.merging import MiB, cli, data_write_guid, merge, sha256_file

JOURNAL_GUID = vhdx.ops.merge.journal.MERGE_JOURNAL_GUID


def one_level(folder: Path) -> tuple[str, str]:
    """base.vhdx <- base_GUID.avhdx, 4 MiB, with data in both."""
    folder.mkdir(parents=True, exist_ok=True)
    base = str(folder / "base.vhdx")
    with vhdx.create(base, 4 * MiB, block_size=MiB) as d:
        d.write(b"A" * MiB)
    leaf = vhdx.snapshot(base)
    with vhdx.open(leaf, "r+") as d:
        d.seek(MiB)
        d.write(b"C" * 8192)
    return base, leaf


def record(path: str, dest: str, guid: str | None = None) -> dict:
    folder = os.path.dirname(os.path.abspath(dest))
    return dict(path=os.path.abspath(path), relative=os.path.relpath(path, folder),
                data_write_guid=guid if guid is not None else data_write_guid(path))


def plant(dest: str, sources: list[dict], *, state: str = "copied", child: str = "",
          override: dict | None = None, **extra) -> None:
    """Write a crafted journal into ``dest`` through the library (its DataWriteGuid stays)."""
    image = Image.open(dest, "r+")
    try:
        guid = str(image.header.data_write_guid)
        body = dict(tool="vhdx", state=state, sources=sources, child=child or sources[0]["path"],
                    new_data_write_guid=guid, original_data_write_guid="0f0e0d0c-0b0a-4908-8706-050403020100",
                    started=int(time.time()))
        body.update(extra)
        body.update(override or {})
        items = [it for it in metadata_items(image.metadata) if it.item_id != JOURNAL_GUID]
        items.append(MetadataItem(JOURNAL_GUID, json.dumps(body).encode(), C.METADATA_IS_USER))
        image.write_metadata_items(items, data_change=False)
    finally:
        image.close()


def snapshot_tree(*folders: Path) -> dict[str, tuple[str, str]]:
    """Every entry (symlinks included, not followed) -> (kind, content hash or link target)."""
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", sha256_file(p))
    return out


def assert_refused_and_reported(base: str, leaf: str, before: dict, folders: list[Path], what: str) -> None:
    with pytest.raises(MergeError) as info:
        merge(leaf)
    message = str(info.value)
    print(f"{what}: {message}")
    assert "\n" not in message and "journal" in message and "nothing was deleted" in message, message
    assert snapshot_tree(*folders) == before, f"{what}: a file changed or went away"
    rc, text = cli("merge", leaf)
    assert rc != 0 and len(text.strip().splitlines()) == 1 and "journal" in text, text
    assert "Traceback" not in text
    assert snapshot_tree(*folders) == before, f"{what}: the CLI changed a file"
    rc, text = cli("check", base)
    assert rc != 0 and "error" in text and "journal" in text, text
    assert snapshot_tree(*folders) == before


# ------------------------------------------------------------------ planted journals

@pytest.mark.parametrize("name, guid", [("victim.vhdx", "None"), ("report.txt", "None"),
                                        ("victim.vhdx", "0f0e0d0c-0b0a-4908-8706-0504030201ff")])
def test_a_journal_naming_a_non_vhdx_file_deletes_nothing(name: str, guid: str, tmp_path: Path) -> None:
    base, leaf = one_level(tmp_path)
    victim = tmp_path / name
    victim.write_bytes(b"not a disk, but precious\n" * 100)
    # "None" is what str(read_data_write_guid(...)) gave for any file that is not a VHDX.
    plant(base, [record(leaf, base), record(str(victim), base, guid=guid)])
    before = snapshot_tree(tmp_path)
    assert_refused_and_reported(base, leaf, before, [tmp_path], f"non-VHDX {name}")


@pytest.mark.parametrize("order", ["victim-last", "victim-first"])
def test_a_journal_naming_a_vhdx_outside_the_chain_deletes_nothing(order: str, tmp_path: Path) -> None:
    base, leaf = one_level(tmp_path)
    other = str(tmp_path / "other.vhdx")
    with vhdx.create(other, 2 * MiB, block_size=MiB) as d:
        d.write(b"O" * 4096)
    other_child = vhdx.snapshot(other)  # a differencing disk of another chain
    records = [record(leaf, base), record(other, base), record(other_child, base)]
    if order == "victim-first":
        records = [records[2], records[0]]
    plant(base, records)
    before = snapshot_tree(tmp_path)
    assert_refused_and_reported(base, leaf, before, [tmp_path], f"VHDX outside the chain ({order})")


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_journal_naming_a_file_outside_the_folder_deletes_nothing(how: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    base, leaf = one_level(work)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    far = str(elsewhere / "far.vhdx")
    with vhdx.create(far, 2 * MiB, block_size=MiB) as d:
        d.write(b"F" * 4096)
    rec = record(far, base)
    if how == "absolute":
        rec["relative"] = "gone.avhdx"
    else:
        rec["path"] = str(work / "gone.avhdx")
        assert rec["relative"].startswith("..")
    plant(base, [record(leaf, base), rec])
    before = snapshot_tree(work, elsewhere)
    assert_refused_and_reported(base, leaf, before, [work, elsewhere], f"outside the folder ({how})")


@pytest.mark.parametrize("target", ["chain", "unrelated"])
def test_a_journal_naming_a_symlink_deletes_nothing(target: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    base, leaf = one_level(work)
    link = work / "link.avhdx"
    if target == "chain":
        os.symlink(os.path.basename(leaf), link)
        records = [record(str(link), base, guid=data_write_guid(leaf))]
    else:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        far = str(elsewhere / "far.vhdx")
        with vhdx.create(far, 2 * MiB, block_size=MiB) as d:
            d.write(b"F" * 4096)
        os.symlink(far, link)
        records = [record(leaf, base), record(str(link), base, guid=data_write_guid(far))]
    plant(base, records)
    folders = [work] + ([tmp_path / "elsewhere"] if target == "unrelated" else [])
    before = snapshot_tree(*folders)
    assert_refused_and_reported(base, leaf, before, folders, f"symlink to a {target} file")


@pytest.mark.parametrize("body", [
    dict(sources="leaf.avhdx"),
    dict(sources=[]),
    dict(state="deleting"),
    dict(new_data_write_guid="None"),
    dict(sources=[dict(path="/x.avhdx", relative="x.avhdx", data_write_guid="not-a-guid")]),
    dict(sources=[dict(path="/x.avhdx", relative="/etc/x.avhdx",
                       data_write_guid="0f0e0d0c-0b0a-4908-8706-050403020101")]),
    dict(sources=[dict(path="/x.avhdx", relative="x.avhdx",
                       data_write_guid="0f0e0d0c-0b0a-4908-8706-050403020101")] * 1025),
])
def test_a_malformed_journal_is_refused_and_reported(body: dict, tmp_path: Path) -> None:
    base, leaf = one_level(tmp_path)
    plant(base, [record(leaf, base)], override=body)
    before = snapshot_tree(tmp_path)
    with pytest.raises(MergeError) as info:
        merge(leaf, base)
    print(f"{sorted(body)}: {info.value}")
    assert "journal" in str(info.value) and "\n" not in str(info.value)
    assert snapshot_tree(tmp_path) == before
    rc, text = cli("check", base)
    assert rc != 0 and "journal" in text, text


def test_a_deeply_nested_journal_is_refused(tmp_path: Path) -> None:
    base, leaf = one_level(tmp_path)
    image = Image.open(base, "r+")
    try:
        items = [it for it in metadata_items(image.metadata) if it.item_id != JOURNAL_GUID]
        items.append(MetadataItem(JOURNAL_GUID, b"[" * 100_000 + b"]" * 100_000, C.METADATA_IS_USER))
        image.write_metadata_items(items, data_change=False)
    finally:
        image.close()
    before = snapshot_tree(tmp_path)
    with pytest.raises(MergeError, match="journal"):
        merge(leaf, base)
    assert snapshot_tree(tmp_path) == before
    rc, text = cli("check", base)
    assert rc != 0 and "journal" in text, text
