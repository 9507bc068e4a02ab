"""Each file parsed once per process: the validated structures of read-only opens, by file identity.

Opening a 64-deep chain, then opening it again (another command of the same process, a merge
that re-resolves), would parse every parent each time: headers, two region tables with their
64 KiB CRCs, the metadata region, the BAT scan. A read-only open of a file with a clean log
stores what it parsed and validated here; the next read-only open of the same, unchanged file
takes it from here instead.

The key is the file's identity and every sign of a change: ``(st_dev, st_ino, st_size,
st_mtime_ns, st_ctime_ns)`` from ``fstat`` of the open descriptor, plus both headers' raw bytes
(which hold the sequence number, the GUIDs and the LogGuid). A write through any path changes
``st_ctime`` (which ``utime`` cannot set back), so a changed file is parsed again. Writable
opens never take anything from here: they check everything against the file as it is.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any, Hashable

MAX_ENTRIES = 256  # files; each entry holds a few KiB plus the BAT's non-zero entries

_lock = threading.Lock()
_entries: "OrderedDict[Hashable, dict[str, Any]]" = OrderedDict()


def key_of(fd: int | None, headers: bytes) -> Hashable | None:
    """The cache key of the file open on ``fd`` whose two headers are ``headers``, or None
    (no descriptor, or not a regular file)."""
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not (st.st_mode & 0o170000 == 0o100000):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, headers)


def get(key: Hashable | None) -> dict[str, Any] | None:
    """What was stored under ``key`` (a dict the caller must not change), or None."""
    if key is None:
        return None
    with _lock:
        found = _entries.get(key)
        if found is not None:
            _entries.move_to_end(key)
        return found


def put(key: Hashable | None, value: dict[str, Any]) -> None:
    """Store ``value`` under ``key``; the least recently used entries go past :data:`MAX_ENTRIES`."""
    if key is None:
        return
    with _lock:
        _entries[key] = value
        _entries.move_to_end(key)
        while len(_entries) > MAX_ENTRIES:
            _entries.popitem(last=False)


def clear() -> None:
    """Forget everything (tests; a caller that knows files changed in ways fstat cannot see)."""
    with _lock:
        _entries.clear()


def size() -> int:
    """How many files are stored."""
    with _lock:
        return len(_entries)


PARSED = ("creator_field", "headers", "header_errors", "current_header_index", "headers_identical", "region_table",
          "region_table_errors", "metadata_region", "metadata", "geometry")
MAX_SPARSE = 1 << 16  # rows (about 1 MiB) kept per file; a BAT with more non-zero entries is scanned again


def parsed(image: Any) -> dict[str, Any]:
    """What a read-only open of ``image`` parsed and validated, to store under its key."""
    found = {name: getattr(image, name) for name in PARSED}
    sparse = image.scanned
    if sparse is not None and sparse.size <= MAX_SPARSE:
        found.update(bat_region=image.bat_region, sparse=sparse, validated=image.bat_validated)
    return found


def restore(image: Any, found: dict[str, Any] | None, *, header_only: bool) -> bool:
    """Load ``image`` from a stored parse of its unchanged file: the headers, region table and
    metadata, and the BAT's entries when they were stored (False when nothing was stored)."""
    if found is None:
        return False
    for name in PARSED:
        value = found[name]
        setattr(image, name, list(value) if isinstance(value, list) else value)
    if not header_only and "sparse" in found:
        image.adopt_bat(found["bat_region"], found["sparse"], validated=found["validated"])
    return True
