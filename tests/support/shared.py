"""Where the shared specimens are (``../shared`` beside the repository, or ``$VHDX_SHARED``) and
their manifest, for parametrising at collection time. A missing folder gives each test one
``no-shared`` parameter; the ``shared_dir`` fixture (tests/conftest.py) then skips it locally and
fails it under ``CI=true``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest


def shared_dir_path() -> Path:
    """The ``shared`` folder beside the repository, or ``$VHDX_SHARED`` when set."""
    env = os.environ.get("VHDX_SHARED")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared").resolve()


def manifest_entries() -> list[dict[str, Any]] | None:
    """The specimens listed in the shared manifest, or None when the folder is missing."""
    path = shared_dir_path() / "specimens" / "manifest.json"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["specimens"]


def no_shared_param() -> Any:
    """The one parameter of a specimen test when the folder is missing (see the module)."""
    return pytest.param(None, id="no-shared")
