"""Where a chain's virtual bytes are, in one BAT lookup per layer: the fast paths of a Disk's reads.

A read whose range lies in one place (one run of one layer's file, or zeros) is one system
call: :meth:`Disk.readinto <vhdx.chains.disk.Disk.readinto>` of a few KiB with ``preadv``, and
:meth:`Disk.read <vhdx.chains.disk.Disk.read>` with ``os.pread``, whose new ``bytes`` the kernel
fills directly. Anything else (a partially present block, the end of a layer, a read-only
overlay of a dirty log, a mix of places) is answered None, and the Disk's general path, which
handles every case and reports every error, reads it.

:func:`layers_of` takes what the lookups need from each layer once per Disk (the BAT as a
memoryview of uint64, shifts instead of divisions, the states that mean "here" and "below").
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import numpy as np

from ..file.buffers import BOUNCE_MIN, slow_to_copy_into
from ..file.storage import FileStorage
from ..format import constants as C

RUN_BLOCKS = 256  # the most blocks one lookup walks for a single run in a file (else the general path)
_STATE_MASK, _OFFSET_MASK = int(C.BAT_STATE_MASK), int(C.BAT_FILE_OFFSET_MASK)
_FULLY, _PARTIALLY = int(C.PAYLOAD_BLOCK_FULLY_PRESENT), int(C.PAYLOAD_BLOCK_PARTIALLY_PRESENT)
_HEADER_SECTION = int(C.HEADER_SECTION_SIZE)  # no block starts inside the header section
_NOT_PRESENT = int(C.PAYLOAD_BLOCK_NOT_PRESENT)

Place = tuple[int | None, int]  # (fd, file_offset) in a file, or (None, 0): zeros


class Layer(NamedTuple):
    """One layer of a chain as the lookups see it (see :func:`layers_of`)."""

    image: Any                 # the Image
    bat: Any                   # the BAT object the lookups were built on (a changed one: stale)
    entries: memoryview        # the BAT as uint64
    shift: int                 # log2 of the block size
    ratio_shift: int           # log2 of the chunk ratio (a sector bitmap entry every 2**this)
    fd: int | None             # the file's descriptor; None: read through the general path
    size: int                  # the layer's virtual size
    here: tuple[int, ...]      # the states whose bytes are in this file
    down: int                  # the state that sends a read to the parent (-1: none)
    limit: int                 # the last block start a lazily checked BAT may hold unchecked


def layers_of(disk: Any) -> list[Layer]:
    """Per layer of ``disk``'s chain, leaf first, what the lookups need; empty (no lookup ever
    answers) for a writable disk, whose BAT changes as it is written, or a big-endian host."""
    layers: list[Layer] = []
    while disk is not None:
        im = disk.image
        if im.writable or sys.byteorder != "little":
            return []
        storage = im.storage
        fd = storage.fileno() if type(storage) is FileStorage else None  # an overlay, a test double: no
        bs, ratio = im.block_size, im.geometry.chunk_ratio
        # powers of two in every valid file (docs/format.md §4.3, §5.1): lookups are shifts
        if bs & (bs - 1) or ratio & (ratio - 1):
            return []
        entries = memoryview(im.bat)  # numpy exports little-endian uint64 as "L" (or "Q") here
        if entries.format not in ("L", "Q") or entries.itemsize != 8 or entries.ndim != 1:
            entries = memoryview(np.asarray(im.bat).view(np.uint8).data).cast("Q")
        here = (_FULLY,) if im.has_parent else (_FULLY, _PARTIALLY)
        down = _NOT_PRESENT if im.has_parent else -1
        # the last start a whole block fits after, in a lazily checked BAT; checked ones need no test
        limit = im.checked_file_size - bs if im.bat_lazy else 1 << 64
        layers.append(Layer(im, im.bat, entries, bs.bit_length() - 1, ratio.bit_length() - 1, fd, im.size,
                            here, down, limit))
        disk = disk.parent
    return layers


def locate(layers: list[Layer], offset: int, n: int) -> Place | None:
    """Where the ``n`` virtual bytes at ``offset`` are, when they are in one place:
    ``(fd, file_offset)`` in one layer's file, ``(None, 0)`` zeros; None: ask the general path.

    Found when the range lies inside one block of each layer it reaches and that block is
    present, not present (the next layer down) or reads as zeros; or, in the leaf, over
    several blocks that :func:`locate_run` finds in one place.
    """
    if not layers:
        return None
    for image, bat, entries, shift, ratio_shift, fd, size, here, down, limit in layers:
        if image.closed or image.bat is not bat or offset + n > size:
            return None
        block = offset >> shift
        within = offset - (block << shift)
        if within + n > 1 << shift:  # more than one block: found in the leaf alone, or not at all
            return locate_run(layers[0], offset, n) if image is layers[0].image else None
        entry = entries[block + (block >> ratio_shift)]
        state = entry & _STATE_MASK
        if state in here:  # the bytes are in this file
            # a lazily checked BAT: the entry is checked before first use (inline, the common case)
            if not _HEADER_SECTION <= entry & _OFFSET_MASK <= limit:
                image.check_read_entry(block, entry)
            return (fd, (entry & _OFFSET_MASK) + within) if fd is not None else None
        elif state != down:  # not "the next layer down" (NOT_PRESENT in a differencing layer)
            if state == _PARTIALLY:
                return None  # its sector bitmap says which sectors are here: the general path
            break  # zeros: ZERO, UNMAPPED, UNDEFINED, or NOT_PRESENT without a parent
    return None, 0


def locate_run(layer: Layer, offset: int, n: int) -> Place | None:
    """:func:`locate` for a range over several blocks of one layer: ``(fd, file_offset)`` when
    every block is in this file and they follow each other there, ``(None, 0)`` when every
    block reads as zeros here; None otherwise (a block in the parent, a partially present one
    in a differencing layer, a mix, or more than ``RUN_BLOCKS`` blocks)."""
    image, _, entries, shift, ratio_shift, fd, _, here, down, limit = layer
    first, last = offset >> shift, (offset + n - 1) >> shift
    if fd is None or last - first >= RUN_BLOCKS:
        return None
    start, zeros = None, False
    for block in range(first, last + 1):
        entry = entries[block + (block >> ratio_shift)]
        state = entry & _STATE_MASK
        if state in here:
            if not _HEADER_SECTION <= entry & _OFFSET_MASK <= limit:
                image.check_read_entry(block, entry)
            at = (entry & _OFFSET_MASK) - ((block - first) << shift)  # where the run would start
            if start is None:
                start = at
            elif at != start:
                return None
        elif state == down or state == _PARTIALLY:
            return None
        else:
            zeros = True
    if start is None:
        return None, 0
    return None if zeros else (fd, start + offset - (first << shift))


def read_here(fd: int, view: memoryview, file_offset: int) -> bool:
    """One ``preadv`` of all of ``view`` from ``file_offset``; False sends the read to the
    general path: a short read or an error (read again there, and reported with the offset), or
    a large read the kernel would copy into ``view`` slowly (copied from a map there)."""
    if len(view) >= BOUNCE_MIN and slow_to_copy_into(view, file_offset):
        return False
    try:
        return os.preadv(fd, [view], file_offset) == len(view)
    except OSError:
        return False
