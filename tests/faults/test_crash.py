"""Power loss at every write and flush: the file must always reopen with each byte old or new.

A :class:`support.faults.FaultyStorage` wraps the real file and counts its mutating calls (write, truncate,
flush). A counting run of a workload learns their number K; then, for every N in 1..K, the
workload runs again on a fresh copy with the power failing at the N-th call. After the
fault the storage refuses everything, so the Disk cannot close cleanly. The copy is then:

* opened read-only (any log replayed in memory; the file must not change), and every byte
  of the virtual disk compared with the model: it must hold either its value at the last
  completed ``Disk.flush()`` or a value that one of the writes issued after it wrote there
  (byte-granular: a write need not be all-old or all-new);
* opened "r+" (log replayed in place), read again (same bytes as read-only), closed,
  reopened read-only (same bytes again);
* judged by ``vhdx check`` (exit 0) before and after the replay and, for 512-byte sectors,
  by ``qemu-img check`` after it.

In the drop-unflushed variant, the power loss also loses a random subset of the 4 KiB
pages written since the last flush (each page independently), which is what a volatile
disk cache may do (docs/format.md §7.4, §8.7: data is flushed before the log entry that
points at it, the log entry before it is applied).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from conftest import have
from support.cli import run_inprocess
from support.disk import MiB, write_all
from support.disk import read_all as read_disk
from support.faults import FaultyStorage, PowerLoss
from support.needs import unavailable

import vhdx
from vhdx.file.storage import FileStorage  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# ------------------------------------------------------------------ scenarios and the model

@dataclass
class Scenario:
    name: str
    logical_sector_size: int = 512
    fixed: bool = False
    maker: str = "ours"           # "ours" (vhdx.create), "qemu" (qemu-img/qemu-io) or "child" (a
                                  # differencing child of an ours-made parent.vhdx beside it)
    unaligned_tail: bool = False  # cut the file 4 KiB short, inside its last payload block: a
                                  # tolerated quirk of old QEMU files (docs/format.md §6, pitfall 9)
    size: int = 8 * MiB
    block_size: int = MiB

    @property
    def judge_with_qemu(self) -> bool:
        return self.logical_sector_size == 512 and self.maker != "child"   # QEMU cannot read children


def _rand(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(1, 256, size=n, dtype=np.uint8).tobytes()


def initial_writes(sc: Scenario, rng) -> list[tuple[int, bytes]]:
    s = sc.logical_sector_size
    return [(0, _rand(rng, sc.block_size)),                         # block 0 full
            (2 * MiB, _rand(rng, sc.block_size // 2)),              # block 2 first half
            (5 * MiB + 100 * s, _rand(rng, 8 * s))]                 # block 5 a few sectors


def workload(sc: Scenario, rng) -> list[tuple]:
    """The run under test: new blocks, rewrites, partial, unaligned, across block boundaries."""
    s = sc.logical_sector_size
    size = sc.size
    return [
        ("write", 1 * MiB, _rand(rng, MiB)),                     # new full block
        ("write", 4096, _rand(rng, 8192)),                       # rewrite inside block 0
        ("write", 3 * MiB + 64 * 1024, _rand(rng, 25 * 4096)),   # partial new block 3
        ("flush",),
        ("write", 2 * MiB + 777, _rand(rng, 5000)),              # unaligned, inside half-written block 2
        ("write", 4 * MiB - 3 * s, _rand(rng, 10 * s)),          # across blocks 3|4, 4 is new
        ("write", 6 * MiB - s, _rand(rng, MiB + 2 * s)),         # across 5|6|7
        ("write", size - s, _rand(rng, s)),                      # the last sector
        ("flush",),
        ("write", 1 * MiB, _rand(rng, MiB)),                     # rewrite a whole block
        ("write", 7 * MiB + 100, _rand(rng, 1)),                 # one byte, unaligned
        ("write", 2 * MiB - 10, _rand(rng, 20)),                 # unaligned across 1|2
        ("close",),
    ]


def make_base(sc: Scenario, path: Path, rng) -> None:
    if sc.maker == "qemu":
        if not (have("qemu-img") and have("qemu-io")):
            unavailable("qemu-img/qemu-io not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "vhdx", "-o",
                        f"block_size={sc.block_size},subformat={'fixed' if sc.fixed else 'dynamic'}",
                        str(path), str(sc.size)], check=True)
        pattern = path.with_suffix(".pat")
        for offset, data in initial_writes(sc, rng):
            pattern.write_bytes(data)
            subprocess.run(["qemu-io", "-f", "vhdx", "-c", f"write -q -s {pattern} {offset} {len(data)}",
                            str(path)], check=True)
        pattern.unlink()
    elif sc.maker == "child":
        # Parent holds the initial data; the child gets a little of its own (partial block 5).
        parent = path.parent / "parent.vhdx"
        writes = initial_writes(sc, rng)
        with vhdx.create(str(parent), sc.size, block_size=sc.block_size,
                         logical_sector_size=sc.logical_sector_size) as disk:
            for offset, data in writes[:2]:
                disk.seek(offset)
                assert disk.write(data) == len(data)
        with vhdx.create(str(path), parent=str(parent), block_size=sc.block_size) as disk:
            offset, data = writes[2]
            disk.seek(offset)
            assert disk.write(data) == len(data)
    else:
        with vhdx.create(str(path), sc.size, block_size=sc.block_size,
                         logical_sector_size=sc.logical_sector_size, fixed=sc.fixed) as disk:
            for offset, data in initial_writes(sc, rng):
                write_all(disk, offset, data)
    if sc.unaligned_tail:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4096)


def read_all(disk) -> np.ndarray:
    """Every byte of the virtual disk, as a writable numpy array."""
    return np.frombuffer(bytearray(read_disk(disk, check_end=False)), dtype=np.uint8)


@dataclass
class Run:
    """What happened in one run of the workload."""
    failed_at_op: int | None = None     # index into the ops (-1: during open), None: completed
    last_flush_op: int = -1             # index of the last Disk.flush()/close that returned
    error: BaseException | None = None
    calls: int = 0
    history: list = field(default_factory=list)


def run_workload(path: Path, ops: list[tuple], fail_at: int | None, *, drop: bool = False,
                 seed: int = 0) -> Run:
    storage = FaultyStorage(FileStorage(str(path), writable=True, durable=False), fail_at,
                            drop_unflushed=drop, seed=seed)
    run = Run()
    step = -1
    disk = None
    try:
        disk = vhdx.open(str(path), "r+", storage=storage)
        for step, op in enumerate(ops):
            if op[0] == "write":
                write_all(disk, op[1], op[2])
            elif op[0] == "flush":
                disk.flush()
                run.last_flush_op = step
            elif op[0] == "close":
                disk.close()
                run.last_flush_op = step
        step = None
    except (PowerLoss, vhdx.VhdxError) as e:
        run.error = e
        run.failed_at_op = step
    finally:
        run.calls, run.history = storage.calls, storage.history
        storage.inner.close()
        del disk            # its close() can only fail now; that is the point
    return run


def allowed_mismatch(actual: np.ndarray, base: np.ndarray, ops: list[tuple], run: Run) -> np.ndarray:
    """Bytes that are neither the value at the last completed flush nor a later write's value."""
    checkpoint = base.copy()
    for op in ops[:run.last_flush_op + 1]:
        if op[0] == "write":
            checkpoint[op[1]:op[1] + len(op[2])] = np.frombuffer(op[2], np.uint8)
    bad = actual != checkpoint
    last = len(ops) - 1 if run.failed_at_op is None else run.failed_at_op
    for op in ops[run.last_flush_op + 1:last + 1]:
        if op[0] == "write":
            seg = slice(op[1], op[1] + len(op[2]))
            bad[seg] &= actual[seg] != np.frombuffer(op[2], np.uint8)
    return bad


