"""Shared fixtures: the specimens in ../shared, hashing helpers, interop peers, --runslow.

Specimens are never copied into the project. They are decompressed once per session into a
pytest temporary directory (sparse: zero runs are seeked over), checked against the manifest's
``sha256_of_decompressed_vhdx``, and handed out by path. Tests that change a specimen must take
a copy first (``specimen_copy``). When the ``shared`` folder beside the repository is missing
(or ``VHDX_SHARED`` points nowhere), every test that needs it is skipped with the path tried,
or fails under ``CI=true``.

Interop peers (qemu-img, qemu-io, pyvhdi, dissect.hypervisor) come through ``interop_tool``: a
missing peer skips the test, except under ``CI=true`` where it fails, so CI cannot pass silently
without its judges. The versions of the peers used are printed at the end of the run.

The test kit shared by every folder is the package ``tests/support``; this file puts ``tests/``
first on ``sys.path`` so that ``import support`` works from any folder and any import mode.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from support.disk import read_all, sha256_file, write_all  # noqa: E402
from support.needs import unavailable  # noqa: E402
from support.shared import shared_dir_path  # noqa: E402

MiB = 1 << 20
HASH_CHUNK = 4 * MiB
SPARSE_CHUNK = 1 * MiB
_ZERO_CHUNK = bytes(SPARSE_CHUNK)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zip")


# --------------------------------------------------------------------------------------------
# Locating ../shared
# --------------------------------------------------------------------------------------------

def specimen_short_name(stored_name: str) -> str:
    """``x.vhdx.bz2`` -> ``x.vhdx``: the decompressed file name (keeps .vhdx/.avhdx)."""
    for suffix in COMPRESSION_SUFFIXES:
        if stored_name.endswith(suffix):
            return stored_name[: -len(suffix)]
    return stored_name


# --------------------------------------------------------------------------------------------
# Hashing and copying helpers (plain functions; fixtures below hand them to tests)
# --------------------------------------------------------------------------------------------

def sha256_of_disk(disk: Any, chunk: int = HASH_CHUNK) -> str:
    """SHA-256 of a whole virtual disk read through ``readinto`` from offset 0.

    Fails the test if the number of bytes read differs from ``disk.size``.
    """
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    disk.seek(0)
    total = 0
    while True:
        count = disk.readinto(view)
        if not count:
            break
        digest.update(view[:count])
        total += count
    size = getattr(disk, "size", None)
    if size is not None:
        assert total == size, f"read {total} bytes from a disk of size {size}"
    return digest.hexdigest()


def _copy_sparse_stream(source: Any, destination: Path) -> tuple[str, int]:
    """Copy a binary stream into ``destination``, seeking over all-zero 1 MiB chunks.

    Returns the SHA-256 and the length of what was copied.
    """
    digest = hashlib.sha256()
    total = 0
    with open(destination, "wb") as out:
        while True:
            chunk = source.read(SPARSE_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
            if chunk == _ZERO_CHUNK[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(total)
    return digest.hexdigest(), total


def sparse_copy(source: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Copy a host file, keeping zero runs as holes (shutil.copyfile would fill them)."""
    destination = Path(destination)
    with open(source, "rb") as handle:
        _copy_sparse_stream(handle, destination)
    shutil.copystat(source, destination)
    return destination


def _open_compressed(archive: Path, entry: dict[str, Any]):
    compression = entry.get("compression")
    if compression == "gzip":
        return gzip.open(archive, "rb")
    if compression == "bzip2":
        return bz2.open(archive, "rb")
    if compression == "zip":
        zip_file = zipfile.ZipFile(archive)
        members = zip_file.namelist()
        member = entry.get("zip_member") or members[0]
        assert len(members) == 1 and members[0] == member, f"{archive}: members {members}"
        return _ZipMember(zip_file, zip_file.open(member))
    raise ValueError(f"{archive}: unknown compression {compression!r}")


class _ZipMember:
    """A zip member stream that closes its archive too."""

    def __init__(self, zip_file: zipfile.ZipFile, stream: Any) -> None:
        self._zip_file = zip_file
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        return self._stream.read(size)

    def __enter__(self) -> "_ZipMember":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
        self._zip_file.close()


# --------------------------------------------------------------------------------------------
# Options and markers
# --------------------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (lvm2 specimen, full hashes of 10 GiB disks)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-running tests (large specimens); run with --runslow")
    config._vhdx_peer_versions = {}  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


# --------------------------------------------------------------------------------------------
# Specimen fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder (docs, specimens); skips when it is absent, fails under ``CI=true``
    (like a missing interop peer: CI must not pass without its real files)."""
    path = shared_dir_path()
    if not (path / "specimens" / "manifest.json").is_file():
        message = (f"shared specimens folder not found at {path} "
                   f"(put it beside the repository or set VHDX_SHARED)")
        unavailable(message)
    return path


@pytest.fixture(scope="session")
def manifest(shared_dir: Path) -> dict[str, Any]:
    """``specimens/manifest.json`` as a dict (keys: description, tools, specimens)."""
    with open(shared_dir / "specimens" / "manifest.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def manifest_entry(manifest: dict[str, Any]) -> Callable[[str], dict[str, Any]]:
    """Look up a specimen's manifest entry by stored or decompressed file name."""
    by_name: dict[str, dict[str, Any]] = {}
    for entry in manifest["specimens"]:
        by_name[entry["file"]] = entry
        by_name[specimen_short_name(entry["file"])] = entry

    def lookup(name: str) -> dict[str, Any]:
        try:
            return by_name[name]
        except KeyError:
            raise LookupError(f"no specimen {name!r} in manifest.json") from None

    return lookup


