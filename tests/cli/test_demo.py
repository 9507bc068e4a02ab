"""`vhdx demo`: passes as shipped, leaves a good disk with --dir, and its checks can fail."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

import vhdx
import vhdx.ops.demo
import vhdx.ops.merge.run
from support.forensic_chain import cli_env, run_inprocess
from vhdx.ops.check import CheckReport, Finding


def test_demo_passes_in_a_real_process(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "vhdx", "demo"], cwd=tmp_path, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo passed" in result.stdout
    assert "FAILED" not in result.stdout
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir()), "vhdx demo without --dir left files in the current folder"


def test_demo_dir_leaves_a_checked_merged_disk(tmp_path: Path) -> None:
    folder = tmp_path / "work" / "demo"          # created by the demo
    result = run_inprocess("demo", "--dir", folder)
    assert result.returncode == 0, result.describe()
    assert "demo passed" in result.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["server.vhdx"], "checkpoints left after the merge"
    server = folder / "server.vhdx"
    check = run_inprocess("check", server)
    assert check.returncode == 0 and "no errors" in check.stdout, check.describe()
    chain = run_inprocess("chain", "--json", server).json()
    assert len(chain["layers"]) == 1
    # the merged base holds what the demo wrote: its own model, rebuilt here
    model = bytearray(vhdx.ops.demo.SIZE)
    MiB = 1 << 20
    p = vhdx.ops.demo.pattern
    for offset, data in ((0, p("BASE-SYSTEM", 8 * MiB)), (20 * MiB, p("BASE-DATA", 4 * MiB)),
                         (1 * MiB, p("CHECKPOINT-1", 512 * 1024)), (30 * MiB, p("CHECKPOINT-1-NEW", 3 * MiB)),
                         (1 * MiB + 4096, p("CHECKPOINT-2", 8192)),
                         (21 * MiB + 100, b"unaligned write in checkpoint 2")):
        model[offset:offset + len(data)] = data
    hashed = run_inprocess("hash", "--json", server).json()
    assert hashed["sha256"] == hashlib.sha256(model).hexdigest()


def test_demo_dir_twice_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second demo into the same folder must not silently clobber the first one's disk."""
    folder = tmp_path / "demo"
    assert run_inprocess("demo", "--dir", folder).returncode == 0
    before = (folder / "server.vhdx").read_bytes()
    again = run_inprocess("demo", "--dir", folder)
    assert again.returncode != 0
    assert (folder / "server.vhdx").read_bytes() == before


def _run_demo(folder: Path) -> tuple[bool, str]:
    lines: list[str] = []
    ok = vhdx.ops.demo.run(str(folder), say=lines.append)
    return ok, "\n".join(lines)


def test_demo_detects_a_merge_that_drops_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = vhdx.ops.merge.run._planned
    dropped: list[tuple[int, int]] = []

    def lossy(views: Any, spans: Any) -> Iterator[tuple[int, int, list[Any]]]:
        for start, length, found in real(views, spans):  # each window loses its first data extent
            data = [k for k, extent in enumerate(found) if extent[2] is not None]
            if data:
                dropped.append(found[data[0]][:2])
                found = found[:data[0]] + found[data[0] + 1:]
            yield start, length, found

    monkeypatch.setattr(vhdx.ops.merge.run, "_planned", lossy)
    ok, said = _run_demo(tmp_path)
    assert dropped, "the patched merge never ran"
    assert ok is False, said
    assert "FAILED" in said and "demo FAILED" in said
    failed = [line for line in said.splitlines() if "FAILED" in line and "demo FAILED" not in line]
    assert any("reads exactly as the last checkpoint" in line for line in failed), said


def test_demo_exits_1_when_a_check_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI turns a failed check into exit 1: here the change map loses its ranges."""
    monkeypatch.setattr(vhdx.ops.demo, "changed_ranges", lambda image: [])
    result = run_inprocess("demo", "--dir", tmp_path / "d")
    assert result.returncode == 1, result.describe()
    assert "demo FAILED" in result.stdout
    assert any("FAILED" in line and "16 sectors" in line for line in result.stdout.splitlines()), result.stdout


def test_demo_detects_a_check_that_finds_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vhdx.ops.demo, "check_file",
                        lambda path: CheckReport(path, [Finding("error", 0, "injected")], opened=True))
    ok, said = _run_demo(tmp_path)
    assert ok is False
    assert any("FAILED" in line and "vhdx check" in line for line in said.splitlines()), said