LEAKS_ONLY = 3  # vhdx check, as qemu-img check: space a crash left unreferenced while the file grew


def cli_check(path: Path) -> tuple[int, str]:
    """``vhdx check PATH`` in-process: (exit code, stdout + stderr)."""
    result = run_inprocess("check", path)
    return result.returncode, result.stdout + result.stderr


def qemu_check(path: Path) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", "check", "-f", "vhdx", str(path)], capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


@dataclass
class Judges:
    """Exit codes of the checkers on the base file: after a crash each must give 0 or that code
    (a writable open may legitimately repair a short tail by extending the file)."""
    vhdx_rc: int = 0
    qemu_rc: int | None = None      # None: qemu-img is not a judge here


def verify_after_crash(path: Path, base: np.ndarray, ops: list[tuple], run: Run, judges: Judges) -> list[str]:
    """Every check after one crash; returns problems (empty if fine)."""
    problems = []
    os.utime(path, ns=(1, 1))           # any write now moves mtime away from 1 ns
    before = (os.stat(path).st_size, 1)
    try:
        with vhdx.open(str(path)) as disk:
            ro = read_all(disk)
    except Exception as e:
        return [f"read-only reopen failed: {type(e).__name__}: {e}"]
    stat = os.stat(path)
    if (stat.st_size, stat.st_mtime_ns) != before:
        problems.append("read-only reopen changed the file (size or mtime)")
    bad = allowed_mismatch(ro, base, ops, run)
    if bad.any():
        where = np.flatnonzero(bad)
        problems.append(f"{len(where)} bytes neither old nor new, first at virtual 0x{where[0]:x} "
                        f"(read 0x{ro[where[0]]:02x})")
    rc, text = cli_check(path)          # the crashed file as found: a dirty log is normal here
    if rc not in (0, LEAKS_ONLY, judges.vhdx_rc):
        problems.append(f"vhdx check before replay exit {rc} (base file: {judges.vhdx_rc}): {text.strip()[:300]}")
    try:
        # durable=False: fdatasync would only cost time here; durability is FaultyStorage's job
        with vhdx.open(str(path), "r+", storage=FileStorage(str(path), writable=True, durable=False)) as disk:
            rw = read_all(disk)
        with vhdx.open(str(path)) as disk:
            again = read_all(disk)
    except Exception as e:
        problems.append(f"read-write reopen failed: {type(e).__name__}: {e}")
        return problems
    if not np.array_equal(rw, ro):
        problems.append(f"r+ (replayed in place) reads differently from read-only (replayed in memory) "
                        f"at virtual 0x{np.flatnonzero(rw != ro)[0]:x}")
    if not np.array_equal(again, rw):
        problems.append("contents changed across a clean r+ close")
    rc, text = cli_check(path)
    if rc not in (0, LEAKS_ONLY, judges.vhdx_rc):
        problems.append(f"vhdx check exit {rc} (base file: {judges.vhdx_rc}): {text.strip()[:300]}")
    if judges.qemu_rc is not None:
        rc, text = qemu_check(path)
        if rc not in (0, judges.qemu_rc):
            problems.append(f"qemu-img check exit {rc} (base file: {judges.qemu_rc}): {text.strip()[:300]}")
    return problems


