"""Start-up (issue 10, point 5): ``vhdx --help`` and ``import vhdx`` load no numpy and no construct;
``vhdx info`` loads only what it uses. Checked in a fresh interpreter through ``sys.modules``
(robust on a shared machine, where a timing would not be)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import vhdx
from support.cli import REPO, cli_env

HEAVY = ("numpy", "construct", "tqdm", "PIL")

# Runs the CLI (or just an import) in a fresh process, then prints the top-level package and the
# vhdx modules it loaded, as JSON on the last line of stdout.
WRAPPER = """
import json, sys
argv = json.loads(sys.argv[1])
try:
    if argv is None:
        import vhdx
    else:
        from vhdx.cli import main
        main(argv)
except SystemExit:
    pass
mods = sorted({m.split(".")[0] for m in sys.modules} | {m for m in sys.modules if m.startswith("vhdx")})
threads = int(next(l for l in open("/proc/self/status") if l.startswith("Threads:")).split()[1])
print(json.dumps(mods + [f"threads={threads}"]))
"""


def loaded(argv: list[str] | None) -> set[str]:
    """The modules a fresh ``vhdx ARGV`` (None: ``import vhdx``) has loaded when it ends."""
    run = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(argv)], cwd=REPO, env=cli_env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    return set(json.loads(run.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["info", "--help"], ["merge", "--help"], ["--version"]])
def test_help_loads_no_numpy_no_construct_no_ops(argv: list[str]) -> None:
    mods = loaded(argv)
    assert "vhdx.cli.inspect" in mods  # the parser was built: the check below can fail
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))
    lower = sorted(m for m in mods if m.split(".")[1:2] in (["ops"], ["chains"], ["file"], ["format"]))
    assert not lower, lower


def test_import_vhdx_is_light_and_names_load_on_use() -> None:
    mods = loaded(None)
    assert "vhdx" in mods and not mods & set(HEAVY), sorted(mods & set(HEAVY))
    assert "vhdx.chains.disk" not in mods
    assert sorted(dir(vhdx)) == sorted(set(dir(vhdx)))
    assert set(vhdx.__all__) <= set(dir(vhdx))
    for name in vhdx.__all__:
        assert getattr(vhdx, name) is not None, name
    with pytest.raises(AttributeError):
        vhdx.no_such_name  # noqa: B018


def test_info_loads_only_what_it_uses(tmp_path) -> None:
    path = tmp_path / "d.vhdx"
    vhdx.create(str(path), 4 << 20).close()
    mods = loaded(["info", str(path)])
    assert "vhdx.chains.resolve" in mods and "numpy" in mods  # it did open the disk
    unused = {"tqdm", "PIL", "vhdx.ops.pictures", "vhdx.ops.merge.run", "vhdx.ops.export", "vhdx.ops.demo",
              "vhdx.ops.check", "vhdx.ops.create"}
    assert not mods & unused, sorted(mods & unused)


def test_numpy_starts_no_blas_threads(tmp_path) -> None:
    """numpy's OpenBLAS would start a thread per core at import (idle, but they cost CPU)."""
    path = tmp_path / "d.vhdx"
    vhdx.create(str(path), 4 << 20).close()
    env = cli_env()
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(["info", str(path)])], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    mods = json.loads(run.stdout.strip().splitlines()[-1])
    assert "numpy" in mods and "threads=1" in mods, [m for m in mods if m.startswith(("threads", "numpy"))]
