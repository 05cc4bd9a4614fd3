"""``--filter rate``: limit the bytes per second read and written, per connection and in
total, like nbdkit's rate filter (but in bytes, not bits, per second).

    --filter rate:rate=100M,connection-rate=20M
    --filter rate:read-rate=50M,write-rate=10M,burstiness=0.5

Nothing sleeps: the filter answers the server's admission question with "wait this
long" (a token bucket in debt) and the server parks the request without blocking a
thread or other connections. Limits change at run time with
``pynbd filter --control PATH rate rate=10M`` (every worker process at once).

How a bucket works: a READ or WRITE of n bytes takes n tokens from each bucket that
applies (total, total per direction, the connection's, the connection's per
direction) and runs once every one of them is out of debt; tokens come back at the
rate, up to ``burst`` bytes (``rate * burstiness`` unless ``burst=`` is given).
Other commands (trim, zero, flush, cache, block status) move no data and pass.

Total limits with several worker processes: the total buckets live in shared memory
(a memfd every worker maps, under a POSIX record lock), so ``rate=`` limits the whole
server, not each process. Per-connection buckets are the connection's own.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import time
from typing import Any

from pynbd.backends import parse_size
from pynbd.backends.base import Backend, ConfigError, Param
from pynbd.filters.opsfilter import HoldingFilter, parse_changes

#: a held request is asked about again at least this often, so a limit raised at run
#: time frees it soon (the server has no other way to wake it)
MAX_HOLD = 0.25

_MAGIC = 0x7079_6E62_6472  # "pynbdr"


def parse_rate(text: str) -> int:
    """``10M``, ``512K/s``, ``0``/``off``/``unlimited`` (no limit) -> bytes per second."""
    t = text.strip().lower()
    if t in ("", "0", "off", "none", "unlimited", "inf"):
        return 0
    t = re.sub(r"\s*/\s*s(ec)?$", "", t)
    try:
        return parse_size(t)
    except ValueError:
        raise ValueError(f"invalid rate {text!r} (bytes per second, e.g. 10M, 512K, 0 "
                         "for no limit)") from None


def parse_burstiness(text: str) -> float:
    v = float(text)
    if not 0.001 <= v <= 3600:
        raise ValueError(f"{text!r}: expected seconds between 0.001 and 3600")
    return v


def _fd(text: str) -> int:
    return int(text) if text else -1


# --- the token bucket (pure: the caller passes the clock) ------------------------------

class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` saved; may go into debt.

    A request charges its bytes at once (:meth:`take`) and gets a ticket; it may go
    when the bucket has earned that far (:meth:`wait_for`). Later charges do not move
    an earlier ticket, so requests go in the order they were charged (no connection
    starves another), and a rate changed while requests wait applies to them at once.

    The state is five doubles in ``v`` (rate, burst, tokens, stamp, spent), a
    memoryview of a bytearray or of shared memory: the same code serves one process or
    many. Time is whatever clock the caller passes as ``now`` (seconds, monotonic).
    """

    __slots__ = ("v",)

    NDOUBLES = 5

    def __init__(self, v: memoryview[float] | None = None) -> None:
        self.v: memoryview[float] = (v if v is not None
                                     else memoryview(bytearray(8 * self.NDOUBLES)).cast("d"))

    @property
    def rate(self) -> float:
        return self.v[0]

    @property
    def burst(self) -> float:
        return self.v[1]

    @property
    def tokens(self) -> float:
        return self.v[2]

    def set_limit(self, rate: float, burst: float, now: float) -> None:
        """A new rate (0: unlimited) and capacity; tokens earned so far are kept (up
        to the new capacity), debt stays, to be paid at the new rate."""
        v = self.v
        was = v[0]
        if was > 0:
            self._refill(now)
        v[0] = rate
        v[1] = burst
        if was <= 0:
            v[2] = burst  # starts full
        elif v[2] > burst:
            v[2] = burst
        v[3] = now

    def _refill(self, now: float) -> None:
        v = self.v
        if now > v[3]:
            t = v[2] + (now - v[3]) * v[0]
            v[2] = t if t < v[1] else v[1]
            v[3] = now

    def take(self, n: int, now: float) -> float:
        """Charge ``n`` bytes (going into debt if there are fewer tokens); the ticket
        to pass to :meth:`wait_for`."""
        v = self.v
        if v[0] > 0:
            self._refill(now)
            v[2] -= n
        v[4] += n
        return v[4]

    def charge(self, n: int, now: float) -> tuple[float, float]:
        """:meth:`take` and :meth:`wait_for` its ticket in one step (the common case,
        for a limited bucket): (ticket, seconds to wait)."""
        v = self.v
        rate = v[0]
        tokens = v[2]
        stamp = v[3]
        if now > stamp:
            tokens += (now - stamp) * rate
            burst = v[1]
            if tokens > burst:
                tokens = burst
            v[3] = now
        tokens -= n
        v[2] = tokens
        spent = v[4] + n
        v[4] = spent
        return spent, (0.0 if tokens >= 0 or rate <= 0 else -tokens / rate)

    def wait_for(self, ticket: float, now: float) -> float:
        """Seconds until the bucket has earned up to ``ticket`` (0: it has)."""
        v = self.v
        rate = v[0]
        if rate <= 0:
            return 0.0
        self._refill(now)
        short = ticket - (v[4] + v[2])  # earned so far = spent + tokens
        return 0.0 if short <= 0 else short / rate

    def wait(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0: it is)."""
        return self.wait_for(self.v[4], now)


# --- limits and the total buckets, in one block (shared memory with several workers) --

# doubles: magic, generation, the six rates, burstiness, burst, then 3 buckets
_KEYS = ("rate", "connection-rate", "read-rate", "write-rate", "connection-read-rate",
         "connection-write-rate")
_I_GEN = 1
_I_RATES = 2
_I_BURSTINESS = 8
_I_BURST = 9
_I_BUCKETS = 10
_NB = TokenBucket.NDOUBLES
_NDOUBLES = _I_BUCKETS + 3 * _NB
_SIZE = 4096


class RateState:
    """The limits and the total buckets (all, read, write). One per filter in a
    process; with worker processes, one block of shared memory for all of them."""

    def __init__(self, fd: int = -1) -> None:
        self.fd = fd
        self.mm: mmap.mmap | None = None
        if fd >= 0:
            try:
                if os.fstat(fd).st_size < _SIZE:
                    raise OSError("too small")
                self.mm = mmap.mmap(fd, _SIZE, flags=mmap.MAP_SHARED)
            except OSError as exc:
                raise ConfigError(f"filter rate: shared-fd={fd} is not the server's shared "
                                  f"rate block ({exc})") from None
            self.v: memoryview[float] = memoryview(self.mm).cast("d")
            if self.v[0] != _MAGIC:
                raise ConfigError(f"filter rate: shared-fd={fd} is not the server's "
                                  "shared rate block")
        else:
            self.v = memoryview(bytearray(_NDOUBLES * 8)).cast("d")
            self.v[0] = _MAGIC
        self.totals = self._buckets(self.v)

    @staticmethod
    def _buckets(v: memoryview[float]) -> list[TokenBucket]:
        return [TokenBucket(v[_I_BUCKETS + _NB * i:_I_BUCKETS + _NB * (i + 1)])
                for i in range(3)]

    @property
    def shared(self) -> bool:
        return self.mm is not None

    def lock(self) -> None:
        if self.mm is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        if self.mm is not None:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def share(self) -> int:
        """Move this state into shared memory (before worker processes start); the fd
        a worker passes as ``shared-fd``."""
        if self.mm is None:
            fd = os.memfd_create("pynbd-rate", os.MFD_CLOEXEC)
            os.ftruncate(fd, _SIZE)
            mm = mmap.mmap(fd, _SIZE, flags=mmap.MAP_SHARED)
            v = memoryview(mm).cast("d")
            v[:_NDOUBLES] = self.v[:_NDOUBLES]
            self.fd, self.mm, self.v = fd, mm, v
            self.totals = self._buckets(v)
        return self.fd

    @property
    def generation(self) -> float:
        return self.v[_I_GEN]

    def rates(self) -> dict[str, float]:
        v = self.v
        return {k: v[_I_RATES + i] for i, k in enumerate(_KEYS)}

    def burst_for(self, rate: float) -> float:
        v = self.v
        b = v[_I_BURST]
        return b if b > 0 else rate * v[_I_BURSTINESS]

    def apply(self, changes: dict[str, Any], now: float) -> None:
        """Set limits (validated already); the total buckets follow at once, the
        connections' when they next see the new generation."""
        self.lock()
        try:
            v = self.v
            for i, k in enumerate(_KEYS):
                if k in changes:
                    v[_I_RATES + i] = float(changes[k])
            if "burstiness" in changes:
                v[_I_BURSTINESS] = float(changes["burstiness"])
            if "burst" in changes:
                v[_I_BURST] = float(changes["burst"])
            for bucket, i in zip(self.totals, (0, 2, 3), strict=True):
                r = v[_I_RATES + i]
                bucket.set_limit(r, self.burst_for(r), now)
            v[_I_GEN] += 1
        finally:
            self.unlock()

    def close(self) -> None:
        if self.mm is not None:
            self.totals = []
            mm, self.mm = self.mm, None
            try:
                mm.close()
            except BufferError:  # a connection's view is still alive: the GC unmaps it
                pass
            os.close(self.fd)
            self.fd = -1


