"""The one exception hierarchy of the package. Imports nothing else from vhdx.

Every error carries the file (``path``) and, where it is known, the byte offset in
that file (``offset``). ``str(error)`` is one line a user can act on. :func:`as_path` and
:func:`as_callback` check what a caller hands in as a file name or a callback, so that a wrong
one is a :class:`UsageError` at the call, not a ``TypeError`` from deep inside (or half way
through a merge).
"""

from __future__ import annotations

import io
import os
from typing import Any


class VhdxError(Exception):
    """Base of every error this package raises."""

    def __init__(self, detail: str, *, path: str | os.PathLike[str] | None = None,
                 offset: int | None = None, **extra: Any) -> None:
        self.detail = " ".join(str(detail).split("\n")).strip()
        self.path = os.fspath(path) if path is not None else None
        self.offset = offset
        for key, value in extra.items():
            setattr(self, key, value)
        super().__init__(self._message())

    def _message(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(str(self.path))
        if self.offset is not None:
            parts.append(f"at 0x{self.offset:x}")
        parts.append(self.detail)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._message()


class CorruptError(VhdxError):
    """The file breaks the format: signature, range, alignment, overlap."""


class ChecksumError(CorruptError):
    """A CRC-32C does not match (``stored`` and ``computed``)."""


class TruncatedError(CorruptError):
    """The file ends before a structure it needs."""


class UnsupportedError(VhdxError):
    """Valid but not handled: unknown required region or item, version."""


class LogReplayError(CorruptError):
    """The log cannot be replayed (no valid sequence, truncated file)."""


class ChainError(VhdxError):
    """A differencing chain cannot be assembled."""


class ParentNotFoundError(ChainError, FileNotFoundError):
    """No parent could be found; ``tried`` lists every path tried."""

    def __init__(self, detail: str, **kwargs: Any) -> None:
        kwargs.setdefault("tried", [])
        VhdxError.__init__(self, detail, **kwargs)

    def __str__(self) -> str:
        return self._message()


class ParentMismatchError(ChainError):
    """The parent's DataWriteGuid is not the child's parent_linkage (``expected``, ``found``)."""


class ChainCycleError(ChainError):
    """A chain refers back to one of its own files, or is absurdly deep."""


class ReadOnlyError(VhdxError, io.UnsupportedOperation):
    """A write was attempted on something opened read-only."""

    def __str__(self) -> str:
        return self._message()


class LockedError(VhdxError):
    """Another process holds the file in a way that excludes this open (QEMU-compatible locks)."""


class MergeError(VhdxError):
    """A merge cannot start or go on; the message says how to resume."""


class UsageError(VhdxError, ValueError):
    """A caller passed arguments that make no sense (bad size, bad geometry)."""

    def __str__(self) -> str:
        return self._message()


class DiskNotFoundError(VhdxError, FileNotFoundError):
    """The file to open does not exist (catch it as either)."""

    def __str__(self) -> str:
        return self._message()


class DiskExistsError(VhdxError, FileExistsError):
    """Refusing to overwrite an existing file."""

    def __str__(self) -> str:
        return self._message()


def as_path(value: Any, what: str = "path") -> str:
    """``value`` (a ``str``, ``bytes`` or ``os.PathLike`` a caller hands in) as a ``str``;
    anything else is a :class:`UsageError` naming ``what``, not a ``TypeError`` from deep inside."""
    try:
        path = os.fspath(value)
    except TypeError:
        raise UsageError(f"{what} must be a path (str or os.PathLike), not {type(value).__name__}") from None
    return os.fsdecode(path) if isinstance(path, bytes) else path


def as_callback(value: Any, what: str = "progress") -> Any:
    """``value`` when it is None or callable; anything else is a :class:`UsageError` naming ``what``."""
    if value is not None and not callable(value):
        raise UsageError(f"{what} must be callable (or None), not {type(value).__name__}")
    return value
