"""``vhdx.open`` and the other entry points as a new user calls them (issue 14, point 5).

Spelled-out keyword arguments (a typo is a TypeError at the call, which mypy --strict sees), one
path given as a str or PathLike where one is meant, a missing file that is also a
FileNotFoundError, "rb"/"r+b" modes, and no internal test parameter in ``help(vhdx.merge)``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vhdx
from support.needs import unavailable

OPEN_KEYWORDS = ["search_paths", "parents", "ignore_id_mismatch", "missing_parent", "share", "storage"]


def moved_chain(tmp_path: Path) -> tuple[Path, Path]:
    """A base moved to ``tmp_path/backup`` away from its child: (the child, the backup folder)."""
    base = tmp_path / "base.vhdx"
    with vhdx.create(base, 8 << 20) as disk:
        disk.write(b"base data")
    child = Path(vhdx.snapshot(base))
    backup = tmp_path / "backup"
    backup.mkdir()
    shutil.move(str(base), str(backup / "moved.vhdx"))
    return child, backup


def test_open_spells_out_its_keywords() -> None:
    params = inspect.signature(vhdx.open).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in OPEN_KEYWORDS:
        assert name in params, name
        assert params[name].annotation is not inspect.Parameter.empty
        assert name in (vhdx.open.__doc__ or ""), f"the docstring does not describe {name}"


@pytest.mark.parametrize("func", [vhdx.chain, vhdx.export, vhdx.hash])
def test_the_chain_readers_spell_out_their_keywords(func) -> None:
    params = inspect.signature(func).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert {"search_paths", "parents", "ignore_id_mismatch", "missing_parent", "share"} <= set(params)


def test_a_typo_is_a_plain_type_error_naming_the_keyword(tmp_path: Path) -> None:
    path = tmp_path / "d.vhdx"
    vhdx.create(path, 8 << 20).close()
    with pytest.raises(TypeError) as info:
        vhdx.open(path, serch_paths=[str(tmp_path)])  # type: ignore[call-arg]
    assert "serch_paths" in str(info.value)
    assert "Resolver" not in str(info.value)


@pytest.mark.parametrize("as_type", [str, Path])
def test_one_search_path_is_one_folder(tmp_path: Path, as_type: type) -> None:
    child, backup = moved_chain(tmp_path)
    with vhdx.open(child, search_paths=as_type(backup)) as disk:
        assert disk.read(9) == b"base data"
    layers = vhdx.chain(child, search_paths=as_type(backup)).layers
    assert layers[1].path == str(backup / "moved.vhdx")
    assert not any(t.startswith("DataWriteGuid scan of /") and t.endswith("of /") for t in layers[0].tried)
    assert vhdx.hash(child, search_paths=as_type(backup)) == vhdx.hash(child, parents=[backup / "moved.vhdx"])


def test_one_search_path_is_never_split_into_characters(tmp_path: Path) -> None:
    child, backup = moved_chain(tmp_path)
    tried = vhdx.chain(child, search_paths=str(backup)).layers[0].tried
    scanned = [t for t in tried if t.startswith("DataWriteGuid scan of")]
    assert scanned and all(len(t) > len("DataWriteGuid scan of ") + 1 for t in scanned), scanned


def test_one_parent_path_is_one_parent(tmp_path: Path) -> None:
    child, backup = moved_chain(tmp_path)
    with vhdx.open(child, parents=backup / "moved.vhdx") as disk:
        assert disk.read(9) == b"base data"


def test_a_missing_file_is_both_a_vhdx_error_and_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.vhdx"
    for call in (lambda: vhdx.open(missing), lambda: vhdx.chain(missing), lambda: vhdx.hash(missing),
                 lambda: vhdx.merge(missing), lambda: vhdx.snapshot(missing)):
        with pytest.raises(vhdx.VhdxError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError), repr(info.value)
        assert isinstance(info.value, vhdx.DiskNotFoundError)
        assert info.value.path == str(missing)
        assert str(missing) in str(info.value)


@pytest.mark.parametrize("mode, writable", [("rb", False), ("r+b", True), ("r", False), ("r+", True)])
def test_binary_modes_are_accepted(tmp_path: Path, mode: str, writable: bool) -> None:
    path = tmp_path / "d.vhdx"
    vhdx.create(path, 8 << 20).close()
    with vhdx.open(path, mode) as disk:
        assert disk.writable() is writable


@pytest.mark.parametrize("mode", ["w", "rw", "b", "r+bb", "a"])
def test_other_modes_are_refused(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "d.vhdx"
    vhdx.create(path, 8 << 20).close()
    with pytest.raises(vhdx.UsageError):
        vhdx.open(path, mode)


def test_pathlike_everywhere(tmp_path: Path) -> None:
    """Every entry point takes a PathLike where one path is meant, and returns str paths."""
    base = tmp_path / "a" / "base.vhdx"
    base.parent.mkdir()
    vhdx.create(base, 8 << 20).close()
    child = vhdx.snapshot(base)
    assert isinstance(child, str)
    assert vhdx.chain(Path(child)).layers[1].path == str(base)
    other = tmp_path / "other.vhdx"
    shutil.copy(base, other)
    vhdx.reparent(Path(child), other)
    assert vhdx.find_chains(tmp_path, recursive=True).chain_of(str(Path(child)))
    assert vhdx.export(Path(child), tmp_path / "out.raw").out == str(tmp_path / "out.raw")
    assert len(vhdx.hash(Path(child))) == 64
    result = vhdx.merge(Path(child), other)
    assert result.deleted == [child]


def test_help_of_merge_shows_no_internal_parameter() -> None:
    params = inspect.signature(vhdx.merge).parameters
    assert "storage_wrapper" not in params
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "storage_wrapper" not in (vhdx.merge.__doc__ or "")
    assert "fault" not in (vhdx.merge.__doc__ or "")


def test_mypy_strict_flags_a_misspelt_keyword(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:  # a test extra: CI has it, a missing one fails there
        unavailable("mypy is not installed (pip install -e '.[test]')")
    src = tmp_path / "user.py"
    src.write_text("import vhdx\n\nwith vhdx.open('x', serch_paths=['/backup']) as d:\n    d.read(1)\n"
                   "with vhdx.open('x', search_paths='/backup', mode='rb') as d:\n    d.read(1)\n")
    root = Path(vhdx.__file__).parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), MYPYPATH=str(root))
    run = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir", os.devnull,
                          "--follow-imports=silent", str(src)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    errors = [l for l in run.stdout.splitlines() if ": error:" in l]
    assert len(errors) == 1 and "serch_paths" in errors[0] and "user.py:3:" in errors[0], run.stdout


@pytest.mark.parametrize("size", ["4096", 1.5, b"1", [1]])
def test_read_sizes_that_are_not_integers_are_usage_errors(tmp_path: Path, size: object) -> None:
    """``read`` takes an int, None or a negative number (to the end); anything else is a
    UsageError naming the file, never a bare TypeError from a comparison."""
    path = tmp_path / "d.vhdx"
    vhdx.create(str(path), 4 << 20).close()
    with vhdx.open(str(path)) as disk:
        with pytest.raises(vhdx.UsageError) as e:
            disk.read(size)  # type: ignore[arg-type]
        assert "size" in str(e.value) and "d.vhdx" in str(e.value)
        assert disk.read(None) == bytes(4 << 20) and disk.read(-3) == b"" and disk.tell() == 4 << 20
        disk.seek(4096)
        assert disk.read(0) == b"" and disk.read(-1) == bytes((4 << 20) - 4096)


PATH_TAKERS = {
    "open": lambda p: vhdx.open(p), "create": lambda p: vhdx.create(p, 1 << 20), "snapshot": lambda p: vhdx.snapshot(p),
    "chain": lambda p: vhdx.chain(p), "reparent child": lambda p: vhdx.reparent(p, "x.vhdx"),
    "reparent parent": lambda p: vhdx.reparent("x.avhdx", p), "find_chains": lambda p: vhdx.find_chains(p),
    "merge": lambda p: vhdx.merge(p), "export": lambda p: vhdx.export(p, "out.raw"), "hash": lambda p: vhdx.hash(p),
    "compact": lambda p: vhdx.compact(p), "resize": lambda p: vhdx.resize(p, 1 << 20),
    "minimum_size": lambda p: vhdx.minimum_size(p), "convert source": lambda p: vhdx.convert(p, "out.vhdx"),
    "convert out": lambda p: vhdx.convert("in.vhdx", p), "repair": lambda p: vhdx.repair(p, "out.vhdx"),
    "repair out": lambda p: vhdx.repair("in.vhdx", p), "replay": lambda p: vhdx.replay(p),
}


@pytest.mark.parametrize("value", [5.5, None, object(), ["a.vhdx"]], ids=["float", "None", "object", "list"])
@pytest.mark.parametrize("name", sorted(PATH_TAKERS))
def test_a_path_that_is_not_a_path_is_a_usage_error(tmp_path: Path, monkeypatch, name: str, value: object) -> None:
    """Every public function that takes a file refuses a value that is not a path with one
    UsageError, never a bare TypeError from deep inside (and never creates anything)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(vhdx.VhdxError):
        PATH_TAKERS[name](value)
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_disk_methods_turn_wrong_arguments_into_usage_errors(tmp_path: Path) -> None:
    """Buffers that are not buffers (or read-only ones to read into, or non-contiguous ones),
    seek offsets that are not integers and unknown whence values: UsageError naming the file.
    UsageError is a ValueError, what ``io`` raises for a bad whence or a negative position."""
    path = tmp_path / "d.vhdx"
    with vhdx.create(str(path), 4 << 20) as disk:
        wrong = [lambda: disk.write(123), lambda: disk.write("text"), lambda: disk.pwrite(np.zeros(8)[::2], 0),
                 lambda: disk.readinto(123), lambda: disk.readinto(b"read-only"),
                 lambda: disk.pread_into(memoryview(b"abcd"), 0), lambda: disk.seek("a"), lambda: disk.seek(1.5),
                 lambda: disk.seek(0, 7), lambda: disk.seek(-1)]
        for call in wrong:
            with pytest.raises(vhdx.UsageError) as e:
                call()
            assert "d.vhdx" in str(e.value)
            assert isinstance(e.value, ValueError)
        assert disk.tell() == 0 and disk.write(b"ok") == 2 and disk.pread(0, 2) == b"ok"


