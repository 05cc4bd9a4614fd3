"""A RAM disk that records how the server calls it, to check thread models and
per-connection open/close.

Parameters: ``record=PATH`` (the counters are written, as JSON, to ``PATH.PID`` after
every call), ``size=``, ``sleep=SECONDS`` (each data call lasts at least this long, so
calls the server lets overlap do overlap), ``wait_for=N`` (each data call waits, at most
10 s, until N calls have been running at once: proves that calls can overlap).

Recorded: ``max_active`` (calls running at once in the process, open_connection and
close_connection included),
``max_per_conn`` (at once on one connection), ``opens``/``closes`` (open_connection /
close_connection calls), ``max_open`` (connections open at once), ``calls``.
"""

from __future__ import annotations

import json
import os
import threading
import time

from pynbd.backends import Backend, Param, ThreadModel, parse_size

_lock = threading.Condition()
_state = {"max_active": 0, "max_per_conn": 0, "opens": 0, "closes": 0, "max_open": 0,
          "calls": 0, "active": 0, "open_now": 0, "close_errors": 0}


def _dump(record: str) -> None:
    tmp = f"{record}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_state, f)
    os.replace(tmp, f"{record}.{os.getpid()}")


def _busy(delta: int) -> None:
    """open_connection / close_connection count as calls too (not per connection)."""
    _state["active"] += delta
    _state["max_active"] = max(_state["max_active"], _state["active"])


class _Conn(Backend):
    """One connection's view: counts its own overlapping calls."""

    def __init__(self, parent: Recorder) -> None:
        self.p = parent
        self.size = parent.size
        self.active = 0
        self.closed = False

    def _enter(self) -> None:
        with _lock:
            _state["active"] += 1
            _state["calls"] += 1
            self.active += 1
            _state["max_active"] = max(_state["max_active"], _state["active"])
            _state["max_per_conn"] = max(_state["max_per_conn"], self.active)
            _lock.notify_all()
            if self.p.wait_for > 1:  # until that many calls were running at once
                _lock.wait_for(lambda: _state["max_active"] >= self.p.wait_for, timeout=10)
        if self.p.sleep:
            time.sleep(self.p.sleep)

    def _exit(self) -> None:
        with _lock:
            _state["active"] -= 1
            self.active -= 1
            _dump(self.p.record)

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self._enter()
        try:
            buf[:] = memoryview(self.p.data)[offset:offset + len(buf)]
        finally:
            self._exit()

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        self._enter()
        try:
            self.p.data[offset:offset + len(buf)] = buf
        finally:
            self._exit()

    def flush(self) -> None:
        self._enter()
        self._exit()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._enter()
        self._exit()

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        self._enter()
        try:
            self.p.data[offset:offset + length] = bytes(length)
        finally:
            self._exit()

    def close_connection(self) -> None:
        with _lock:
            if self.closed or self.active:
                _state["close_errors"] += 1  # closed twice, or with calls running
            self.closed = True
            _busy(+1)
        if self.p.sleep:
            time.sleep(self.p.sleep)
        with _lock:
            _busy(-1)
            _state["closes"] += 1
            _state["open_now"] -= 1
            _dump(self.p.record)


class Recorder(Backend):
    params = {
        "record": Param("where the counters go (PATH.PID)"),
        "size": Param("disk size", parse_size, 16 << 20),
        "sleep": Param("seconds each data call lasts at least", float, 0.0),
        "wait_for": Param("each call waits for this many running calls", int, 1),
    }
    blocking = True
    multi_process = True
    can_multi_conn = True
    can_trim = True

    def __init__(self, record: str, size: int, sleep: float, wait_for: int) -> None:
        self.record = record
        self.size = size
        self.sleep = sleep
        self.wait_for = wait_for
        self.data = bytearray(size)
        self.name = f"recorder:{type(self).__name__}"
        with _lock:
            _dump(record)

    def open_connection(self, export: str, read_only: bool) -> Backend:
        with _lock:
            _busy(+1)
            _state["opens"] += 1
            _state["open_now"] += 1
            _state["max_open"] = max(_state["max_open"], _state["open_now"])
        if self.sleep:
            time.sleep(self.sleep)
        with _lock:
            _busy(-1)
            _dump(self.record)
        return _Conn(self)


class SerializeAllRequests(Recorder):
    thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS


class SerializeConnections(Recorder):
    thread_model = ThreadModel.SERIALIZE_CONNECTIONS


class SerializeRequests(Recorder):
    thread_model = ThreadModel.SERIALIZE_REQUESTS


class InlineSerializeAll(Recorder):
    """The same, called inline (blocking False) unless the server decides otherwise."""

    thread_model = ThreadModel.SERIALIZE_ALL_REQUESTS
    blocking = False


def totals(record: str) -> dict[str, int]:
    """The counters of every process that served ``record``, added up (maxima: the
    largest)."""
    d = os.path.dirname(record) or "."
    base = os.path.basename(record) + "."
    out: dict[str, int] = {}
    for name in os.listdir(d):
        if not name.startswith(base) or name.endswith(".tmp"):
            continue
        with open(os.path.join(d, name)) as f:
            st = json.load(f)
        for k, v in st.items():
            out[k] = max(out.get(k, 0), v) if k.startswith("max") else out.get(k, 0) + v
    return out
