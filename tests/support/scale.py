"""Peak memory of one step in a child process, for the tests that bound it at real sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_rss_kib(imports: str, code: str, path: Path, check: str = "") -> int:
    """Peak RSS (KiB) of a child that runs ``imports``, sets ``path`` (a str) and runs ``code``,
    then ``check`` (a line of asserts); the child imports vhdx from this repository."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = f"import resource, sys\n{imports}\npath = sys.argv[1]\n{code}\n{check}\n" \
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])
