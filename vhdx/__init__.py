"""vhdx: Hyper-V VHDX virtual disks and AVHDX differencing chains, in pure Python.

Public API (see docs/guide.md)::

    disk = vhdx.create("disk.vhdx", 64 << 20)            # dynamic, 32 MiB blocks; open for writing
    disk = vhdx.open("disk.vhdx")                         # read-only (O_RDONLY, log replayed in memory)
    child = vhdx.snapshot("disk.vhdx")                    # disk_<GUID>.avhdx beside it
    disk = vhdx.open(child, "r+", search_paths=["/backup"])   # parents always read-only
    vhdx.chain(child).layers                              # how each parent was found
    vhdx.find_chains("/vms")                              # every chain in a folder
    vhdx.merge(child)                                     # like Merge-VHD; crash-safe, restartable
    vhdx.export(child, "disk.raw")                        # the virtual disk as a sparse raw file
    vhdx.hash(child, layer=1)                             # SHA-256 of the disk as of its parent

Every error is a :class:`VhdxError` with ``.path`` and ``.offset``. This module only
re-exports; the code lives on four floors (docs/architecture.md).
"""

from ._version import __version__
from .chains.disk import Disk
from .chains.resolve import Chain, Layer, chain, open
from .errors import (ChainCycleError, ChainError, ChecksumError, CorruptError, DiskExistsError, LockedError,
                     LogReplayError, MergeError, ParentMismatchError, ParentNotFoundError, ReadOnlyError,
                     TruncatedError, UnsupportedError, UsageError, VhdxError)
from .ops.create import create, snapshot
from .ops.export import ExportResult, export, hash
from .ops.merge.plan import MergePlan
from .ops.merge.run import MergeResult, merge
from .ops.orphans import Forest, Node, find_chains
from .ops.reparent import reparent

__all__ = [
    "__version__", "open", "create", "Disk", "snapshot", "chain", "Chain", "Layer", "reparent",
    "find_chains", "Forest", "Node", "merge", "MergePlan", "MergeResult", "export", "hash", "ExportResult",
    "VhdxError", "CorruptError", "ChecksumError", "TruncatedError", "UnsupportedError", "LogReplayError",
    "ChainError", "ParentNotFoundError", "ParentMismatchError", "ChainCycleError", "ReadOnlyError",
    "MergeError", "UsageError", "DiskExistsError", "LockedError",
]
