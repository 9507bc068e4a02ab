"""Evidence handling: no read-only verb changes a specimen, down to the open(2) flags.

1. In a separate process, every read-only verb (info, info --json, check, check --json, chain,
   chain --json, map, map --json, diff/diff --json for the differencing one, export to a
   temporary folder, hash) runs on every specimen; the file's SHA-256, size, mtime and ctime
   are the same afterwards. The verbs run one after another in one helper process per
   specimen (a Python start costs ~0.5 s here; 130 of them would blow the time budget); the
   helper also records the flags of every ``os.open`` of a file in the specimen folder.
2. In this process, with ``os.open`` / ``open`` / ``os.rename`` ... wrapped by monkeypatch, the
   same verbs must never open a specimen with O_WRONLY, O_RDWR, O_CREAT, O_TRUNC or O_APPEND.
3. The two dirty-log specimens keep their log un-replayed on disk (same hash afterwards) while
   ``info --json`` reports the log replayed in memory.
4. ``orphans FOLDER`` over the specimen folder changes nothing either.

Full-disk hashes of the >1 GiB specimens take ~10 s each: those runs are slow-marked.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from support.forensic_chain import REPO, cli_env, run_inprocess
from support.needs import unavailable
from support.shared import manifest_entries, no_shared_param

GiB = 1 << 30
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


# --------------------------------------------------------------------------------------------
# The specimens, from the manifest at collection time (conftest skips when it is missing)
# --------------------------------------------------------------------------------------------

ENTRIES = manifest_entries()


def _short(stored: str) -> str:
    for suffix in (".gz", ".bz2", ".zip"):
        if stored.endswith(suffix):
            return stored[: -len(suffix)]
    return stored


def _is_lvm2(entry: dict[str, Any]) -> bool:
    return "lvm2" in entry["file"]


def _big(entry: dict[str, Any]) -> bool:
    return entry["virtual_size"] > 1 * GiB


def _params(select: Callable[[dict[str, Any]], bool] = lambda e: True,
            slow: Callable[[dict[str, Any]], bool] = _is_lvm2) -> list[Any]:
    if ENTRIES is None:
        return [no_shared_param()]
    return [pytest.param(_short(e["file"]), id=_short(e["file"]),
                         marks=[pytest.mark.slow] if slow(e) else [])
            for e in ENTRIES if select(e)]


def _entry(name: str) -> dict[str, Any]:
    assert ENTRIES is not None
    return next(e for e in ENTRIES if _short(e["file"]) == name)


def _state(path: Path, file_sha256: Callable[[Path], str]) -> dict[str, Any]:
    st = os.stat(path)
    return dict(sha256=file_sha256(path), size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                mode=st.st_mode)


def verbs(name: str, path: Path, out_dir: Path, *, with_hash: bool) -> list[list[str]]:
    """Every read-only verb for one specimen, as argv lists."""
    entry = _entry(name)
    p = str(path)
    orphan = ["--missing-parent", "zeros"] if entry["has_parent"] else []
    argvs = [["info", p, *orphan], ["info", "--json", p, *orphan], ["check", p], ["check", "--json", p],
             ["chain", p], ["chain", "--json", p], ["map", p, *orphan], ["map", "--json", p, *orphan],
             ["export", p, str(out_dir / f"{name}.raw"), *orphan]]
    if entry["has_parent"]:
        argvs += [["info", p], ["map", "--json", p],            # refused without a parent: still no write
                  ["diff", p], ["diff", "--json", p], ["diff", "--json", p, "--missing-parent", "zeros"]]
    if with_hash:
        argvs.append(["hash", "--json", p, *orphan])
    return argvs


def expected_exit(name: str, argv: list[str]) -> int:
    entry = _entry(name)
    if not entry["has_parent"]:
        return 0
    # the orphan: a missing parent is a finding for check/chain, a line in info and map, an error
    # without --missing-parent for the verbs that read data
    if argv[0] == "check":
        return 2  # errors found, as qemu-img check
    if argv[0] == "chain":
        return 1
    if argv[0] in ("diff", "info", "map") or "--missing-parent" in argv:
        return 0
    return 1


_MANIFEST_STATE = {"NOT_PRESENT": "absent", "ZERO": "zero", "UNMAPPED": "unmapped", "UNDEFINED": "unmapped",
                   "FULLY_PRESENT": "present", "PARTIALLY_PRESENT": "present"}


def assert_map_matches_manifest(entry: dict[str, Any], layer: dict[str, Any]) -> None:
    """``map --json`` of a file without a parent, in blocks per state, against the BAT states the
    manifest records (after qemu's log replay for the dirty ones)."""
    bs = entry["block_size"]
    states = entry.get("bat_payload_states_after_qemu_replay") or entry["bat_payload_states"]
    want: dict[str, int] = {}
    for state, count in states.items():
        want[_MANIFEST_STATE[state]] = want.get(_MANIFEST_STATE[state], 0) + count
    got: dict[str, int] = {}
    for r in layer["ranges"]:
        assert r["start"] % bs == 0, f"a range of a file without a parent starts inside a block: {r}"
        end = r["start"] + r["length"]
        assert end % bs == 0 or end == entry["virtual_size"], r
        got[r["state"]] = got.get(r["state"], 0) + -(-end // bs) - r["start"] // bs
    assert got == want, f"map --json blocks per state {got}, the manifest's BAT {want}"
    assert sum(layer["totals"].values()) == entry["virtual_size"]


# --------------------------------------------------------------------------------------------
# 1. a separate process
# --------------------------------------------------------------------------------------------

_DRIVER = r"""
import contextlib, io, json, os, sys
folder = os.path.realpath(sys.argv[1])
argvs = json.loads(sys.argv[2])
opens = []
real_open = os.open
def recording_open(path, flags, *args, **kwargs):
    try:
        real = os.path.realpath(os.fspath(path))
    except TypeError:
        real = None
    if real is not None and os.path.dirname(real) == folder:
        opens.append([real, flags])
    return real_open(path, flags, *args, **kwargs)
os.open = recording_open
import vhdx.cli
results = []
for argv in argvs:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = vhdx.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:
            code = "uncaught " + type(e).__name__ + ": " + str(e)
    results.append(dict(argv=argv, code=code, stdout=out.getvalue(), stderr=err.getvalue()))
json.dump(dict(results=results, opens=opens), sys.__stdout__)
"""


def run_driver(folder: Path, argvs: list[list[str]]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(folder), json.dumps(argvs)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"helper process failed: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def check_results(name: str, results: list[dict[str, Any]]) -> None:
    for r in results:
        what = f"vhdx {' '.join(r['argv'])} -> {r['code']}\n{r['stdout'][-1500:]}\n{r['stderr'][-1500:]}"
        assert r["code"] == expected_exit(name, r["argv"]), what
        assert "Traceback" not in r["stderr"], what
        if r["code"] != 0 and r["argv"][0] not in ("check", "chain"):
            lines = r["stderr"].splitlines()
            assert len(lines) == 1 and lines[0].startswith("vhdx: error:"), what
        if "--json" in r["argv"] and (r["code"] == 0 or r["argv"][0] in ("check", "chain")):
            json.loads(r["stdout"])          # --json prints JSON, findings or not


@pytest.mark.parametrize("name", _params())
def test_read_only_verbs_in_a_separate_process_leave_the_specimen_unchanged(
        name: str, specimen, file_sha256, tmp_path: Path) -> None:
    path = specimen(name)
    entry = _entry(name)
    before = _state(path, file_sha256)
    argvs = verbs(name, path, tmp_path, with_hash=not _big(entry))
    report = run_driver(path.parent, argvs)
    after = _state(path, file_sha256)
    assert after == before, f"{name} changed: before {before}, after {after}"
    assert before["sha256"] == entry["sha256_of_decompressed_vhdx"]
    check_results(name, report["results"])
    opened = [(p, flags) for p, flags in report["opens"] if p == os.path.realpath(path)]
    assert opened, "the helper saw no open(2) of the specimen: the flag check would prove nothing"
    writes = [(p, hex(flags)) for p, flags in report["opens"] if flags & WRITE_FLAGS]
    assert not writes, f"opened for writing: {writes}"

    if not entry["has_parent"]:
        mapped = json.loads(next(r for r in report["results"] if r["argv"][:2] == ["map", "--json"])["stdout"])
        assert_map_matches_manifest(entry, mapped["layers"][0])

    exported = tmp_path / f"{name}.raw"
    assert exported.stat().st_size == entry["virtual_size"]
    if not _big(entry):
        assert file_sha256(exported) == entry["sha256_of_virtual_disk"], "export differs from the manifest"
        hashed = json.loads(next(r for r in report["results"] if r["argv"][0] == "hash")["stdout"])
        assert hashed["sha256"] == entry["sha256_of_virtual_disk"]


@pytest.mark.slow
@pytest.mark.parametrize("name", _params(_big, slow=lambda e: True))
def test_hash_of_a_large_specimen_leaves_it_unchanged(name: str, specimen, file_sha256) -> None:
    path = specimen(name)
    entry = _entry(name)
    before = _state(path, file_sha256)
    extra = ["--missing-parent", "zeros"] if entry["has_parent"] else []
    report = run_driver(path.parent, [["hash", "--json", str(path), *extra]])
    assert _state(path, file_sha256) == before
    result = report["results"][0]
    assert result["code"] == 0, result
    assert json.loads(result["stdout"])["sha256"] == entry["sha256_of_virtual_disk"]
    assert not [f for _, f in report["opens"] if f & WRITE_FLAGS]


# --------------------------------------------------------------------------------------------
# 2. in this process, with the system calls wrapped
# --------------------------------------------------------------------------------------------

class Recorder:
    """Wraps os.open, open/io.open and the calls that change files; records those on ``folder``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
        self.folder = os.path.realpath(folder)
        self.opens: list[tuple[str, int]] = []
        self.modes: list[tuple[str, str]] = []
        self.changes: list[tuple[str, str]] = []
        self.outside: list[tuple[str, int]] = []
        real_os_open, real_open = os.open, builtins.open

        def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            real = self._inside(path)
            if real is not None:
                self.opens.append((real, flags))
            else:
                self.outside.append((os.fspath(path) if not isinstance(path, int) else str(path), flags))
            return real_os_open(path, flags, *args, **kwargs)

        def py_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            real = self._inside(file)
            if real is not None:
                self.modes.append((real, mode))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)
        for name in ("rename", "replace", "remove", "unlink", "truncate", "utime", "chmod", "link", "symlink"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._change(name, real))

    def _inside(self, path: Any) -> str | None:
        if isinstance(path, int):
            return None
        try:
            real = os.path.realpath(os.fspath(path))
        except TypeError:
            return None
        return real if os.path.dirname(real) == self.folder or real == self.folder else None

    def _change(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for a in args[:2]:
                inside = self._inside(a) if isinstance(a, (str, bytes, os.PathLike)) else None
                if inside is not None:
                    self.changes.append((name, inside))
            return real(*args, **kwargs)
        return wrapper

    def assert_read_only(self, what: str) -> None:
        writes = [(p, hex(f)) for p, f in self.opens if f & WRITE_FLAGS]
        assert not writes, f"{what}: opened for writing: {writes}"
        bad_modes = [(p, m) for p, m in self.modes if any(c in m for c in "wax+")]
        assert not bad_modes, f"{what}: open() with a writing mode: {bad_modes}"
        assert not self.changes, f"{what}: changed files in the specimen folder: {self.changes}"


@pytest.mark.parametrize("name", _params())
def test_read_only_verbs_open_specimens_with_o_rdonly(name: str, specimen, file_sha256, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = specimen(name)
    entry = _entry(name)
    before = _state(path, file_sha256)
    recorder = Recorder(monkeypatch, path.parent)
    for argv in verbs(name, path, tmp_path, with_hash=not _big(entry)):
        result = run_inprocess(*argv)
        assert result.returncode == expected_exit(name, argv), result.describe()
    monkeypatch.undo()
    recorder.assert_read_only(name)
    real = os.path.realpath(path)
    assert any(p == real for p, _ in recorder.opens), "os.open of the specimen was never seen"
    # the wrapper does see writes: the export output (a temporary file renamed into place when
    # complete) was opened O_WRONLY|O_CREAT|O_EXCL
    exports = [f for p, f in recorder.outside if os.path.basename(p).startswith(f".{name}.raw.")]
    assert exports and all(f & os.O_WRONLY and f & os.O_CREAT for f in exports), recorder.outside
    assert _state(path, file_sha256) == before


DIRTY = _params(lambda e: e["log_dirty"])


@pytest.mark.parametrize("name", DIRTY)
def test_a_dirty_log_is_replayed_in_memory_only(name: str, specimen, file_sha256) -> None:
    path = specimen(name)
    entry = _entry(name)
    assert entry["log_dirty"]
    before = _state(path, file_sha256)
    info = run_inprocess("info", "--json", path).json()
    assert info["log"]["dirty"] is True and info["log"]["replayed_in_memory"] is True, info["log"]
    assert info["log"]["replayed_entries"], "a dirty log with nothing replayed"
    check = run_inprocess("check", "--json", path)
    assert check.returncode == 0, check.describe()
    assert any("log" in f["message"] for f in json.loads(check.stdout)["findings"]), check.stdout
    # still dirty on disk: a second look sees the same un-replayed log
    again = run_inprocess("info", "--json", path).json()
    assert again["log"] == info["log"]
    assert again["headers"] == info["headers"]
    assert _state(path, file_sha256) == before


# --------------------------------------------------------------------------------------------
# 4. orphans over the whole specimen folder
# --------------------------------------------------------------------------------------------

def test_orphans_over_the_specimen_folder_changes_nothing(specimen, file_sha256, request: pytest.FixtureRequest,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if ENTRIES is None:
        unavailable("no specimens: the shared specimens folder was not found")
    runslow = request.config.getoption("--runslow")
    paths = [specimen(_short(e["file"])) for e in ENTRIES if runslow or not _is_lvm2(e)]
    folder = paths[0].parent
    before = {p.name: _state(p, file_sha256) for p in paths}

    report = run_driver(folder, [["orphans", str(folder)], ["orphans", "--json", str(folder)]])
    text, as_json = report["results"]
    assert text["code"] == 0 and as_json["code"] == 0, report["results"]
    orphan = next(_short(e["file"]) for e in ENTRIES if e["has_parent"])
    line = next(line for line in text["stdout"].splitlines() if orphan in line)
    assert "PARENT MISSING" in line, line
    assert json.loads(as_json["stdout"])
    assert not [f for _, f in report["opens"] if f & WRITE_FLAGS], report["opens"]
    assert len({p for p, _ in report["opens"]}) >= len(paths), "orphans did not open every specimen"

    recorder = Recorder(monkeypatch, folder)
    result = run_inprocess("orphans", folder)
    monkeypatch.undo()
    assert result.returncode == 0, result.describe()
    recorder.assert_read_only("orphans")
    after = {p.name: _state(p, file_sha256) for p in paths}
    assert after == before


def test_the_recorder_sees_a_write_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: opening a disk r+ in the watched folder is caught."""
    import vhdx

    path = tmp_path / "watched.vhdx"
    vhdx.create(path, 4 << 20, block_size=1 << 20).close()
    recorder = Recorder(monkeypatch, tmp_path)
    with vhdx.open(path, "r+") as disk:
        disk.write(b"x")
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="opened for writing"):
        recorder.assert_read_only("control")
    recorder.opens.clear()
    recorder.modes.append((str(path), "r+b"))
    with pytest.raises(AssertionError, match="writing mode"):
        recorder.assert_read_only("control")
