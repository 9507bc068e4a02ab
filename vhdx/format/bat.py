"""The BAT as a numpy ``uint64`` array: states, file offsets, vectorised views (§5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import (BAT_FILE_OFFSET_MASK, BAT_RESERVED_MASK, BAT_STATE_MASK, PAYLOAD_STATE_NAMES, SB_STATE_NAMES,
                        PayloadState)
from .geometry import Geometry


def decode_bat(raw: bytes | bytearray | memoryview) -> np.ndarray:
    """The BAT region bytes as a writable little-endian uint64 array (native order)."""
    return np.frombuffer(bytes(raw), dtype="<u8").astype(np.uint64)


def encode_bat(entries: np.ndarray) -> bytes:
    """The BAT array as little-endian bytes."""
    return entries.astype("<u8").tobytes()


def make_entry(state: int, file_offset: int) -> int:
    """One raw BAT entry: a 1 MiB aligned file offset and a state."""
    return (file_offset & BAT_FILE_OFFSET_MASK) | (state & BAT_STATE_MASK)


def states(entries: np.ndarray) -> np.ndarray:
    """The state of each entry (uint8)."""
    return (entries & np.uint64(BAT_STATE_MASK)).astype(np.uint8)


def file_offsets(entries: np.ndarray) -> np.ndarray:
    """The file offset of each entry (uint64; 0 when none)."""
    return entries & np.uint64(BAT_FILE_OFFSET_MASK)


def reserved_bits(entries: np.ndarray) -> np.ndarray:
    """The reserved bits of each entry (must be zero)."""
    return entries & np.uint64(BAT_RESERVED_MASK)


def payload_entries(entries: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The payload entries of a BAT in block order, sector-bitmap slots left out (no index array)."""
    cr, pb = geometry.chunk_ratio, geometry.payload_blocks
    chunks = -(-pb // cr)
    need = chunks * (cr + 1)
    if entries.size < need:
        entries = np.concatenate([entries, np.zeros(need - entries.size, entries.dtype)])
    return entries[:need].reshape(chunks, cr + 1)[:, :cr].reshape(-1)[:pb]


def payload_indices(geometry: Geometry) -> np.ndarray:
    """BAT indexes of every payload block, sector-bitmap slots skipped."""
    return geometry.payload_bat_index(np.arange(geometry.payload_blocks, dtype=np.int64))


def sbm_indices(geometry: Geometry) -> np.ndarray:
    """BAT indexes of every sector-bitmap slot that lies inside the counted entries."""
    idx = geometry.sbm_bat_index(np.arange(geometry.sector_bitmap_blocks, dtype=np.int64))
    return idx[idx < geometry.bat_entries]


def holds_data(state: Any) -> Any:
    """True where a payload state says the block's data is in this file (FULLY_PRESENT or
    PARTIALLY_PRESENT): for one state (an int) or a uint8 array of them."""
    return (state == PayloadState.FULLY_PRESENT) | (state == PayloadState.PARTIALLY_PRESENT)


def count_states(states_: np.ndarray, names: dict[int, str]) -> dict[str, int]:
    """How many entries are in each state, by the state's name (the number when it has none)."""
    return {names.get(int(s), str(int(s))): int(c) for s, c in zip(*np.unique(states_, return_counts=True))}


# ---------------------------------------------------------------- the BAT as its non-zero entries

@dataclass(frozen=True)
class SparseBat:
    """A BAT as what grows with the data (docs/format.md §5): the payload entries that are
    neither zero nor a plain state without an offset (``blocks``/``entries``, by block), runs
    of blocks whose entries are a plain UNDEFINED, ZERO or UNMAPPED with no offset and no other
    bit (``run_starts``/``run_stops``/``run_states``: qemu-img marks every block of a new disk
    ZERO), the non-zero sector-bitmap entries (by chunk), and the first non-zero entry past the
    ones the disk counts (-1 when none). Every other entry is zero (NOT_PRESENT)."""

    blocks: np.ndarray       # int64: payload blocks listed one by one, ascending
    entries: np.ndarray      # uint64: their raw entries
    chunks: np.ndarray       # int64: chunks whose sector-bitmap entry is not zero
    sbm_entries: np.ndarray  # uint64: their raw entries
    tail: int = -1           # BAT index of the first non-zero entry past geometry.bat_entries
    run_starts: np.ndarray = field(default_factory=lambda: _EMPTY_I)  # int64: first block of each run
    run_stops: np.ndarray = field(default_factory=lambda: _EMPTY_I)   # int64: block after it
    run_states: np.ndarray = field(default_factory=lambda: _EMPTY_S)  # uint8: the state of its blocks

    @property
    def states(self) -> np.ndarray:
        """The state of each listed payload entry (uint8)."""
        return states(self.entries)

    @property
    def offsets(self) -> np.ndarray:
        """The file offset of each listed payload entry (int64)."""
        return file_offsets(self.entries).astype(np.int64)

    @property
    def size(self) -> int:
        """Rows held: listed entries, runs and sector-bitmap entries."""
        return self.blocks.size + self.run_starts.size + self.chunks.size

    def payload_bat_indexes(self, geometry: Geometry) -> np.ndarray:
        """The BAT index of each listed payload entry."""
        return np.asarray(geometry.payload_bat_index(self.blocks), dtype=np.int64)

    def sbm_bat_indexes(self, geometry: Geometry) -> np.ndarray:
        """The BAT index of each listed sector-bitmap entry."""
        return np.asarray(geometry.sbm_bat_index(self.chunks), dtype=np.int64)


_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_U = np.zeros(0, np.uint64)
_EMPTY_S = np.zeros(0, np.uint8)
_PLAIN_MAX = 3  # raw entries 1, 2, 3: UNDEFINED, ZERO, UNMAPPED, no offset, no other bit


def block_runs(blocks: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs of consecutive ``blocks`` with equal ``raw`` entries: (starts, stops, states)."""
    if not blocks.size:
        return _EMPTY_I, _EMPTY_I, _EMPTY_S
    cut = np.flatnonzero((blocks[1:] != blocks[:-1] + 1) | (raw[1:] != raw[:-1])) + 1
    firsts = np.concatenate([[0], cut])
    lasts = np.concatenate([cut - 1, [blocks.size - 1]])
    return blocks[firsts], blocks[lasts] + 1, raw[firsts].astype(np.uint8)


def sparse_piece(first: int, entries: np.ndarray, geometry: Geometry) -> SparseBat:
    """The BAT's entries from index ``first`` on, as a :class:`SparseBat` (copied: ``entries``
    may be a reused buffer)."""
    run = _one_run(first, entries, geometry)
    if run is not None:
        return run
    nz = np.flatnonzero(entries)
    if not nz.size:
        return SparseBat(_EMPTY_I, _EMPTY_U, _EMPTY_I, _EMPTY_U)
    idx = nz.astype(np.int64) + first
    raw = entries[nz].astype(np.uint64)
    period = geometry.chunk_ratio + 1
    counted = idx < geometry.bat_entries
    tail = int(idx[~counted][0]) if not counted.all() else -1
    is_sbm = (idx % period) == period - 1
    pay, sbm = counted & ~is_sbm, counted & is_sbm
    blocks, praw = idx[pay] - idx[pay] // period, raw[pay]
    real = blocks < geometry.payload_blocks  # a differencing BAT's last chunk has slots past the disk: ignored
    blocks, praw = blocks[real], praw[real]
    plain = praw <= _PLAIN_MAX
    starts, stops, run_states = block_runs(blocks[plain], praw[plain])
    return SparseBat(blocks[~plain], praw[~plain], idx[sbm] // period, raw[sbm], tail, starts, stops, run_states)


def _one_run(first: int, entries: np.ndarray, geometry: Geometry) -> SparseBat | None:
    """The fast answer for a piece whose payload entries are all one plain state (a BAT that
    qemu-img filled with ZERO) and whose sector-bitmap slots are zero; None for any other."""
    n, period = entries.size, geometry.chunk_ratio + 1
    last = first + n - 1
    if n < 2 or last >= geometry.bat_entries:
        return None
    p0 = (period - 1 - first % period) % period  # the first sector-bitmap slot of the piece
    v = int(entries[1 if p0 == 0 else 0])
    if not 1 <= v <= _PLAIN_MAX:
        return None
    sbm = entries[p0::period]
    if sbm.any() or np.count_nonzero(entries == v) != n - sbm.size:
        return None
    i0 = first + 1 if p0 == 0 else first
    i1 = last - 1 if last % period == period - 1 else last
    b0, b1 = i0 - i0 // period, min(i1 - i1 // period + 1, geometry.payload_blocks)
    if b1 <= b0:
        return None
    return SparseBat(_EMPTY_I, _EMPTY_U, _EMPTY_I, _EMPTY_U, -1, np.array([b0], np.int64), np.array([b1], np.int64),
                     np.array([v], np.uint8))


def sparse_join(pieces: list[SparseBat]) -> SparseBat:
    """The pieces of one BAT (in index order) as one; runs that continue across pieces are joined."""
    if len(pieces) == 1:
        return pieces[0]
    tails = [p.tail for p in pieces if p.tail >= 0]
    starts = np.concatenate([_EMPTY_I] + [p.run_starts for p in pieces])
    stops = np.concatenate([_EMPTY_I] + [p.run_stops for p in pieces])
    run_states = np.concatenate([_EMPTY_S] + [p.run_states for p in pieces])
    if starts.size > 1:
        keep = np.concatenate([[True], (starts[1:] != stops[:-1]) | (run_states[1:] != run_states[:-1])])
        firsts = np.flatnonzero(keep)
        lasts = np.concatenate([firsts[1:] - 1, [starts.size - 1]])
        starts, stops, run_states = starts[firsts], stops[lasts], run_states[firsts]
    return SparseBat(np.concatenate([_EMPTY_I] + [p.blocks for p in pieces]),
                     np.concatenate([_EMPTY_U] + [p.entries for p in pieces]),
                     np.concatenate([_EMPTY_I] + [p.chunks for p in pieces]),
                     np.concatenate([_EMPTY_U] + [p.sbm_entries for p in pieces]),
                     min(tails) if tails else -1, starts, stops, run_states)


def counted_sbm_slots(geometry: Geometry) -> int:
    """How many sector-bitmap slots lie inside the entries the disk counts (as :func:`sbm_indices`)."""
    return min(geometry.sector_bitmap_blocks, geometry.bat_entries // (geometry.chunk_ratio + 1))


def sparse_counts(sparse: SparseBat, geometry: Geometry) -> tuple[dict[str, int], dict[str, int]]:
    """How many payload and sector-bitmap entries are in each state, by name (zero entries
    counted without being listed), as :func:`count_states` gives them."""
    out = []
    for st, total, names in ((sparse.states, geometry.payload_blocks, PAYLOAD_STATE_NAMES),
                             (states(sparse.sbm_entries), counted_sbm_slots(geometry), SB_STATE_NAMES)):
        counts = np.bincount(st, minlength=8)
        if names is PAYLOAD_STATE_NAMES:
            counts += np.bincount(sparse.run_states, weights=sparse.run_stops - sparse.run_starts,
                                  minlength=8).astype(np.int64)
        counts[0] += total - int(counts.sum())
        out.append({names.get(s, str(s)): int(c) for s, c in enumerate(counts.tolist()) if c})
    return out[0], out[1]


def dense(sparse: SparseBat, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """``(states, file offsets)`` of payload blocks ``start`` to ``stop`` (a range the caller
    bounds), zeros where the entry is zero."""
    n = max(stop - start, 0)
    st = np.zeros(n, dtype=np.uint8)
    offsets = np.zeros(n, dtype=np.int64)
    lo, hi = np.searchsorted(sparse.run_stops, start, side="right"), np.searchsorted(sparse.run_starts, stop)
    for a, b, s in zip(sparse.run_starts[lo:hi].tolist(), sparse.run_stops[lo:hi].tolist(),
                       sparse.run_states[lo:hi].tolist()):
        st[max(a, start) - start:min(b, stop) - start] = s
    lo, hi = np.searchsorted(sparse.blocks, [start, stop])
    rows = sparse.blocks[lo:hi] - start
    st[rows] = states(sparse.entries[lo:hi])
    offsets[rows] = file_offsets(sparse.entries[lo:hi]).astype(np.int64)
    return st, offsets
