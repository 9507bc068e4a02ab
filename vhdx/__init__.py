"""vhdx: Hyper-V VHDX virtual disks and AVHDX differencing chains, in pure Python.

Public API (see docs/guide.md)::

    disk = vhdx.create("disk.vhdx", 64 << 20)            # dynamic, 32 MiB blocks; open for writing
    disk = vhdx.open("disk.vhdx")                         # read-only (O_RDONLY, log replayed in memory)
    child = vhdx.snapshot("disk.vhdx")                    # disk_<GUID>.avhdx beside it
    disk = vhdx.open(child, "r+", search_paths=["/backup"])   # parents always read-only
    vhdx.chain(child).layers                              # how each parent was found
    vhdx.find_chains("/vms")                              # every chain in a folder
    vhdx.merge(child)                                     # like Merge-VHD; crash-safe, restartable

Every error is a :class:`VhdxError` with ``.path`` and ``.offset``.
"""

__version__ = "0.1.0"

from .errors import (ChainCycleError, ChainError, ChecksumError, CorruptError, DiskExistsError,  # noqa: E402
                     LogReplayError, MergeError, ParentMismatchError, ParentNotFoundError, ReadOnlyError,
                     TruncatedError, UnsupportedError, UsageError, VhdxError)
from .errors import LockedError  # noqa: E402
from .disk import Disk  # noqa: E402
from .api import create, open  # noqa: E402
from .chains import Chain, Forest, Layer, Node, chain, find_chains, reparent, snapshot  # noqa: E402
from .merging import MergePlan, MergeResult, merge  # noqa: E402

__all__ = [
    "__version__", "open", "create", "Disk", "snapshot", "chain", "Chain", "Layer", "reparent",
    "find_chains", "Forest", "Node", "merge", "MergePlan", "MergeResult",
    "VhdxError", "CorruptError", "ChecksumError", "TruncatedError", "UnsupportedError", "LogReplayError",
    "ChainError", "ParentNotFoundError", "ParentMismatchError", "ChainCycleError", "ReadOnlyError",
    "MergeError", "UsageError", "DiskExistsError", "LockedError",
]
