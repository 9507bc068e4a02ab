"""The command line on the real specimens: ``info``/``check`` never change the file, ``check``
passes the clean ones, ``export`` writes the virtual disk whose SHA-256 the manifest records.

Run as ``python -m vhdx`` from the repository root, so no installation is needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_specimens import DIRTY, NON_DIFFERENCING, _params

REPO_ROOT = Path(__file__).resolve().parents[2]
GiB = 1 << 30


def _vhdx_cli(*args: object) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vhdx", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _describe(result: subprocess.CompletedProcess) -> str:
    return f"{' '.join(result.args)} -> exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def _state(path: Path, file_sha256) -> tuple[str, int]:
    return file_sha256(path), path.stat().st_mtime_ns


CLEAN = _params(lambda entry: not entry["has_parent"] and not entry["log_dirty"])
EXPORT = _params(lambda entry: not entry["has_parent"],
                 slow=lambda entry: entry["virtual_size"] > 1 * GiB)


@pytest.mark.parametrize("name", NON_DIFFERENCING)
def test_cli_info_json_describes_the_specimen_without_changing_it(name, specimen, manifest_entry,
                                                                  file_sha256):
    entry = manifest_entry(name)
    path = specimen(name)
    before = _state(path, file_sha256)
    result = _vhdx_cli("info", path, "--json")
    assert result.returncode == 0, _describe(result)
    info = json.loads(result.stdout)
    assert {"headers", "region_table", "metadata", "bat", "log"} <= set(info)
    assert info["virtual_size"] == entry["virtual_size"]
    assert _state(path, file_sha256) == before

    text = _vhdx_cli("info", path)
    assert text.returncode == 0, _describe(text)
    assert text.stdout.strip()


@pytest.mark.parametrize("name", CLEAN)
def test_cli_check_passes_every_clean_specimen(name, specimen, file_sha256):
    path = specimen(name)
    before = _state(path, file_sha256)
    result = _vhdx_cli("check", path, "--json")
    assert result.returncode == 0, _describe(result)
    json.loads(result.stdout)
    assert _state(path, file_sha256) == before


@pytest.mark.parametrize("name", DIRTY)
def test_cli_check_of_a_dirty_log_reads_it_and_leaves_the_file_unchanged(name, specimen,
                                                                         file_sha256):
    path = specimen(name)
    before = _state(path, file_sha256)
    result = _vhdx_cli("check", path, "--json")
    assert result.returncode in (0, 2), _describe(result)
    json.loads(result.stdout)
    assert _state(path, file_sha256) == before


@pytest.mark.parametrize("name", EXPORT)
def test_cli_export_writes_the_manifest_virtual_disk(name, specimen, manifest_entry, file_sha256,
                                                     tmp_path):
    entry = manifest_entry(name)
    path = specimen(name)
    before = _state(path, file_sha256)
    out = tmp_path / "disk.raw"
    result = _vhdx_cli("export", path, out)
    assert result.returncode == 0, _describe(result)
    assert out.stat().st_size == entry["virtual_size"]
    assert file_sha256(out) == entry["sha256_of_virtual_disk"]
    assert _state(path, file_sha256) == before
