"""The shell recipes of docs/howto-forensics.md, run exactly as written (``<!-- recipe: NAME -->``
blocks): only their first line, which names the inputs (``DISK=... MNT=...``), is replaced by
this test's files. ``vhdx`` on PATH is this checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.filesystems import build, require
from support.cli import REPO, cli_env, run_inprocess
from support.disk import sha256_file

from support.mounting import force_unmount, is_mounted, require_fuse

DOC = REPO / "docs" / "howto-forensics.md"
ASSIGNMENTS = re.compile(r"^(\s*[A-Z_]+=\S+)+\s*$")


def recipe(name: str) -> list[str]:
    """The lines of the ```sh block after ``<!-- recipe: NAME, ... -->``."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- recipe: {name},"))
    assert lines[start + 1].strip() == "```sh", lines[start + 1]
    end = next(i for i in range(start + 2, len(lines)) if lines[i].strip() == "```")
    return lines[start + 2:end]


def run_recipe(name: str, tmp_path: Path, **inputs: str) -> str:
    """Run the recipe with bash -e; its first line (the inputs) is given by ``inputs``."""
    lines = recipe(name)
    assert ASSIGNMENTS.match(lines[0]), lines[0]
    names = set(re.findall(r"([A-Z_]+)=", lines[0]))
    assert names == set(inputs), (names, inputs)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "vhdx").write_text(f"#!/bin/sh\nexec {sys.executable} -m vhdx \"$@\"\n")
    (bin_dir / "vhdx").chmod(0o755)
    env = cli_env()
    env.update(inputs, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    done = subprocess.run(["bash", "-e", "-c", "\n".join(lines[1:])], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"recipe {name} failed: {done.stderr}"
    return done.stdout


def _steps():
    from support.filesystems import Step
    return [Step([("mkdir", "/docs", b""), ("write", "/docs/a.txt", b"first\n"), ("write", "/b.bin", b"b" * 9000)]),
            Step([("write", "/docs/c.txt", b"in the checkpoint\n"), ("delete", "/b.bin", b"")])]


def test_mount_then_loop_mount_a_partition(tmp_path: Path) -> None:
    require_fuse()
    require("ext4")
    chain = build(tmp_path / "disks", "ext4", "gpt", _steps())
    mnt, part = tmp_path / "mnt", tmp_path / "part"
    mnt.mkdir()
    part.mkdir()
    try:
        out = run_recipe("mount-partition", tmp_path, DISK=str(chain.paths[-1]), MNT=str(mnt), PART=str(part),
                         START="2048")
    finally:
        force_unmount(part)
        force_unmount(mnt)
    words = out.split()
    assert {"disk", chain.paths[0].name, chain.paths[1].name} <= set(words), out
    assert {"docs", "lost+found"} <= set(words) and "b.bin" not in words, out
    assert not is_mounted(mnt) and not is_mounted(part)


def test_hash_every_layer(tmp_path: Path) -> None:
    require_fuse()
    require("ext4")
    chain = build(tmp_path / "disks", "ext4", "none", _steps())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = [sha256_file(p) for p in chain.paths]
    try:
        out = run_recipe("hash-layers", tmp_path, DISK=str(chain.paths[-1]), MNT=str(mnt))
    finally:
        force_unmount(mnt)
    lines = out.splitlines()
    by_layer = [line.split()[0] for line in lines[:2]]
    for n in range(2):
        assert by_layer[n] == run_inprocess("hash", chain.paths[-1], "--layer", n).stdout.split()[0]
    sums = {Path(line.split()[1]).name: line.split()[0] for line in lines[2:]}
    assert sums == {"disk": by_layer[0], chain.paths[1].name: by_layer[0], chain.paths[0].name: by_layer[1]}, out
    assert [sha256_file(p) for p in chain.paths] == before
