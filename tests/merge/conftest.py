"""Fixtures of the merge tests.

``fast_tmp``: a scratch folder on a RAM file system (``/dev/shm``) when there is one, so the
hundreds of merges of the crash tests do not wait for real ``fdatasync`` calls (the simulated power
loss does not depend on them); see :mod:`support.scratch`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.scratch import scratch_folder


@pytest.fixture
def fast_tmp(tmp_path: Path):
    """A scratch folder on a RAM file system (see support.scratch)."""
    yield from scratch_folder(tmp_path, "vhdx-merge-")
