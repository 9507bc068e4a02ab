"""Read replies for libfuse's ``read_buf``: one page-aligned buffer in a ``fuse_bufvec``."""

from __future__ import annotations

import ctypes

import pytest

from vhdx.ops.fusebuf import PAGE, VECTOR_BYTES, FuseBufVec, ReplyMemory


def _free(replies: ReplyMemory, vector: int) -> None:
    vec = FuseBufVec.from_address(vector)
    replies.free(vec.buf[0].mem)
    replies.free(vector)


@pytest.mark.parametrize("size", [1, 4096, 131072 + 5, 1 << 20])
def test_a_reply_is_one_page_aligned_buffer_holding_what_fill_wrote(size: int) -> None:
    replies = ReplyMemory()
    slot = ctypes.c_void_p()
    data = bytes(range(256)) * (size // 256 + 1)
    replies.reply(ctypes.pointer(slot), size, lambda view: view.__setitem__(slice(None), data[:len(view)]))
    vec = FuseBufVec.from_address(slot.value)
    try:
        assert (vec.count, vec.idx, vec.off) == (1, 0, 0)
        buf = vec.buf[0]
        assert buf.size == size and buf.flags == 0 and buf.fd == -1   # memory, not a file descriptor
        assert buf.mem % PAGE == 0
        assert ctypes.string_at(buf.mem, size) == data[:size]
        tail = ctypes.string_at(slot.value + ctypes.sizeof(FuseBufVec), VECTOR_BYTES - ctypes.sizeof(FuseBufVec))
        assert tail == bytes(len(tail))   # fields a newer libfuse may append read as zeros
    finally:
        _free(replies, slot.value)


def test_an_empty_reply_has_no_memory() -> None:
    replies = ReplyMemory()
    slot = ctypes.c_void_p()
    replies.reply(ctypes.pointer(slot), 0, lambda view: pytest.fail("nothing to fill"))
    vec = FuseBufVec.from_address(slot.value)
    assert vec.count == 1 and vec.buf[0].size == 0 and not vec.buf[0].mem
    replies.free(slot.value)


def test_a_failed_fill_sets_no_reply() -> None:
    replies = ReplyMemory()
    slot = ctypes.c_void_p()

    def fail(view: memoryview) -> None:
        raise OSError(5, "read failed")
    with pytest.raises(OSError):
        replies.reply(ctypes.pointer(slot), 4096, fail)
    assert slot.value is None      # libfuse is handed nothing (the buffer went back to the C library)
