"""Reparent: point a differencing disk at another parent, like Set-VHD -ParentPath."""

from __future__ import annotations

import os
from typing import Any

from ..chains.paths import file_key
from ..chains.scan import linkage_of
from ..errors import ChainCycleError, ChainError, ParentMismatchError, as_path
from ..file.image import Image
from ..format.locator import format_linkage
from .create import locator_for


def _check_fits(image: Image, child: str, new_parent: str, psize: int, plss: int) -> None:
    """The child must be a differencing disk, and the new parent another file of its size and sectors."""
    if not image.has_parent:
        raise ChainError("not a differencing disk", path=child)
    if os.path.exists(new_parent) and file_key(new_parent) == file_key(child):
        raise ChainCycleError("a disk cannot be its own parent", path=child)
    if plss != image.logical_sector_size or psize != image.size:
        raise ChainError(f"new parent {new_parent} has {psize} bytes / {plss}-byte sectors, the child "
                         f"{image.size} / {image.logical_sector_size}", path=child)


def reparent(child: str | os.PathLike[str], new_parent: str | os.PathLike[str], *,
             ignore_id_mismatch: bool = False) -> dict[str, Any]:
    """Point ``child`` at ``new_parent`` (like ``Set-VHD -ParentPath``); returns what changed.

    The paths are rewritten through the log. The linkage is rewritten to the new parent's
    DataWriteGuid only with ``ignore_id_mismatch`` (otherwise the GUIDs must already match).
    """
    child, new_parent = as_path(child, "child"), as_path(new_parent, "new parent")
    pimg = Image.open(new_parent, "r")
    try:
        parent_guid = pimg.header.data_write_guid
        psize, plss = pimg.size, pimg.logical_sector_size
    finally:
        pimg.close()
    image = Image.open(child, "r+")
    try:
        _check_fits(image, child, new_parent, psize, plss)
        l1, l2 = linkage_of(image)
        old = dict(image.metadata.parent_locator or {})
        linkage_changed = False
        if parent_guid not in {g for g in (l1, l2) if g is not None}:
            if not ignore_id_mismatch:
                raise ParentMismatchError(
                    f"new parent {new_parent} has DataWriteGuid {parent_guid}, the child's parent_linkage is "
                    f"{l1}; use --ignore-id-mismatch only if its contents equal the original parent's",
                    path=child, expected=l1, found=parent_guid)
            linkage_changed = True
        new = locator_for(new_parent, child, parent_guid if linkage_changed else (l1 or parent_guid))
        if not linkage_changed and l2 is not None:
            new["parent_linkage2"] = format_linkage(l2)
        for key, value in old.items():  # keep keys we do not write ourselves
            new.setdefault(key, value)
        image.write_parent_locator(new)
    finally:
        image.close()
    return dict(child=child, new_parent=new_parent, old_locator=old, new_locator=new,
                linkage_changed=linkage_changed)
