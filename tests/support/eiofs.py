"""A one-file FUSE file system whose reads fail: a real EIO from the kernel, for the read paths
that Storage-level fault injection cannot reach (a memory map of the file).

Run as ``python eiofs.py BACKING MOUNTPOINT LO HI``: ``MOUNTPOINT/disk.vhdx`` serves the bytes
of ``BACKING``, read-only, and every read that touches ``[LO, HI)`` fails with EIO. Stays in the
foreground until unmounted. Tests use it through :func:`support.mounting.eio_mounted`.
"""

from __future__ import annotations

import errno
import os
import stat
import sys

NAME = "disk.vhdx"


def main(backing: str, mountpoint: str, lo: int, hi: int) -> None:
    """Serve ``backing`` as ``mountpoint/disk.vhdx`` until unmounted."""
    import mfusepy

    size = os.stat(backing).st_size
    fd = os.open(backing, os.O_RDONLY)

    class Ops(mfusepy.Operations):
        def getattr(self, path: str, fh: int | None = None) -> dict:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            if path == "/" + NAME:
                return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": size}
            raise mfusepy.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", NAME]

        def open(self, path: str, flags: int) -> int:
            return 0

        def read(self, path: str, length: int, offset: int, fh: int) -> bytes:
            if offset < hi and offset + length > lo:
                raise mfusepy.FuseOSError(errno.EIO)
            return os.pread(fd, length, offset)

    mfusepy.FUSE(Ops(), mountpoint, foreground=True, ro=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
