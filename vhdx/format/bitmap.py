"""Sector bitmaps: LSB-first bits, one per logical sector (docs/format.md §5.6)."""

from __future__ import annotations

import numpy as np


def unpack(bitmap: bytes | bytearray | memoryview | np.ndarray, first: int = 0,
           count: int | None = None) -> np.ndarray:
    """Bits ``first .. first+count`` of ``bitmap`` as a uint8 array of 0/1."""
    arr = bitmap if isinstance(bitmap, np.ndarray) else np.frombuffer(bitmap, np.uint8)
    if count is None:
        count = arr.size * 8 - first
    lo, hi = first // 8, -(-(first + count) // 8)
    bits = np.unpackbits(arr[lo:hi], bitorder="little")
    return bits[first - lo * 8: first - lo * 8 + count]


def runs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a 0/1 array into runs: (starts, stops, values)."""
    n = bits.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.uint8)
    edges = np.flatnonzero(np.diff(bits)) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [n]))
    return starts, stops, bits[starts]


def set_bits(bitmap: np.ndarray, first: int, count: int, value: bool = True) -> None:
    """Set (or clear) bits ``first .. first+count`` of a uint8 bitmap array, in place."""
    if count <= 0:
        return
    lo, hi = first // 8, -(-(first + count) // 8)
    bits = np.unpackbits(bitmap[lo:hi], bitorder="little")
    bits[first - lo * 8: first - lo * 8 + count] = 1 if value else 0
    bitmap[lo:hi] = np.packbits(bits, bitorder="little")
