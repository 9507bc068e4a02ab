"""Log search and replay on hand-built logs: wrap-around, torn entries, stale GUIDs and sequences."""

from __future__ import annotations

import uuid

from vhdx.file.log import build_entry, find_active_sequence, read_entry

LOG = 64 * 4096
G = uuid.uuid4()


def page(fill: int) -> bytes:
    return bytes([fill]) * 4096


def put(log: bytearray, position: int, entry: bytes) -> int:
    for i in range(0, len(entry), 4096):
        p = (position + i) % len(log)
        log[p:p + 4096] = entry[i:i + 4096]
    return (position + len(entry)) % len(log)


def entry(seq, tail, pages, guid=G):
    return build_entry(log_guid=guid, sequence_number=seq, tail=tail, pages=pages,
                       flushed_file_offset=1 << 20, last_file_offset=4 << 20)


def test_single_entry_roundtrip():
    log = bytearray(LOG)
    put(log, 0, entry(10, 0, [(3 << 20, page(1)), (3 << 20 | 4096, page(2))]))
    e = read_entry(bytes(log), 0, G)
    assert e is not None and e.sequence_number == 10
    assert [t for t, _ in e.writes] == [3 << 20, (3 << 20) + 4096]
    assert e.writes[0][1] == page(1)
    seq = find_active_sequence(bytes(log), G)
    assert [x.sequence_number for x in seq] == [10]


def test_wrong_guid_is_not_replayed():
    log = bytearray(LOG)
    put(log, 0, entry(10, 0, [(3 << 20, page(1))], guid=uuid.uuid4()))
    assert find_active_sequence(bytes(log), G) is None


def test_replay_starts_at_tail_of_head():
    log = bytearray(LOG)
    pos = put(log, 0, entry(1, 0, []))
    p1 = pos
    pos = put(log, pos, entry(2, 0, [(3 << 20, page(1))]))
    pos = put(log, pos, entry(3, p1, [(3 << 20, page(2))]))
    seq = find_active_sequence(bytes(log), G)
    assert [x.sequence_number for x in seq] == [2, 3]


def test_torn_head_falls_back_to_previous_entry():
    log = bytearray(LOG)
    pos = put(log, 0, entry(1, 0, []))
    p1 = pos
    pos = put(log, pos, entry(2, p1, [(3 << 20, page(1))]))
    p2 = pos
    pos = put(log, pos, entry(3, p2, [(3 << 20, page(2))]))
    log[p2 + 4096 + 100] ^= 0xFF  # corrupt entry 3's data sector
    seq = find_active_sequence(bytes(log), G)
    assert [x.sequence_number for x in seq] == [2]


def test_entry_wrapping_past_the_end():
    log = bytearray(LOG)
    start = LOG - 4096  # descriptor sector at the end, data sector wraps to 0
    put(log, start, entry(7, start, [(3 << 20, page(9))]))
    e = read_entry(bytes(log), start, G)
    assert e is not None and e.writes[0][1] == page(9)
    seq = find_active_sequence(bytes(log), G)
    assert seq is not None and seq[-1].sequence_number == 7


def test_highest_sequence_wins_over_stale_entries():
    log = bytearray(LOG)
    put(log, 0, entry(100, 0, [(3 << 20, page(1))]))
    put(log, 20 * 4096, entry(200, 20 * 4096, [(3 << 20, page(2))]))
    seq = find_active_sequence(bytes(log), G)
    assert seq[-1].sequence_number == 200 and seq[-1].writes[0][1] == page(2)


def test_gap_in_sequence_numbers_ends_the_sequence():
    log = bytearray(LOG)
    pos = put(log, 0, entry(1, 0, []))
    put(log, pos, entry(3, 0, [(3 << 20, page(1))]))  # 3 after 1: not part of the run; its tail (0) is outside
    seq = find_active_sequence(bytes(log), G)
    assert [x.sequence_number for x in seq] == [1]


def test_descriptor_into_header_section_is_invalid():
    log = bytearray(LOG)
    put(log, 0, entry(1, 0, [(0x10000, page(1))]))
    assert find_active_sequence(bytes(log), G) is None
