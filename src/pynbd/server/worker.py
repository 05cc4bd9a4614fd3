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

import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from pynbd.backends.base import Backend, Extent, ThreadModel
from pynbd.filters.base import Filter
from pynbd.filters.pause import PauseFilter, PauseState
from pynbd.filters.track import TrackFilter
from pynbd.protocol.constants import QEMU_ALLOCATION_DEPTH
from pynbd.protocol.server import ExportInfo, ExportProvider, ServerConfig
from pynbd.server.buffers import Buffer, BufferPool
from pynbd.server.conn_splice import make_pipe
from pynbd.server.connection import Connection, Counters
from pynbd.server.limits import Limits
from pynbd.server.logsafe import safe
from pynbd.server.loop import EPOLLIN, Loop
from pynbd.util.logs import fields

log = logging.getLogger("pynbd.server")
#: one line per client connect and disconnect (INFO, shown by default)
access = logging.getLogger("pynbd.access")

#: calls of a blocking backend one connection may have on worker threads at once
#: (nbdkit's default threads per connection); the pool keeps this many free for every
#: connection, so a client whose calls hang holds up only itself
THREADS_PER_CONNECTION = 16


from pynbd.filters.track import Tracker, Trackers  # noqa: E402


class WorkerEvents(Protocol):
    """What a worker tells the supervisor (calls run on the worker's loop thread)."""

    def negotiated(self, conn_id: int, export: str) -> None: ...

    def closed(self, conn_id: int) -> None: ...

    def reply(self, req_id: int, payload: dict[str, Any]) -> None: ...


