"""Which source of a merge defines each byte: the extents to copy, window by window.

The sources' BATs are read once per merge as their non-zero entries (:class:`BatView`), so
planning follows the data, not the virtual size. The virtual disk is cut into windows (at least
64 MiB, whole blocks of every image); a window in which no source defines anything is skipped.

Most windows are planned as intervals (:func:`planned`): each source's listed blocks and runs
of zero blocks are byte intervals, the intervals of all sources are cut at every boundary, and
each piece goes to the newest source that covers it, all with a few numpy operations for a group
of up to :data:`GROUP_WINDOWS` windows at once (a 1 TiB chain with 512 changed blocks plans in
milliseconds). Only a window in which a differencing source has a PARTIALLY_PRESENT block is
planned sector by sector (:func:`owners`), from that block's sector bitmap.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ...errors import MergeError
from ...file.image import Image
from ...format import bat as batmod
from ...format import bitmap as bitmapmod
from ...format import constants as C

# Owner codes of the sector-by-sector planner (uint16 per sector): a source's index, or one of
# these two. A chain holds at most resolve.MAX_DEPTH (1024) layers, far below them.
TRANSPARENT = 0xFFFF
ZERO = 0xFFFE
OWNER = np.uint16
WINDOW_MIN = 64 << 20
GROUP_WINDOWS = 256  # windows planned together: numpy speed, memory bounded by the group's data
ZERO_STATES = (C.PAYLOAD_BLOCK_UNDEFINED, C.PAYLOAD_BLOCK_ZERO, C.PAYLOAD_BLOCK_UNMAPPED,
               C.PAYLOAD_BLOCK_UNMAPPED_V095)
IS_ZERO = np.zeros(8, dtype=bool)  # by state: the block reads as zeros
IS_ZERO[list(ZERO_STATES)] = True
DEFINES = IS_ZERO.copy()  # by state: the block defines its sectors (in a differencing file: all of them)
DEFINES[C.PAYLOAD_BLOCK_FULLY_PRESENT] = True
_ZERO_CODE, _NONE_CODE = -1, -2  # source codes of the interval planner: zeros, nothing

Extent = tuple[int, int, Any, int]  # (virtual offset, length, (storage, file offset) or None for zeros, source)
Window = tuple[int, int, list[Extent]]  # (start, length, extents)


@dataclass(frozen=True)
class BatView:
    """One image's BAT as the planner reads it: its non-zero entries, read in bounded chunks
    (:class:`~vhdx.format.bat.SparseBat`: blocks listed one by one, runs of plain ZERO-like
    blocks). Every other block is NOT_PRESENT, so the view costs what the data costs."""

    image: Image
    sparse: batmod.SparseBat

    @classmethod
    def of(cls, image: Image) -> "BatView":
        """The view of ``image`` (once per merge)."""
        return cls(image, image.sparse())

    def window(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(states, offsets)`` of blocks ``start`` to ``stop``, NOT_PRESENT (0) where unused."""
        return batmod.dense(self.sparse, start, stop)

    def states_of(self, blocks: np.ndarray) -> np.ndarray:
        """The state of each of ``blocks`` (int64 array)."""
        sp = self.sparse
        out = np.zeros(blocks.size, dtype=np.uint8)
        j = np.searchsorted(sp.run_stops, blocks, side="right")
        inside = j < sp.run_starts.size
        inside[inside] = sp.run_starts[j[inside]] <= blocks[inside]
        out[inside] = sp.run_states[j[inside]]
        i = np.searchsorted(sp.blocks, blocks)
        listed = i < sp.blocks.size
        listed[listed] = sp.blocks[i[listed]] == blocks[listed]
        out[listed] = batmod.states(sp.entries[i[listed]])
        return out

    def entry(self, block: int) -> tuple[int, int]:
        """``(state, file offset)`` of one block."""
        sp = self.sparse
        i = int(np.searchsorted(sp.blocks, block))
        if i < sp.blocks.size and int(sp.blocks[i]) == block:
            raw = int(sp.entries[i])
            return raw & C.BAT_STATE_MASK, raw & C.BAT_FILE_OFFSET_MASK
        j = int(np.searchsorted(sp.run_stops, block, side="right"))
        if j < sp.run_starts.size and int(sp.run_starts[j]) <= block:
            return int(sp.run_states[j]), 0
        return C.PAYLOAD_BLOCK_NOT_PRESENT, 0

    def state(self, block: int) -> int:
        """The state of one block."""
        return self.entry(block)[0]

    def offset(self, block: int) -> int:
        """The file offset of one block (0 when it has none)."""
        return self.entry(block)[1]


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (``np.unique`` without its import of numpy.ma)."""
    values = np.sort(values, kind="stable")
    if values.size < 2:
        return values
    keep = np.empty(values.size, dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


# --------------------------------------------------------------------------- windows

def window_size(images: Sequence[Image]) -> int:
    """The planning window: at least 64 MiB, and whole blocks of every image."""
    return max([WINDOW_MIN] + [im.block_size for im in images])


def windows(views: Sequence[BatView], window: int) -> np.ndarray:
    """Indexes of the windows in which any source defines anything (vectorised over the BATs)."""
    hits = [np.zeros(0, np.int64)]
    for v in views:
        sp, bs = v.sparse, v.image.block_size
        hits.append(sp.blocks[sp.states != C.PAYLOAD_BLOCK_NOT_PRESENT] * bs // window)
        for a, b in zip((sp.run_starts * bs // window).tolist(), ((sp.run_stops * bs - 1) // window).tolist()):
            hits.append(np.arange(a, b + 1, dtype=np.int64))
    return sorted_unique(np.concatenate(hits))


def window_spans(views: Sequence[BatView], window: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of every window of a ``size``-byte disk in which a source defines anything."""
    for w in windows(views, window).tolist():
        start = w * window
        length = min(window, size - start)
        if length > 0:
            yield start, length


