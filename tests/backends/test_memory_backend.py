"""The memory backend's extents and trim against a byte-for-byte model, including the
64-bit ranges extended headers allow (a 16 TiB query costs what is allocated: the
memfd's SEEK_DATA/SEEK_HOLE and punch-hole skip unallocated pages)."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.backends.base import STATE_HOLE, STATE_ZERO
from pynbd.backends.memory import CHUNK, MemoryBackend

SIZE = 40 * CHUNK
ops = st.lists(st.tuples(st.sampled_from(["write", "trim", "zero"]),
                         st.integers(0, SIZE - 1), st.integers(1, 6 * CHUNK)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(0, SIZE - 1), st.integers(1, SIZE))
def test_extents_and_trim_match_a_model(seq: list[tuple[str, int, int]], q_off: int,
                                        q_len: int) -> None:
    b = MemoryBackend(SIZE)
    allocated = [False] * (SIZE // CHUNK)
    data = bytearray(SIZE)
    for op, off, n in seq:
        n = min(n, SIZE - off)
        if op == "write":
            b.pwrite(b"\x01" * n, off)
            data[off:off + n] = b"\x01" * n
            for i in range(off // CHUNK, (off + n - 1) // CHUNK + 1):
                allocated[i] = True
        else:
            (b.trim if op == "trim" else b.zero)(off, n)
            data[off:off + n] = bytes(n)
            for i in range(-(-off // CHUNK), (off + n) // CHUNK):  # whole chunks only
                allocated[i] = False
    buf = bytearray(SIZE)
    b.pread_into(memoryview(buf), 0)
    assert buf == data
    q_len = min(q_len, SIZE - q_off)
    ext = b.extents(q_off, q_len)
    pos = q_off
    for e in ext:
        assert e.length > 0
        for p in range(pos, pos + e.length, CHUNK // 4):
            hole = not allocated[p // CHUNK]
            assert bool(e.flags & STATE_HOLE) == hole
            assert bool(e.flags & STATE_ZERO) == hole
        pos += e.length
    assert pos == q_off + q_len  # covered exactly (fewer than 1024 extents here)
    assert all(a.flags != c.flags for a, c in itertools.pairwise(ext))


def test_huge_ranges_cost_what_is_allocated() -> None:
    size = 16 << 40
    b = MemoryBackend(size)
    b.pwrite(b"x" * 4096, 6 << 30)
    b.pwrite(b"y" * 4096, size - 4096)
    ext = [(e.length, e.flags) for e in b.extents(0, size)]
    hole = STATE_HOLE | STATE_ZERO
    assert ext == [(6 << 30, hole), (CHUNK, 0), (size - (6 << 30) - 2 * CHUNK, hole),
                   (CHUNK, 0)]
    b.trim(0, size)  # 2^28 chunk slots, two allocated: only those are visited
    assert [(e.length, e.flags) for e in b.extents(0, size)] == [(size, hole)]
    b.zero(0, size)
    assert [(e.length, e.flags) for e in b.extents(0, size)] == [(size, hole)]
    assert os.fstat(b.fd).st_blocks == 0  # the memfd holds no pages
