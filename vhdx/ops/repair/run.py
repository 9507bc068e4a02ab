"""``vhdx.repair``, ``vhdx.replay`` and ``check --repair``: the entry points of this room."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from ...errors import CorruptError, UnsupportedError, UsageError, VhdxError, as_path
from ...file.image import Image
from ...file.storage import FileStorage, Storage
from ...format.geometry import as_offset

from ..check import check_file
from ..create import locator_for
from .inplace import InPlace, check_in_place
from .rebuild import write_copy
from .report import SalvageReport
from .salvage import salvage


def repair(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, in_place: bool = False,
           size: int | None = None, parent: str | os.PathLike[str] | None = None) -> SalvageReport:
    """Repair a damaged VHDX into the new file ``out`` (the input is only read), or, with
    ``in_place``, in the file itself, crash-safe, through the log.

    ``size`` gives the virtual size when the file has lost it; ``parent`` names the parent
    whose locator to rebuild when a differencing disk has lost its own. Returns the
    :class:`SalvageReport`; when ``report.unrecoverable`` is set nothing was written.
    """
    path = as_path(path)
    size = as_offset(size, "size", path) if size is not None else None
    if in_place == (out is not None):
        raise UsageError("give an output file, or in_place=True (not both)", path=path)
    if in_place:
        return repair_in_place(path, size=size, parent=parent)
    out = as_path(out, "out")
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
        raise UsageError("the output is the input; use in_place=True to repair the file itself", path=out)
    locator = _locator(parent, out) if parent is not None else None
    source = FileStorage(path, lock="shared")
    try:
        s = salvage(source, size=size, parent_locator=locator, parent=_opt(parent))
        s.report.output = out
        if s.report.ok:
            write_copy(s, out)
    finally:
        source.close()
    _self_check(s.report, out)
    return s.report


def _opt(path: str | os.PathLike[str] | None) -> str | None:
    return os.fspath(path) if path is not None else None


def _locator(parent: str | os.PathLike[str], child: str) -> dict[str, str]:
    """A parent locator naming ``parent`` (its DataWriteGuid as the linkage) from ``child``."""
    image = Image.open(parent, "r")
    try:
        guid = image.header.data_write_guid
    finally:
        image.close()
    return locator_for(os.fspath(parent), child, guid)


def repair_in_place(path: str | os.PathLike[str], *, size: int | None = None,
                    parent: str | os.PathLike[str] | None = None, storage: Storage | None = None) -> SalvageReport:
    """``repair(path, in_place=True)``; ``storage`` is the file already open for writing (the
    seam the kill tests record through)."""
    path = os.fspath(path)
    locator = _locator(parent, path) if parent is not None else None
    own = storage is None
    if storage is None:
        storage = FileStorage(path, writable=True, lock="exclusive")
    try:
        s = salvage(storage, size=size, parent_locator=locator, parent=_opt(parent))
        s.report.in_place = True
        s.report.output = path
        if not s.report.ok:
            return s.report
        why = check_in_place(s)
        if why is not None:
            s.report.fail(f"cannot repair in place: {why}; repair to a copy (-o OUT)")
            return s.report
        InPlace(storage, s).run()
        if not own:
            _self_check(s.report, path, storage)
    finally:
        if own:
            storage.close()
    if own:
        _self_check(s.report, path)
    return s.report


def _self_check(report: SalvageReport, out: str, storage: Storage | None = None) -> None:
    """Note any error ``vhdx check`` still finds in the output (there should be none)."""
    if not report.ok:
        return
    result = check_file(out, storage=storage)
    for f in result.errors:
        report.notes.append(f"check of the output: {f.message}")


@dataclass
class ReplayResult:
    """What ``vhdx replay`` did: ``entries`` replayed (sequence numbers), none when the log was clean."""

    path: str
    entries: list[int] = field(default_factory=list)

    @property
    def replayed(self) -> bool:
        """True when a dirty log was replayed."""
        return bool(self.entries)

    def to_dict(self) -> dict[str, Any]:
        """As JSON-ready values."""
        return dict(path=self.path, replayed=self.replayed, entries=len(self.entries), sequence_numbers=self.entries)

    def line(self) -> str:
        """One line for people."""
        if not self.entries:
            return f"{self.path}: the log is clean; nothing to replay"
        n = len(self.entries)
        seq = f"sequence {self.entries[0]}" + (f" to {self.entries[-1]}" if n > 1 else "")
        return f"{self.path}: replayed {n} log {'entry' if n == 1 else 'entries'} ({seq}) into the file; the log is clean"


def replay(path: str | os.PathLike[str]) -> ReplayResult:
    """Replay a dirty log into the file (under an exclusive lock) and mark the log clean.

    A log that cannot be replayed raises :class:`LogReplayError` and the file is left as it
    was; ``vhdx repair`` salvages such a file.
    """
    return replay_on(as_path(path))


def replay_on(path: str | os.PathLike[str], storage: Storage | None = None) -> ReplayResult:
    """:func:`replay`, on ``storage`` when given (the file open for writing: the kill tests' seam)."""
    path = os.fspath(path)
    own = storage is None
    if storage is None:
        storage = FileStorage(path, writable=True, lock="exclusive")
    try:
        image = Image(storage, owns_storage=False)
        try:
            image.load(header_only=True)  # a writable load replays the log into the file (§8.5)
        except BaseException:
            image.abort()
            raise
        result = ReplayResult(path, [e.sequence_number for e in image.log_replayed])
        image.close()
    finally:
        if own:
            storage.close()
    return result


def fix_in_place(path: str | os.PathLike[str]) -> list[str]:
    """``check --repair``: fix in place what is safe to fix without judgement, like
    ``qemu-img check -r``: a dirty log (replayed), a stale or invalid header (both rewritten),
    leaked space past the last structure (given back). Returns what was fixed."""
    path = os.fspath(path)
    fixed: list[str] = []
    try:
        image = Image.open(path, "r+")
    except (CorruptError, UnsupportedError) as e:
        raise type(e)(f"{e.detail}; check --repair cannot fix this, 'vhdx repair' may", path=path,
                      offset=e.offset) from e
    try:
        if image.log_was_dirty:
            fixed.append(f"replayed {len(image.log_replayed)} log entries")
        h1, h2 = image.headers
        stale = h1 is None or h2 is None or image.headers_identical or \
            h1.replace(sequence_number=0, checksum=0) != h2.replace(sequence_number=0, checksum=0)
        if stale:
            image.writer.update_headers(file_write_guid=uuid.uuid4())
            image.writer.session_started = True
            fixed.append("rewrote both headers (one was invalid or stale)")
        freed = image.trim_unreferenced_tail()
        if freed:
            fixed.append(f"gave back {freed} bytes of leaked space past the last structure")
    except VhdxError:
        image.abort()
        raise
    image.close()
    return fixed