# --------------------------------------------------------------------------- sector by sector

def _source_sectors(v: BatView, i: int, start: int, length: int, ss: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(defined mask, owner values) per logical sector (``ss`` bytes) of the window for source
    ``i``; None if it has nothing there."""
    im = v.image
    bs = im.block_size
    spb = bs // ss
    first_block = start // bs
    states = v.window(first_block, -(-(start + length) // bs))[0]
    if not states.any():
        return None
    defined = DEFINES[states]
    partial = states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
    if not im.has_parent:
        defined |= partial
    mask = np.repeat(defined, spb)
    vals = np.repeat(np.where(IS_ZERO[states], ZERO, i).astype(OWNER), spb)
    if im.has_parent:
        for k in np.flatnonzero(partial).tolist():
            mask[k * spb:(k + 1) * spb] = im.read_bitmap(first_block + k).astype(bool)
            vals[k * spb:(k + 1) * spb] = i
    lo = (start - first_block * bs) // ss  # >= 0: the window may start inside the first block
    n = length // ss
    return mask[lo:lo + n], vals[lo:lo + n]


def owners(views: Sequence[BatView], start: int, length: int) -> np.ndarray:
    """Per logical sector of [start, start+length): which source defines it (index), ZERO, or
    TRANSPARENT."""
    ss = views[0].image.logical_sector_size
    if len(views) >= ZERO:
        raise MergeError(f"{len(views)} layers to merge: the planner holds at most {ZERO - 1}")
    owner = np.full(length // ss, TRANSPARENT, dtype=OWNER)
    for i, v in enumerate(views):
        found = _source_sectors(v, i, start, length, ss)
        if found is None:
            continue
        mask, vals = found
        take = mask & (owner == TRANSPARENT)
        owner[take] = vals[take]
    return owner


def sector_extents(views: Sequence[BatView], start: int, length: int) -> list[Extent]:
    """The extents of one window planned sector by sector (from the sector bitmaps)."""
    ss = views[0].image.logical_sector_size
    starts, stops, values = bitmapmod.runs(owners(views, start, length))
    out: list[Extent] = []
    for s0, s1, v in zip(starts.tolist(), stops.tolist(), values.tolist()):
        if v == TRANSPARENT:
            continue
        voff, vlen = start + s0 * ss, (s1 - s0) * ss
        if v == ZERO:
            out.append((voff, vlen, None, -1))
            continue
        im = views[v].image
        bs = im.block_size
        pos, end = voff, voff + vlen
        while pos < end:  # split at the source's block boundaries: each block has its own file offset
            block, in_block = divmod(pos, bs)
            n = min(bs - in_block, end - pos)
            out.append((pos, n, (im.storage, views[v].offset(block) + in_block), v))
            pos += n
    return out


# --------------------------------------------------------------------------- as intervals

@dataclass
class _Intervals:
    """One source's blocks in a range, as sorted byte intervals: ``code`` is the source's index
    (data at ``offset``) or _ZERO_CODE; ``partial`` the [start, end) of its PARTIALLY_PRESENT
    blocks that need their sector bitmap."""

    starts: np.ndarray
    ends: np.ndarray
    code: np.ndarray
    offset: np.ndarray
    partial: tuple[list[int], list[int]]


def _intervals(v: BatView, i: int, lo: int, hi: int) -> _Intervals:
    """Source ``i``'s intervals that meet the bytes [lo, hi)."""
    sp, bs = v.sparse, v.image.block_size
    b0, b1 = lo // bs, -(-hi // bs)
    j0, j1 = np.searchsorted(sp.blocks, (b0, b1)).tolist()
    blocks, raw = sp.blocks[j0:j1], sp.entries[j0:j1]
    states = batmod.states(raw)
    partial = states == C.PAYLOAD_BLOCK_PARTIALLY_PRESENT
    defines = DEFINES[states] | (partial & (not v.image.has_parent))
    firsts = blocks[partial & ~defines] * bs
    k0 = int(np.searchsorted(sp.run_stops, b0, side="right"))
    k1 = int(np.searchsorted(sp.run_starts, b1))
    run_starts, run_stops = sp.run_starts[k0:k1], sp.run_stops[k0:k1]
    run_zero = IS_ZERO[sp.run_states[k0:k1]]
    starts = np.concatenate([blocks[defines] * bs, run_starts[run_zero] * bs])
    ends = np.concatenate([blocks[defines] * bs + bs, run_stops[run_zero] * bs])
    code = np.concatenate([np.where(IS_ZERO[states[defines]], _ZERO_CODE, i),
                           np.full(int(run_zero.sum()), _ZERO_CODE)]).astype(np.int64)
    offset = np.concatenate([batmod.file_offsets(raw[defines]).astype(np.int64),
                             np.zeros(int(run_zero.sum()), np.int64)])
    order = np.argsort(starts, kind="stable")
    return _Intervals(starts[order], ends[order], code[order], offset[order],
                      (firsts.tolist(), (firsts + bs).tolist()))


def _newest(sources: list[_Intervals], lo: int, hi: int) -> tuple[np.ndarray, ...]:
    """``(starts, ends, codes, offsets)`` of the pieces of [lo, hi) that a source defines, each
    from the newest source covering it; pieces of one block, and zeros, joined."""
    cuts = sorted_unique(np.clip(np.concatenate([np.array([lo, hi], np.int64)] + [s.starts for s in sources]
                                                + [s.ends for s in sources]), lo, hi))
    seg, seg_end = cuts[:-1], cuts[1:]
    code = np.full(seg.size, _NONE_CODE, dtype=np.int64)
    offset = np.zeros(seg.size, dtype=np.int64)
    key = np.zeros(seg.size, dtype=np.int64)  # which interval: pieces of one block join
    for s in sources:
        if not s.starts.size:
            continue
        free = np.flatnonzero(code == _NONE_CODE)
        k = np.searchsorted(s.starts, seg[free], side="right") - 1
        hit = k >= 0
        hit[hit] = s.ends[k[hit]] > seg[free[hit]]
        free, k = free[hit], k[hit]
        code[free] = s.code[k]
        offset[free] = s.offset[k] + seg[free] - s.starts[k]
        key[free] = k
    used = np.flatnonzero(code != _NONE_CODE)
    seg, seg_end, code, offset, key = seg[used], seg_end[used], code[used], offset[used], key[used]
    if not seg.size:
        return seg, seg_end, code, offset
    joined = (seg[1:] == seg_end[:-1]) & (code[1:] == code[:-1]) & ((code[1:] == _ZERO_CODE) | (key[1:] == key[:-1]))
    firsts = np.flatnonzero(np.concatenate([[True], ~joined]))
    lasts = np.concatenate([firsts[1:] - 1, [seg.size - 1]])
    return seg[firsts], seg_end[lasts], code[firsts], offset[firsts]


def _overlaps(partial: tuple[list[int], list[int]], start: int, end: int) -> bool:
    """Whether one of the sorted, disjoint intervals ``partial`` meets [start, end)."""
    k = bisect.bisect_right(partial[1], start)
    return k < len(partial[0]) and partial[0][k] < end


def _group(views: Sequence[BatView], spans: list[tuple[int, int]]) -> Iterator[Window]:
    """The windows ``spans`` (ascending) planned together."""
    lo, hi = spans[0][0], spans[-1][0] + spans[-1][1]
    sources = [_intervals(v, i, lo, hi) for i, v in enumerate(views)]
    starts, ends, codes, offsets = (a.tolist() for a in _newest(sources, lo, hi))
    storages = [v.image.storage for v in views]
    j = 0
    for start, length in spans:
        end = start + length
        if any(_overlaps(s.partial, start, end) for s in sources):
            yield start, length, sector_extents(views, start, length)
            continue
        while j < len(starts) and ends[j] <= start:
            j += 1
        found: list[Extent] = []
        k = j
        while k < len(starts) and starts[k] < end:
            a, b, c = max(starts[k], start), min(ends[k], end), codes[k]
            found.append((a, b - a, None, -1) if c == _ZERO_CODE else
                         (a, b - a, (storages[c], offsets[k] + a - starts[k]), c))
            k += 1
        yield start, length, found


def planned(views: Sequence[BatView], spans: Iterable[tuple[int, int]]) -> Iterator[Window]:
    """``(start, length, extents)`` of each of the windows ``spans`` (ascending), planned in
    groups of :data:`GROUP_WINDOWS`."""
    group: list[tuple[int, int]] = []
    for span in spans:
        group.append(span)
        if len(group) == GROUP_WINDOWS:
            yield from _group(views, group)
            group = []
    if group:
        yield from _group(views, group)


def extents(views: Sequence[BatView], start: int, length: int) -> Iterator[Extent]:
    """(virtual_offset, length, source, source_index) runs of one window; source None means zeros."""
    for _start, _length, found in _group(views, [(start, length)]):
        yield from found
