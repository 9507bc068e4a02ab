"""The progress bar (issue 14, point 2): fits the terminal, shows rate and ETA, leaves no stray
characters, is silent when stderr is not a terminal, and obeys ``--progress/--no-progress``.

The export runs in a real process under a pseudo-terminal of 80 columns; what the terminal
would show is rebuilt from the bytes written (``\\r`` returns to the start of the line).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest

import vhdx
from vhdx.cli import build_parser

MiB = 1 << 20
COLUMNS = 80
BAR = re.compile(r"^export big\.vhdx: +\d+%\|.*\| [\d.]+[kMG]?B?/[\d.]+[kMG]?B? \[[\d:]+<[\d:?]+, *[\d.?]+ ?[kMG]?B/s\]$")


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``big.vhdx``: 192 MiB of data, so an export with --sha256 draws the bar many times."""
    folder = tmp_path_factory.mktemp("progress")
    chunk = np.random.default_rng(14).bytes(4 * MiB)
    with vhdx.create(folder / "big.vhdx", 192 * MiB, block_size=2 * MiB) as disk:
        for offset in range(0, 192 * MiB, 4 * MiB):
            disk.seek(offset)
            disk.write(chunk)
    return folder


def _env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS=str(COLUMNS), LINES="24")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(vhdx.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def run_in_pty(folder: Path, *argv: str) -> tuple[int, bytes]:
    """Run ``python -m vhdx ARGV`` in ``folder`` with stdout and stderr on an 80x24 pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: size the terminal, then become the CLI
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, COLUMNS, 0, 0))
            os.chdir(folder)
            os.execve(sys.executable, [sys.executable, "-m", "vhdx", *argv], _env())
        finally:
            os._exit(127)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks)


def screen(output: bytes) -> tuple[list[str], list[str]]:
    """What the terminal shows at the end (one string per line), and every line as it was drawn."""
    text = output.decode("utf-8", "replace").replace("\r\n", "\n")
    lines, drawn, line, col = [], [], [], 0
    for ch in text:
        if ch == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        elif ch == "\r":
            drawn.append("".join(line))
            col = 0
        else:
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += 1
            if col > COLUMNS:
                drawn.append("".join(line))
    if line:
        lines.append("".join(line).rstrip())
    return lines, drawn


def test_the_bar_fits_80_columns_and_leaves_no_stray_characters(big: Path) -> None:
    code, output = run_in_pty(big, "export", "big.vhdx", "out.raw", "--sha256", "--force")
    assert code == 0, output
    assert b"\x1b[" not in output.replace(b"\x1b[A", b"").replace(b"\x1b[K", b""), output
    lines, drawn = screen(output)
    too_wide = [d for d in drawn + lines if len(d) > COLUMNS]
    assert not too_wide, f"lines wider than {COLUMNS} columns: {too_wide[:3]}"
    bars = [ln for ln in lines if ln.startswith("export big.vhdx")]
    assert len(bars) == 1, lines
    assert BAR.match(bars[0]), f"not a clean bar (stray characters?): {bars[0]!r}"
    assert "100%" in bars[0] and "B/s" in bars[0], bars[0]
    assert output.count(b"\r") >= 3, "the bar was drawn fewer than three times: make the disk bigger"
    assert any(ln.startswith("exported 192.0 MiB to out.raw") for ln in lines), lines


def test_no_progress_on_a_terminal_draws_nothing(big: Path) -> None:
    code, output = run_in_pty(big, "export", "big.vhdx", "out.raw", "--force", "--no-progress")
    assert code == 0, output
    lines, _ = screen(output)
    assert b"\r" not in output.replace(b"\r\n", b""), output
    assert [ln for ln in lines if ln] == ["exported 192.0 MiB to out.raw (192.0 MiB of data)"], lines


def test_not_a_terminal_means_no_progress(big: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vhdx", "export", "big.vhdx", "out.raw", "--force"],
                          cwd=big, env=_env(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == b"", proc.stderr


@pytest.mark.parametrize("verb", [["export", "a", "b"], ["hash", "a"], ["merge", "a"], ["orphans", "d", "--merge"]])
def test_every_verb_that_shows_progress_takes_the_options(verb: list[str]) -> None:
    parser = build_parser()
    assert parser.parse_args([*verb, "--no-progress"]).progress is False
    assert parser.parse_args([*verb, "--progress"]).progress is True
    assert parser.parse_args(verb).progress is None
