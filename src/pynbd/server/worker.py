"""A worker: one event loop serving many client connections.

The supervisor (``server/server.py``) accepts connections, checks them against the
access list and the limits, and hands each socket to a worker. A worker runs the NBD
handshake and transmission of its connections and reports what the supervisor needs
for the limits and for ``pynbd status`` through a :class:`WorkerEvents` sink: a
connection made progress, negotiated an export, closed. With ``--workers 1`` the worker
lives in the supervisor's process and loop; with more, each runs in its own process
(``server/workerproc.py``) and the sink is a message channel.

Per export a worker keeps an :class:`ExportRuntime`: the backend, the counters, and
the pause/step-down state that live migration (and checkpoints) use to quiesce I/O
without disconnecting anyone.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pynbd.backends.base import Backend
from pynbd.protocol.server import ExportInfo, ExportProvider, ServerConfig
from pynbd.server.buffers import Buffer, BufferPool
from pynbd.server.connection import Connection, Counters
from pynbd.server.limits import Limits
from pynbd.server.loop import Loop

log = logging.getLogger("pynbd.server")


class Tracker(Protocol):
    """Told about every range a client changes (after the change was attempted)."""

    def mark(self, offset: int, length: int) -> None: ...


class WorkerEvents(Protocol):
    """What a worker tells the supervisor (calls run on the worker's loop thread)."""

    def negotiated(self, conn_id: int, export: str) -> None: ...

    def closed(self, conn_id: int) -> None: ...

    def reply(self, req_id: int, payload: dict[str, Any]) -> None: ...


class ExportRuntime:
    """One export as one worker serves it."""

    def __init__(self, name: str, backend: Backend, info: ExportInfo) -> None:
        self.name = name
        self.backend = backend
        self.info = info
        self.read_only = info.read_only
        self.blocking = bool(getattr(backend, "blocking", False))
        #: asynchronous interface (aio_*): requests are started and complete later
        self.aio = bool(getattr(backend, "aio", False))
        #: FLUSH and FUA may take long (fdatasync): they run on worker threads
        self.slow_sync = bool(getattr(backend, "slow_sync", False))
        self.can_extents = bool(getattr(backend, "can_extents", False))
        fd = getattr(backend, "sendfile_fd", None)
        self.sendfile_fd: int | None = fd if isinstance(fd, int) else None
        self.paused = False
        self.stepped_down = False
        self.step_down_reason = ""
        #: paused or stepped down: requests are held (or refused) instead of run
        self.held = False
        self.tracker: Tracker | None = None
        #: requests of this export running on worker threads
        self.active = 0
        self.parked_connections: set[Connection] = set()
        self.totals = Counters()
        self.connections: set[Connection] = set()
        self._quiesce_waiters: list[Callable[[], None]] = []

    def counters(self) -> Counters:
        c = Counters()
        c.add(self.totals)
        for conn in self.connections:
            c.add(conn.counters)
        return c

    def when_quiesced(self, callback: Callable[[], None]) -> None:
        if self.active == 0:
            callback()
        else:
            self._quiesce_waiters.append(callback)

    def quiesced(self) -> None:
        waiters, self._quiesce_waiters = self._quiesce_waiters, []
        for cb in waiters:
            cb()


class Worker:
    def __init__(self, loop: Loop, provider: ExportProvider, backends: dict[str, Backend],
                 protocol_config: ServerConfig, tls_context: ssl.SSLContext | None,
                 limits: Limits, events: WorkerEvents, index: int = 0) -> None:
        self.loop = loop
        self.provider = provider
        self.protocol_config = protocol_config
        self.tls_context = tls_context
        self.limits = limits
        self.events = events
        self.index = index
        self.buffers = BufferPool()
        self.runtimes: dict[str, ExportRuntime] = {}
        for name, backend in backends.items():
            info = provider.lookup(name) if name else provider.lookup("")
            if info is None:
                raise ValueError(f"export {name!r} has no info")
            self.runtimes[name] = ExportRuntime(name, backend, info)
        self.connections: dict[int, Connection] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._stop_waiters: list[Callable[[], None]] = []
        self.killed = 0
        if limits.request_timeout > 0:
            self._schedule_watchdog()

    # --- connections ---------------------------------------------------------------

    def adopt(self, sock: socket.socket, conn_id: int, peer: str, host: str,
              data: bytes = b"", deadline: float | None = None) -> None:
        """Serve a connection the supervisor greeted; ``data`` is what it read first."""
        if self._stopping:
            sock.close()
            self.events.closed(conn_id)
            return
        conn = Connection(self, sock, conn_id, peer, host)
        self.connections[conn_id] = conn
        conn.start(self.limits.handshake_timeout if deadline is None else deadline, data)
        log.debug("%s: connection %d on worker %d", peer, conn_id, self.index)

    def runtime_for(self, name: str) -> ExportRuntime | None:
        rt = self.runtimes.get(name)
        if rt is None:
            info = self.provider.lookup(name)
            if info is not None:
                rt = self.runtimes.get(info.name)
        return rt

    def connection_negotiated(self, conn: Connection) -> None:
        rt = conn.runtime
        assert rt is not None
        rt.connections.add(conn)
        self.events.negotiated(conn.id, rt.name)

    def connection_closed(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        rt = conn.runtime
        if rt is not None and conn in rt.connections:
            rt.connections.discard(conn)
            rt.parked_connections.discard(conn)
            rt.totals.add(conn.counters)
        self.events.closed(conn.id)
        if self._stopping and not self.connections:
            self._stopped()

    def drop(self, conn_id: int, reason: str) -> None:
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.abort(reason)

    # --- blocking backends ----------------------------------------------------------

    def run_blocking(self, fn: Callable[[Any, memoryview | None], list[Any]], ev: Any,
                     buf: Buffer | None, mv: memoryview | None,
                     done: Callable[[Any, Buffer | None, memoryview | None, list[Any]], None],
                     ) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.limits.blocking_threads,
                                                thread_name_prefix=f"nbd-io-{self.index}")
        loop = self.loop

        def run() -> None:
            try:
                out = fn(ev, mv)
            except BaseException:
                log.exception("internal error in a blocking backend call")
                out = []
            loop.call_soon_threadsafe(lambda: done(ev, buf, mv, out))

        self._executor.submit(run)

    def run_in_thread(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn`` on the worker's thread pool; ``done(result)`` back on the loop."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.limits.blocking_threads,
                                                thread_name_prefix=f"nbd-io-{self.index}")
        loop = self.loop

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                log.exception("internal error on a worker thread")
                result = exc
            loop.call_soon_threadsafe(lambda: done(result))

        self._executor.submit(run)

    # --- pause / step down (migration, checkpoints) --------------------------------

    def pause(self, name: str, done: Callable[[], None]) -> None:
        """Hold new requests of ``name``; call ``done`` once none is running."""
        rt = self.runtimes.get(name)
        if rt is None:
            done()
            return
        rt.paused = True
        rt.held = True
        rt.when_quiesced(done)

    def resume(self, name: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None:
            return
        rt.paused = False
        rt.held = rt.stepped_down
        self._unpark(rt)

    def step_down(self, name: str, reason: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None:
            return
        rt.stepped_down = True
        rt.step_down_reason = reason
        rt.paused = False
        rt.held = True
        self._unpark(rt)

    def _unpark(self, rt: ExportRuntime) -> None:
        conns, rt.parked_connections = rt.parked_connections, set()
        for conn in conns:
            conn.unpark()

    def set_tracker(self, name: str, tracker: Tracker | None) -> None:
        rt = self.runtimes.get(name)
        if rt is not None:
            rt.tracker = tracker

    def disconnect_export(self, name: str, reason: str) -> int:
        n = 0
        for conn in list(self.connections.values()):
            if conn.export_name == name:
                conn.abort(reason)
                n += 1
        return n

    # --- status ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        exports = {}
        for name, rt in self.runtimes.items():
            d: dict[str, Any] = rt.counters().as_dict()
            d["clients"] = len(rt.connections)
            d["paused"] = rt.paused
            d["stepped_down"] = rt.stepped_down
            exports[name] = d
        conns = {str(c.id): c.describe(now) for c in self.connections.values()}
        return {"exports": exports, "connections": conns, "killed": self.killed,
                "buffers_kept": self.buffers.kept_bytes}

    # --- killswitch -------------------------------------------------------------------

    def _schedule_watchdog(self) -> None:
        limit = self.limits.request_timeout
        period = min(1.0, max(0.05, limit / 4))
        self.loop.call_later(period, self._watchdog)

    def _watchdog(self) -> None:
        limit = self.limits.request_timeout
        now = time.monotonic()
        for c in list(self.connections.values()):
            age = c.oldest_request_age(now)
            if age > limit:
                log.warning("%s: request running for %.1f s (limit %.1f s): dropping client",
                            c.peer, age, limit)
                self.killed += 1
                c.abort()
        if not self._stopping:
            self._schedule_watchdog()

    # --- stopping ----------------------------------------------------------------------

    def stop(self, done: Callable[[], None]) -> None:
        """Finish what every connection received, flush, close; then call ``done``."""
        self._stopping = True
        self._stop_waiters.append(done)
        for conn in list(self.connections.values()):
            conn.stop()
        if not self.connections:
            self._stopped()

    def _stopped(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for cb in waiters:
            cb()

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
