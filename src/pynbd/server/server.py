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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pynbd.backends.base import ConfigError, ThreadModel
from pynbd.protocol.constants import DEFAULT_MAX_REQUEST
from pynbd.protocol.server import ServerConfig, TLSMode
from pynbd.server.acl import AccessList
from pynbd.server.channel import Channel, channel_pair
from pynbd.server.control import ControlError, ControlServer
from pynbd.server.exports import ExportRegistry, IOGate
from pynbd.server.limits import Limits
from pynbd.server.logsafe import RefusalLog
from pynbd.server.loop import EPOLLIN, Loop
from pynbd.server.worker import Worker

log = logging.getLogger("pynbd.server")

__all__ = ["Limits", "Listener", "Server", "ServerOptions"]

#: connections accepted per listener event: below the negotiating pool's size, so a
#: client accepted in one batch is read before a flood can push it out of the pool
ACCEPT_BATCH = 16
#: bytes the supervisor reads itself (client flags and the first options)
FIRST_READ = 4096
STATS_TIMEOUT = 5.0


@dataclass
class Listener:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    address: str
    port: int = 0
    path: str = ""
    #: we created it (and remove a Unix socket's file at exit); not for inherited ones
    owned: bool = True


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


@dataclass
class ConnRecord:
    id: int
    handle: WorkerHandle
    host: str
    peer: str
    kind: str
    started: float
    progressed: bool = False
    negotiated: bool = False
    export: str | None = None
    evicted: bool = False
    #: while the supervisor itself waits for the client's first bytes
    sock: socket.socket | None = None
    timer: Any = None


def _merge_stats(a: Any, b: Any) -> Any:
    """Filter statistics of several workers: numbers add up, tables merge."""
    if a is None:
        return b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _merge_stats(a.get(k), v)
        return out
    if isinstance(a, int | float) and isinstance(b, int | float) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return a + b
    return b


def _stack_names(top: Any) -> list[str]:
    from pynbd.filters.base import Filter

    if not isinstance(top, Filter):
        return [top.name]
    out = []
    for layer in top.layers:
        spec = getattr(layer, "spec", None)
        out.append(spec.describe() if spec is not None else layer.name)
    return out


def _unix_peer(sock: socket.socket) -> str:
    """``unix(pid 123, uid 0)``: who is on the other end of a Unix socket."""
    import struct

    try:
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        return "unix"
    return f"unix(pid {pid}, uid {uid})"


