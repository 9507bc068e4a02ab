"""The entry points: open and create (re-exported by the package)."""

from __future__ import annotations

import os
from typing import Any

from .disk import Disk
from .errors import UsageError
from .format.constants import MiB
from .image import Image, create_image
from .storage import Storage


def open(path: str | os.PathLike[str], mode: str = "r", *, storage: Storage | None = None,
         share: bool = False, **chain_options: Any) -> Disk:
    """Open a VHDX or AVHDX file as a :class:`Disk` (``mode`` "r" or "r+").

    Every file of the chain is locked as QEMU locks images: shared for reading (the file
    and its parents), exclusive for writing (the file itself; its parents stay shared).
    A file another process writes raises :class:`LockedError`. ``share=True`` (read-only)
    takes no locks and ignores others': for inspecting a disk a running VM holds, whose
    content may be changing under you.
    """
    image = Image.open(path, mode, storage=storage, share=share)
    try:
        if image.has_parent or chain_options:
            from .chains import attach_parents
            if share:
                chain_options["share"] = True
            return attach_parents(image, **chain_options)
        return Disk(image)
    except BaseException:
        image.close(_failed=True)
        raise


def create(path: str | os.PathLike[str], size: int | None = None, *, block_size: int | None = None,
           logical_sector_size: int | None = None, physical_sector_size: int | None = None,
           fixed: bool = False, parent: str | os.PathLike[str] | None = None) -> Disk:
    """Create a new disk and return it open for writing.

    Without ``parent``: a dynamic (or ``fixed``) disk of ``size`` bytes. With ``parent``:
    a differencing child whose size and sector sizes come from the parent.
    """
    if parent is not None:
        if size is not None or logical_sector_size is not None or physical_sector_size is not None or fixed:
            raise UsageError("a differencing disk takes its size and sector sizes from its parent; "
                             "give only a block size (--block-size)", path=path)
        from .chains import create_child
        return create_child(path, parent, block_size=block_size)
    if size is None:
        raise UsageError("size is required", path=path)
    image = create_image(path, size, block_size=32 * MiB if block_size is None else block_size,
                         logical_sector_size=512 if logical_sector_size is None else logical_sector_size,
                         physical_sector_size=4096 if physical_sector_size is None else physical_sector_size,
                         fixed=fixed)
    return Disk(image)


__all__ = ["open", "create"]
