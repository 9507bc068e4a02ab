"""What a test needs from the machine: one rule for a missing tool, peer, device or library.

Locally a test whose need is not met is skipped with the reason; under ``CI=true`` it fails with
the reason, because CI installs everything (``.ci/run``) and a skipped test proves nothing.
"""

from __future__ import annotations

import os
import shutil
from typing import NoReturn

import pytest

__all__ = ["in_ci", "unavailable", "need", "need_tool"]


def in_ci() -> bool:
    """True under ``CI=true`` (any case), where every need must be met."""
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip the test for ``reason``; under CI, fail it."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


def need(ok: bool, reason: str) -> None:
    """:func:`unavailable` unless ``ok``."""
    if not ok:
        unavailable(reason)


def need_tool(name: str, package: str) -> str:
    """The path of command ``name`` (also looked for in the sbin folders), else :func:`unavailable`
    naming the Debian ``package`` to install."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if not found:
        unavailable(f"{name} is missing: apt-get install {package}")
    return found
