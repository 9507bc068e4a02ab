"""Creating disks: a new dynamic or fixed disk, a differencing child, a Hyper-V style checkpoint."""

from __future__ import annotations

import os
import re
import uuid

from ..chains.disk import Disk
from ..chains.paths import win_absolute_path, win_relative_path, win_volume_path
from ..chains.resolve import open, stack
from ..errors import ChainError, UsageError, as_path
from ..file.create import create_image
from ..file.image import Image
from ..file.outputs import remove_quietly, sync_folder
from ..format import constants as C
from ..format.constants import MiB
from ..format.locator import KEY_ORDER, build_parent_locator, format_linkage


def create(path: str | os.PathLike[str], size: int | None = None, *, block_size: int | None = None,
           logical_sector_size: int | None = None, physical_sector_size: int | None = None,
           fixed: bool = False, parent: str | os.PathLike[str] | None = None) -> Disk:
    """Create a new disk and return it open for writing.

    Without ``parent``: a dynamic (or ``fixed``) disk of ``size`` bytes. With ``parent``:
    a differencing child whose size and sector sizes come from the parent.
    """
    path = as_path(path)
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


_CHECKPOINT_NAME = re.compile(r"^(?P<stem>.+)_[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
                              r"[0-9A-Fa-f]{12}\.avhdx$")


def locator_for(parent_path: str, child_path: str, parent_guid: uuid.UUID) -> dict[str, str]:
    """Parent locator entries in the forms and order Hyper-V writes (docs/format.md §4.9)."""
    parent_abs = os.path.abspath(parent_path)
    values = {
        "parent_linkage": format_linkage(parent_guid),
        "absolute_win32_path": win_absolute_path(parent_abs),
        "relative_path": win_relative_path(parent_abs, os.path.dirname(os.path.abspath(child_path))),
        "volume_path": win_volume_path(parent_abs),
        "parent_linkage2": format_linkage(C.ZERO_GUID),
    }
    return {k: values[k] for k in KEY_ORDER}


def create_child(path: str | os.PathLike[str], parent: str | os.PathLike[str], *,
                 block_size: int | None = None) -> Disk:
    """A new differencing disk over ``parent``; returns the child open for writing (parents read-only).

    The parent's whole chain must resolve before a child is made on top of it; it is resolved
    once, and the child is stacked on the open parent (which the child then owns).
    """
    path, parent = as_path(path), as_path(parent, "parent")
    pdisk = open(parent, "r")
    try:
        image = _create_over(path, parent, pdisk, block_size)
    except BaseException:
        pdisk.close()
        raise
    try:
        return stack(image, pdisk, given=parent)
    except BaseException:
        image.close()
        pdisk.close()
        remove_quietly(path)  # the child we just published: gone for good, folder synced
        sync_folder(os.path.dirname(os.path.abspath(path)))
        raise


def _create_over(path: str, parent: str, pdisk: Disk, block_size: int | None) -> Image:
    """Write the child file (published when complete), its locator naming ``parent`` from ``path``."""
    pimg = pdisk.image
    if pimg.log_was_dirty:
        raise ChainError(f"the parent's log needs replaying first: run 'vhdx replay {parent}'", path=parent)
    locator = locator_for(parent, path, pimg.header.data_write_guid)
    return create_image(path, pimg.size, block_size=block_size or 2 * C.MiB,
                        logical_sector_size=pimg.logical_sector_size,
                        physical_sector_size=pimg.physical_sector_size, page83_data=pimg.metadata.page83_data,
                        parent_locator=build_parent_locator(locator))


def checkpoint_stem(path: str) -> str:
    """The base disk's name: Hyper-V names checkpoints of checkpoints after the original .vhdx."""
    name = os.path.basename(path)
    m = _CHECKPOINT_NAME.match(name)
    return m.group("stem") if m else os.path.splitext(name)[0]


def snapshot(disk_path: str | os.PathLike[str], *, block_size: int | None = None) -> str:
    """Make ``<stem>_<GUID>.avhdx`` beside the disk, as Hyper-V names checkpoints; return its path."""
    disk_path = as_path(disk_path)
    folder = os.path.dirname(os.path.abspath(disk_path))
    child = os.path.join(folder, f"{checkpoint_stem(disk_path)}_{str(uuid.uuid4()).upper()}.avhdx")
    create_child(child, disk_path, block_size=block_size).close()
    return child
