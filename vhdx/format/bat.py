"""The BAT as a numpy ``uint64`` array: states, file offsets, vectorised views (§5)."""

from __future__ import annotations

from dataclasses import dataclass
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
    """The non-zero entries of a BAT, the only part that grows with the data (docs/format.md §5):
    payload entries by block and sector-bitmap entries by chunk, each ascending, and the first
    non-zero entry past the ones the disk counts (-1 when none). Every other entry is zero."""

    blocks: np.ndarray       # int64: payload blocks whose entry is not zero
    entries: np.ndarray      # uint64: their raw entries
    chunks: np.ndarray       # int64: chunks whose sector-bitmap entry is not zero
    sbm_entries: np.ndarray  # uint64: their raw entries
    tail: int = -1           # BAT index of the first non-zero entry past geometry.bat_entries

    @property
    def states(self) -> np.ndarray:
        """The state of each listed payload entry (uint8)."""
        return states(self.entries)

    @property
    def offsets(self) -> np.ndarray:
        """The file offset of each listed payload entry (int64)."""
        return file_offsets(self.entries).astype(np.int64)

    def payload_bat_indexes(self, geometry: Geometry) -> np.ndarray:
        """The BAT index of each listed payload entry."""
        return np.asarray(geometry.payload_bat_index(self.blocks), dtype=np.int64)

    def sbm_bat_indexes(self, geometry: Geometry) -> np.ndarray:
        """The BAT index of each listed sector-bitmap entry."""
        return np.asarray(geometry.sbm_bat_index(self.chunks), dtype=np.int64)


_EMPTY_I = np.zeros(0, np.int64)
_EMPTY_U = np.zeros(0, np.uint64)


def sparse_piece(first: int, entries: np.ndarray, geometry: Geometry) -> SparseBat:
    """The non-zero entries of ``entries``, the BAT's entries from index ``first`` on (copied:
    ``entries`` may be a reused buffer)."""
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
    return SparseBat(idx[pay] - idx[pay] // period, raw[pay], idx[sbm] // period, raw[sbm], tail)


def sparse_join(pieces: list[SparseBat]) -> SparseBat:
    """The pieces of one BAT (in index order) as one."""
    if len(pieces) == 1:
        return pieces[0]
    tails = [p.tail for p in pieces if p.tail >= 0]
    return SparseBat(np.concatenate([_EMPTY_I] + [p.blocks for p in pieces]),
                     np.concatenate([_EMPTY_U] + [p.entries for p in pieces]),
                     np.concatenate([_EMPTY_I] + [p.chunks for p in pieces]),
                     np.concatenate([_EMPTY_U] + [p.sbm_entries for p in pieces]),
                     min(tails) if tails else -1)


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
        counts[0] += total - st.size
        out.append({names.get(s, str(s)): int(c) for s, c in enumerate(counts.tolist()) if c})
    return out[0], out[1]
