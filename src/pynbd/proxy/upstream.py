"""The proxy's upstream: a pool of NBD client connections that survives failures.

Every request the proxy receives is run on one pooled connection. When the connection
fails (reset, EOF, protocol error) or the upstream answers ESHUTDOWN (it stepped down after
a migration), the request is replayed on a fresh connection, to whatever URI is current
(``switch`` changes it), with bounded retries. Every NBD request the proxy forwards (read,
write, flush, trim, write-zeroes) is idempotent at the block level, so a replay is safe.
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
        self._idle: list[tuple[int, Client]] = []
        self._lock = threading.Lock()
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

    def _connect(self) -> tuple[int, Client]:
        gen, uri = self.generation, self.uri
        c = nbd_connect(uri, timeout=self.connect_timeout)
        try:
            c.socket.settimeout(self.request_timeout or None)
        except OSError:
            pass
        if self.size and c.size != self.size:
            c.hard_close()
            raise BackendError(errno.EIO, f"upstream {uri} has size {c.size}, not {self.size}")
        with self._lock:
            self.connects += 1
        return gen, c

    def probe(self) -> Client:
        """First connection: learn the size and capabilities."""
        _gen, c = self._connect()
        self.size = c.size
        self.flags_client = c
        with self._lock:
            self._idle.append((_gen, c))
        return c

    def _get(self) -> tuple[int, Client]:
        with self._lock:
            while self._idle:
                gen, c = self._idle.pop()
                if gen == self.generation:
                    return gen, c
                c.hard_close()
        return self._connect()

    def _put(self, gen: int, c: Client) -> None:
        with self._lock:
            if gen == self.generation:
                self._idle.append((gen, c))
                return
        c.hard_close()

    def call(self, what: str, fn: Callable[[Client], T]) -> T:
        deadline = time.monotonic() + self.retry_deadline
        delay = 0.02
        attempt = 0
        with self._slots:
            while True:
                attempt += 1
                try:
                    gen, c = self._get()
                except (OSError, ProtocolError) as exc:
                    err: BaseException = exc
                else:
                    try:
                        result = fn(c)
                    except NBDRequestError as exc:
                        if exc.errno != errno.ESHUTDOWN:
                            self._put(gen, c)
                            raise  # a real error: the client gets it
                        with self._lock:
                            self.stepped_down_replies += 1
                        c.hard_close()
                        err = exc
                    except (OSError, ProtocolError) as exc:
                        c.hard_close()
                        err = exc
                    else:
                        self._put(gen, c)
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
        with self._lock:
            self.uri = uri
            self.generation = gen + 1
            old = self._idle
            self._idle = [(self.generation, c)]
            self.switches += 1
        for _g, oc in old:
            oc.hard_close()
        log.info("upstream switched to %s", uri)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"upstream": self.uri, "generation": self.generation,
                    "idle_connections": len(self._idle), "connects": self.connects,
                    "reconnects": self.reconnects, "retries": self.retries,
                    "replayed_requests": self.replayed_requests,
                    "stepped_down_replies": self.stepped_down_replies,
                    "failed_requests": self.failed_requests, "switches": self.switches,
                    "last_error": self.last_error}

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _g, c in idle:
            c.hard_close()


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
        self.can_multi_conn = c.can_multi_conn()
        self._native_zero = c.can_zero()

    def pread_into(self, buf: memoryview, offset: int) -> None:
        self.pool.call("read", lambda c: c.read_into(offset, buf))

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        flags = int(CmdFlag.FUA) if fua and self.can_fua else 0
        self.pool.call("write", lambda c: c.write(offset, buf, flags))

    def flush(self) -> None:
        if self.can_flush:
            self.pool.call("flush", lambda c: c.flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        if self.can_trim:
            self.pool.call("trim", lambda c: c.trim(offset, length))

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
        self.pool.call("write-zeroes", lambda c: c.write_zeroes(offset, length, flags))

    def close(self) -> None:
        self.pool.close()
