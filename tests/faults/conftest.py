"""Shared helpers for the fault tests: small base disks and a guarded way to exercise one file.

Base disks come from two independent makers: ``qemu-img``/``qemu-io`` (512-byte sectors) and
our own ``vhdx.create`` (4096-byte sectors, which qemu-img cannot make). Tests that need a
maker that is missing are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from support.disk import MiB, sha256_file  # noqa: E402
from support.scratch import scratch_folder  # noqa: E402
from support.disk import nonzero_pattern as _pattern  # noqa: E402
from support.needs import unavailable

__all__ = ["MiB", "sha256_file"]
# Per-case limits (docs/format.md §1.3 bounds every structure; nothing should need more).
CASE_SECONDS = float(os.environ.get("VHDX_FAULT_CASE_SECONDS", "2.0"))
CASE_PEAK_BYTES = int(os.environ.get("VHDX_FAULT_PEAK_MB", "64")) * MiB
WHOLE_READ_LIMIT = 64 * MiB     # read every byte of disks up to this size, sample larger ones


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so that ``except Exception`` cannot swallow it."""


def _alarm(signum, frame):
    raise CaseTimeout(f"case still running after {CASE_SECONDS * 5:.0f} s")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def mark_unwritten(path) -> tuple[int, int]:
    """Set mtime to 1 ns so that any later write shows (cheaper than hashing the file)."""
    os.utime(path, ns=(1, 1))
    return os.stat(path).st_size, 1


def stamp_of(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def read_disk(disk, *, sample_seed: int = 0) -> tuple[str, int]:
    """Read the virtual disk through ``readinto`` into one reused buffer; return (sha256, size).

    Disks up to WHOLE_READ_LIMIT are read entirely; larger (hostile sizes) are sampled:
    the first and last MiB and a few spots in between.
    """
    size = disk.size
    buf = bytearray(MiB)
    view = memoryview(buf)
    h = hashlib.sha256()

    def read_at(pos: int, length: int) -> None:
        disk.seek(pos)
        got = 0
        while got < length:
            n = disk.readinto(view[:min(length - got, MiB)])
            if not n:
                raise AssertionError(f"readinto returned {n!r} at {pos + got:#x} of a {size:#x}-byte disk")
            h.update(view[:n])
            got += n

    if size <= WHOLE_READ_LIMIT:
        read_at(0, size)
    else:
        rng = random.Random(sample_seed)
        spots = [0, size - MiB] + [rng.randrange(0, size - 65536) & ~4095 for _ in range(8)]
        for pos in spots:
            read_at(pos, min(MiB, size - pos) if pos in (0, size - MiB) else 65536)
    disk.seek(size)
    tail = disk.read(16)
    if tail not in (b"",):
        raise AssertionError(f"read at the virtual size returned {tail!r}, expected b''")
    return h.hexdigest(), size


class Guard:
    """Time, memory and address-space limits around one hostile case."""

    def __init__(self, seconds: float = CASE_SECONDS, peak: int = CASE_PEAK_BYTES):
        self.seconds = seconds
        self.peak_limit = peak
        self.elapsed = 0.0
        self.peak = 0

    def __enter__(self):
        self._old_handler = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds * 5)
        tracemalloc.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.elapsed = time.perf_counter() - self._t0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old_handler)
        _, self.peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return False

    def verdict(self) -> list[str]:
        problems = []
        if self.elapsed > self.seconds:
            problems.append(f"took {self.elapsed:.2f} s (limit {self.seconds} s)")
        if self.peak > self.peak_limit:
            problems.append(f"Python allocations peaked at {self.peak / MiB:.1f} MiB "
                            f"(limit {self.peak_limit / MiB:.0f} MiB)")
        return problems


