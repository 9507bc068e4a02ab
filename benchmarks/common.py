"""Helpers the benchmark scripts share (each script puts this folder first on ``sys.path``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``64K``, ``1T``, ``2GiB`` or a plain number of bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    return int(float(num) * units[unit])


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``, output captured as text; raises if it fails."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def fsync_path(path: Path) -> None:
    """fsync the file at ``path`` (what ``cp`` rows add to be as durable as ours)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
