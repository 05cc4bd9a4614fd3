"""The proxy's upstream: a pool of NBD client connections that survives failures.

Every request the proxy receives is run on one pooled connection. When the connection
fails (reset, EOF, protocol error) or the upstream answers ESHUTDOWN (it stepped down after
a migration), the request is replayed on a fresh connection, to whatever URI is current
(``switch`` changes it), with bounded retries. Every NBD request the proxy forwards (read,
write, flush, trim, write-zeroes) is idempotent at the block level, so a replay is safe.

FLUSH covers every write the proxy acknowledged before it, whichever upstream connection
carried it: unless the upstream advertises multi-conn (a flush on one connection covers
all), the proxy flushes each connection that has completed writes since its last flush,
waiting for busy ones to come back. So the proxy can advertise multi-conn itself.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pynbd.backends.base import Backend, BackendError
from pynbd.client import Client, CmdFlag, NBDRequestError, ProtocolError
from pynbd.client import connect as nbd_connect

log = logging.getLogger("pynbd.proxy")

T = TypeVar("T")


class _Conn:
    """One upstream connection and the writes it completed (for FLUSH)."""

    __slots__ = ("busy", "client", "flushed", "gen", "writes")

    def __init__(self, gen: int, client: Client) -> None:
        self.gen = gen
        self.client = client
        self.busy = True
        self.writes = 0
        self.flushed = 0


class UpstreamPool:
    def __init__(self, uri: str, max_connections: int = 16, max_retries: int = 60,
                 retry_deadline: float = 120.0, connect_timeout: float = 10.0,
                 request_timeout: float = 60.0) -> None:
        self.uri = uri
        #: an upstream request that takes longer is abandoned and replayed (0 = never)
        self.request_timeout = request_timeout
        self.generation = 0
        self.max_connections = max_connections
        self.max_retries = max_retries
        self.retry_deadline = retry_deadline
        self.connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        #: every open connection of the current generation (idle or busy)
        self._open: set[_Conn] = set()
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.connects = 0
        self.reconnects = 0
        self.retries = 0
        self.replayed_requests = 0
        self.failed_requests = 0
        self.switches = 0
        self.stepped_down_replies = 0
        self.last_error = ""
        self.size = 0
        self.flags_client: Client | None = None
        #: a flush on one upstream connection covers writes on all of them
        self.multi_conn = False
        self.flushes_fanned_out = 0

    def _connect(self) -> _Conn:
        gen, uri = self.generation, self.uri
        c = nbd_connect(uri, timeout=self.connect_timeout)
        try:
            c.socket.settimeout(self.request_timeout or None)
        except OSError:
            pass
        if self.size and c.size != self.size:
            c.hard_close()
            raise BackendError(errno.EIO, f"upstream {uri} has size {c.size}, not {self.size}")
        k = _Conn(gen, c)
        with self._lock:
            self.connects += 1
            if gen == self.generation:
                self._open.add(k)
        return k

    def probe(self) -> Client:
        """First connection: learn the size and capabilities."""
        k = self._connect()
        c = k.client
        self.size = c.size
        self.flags_client = c
        self.multi_conn = c.can_multi_conn()
        self._put(k)
        return c

    def _get(self) -> _Conn:
        with self._lock:
            while self._idle:
                k = self._idle.pop()
                if k.gen == self.generation:
                    k.busy = True
                    return k
                k.client.hard_close()
        return self._connect()

    def _put(self, k: _Conn) -> None:
        with self._lock:
            k.busy = False
            if k.gen == self.generation and k in self._open:
                self._idle.append(k)
                self._returned.notify_all()
                return
            self._open.discard(k)
            self._returned.notify_all()
        k.client.hard_close()

    def _drop(self, k: _Conn) -> None:
        with self._lock:
            k.busy = False
            self._open.discard(k)
            self._returned.notify_all()
        k.client.hard_close()

    def call(self, what: str, fn: Callable[[Client], T], writes: bool = False) -> T:
        deadline = time.monotonic() + self.retry_deadline
        delay = 0.02
        attempt = 0
        with self._slots:
            while True:
                attempt += 1
                try:
                    k = self._get()
                except (OSError, ProtocolError) as exc:
                    err: BaseException = exc
                else:
                    try:
                        result = fn(k.client)
                    except NBDRequestError as exc:
                        if exc.errno != errno.ESHUTDOWN:
                            self._put(k)
                            raise  # a real error: the client gets it
                        with self._lock:
                            self.stepped_down_replies += 1
                        self._drop(k)
                        err = exc
                    except (OSError, ProtocolError) as exc:
                        self._drop(k)
                        err = exc
                    else:
                        if writes:
                            k.writes += 1
                        self._put(k)
                        if attempt > 1:
                            with self._lock:
                                self.replayed_requests += 1
                        return result
                with self._lock:
                    self.retries += 1
                    self.last_error = f"{what}: {err}"
                if attempt >= self.max_retries or time.monotonic() > deadline:
                    with self._lock:
                        self.failed_requests += 1
                    log.error("%s failed after %d attempts: %s", what, attempt, err)
                    raise BackendError(errno.EIO, f"upstream unavailable: {err}")
                if attempt == 1:
                    log.info("upstream %s: %s; replaying", self.uri, err)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                with self._lock:
                    self.reconnects += 1

    def flush(self) -> None:
        """FLUSH that covers every write completed (on any connection) before the call."""
        if self.multi_conn:
            self.call("flush", lambda c: c.flush())
            return
        with self._lock:
            targets = [k for k in self._open if k.writes > k.flushed]
        if not targets:
            self.call("flush", lambda c: c.flush())
            return
        if len(targets) > 1:
            with self._lock:
                self.flushes_fanned_out += 1
        for k in targets:
            self._flush_one(k)

    def _flush_one(self, k: _Conn) -> None:
        wait = max(self.request_timeout, 1.0) + 5.0
        deadline = time.monotonic() + wait
        with self._lock:
            while k.busy and k in self._open:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._returned.wait(left)
            if k not in self._open:
                usable = False  # closed: what it wrote is flushed through another one below
            elif k.busy:
                raise BackendError(errno.EIO, f"upstream connection busy for {wait:.0f} s; "
                                              "cannot flush the writes it carried")
            else:
                usable = True
                k.busy = True
                self._idle.remove(k)
        if not usable:
            self.call("flush", lambda c: c.flush())
            return
        mark = k.writes
        try:
            k.client.flush()
        except NBDRequestError:
            self._put(k)
            raise
        except (OSError, ProtocolError):
            self._drop(k)
            self.call("flush", lambda c: c.flush())
            return
        k.flushed = max(k.flushed, mark)
        self._put(k)

    def switch(self, uri: str) -> None:
        """Use ``uri`` from now on; requests in flight on the old one finish or replay."""
        gen, c = self.generation, None
        from pynbd.client import connect as probe_connect

        c = probe_connect(uri, timeout=self.connect_timeout)
        try:
            if c.size != self.size:
                raise ValueError(f"{uri} has size {c.size}, the proxy serves {self.size}")
        except BaseException:
            c.hard_close()
            raise
        k = _Conn(gen + 1, c)
        k.busy = False
        with self._lock:
            self.uri = uri
            self.generation = gen + 1
            self.multi_conn = c.can_multi_conn()
            old = self._idle
            self._idle = [k]
            self._open = {k}
            self.switches += 1
            self._returned.notify_all()
        for ok in old:
            ok.client.hard_close()
        log.info("upstream switched to %s", uri)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"upstream": self.uri, "generation": self.generation,
                    "idle_connections": len(self._idle), "connects": self.connects,
                    "reconnects": self.reconnects, "retries": self.retries,
                    "replayed_requests": self.replayed_requests,
                    "stepped_down_replies": self.stepped_down_replies,
                    "failed_requests": self.failed_requests, "switches": self.switches,
                    "open_connections": len(self._open), "upstream_multi_conn": self.multi_conn,
                    "flushes_fanned_out": self.flushes_fanned_out,
                    "last_error": self.last_error}

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._open.clear()
        for k in idle:
            k.client.hard_close()


class ProxyBackend(Backend):
    """A Backend whose storage is the upstream NBD server."""

    blocking = True  # the server runs calls on worker threads: many requests in flight

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        c = pool.probe()
        self.size = c.size
        self.name = f"proxy:{pool.uri}"
        self.read_only = c.is_read_only()
        self.can_flush = c.can_flush()
        self.can_fua = c.can_fua()
        self.can_trim = c.can_trim()
        self.can_zero = True
        self.can_fast_zero = False
        self.can_cache = False
        # FLUSH is fanned out to every upstream connection that carried writes (see
        # UpstreamPool.flush), so the proxy's own connections may share one cache view
        self.can_multi_conn = True
        self._native_zero = c.can_zero()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.pool.call("read", lambda c: c.read_into(offset, buf))

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        flags = int(CmdFlag.FUA) if fua and self.can_fua else 0
        self.pool.call("write", lambda c: c.write(offset, buf, flags), writes=True)

    def flush(self) -> None:
        if self.can_flush:
            self.pool.flush()

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.can_trim:
            self.pool.call("trim", lambda c: c.trim(offset, length), writes=True)

    def zero(self, offset: int, length: int, may_trim: bool = True, fast: bool = False,
             fua: bool = False) -> None:
        if not self._native_zero:
            super().zero(offset, length, may_trim, fast, fua)
            return
        if fast:
            raise BackendError(errno.ENOTSUP, "fast zero not forwarded")
        flags = 0 if may_trim else int(CmdFlag.NO_HOLE)
        if fua and self.can_fua:
            flags |= int(CmdFlag.FUA)
        self.pool.call("write-zeroes", lambda c: c.write_zeroes(offset, length, flags),
                       writes=True)

    def close(self) -> None:
        self.pool.close()
