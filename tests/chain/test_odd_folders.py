"""Odd folders and chains: FIFOs, sockets, devices and symlink loops named ``*.vhdx``, very deep chains.

Every command runs in a subprocess with a timeout, so a hang fails the test instead of
stopping the run. The small chain (a base and two checkpoints, made with ``vhdx.create`` and
``vhdx.snapshot``) is renamed after it is built, so that its locators' paths all miss and each
parent is found only by the DataWriteGuid scan of the folder; the odd file's name sorts first,
so the scan meets it before any disk.

The deep chains are built with ``create_image`` and ``locator_for``, the pieces ``snapshot``
uses, without its check that the parent's whole chain resolves: that check makes building a
chain quadratic (measured here: 200 snapshots took 107 s, so 1,000 would take about half an
hour), while this builds 1,030 layers in about 12 s. Each layer is a 1 MiB virtual disk.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdx
from support.needs import unavailable
from vhdx.chains import scan as chains
from vhdx.ops.create import locator_for
from vhdx.format.locator import build_parent_locator
from vhdx.file.create import create_image
from vhdx.file.image import Image
from vhdx.file.storage import FileStorage

from .helpers import REPO, MiB, pattern, read_all, write_all

TIMEOUT = 60  # a hang fails the test after this many seconds
FAST = 20  # "a few seconds", with room for a loaded machine
LIMIT = 1024  # layers a chain may have
DEEP = 1030  # layers of the deep chain: past the limit
SCANNED = 300  # layers of the chain found only by scanning


def run(*args: str | os.PathLike[str], timeout: float = TIMEOUT) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m vhdx ARGS``, failing the test (not hanging) if it runs past ``timeout``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "vhdx", *map(os.fspath, args)], capture_output=True,
                                text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vhdx {' '.join(map(str, args))}: still running after {timeout} s (a hang)")
    elapsed = time.monotonic() - t0
    print(f"vhdx {args[0]}: {elapsed:.2f} s")
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result, elapsed


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- a small chain, renamed

def renamed_chain(folder: Path) -> tuple[list[Path], bytes]:
    """base <- checkpoint <- checkpoint, each written, renamed so that only a scan finds the
    parents. Returns the paths (base first) and what the leaf reads."""
    folder.mkdir()
    base = folder / "base.vhdx"
    with vhdx.create(base, 2 * MiB, block_size=MiB) as disk:
        write_all(disk, 1000, pattern(1, 5000))
    made = [base]
    for seed in (2, 3):
        child = Path(vhdx.snapshot(made[-1]))
        with vhdx.open(child, "r+") as disk:
            write_all(disk, seed * 70_000, pattern(seed, 3000))
        made.append(child)
    with vhdx.open(made[-1]) as disk:
        want = read_all(disk)
    paths = []
    for i, p in enumerate(made):
        new = folder / f"disk{i}{p.suffix}"
        p.rename(new)
        paths.append(new)
    return paths, want


def make_odd(path: Path, kind: str) -> str:
    """A FIFO, a socket or a character device (/dev/null's numbers) at ``path``; its kind's name."""
    if kind == "fifo":
        os.mkfifo(path)
        return "a FIFO"
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(os.fspath(path))
        return "a socket"
    if os.geteuid() != 0:
        unavailable("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    return "a character device"


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_a_special_file_named_vhdx_is_skipped_with_a_note(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "vms"
    (base, middle, leaf), want = renamed_chain(folder)
    odd = folder / "0odd.vhdx"
    name = make_odd(odd, kind)
    note = f"not a regular file ({name})"

    result, _ = run("orphans", folder)
    assert result.returncode == 0, result.stderr
    assert f"0odd.vhdx  [unreadable: {note}]" in result.stdout, result.stdout
    assert f"vhdx merge {leaf} --into {base}" in result.stdout, result.stdout
    forest = vhdx.find_chains(folder)
    assert forest.nodes[str(odd)].error == note
    assert [n.path for n in forest.chain_of(str(leaf))] == [str(leaf), str(middle), str(base)]

    result, _ = run("info", leaf)  # every parent is found only by the folder scan
    assert result.returncode == 0, result.stderr
    assert f"{middle} (DataWriteGuid scan of {folder}" in result.stdout, result.stdout
    result, _ = run("chain", leaf, "--json")
    tried = json.loads(result.stdout)["layers"][0]["tried"]
    assert f"  skipped {odd}: {note}" in tried, tried
    with vhdx.open(leaf) as disk:
        assert read_all(disk) == want

    result, _ = run("merge", leaf, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "dry run" in result.stdout
    plan = vhdx.merge(leaf, dry_run=True)
    assert plan.destination == str(middle) and plan.dependents == []

    one_line_error(run("info", odd)[0], note)  # named directly: refused, not opened
    one_line_error(run("merge", folder / "gone.avhdx")[0], "gone.avhdx")

    result, _ = run("merge", leaf)  # the real merge: the scans skip the odd file again
    assert result.returncode == 0, result.stderr
    with vhdx.open(middle) as disk:
        assert read_all(disk) == want
    assert not leaf.exists() and os.path.lexists(odd)


def test_symlink_loops_and_dangling_links_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "vms"
    (base, middle, leaf), want = renamed_chain(folder)
    os.symlink("0loop-b.vhdx", folder / "0loop-a.vhdx")
    os.symlink("0loop-a.vhdx", folder / "0loop-b.vhdx")
    os.symlink("0self.vhdx", folder / "0self.vhdx")
    os.symlink("nowhere.vhdx", folder / "0dangling.vhdx")
    os.symlink(base.name, folder / "0link-to-base.vhdx")  # a link to a real disk is followed
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")  # a directory loop for --recursive

    result, _ = run("orphans", folder)
    assert result.returncode == 0, result.stderr
    for name in ("0loop-a.vhdx", "0loop-b.vhdx", "0self.vhdx"):
        assert f"{name}  [unreadable: a loop of symbolic links]" in result.stdout, result.stdout
    assert "0dangling.vhdx  [unreadable: a dangling symbolic link]" in result.stdout, result.stdout
    assert f"vhdx merge {leaf} --into" in result.stdout
    result, _ = run("orphans", "--recursive", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("0self.vhdx") == 1, result.stdout  # sub/up is not followed

    result, _ = run("chain", leaf, "--json")
    assert result.returncode == 0, result.stderr
    layers = json.loads(result.stdout)["layers"]
    assert f"  skipped {folder / '0self.vhdx'}: a loop of symbolic links" in layers[0]["tried"]
    assert f"  skipped {folder / '0dangling.vhdx'}: a dangling symbolic link" in layers[0]["tried"]
    # the base is found through the link to it, which sorts before the base itself
    assert layers[2]["path"] == str(folder / "0link-to-base.vhdx"), layers
    with vhdx.open(leaf) as disk:
        assert read_all(disk) == want
    result, _ = run("merge", leaf, "--dry-run")
    assert result.returncode == 0, result.stderr


def test_a_loop_of_parents_is_shown_and_refused(tmp_path: Path) -> None:
    folder = tmp_path / "vms"
    (base, middle, leaf), _ = renamed_chain(folder)
    pairs = locator_for(leaf, middle, chains.read_data_write_guid(os.fspath(leaf)))
    image = Image.open(os.fspath(middle), "r+")
    try:
        image.write_parent_locator(pairs)  # middle's parent is now the leaf: a loop
    finally:
        image.close()
    result, _ = run("orphans", folder)
    assert result.returncode == 0, result.stderr
    for p in (middle, leaf):
        assert f"{p.name}  [differencing, in a loop of parents: no base]" in result.stdout, result.stdout
    one_line_error(run("info", leaf)[0], "refers back")


# --------------------------------------------------------------------------- deep chains

def build_deep_chain(folder: Path, depth: int) -> tuple[list[Path], dict[int, tuple[int, bytes]]]:
    """A base and ``depth`` differencing layers, leaf last. Every 97th layer writes one sector
    of its own, given in the returned dict as layer -> (offset, bytes)."""
    folder.mkdir()
    base = folder / "base.vhdx"
    marks: dict[int, tuple[int, bytes]] = {}
    vhdx.create(base, MiB, block_size=MiB).close()
    paths = [base]
    guid = chains.read_data_write_guid(os.fspath(base))
    for i in range(1, depth + 1):
        child = folder / f"base_{i:08X}-0000-0000-0000-000000000000.avhdx"
        locator = build_parent_locator(locator_for(os.fspath(paths[-1]), os.fspath(child), guid))
        storage = FileStorage(child, writable=True, create=True, durable=False)
        image = create_image(child, MiB, block_size=MiB, parent_locator=locator, storage=storage)
        try:
            if i % 97 == 0:
                marks[i] = ((i // 97) * 4096, pattern(i, 512))
                image.write_at(memoryview(marks[i][1]), marks[i][0])
        finally:
            image.close()
        guid = image.header.data_write_guid  # as the file now has it (a write rotated it)
        paths.append(child)
    return paths, marks


def expected(marks: dict[int, tuple[int, bytes]], depth: int) -> bytes:
    want = bytearray(MiB)
    for i, (offset, data) in sorted(marks.items()):
        if i <= depth:
            want[offset:offset + len(data)] = data
    return bytes(want)


@pytest.fixture(scope="module")
def deep_chain(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("deep") / "vms"
    t0 = time.monotonic()
    paths, marks = build_deep_chain(folder, DEEP)
    print(f"built a {DEEP}-layer chain in {time.monotonic() - t0:.1f} s")
    yield paths, marks
    shutil.rmtree(folder.parent, ignore_errors=True)  # about 1.2 GiB


@pytest.fixture(scope="module")
def scanned_chain(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("scanned") / "vms"
    t0 = time.monotonic()
    paths, marks = build_deep_chain(folder, SCANNED)
    renamed = []
    for i, p in enumerate(paths):  # every locator path and file name now misses
        new = folder / f"L{i:04d}{p.suffix}"
        p.rename(new)
        renamed.append(new)
    print(f"built a {SCANNED}-layer chain in {time.monotonic() - t0:.1f} s")
    yield renamed, marks
    shutil.rmtree(folder.parent, ignore_errors=True)


def test_orphans_on_a_chain_a_thousand_deep(deep_chain) -> None:
    paths, _ = deep_chain
    folder = paths[0].parent
    result, elapsed = run("orphans", folder)
    assert result.returncode == 0, result.stderr
    assert f"(level {DEEP}) └── {paths[-1].name}  [differencing, leaf]" in result.stdout, result.stdout[-500:]
    assert f"vhdx merge {paths[-1]} --into {paths[0]}" in result.stdout
    assert elapsed < FAST
    forest = vhdx.find_chains(folder)
    assert [n.path for n in forest.chain_of(str(paths[-1]))] == [str(p) for p in reversed(paths)]


def test_a_chain_past_the_depth_limit_is_refused(deep_chain) -> None:
    paths, marks = deep_chain
    result, elapsed = run("info", paths[-1])
    one_line_error(result, f"the chain is deeper than {LIMIT} layers")
    assert elapsed < FAST
    depth = LIMIT - 1  # the deepest layer whose chain is within the limit
    t0 = time.monotonic()
    with vhdx.open(paths[depth]) as disk:
        assert len(disk.chain_info) == LIMIT
        assert read_all(disk) == expected(marks, depth)
    print(f"opened and read {LIMIT} layers in {time.monotonic() - t0:.2f} s")
    with pytest.raises(vhdx.ChainCycleError, match="deeper than"):
        vhdx.chain(paths[-1])


def test_a_chain_found_only_by_scanning_resolves_quickly(scanned_chain) -> None:
    paths, marks = scanned_chain
    result, elapsed = run("info", paths[-1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("DataWriteGuid scan of") == SCANNED, result.stdout[-2000:]
    assert elapsed < 10, f"{elapsed:.1f} s to resolve {SCANNED} layers by scanning"

    reads = 0
    real_open = chains.open_found
    real_peek = chains.read_peek

    def counting(fn):
        def inner(*args, **kwargs):
            nonlocal reads
            reads += 1
            return fn(*args, **kwargs)
        return inner

    chains.open_found, chains.read_peek = counting(real_open), counting(real_peek)
    try:
        t0 = time.monotonic()
        with vhdx.open(paths[-1]) as disk:
            assert read_all(disk) == expected(marks, SCANNED)
        elapsed = time.monotonic() - t0
    finally:
        chains.open_found, chains.read_peek = real_open, real_peek
    print(f"{SCANNED}-layer scanned chain: opened and read in {elapsed:.2f} s, {reads} file reads "
          f"for {len(paths)} files")
    assert reads <= 2 * len(paths)  # a header peek of each file in the scan, and the open of each parent
    assert elapsed < 10
