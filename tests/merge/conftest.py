"""Fixtures of the merge tests.

``fast_tmp``: a scratch folder on a RAM file system (``/dev/shm``) when there is one, so the
hundreds of merges of the crash tests do not wait for real ``fdatasync`` calls (the simulated power
loss does not depend on them). ``VHDX_MERGE_TMP`` chooses another place; ``VHDX_MERGE_TMP=disk``
uses pytest's ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_MIN_FREE = 2 << 30


def _ram_dir() -> str | None:
    choice = os.environ.get("VHDX_MERGE_TMP")
    if choice == "disk":
        return None
    if choice:
        return choice
    shm = "/dev/shm"
    try:
        if os.path.isdir(shm) and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > _MIN_FREE:
            return shm
    except OSError:
        pass
    return None


@pytest.fixture
def fast_tmp(tmp_path: Path):
    base = _ram_dir()
    if base is None:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="vhdx-merge-", dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