SCENARIOS = [
    Scenario("dynamic-512"),
    Scenario("fixed-512", fixed=True),
    Scenario("dynamic-4096", logical_sector_size=4096),
    Scenario("fixed-4096", logical_sector_size=4096, fixed=True),
    Scenario("qemu-dynamic-512", maker="qemu"),
    Scenario("qemu-dynamic-512-short-tail", maker="qemu", unaligned_tail=True),
    # Partial writes to NOT_PRESENT blocks make PARTIALLY_PRESENT blocks: one log entry then
    # carries the payload BAT page, the sector-bitmap BAT page (index 4096: another page) and
    # the bitmap page itself (docs/format.md §7.3, §7.4).
    Scenario("child-512", maker="child"),
    Scenario("child-4096", maker="child", logical_sector_size=4096),
]

# Two by default, to keep the file near a minute; VHDX_FAULTS_FULL=1 adds the others.
DROP_SCENARIOS = [("dynamic-512", 1), ("child-512", 4)]
if os.environ.get("VHDX_FAULTS_FULL"):
    DROP_SCENARIOS += [("dynamic-4096", 2), ("qemu-dynamic-512", 3), ("child-4096", 5), ("fixed-512", 6)]


def crash_everywhere(sc: Scenario, tmp_path: Path, *, drop: bool = False, seed: int = 0) -> None:
    rng = np.random.default_rng(1234)
    ext = ".avhdx" if sc.maker == "child" else ".vhdx"
    original = tmp_path / f"original{ext}"
    make_base(sc, original, rng)
    ops = workload(sc, rng)
    with vhdx.open(str(original)) as disk:
        base = read_all(disk).copy()
    judges = Judges(cli_check(original)[0],
                    qemu_check(original)[0] if sc.judge_with_qemu and have("qemu-img") else None)
    if not sc.unaligned_tail:
        assert judges.vhdx_rc == 0 and judges.qemu_rc in (0, None), f"base file fails its checks: {judges}"

    counting = tmp_path / f"counting{ext}"
    shutil.copyfile(original, counting)
    full = run_workload(counting, ops, None)
    assert full.error is None, f"the workload fails without any fault: {type(full.error).__name__}: {full.error}"
    with vhdx.open(str(counting)) as disk:
        final = read_all(disk)
    assert not allowed_mismatch(final, base, ops, full).any(), "the workload without faults reads back wrong"
    K = full.calls
    assert K > 0

    failures = []
    copy = tmp_path / f"crash{ext}"
    for n in range(1, K + 1):
        shutil.copyfile(original, copy)
        run = run_workload(copy, ops, n, drop=drop, seed=seed * 100003 + n)
        if not isinstance(run.error, PowerLoss) and not (
                isinstance(run.error, vhdx.VhdxError) and isinstance(run.error.__cause__, PowerLoss)):
            failures.append(f"N={n}/{K} ({full.history[n - 1]}): expected the power loss to propagate, "
                            f"got {type(run.error).__name__}: {run.error}")
            continue
        problems = verify_after_crash(copy, base, ops, run, judges)
        if problems:
            failures.append(f"N={n}/{K} ({full.history[n - 1]}, during op "
                            f"{'open' if run.failed_at_op == -1 else run.failed_at_op}): " + "; ".join(problems))
    assert not failures, f"{len(failures)} of {K} crash points failed:\n" + "\n".join(failures[:15])


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_power_loss_at_every_write_and_flush_leaves_old_or_new_bytes(sc, tmp_path):
    crash_everywhere(sc, tmp_path)


