"""Scratch folders on a RAM file system: the fault and merge tests make hundreds of small copies
and merges, which should not wait for real ``fdatasync`` calls (their simulated power losses do
not depend on them). ``VHDX_TEST_TMP`` chooses another place; ``VHDX_TEST_TMP=disk`` (or no
writable ``/dev/shm`` with 2 GiB free) uses pytest's ``tmp_path``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

MIN_FREE = 2 << 30


def ram_dir() -> str | None:
    """Where RAM-backed scratch folders go, or None for pytest's own ``tmp_path``."""
    choice = os.environ.get("VHDX_TEST_TMP") or os.environ.get("VHDX_MERGE_TMP")
    if choice == "disk":
        return None
    if choice:
        return choice
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > MIN_FREE:
            return shm
    except OSError:
        pass
    return None


def scratch_folder(tmp_path: Path, prefix: str) -> Iterator[Path]:
    """Yield a fresh folder on the RAM file system (else ``tmp_path``); removed afterwards."""
    base = ram_dir()
    if base is None:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