@pytest.fixture(scope="session")
def specimen(shared_dir: Path, manifest_entry: Callable[[str], dict[str, Any]],
             tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: specimen name (stored or decompressed) -> decompressed path, cached per session.

    The file is shared by every test of the session: do not modify it; use ``specimen_copy``.
    Its SHA-256 is checked against ``sha256_of_decompressed_vhdx`` once, when decompressed.
    """
    cache: dict[str, Path] = {}
    directory = tmp_path_factory.mktemp("specimens")

    def get(name: str) -> Path:
        entry = manifest_entry(name)
        stored = entry["file"]
        if stored in cache:
            return cache[stored]
        archive = shared_dir / "specimens" / stored
        destination = directory / specimen_short_name(stored)
        with _open_compressed(archive, entry) as stream:
            digest, length = _copy_sparse_stream(stream, destination)
        if length != entry["decompressed_size"] or digest != entry["sha256_of_decompressed_vhdx"]:
            destination.unlink()
            pytest.fail(f"{archive}: decompressed to {length} bytes, sha256 {digest}; manifest says "
                        f"{entry['decompressed_size']} bytes, {entry['sha256_of_decompressed_vhdx']}")
        cache[stored] = destination
        return destination

    return get


@pytest.fixture
def specimen_copy(specimen: Callable[[str], Path], tmp_path: Path) -> Callable[[str], Path]:
    """Factory: a private, writable (sparse) copy of a specimen in this test's tmp_path."""

    def copy(name: str) -> Path:
        source = specimen(name)
        return sparse_copy(source, tmp_path / source.name)

    return copy


@pytest.fixture(name="sha256_of_disk", scope="session")
def sha256_of_disk_fixture() -> Callable[..., str]:
    """``sha256_of_disk(disk, chunk=4 MiB)``: SHA-256 of the whole virtual disk."""
    return sha256_of_disk


@pytest.fixture(name="file_sha256", scope="session")
def file_sha256_fixture() -> Callable[..., str]:
    """``file_sha256(path)``: SHA-256 of a host file (support.disk.sha256_file)."""
    return sha256_file


@pytest.fixture(name="read_whole_disk", scope="session")
def read_whole_disk_fixture() -> Callable[[Any], bytes]:
    """``read_whole_disk(disk)``: every byte of an open virtual disk (support.disk.read_all)."""
    return read_all


@pytest.fixture(name="write_all", scope="session")
def write_all_fixture() -> Callable[[Any, int, bytes], None]:
    """``write_all(disk, offset, data)``: write all of ``data`` (support.disk.write_all)."""
    return write_all


# --------------------------------------------------------------------------------------------
# Interop peers
# --------------------------------------------------------------------------------------------

def _first_line(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown version"


def _find_peer(name: str) -> tuple[Any, str]:
    """Return (handle, version) for a peer, or raise LookupError saying why it is missing."""
    if name in ("qemu-img", "qemu-io"):
        executable = shutil.which(name)
        if executable is None:
            raise LookupError(f"{name} is not on PATH (Debian: apt-get install qemu-utils)")
        return executable, _first_line([executable, "--version"])
    if name == "pyvhdi":
        try:
            module = importlib.import_module("pyvhdi")
        except ImportError as error:
            raise LookupError(f"cannot import pyvhdi ({error}); pip install libvhdi-python") from error
        return module, f"pyvhdi (libvhdi) {module.get_version()}"
    if name == "dissect.hypervisor":
        try:
            module = importlib.import_module("dissect.hypervisor.disk.vhdx")
        except ImportError as error:
            raise LookupError(f"cannot import dissect.hypervisor ({error}); "
                              f"pip install dissect.hypervisor") from error
        return module, f"dissect.hypervisor {importlib.metadata.version('dissect.hypervisor')}"
    raise ValueError(f"unknown interop peer {name!r}")


@pytest.fixture(scope="session")
def _peer_cache() -> dict[str, tuple[Any, str] | LookupError]:
    return {}


@pytest.fixture
def interop_tool(request: pytest.FixtureRequest,
                 _peer_cache: dict[str, tuple[Any, str] | LookupError]) -> Callable[[str], Any]:
    """Factory: peer name -> executable path (qemu-img, qemu-io) or module (pyvhdi,
    dissect.hypervisor's ``disk.vhdx`` module).

    A missing peer skips the test, or fails it when ``CI=true``. The peer's version goes into the
    test's ``user_properties`` and into the summary printed at the end of the run.
    """

    def get(name: str) -> Any:
        if name not in _peer_cache:
            try:
                _peer_cache[name] = _find_peer(name)
            except LookupError as error:
                _peer_cache[name] = error
        found = _peer_cache[name]
        if isinstance(found, LookupError):
            message = f"interop peer {name} missing: {found}"
            unavailable(message)
        handle, version = found
        request.node.user_properties.append(("peer", version))
        request.config._vhdx_peer_versions[name] = version  # type: ignore[attr-defined]
        return handle

    return get


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    for name in ("qemu-img", "qemu-io", "pyvhdi", "dissect.hypervisor"):
        try:
            lines.append(f"interop peer: {_find_peer(name)[1]}")
        except LookupError as error:
            lines.append(f"interop peer: {name} MISSING ({error})")
    lines.append(f"specimens: {shared_dir_path() / 'specimens'}")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    versions = getattr(config, "_vhdx_peer_versions", {})
    if versions:
        terminalreporter.write_line(
            "interop peers used: " + "; ".join(versions[name] for name in sorted(versions)))
