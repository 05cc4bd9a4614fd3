"""DirtyMap and the token bucket, in process."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.migration.dirty import DirtyMap
from pynbd.migration.mirror import TokenBucket, image_digest

CHUNK = 4096


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 30_000)), max_size=30),
       st.integers(1, 64))
def test_take_yields_every_marked_chunk_once(marks: list[tuple[int, int]], max_chunks: int) -> None:
    size = 250_000
    d = DirtyMap(size, CHUNK)
    want: set[int] = set()
    for off, n in marks:
        d.mark(off, n)
        a, b = d.chunk_range(off, n)
        want |= set(range(a, b))
    got: list[int] = []
    for off, n in d.take(max_chunks * CHUNK):
        assert off % CHUNK == 0 and 0 < n <= max_chunks * CHUNK
        got += list(range(off // CHUNK, (off + n + CHUNK - 1) // CHUNK))
    assert sorted(got) == sorted(want)
    assert d.dirty_bytes == 0 and d.dirty_chunks == 0


def test_mark_during_take_is_taken_again() -> None:
    d = DirtyMap(64 * CHUNK, CHUNK, all_dirty=True)
    it = d.take(8 * CHUNK)
    off, _n = next(it)
    d.mark(off, 1)  # a client write lands while the run is being copied
    rest = list(it)
    assert d.is_dirty(off, 1) or any(o <= off < o + m for o, m in rest)


def test_token_bucket_limits_and_changes_rate() -> None:
    b = TokenBucket(4 * 1024 * 1024)
    t0 = time.monotonic()
    for _ in range(8):
        b.consume(256 * 1024, lambda: False)
    elapsed = time.monotonic() - t0
    assert elapsed >= (2 * 1024 * 1024 - 4 * 1024 * 1024 * 0.1) / (4 * 1024 * 1024) * 0.9
    b.rate = 0
    t0 = time.monotonic()
    b.consume(1 << 30, lambda: False)
    assert time.monotonic() - t0 < 1.0


def test_image_digest_depends_on_size_and_content() -> None:
    a = image_digest(b"\x01" * 64, 1000, 4096)
    assert a != image_digest(b"\x01" * 64, 1001, 4096)
    assert a != image_digest(b"\x02" + b"\x01" * 63, 1000, 4096)
