"""The longest replayable prefix of a log (repair replays a damaged log up to it): the same answer
as checking every prefix with check_replay_bounds, in one pass even for a crafted 256 Ki-entry log."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from vhdx.errors import LogReplayError
from vhdx.file.log import LogEntry, check_replay_bounds, replayable_prefix

MiB = 1 << 20
SIZE = 8 * MiB


def _entry(i: int, last: int, writes: list[tuple[int, bytes | int]]) -> LogEntry:
    return LogEntry(position=4096 * i, entry_length=4096, tail=0, sequence_number=i + 1, descriptor_count=len(writes),
                    flushed_file_offset=SIZE, last_file_offset=last, writes=writes)


def _brute_force(entries: list[LogEntry]) -> int:
    for n in range(len(entries), 0, -1):
        try:
            check_replay_bounds(entries[:n], SIZE, path="x", log_offset=MiB)
            return n
        except LogReplayError:
            continue
    return 0


write = st.one_of(st.tuples(st.integers(0, 12 * MiB).map(lambda t: t // 4096 * 4096), st.just(b"\0" * 4096)),
                  st.tuples(st.integers(0, 12 * MiB).map(lambda t: t // 4096 * 4096),
                            st.sampled_from([4096, MiB, 4 * MiB, 9 * MiB])))
entry_args = st.tuples(st.sampled_from([SIZE, 10 * MiB, 20 * MiB, 2 << 30]), st.lists(write, max_size=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(entry_args, max_size=8))
def test_the_one_pass_prefix_is_the_longest_prefix_every_check_accepts(args) -> None:
    entries = [_entry(i, last, writes) for i, (last, writes) in enumerate(args)]
    assert replayable_prefix(entries, SIZE, path="x", log_offset=MiB) == _brute_force(entries)


def test_a_crafted_log_of_256_ki_entries_is_measured_in_one_pass() -> None:
    """Every entry zeroes 1 MiB: the prefix stops where the zeros outgrow the file; checking the
    prefixes one by one from the longest would take hours."""
    entries = [_entry(i, SIZE, [(0, MiB)]) for i in range(256 * 1024)]
    start = time.perf_counter()
    assert replayable_prefix(entries, SIZE, path="x", log_offset=MiB) == 8
    assert time.perf_counter() - start < 10