@pytest.mark.parametrize("name,seed", DROP_SCENARIOS, ids=[f"{n}-seed{s}" for n, s in DROP_SCENARIOS])
def test_power_loss_losing_unflushed_pages_leaves_old_or_new_bytes(name, seed, tmp_path):
    sc = next(s for s in SCENARIOS if s.name == name)
    crash_everywhere(sc, tmp_path, drop=True, seed=seed)


def test_faulty_storage_counts_and_refuses_after_power_loss(tmp_path):
    """The wrapper itself: fails exactly at N, then refuses reads and writes alike."""
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(8192))
    s = FaultyStorage(FileStorage(str(p), writable=True, durable=False), 3)
    s.write(b"a", 0)
    s.flush()
    with pytest.raises(PowerLoss):
        s.write(b"b", 1)
    with pytest.raises(PowerLoss):
        s.read(0, 1)
    with pytest.raises(PowerLoss):
        s.flush()
    assert p.read_bytes()[:2] == b"a\0"


def test_drop_unflushed_restores_flushed_state_or_new_pages(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"\x11" * 16384)
    for seed in range(20):
        p.write_bytes(b"\x11" * 16384)
        s = FaultyStorage(FileStorage(str(p), writable=True, durable=False), 4,
                          drop_unflushed=True, seed=seed)
        s.write(b"\x22" * 4096, 0)
        s.flush()
        s.write(b"\x33" * 8192, 4096)
        with pytest.raises(PowerLoss):
            s.truncate(32768)
        data = p.read_bytes()
        assert data[:4096] == b"\x22" * 4096                       # flushed: kept
        for page in (data[4096:8192], data[8192:12288]):
            assert page in (b"\x11" * 4096, b"\x33" * 4096)        # unflushed: old or new
        assert len(data) in (16384, 32768)


