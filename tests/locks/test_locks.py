"""Locks compatible with QEMU's image locking: shared for reading, exclusive for writing.

Each test runs the other party in a real second process (qemu-io, or a Python process that
holds a ``vhdx`` open until told to let go), because locks only keep *other* processes out.
Which bytes a process holds is read from ``/proc/locks`` (independent of our code), so a
test waits for the other party to really hold its lock before it tries anything.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vhdx
import vhdx.file.locks
from support.cli import REPO, assert_one_line_error
from support.cli import run_subprocess as run_cli
from support.disk import MiB, pattern, write_all

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OFD locks are Linux's")

QEMU_WRITER = {100, 101, 103, 201, 203}  # what qemu-io holds on an image open for writing
QEMU_READER = {100, 201, 203}

HOLDER = r"""
import sys, vhdx
disk = vhdx.open(sys.argv[1], sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
disk.close()
"""

PAUSED_MERGE = r"""
import sys, vhdx
paused = []
def progress(done, total):
    if not paused:
        paused.append(done)
        print("copying", flush=True)
        sys.stdin.readline()
result = vhdx.merge(sys.argv[1], progress=progress)
print("merged", result.bytes_copied, flush=True)
"""


# ------------------------------------------------------------------------------ helpers

def held_bytes(path: Path) -> set[int]:
    """Every byte of ``path`` that some process holds an OFD lock on, from /proc/locks."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts or "OFDLCK" not in parts or ident not in parts:
                continue
            i = parts.index(ident)
            start, end = int(parts[i + 1]), parts[i + 2]
            out.update(range(start, (int(end) if end != "EOF" else start) + 1))
    return out


def wait_for_bytes(path: Path, wanted: set[int], proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until some process holds every byte of ``wanted`` on ``path``."""
    deadline = time.monotonic() + timeout
    while not wanted <= held_bytes(path):
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited with {proc.returncode} before locking {path}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"{path}: {sorted(wanted)} never locked; held {sorted(held_bytes(path))}"
        time.sleep(0.02)


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_python(script: str, *args: str | os.PathLike[str]) -> subprocess.Popen:
    """A Python process running ``script``; returns once it printed its first line."""
    proc = subprocess.Popen([sys.executable, "-c", script, *map(os.fspath, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=python_env())
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise AssertionError(f"helper process failed: {proc.stderr.read()}")
    return proc


def finish(proc: subprocess.Popen) -> str:
    """Let a helper go on (one line on its stdin) and return the rest of its output."""
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    return out


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=30)


def qemu_holding(qemu_io: str, path: Path, *, read_only: bool = False) -> subprocess.Popen:
    """qemu-io with ``path`` open (for writing unless ``read_only``), holding it for a minute."""
    cmd = [qemu_io, "-f", "vhdx"] + (["-r"] if read_only else []) + ["-c", "sleep 60000", os.fspath(path)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_bytes(path, QEMU_READER if read_only else QEMU_WRITER, proc)
    return proc


def qemu_write(qemu_io: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([qemu_io, "-f", "vhdx", "-c", "write -q -P 0x5a 0 4096", os.fspath(path)],
                          capture_output=True, text=True, timeout=60)


def make_disk(path: Path, size: int = 8 * MiB) -> Path:
    with vhdx.create(path, size, block_size=MiB) as disk:
        write_all(disk, 0, pattern(1, 2 * MiB))
    return path


def file_state(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def make_chain(folder: Path, payload: int = 3 * MiB) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = make_disk(folder / "base.vhdx")
    child = Path(vhdx.snapshot(base))
    with vhdx.open(child, "r+") as disk:
        write_all(disk, MiB, pattern(2, payload))
    return base, child


# ------------------------------------------------------------------------------ against qemu-io

def test_vhdx_writer_keeps_qemu_out(tmp_path: Path, interop_tool) -> None:
    qemu_io = interop_tool("qemu-io")
    qemu_img = interop_tool("qemu-img")
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(path, "r+") as disk:
        print("held by vhdx r+:", sorted(held_bytes(path)))
        assert held_bytes(path) == QEMU_WRITER
        refused = qemu_write(qemu_io, path)
        assert refused.returncode != 0 and "lock" in refused.stderr, refused
        info = subprocess.run([qemu_img, "info", os.fspath(path)], capture_output=True, text=True, timeout=60)
        assert info.returncode != 0 and "lock" in info.stderr, info
        forced = subprocess.run([qemu_img, "info", "-U", os.fspath(path)], capture_output=True, text=True,
                                timeout=60)
        assert forced.returncode == 0, forced.stderr
        disk.seek(0)
        assert disk.read(4096) == pattern(1, 4096)
    assert held_bytes(path) == set()
    assert qemu_write(qemu_io, path).returncode == 0  # the refusal was the lock


def test_qemu_writer_keeps_vhdx_out_but_force_share_reads(tmp_path: Path, interop_tool) -> None:
    qemu_io = interop_tool("qemu-io")
    path = make_disk(tmp_path / "d.vhdx")
    want = run_cli("hash", path)
    assert want.returncode == 0, want.stderr
    qemu = qemu_holding(qemu_io, path)
    try:
        with pytest.raises(vhdx.VhdxError, match="locked: .* open for writing") as refused:
            vhdx.open(path, "r+")
        assert type(refused.value).__name__ == "LockedError"
        with pytest.raises(vhdx.VhdxError, match="force-share"):
            vhdx.open(path)
        line = assert_one_line_error(run_cli("hash", path), str(path), "locked", "--force-share")
        print(line)
        forced = run_cli("hash", "--force-share", path)
        assert forced.returncode == 0 and forced.stdout == want.stdout, forced.stderr
        for verb in ("info", "check", "chain", "map", "diff"):
            assert run_cli(verb, path).returncode != 0, verb
            result = run_cli(verb, "-U", path)
            assert result.returncode == 0 and "Traceback" not in result.stderr, (verb, result.stderr)
        with vhdx.open(path, share=True) as disk:
            assert disk.read(4096) == pattern(1, 4096)
        with pytest.raises(vhdx.UsageError):
            vhdx.open(path, "r+", share=True)
    finally:
        stop(qemu)
    with vhdx.open(path, "r+"):
        pass


def test_vhdx_reader_keeps_qemu_writer_out_and_changes_no_byte(tmp_path: Path, interop_tool) -> None:
    qemu_io = interop_tool("qemu-io")
    path = make_disk(tmp_path / "d.vhdx")
    before = file_state(path)
    with vhdx.open(path) as disk:
        assert held_bytes(path) == QEMU_READER
        assert qemu_write(qemu_io, path).returncode != 0
        disk.read()
        qemu_reader = qemu_holding(qemu_io, path, read_only=True)  # readers share with readers
        stop(qemu_reader)
    for verb in ("info", "check", "hash", "map"):
        assert run_cli(verb, path).returncode == 0, verb
    assert file_state(path) == before, "a read-only open changed the file"


# ------------------------------------------------------------------------------ vhdx against vhdx

def test_two_vhdx_writers_in_two_processes(tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    writer = start_python(HOLDER, path, "r+")
    try:
        with pytest.raises(vhdx.VhdxError, match="locked") as refused:
            vhdx.open(path, "r+")
        print(refused.value)
        assert isinstance(refused.value, vhdx.LockedError)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
        with pytest.raises(vhdx.LockedError):
            vhdx.open(path)
        assert_one_line_error(run_cli("snapshot", path), str(path), "locked")
        finish(writer)
    finally:
        stop(writer)
    reader = start_python(HOLDER, path, "r")
    try:
        with vhdx.open(path) as disk:  # readers share
            assert disk.read(4096) == pattern(1, 4096)
        with pytest.raises(vhdx.LockedError, match="does not share writing"):
            vhdx.open(path, "r+")
        finish(reader)
    finally:
        stop(reader)
    with vhdx.open(path, "r+"):
        pass


def test_parents_of_a_writable_child_are_locked_shared(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    writer = start_python(HOLDER, child, "r+")
    try:
        assert held_bytes(base) == QEMU_READER
        with vhdx.open(base) as disk:  # another reader of the parent is fine
            assert disk.read(4096) == pattern(1, 4096)
        with pytest.raises(vhdx.LockedError):
            vhdx.open(base, "r+")
        finish(writer)
    finally:
        stop(writer)


def test_one_process_shares_its_lock_and_downgrades(tmp_path: Path) -> None:
    path = make_disk(tmp_path / "d.vhdx")
    writer = vhdx.open(path, "r+")
    reader = vhdx.open(path)  # the same process: no conflict with itself
    assert held_bytes(path) == QEMU_WRITER
    writer.close()
    assert held_bytes(path) == QEMU_READER
    other = start_python(HOLDER, path, "r")
    finish(other)
    reader.close()
    assert held_bytes(path) == set()


def test_close_unlocks_while_the_bat_stays_mapped(tmp_path: Path) -> None:
    """The BAT's private map holds the open file description the locks belong to: close must
    unlock the bytes itself, or they would stay held until the map is gone."""
    path = make_disk(tmp_path / "d.vhdx")
    disk = vhdx.open(path)
    bat = disk.image.bat  # keeps the map (and with it the file description) alive
    assert held_bytes(path) == QEMU_READER
    disk.close()
    assert held_bytes(path) == set()
    finish(start_python(HOLDER, path, "r+"))  # and a writer in another process gets in
    assert int(bat[0]) >= 0


def test_a_forked_child_closing_its_copy_leaves_our_locks(tmp_path: Path) -> None:
    """A forked child shares our lock's file description: its close must not unlock our bytes."""
    path = make_disk(tmp_path / "d.vhdx")
    with vhdx.open(path, "r+") as disk:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                disk.image.storage.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert held_bytes(path) == QEMU_WRITER
    assert held_bytes(path) == set()


def test_no_lock_support_opens_unlocked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_disk(tmp_path / "d.vhdx")

    def no_locks(fd: int, cmd: int, kind: int, offset: int) -> int:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(vhdx.file.locks, "_fcntl_byte", no_locks)
    with vhdx.open(path) as disk:
        assert disk.read(4096) == pattern(1, 4096)
    with vhdx.open(path, "r+"):
        assert held_bytes(path) == set()


# ------------------------------------------------------------------------------ merges

def test_two_merges_of_one_chain_at_once(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path / "a")
    ref_base, ref_child = make_chain(tmp_path / "ref")
    size_before = os.path.getsize(base)
    vhdx.merge(ref_child)
    first = start_python(PAUSED_MERGE, child)
    try:
        second = run_cli("merge", child)
        print(assert_one_line_error(second, "locked"))
        assert held_bytes(child) >= QEMU_WRITER and held_bytes(base) >= QEMU_WRITER
        out = finish(first)
    finally:
        stop(first)
    print(out.strip(), "| base grew by", os.path.getsize(base) - size_before)
    assert out.split()[-1] == str(3 * MiB)
    assert not child.exists()
    assert os.path.getsize(base) == os.path.getsize(ref_base), "the payload was copied twice"
    with vhdx.open(base) as a, vhdx.open(ref_base) as b:
        assert a.read() == b.read()


def test_readers_during_a_merge(tmp_path: Path, interop_tool) -> None:
    qemu_img = interop_tool("qemu-img")
    base, child = make_chain(tmp_path)
    want = run_cli("hash", child).stdout.split()[0]
    merging = start_python(PAUSED_MERGE, child)
    try:
        assert_one_line_error(run_cli("hash", child), str(child), "locked", "--force-share")
        assert_one_line_error(run_cli("info", base), str(base), "locked")
        qemu = subprocess.run([qemu_img, "info", os.fspath(base)], capture_output=True, text=True, timeout=60)
        assert qemu.returncode != 0 and "lock" in qemu.stderr, qemu
        forced = run_cli("hash", "-U", child)
        assert forced.returncode == 0 and forced.stdout.split()[0] == want, forced.stderr
        finish(merging)
    finally:
        stop(merging)
    assert run_cli("hash", base).stdout.split()[0] == want


# ------------------------------------------------------------------------------ folder scans

def test_orphans_reads_a_disk_in_use_without_failing(tmp_path: Path) -> None:
    base, child = make_chain(tmp_path)
    writer = start_python(HOLDER, child, "r+")
    try:
        result = run_cli("orphans", tmp_path)
        assert result.returncode == 0, result.stderr
        print(result.stdout)
        assert "IN USE" in result.stdout and "unreadable" not in result.stdout
        assert "vhdx merge" not in result.stdout  # never offer to merge a chain a process writes
        forest = vhdx.find_chains(tmp_path)
        assert forest.nodes[str(child)].in_use and forest.nodes[str(child)].parent == str(base)
        finish(writer)
    finally:
        stop(writer)


def test_two_merges_started_at_the_same_moment(tmp_path: Path) -> None:
    ref_base, ref_child = make_chain(tmp_path / "ref")
    vhdx.merge(ref_child)
    outcomes = []
    for round_ in range(3):
        base, child = make_chain(tmp_path / str(round_))
        cmd = [sys.executable, "-m", "vhdx", "merge", os.fspath(child)]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=python_env()) for _ in range(2)]
        results = [(p.wait(120), *p.communicate()) for p in procs]
        for rc, out, err in results:
            assert "Traceback" not in err and "cleanup stopped" not in err, err
            assert rc == 0 or "locked" in err, err
        merged = sum(1 for rc, out, _ in results if rc == 0 and out.startswith("merged"))
        outcomes.append(merged)
        assert merged <= 1, results
        if merged:
            assert not child.exists()
            assert os.path.getsize(base) == os.path.getsize(ref_base), "the payload was copied twice"
        with vhdx.open(child if child.exists() else base) as a, vhdx.open(ref_base) as b:
            assert a.read() == b.read()
    print("merges that ran per round:", outcomes)
