"""The chain verbs through ``python -m vhdx``: snapshot, create --parent, chain, reparent, and the
chain options (--search, --parent, --ignore-id-mismatch, --missing-parent) of info, check, export.

Every failure must be one line on stderr starting ``vhdx: error:``, without a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

import vhdx

from .helpers import (MiB, ChainModel, assert_one_line_error, assert_same, build_chain, data_write_guid,
                      locator_of, pattern, run_cli, write_all)

SIZE = 3 * MiB + 1024
CHECKPOINT = re.compile(r"^base_[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\.avhdx$")


def ok(*args) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, f"vhdx {' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def ok_json(*args) -> dict:
    return json.loads(ok(*args, "--json"))


def real(path: str | Path) -> str:
    return os.path.realpath(path)


def test_snapshot_create_and_chain(tmp_path: Path) -> None:
    base = tmp_path / "base.vhdx"
    made = ok_json("create", base, "3M", "--block-size", "1M")
    assert made["type"] == "dynamic" and made["size"] == 3 * MiB and made["block_size"] == MiB
    model = bytearray(3 * MiB)
    with vhdx.open(base, "r+") as disk:  # written before it gets a child
        data = pattern(1, 100_000)
        write_all(disk, 777, data)
        model[777:777 + len(data)] = data

    snap = ok_json("snapshot", base)
    first = Path(snap["checkpoint"])
    assert first.is_file() and first.parent == tmp_path and CHECKPOINT.match(first.name), first
    assert locator_of(first)["parent_linkage"] == "{" + str(data_write_guid(base)) + "}"

    out = ok("snapshot", first)  # a checkpoint of a checkpoint keeps the original disk's name
    created = re.search(r"created checkpoint (.+\.avhdx)", out)
    assert created, out
    second = Path(created.group(1).strip())
    assert second.is_file() and CHECKPOINT.match(second.name) and second != first

    child = tmp_path / "child.avhdx"
    info = ok_json("create", child, "--parent", second)
    assert info["type"] == "differencing" and info["size"] == 3 * MiB
    assert info["logical_sector_size"] == 512 and info["block_size"] == 2 * MiB
    assert info["data_write_guid"] == str(data_write_guid(child))
    other = tmp_path / "other.avhdx"
    assert ok_json("create", other, "--parent", second, "--block-size", "1M")["block_size"] == MiB
    with vhdx.open(child, "r+") as disk:
        data = pattern(2, 5000)
        write_all(disk, 2 * MiB - 2500, data)
        model[2 * MiB - 2500:2 * MiB + 2500] = data

    chain = ok_json("chain", child)
    assert chain["complete"] is True
    assert [real(l["path"]) for l in chain["layers"]] == [real(p) for p in (child, second, first, base)]
    assert [l["linkage"] for l in chain["layers"]] == ["ok", "ok", "ok", "none"]
    assert [l["found_by"] for l in chain["layers"]] == ["given", "relative_path", "relative_path",
                                                       "relative_path"]
    assert [l["disk_type"] for l in chain["layers"]] == ["differencing"] * 3 + ["dynamic"]
    for upper, lower in zip(chain["layers"], chain["layers"][1:]):
        assert upper["parent_linkage"] == lower["data_write_guid"]

    human = ok("chain", child)
    assert human.strip().splitlines()[-1] == "chain complete"
    for p in (child, second, first, base):
        assert str(p) in human
    assert human.count("found by relative_path") == 3

    info = ok_json("info", child)
    assert [real(l["path"]) for l in info["chain"]] == [real(p) for p in (child, second, first, base)]
    out_file = tmp_path / "out.raw"
    ok("export", child, out_file)
    assert_same(out_file.read_bytes(), bytes(model), "vhdx export of the leaf")
    # --layer 3 is the base as it was snapshotted
    base_out = tmp_path / "base.raw"
    ok("export", child, base_out, "--layer", "3")
    assert_same(base_out.read_bytes()[:3 * MiB], bytes(model[:777]) + pattern(1, 100_000) +
                bytes(3 * MiB - 777 - 100_000), "export --layer 3")


@pytest.fixture
def moved_chain(tmp_path: Path) -> tuple[ChainModel, Path]:
    """A base and two checkpoints; the base moved into ``store`` (found only with --search)."""
    cm = build_chain(tmp_path / "vm", size=SIZE, child_block_sizes=[None, MiB])
    store = tmp_path / "store"
    store.mkdir()
    shutil.move(str(cm.paths[0]), str(store / cm.paths[0].name))
    return cm, store


def test_broken_chain_is_reported_and_search_repairs_it(moved_chain) -> None:
    cm, store = moved_chain
    leaf, middle = cm.leaf, cm.paths[1]

    result = run_cli("chain", leaf)
    assert result.returncode == 1, result  # findings
    assert "Traceback" not in result.stderr
    assert "PARENT MISSING" in result.stdout and result.stdout.strip().endswith("chain BROKEN")
    assert f"relative_path: {cm.paths[0]}" in result.stdout  # the paths tried are listed

    result = run_cli("chain", leaf, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["complete"] is False
    assert [l["linkage"] for l in data["layers"]] == ["ok", "missing"]
    assert real(data["layers"][1]["path"]) == real(middle) and data["layers"][1]["tried"]

    data = ok_json("chain", leaf, "--search", store)
    assert data["complete"] is True
    assert real(data["layers"][2]["path"]) == real(store / "base.vhdx")
    assert str(store) in data["layers"][2]["found_by"]

    assert "MISSING" in ok("info", leaf)  # info describes the file; the missing parent is a line
    info = ok_json("info", leaf, "--search", store)
    assert [l["linkage"] for l in info["chain"]] == ["ok", "ok", "none"]
    info = ok_json("info", leaf, "--missing-parent", "zeros")
    assert [l["linkage"] for l in info["chain"]] == ["ok", "missing"]

    out = middle.parent / "full.raw"
    ok("export", leaf, out, "--search", store)
    assert_same(out.read_bytes(), bytes(cm.model), "export --search")
    zeros = middle.parent / "zeros.raw"
    ok("export", leaf, zeros, "--missing-parent", "zeros")
    assert_same(zeros.read_bytes(), cm.own_over(2, cm.own_over(1)), "export --missing-parent zeros")
    given = middle.parent / "given.raw"
    ok("export", leaf, given, "--parent", middle, "--parent", store / "base.vhdx")
    assert_same(given.read_bytes(), bytes(cm.model), "export --parent --parent")

    checked = run_cli("check", leaf)
    assert checked.returncode == 2 and "not found" in checked.stdout, checked
    assert run_cli("check", leaf, "--search", store).returncode == 0
    lenient = run_cli("check", leaf, "--missing-parent", "zeros")
    assert lenient.returncode == 0 and "not found" in lenient.stdout, lenient


def test_reparent_verb(moved_chain) -> None:
    cm, store = moved_chain
    base, middle = store / "base.vhdx", cm.paths[1]
    result = ok_json("reparent", middle, "--parent", base)
    assert result["linkage_changed"] is False
    assert result["new_locator"]["relative_path"] == "..\\store\\base.vhdx"
    assert result["old_locator"]["relative_path"] == ".\\base.vhdx"
    assert ok_json("chain", cm.leaf)["complete"] is True

    other = store / "other.vhdx"
    with vhdx.create(other, SIZE, block_size=MiB) as disk:
        write_all(disk, 0, pattern(77, SIZE))
    assert_one_line_error(run_cli("reparent", middle, "--parent", other), "DataWriteGuid",
                          str(data_write_guid(other)))
    assert ok_json("chain", cm.leaf)["complete"] is True  # unchanged by the refusal

    human = ok("reparent", middle, "--parent", other, "--ignore-id-mismatch")
    assert "linkage rewritten" in human
    data = ok_json("chain", cm.leaf)
    assert data["complete"] is True and real(data["layers"][2]["path"]) == real(other)
    assert locator_of(middle)["parent_linkage"] == "{" + str(data_write_guid(other)) + "}"


def test_id_mismatch_through_the_cli(tmp_path: Path) -> None:
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[None])
    base, child = cm.paths
    with vhdx.open(base, "r+") as disk:  # orphans the child: the intended protection
        write_all(disk, 0, b"x" * 512)
    new_base = bytearray(cm.layer_bytes(0))
    new_base[:512] = b"x" * 512
    line = assert_one_line_error(run_cli("info", child), "DataWriteGuid")
    assert str(data_write_guid(base)) in line
    assert_one_line_error(run_cli("export", child, tmp_path / "no.raw"), "DataWriteGuid")
    assert not (tmp_path / "no.raw").exists()

    chain = run_cli("chain", child, "--json")
    assert chain.returncode == 1
    assert [l["linkage"] for l in json.loads(chain.stdout)["layers"]] == ["mismatch", "none"]
    assert "ID MISMATCH" in run_cli("chain", child).stdout

    info = ok_json("info", child, "--ignore-id-mismatch")
    assert info["chain"][0]["linkage"] == "mismatch"
    out = tmp_path / "forced.raw"
    ok("export", child, out, "--ignore-id-mismatch")
    assert_same(out.read_bytes(), cm.own_over(1, bytes(new_base)), "export --ignore-id-mismatch")
    assert run_cli("check", child).returncode == 2


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    missing = tmp_path / "missing.vhdx"
    assert_one_line_error(run_cli("create", tmp_path / "d.avhdx", "--parent", missing), "missing.vhdx")
    assert_one_line_error(run_cli("create", child, "--parent", base))  # exists: never overwritten
    assert_same(vhdx.open(child).read(), bytes(cm.model), "child after a refused create over it")
    assert_one_line_error(run_cli("snapshot", missing), "missing.vhdx")
    assert_one_line_error(run_cli("chain", missing), "missing.vhdx")
    assert_one_line_error(run_cli("reparent", base, "--parent", child), "differencing")
    assert_one_line_error(run_cli("reparent", child, "--parent", missing), "missing.vhdx")
    assert_one_line_error(run_cli("reparent", child, "--parent", child, "--ignore-id-mismatch"))
    junk = tmp_path / "junk.vhdx"
    junk.write_bytes(pattern(3, MiB + 4096))
    assert_one_line_error(run_cli("snapshot", junk), "junk.vhdx")
    assert_one_line_error(run_cli("reparent", child, "--parent", junk), "junk.vhdx")
    assert not list(tmp_path.glob("junk_*.avhdx"))
    # a cycle made by hand
    a = tmp_path / "a.avhdx"
    vhdx.create(a, parent=base, block_size=MiB).close()
    ok("reparent", child, "--parent", a, "--ignore-id-mismatch")
    ok("reparent", a, "--parent", child, "--ignore-id-mismatch")
    assert_one_line_error(run_cli("info", child))
    assert_one_line_error(run_cli("export", a, tmp_path / "cycle.raw"))
    described = run_cli("chain", child, "--json")
    assert described.returncode == 1 and "Traceback" not in described.stderr
    assert json.loads(described.stdout)["complete"] is False


@pytest.mark.parametrize("option", [["3M"], ["--logical-sector-size", "4096"], ["--physical-sector-size", "512"],
                                    ["--fixed"]], ids=["size", "logical", "physical", "fixed"])
def test_create_parent_refuses_geometry_options(option: list[str], tmp_path: Path) -> None:
    """The API refuses a size, sector sizes and ``fixed`` with a parent (vhdx.UsageError); the CLI
    must not drop them silently and make a child with other geometry than the user asked for."""
    base = tmp_path / "base.vhdx"
    vhdx.create(base, SIZE, block_size=MiB, physical_sector_size=4096).close()
    child = tmp_path / "c.avhdx"
    assert_one_line_error(run_cli("create", child, *option, "--parent", base), "parent")
    assert not child.exists()


def test_info_and_map_describe_an_orphaned_checkpoint(tmp_path: Path) -> None:
    """info describes the file it is given: a missing parent is a line (and a JSON field), not a
    failure; map of the child's own layer works too; check still reports the missing parent."""
    cm = build_chain(tmp_path, size=SIZE, child_block_sizes=[MiB], use_snapshot=False)
    base, child = cm.paths
    guid = str(data_write_guid(base))
    base.unlink()

    info = ok_json("info", child)
    assert info["disk_type"] == "differencing" and info["virtual_size"] == SIZE
    assert [l["linkage"] for l in info["chain"]] == ["missing"]
    assert info["missing_parent"]["parent_linkage"].strip("{}") == guid and info["missing_parent"]["tried"]
    text = ok("info", child)
    assert re.search(r"parent +MISSING: DataWriteGuid .*" + guid, text, re.I), text

    own = ok_json("map", child, "--layer", "0")
    assert [l["layer"] for l in own["layers"]] == [0] and own["layers"][0]["ranges"]
    assert own["missing_parent"]["parent_linkage"].strip("{}") == guid
    assert re.search(r"parent +MISSING", ok("map", child, "--layer", "0"), re.I)
    assert ok_json("map", child)["missing_parent"]  # every layer found, and the missing one named

    checked = run_cli("check", child)
    assert checked.returncode == 2 and "not found" in checked.stdout, checked
