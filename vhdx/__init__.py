"""vhdx: Hyper-V VHDX virtual disks and AVHDX differencing chains, in pure Python.

Public API only (see docs/guide.md). A disk, a checkpoint, a merge back (this runs as a
doctest: tests/ops/test_public_api.py)::

    >>> import os, tempfile, vhdx
    >>> base = os.path.join(tempfile.mkdtemp(), "disk.vhdx")
    >>> with vhdx.create(base, 64 << 20) as disk:        # dynamic, 32 MiB blocks; open for writing
    ...     disk.write(b"hello")
    5
    >>> child = vhdx.snapshot(base)                       # disk_<GUID>.avhdx beside it
    >>> with vhdx.open(child, "r+") as disk:              # parents are always opened read-only
    ...     _ = disk.seek(4096)
    ...     disk.write(b"changed in the checkpoint")
    25
    >>> with vhdx.open(child) as disk:                    # read-only; an io.RawIOBase
    ...     disk.read(5), disk.size
    (b'hello', 67108864)
    >>> [layer.found_by for layer in vhdx.chain(child).layers]   # how each parent was found
    ['given', 'relative_path']
    >>> before = vhdx.hash(child)                         # SHA-256 of the virtual disk
    >>> vhdx.export(child, base[:-5] + ".raw").size       # a sparse raw image of it
    67108864
    >>> vhdx.merge(child).deleted == [child]              # like Merge-VHD; crash-safe, restartable
    True
    >>> vhdx.hash(base) == before
    True

Also ``vhdx.find_chains(folder)`` (every chain in a folder), ``vhdx.reparent(child,
parent)``, ``vhdx.open(path, search_paths=[...])``. Every error is a :class:`VhdxError`
with ``.path`` and ``.offset``. This module only re-exports; the code lives on four floors
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (ChainCycleError, ChainError, ChecksumError, CorruptError, DiskExistsError, DiskNotFoundError,
                     LockedError, LogReplayError, MergeError, ParentMismatchError, ParentNotFoundError,
                     ReadOnlyError, TruncatedError, UnsupportedError, UsageError, VhdxError)

if TYPE_CHECKING:
    from .chains.disk import Disk
    from .chains.resolve import Chain, Layer, chain, open
    from .ops.compact import CompactResult, compact
    from .ops.convert import ConvertResult, convert
    from .ops.create import create, snapshot
    from .ops.export import ExportResult, export, hash
    from .ops.merge.plan import MergePlan
    from .ops.merge.run import MergeResult, merge
    from .ops.orphans import Forest, Node, find_chains
    from .ops.repair import ReplayResult, SalvageReport, repair, replay
    from .ops.reparent import reparent
    from .ops.resize import ResizeResult, minimum_size, resize

__all__ = [
    "__version__", "open", "create", "Disk", "snapshot", "chain", "Chain", "Layer", "reparent",
    "find_chains", "Forest", "Node", "merge", "MergePlan", "MergeResult", "export", "hash", "ExportResult",
    "compact", "CompactResult", "resize", "minimum_size", "ResizeResult", "convert", "ConvertResult",
    "repair", "replay", "SalvageReport", "ReplayResult",
    "VhdxError", "CorruptError", "ChecksumError", "TruncatedError", "UnsupportedError", "LogReplayError",
    "ChainError", "ParentNotFoundError", "ParentMismatchError", "ChainCycleError", "ReadOnlyError",
    "MergeError", "UsageError", "DiskExistsError", "DiskNotFoundError", "LockedError",
]

# Public name -> the module that defines it. These modules import numpy and construct, so they are
# imported at the first use of one of their names (PEP 562): ``import vhdx`` and ``vhdx --help`` stay
# light. The names are the ones of the TYPE_CHECKING block above (tests/test_architecture.py checks it).
LAZY = {
    "Disk": "chains.disk", "Chain": "chains.resolve", "Layer": "chains.resolve", "chain": "chains.resolve",
    "open": "chains.resolve", "create": "ops.create", "snapshot": "ops.create", "ExportResult": "ops.export",
    "export": "ops.export", "hash": "ops.export", "MergePlan": "ops.merge.plan", "MergeResult": "ops.merge.run",
    "merge": "ops.merge.run", "Forest": "ops.orphans", "Node": "ops.orphans", "find_chains": "ops.orphans",
    "reparent": "ops.reparent", "compact": "ops.compact", "CompactResult": "ops.compact",
    "convert": "ops.convert", "ConvertResult": "ops.convert", "resize": "ops.resize",
    "minimum_size": "ops.resize", "ResizeResult": "ops.resize", "repair": "ops.repair", "replay": "ops.repair",
    "SalvageReport": "ops.repair", "ReplayResult": "ops.repair",
}


def __getattr__(name: str) -> Any:
    """Import the module of a public name at its first use, and keep the name here."""
    where = LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = sys.modules.get(f"{__name__}.{where}")  # loaded already (not half-way): no import machinery
    if module is None or getattr(module.__spec__, "_initializing", False):
        module = importlib.import_module(f"{__name__}.{where}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, loaded or not."""
    return sorted(set(globals()) | set(__all__))
