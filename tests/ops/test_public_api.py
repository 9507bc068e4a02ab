"""The package's public face: ``vhdx.__all__`` and the example in its docstring."""

from __future__ import annotations

import doctest
import tempfile
from pathlib import Path

import pytest

import vhdx


def test_the_package_docstring_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))    # its mkdtemp() lands here
    result = doctest.testmod(vhdx, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10
    assert result.failed == 0


def test_every_public_name_exists() -> None:
    missing = [name for name in vhdx.__all__ if not hasattr(vhdx, name)]
    assert not missing
    assert {"open", "create", "snapshot", "chain", "merge", "export", "hash", "VhdxError"} <= set(vhdx.__all__)
