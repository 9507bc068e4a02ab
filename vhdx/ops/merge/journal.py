"""The merge journal's home: the user metadata item a merge keeps in its destination."""

from __future__ import annotations

import json
import uuid

from ...chains.scan import open_found
from ...errors import VhdxError
from ...file.image import Image



def merge_in_progress(image: Image) -> bool:
    """Whether an interrupted merge left its journal in this file's metadata."""
    raw = image.metadata.items.get((MERGE_JOURNAL_GUID, True))
    if raw is None:
        return False
    try:
        return json.loads(raw.decode()).get("state") != "done"
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return True


MERGE_JOURNAL_GUID = uuid.UUID("5b1f2a4e-9c0d-4d7e-8a53-7d6c3e9b1a01")  # our user item (vhdx.merge)


def interrupted_merge_at(path: str, *, share: bool = False) -> bool:
    """Whether the file at ``path`` holds the journal of an interrupted merge (False if unreadable)."""
    try:
        image = open_found(path, share=share)
    except (VhdxError, OSError):
        return False
    try:
        return merge_in_progress(image)
    finally:
        image.close()
