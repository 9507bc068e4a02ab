"""What a differencing disk's parent tells about the disk: its logical sector size (which a
child must share) and its virtual size (a child's, when the child has lost its own)."""

from __future__ import annotations

import os

from ...chains.paths import candidate_paths
from ...chains.scan import open_found, regular_file_problem
from ...errors import VhdxError
from .meta import Params
from .report import REPAIRED, SalvageReport


def parent_shape(child_path: str, locator: dict[str, str] | None, given: str | None) -> tuple[int, int, str] | None:
    """(virtual size, logical sector size, path) of the parent: ``given``, else the first
    regular file the locator names that opens; None when none does."""
    paths = [given] if given else [p for _, p in candidate_paths(locator or {}, child_path, [])]
    for path in paths:
        if not path or regular_file_problem(path) or os.path.abspath(path) == os.path.abspath(child_path):
            continue
        try:
            image = open_found(path)
        except VhdxError:
            continue
        try:
            return image.size, image.logical_sector_size, path
        finally:
            image.close()
    return None


def fit_to_parent(p: Params, report: SalvageReport, child_path: str, given: str | None) -> None:
    """Take the sector size (and a lost virtual size) from the parent of a differencing disk."""
    if not p.has_parent and given is None:
        return
    shape = parent_shape(child_path, p.locator, given)
    if shape is None:
        return
    size, lss, path = shape
    if p.logical_sector_size != lss:
        was = "lost" if p.logical_sector_size is None else f"{p.logical_sector_size}"
        report.add("logical sector", REPAIRED, f"{was}; {lss} bytes, the parent's ({path})")
        p.logical_sector_size = lss
    if p.virtual_disk_size is None or p.virtual_disk_size % lss:
        report.add("virtual size", REPAIRED, f"lost; {size} bytes, the parent's ({path})")
        p.virtual_disk_size = size
