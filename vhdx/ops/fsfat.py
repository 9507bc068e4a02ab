"""FAT and exFAT for ``diff --files``: the directory entries a checkpoint changed.

On FAT (12/16/32) and exFAT the metadata of a file is its directory entry, 32 bytes inside its
folder's clusters (or FAT12/16's fixed root folder). The Sleuth Kit numbers a file by where its
entry lies: entry ``k`` (32-byte slots counted from the first sector after the FATs on FAT, from
the cluster heap on exFAT) is metadata address ``k + 3`` (2 is the root). So the changed sectors
name the changed entries directly, once we know which of them are folder sectors: a sector is
taken as one when, in either view, every one of its sixteen slots is a well-formed entry (free,
deleted, a long-name part or a short name on FAT; a known entry type on exFAT) and one at least
is in use. File data almost never passes that test (sixteen slots in a row); when it does, the
slots are offered to The Sleuth Kit, which checks them again and finds no file there.
"""

from __future__ import annotations

import struct

import numpy as np

from ..chains.disk import Disk

FIRST_ENTRY_ADDRESS = 3        # TSK: the metadata address of slot 0 (1 and 2 are the FATs' and the root's)
SLOT = 32
SLOTS = 16                     # per 512 bytes
CHUNK = 4 << 20
SFN_BAD = np.zeros(256, dtype=bool)
SFN_BAD[[*range(0x20), 0x22, 0x2A, 0x2B, 0x2C, 0x2F, 0x3A, 0x3B, 0x3C, 0x3D, 0x3E, 0x3F, 0x5B, 0x5C, 0x5D,
         0x7C, 0x7F, *range(0x61, 0x7B)]] = True
EXFAT_TYPES = np.zeros(256, dtype=bool)
EXFAT_TYPES[[0x00, 0x81, 0x82, 0x83, 0x85, 0xA0, 0xA1, 0xA2, 0xC0, 0xC1, 0x01, 0x02, 0x03, 0x05, 0x20, 0x21,
             0x22, 0x40, 0x41]] = True
EXFAT_FILE = (0x85, 0x05)      # a file's first entry, in use or deleted: the one TSK numbers


def fat_area(disk: Disk, base: int, length: int, exfat: bool) -> tuple[int, int] | None:
    """(first byte, end byte) on the disk of the area whose 32-byte slots TSK numbers, from the
    boot sector, every field checked; None when a field is out of range."""
    boot = bytearray(512)
    if disk.pread_into(memoryview(boot), base) < 512 or boot[510:512] != b"\x55\xaa":
        return None
    if exfat:
        if boot[3:11] != b"EXFAT   " or not 9 <= boot[108] <= 12:
            return None
        start = struct.unpack_from("<I", boot, 88)[0] << boot[108]
    else:
        bps, _, reserved, fats = struct.unpack_from("<HBHB", boot, 11)
        fat16 = struct.unpack_from("<H", boot, 22)[0]
        size = fat16 or struct.unpack_from("<I", boot, 36)[0]
        if bps not in (512, 1024, 2048, 4096) or not 1 <= fats <= 4 or reserved == 0:
            return None
        start = (reserved + fats * size) * bps
    return (base + start, base + length) if 0 < start < length else None


def folder_rows(x: np.ndarray, exfat: bool) -> np.ndarray:
    """Per 512-byte row of slots (rows, 16, 32): every slot well formed and one at least in use."""
    first = x[:, :, 0]
    if exfat:
        return EXFAT_TYPES[first].all(axis=1) & (first & 0x80 != 0).any(axis=1)
    attr = x[:, :, 11]
    free = first == 0
    lfn = (attr == 0x0F) & (x[:, :, 12] == 0) & (x[:, :, 26] == 0) & (x[:, :, 27] == 0)
    name = x[:, :, 1:11]
    sfn = (attr & 0xC0 == 0) & np.isin(x[:, :, 12], (0, 0x08, 0x10, 0x18)) & ~SFN_BAD[name].any(axis=2) \
        & ((first == 0xE5) | (first == 0x05) | (first == 0x2E) | ~SFN_BAD[first])
    ok = free | lfn | sfn
    return ok.all(axis=1) & (~free & (first != 0xE5)).any(axis=1)


def _entries(x: np.ndarray, exfat: bool) -> np.ndarray:
    """Per slot (rows, 16): a file's numbered entry (exFAT file entry; FAT short name, '.' aside)."""
    first = x[:, :, 0]
    if exfat:
        return np.isin(first, EXFAT_FILE)
    return (first != 0) & (x[:, :, 11] != 0x0F) & (first != 0x2E)


def changed_entries(start: int, spans: list[tuple[int, int]], old: Disk, new: Disk, exfat: bool,
                    folders: list[tuple[int, int]]) -> set[int]:
    """TSK metadata addresses of the entries in ``spans`` (changed bytes at or after ``start``)
    that differ between the views, in sectors that are folder sectors in either view; those
    sectors are added to ``folders`` as (start, end) byte ranges."""
    out: set[int] = set()
    for s, e in spans:
        s -= (s - start) % 512
        e += -(e - start) % 512
        for at in range(s, e, CHUNK):
            n = min(CHUNK, e - at)
            a, b = bytearray(n), bytearray(n)
            if old.pread_into(memoryview(a), at) < n or new.pread_into(memoryview(b), at) < n:
                continue
            x = np.frombuffer(a, np.uint8).reshape(-1, SLOTS, SLOT)
            y = np.frombuffer(b, np.uint8).reshape(-1, SLOTS, SLOT)
            folder = folder_rows(x, exfat) | folder_rows(y, exfat)
            folders.extend((at + int(r) * 512, at + int(r) * 512 + 512) for r in np.flatnonzero(folder))
            bytes_differ = x != y
            if not exfat:
                bytes_differ[:, :, 18:20] = False     # the access date: a read changes it
            differ = bytes_differ.any(axis=2) & (_entries(x, exfat) | _entries(y, exfat)) & folder[:, None]
            slots = np.flatnonzero(differ.ravel()) + (at - start) // SLOT + FIRST_ENTRY_ADDRESS
            out.update(slots.tolist())
    return out


def uncovered(spans: list[tuple[int, int]], cover: list[tuple[int, int]]) -> int:
    """Bytes of ``spans`` (sorted, disjoint) that no range of ``cover`` covers."""
    cover = sorted(c for c in cover if c[1] > c[0])
    left, i, reach = 0, 0, -1
    for s, e in spans:
        at = s
        while at < e:
            while i < len(cover) and cover[i][0] <= at:
                reach = max(reach, cover[i][1])
                i += 1
            if reach > at:
                at = min(e, reach)
                continue
            nxt = min(e, cover[i][0]) if i < len(cover) else e
            left += nxt - at
            at = nxt
    return left