class ExportRuntime:
    """One export as one worker serves it: the plugin with its filters (``base``), the
    server's own layers on top (pause, write tracking), counters and thread model."""

    def __init__(self, name: str, backend: Backend, info: ExportInfo, limits: Limits) -> None:
        self.name = name
        self.base = backend
        self.info = info
        self.read_only = info.read_only
        self.pause = PauseState()
        #: told about every range a client changes, by slot: "migration" (the mirror's
        #: dirty map), "bitmap:NAME" (backup bitmaps, server/bitmaps.py)
        self.trackers: dict[str, Tracker] = {}
        #: the server's own layers between the plugin and the trackers, by slot (a
        #: point-in-time view's copy-before-write, filters/cbw.py), innermost first
        self.layers: dict[str, Callable[[Backend], Backend]] = {}
        #: metadata contexts other than base:allocation: name -> extents(offset, length)
        self.contexts: dict[str, Callable[[int, int], list[Extent]]] = {}
        model = backend.thread_model
        self.thread_model = model
        serialize_all = model in (ThreadModel.SERIALIZE_ALL_REQUESTS,
                                  ThreadModel.SERIALIZE_CONNECTIONS)
        #: one request at a time across connections: every call on a thread, in turn
        self.serial_lock: threading.Lock | None = threading.Lock() if serialize_all else None
        self.limits = limits
        #: SERIALIZE_CONNECTIONS: the connection being served, and those waiting
        self.turn: Connection | None = None
        self.turn_queue: list[Connection] = []
        #: requests of this export running on worker threads
        self.active = 0
        self.parked_connections: set[Connection] = set()
        self.totals = Counters()
        self.connections: set[Connection] = set()
        self.bugs_logged: set[tuple[object, type]] = set()
        self._quiesce_waiters: list[Callable[[], None]] = []
        self._epoch = 0
        self._started: dict[tuple[int, int], int] = {}
        self._epoch_waiters: list[tuple[int, Callable[[], None]]] = []
        self._refresh()

    def wrap(self, own: Backend) -> Backend:
        """The stack a connection calls: the server's layers around ``own``."""
        b = own
        for make in self.layers.values():
            b = make(b)
        if self.trackers:
            ts = list(self.trackers.values())
            b = TrackFilter(b, ts[0] if len(ts) == 1 else Trackers(ts))
        if self.pause.engaged:
            b = PauseFilter(b, self.pause)
        return b

    def _refresh(self) -> None:
        top = self.wrap(self.base)
        self.blocking = bool(top.blocking) or self.serial_lock is not None
        #: asynchronous interface (aio_*): requests are started and complete later
        self.aio = bool(getattr(top, "aio", False)) and self.serial_lock is None
        #: the backend's completions are collected on the loop (aio_completion_fd):
        #: ``done`` runs on the loop thread, no cross-thread hand-over needed
        fd_of = getattr(top, "aio_completion_fd", None)
        self.aio_on_loop = self.aio and fd_of is not None and fd_of() is not None
        #: requests of one connection in flight: one for the serializing models; for
        #: calls on threads, no more than a connection's share of the pool
        if self.thread_model is not ThreadModel.PARALLEL:
            self.max_inflight = 1
        elif self.blocking and not self.aio:
            self.max_inflight = min(self.limits.max_inflight, THREADS_PER_CONNECTION)
        else:
            self.max_inflight = self.limits.max_inflight
        #: FLUSH and FUA may take long (fdatasync): they run on worker threads
        self.slow_sync = bool(getattr(top, "slow_sync", False))
        self.can_extents = bool(top.can_extents)
        layers = top.layers if isinstance(top, Filter) else [top]
        #: some layer may hold or refuse requests before they run
        self.admits = any(getattr(b, "admits", False) for b in layers)

    def rebind(self) -> None:
        """The server's layers changed: every connection rebuilds its stack."""
        self._refresh()
        for conn in self.connections:
            conn.rebind()

    def context_extents(self, name: str, offset: int, length: int) -> list[Extent]:
        """Extents of a metadata context other than base:allocation."""
        source = self.contexts.get(name)
        if source is not None:
            return source(offset, length)
        if name == QEMU_ALLOCATION_DEPTH:
            # no backing chains here: every byte is local (depth 1), what qemu-nbd -A
            # reports for a raw image
            return [Extent(length, 1)]
        raise OSError(errno.EINVAL, f"no metadata context {name!r} on this export")

    def counters(self) -> Counters:
        c = Counters()
        c.add(self.totals)
        for conn in self.connections:
            c.add(conn.counters)
        return c

    # requests on threads started before a change of the stack, so the change can wait
    # for exactly those (a new write tracker must see every write that completes after
    # it was confirmed; new requests already use the new stack)
    def begin(self, conn: object, cookie: int) -> None:
        self._started[(id(conn), cookie)] = self._epoch

    def end(self, conn: object, cookie: int) -> None:
        epoch = self._started.pop((id(conn), cookie), None)
        if epoch is not None and self._epoch_waiters:
            self._check_epochs()

    def when_started_before_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every request started so far has completed."""
        self._epoch += 1
        self._epoch_waiters.append((self._epoch, callback))
        self._check_epochs()

    def _check_epochs(self) -> None:
        oldest = min(self._started.values(), default=self._epoch)
        ready = [cb for e, cb in self._epoch_waiters if oldest >= e]
        self._epoch_waiters = [(e, cb) for e, cb in self._epoch_waiters if oldest < e]
        for cb in ready:
            cb()

    def when_quiesced(self, callback: Callable[[], None]) -> None:
        if self.active == 0:
            callback()
        else:
            self._quiesce_waiters.append(callback)

    def quiesced(self) -> None:
        waiters, self._quiesce_waiters = self._quiesce_waiters, []
        for cb in waiters:
            cb()

    def wake(self) -> None:
        conns, self.parked_connections = self.parked_connections, set()
        for conn in conns:
            conn.unpark()


def configure_stack(top: Backend, name: str, params: dict[str, str]) -> int:
    n = 0
    for layer in top.layers if isinstance(top, Filter) else []:
        if isinstance(layer, Filter) and layer.spec is not None and layer.spec.name == name:
            layer.configure(params)
            n += 1
    return n


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
        self._splice_pipe: tuple[int, int, int] | None = None
        self.runtimes: dict[str, ExportRuntime] = {}
        for name, backend in backends.items():
            info = provider.lookup(name) if name else provider.lookup("")
            if info is None:
                raise ValueError(f"export {name!r} has no info")
            self.runtimes[name] = ExportRuntime(name, backend, info, limits)
        #: descriptors of backends whose aio completions this loop collects
        self._completion_fds: dict[int, Backend] = {}
        for rt in self.runtimes.values():
            self._watch_completions(rt.base)
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
        tls = conn.tls is not None
        access.info("client %s connected to export %s (worker %d%s)", conn.peer,
                    safe(repr(rt.name)), self.index, ", TLS" if tls else "",
                    extra=fields(event="connect", peer=conn.peer, export=rt.name,
                                 worker=self.index, tls=tls))

    def connection_closed(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        rt = conn.runtime
        if rt is not None and conn in rt.connections:
            c = conn.counters
            secs = time.monotonic() - conn.started
            reason = conn.end_reason or "closed"
            access.info("client %s disconnected from export %s after %.1f s: %s (%d requests, "
                        "%d bytes read, %d written, %d errors)", conn.peer,
                        safe(repr(rt.name)), secs, reason, c.requests, c.bytes_read,
                        c.bytes_written, c.errors,
                        extra=fields(event="disconnect", peer=conn.peer, export=rt.name,
                                     worker=self.index, seconds=round(secs, 3),
                                     reason=reason, **c.as_dict()))
        if rt is not None and conn in rt.connections:
            rt.connections.discard(conn)
            rt.parked_connections.discard(conn)
            rt.totals.add(conn.counters)
        if rt is not None and rt.thread_model is ThreadModel.SERIALIZE_CONNECTIONS:
            if conn in rt.turn_queue:
                rt.turn_queue.remove(conn)
            if not conn.own_open:  # else once its close_connection has returned
                self.turn_done(rt, conn)
        self.events.closed(conn.id)
        if self._stopping and not self.connections:
            self._stopped()

    def turn_done(self, rt: ExportRuntime, conn: Connection) -> None:
        """SERIALIZE_CONNECTIONS: ``conn`` is closed, in the plugin too: the next
        waiting connection is opened and served."""
        if rt.turn is not conn:
            return
        rt.turn = rt.turn_queue.pop(0) if rt.turn_queue else None
        if rt.turn is not None:
            self.loop.call_soon(rt.turn.take_turn)

    def drop(self, conn_id: int, reason: str) -> None:
        conn = self.connections.get(conn_id)
        if conn is not None:
            conn.abort(reason)

    # --- blocking backends ----------------------------------------------------------

    def run_blocking(self, fn: Callable[[Any, memoryview | None], list[Any]], ev: Any,
                     buf: Buffer | None, mv: memoryview | None,
                     done: Callable[[Any, Buffer | None, memoryview | None, list[Any]], None],
                     ) -> None:
        pool = self._pool()
        loop = self.loop

        def run() -> None:
            try:
                out = fn(ev, mv)
            except BaseException:
                log.exception("internal error in a blocking backend call")
                out = []
            loop.call_soon_threadsafe(lambda: done(ev, buf, mv, out))

        pool.submit(run)

    def _pool(self) -> ThreadPoolExecutor:
        """The worker threads: at least ``blocking_threads``, and room for every
        connection's share (threads start only when a call finds none idle)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.limits.blocking_threads,
                                                thread_name_prefix=f"nbd-io-{self.index}")
        want = THREADS_PER_CONNECTION * (len(self.connections) + 1)
        if self._executor._max_workers < want:
            self._executor._max_workers = want
        return self._executor

    def run_in_thread(self, fn: Callable[[], Any], done: Callable[[Any], None]) -> None:
        """Run ``fn`` on the worker's thread pool; ``done(result)`` back on the loop."""
        pool = self._pool()
        loop = self.loop

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                log.exception("internal error on a worker thread")
                result = exc
            loop.call_soon_threadsafe(lambda: done(result))

        pool.submit(run)

    # --- pause / step down (migration, checkpoints) --------------------------------

    def pause(self, name: str, done: Callable[[], None]) -> None:
        """Hold new requests of ``name``; call ``done`` once none is running."""
        rt = self.runtimes.get(name)
        if rt is None:
            done()
            return
        engaged = rt.pause.engaged
        rt.pause.paused = True
        if not engaged:
            rt.rebind()
        rt.when_quiesced(done)

    def resume(self, name: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None:
            return
        rt.pause.paused = False
        if not rt.pause.engaged:
            # drop the pause layer: a stack without it must not be asked to admit (a new
            # connection's bare backend has no admit()), and splicing may resume
            rt.rebind()
        rt.wake()

    def step_down(self, name: str, reason: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None:
            return
        engaged = rt.pause.engaged
        rt.pause.stepped_down = True
        rt.pause.reason = reason
        rt.pause.paused = False
        if not engaged:
            rt.rebind()
        rt.wake()

    def set_tracker(self, name: str, tracker: Tracker | None, slot: str = "migration",
                    done: Callable[[], None] | None = None) -> None:
        """Attach a write tracker in ``slot``; ``done`` once every write that can still
        complete is marked (requests already running on threads used the old stack)."""
        rt = self.runtimes.get(name)
        if rt is not None:
            if tracker is None:
                rt.trackers.pop(slot, None)
            else:
                rt.trackers[slot] = tracker
            rt.rebind()
            if done is not None:
                rt.when_started_before_done(done)
                return
        if done is not None:
            done()

    # --- exports added and removed at run time (point-in-time views) --------------------

    def add_export(self, name: str, backend: Backend, info: ExportInfo) -> ExportRuntime:
        """Serve a new export; a provider of this process's own learns its info (the
        supervisor's registry is updated by the supervisor)."""
        add = getattr(self.provider, "add_export", None)
        if add is not None:
            add(info)
        rt = ExportRuntime(name, backend, info, self.limits)
        self.runtimes[name] = rt
        self._watch_completions(backend)
        return rt

    def _watch_completions(self, backend: Backend) -> None:
        """A backend whose aio completions come through a descriptor: collect them on
        this loop (``done`` then runs on the loop thread)."""
        fd_of = getattr(backend, "aio_completion_fd", None)
        fd = fd_of() if fd_of is not None and backend.aio else None
        if fd is None:
            return
        known = self._completion_fds.get(fd)
        if known is backend:
            return
        if known is not None:  # a closed backend's number, reused
            self.loop.remove(fd)
        self._completion_fds[fd] = backend
        poll = backend.aio_poll

        def ready(_events: int) -> None:
            poll()

        self.loop.add(fd, EPOLLIN, ready)

    def remove_export(self, name: str, reason: str) -> ExportRuntime | None:
        """Stop serving ``name``: new clients cannot select it, its clients are dropped."""
        remove = getattr(self.provider, "remove_export", None)
        if remove is not None:
            remove(name)
        self.disconnect_export(name, reason)
        rt = self.runtimes.pop(name, None)
        if rt is not None:
            for fd, b in list(self._completion_fds.items()):
                if b is rt.base and not any(r.base is b for r in self.runtimes.values()):
                    self.loop.remove(fd)
                    del self._completion_fds[fd]
        return rt

    def set_info(self, name: str, info: ExportInfo) -> None:
        """What the protocol advertises for ``name`` changed (e.g. its metadata contexts);
        connections that selected it before keep what they negotiated."""
        add = getattr(self.provider, "add_export", None)
        if add is not None:
            add(info)
        rt = self.runtimes.get(name)
        if rt is not None:
            rt.info = info

    def configure_filter(self, export: str, name: str, params: dict[str, str]) -> int:
        """Apply run-time parameters to every ``name`` filter of ``export``; how many."""
        rt = self.runtimes.get(export)
        if rt is None:
            return 0
        return configure_stack(rt.base, name, params)

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
            d["paused"] = rt.pause.paused
            d["stepped_down"] = rt.pause.stepped_down
            filters = {}
            top = rt.base
            for layer in top.layers if isinstance(top, Filter) else []:
                if not isinstance(layer, Filter) or layer.spec is None:
                    continue
                st = layer.stats()
                if st is not None:
                    filters[layer.spec.name] = st
            if filters:
                d["filters"] = filters
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

    def splice_pipe(self) -> tuple[int, int, int]:
        """The loop's pipe for splicing WRITE payloads into files (read end, write end,
        capacity); empty between events (:mod:`.conn_splice`)."""
        p = self._splice_pipe
        if p is None:
            p = self._splice_pipe = make_pipe()
        return p

    def drop_splice_pipe(self) -> None:
        """Close the splice pipe (it may hold stray bytes after an error): the next
        splice makes a new one."""
        p, self._splice_pipe = self._splice_pipe, None
        if p is not None:
            os.close(p[0])
            os.close(p[1])

    def close(self) -> None:
        for conn in list(self.connections.values()):
            conn.close()
        self.drop_splice_pipe()
        for fd in self._completion_fds:
            self.loop.remove(fd)
        self._completion_fds.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