# ------------------------------------------------------------------ power loss during log replay

def _is_dirty(path: Path) -> bool:
    import vhdxbits as vb
    try:
        layout = vb.parse_layout(bytearray(path.read_bytes()[:8 * MiB]))
    except Exception:   # noqa: BLE001 - an unparseable file is judged elsewhere
        return False
    return layout.header_fields["log_guid"].int != 0


def open_close(path: Path, fail_at: int | None, *, drop: bool = False, seed: int = 0) -> FaultyStorage:
    storage = FaultyStorage(FileStorage(str(path), writable=True, durable=False), fail_at,
                            drop_unflushed=drop, seed=seed)
    disk = None
    try:
        disk = vhdx.open(str(path), "r+", storage=storage)
        disk.close()
    except (PowerLoss, vhdx.VhdxError):
        pass
    finally:
        storage.inner.close()
        del disk
    return storage


@pytest.mark.parametrize("name,drop", [("dynamic-512", False), ("child-512", False), ("dynamic-4096", True)],
                         ids=["dynamic-512", "child-512", "dynamic-4096-drop-unflushed"])
def test_power_loss_during_log_replay_is_harmless(name, drop, tmp_path):
    """A crash leaves a dirty log; a second crash in the middle of replaying it (open "r+")
    must leave a file that still reads exactly as the first replay would have (§8.5: replay is
    repeatable; the FileWriteGuid changes before it and LogGuid is cleared only after it)."""
    sc = next(s for s in SCENARIOS if s.name == name)
    rng = np.random.default_rng(1234)
    ext = ".avhdx" if sc.maker == "child" else ".vhdx"
    original = tmp_path / f"original{ext}"
    make_base(sc, original, rng)
    ops = workload(sc, rng)
    counting = tmp_path / f"counting{ext}"
    shutil.copyfile(original, counting)
    K = run_workload(counting, ops, None).calls

    # Dirty files: crash the workload at points that leave LogGuid set (a few, spread out).
    dirty_files = []
    for n in range(1, K + 1):
        candidate = tmp_path / f"dirty-{n}{ext}"
        shutil.copyfile(original, candidate)
        run_workload(candidate, ops, n)
        if _is_dirty(candidate):
            dirty_files.append(candidate)
        else:
            candidate.unlink()
    assert dirty_files, "no crash point left a dirty log: the workload never used the log?"
    step = max(1, len(dirty_files) // 4)
    dirty_files = dirty_files[::step][:4]

    failures = []
    for dirty in dirty_files:
        with vhdx.open(str(dirty)) as disk:
            expected = read_all(disk).copy()          # what the in-memory replay shows
        probe = tmp_path / f"probe{ext}"
        shutil.copyfile(dirty, probe)
        M = open_close(probe, None).calls
        for m in range(1, M + 1):
            shutil.copyfile(dirty, probe)
            storage = open_close(probe, m, drop=drop, seed=m)
            try:
                with vhdx.open(str(probe)) as disk:
                    ro = read_all(disk)
                with vhdx.open(str(probe), "r+", storage=FileStorage(str(probe), writable=True, durable=False)) as disk:
                    rw = read_all(disk)
            except Exception as e:  # noqa: BLE001 - collected and reported below
                failures.append(f"{dirty.name} M={m}/{M} ({storage.history[-1] if storage.history else '?'}): "
                                f"reopen failed: {type(e).__name__}: {e}")
                continue
            if not np.array_equal(ro, expected) or not np.array_equal(rw, expected):
                bad = np.flatnonzero((ro != expected) | (rw != expected))
                failures.append(f"{dirty.name} M={m}/{M} ({storage.history[-1]}): {len(bad)} bytes differ "
                                f"from the first replay, first at virtual 0x{bad[0]:x}")
            rc, text = cli_check(probe)
            if rc not in (0, LEAKS_ONLY):
                failures.append(f"{dirty.name} M={m}/{M}: vhdx check exit {rc}: {text.strip()[:200]}")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:15])
