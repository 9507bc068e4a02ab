"""ext2/3/4 folders read from their blocks, for the folder walk of ``diff --files``.

Listing a folder through The Sleuth Kit loads every entry's inode as well; a walk that only
looks for names needs the entries alone. :func:`folder_entries` reads a folder's data blocks
(their runs from The Sleuth Kit) and parses the linear entries (inode, record length, name
length, file type, name). Hashed (htree) folders parse the same way: their index blocks hold one
empty entry spanning the block. Every record length is checked against its block, so a crafted
folder ends the block, never the loop; a folder larger than ``MAX_FOLDER`` or kept inside its
inode (inline data) is left to The Sleuth Kit (None).
"""

from __future__ import annotations

import struct
from typing import Any

from ..chains.disk import Disk
from .fsview import data_runs

MAX_FOLDER = 256 << 20       # bytes of one folder read here at most
DIR_TYPE = 2
KNOWN_TYPES = range(1, 8)


def parse_block(block: bytes) -> list[tuple[str, int, bool | None]]:
    """(name, inode, is a folder or None when the entry does not say) of one folder block's entries."""
    out: list[tuple[str, int, bool | None]] = []
    pos, size = 0, len(block)
    while pos + 8 <= size:
        inode, rec_len, name_len, kind = struct.unpack_from("<IHBB", block, pos)
        if rec_len in (0, 65535) and size == 65536:
            rec_len = 65536
        if rec_len < 8 or rec_len % 4 or pos + rec_len > size:
            break
        if inode and name_len and 8 + name_len <= rec_len:
            name = block[pos + 8:pos + 8 + name_len].decode("utf-8", "surrogateescape")
            out.append((name, inode, (kind == DIR_TYPE) if kind in KNOWN_TYPES else None))
        pos += rec_len
    return out


def folder_entries(tsk: Any, f: Any, disk: Disk, base: int, block: int) -> list[tuple[str, int, bool | None]] | None:
    """The entries of the folder ``f`` (a TSK file), read from its blocks on ``disk``; None when
    The Sleuth Kit should list it instead (inline data, no runs, too large)."""
    runs, resident = data_runs(tsk, f, base, block)
    if resident or not runs or sum(n for _, _, n in runs) > MAX_FOLDER:
        return None
    out: list[tuple[str, int, bool | None]] = []
    for _, at, length in runs:
        buf = bytearray(length)
        if disk.pread_into(memoryview(buf), at) < length:
            return None
        for k in range(0, length, block):
            out += parse_block(bytes(buf[k:k + block]))
    return out
