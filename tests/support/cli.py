"""The one way tests run the command line: in this process (fast) or as ``python -m vhdx`` (real).

:func:`run_inprocess` calls ``vhdx.cli.main`` with stdout and stderr captured (a Python start
costs about half a second here); :func:`run_subprocess` runs a fresh interpreter with this
checkout first on ``PYTHONPATH`` (:func:`cli_env`), for what concerns the process itself:
exit codes from signals, tracebacks, ``export -`` to a pipe, locks held by another process.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vhdx.cli

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    """What one in-process run of the CLI printed and returned."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """The command, its exit code and the tails of its output, for a failure message."""
        return f"vhdx {' '.join(self.args)} -> exit {self.returncode}\nstdout: {self.stdout[-2000:]}\n" \
               f"stderr: {self.stderr[-2000:]}"

    def json(self) -> Any:
        """stdout parsed as JSON, after asserting that the command succeeded."""
        assert self.returncode == 0, self.describe()
        return json.loads(self.stdout)


def run_inprocess(*args: object) -> Result:
    """``vhdx.cli.main(args)`` with stdout/stderr captured (not for ``export -``)."""
    argv = [os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = vhdx.cli.main(argv)
        except SystemExit as e:     # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return Result(argv, 0 if code is None else code, out.getvalue(), err.getvalue())


def cli_env() -> dict[str, str]:
    """The environment with this checkout first on ``PYTHONPATH``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_subprocess(*args: object, cwd: str | os.PathLike[str] | None = REPO, text: bool = True,
                   timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    """``python -m vhdx ARGS`` in a fresh process; output captured, exit code not checked."""
    argv = [a if isinstance(a, os.PathLike) else str(a) for a in args]
    return subprocess.run([sys.executable, "-m", "vhdx", *map(os.fspath, argv)], cwd=cwd, env=cli_env(),
                          capture_output=True, text=text, timeout=timeout, check=False, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess[str] | Result, *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback, naming ``needles``."""
    assert result.returncode != 0, f"expected failure, got 0; stdout={result.stdout!r}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line: {result.stderr!r}"
    assert lines[0].startswith("vhdx: error:"), lines[0]
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]
