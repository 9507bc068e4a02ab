"""A parent locator at the format's size limits: 10,000 keys, or a value of the largest length a
locator can hold (65,535 bytes: its length field is 16 bits, so "a megabyte value" cannot be
stored). Each must be read, or refused with a VhdxError, within a second and 100 MiB, and no
read-only verb may change a byte of either file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

import vhdx
from vhdx.file.image import Image

MiB = 1 << 20
LIMIT_SECONDS = 1.0
LIMIT_BYTES = 100 * MiB


def digest(path: Path) -> tuple[str, int]:
    """SHA-256 and mtime of a file: both must stay as they were after a read-only verb."""
    return hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns


def make_child(tmp_path: Path, extra: dict[str, str]) -> tuple[Path, Path]:
    """A base with a checkpoint whose locator also carries ``extra`` keys."""
    base = tmp_path / "base.vhdx"
    with vhdx.create(base, 8 * MiB, block_size=MiB) as disk:
        disk.write(b"base data" * 100)
    child = Path(vhdx.snapshot(base))
    image = Image.open(child, "r+")
    try:
        pairs = dict(image.metadata.parent_locator or {})
        pairs.update(extra)
        image.write_parent_locator(pairs)
    finally:
        image.close()
    return base, child


CASES = {
    "10000-keys": {f"key{i:05d}": f"value {i}" for i in range(10_000)},
    "64K-value": {"huge": "v" * (0xFFFF // 2)},
    "64K-key": {"k" * (0xFFFF // 2): "x"},
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_locator_at_its_limits_is_read_in_time_and_nothing_changes(name: str, tmp_path: Path) -> None:
    base, child = make_child(tmp_path, CASES[name])
    before = {p: digest(p) for p in (base, child)}

    def read() -> list[str]:
        with vhdx.open(child) as disk:
            assert disk.read(900) == (b"base data" * 100)[:900]
        return [layer.linkage for layer in vhdx.chain(child).layers]

    t0 = time.monotonic()
    layers = read()
    elapsed = time.monotonic() - t0
    tracemalloc.start()  # a second pass for memory: tracemalloc slows every allocation down
    try:
        read()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{name}: open+read+chain {elapsed:.3f} s, peak {peak / MiB:.1f} MiB")
    assert layers == ["ok", "none"]
    assert elapsed < LIMIT_SECONDS and peak < LIMIT_BYTES
    for verb in (["info", "--json"], ["check"], ["chain"]):
        result = subprocess.run([sys.executable, "-m", "vhdx", *verb, str(child)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode in ((0, 2) if verb == ["check"] else (0, 1)), result
        assert "Traceback" not in result.stderr, result.stderr
    assert {p: digest(p) for p in (base, child)} == before
