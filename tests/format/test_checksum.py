"""The CRC-32C used for headers, region tables and log entries: hardware and table agree."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st

from tests.support.needs import need
from vhdx.format import checksum


def test_hardware_crc_is_in_use():
    # google-crc32c is a dependency: without its C extension every open pays ~60 x for its CRCs
    need(checksum.HARDWARE, "google-crc32c's C extension (pip install google-crc32c)")


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=9000), st.binary(max_size=300), st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_hardware_and_table_agree(data, more, kind):
    wrap = {"bytes": bytes, "bytearray": bytearray, "memoryview": lambda b: memoryview(bytes(b))}[kind]
    whole = checksum.crc32c_table(data + more)
    assert checksum.crc32c(wrap(data + more)) == whole
    assert checksum.crc32c(wrap(more), checksum.crc32c(wrap(data))) == whole  # continuing a sum


def test_zeroed_field_is_the_same_on_both_paths(monkeypatch):
    buf = bytearray(os.urandom(65536))
    fast = checksum.crc32c_zeroed(buf)
    monkeypatch.setattr(checksum, "HARDWARE", False)
    assert checksum.crc32c_zeroed(buf) == fast
    assert checksum.crc32c(b"123456789") == 0xE3069283
    buf[4:8] = b"\xde\xad\xbe\xef"  # the field's own bytes never count
    assert checksum.crc32c_zeroed(buf) == fast