class RateCounters:
    """What ``pynbd status`` shows (shared by a filter's connections in one process)."""

    __slots__ = ("bytes_read", "bytes_written", "held_requests", "held_seconds",
                 "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.held_requests = 0
        self.held_seconds = 0.0


class RateFilter(HoldingFilter):
    params = {
        "rate": Param("total bytes/s read + written over all connections (0: no limit)",
                      parse_rate, 0),
        "connection-rate": Param("bytes/s read + written per connection", parse_rate, 0),
        "read-rate": Param("total bytes/s read", parse_rate, 0),
        "write-rate": Param("total bytes/s written", parse_rate, 0),
        "connection-read-rate": Param("bytes/s read per connection", parse_rate, 0),
        "connection-write-rate": Param("bytes/s written per connection", parse_rate, 0),
        "burstiness": Param("seconds of traffic a bucket saves up (burst = rate x this)",
                            parse_burstiness, 2.0),
        "burst": Param("bucket size in bytes, instead of rate x burstiness", parse_size, 0),
        "shared-fd": Param("(set by the server for its worker processes)", _fd, -1),
    }

    def __init__(self, next: Backend, *, rate: int = 0, burstiness: float = 2.0,
                 burst: int = 0, **params: Any) -> None:
        super().__init__(next)
        shared_fd = int(params.pop("shared-fd", -1))
        self.state = RateState(shared_fd)
        if shared_fd < 0:
            changes: dict[str, Any] = {"rate": rate, "burstiness": burstiness,
                                       "burst": burst}
            changes.update({k.replace("_", "-"): v for k, v in params.items()})
            # any clock >= 0 works: the buckets start full
            self.state.apply(changes, 0.0)
        self.counters = RateCounters()
        # per connection (set again on each connection's copy)
        self._conn = [TokenBucket() for _ in range(3)]
        self._gen = -1.0
        self._limits: dict[int, list[TokenBucket]] = {1: [], 2: []}
        self._locked = False
        self._held_since: float | None = None
        self._tickets: list[float] = []

    # --- admission ------------------------------------------------------------------

    def connection_opened(self) -> None:
        self._conn = [TokenBucket() for _ in range(3)]
        self._gen = -1.0
        self._limits = {1: [], 2: []}
        self._locked = False
        self._held_since = None

    def _sync(self, now: float) -> None:
        """The limits changed (or this connection is new): the connection's buckets
        take the new rates; which buckets limit reads and writes."""
        st = self.state
        rates = st.rates()
        for bucket, key in zip(self._conn, ("connection-rate", "connection-read-rate",
                                            "connection-write-rate"), strict=True):
            r = rates[key]
            bucket.set_limit(r, st.burst_for(r), now)
        self._gen = st.generation
        tot, conn = st.totals, self._conn
        #: the limited buckets a read (1) or a write (2) is charged to
        self._limits = {d: [b for b in (tot[0], tot[d], conn[0], conn[d]) if b.rate > 0]
                        for d in (1, 2)}
        #: a total limit in shared memory: take the lock around the buckets
        self._locked = st.shared and any(rates[k] > 0 for k in ("rate", "read-rate",
                                                                "write-rate"))

    def hold(self, cmd: str, offset: int, length: int, now: float) -> float:
        if cmd == "READ":
            d = 1
        elif cmd == "WRITE":
            d = 2
        else:
            return 0.0
        st = self.state
        if st.v[_I_GEN] != self._gen:
            self._sync(now)
        c = self.counters
        buckets = self._limits[d]
        if buckets and length:
            first = self._held_since is None
            wait = self._charge(buckets, length, now, first)
            if wait > 0:
                if first:
                    self._held_since = now
                    c.held_requests += 1
                return wait if wait < MAX_HOLD else MAX_HOLD
            if not first:
                assert self._held_since is not None
                c.held_seconds += now - self._held_since
                self._held_since = None
        c.requests += 1
        if d == 1:
            c.bytes_read += length
        else:
            c.bytes_written += length
        return 0.0

    def _charge(self, buckets: list[Any], length: int, now: float, first: bool) -> float:
        """Charge (the first time) or check (when held) every bucket; the longest wait."""
        st = self.state
        locked = self._locked
        if locked:
            st.lock()
        try:
            wait = 0.0
            if first:
                tickets = []
                for b in buckets:
                    t, w = b.charge(length, now)
                    tickets.append(t)
                    if w > wait:
                        wait = w
                self._tickets = tickets
            else:
                for b, t in zip(buckets, self._tickets, strict=True):
                    w = b.wait_for(t, now)
                    if w > wait:
                        wait = w
        finally:
            if locked:
                st.unlock()
        return wait

    # --- run-time changes and status ----------------------------------------------------

    def configure(self, params: dict[str, str]) -> None:
        self.reconfigure(params, time.monotonic())

    def reconfigure(self, params: dict[str, str], now: float) -> None:
        """:meth:`configure` on the caller's clock (the admission clock)."""
        changes = parse_changes("filter rate", type(self).params, params,
                                fixed=frozenset({"shared-fd"}))
        self.state.apply(changes, now)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        st = self.state
        # limits as text: numbers would be summed over the worker processes
        limits = {k: str(int(v)) for k, v in st.rates().items()}
        limits["burstiness"] = repr(st.v[_I_BURSTINESS])
        limits["burst"] = str(int(st.v[_I_BURST]))
        return {"requests": c.requests, "bytes_read": c.bytes_read,
                "bytes_written": c.bytes_written, "held_requests": c.held_requests,
                "held_seconds": round(c.held_seconds, 6), "limits": limits,
                "shared": "yes" if st.shared else "no"}

    def worker_spec(self) -> dict[str, object] | None:
        spec = super().worker_spec()
        if spec is None:
            return None
        fd = self.state.share()  # the total buckets move to shared memory
        filters: list[dict[str, Any]] = [dict(f) for f in spec["filters"]]  # type: ignore[attr-defined]
        filters[0] = {"name": filters[0]["name"],
                      "params": {**filters[0]["params"], "shared-fd": str(fd)}}
        fds: list[int] = list(spec.get("fds", []))  # type: ignore[call-overload]
        return {**spec, "filters": filters, "fds": [*fds, fd]}

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.state.close()
