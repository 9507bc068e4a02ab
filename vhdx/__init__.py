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

from ._version import __version__
from .chains.disk import Disk
from .chains.resolve import Chain, Layer, chain, open
from .errors import (ChainCycleError, ChainError, ChecksumError, CorruptError, DiskExistsError, DiskNotFoundError,
                     LockedError, LogReplayError, MergeError, ParentMismatchError, ParentNotFoundError,
                     ReadOnlyError, TruncatedError, UnsupportedError, UsageError, VhdxError)
from .ops.create import create, snapshot
from .ops.export import ExportResult, export, hash
from .ops.merge.plan import MergePlan
from .ops.merge.run import MergeResult, merge
from .ops.orphans import Forest, Node, find_chains
from .ops.repair import ReplayResult, SalvageReport, repair, replay
from .ops.reparent import reparent

__all__ = [
    "__version__", "open", "create", "Disk", "snapshot", "chain", "Chain", "Layer", "reparent",
    "find_chains", "Forest", "Node", "merge", "MergePlan", "MergeResult", "export", "hash", "ExportResult",
    "repair", "replay", "SalvageReport", "ReplayResult",
    "VhdxError", "CorruptError", "ChecksumError", "TruncatedError", "UnsupportedError", "LogReplayError",
    "ChainError", "ParentNotFoundError", "ParentMismatchError", "ChainCycleError", "ReadOnlyError",
    "MergeError", "UsageError", "DiskExistsError", "DiskNotFoundError", "LockedError",
]