KEYWORD_MISTAKES = {
    "create block_size": lambda d: vhdx.create("n.vhdx", 1 << 20, block_size="1M"),
    "create logical_sector_size": lambda d: vhdx.create("n.vhdx", 1 << 20, logical_sector_size=512.0),
    "convert block_size": lambda d: vhdx.convert(d, "n.vhdx", block_size="2"),
    "open search_paths": lambda d: vhdx.open(d, search_paths=5),
    "open parents": lambda d: vhdx.open(d, parents=5),
    "open parents item": lambda d: vhdx.open(d, parents=[5]),
    "export progress": lambda d: vhdx.export(d, "n.raw", progress=5),
    "hash progress": lambda d: vhdx.hash(d, progress="bar"),
    "convert progress": lambda d: vhdx.convert(d, "n.vhdx", progress=5),
    "compact progress": lambda d: vhdx.compact(d, progress=5),
    "merge progress": lambda d: vhdx.merge(d, progress=5),
    "merge on_plan": lambda d: vhdx.merge(d, on_plan=5),
    "repair size": lambda d: vhdx.repair(d, "n.vhdx", size="1"),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_MISTAKES))
def test_keyword_arguments_of_the_wrong_kind_are_usage_errors_before_any_work(tmp_path: Path, monkeypatch,
                                                                               name: str) -> None:
    """A block size as a string, a progress that cannot be called, a number for a list of
    paths: one UsageError before anything is written (a merge is not left half done)."""
    monkeypatch.chdir(tmp_path)
    vhdx.create("d.vhdx", 4 << 20).close()
    child = vhdx.snapshot("d.vhdx")
    with vhdx.open(child, "r+") as disk:
        disk.write(b"x" * 4096)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(vhdx.UsageError):
        KEYWORD_MISTAKES[name](child)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