@pytest.fixture(scope="module", autouse=True)
def _address_space_limit():
    """Cap the address space so a length taken from a hostile file fails as MemoryError
    instead of taking the machine down. Restored after each module."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(os.environ.get("VHDX_FAULT_AS_GB", "6")) << 30
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def scratch(tmp_path: Path):
    """A scratch folder on a RAM file system (see support.scratch): hundreds of small copies."""
    yield from scratch_folder(tmp_path, "vhdx-faults-")



# ------------------------------------------------------------------ base disks

def make_qemu_disk(path: Path, *, fixed: bool = False, size: str = "8M", block: str = "1M") -> Path:
    """An 8 MiB qemu-img VHDX with data in block 0, 1 and part of 5 (random, no zero bytes)."""
    if not (have("qemu-img") and have("qemu-io")):
        unavailable("qemu-img/qemu-io not installed")
    run(["qemu-img", "create", "-q", "-f", "vhdx", "-o",
         f"block_size={block},subformat={'fixed' if fixed else 'dynamic'}", str(path), size])
    src = path.with_suffix(".pattern")
    src.write_bytes(_pattern(7, 1536 * 1024))
    run(["qemu-io", "-f", "vhdx", "-c", f"write -q -s {src} 0 1536k",
         "-c", f"write -q -s {src} 5248k 64k", str(path)])
    src.unlink()
    return path


def make_our_disk(path: Path, *, logical_sector_size: int = 4096, fixed: bool = False) -> Path:
    import vhdx
    with vhdx.create(str(path), 8 * MiB, block_size=MiB, logical_sector_size=logical_sector_size,
                     physical_sector_size=4096, fixed=fixed) as disk:
        disk.seek(0)
        disk.write(_pattern(11, 1536 * 1024))
        disk.seek(5 * MiB + 128 * 1024)
        disk.write(_pattern(12, 64 * 1024))
    return path


PARENT_NAME = "parent.vhdx"


def make_our_child(path: Path) -> Path:
    """A differencing child (512-byte sectors, 1 MiB blocks) of ``parent.vhdx`` in the same folder:
    the parent holds the first pattern, the child the second, as in make_our_disk."""
    import vhdx
    parent = path.parent / PARENT_NAME
    with vhdx.create(str(parent), 8 * MiB, block_size=MiB, logical_sector_size=512,
                     physical_sector_size=4096) as disk:
        disk.write(_pattern(11, 1536 * 1024))
    with vhdx.create(str(path), parent=str(parent), block_size=MiB) as disk:
        disk.seek(5 * MiB + 128 * 1024)
        disk.write(_pattern(12, 64 * 1024))
    return path


def _expected_virtual(name: str) -> bytes:
    """What the base disk's virtual bytes are, from what its maker was told to write."""
    model = bytearray(8 * MiB)
    if name.startswith("qemu"):
        pat = _pattern(7, 1536 * 1024)
        model[0:len(pat)] = pat
        model[5248 * 1024:5312 * 1024] = pat[:64 * 1024]     # qemu-io -s repeats the file from its start
    else:
        model[0:1536 * 1024] = _pattern(11, 1536 * 1024)
        model[5 * MiB + 128 * 1024:5 * MiB + 192 * 1024] = _pattern(12, 64 * 1024)
    return bytes(model)


@pytest.fixture(scope="session")
def base_disks(tmp_path_factory):
    """name -> (file bytes, virtual bytes) of a small valid disk; built lazily, once per session."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict[str, tuple[bytes, bytes]] = {}
    makers = {
        "qemu512": lambda p: make_qemu_disk(p),
        "qemufixed": lambda p: make_qemu_disk(p, fixed=True),
        "ours4k": lambda p: make_our_disk(p, logical_sector_size=4096),
        "ours512": lambda p: make_our_disk(p, logical_sector_size=512),
        "child": make_our_child,
    }

    def get(name: str) -> tuple[bytes, bytes]:
        if name not in cache:
            p = root / f"{name}.vhdx"
            makers[name](p)
            cache[name] = (p.read_bytes(), _expected_virtual(name))
            if name == "child":
                cache["child:parent"] = ((root / PARENT_NAME).read_bytes(), b"")
        return cache[name]

    return get
