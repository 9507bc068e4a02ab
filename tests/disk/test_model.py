"""The disk against a plain bytearray model: random geometry, writes, reads, close and reopen."""

from __future__ import annotations

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vhdx

MiB = 1 << 20
MAX_EXAMPLES = int(os.environ.get("VHDX_HYPOTHESIS_MAX", "25"))


class DiskModel(RuleBasedStateMachine):
    """Writes and reads on a fixed or dynamic disk, compared to a bytearray."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "d.vhdx")
        self.disk = None

    @initialize(block_shift=st.integers(0, 8), lss=st.sampled_from([512, 4096]), fixed=st.booleans(),
                sectors=st.integers(1, 3000), pss=st.sampled_from([512, 4096]))
    def create(self, block_shift, lss, fixed, sectors, pss):
        self.block_size = MiB << block_shift
        self.size = sectors * lss if not fixed else min(sectors * lss, 6 * MiB)
        self.size -= self.size % lss
        self.size = max(self.size, lss)
        self.model = bytearray(self.size)
        self.disk = vhdx.create(self.path, self.size, block_size=self.block_size, logical_sector_size=lss,
                                physical_sector_size=pss, fixed=fixed)
        assert self.disk.size == self.size
        assert self.disk.logical_sector_size == lss and self.disk.physical_sector_size == pss

    @rule(data=st.data())
    def write(self, data):
        if not self.disk.writable():
            with pytest.raises(vhdx.ReadOnlyError):
                self.disk.write(b"x")
            return
        offset = data.draw(st.integers(0, self.size - 1), "offset")
        length = data.draw(st.integers(1, min(self.size - offset, 3 * MiB)), "length")
        fill = data.draw(st.binary(min_size=1, max_size=64), "fill")
        payload = (fill * (length // len(fill) + 1))[:length]
        self.disk.seek(offset)
        assert self.disk.write(payload) == length
        assert self.disk.tell() == offset + length
        self.model[offset:offset + length] = payload

    @rule(data=st.data())
    def read(self, data):
        offset = data.draw(st.integers(0, self.size + 10), "offset")
        length = data.draw(st.integers(0, 2 * MiB), "length")
        self.disk.seek(offset)
        got = self.disk.read(length)
        assert got == bytes(self.model[offset:offset + length])

    @rule(readonly=st.booleans())
    def reopen(self, readonly):
        guid = self.disk.data_write_guid
        self.disk.close()
        self.disk = vhdx.open(self.path, "r" if readonly else "r+")
        assert self.disk.data_write_guid == guid

    @precondition(lambda self: self.disk is not None and self.disk.writable())
    @rule(data=st.data())
    def write_sector_aligned(self, data):
        ss = self.disk.logical_sector_size
        sectors = self.size // ss
        first = data.draw(st.integers(0, sectors - 1), "first")
        count = data.draw(st.integers(1, min(sectors - first, 4096)), "count")
        payload = os.urandom(count * ss)
        self.disk.seek(first * ss)
        self.disk.write(payload)
        self.model[first * ss:first * ss + len(payload)] = payload

    @invariant()
    def size_is_stable(self):
        if self.disk is not None:
            assert self.disk.size == self.size

    def teardown(self):
        if self.disk is not None:
            self.disk.close()
            with vhdx.open(self.path) as d:
                assert d.read() == bytes(self.model)
            from vhdx.ops.check import check_file
            report = check_file(self.path)
            assert not report.errors, report.errors
        self.dir.cleanup()


TestDiskModel = DiskModel.TestCase
TestDiskModel.settings = settings(max_examples=MAX_EXAMPLES, stateful_step_count=12, deadline=None,
                                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
