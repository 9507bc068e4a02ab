"""Every Storage keeps the same contract: the checks below run against each one.

The kinds: ``FileStorage`` (a host file), ``OverlayStorage``
(read-only replayed pages over a base) and the test kit's ``FaultyStorage`` wrapped around a
``FileStorage`` with no fault planned. Each is made holding the same 10 bytes; the writable ones
must round-trip writes and resize with zeros; the read-only ones must refuse writes and
truncation with :class:`ReadOnlyError` and change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from support.faults import FaultyStorage
from vhdx.errors import ReadOnlyError, VhdxError
from vhdx.file.storage import FileStorage, OverlayStorage, Storage

CONTENT = b"0123456789"


@dataclass(frozen=True)
class Kind:
    """How to make one Storage holding ``CONTENT`` in a folder, and what it promises."""

    name: str
    make: Callable[[Path], Storage]
    writable: bool
    refuses_negative: bool = True      # a negative offset raises VhdxError


def _file(folder: Path, writable: bool) -> FileStorage:
    path = folder / "file.bin"
    path.write_bytes(CONTENT)
    return FileStorage(path, writable, durable=False)


def _overlay(folder: Path) -> OverlayStorage:
    """Replayed pages that rewrite bytes 2..4 with what was there: the same 10 bytes."""
    return OverlayStorage(_file(folder, False), [(2, CONTENT[2:5]), (4, CONTENT[4:5])], len(CONTENT))


KINDS = [
    Kind("file", lambda folder: _file(folder, True), writable=True),
    Kind("file-read-only", lambda folder: _file(folder, False), writable=False),
    Kind("overlay", _overlay, writable=False),
    Kind("faulty", lambda folder: FaultyStorage(_file(folder, True)), writable=True),
    Kind("faulty-read-only", lambda folder: FaultyStorage(_file(folder, False)), writable=False),
]
WRITABLE = [pytest.param(kind, id=kind.name) for kind in KINDS if kind.writable]
READ_ONLY = [pytest.param(kind, id=kind.name) for kind in KINDS if not kind.writable]
ALL = WRITABLE + READ_ONLY


@pytest.fixture
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    """The Storage of the test's ``kind``, closed afterwards."""
    made = request.param.make(tmp_path)
    yield made
    made.close()


def parametrize(kinds: list) -> pytest.MarkDecorator:
    """Run a test once per kind, handing it the kind and a fresh storage of that kind."""
    return pytest.mark.parametrize("kind, storage", [pytest.param(p.values[0], p.values[0], id=p.id)
                                                     for p in kinds], indirect=["storage"])


@parametrize(ALL)
def test_size_and_reads_within_the_file(kind: Kind, storage: Storage) -> None:
    assert storage.size() == len(CONTENT)
    assert storage.read(0, len(CONTENT)) == CONTENT
    assert storage.read(3, 4) == CONTENT[3:7]
    buf = bytearray(5)
    assert storage.readinto(memoryview(buf), 5) == 5
    assert bytes(buf) == CONTENT[5:]
    assert storage.writable is kind.writable
    assert isinstance(storage.path, str) and storage.path


@parametrize(ALL)
def test_reads_past_the_end_are_zeros(kind: Kind, storage: Storage) -> None:
    assert storage.read(8, 6) == CONTENT[8:] + bytes(4)
    assert storage.read(100, 7) == bytes(7)
    buf = bytearray(b"\xff" * 3)
    assert storage.readinto(memoryview(buf), len(CONTENT)) == 3
    assert bytes(buf) == bytes(3)
    assert storage.read(0, 0) == b""
    assert storage.size() == len(CONTENT), "a read past the end changed the size"


@parametrize(WRITABLE)
def test_write_read_round_trip(kind: Kind, storage: Storage) -> None:
    storage.write(b"abc", 2)
    storage.write(memoryview(b"XY"), 9)                     # across the end: the file grows
    storage.write(b"!", 14)                                 # past the end: the gap reads zeros
    assert storage.size() == 15
    assert storage.read(0, 16) == b"01abc5678XY" + bytes(3) + b"!" + bytes(1)


@parametrize(WRITABLE)
def test_truncate_grows_with_zeros_and_shrinks(kind: Kind, storage: Storage) -> None:
    storage.truncate(20)
    assert storage.size() == 20
    assert storage.read(0, 20) == CONTENT + bytes(10)
    storage.truncate(4)
    assert storage.size() == 4
    assert storage.read(0, 8) == CONTENT[:4] + bytes(4)
    storage.truncate(6)
    assert storage.read(0, 6) == CONTENT[:4] + bytes(2), "bytes cut off came back"


@parametrize(ALL)
def test_flush_keeps_the_bytes(kind: Kind, storage: Storage) -> None:
    storage.flush()
    assert storage.read(0, len(CONTENT)) == CONTENT


@parametrize(ALL)
def test_close_is_idempotent(kind: Kind, storage: Storage) -> None:
    storage.close()
    storage.close()


@parametrize(READ_ONLY)
def test_read_only_refuses_write_and_truncate(kind: Kind, storage: Storage) -> None:
    with pytest.raises(ReadOnlyError):
        storage.write(b"x", 0)
    with pytest.raises(ReadOnlyError):
        storage.truncate(0)
    with pytest.raises(ReadOnlyError):
        storage.truncate(100)
    assert storage.size() == len(CONTENT)
    assert storage.read(0, len(CONTENT)) == CONTENT


REFUSING = [p for p in ALL if p.values[0].refuses_negative]


@parametrize(REFUSING)
def test_negative_offsets_are_refused(kind: Kind, storage: Storage) -> None:
    with pytest.raises(VhdxError):
        storage.read(-4, 4)
    with pytest.raises(VhdxError):
        storage.readinto(memoryview(bytearray(4)), -4)
    if kind.writable:
        with pytest.raises(VhdxError):
            storage.write(b"x", -1)
        with pytest.raises(VhdxError):
            storage.truncate(-1)
        assert storage.read(0, len(CONTENT)) == CONTENT


@parametrize(REFUSING)
def test_offset_minus_one_is_refused(kind: Kind, storage: Storage) -> None:
    with pytest.raises(VhdxError):
        storage.readinto(memoryview(bytearray(4)), -1)
