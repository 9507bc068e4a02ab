"""What compact, resize and convert share: the disks that depend on a file, zero tests, results.

A disk with differencing children is refused by ``compact`` and ``resize`` unless forced:
:func:`children_of` finds them among the disks of the file's folder (and of ``search_paths``)
by the same linkage rules as ``vhdx orphans``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from ..chains.paths import PathArgs
from ..errors import ChainError
from .orphans import find_chains

ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")


def folders_of(path: str, search_paths: PathArgs = ()) -> list[str]:
    """The folder of ``path`` and the search folders, each once."""
    extra = [search_paths] if isinstance(search_paths, (str, os.PathLike)) else list(search_paths or ())
    out: list[str] = []
    for folder in [os.path.dirname(os.path.abspath(path))] + [os.path.abspath(os.fspath(f)) for f in extra]:
        if folder not in out:
            out.append(folder)
    return out


def children_of(path: str, search_paths: PathArgs = ()) -> list[str]:
    """The disks (in the file's folder and ``search_paths``) whose parent is ``path``."""
    target = os.path.realpath(path)
    children: list[str] = []
    for folder in folders_of(path, search_paths):
        forest = find_chains(folder)
        for node in forest.nodes.values():
            parent = node.parent or node.external_parent
            if parent and os.path.realpath(parent) == target and node.path not in children:
                children.append(node.path)
    return sorted(children)


def refuse_children(path: str, verb: str, force: bool, search_paths: PathArgs = ()) -> list[str]:
    """The children of ``path``; raises :class:`ChainError` when there are some and not ``force``."""
    children = children_of(path, search_paths)
    if children and not force:
        names = ", ".join(os.path.basename(c) for c in children[:3]) + (" ..." if len(children) > 3 else "")
        raise ChainError(f"{len(children)} differencing disk(s) depend on it ({names}); {verb} {why(verb)} "
                         f"(--force / force=True to go ahead)", path=path)
    return children


def why(verb: str) -> str:
    """Why a verb refuses a disk with children."""
    if verb == "compact":
        return "would not change what they read, but they are not checked"
    return "changes the disk they are based on, and Hyper-V would report their chain broken"


def all_zero(view: Any) -> bool:
    """True when every byte of ``view`` is zero (8 bytes at a time where the length allows)."""
    arr = np.frombuffer(view, dtype=np.uint8)
    words = arr[:arr.size // 8 * 8].view(np.uint64)
    if words.size and words.max():      # max: a plain SIMD reduction, twice as fast as any() here
        return False
    return not arr[words.size * 8:].any()


PROBE = 64 << 10        # bytes read first: a block of data is told from a block of zeros by its start
SCAN_PIECE = 1 << 20    # then the rest, a piece at a time: small pieces stay in the CPU cache


def last_nonzero(view: Any) -> int:
    """The index of the last non-zero byte of ``view``, or -1."""
    arr = np.frombuffer(view, dtype=np.uint8)
    nz = np.flatnonzero(arr)
    return int(nz[-1]) if nz.size else -1


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int = 2) -> Iterator[R]:
    """``fn(item)`` for each item, computed on ``workers`` threads, yielded in the items' order.

    For work that releases the GIL (``os.preadv``, numpy reductions): reading zeros on two
    cores. An exception raised by ``fn`` is raised here, at its item. Closing the iterator (or
    leaving it by an exception) stops the threads before it returns.
    """
    todo = list(items)
    results: dict[int, Any] = {}
    cond = threading.Condition()
    state = {"next": 0, "stop": False}

    def work() -> None:
        while True:
            with cond:
                if state["stop"] or state["next"] >= len(todo):
                    return
                i = state["next"]
                state["next"] += 1
            try:
                value: Any = (True, fn(todo[i]))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
                value = (False, e)
            with cond:
                results[i] = value
                cond.notify_all()

    threads = [threading.Thread(target=work, name="vhdx-scan", daemon=True) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    try:
        for i in range(len(todo)):
            with cond:
                cond.wait_for(lambda: i in results)
                ok, value = results.pop(i)
            if not ok:
                raise value
            yield value
    finally:
        with cond:
            state["stop"] = True
        for t in threads:
            t.join()
