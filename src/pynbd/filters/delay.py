"""``--filter delay``: add latency to chosen operations, like nbdkit's delay filter, to
simulate a slow or distant disk or to test clients' timeouts.

    --filter delay:rdelay=100ms,wdelay=250ms
    --filter delay:delay-flush=2s,delay-zero=1

Nothing sleeps by default (``mode=hold``): a delayed request is parked by the server
(admission WAIT) and runs when its time has come, so it costs no thread and other
connections are served meanwhile. The server admits one connection's requests in
order, so on one connection delays add up: with ``rdelay=10ms`` a connection completes
at most 100 reads a second, whatever its queue depth (nbdkit's delay filter sleeps in
its request threads, so there delays of one connection overlap up to its thread count).

``mode=sleep`` spends the delay inside the call, on a worker thread (the stack becomes
blocking), as a slow plugin would: the request counts as running, so the server's
request deadline (``--request-timeout``) applies to it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pynbd.backends.base import Backend, ConfigError, Extent, Param
from pynbd.filters.opsfilter import CMD_OPS, OPS, HoldingFilter, parse_changes, parse_duration

#: a held request is asked about again at least this often, so a delay shortened at run
#: time applies soon to requests already held
MAX_HOLD = 0.25


def parse_mode(text: str) -> str:
    t = text.strip().lower()
    if t not in ("hold", "sleep"):
        raise ValueError(f"{text!r}: expected hold (park the request, no thread) or sleep "
                         "(sleep inside the call, like a slow plugin)")
    return t


#: parameter -> operation; rdelay/wdelay are nbdkit's short forms
_PARAM_OPS = {
    "rdelay": "read", "delay-read": "read", "wdelay": "write", "delay-write": "write",
    "delay-trim": "trim", "delay-zero": "zero", "delay-flush": "flush",
    "delay-cache": "cache", "delay-extents": "extents",
}


class DelayCounters:
    __slots__ = ("delayed", "lock", "seconds")

    def __init__(self) -> None:
        self.delayed = dict.fromkeys(OPS, 0)
        self.seconds = 0.0
        self.lock = threading.Lock()


class DelayFilter(HoldingFilter):
    params = {
        **{k: Param(f"delay {op} requests (seconds, or with s/ms/us/ns)", parse_duration, 0.0)
           for k, op in _PARAM_OPS.items()},
        "mode": Param("hold (park the request; default) or sleep (in the call, on a "
                      "thread)", parse_mode, "hold"),
    }

    def __init__(self, next: Backend, *, mode: str = "hold", **params: Any) -> None:
        super().__init__(next)
        self.mode = mode
        #: operation -> seconds (shared by the connections; changed by configure)
        self.delays = dict.fromkeys(OPS, 0.0)
        self._apply(params)
        self.counters = DelayCounters()
        if mode == "sleep":
            self.admits = False  # type: ignore[misc]
        self.connection_opened()

    @staticmethod
    def _ops_of(params: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, secs in params.items():
            op = _PARAM_OPS[key]
            if op in out and out[op] != secs and secs and out[op]:
                raise ConfigError(f"filter delay: {key} and another parameter both set the "
                                  f"{op} delay (rdelay is delay-read, wdelay delay-write)")
            if secs or op not in out:
                out[op] = float(secs)
        return out

    def _apply(self, params: dict[str, Any]) -> None:
        for op, secs in self._ops_of(params).items():
            self.delays[op] = secs

    # --- mode=hold: admission -----------------------------------------------------------

    def connection_opened(self) -> None:
        self._since: float | None = None
        self._op = ""

    def hold(self, cmd: str, offset: int, length: int, now: float) -> float:
        since = self._since
        if since is None:
            op = CMD_OPS.get(cmd)
            d = self.delays[op] if op is not None else 0.0
            if d <= 0:
                return 0.0
            assert op is not None
            self._since, self._op = now, op
            c = self.counters
            c.delayed[op] += 1
            c.seconds += d
        else:
            # asked again: the delay is measured from when the request was first seen,
            # with the current setting (a run-time change applies to held requests too)
            d = since + self.delays[self._op] - now
            if d <= 0:
                self._since = None
                return 0.0
        return d if d < MAX_HOLD else MAX_HOLD

    # --- mode=sleep: in the call ---------------------------------------------------------

    @property
    def blocking(self) -> bool:  # type: ignore[override]
        return self.mode == "sleep" or bool(self.next.blocking)

    @property
    def sendfile_fd(self) -> int | None:  # type: ignore[override]
        if self.mode == "sleep":
            return None
        fd = getattr(self.next, "sendfile_fd", None)
        return fd if isinstance(fd, int) else None

    def _sleep(self, op: str) -> None:
        if self.mode != "sleep":
            return
        d = self.delays[op]
        if d > 0:
            c = self.counters
            with c.lock:
                c.delayed[op] += 1
                c.seconds += d
            time.sleep(d)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._sleep("read")
        self.next.pread_into(buf, offset)

    def pread_nowait(self, buf: memoryview, offset: int) -> bool:
        if self.mode == "sleep" and self.delays["read"] > 0:
            return False  # the server calls pread_into on a thread
        return self.next.pread_nowait(buf, offset)

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._sleep("write")
        self.next.pwrite(buf, offset, fua)

    def flush(self) -> None:
        self._sleep("flush")
        self.next.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._sleep("trim")
        self.next.trim(offset, length, fua)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._sleep("zero")
        self.next.zero(offset, length, may_trim, fast, fua)

    def cache(self, offset: int, length: int) -> None:
        self._sleep("cache")
        self.next.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self._sleep("extents")
        return self.next.extents(offset, length)

    # --- run-time changes and status ----------------------------------------------------

    def configure(self, params: dict[str, str]) -> None:
        changes = parse_changes("filter delay", type(self).params, params,
                                fixed=frozenset({"mode"}))
        self._apply(changes)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"delayed": {op: n for op, n in c.delayed.items()},
                "delayed_seconds": round(c.seconds, 6),
                "delays": {op: repr(d) for op, d in self.delays.items() if d},
                "mode": self.mode}
