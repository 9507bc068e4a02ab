"""The BAT as a numpy ``uint64`` array: states, file offsets, vectorised views (§5)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .constants import BAT_FILE_OFFSET_MASK, BAT_RESERVED_MASK, BAT_STATE_MASK, PayloadState
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
