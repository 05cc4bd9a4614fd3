"""DirtyMap and the token bucket, in process."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.migration.digests import image_digest
from pynbd.migration.dirty import DirtyMap
from pynbd.migration.throttle import TokenBucket

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


class VirtualClock:
    """Time that only moves when the bucket sleeps: the test checks the limiter's
    arithmetic, not how fast this machine is."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_token_bucket_limits_and_changes_rate() -> None:
    vc = VirtualClock()
    rate = 4 * 1024 * 1024
    b = TokenBucket(rate, clock=vc.clock, sleep=vc.sleep)
    for _ in range(8):
        b.consume(256 * 1024, lambda: False)
    # 2 MiB at 4 MiB/s: at least 0.5 s of (virtual) time, less the first request that
    # the empty bucket lets through before it goes negative
    assert vc.now - 1000.0 >= (2 * 1024 * 1024 - 256 * 1024) / rate
    assert vc.now - 1000.0 <= 2 * 1024 * 1024 / rate + 0.05
    b.rate = 0  # unlimited: no sleeping at all
    before = vc.sleeps
    b.consume(1 << 30, lambda: False)
    assert vc.sleeps == before
    b.rate = rate // 2  # a new, lower rate applies to the next request
    start = vc.now
    for _ in range(4):
        b.consume(256 * 1024, lambda: False)
    assert vc.now - start >= (1024 * 1024 - 256 * 1024) / (rate // 2)


def test_token_bucket_stops_waiting_when_cancelled() -> None:
    vc = VirtualClock()
    b = TokenBucket(1024, clock=vc.clock, sleep=vc.sleep)
    b.consume(1 << 20, lambda: False)  # deep in debt now
    assert b.consume(1, lambda: True) == 0.0 and vc.sleeps == 0


def test_image_digest_depends_on_size_and_content() -> None:
    a = image_digest(b"\x01" * 64, 1000, 4096)
    assert a != image_digest(b"\x01" * 64, 1001, 4096)
    assert a != image_digest(b"\x02" + b"\x01" * 63, 1000, 4096)
