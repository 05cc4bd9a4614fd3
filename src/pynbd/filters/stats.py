"""``--filter stats``: per-operation counts, bytes, errors and latency histograms, shown
by ``pynbd status`` (``exports[i].filters.stats``) and as Prometheus metrics
(``pynbd_filter_stats_*``, with ``pynbd serve --metrics``).

The latency of an operation is the time its call spent in the layers below this one
(filters further down and the plugin), measured with ``perf_counter_ns``; time a
request spent held by admission (a rate limit, an injected delay, a paused export) is
not in it. Histogram buckets are powers of two of microseconds: the bucket ``"8"``
counts calls that took at least 4 and less than 8 us (``"1"``: under 1 us).

Each worker process counts its own requests; ``pynbd status`` shows the sum.
"""

from __future__ import annotations

import threading
from time import perf_counter_ns
from typing import Any

from pynbd.backends.base import Backend, Extent
from pynbd.filters.base import Filter
from pynbd.filters.opsfilter import OPS

#: histogram buckets: up to 2**(NBUCKETS-1) us (about 9 minutes); slower calls land in
#: the last one
NBUCKETS = 30


def bucket_of(ns: int) -> int:
    """The histogram bucket of a call that took ``ns`` nanoseconds: ``k`` counts calls
    of at least ``2**(k-1)`` and less than ``2**k`` us (bucket 0: under 1 us)."""
    k = (ns // 1000).bit_length()
    return k if k < NBUCKETS else NBUCKETS - 1


class OpStats:
    __slots__ = ("bytes", "errors", "hist", "ns", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.errors = 0
        self.ns = 0
        self.hist = [0] * NBUCKETS

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "errors": self.errors,
                "seconds": self.ns / 1e9,
                "latency_us": {str(1 << k): n for k, n in enumerate(self.hist) if n}}


class StatsTable:
    """The counters of one filter in one process (shared by its connections)."""

    def __init__(self) -> None:
        self.ops = {op: OpStats() for op in OPS}
        self.lock = threading.Lock()

    def record(self, s: OpStats, nbytes: int, t0: int, failed: bool) -> None:
        ns = perf_counter_ns() - t0
        k = bucket_of(ns)
        with self.lock:
            s.requests += 1
            s.bytes += nbytes
            s.ns += ns
            s.hist[k] += 1
            if failed:
                s.errors += 1


class StatsFilter(Filter):
    params = {}

    def __init__(self, next: Backend) -> None:
        super().__init__(next)
        self.table = StatsTable()
        ops = self.table.ops
        self._read, self._write, self._trim = ops["read"], ops["write"], ops["trim"]
        self._zero, self._flush = ops["zero"], ops["flush"]
        self._cache, self._extents = ops["cache"], ops["extents"]

    def pread_into(self, buf: memoryview, offset: int) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.pread_into(buf, offset)
        except BaseException:
            self.table.record(self._read, len(buf), t0, True)
            raise
        self.table.record(self._read, len(buf), t0, False)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        t0 = perf_counter_ns()
        try:
            done = self.next.pread_nowait(buf, offset)
        except BaseException:
            self.table.record(self._read, len(buf), t0, True)
            raise
        if done:  # otherwise the server calls pread_into on a thread: counted there
            self.table.record(self._read, len(buf), t0, False)
        return done

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.pwrite(buf, offset, fua)
        except BaseException:
            self.table.record(self._write, len(buf), t0, True)
            raise
        self.table.record(self._write, len(buf), t0, False)

    def flush(self) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.flush()
        except BaseException:
            self.table.record(self._flush, 0, t0, True)
            raise
        self.table.record(self._flush, 0, t0, False)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.trim(offset, length, fua)
        except BaseException:
            self.table.record(self._trim, length, t0, True)
            raise
        self.table.record(self._trim, length, t0, False)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.zero(offset, length, may_trim, fast, fua)
        except BaseException:
            self.table.record(self._zero, length, t0, True)
            raise
        self.table.record(self._zero, length, t0, False)

    def cache(self, offset: int, length: int) -> None:
        t0 = perf_counter_ns()
        try:
            self.next.cache(offset, length)
        except BaseException:
            self.table.record(self._cache, length, t0, True)
            raise
        self.table.record(self._cache, length, t0, False)

    def extents(self, offset: int, length: int) -> list[Extent]:
        t0 = perf_counter_ns()
        try:
            out = self.next.extents(offset, length)
        except BaseException:
            self.table.record(self._extents, length, t0, True)
            raise
        self.table.record(self._extents, length, t0, False)
        return out

    def stats(self) -> dict[str, Any]:
        t = self.table
        with t.lock:
            return {"ops": {op: s.as_dict() for op, s in t.ops.items()}}