def _has_data(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # an error or reset: let the read path see it


def raise_fd_limit(want: int) -> None:
    """Raise the soft descriptor limit towards ``want`` (silent connections are cheap in
    memory, but each holds a descriptor)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    if new < want:
        log.warning("descriptor limit %d is below the %d the connection limits need; "
                    "raise it (ulimit -n) or lower --max-handshakes", new, want)


# --- worker handles -----------------------------------------------------------------

class WorkerHandle:
    """The supervisor's side of one worker. Methods run on the supervisor's loop."""

    index: int
    alive: bool = True

    def __init__(self, server: Server, index: int) -> None:
        self.server = server
        self.index = index
        self.conns: set[int] = set()

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        raise NotImplementedError

    def drop(self, conn_id: int, reason: str) -> None:
        raise NotImplementedError

    def pause(self, name: str, done: Callable[[], None]) -> None:
        raise NotImplementedError

    def resume(self, name: str) -> None:
        raise NotImplementedError

    def step_down(self, name: str, reason: str) -> None:
        raise NotImplementedError

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        """Attach (or with None detach) a write tracker; ``done`` once it is in place."""
        raise NotImplementedError

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        raise NotImplementedError

    def configure(self, export: str, name: str, params: dict[str, str],
                  done: Callable[[dict[str, Any] | None], None]) -> None:
        """Run-time filter parameters, in a worker process (in-process: nothing to do,
        the supervisor's stack is the worker's)."""
        done({"configured": 0})

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        """A backup operation (bitmaps, views: ``pynbd.backup.workerops``); the caller
        keeps ``fds`` (the worker gets its own copies)."""
        raise NotImplementedError

    def stop(self, done: Callable[[], None]) -> None:
        raise NotImplementedError

    def finish(self, timeout: float) -> None:
        """After stop: release what the worker holds (called off the loop)."""


class _Pool:
    """Connections in one stage, oldest first, in total and per address."""

    def __init__(self) -> None:
        self.all: dict[int, ConnRecord] = {}
        self.by_host: dict[str, dict[int, ConnRecord]] = {}

    def add(self, rec: ConnRecord) -> None:
        self.all[rec.id] = rec
        self.by_host.setdefault(rec.host, {})[rec.id] = rec

    def remove(self, rec: ConnRecord) -> None:
        if self.all.pop(rec.id, None) is None:
            return
        d = self.by_host[rec.host]
        del d[rec.id]
        if not d:
            del self.by_host[rec.host]

    def oldest(self, host: str | None = None) -> ConnRecord | None:
        d = self.all if host is None else self.by_host.get(host)
        return next(iter(d.values()), None) if d else None

    def count(self, host: str | None = None) -> int:
        if host is None:
            return len(self.all)
        d = self.by_host.get(host)
        return len(d) if d else 0


class _NoWorker(WorkerHandle):
    """The handle of a connection the supervisor still holds (before its first bytes)."""

    def __init__(self) -> None:
        self.index = -1
        self.conns = set()
        self.alive = False

    def drop(self, conn_id: int, reason: str) -> None:
        pass


_NO_WORKER = _NoWorker()


class _LocalEvents:
    def __init__(self, server: Server, handle: LocalWorker) -> None:
        self.server = server
        self.handle = handle

    def negotiated(self, conn_id: int, export: str) -> None:
        self.server._on_negotiated(conn_id, export)

    def closed(self, conn_id: int) -> None:
        self.server._on_closed(conn_id)

    def reply(self, req_id: int, payload: dict[str, Any]) -> None:  # pragma: no cover
        pass


class LocalWorker(WorkerHandle):
    """A worker in the supervisor's own process, on the same loop."""

    def __init__(self, server: Server, index: int) -> None:
        super().__init__(server, index)
        backends = {name: e.backend for name, e in server.registry.exports.items()}
        self.worker = Worker(server.loop, server.registry, backends, server.protocol_config,
                             server.tls_context, server.limits, _LocalEvents(server, self),
                             index)

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        self.worker.adopt(sock, rec.id, rec.peer, rec.host, data, deadline)

    def drop(self, conn_id: int, reason: str) -> None:
        self.worker.drop(conn_id, reason)

    def pause(self, name: str, done: Callable[[], None]) -> None:
        self.worker.pause(name, done)

    def resume(self, name: str) -> None:
        self.worker.resume(name)

    def step_down(self, name: str, reason: str) -> None:
        self.worker.step_down(name, reason)

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        self.worker.set_tracker(name, tracker,
                                done=None if done is None else (lambda: done(None)))

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        from pynbd.backup.workerops import apply

        done(apply(self.worker, msg, [os.dup(fd) for fd in fds]))

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        done(self.worker.stats())

    def stop(self, done: Callable[[], None]) -> None:
        self.worker.stop(done)

    def finish(self, timeout: float) -> None:
        self.worker.close()


class RemoteWorker(WorkerHandle):
    """A worker process, driven over a channel."""

    def __init__(self, server: Server, index: int) -> None:
        super().__init__(server, index)
        mine, theirs = channel_pair()
        spec = server.worker_spec(index)
        fds = [theirs.fileno(), *spec.pop("_fds")]
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pynbd.server.workerproc", str(theirs.fileno())],
            pass_fds=fds, stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self._req = 0
        self._pending: dict[int, Callable[[dict[str, Any] | None], None]] = {}
        self.channel = Channel(server.loop, mine, self._on_message, self._on_close)
        self.channel.send({"op": "config", **spec})
        self.started = time.monotonic()

    def _request(self, msg: dict[str, Any], done: Callable[[dict[str, Any] | None], None],
                 fds: list[int] | None = None) -> None:
        if not self.alive:
            done(None)
            return
        self._req += 1
        self._pending[self._req] = done
        self.channel.send({**msg, "req": self._req}, fds)

    def adopt(self, sock: socket.socket, rec: ConnRecord, data: bytes, deadline: float) -> None:
        self.channel.send({"op": "conn", "id": rec.id, "peer": rec.peer, "host": rec.host,
                           "data": data.hex(), "deadline": deadline},
                          [sock.fileno()], keep=[sock])

    def drop(self, conn_id: int, reason: str) -> None:
        self.channel.send({"op": "drop", "id": conn_id, "reason": reason})

    def pause(self, name: str, done: Callable[[], None]) -> None:
        self._request({"op": "pause", "name": name}, lambda _r: done())

    def resume(self, name: str) -> None:
        self.channel.send({"op": "resume", "name": name})

    def step_down(self, name: str, reason: str) -> None:
        self.channel.send({"op": "step_down", "name": name, "reason": reason})

    def set_tracker(self, name: str, tracker: Any,
                    done: Callable[[Any], None] | None = None) -> None:
        cb = done if done is not None else (lambda _r: None)
        if tracker is None:
            self._request({"op": "track", "name": name}, cb)
            return
        share = getattr(tracker, "share", None)
        if share is None:
            raise RuntimeError(f"tracker {type(tracker).__name__} cannot be shared with "
                               "worker processes")
        meta, fds = share()
        self._request({"op": "track", "name": name, "tracker": meta}, cb, fds)

    def stats(self, done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({"op": "stats"}, done)

    def backup(self, msg: dict[str, Any], fds: list[int],
               done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({**msg, "op": "backup"}, done, fds)

    def configure(self, export: str, name: str, params: dict[str, str],
                  done: Callable[[dict[str, Any] | None], None]) -> None:
        self._request({"op": "configure", "export": export, "filter": name,
                       "params": params}, done)

    def stop(self, done: Callable[[], None]) -> None:
        self._request({"op": "stop"}, lambda _r: done())

    def finish(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not exit in time: killing it", self.index)
            self.proc.kill()
            self.proc.wait(5)

    def _on_message(self, msg: dict[str, Any], fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        op = msg.get("op")
        srv = self.server
        if op == "negotiated":
            srv._on_negotiated(int(msg["id"]), str(msg["export"]))
        elif op == "closed":
            srv._on_closed(int(msg["id"]))
        elif op == "reply":
            cb = self._pending.pop(int(msg["req"]), None)
            if cb is not None:
                cb(msg.get("payload") or {})
        elif op == "ready":
            log.debug("worker %d (pid %d) ready", self.index, self.proc.pid)
        elif op == "error":
            log.error("worker %d: %s", self.index, msg.get("message"))

    def _on_close(self) -> None:
        self.alive = False
        pending, self._pending = self._pending, {}
        for cb in pending.values():
            cb(None)
        self.server._worker_died(self)


# --- the server ---------------------------------------------------------------------

class Server:
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

    # --- listeners --------------------------------------------------------------------

    def listen_tcp(self, host: str | None, port: int) -> list[Listener]:
        """Listen on ``host`` (None/"" = every address, IPv6 and IPv4) and ``port``."""
        new: list[Listener] = []
        if not host:
            try:
                s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                hosts = [("::", s)]
            except OSError:
                hosts = [("0.0.0.0", socket.socket(socket.AF_INET, socket.SOCK_STREAM))]
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            hosts = []
            for family, _, _, _, addr in infos[:1]:
                hosts.append((str(addr[0]), socket.socket(family, socket.SOCK_STREAM)))
        for bind_addr, s in hosts:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind_addr, port))
                s.listen(1024)
            except OSError:
                s.close()
                raise
            real_port = s.getsockname()[1]
            lst = Listener(s, "tcp", bind_addr, real_port)
            new.append(lst)
            self.listeners.append(lst)
        return new

    def listen_unix(self, path: str) -> Listener:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1024)
        lst = Listener(s, "unix", path, path=path)
        self.listeners.append(lst)
        return lst

    def adopt_listener(self, sock: socket.socket) -> Listener:
        """A listening socket made by someone else (systemd socket activation)."""
        if sock.family == socket.AF_UNIX:
            path = sock.getsockname()
            path = path if isinstance(path, str) else ""
            lst = Listener(sock, "unix", path or "(inherited)", path=path, owned=False)
        else:
            addr = sock.getsockname()
            lst = Listener(sock, "tcp", str(addr[0]), int(addr[1]), owned=False)
        self.listeners.append(lst)
        return lst

    def uris(self) -> list[str]:
        """The NBD URIs clients can use (the default export)."""
        from urllib.parse import quote

        scheme_tls = self.options.tls is TLSMode.REQUIRE
        name = self.registry.default or ""
        out = []
        for lst in self.listeners:
            if lst.kind == "unix":
                scheme = "nbds+unix" if scheme_tls else "nbd+unix"
                out.append(f"{scheme}:///{quote(name)}?socket={quote(lst.path)}")
            else:
                host = lst.address
                if host in ("::", "0.0.0.0"):
                    host = "localhost"
                elif ":" in host:
                    host = f"[{host}]"
                scheme = "nbds" if scheme_tls else "nbd"
                out.append(f"{scheme}://{host}:{lst.port}/{quote(name)}")
        return out

    # --- workers ----------------------------------------------------------------------

    def effective_workers(self) -> int:
        """How many worker processes the exports allow (1 = in-process)."""
        n = max(1, self.options.workers)
        if n == 1:
            return 1
        why = self._single_process_reason()
        if why:
            log.info("serving with one worker: %s", why)
            return 1
        return n

    def _single_process_reason(self) -> str:
        if self.tls_context is not None and self.options.tls_files is None:
            return "the TLS context was given without its certificate files"
        for name, e in self.registry.exports.items():
            if getattr(e.backend, "runtime_only", False):
                continue
            model = e.backend.thread_model
            if model in (ThreadModel.SERIALIZE_ALL_REQUESTS, ThreadModel.SERIALIZE_CONNECTIONS):
                return f"export {name!r} serializes {model.value.split('_', 1)[1]}"
            spec = e.backend.worker_spec()
            if spec is None:
                return (f"export {name!r} ({e.backend.name}) keeps its state in one "
                        "process")
        return ""

    def worker_spec(self, index: int) -> dict[str, Any]:
        exports = []
        fds: list[int] = []
        for name, e in self.registry.exports.items():
            if getattr(e.backend, "runtime_only", False):
                continue  # added at run time: a worker hook sends it (see worker_hooks)
            spec = e.backend.worker_spec()
            assert spec is not None
            fds.extend(int(fd) for fd in spec.get("fds", []))  # type: ignore[attr-defined]
            exports.append({"name": name, "info": asdict(e.info), "backend": spec})
        return {
            "index": index,
            "exports": exports,
            "default": self.registry.default,
            "protocol": {"tls": self.options.tls.value, "x_close": self.options.x_close,
                         "extended_headers": self.options.extended_headers,
                         "max_request_size": self.options.max_request_size},
            "tls_files": self.options.tls_files,
            "limits": asdict(self.limits),
            "log_level": self.options.log_level,
            "log_format": self.options.log_format,
            "log_quiet_server": self.options.log_quiet_server,
            "_fds": fds,
        }

    def _spawn(self, index: int) -> WorkerHandle:
        if self._nworkers == 1:
            return LocalWorker(self, index)
        return RemoteWorker(self, index)

    def _worker_died(self, handle: WorkerHandle) -> None:
        gone = [cid for cid in list(handle.conns)]
        for cid in gone:
            self._on_closed(cid)
        if self._stopping.is_set() or handle not in self.workers:
            return
        rc = handle.proc.poll() if isinstance(handle, RemoteWorker) else None
        log.warning("worker %d exited (status %s) with %d connection(s): starting a new one",
                    handle.index, rc, len(gone))
        self.worker_restarts += 1
        idx = self.workers.index(handle)
        delay = 0.1 if time.monotonic() - getattr(handle, "started", 0.0) > 5 else 1.0

        def respawn() -> None:
            if self._stopping.is_set():
                return
            try:
                new = self._spawn(handle.index)
            except OSError as exc:
                log.error("cannot start a worker: %s", exc)
                self.loop.call_later(5.0, respawn)
                return
            self.workers[idx] = new
            self._apply_gate_state(new)
            if isinstance(handle, RemoteWorker):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    handle.proc.wait(1)

        self.loop.call_later(delay, respawn)

    def _apply_gate_state(self, handle: WorkerHandle) -> None:
        """A new worker starts with every export's current pause/step-down/tracker."""
        for name, e in self.registry.exports.items():
            g = e.gate
            if g is not None and g.stepped_down:
                handle.step_down(name, g.step_down_reason)
            elif g is not None and g.paused:
                handle.pause(name, lambda: None)
            if e.tracker is not None:
                handle.set_tracker(name, e.tracker)
        for hook in self.worker_hooks:
            hook(handle)

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

    def _on_accept(self, lst: Listener, _events: int = 0) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.refusals.refused(f"out of resources ({exc.strerror})", "-",
                                          time.monotonic())
                    # back off: the listener stays readable and would spin
                    self.loop.modify(lst.sock.fileno(), 0)
                    self.loop.call_later(0.1, lambda: self.loop.modify(lst.sock.fileno(),
                                                                       EPOLLIN))
                    return
                log.warning("accept on %s failed: %s", lst.address, exc)
                return
            self._admit(sock, addr, lst)

    @staticmethod
    def _peer_host(addr: object, lst: Listener) -> str:
        if lst.kind == "unix":
            return "unix"
        host = str(addr[0]) if isinstance(addr, tuple) else str(addr)
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host.split("%")[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ip)
        return host

    def _refuse(self, sock: socket.socket, reason: str, host: str) -> None:
        self.rejected_connections += 1
        self.refusals.refused(reason, host, time.monotonic())
        with contextlib.suppress(OSError):
            sock.close()

    def _admit(self, sock: socket.socket, addr: object, lst: Listener) -> None:
        host = self._peer_host(addr, lst)
        peer = _unix_peer(sock) if lst.kind == "unix" else f"{host}:{addr[1]}"  # type: ignore[index]
        tcp = lst.kind == "tcp"
        if self._stopping.is_set():
            self._refuse(sock, "server is stopping", host)
            return
        if self.accept_filter is not None and tcp and not self.accept_filter(host):
            self._refuse(sock, "not allowed by the access list", host)
            return
        lim = self.limits
        if self._established >= lim.max_connections or (
                tcp and self._est_by_host[host] >= lim.max_connections_per_address):
            # a client that disconnected and reconnected at once may still be counted:
            # take what the workers have already said before refusing
            self._drain_workers()
        if self._established >= lim.max_connections:
            self._refuse(sock, f"connection limit reached ({lim.max_connections} in total)",
                         host)
            return
        if tcp and self._est_by_host[host] >= lim.max_connections_per_address:
            self._refuse(sock, f"connection limit reached ({lim.max_connections_per_address} "
                               "from this address)", host)
            return
        # the negotiating pool: make room by evicting instead of refusing, so silent
        # clients cannot keep well-behaved ones out
        if tcp and (self._silent.count(host) + self._progressing.count(host)
                    >= lim.max_handshakes_per_address):
            self._evict(host)
        if self._silent.count() + self._progressing.count() >= lim.max_handshakes:
            self._evict(None)
        if tcp:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        # the supervisor greets the client and waits for its first bytes itself: a
        # connection reaches a worker only once it has said something, so the eviction
        # policy knows exactly who is silent
        sock.setblocking(False)
        try:
            sock.send(self._greeting)
        except OSError:
            with contextlib.suppress(OSError):
                sock.close()
            return
        self._next_id += 1
        rec = ConnRecord(self._next_id, _NO_WORKER, host, peer, lst.kind, time.monotonic(),
                         sock=sock)
        self._records[rec.id] = rec
        self._silent.add(rec)
        self.total_connections += 1
        self._idle_since = None
        self.loop.add(sock.fileno(), EPOLLIN, functools.partial(self._first_bytes, rec))
        rec.timer = self.loop.call_later(lim.handshake_timeout,
                                         functools.partial(self._greeting_expired, rec))

    def _greeting_expired(self, rec: ConnRecord) -> None:
        if rec.sock is not None:
            log.info("%s: sent nothing before the handshake deadline; dropping", rec.peer)
            self._drop_silent(rec)

    def _drop_silent(self, rec: ConnRecord) -> None:
        sock, rec.sock = rec.sock, None
        if sock is not None:
            self.loop.remove(sock.fileno())
            with contextlib.suppress(OSError):
                sock.close()
        if rec.timer is not None:
            rec.timer.cancel()
        self._on_closed(rec.id)

    def _first_bytes(self, rec: ConnRecord, _events: int = 0) -> None:
        sock = rec.sock
        if sock is None:
            return
        try:
            data = sock.recv(FIRST_READ)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_silent(rec)
            return
        self.loop.remove(sock.fileno())
        rec.sock = None
        if rec.timer is not None:
            rec.timer.cancel()
        rec.progressed = True
        self._silent.remove(rec)
        self._progressing.add(rec)
        live = [h for h in self.workers if h.alive]
        if not live:
            self._refuse(sock, "no worker is running", rec.host)
            self._on_closed(rec.id)
            return
        handle = min(live, key=lambda h: len(h.conns))
        rec.handle = handle
        handle.conns.add(rec.id)
        deadline = max(0.1, rec.started + self.limits.handshake_timeout - time.monotonic())
        try:
            handle.adopt(sock, rec, data, deadline)
        except Exception:
            log.exception("%s: handing the connection to worker %d failed", rec.peer,
                          handle.index)
            self._on_closed(rec.id)
            with contextlib.suppress(OSError):
                sock.close()

    def _drain_workers(self) -> None:
        for h in self.workers:
            if isinstance(h, RemoteWorker) and h.alive:
                h.channel.poll()

    def _evict(self, host: str | None) -> None:
        """Drop the oldest silent connection (of ``host``), else the oldest negotiating."""
        victim = None
        for _ in range(64):
            victim = self._silent.oldest(host)
            if victim is None or victim.sock is None or not _has_data(victim.sock):
                break
            # it did answer; its event is just not handled yet: not silent
            self._first_bytes(victim)
            victim = None
        if victim is None:
            victim = self._silent.oldest(host) or self._progressing.oldest(host)
        if victim is None:
            return
        self._leave_negotiating(victim)
        victim.evicted = True
        self.evicted_connections += 1
        why = ("too many connections negotiating from this address" if host is not None
               else "too many connections negotiating")
        self.refusals.refused(f"evicted while negotiating: {why}", victim.host,
                              time.monotonic())
        if victim.sock is not None:
            self._drop_silent(victim)
        else:
            victim.handle.drop(victim.id, "")

    def _leave_negotiating(self, rec: ConnRecord) -> None:
        self._silent.remove(rec)
        self._progressing.remove(rec)

    def _on_negotiated(self, conn_id: int, export: str) -> None:
        rec = self._records.get(conn_id)
        if rec is None or rec.evicted:
            return
        self._leave_negotiating(rec)
        lim = self.limits
        over = self._established >= lim.max_connections or (
            rec.kind == "tcp" and self._est_by_host[rec.host] >= lim.max_connections_per_address)
        rec.negotiated = True
        rec.export = export
        self._established += 1
        self._est_by_host[rec.host] += 1
        if over:
            # several connections negotiated at once in different workers
            self.rejected_connections += 1
            self.refusals.refused("connection limit reached after negotiation", rec.host,
                                  time.monotonic())
            rec.handle.drop(rec.id, "")

    def _on_closed(self, conn_id: int) -> None:
        rec = self._records.pop(conn_id, None)
        if rec is None:
            return
        if not self._records:
            self._idle_since = time.monotonic()
        rec.handle.conns.discard(conn_id)
        self._leave_negotiating(rec)
        if rec.negotiated:
            self._established -= 1
            self._est_by_host[rec.host] -= 1
            if self._est_by_host[rec.host] <= 0:
                del self._est_by_host[rec.host]

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

    # --- access list -------------------------------------------------------------------

    def set_acl(self, entries: list[str], default_deny: bool | None = None) -> int:
        """Replace the access list; disconnect clients it no longer allows (every worker)."""
        if self.acl is None:
            self.acl = AccessList(entries, default_deny=bool(default_deny))
        else:
            self.acl.replace(entries)
            if default_deny is not None:
                self.acl.default_deny = default_deny
        acl = self.acl
        self.accept_filter = acl.allows

        def run(done: Callable[[Any], None]) -> None:
            dropped = 0
            for rec in list(self._records.values()):
                if rec.kind == "tcp" and not acl.allows(rec.host):
                    if rec.sock is not None:
                        self._drop_silent(rec)
                    else:
                        rec.handle.drop(rec.id, "no longer allowed by the access list: "
                                                "disconnecting")
                    dropped += 1
            done(dropped)

        if not self._started:
            return 0
        return int(self.call(run, 10.0))

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        def collect(done: Callable[[Any], None]) -> None:
            recs = [(r.id, r.peer, r.export, r.negotiated, r.started, r.handle.index)
                    for r in self._records.values() if not r.evicted]
            self._gather(lambda h, cb: h.stats(cb), lambda res: done((recs, res)))

        if self._started:
            recs, stats = self.call(collect, STATS_TIMEOUT)
        else:
            recs, stats = [], []
        per_export: dict[str, dict[str, Any]] = {}
        conn_info: dict[str, dict[str, Any]] = {}
        killed = 0
        for st in stats:
            if not st:
                continue
            killed += int(st.get("killed", 0))
            conn_info.update(st.get("connections", {}))
            for name, c in st.get("exports", {}).items():
                acc = per_export.setdefault(name, {"bytes_read": 0, "bytes_written": 0,
                                                   "requests": 0, "errors": 0, "clients": 0})
                for k in ("bytes_read", "bytes_written", "requests", "errors", "clients"):
                    acc[k] += int(c.get(k, 0))
                if c.get("filters"):
                    acc["filters"] = _merge_stats(acc.get("filters"), c["filters"])
        exports = []
        for name, e in self.registry.exports.items():
            c = per_export.get(name, {})
            exports.append({
                "name": name,
                "default": name == self.registry.default,
                "target": e.backend.name,
                "size_bytes": e.info.size,
                "read_only": e.read_only,
                "multi_conn": e.info.can_multi_conn,
                "clients": c.get("clients", 0),
                "bytes_read": c.get("bytes_read", 0),
                "bytes_written": c.get("bytes_written", 0),
                "requests": c.get("requests", 0),
                "errors": c.get("errors", 0),
                "filters": c.get("filters", {}),
                "stack": [layer for layer in _stack_names(e.backend)],
            })
        now = time.monotonic()
        clients = []
        negotiating = 0
        for cid, peer, export, negotiated, started, widx in recs:
            if not negotiated:
                negotiating += 1
            info = conn_info.get(str(cid), {})
            clients.append({"peer": peer, "export": export, "tls": bool(info.get("tls")),
                            "state": "negotiated" if negotiated else "negotiating",
                            "worker": widx, "connected_seconds": round(now - started, 3)})
        out = {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "uris": self.uris(),
            "tls": self.options.tls.value,
            "workers": len(self.workers),
            "worker_pids": [h.proc.pid if isinstance(h, RemoteWorker) else os.getpid()
                            for h in self.workers],
            "worker_restarts": self.worker_restarts,
            "exports": exports,
            "clients": len(clients),
            "client_list": clients,
            "negotiating": negotiating,
            "connections_total": self.total_connections,
            "connections_rejected": self.rejected_connections,
            "connections_evicted": self.evicted_connections,
            "connections_killed": killed,
            "acl": {"entries": self.acl.entries if self.acl else [],
                    "default_deny": self.acl.default_deny if self.acl else False},
            "limits": {
                "max_connections": self.limits.max_connections,
                "max_connections_per_address": self.limits.max_connections_per_address,
                "max_handshakes": self.limits.max_handshakes,
                "max_handshakes_per_address": self.limits.max_handshakes_per_address,
                "handshake_timeout_seconds": self.limits.handshake_timeout,
                "max_inflight": self.limits.max_inflight,
                "request_timeout_seconds": self.limits.request_timeout,
            },
        }
        for hook in self.status_hooks:
            hook(out)
        return out

    def attach_control(self, control: ControlServer) -> None:
        """Register the server's verbs (status, acl) on a control socket."""

        def do_status(req: dict[str, Any]) -> dict[str, Any]:
            return {"status": self.status()}

        def do_acl(req: dict[str, Any]) -> dict[str, Any]:
            entries = req.get("entries")
            if entries is None:
                return {"entries": self.acl.entries if self.acl else []}
            if not isinstance(entries, list) or not all(isinstance(x, str) for x in entries):
                raise ControlError('"entries" must be a list of CIDR strings')
            try:
                dropped = self.set_acl(entries, req.get("default_deny"))
            except ValueError as exc:
                raise ControlError(str(exc)) from exc
            assert self.acl is not None
            return {"entries": self.acl.entries, "disconnected": dropped}

        def do_filter(req: dict[str, Any]) -> dict[str, Any]:
            name = req.get("filter")
            params = req.get("params")
            export = req.get("export") or ""
            if not isinstance(name, str) or not isinstance(params, dict) \
                    or not isinstance(export, str):
                raise ControlError('"filter" (a name) and "params" (an object) are required')
            try:
                n = self.configure_filter(export, name, {str(k): str(v)
                                                         for k, v in params.items()})
            except ConfigError as exc:
                raise ControlError(str(exc)) from exc
            return {"filter": name, "layers": n, "params": params}

        control.register("status", do_status)
        control.register("acl", do_acl)
        control.register("filter", do_filter)
        self.control = control

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

    def _close_listeners(self) -> None:
        for lst in self.listeners:
            self.loop.remove(lst.sock.fileno())
            with contextlib.suppress(OSError):
                lst.sock.close()
            if lst.kind == "unix" and lst.owned:
                with contextlib.suppress(OSError):
                    os.unlink(lst.path)

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
