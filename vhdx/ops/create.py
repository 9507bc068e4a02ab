"""Creating disks: a new dynamic or fixed disk, or a differencing child of an existing one."""

from __future__ import annotations

import os

from ..chains.disk import Disk
from ..chains.resolve import create_child
from ..errors import UsageError
from ..file.image import create_image
from ..format.constants import MiB


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
        return create_child(path, parent, block_size=block_size)
    if size is None:
        raise UsageError("size is required", path=path)
    image = create_image(path, size, block_size=32 * MiB if block_size is None else block_size,
                         logical_sector_size=512 if logical_sector_size is None else logical_sector_size,
                         physical_sector_size=4096 if physical_sector_size is None else physical_sector_size,
                         fixed=fixed)
    return Disk(image)
