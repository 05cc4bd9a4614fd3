"""The NBD server's supervisor: listeners, admission, workers, status, clean shutdown.

The supervisor accepts connections on its event loop and decides, before a byte is
sent, whether a client may come in (access list; connection limits per address and in
total; a separate, smaller pool for connections still negotiating, from which silent
and then old ones are evicted when it is full). Admitted sockets go to a worker:
in-process with ``workers=1``, otherwise to worker processes over a channel
(``server/channel.py``), the least loaded first. Workers report progress, negotiation
and closing, so the limits and ``status`` see every connection of every worker; a
runtime access-list change disconnects everyone it no longer allows, wherever they are.
A worker process that dies is replaced; its clients see a dropped connection.

The supervisor is one object built from parts, one module each (mixins over
:class:`~.server_state.ServerState`): this module has its life (start, calls into its
loop from other threads, the export controls migration and backups use, shutdown);
:mod:`.server_listeners` the listening sockets; :mod:`.server_admission` admission and
the connection records; :mod:`.server_workers` the worker handles; :mod:`.server_status`
status and the control verbs.
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynbd.backends.base import ConfigError
from pynbd.protocol.constants import DEFAULT_MAX_REQUEST
from pynbd.protocol.server import ServerConfig, TLSMode
from pynbd.server.acl import AccessList
from pynbd.server.control import ControlServer
from pynbd.server.exports import ExportRegistry, IOGate
from pynbd.server.limits import Limits
from pynbd.server.logsafe import RefusalLog
from pynbd.server.loop import EPOLLIN, Loop
from pynbd.server.server_admission import (
    ACCEPT_BATCH,
    FIRST_READ,
    AdmissionMixin,
    ConnRecord,
    _Pool,
    raise_fd_limit,
)
from pynbd.server.server_listeners import Listener, ListenersMixin
from pynbd.server.server_status import STATS_TIMEOUT, StatusMixin
from pynbd.server.server_workers import LocalWorker, RemoteWorker, WorkerHandle, WorkersMixin

log = logging.getLogger("pynbd.server")

__all__ = [
    "ACCEPT_BATCH",
    "FIRST_READ",
    "STATS_TIMEOUT",
    "ConnRecord",
    "Limits",
    "Listener",
    "LocalWorker",
    "RemoteWorker",
    "Server",
    "ServerOptions",
    "WorkerHandle",
    "raise_fd_limit",
]


@dataclass
class ServerOptions:
    tls: TLSMode = TLSMode.OFF
    tls_context: ssl.SSLContext | None = None
    #: certificate files, so worker processes can build the same TLS context
    tls_files: dict[str, Any] | None = None
    limits: Limits = field(default_factory=Limits)
    x_close: bool = True
    #: worker processes; 1 serves in the supervisor's own process and loop
    workers: int = 1
    #: logging level and format ("text"/"json") for worker processes
    log_level: int = logging.INFO
    log_format: str = "text"
    log_quiet_server: bool = True
    #: offer NBD_OPT_EXTENDED_HEADERS
    extended_headers: bool = True
    #: largest READ/WRITE payload accepted (NBD_INFO_BLOCK_SIZE maximum)
    max_request_size: int = DEFAULT_MAX_REQUEST


class Server(ListenersMixin, AdmissionMixin, WorkersMixin, StatusMixin):
    def __init__(self, registry: ExportRegistry, options: ServerOptions | None = None) -> None:
        self.registry = registry
        self.options = options or ServerOptions()
        self.limits = self.options.limits
        self.tls_context = self.options.tls_context
        if self.options.tls is not TLSMode.OFF and self.tls_context is None:
            raise ValueError("TLS enabled but no certificates configured")
        self.protocol_config = ServerConfig(
            tls=self.options.tls, x_close=self.options.x_close,
            extended_headers=self.options.extended_headers,
            max_request_size=self.options.max_request_size)
        self.loop = Loop()
        from pynbd.protocol.server import ServerConnection

        self._greeting = ServerConnection(registry, self.protocol_config).initiate()
        self.listeners: list[Listener] = []
        self.workers: list[WorkerHandle] = []
        self._records: dict[int, ConnRecord] = {}
        self._next_id = 0
        #: negotiating connections: still silent (held by the supervisor), and those a
        #: worker is negotiating with; each oldest first
        self._silent = _Pool()
        self._progressing = _Pool()
        self._est_by_host: Counter[str] = Counter()
        self._established = 0
        self._stopping = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._started = False
        self.started = time.time()
        self._idle_since: float | None = time.monotonic()
        self.total_connections = 0
        self.rejected_connections = 0
        self.evicted_connections = 0
        self.worker_restarts = 0
        self.acl: AccessList | None = None
        self.control: ControlServer | None = None
        self.refusals = RefusalLog(log)
        #: called with the peer address before any byte is sent; False refuses it
        self.accept_filter: Callable[[str], bool] | None = None
        for name, e in registry.exports.items():
            e._tracker_backend = self
            del name
        #: called with every new worker's handle (at start and when one is replaced), to
        #: bring it up to date with state added at run time (backup bitmaps, views)
        self.worker_hooks: list[Callable[[WorkerHandle], None]] = []
        #: called with the status dict before ``status()`` returns it
        self.status_hooks: list[Callable[[dict[str, Any]], None]] = []

    # --- running -----------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        raise_fd_limit(self.limits.max_handshakes + self.limits.max_connections + 256)
        self._nworkers = self.effective_workers()
        for i in range(self._nworkers):
            self.workers.append(self._spawn(i))
        for name, e in self.registry.exports.items():
            if e.gate is None:
                e.gate = IOGate()
            e.gate.bind(name, self)
        for h in self.workers:
            self._apply_gate_state(h)
        for lst in self.listeners:
            lst.sock.setblocking(False)
            self.loop.add(lst.sock.fileno(), EPOLLIN, functools.partial(self._on_accept, lst))
        self._loop_thread = threading.Thread(target=self.loop.run, daemon=True,
                                             name="nbd-loop")
        self._loop_thread.start()

    # --- calling into the loop ----------------------------------------------------------

    def call(self, fn: Callable[[Callable[[Any], None]], None], timeout: float) -> Any:
        """Run ``fn(done)`` on the loop and wait (from another thread) for ``done(x)``."""
        if self.loop.in_loop_thread():
            raise RuntimeError("Server.call() from the loop thread would deadlock")
        box: list[Any] = []
        ev = threading.Event()

        def done(value: Any = None) -> None:
            box.append(value)
            ev.set()

        if self._loop_thread is None or not self._loop_thread.is_alive():
            fn(done)  # not running (yet/any more): nothing else touches the state
        else:
            self.loop.call_soon_threadsafe(lambda: fn(done))
        if not ev.wait(timeout):
            raise TimeoutError("the server loop did not answer")
        return box[0]

    def _gather(self, each: Callable[[WorkerHandle, Callable[[Any], None]], None],
                done: Callable[[list[Any]], None]) -> None:
        handles = [h for h in self.workers if h.alive]
        results: list[Any] = [None] * len(handles)
        left = [len(handles)]
        if not handles:
            done([])
            return

        def one(i: int) -> Callable[[Any], None]:
            def cb(value: Any = None) -> None:
                results[i] = value
                left[0] -= 1
                if left[0] == 0:
                    done(results)
            return cb

        for i, h in enumerate(handles):
            each(h, one(i))

    # --- IOGate backend (migration, checkpoints) ---------------------------------------

    def gate_pause(self, export: str, timeout: float | None) -> bool:
        ev = threading.Event()

        def start() -> None:
            self._gather(lambda h, cb: h.pause(export, lambda: cb(None)), lambda _r: ev.set())

        if self._loop_thread is None or not self._loop_thread.is_alive():
            start()
        else:
            self.loop.call_soon_threadsafe(start)
        return ev.wait(timeout)

    def gate_resume(self, export: str) -> None:
        def run() -> None:
            for h in self.workers:
                if h.alive:
                    h.resume(export)

        self._in_loop(run)

    def gate_step_down(self, export: str, reason: str) -> None:
        def run() -> None:
            for h in self.workers:
                if h.alive:
                    h.step_down(export, reason)

        self._in_loop(run)

    def set_tracker(self, export: str, tracker: Any) -> None:
        if not self._started:
            return  # applied to every worker at start
        ev = threading.Event()

        def apply() -> None:
            # returns once every worker marks with it: the mirror clears nothing before
            try:
                self._gather(lambda h, cb: h.set_tracker(export, tracker, cb),
                             lambda _r: ev.set())
            except BaseException:
                ev.set()
                raise

        self._in_loop(apply)
        if not self.loop.in_loop_thread() and not ev.wait(30):
            log.warning("a worker did not confirm the write tracker of %r in 30 s", export)

    def broadcast_backup(self, msg: dict[str, Any], fds: list[int] | None = None,
                         timeout: float = 30.0) -> list[dict[str, Any] | None]:
        """Send a backup operation to every live worker and wait for their answers (in
        the order sent; the channel keeps it). The caller keeps ``fds``."""
        if not self._started:
            return []

        def run(done: Callable[[Any], None]) -> None:
            self._gather(lambda h, cb: h.backup(msg, list(fds or ()), cb), done)

        return list(self.call(run, timeout))

    def _in_loop(self, fn: Callable[[], Any]) -> None:
        if self.loop.in_loop_thread() or self._loop_thread is None \
                or not self._loop_thread.is_alive():
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    def disconnect_export(self, export: str, reason: str) -> int:
        """Drop every client of ``export`` (after a handover)."""
        def run(done: Callable[[Any], None]) -> None:
            n = 0
            for rec in list(self._records.values()):
                if rec.export == export:
                    rec.handle.drop(rec.id, reason)
                    n += 1
            done(n)

        return int(self.call(run, 10.0))

    def configure_filter(self, export: str, name: str, params: dict[str, str]) -> int:
        """Change filter ``name`` of ``export`` at run time, everywhere it runs; raises
        ConfigError (nothing changed) when the filter refuses the parameters."""
        from pynbd.server.worker import configure_stack

        e = self.registry.get(export)
        if e is None:
            raise ConfigError(f"no export {export!r}")
        n = configure_stack(e.backend, name, params)  # validates; the supervisor's copy
        if n == 0:
            raise ConfigError(f"export {e.name!r} has no filter {name!r}")
        if not self._started:
            return n

        def run(done: Callable[[Any], None]) -> None:
            self._gather(lambda h, cb: h.configure(e.name, name, params, cb), done)

        errors = [r.get("error") for r in self.call(run, 10.0) if r and r.get("error")]
        if errors:
            raise ConfigError(f"a worker refused the change: {errors[0]}")
        return n

    # --- stopping ------------------------------------------------------------------------

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let connections finish what they received, close."""
        self._stopping.set()
        if self.control is not None:
            self.control.stop()
        if not self._started:
            self._close_listeners()
            self.registry.close()
            return

        def begin(done: Callable[[Any], None]) -> None:
            self._close_listeners()
            self._gather(lambda h, cb: h.stop(lambda: cb(None)), done)

        try:
            self.call(begin, timeout)
        except TimeoutError:
            log.warning("connections did not finish within %.0f s; closing them", timeout)
        self.loop.stop()
        if self._loop_thread is not None:
            self._loop_thread.join(timeout=5)
        for h in self.workers:
            h.finish(timeout)
        self.registry.close()

    def serve_forever(self) -> None:
        self.start()
        self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def idle_seconds(self) -> float:
        """Seconds since the last connection closed (or since start); 0 while any is open."""
        since = self._idle_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def killed_connections(self) -> int:
        """Clients dropped by the request deadline, in every worker."""
        return int(self.status()["connections_killed"]) if self._started else 0

    @property
    def connections(self) -> list[ConnRecord]:
        """The supervisor's record of every connection (for tests and tools)."""
        return list(self._records.values())
