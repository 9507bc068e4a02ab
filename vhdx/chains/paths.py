"""Parent locator paths mapped to this machine: Windows, Wine (Z:) and WSL (/mnt/c) forms.

Which local paths to try for a child's parent, in the specification's order (relative,
volume, absolute; docs/format.md §9.3), then by file name beside the child and in the
search folders; and the forms we write ourselves for a new child's locator.
"""

from __future__ import annotations

import ntpath
import os
import re
import uuid
from typing import Iterable, Sequence, Union

from ..errors import UsageError, as_path


PathArg = Union[str, "os.PathLike[str]"]  # one path, as the public API takes it
PathArgs = Union[PathArg, Iterable[PathArg]]  # one path or several


def path_list(paths: PathArgs | None) -> list[str]:
    """One path (a str or a PathLike) or several, as a list of str: a str is one path, never its letters."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    try:
        items = list(paths)
    except TypeError:
        raise UsageError(f"a path or a list of paths, not {type(paths).__name__}") from None
    return [as_path(p) for p in items]


# Wine maps drive Z: to "/"; we write and read absolute paths of this machine that way.
POSIX_DRIVE = "Z:"


def win_relative_path(parent: str, child_dir: str) -> str:
    """``parent`` relative to ``child_dir`` as a Windows path (``.\\base.vhdx``, ``..\\x\\base.vhdx``)."""
    rel = os.path.relpath(parent, child_dir).replace(os.sep, "\\")
    return rel if rel.startswith("..") else ".\\" + rel


def win_absolute_path(path: str) -> str:
    """This machine's absolute path as a Win32 path: ``/a/b`` -> ``Z:\\a\\b`` (Wine's mapping)."""
    return POSIX_DRIVE + os.path.abspath(path).replace(os.sep, "\\")


def volume_guid(path: str) -> uuid.UUID:
    """A stable stand-in for the Windows volume GUID of the file system holding ``path``."""
    st = os.stat(os.path.dirname(os.path.abspath(path)) or ".")
    return uuid.uuid5(uuid.NAMESPACE_URL, f"vhdx-volume:{st.st_dev}")


def win_volume_path(path: str) -> str:
    """``path`` in the volume form ``\\\\?\\Volume{GUID}\\...`` (with :func:`volume_guid`)."""
    return f"\\\\?\\Volume{{{volume_guid(path)}}}" + os.path.abspath(path).replace(os.sep, "\\")


def case_insensitive(path: str) -> str | None:
    """``path`` itself if it exists, else the one entry of its folder that matches it ignoring case."""
    if os.path.exists(path):
        return path
    folder, name = os.path.split(path)
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return None
    lower = name.lower()
    for entry in entries:
        if entry.lower() == lower:
            return os.path.join(folder, entry)
    return None


def candidate_paths(locator: dict[str, str], child_path: str, search_paths: Sequence[str]) -> list[tuple[str, str]]:
    """(how, local path) pairs to try, in order, for a child's parent locator."""
    child_dir = os.path.dirname(os.path.abspath(child_path))
    out: list[tuple[str, str]] = []

    def by_name(key: str, win_path: str) -> None:
        name = ntpath.basename(win_path)
        if not name:
            return
        out.append((f"{key} (file name beside the child)", os.path.join(child_dir, name)))
        for d in search_paths:
            out.append((f"{key} (file name in {d})", os.path.join(d, name)))

    rel = locator.get("relative_path")
    if rel:
        parts = [p for p in rel.replace("/", "\\").split("\\") if p not in ("", ".")]
        out.append(("relative_path", os.path.normpath(os.path.join(child_dir, *parts))))
    vol = locator.get("volume_path")
    if vol:
        m = re.match(r"^\\\\\?\\Volume\{[^}]*\}(\\.*)$", vol)
        if m:
            out.append(("volume_path", m.group(1).replace("\\", "/")))
        by_name("volume_path", vol)
    ab = locator.get("absolute_win32_path")
    if ab:
        p = ab[4:] if ab.startswith("\\\\?\\") else ab
        m = re.match(r"^([A-Za-z]):\\(.*)$", p)
        if m:
            drive, rest = m.group(1).upper(), m.group(2).replace("\\", "/")
            if drive + ":" == POSIX_DRIVE:
                out.append(("absolute_win32_path", "/" + rest))
            out.append(("absolute_win32_path (WSL mount)", f"/mnt/{drive.lower()}/{rest}"))
        by_name("absolute_win32_path", ab)
    seen: set[str] = set()
    unique = []
    for how, path in out:
        if path not in seen:
            seen.add(path)
            unique.append((how, path))
    return unique


def file_key(path: str) -> tuple[int, int]:
    """The file's identity (st_dev, st_ino): two paths name one file when their keys are equal."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)
