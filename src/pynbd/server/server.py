"""The NBD server: listeners, the accept loop, limits and clean shutdown."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynbd.protocol.constants import DEFAULT_MAX_REQUEST
from pynbd.protocol.server import ServerConfig, TLSMode
from pynbd.server.acl import AccessList
from pynbd.server.buffers import BufferPool
from pynbd.server.connection import ClientConnection
from pynbd.server.control import ControlError, ControlServer
from pynbd.server.exports import ExportRegistry

log = logging.getLogger("pynbd.server")


@dataclass
class Limits:
    """Limits that keep one client from hurting the others."""

    max_connections: int = 256
    max_connections_per_address: int = 32
    #: a client must finish option haggling within this many seconds
    handshake_timeout: float = 10.0
    #: requests in flight per connection (worker-pool backends)
    max_inflight: int = 64
    #: worker threads per connection for blocking backends (librbd)
    workers_per_connection: int = 32
    #: drop a client whose request takes longer than this (0 = off; flexnbd's killswitch)
    request_timeout: float = 0.0


@dataclass
class Listener:
    sock: socket.socket
    kind: str  # "tcp" or "unix"
    address: str
    port: int = 0
    path: str = ""


@dataclass
class ServerOptions:
    tls: TLSMode = TLSMode.OFF
    tls_context: ssl.SSLContext | None = None
    limits: Limits = field(default_factory=Limits)
    x_close: bool = True
    #: offer NBD_OPT_EXTENDED_HEADERS
    extended_headers: bool = True
    #: largest READ/WRITE payload accepted (NBD_INFO_BLOCK_SIZE maximum)
    max_request_size: int = DEFAULT_MAX_REQUEST


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
        self.buffers = BufferPool()
        self.listeners: list[Listener] = []
        self.connections: set[ClientConnection] = set()
        self._per_address: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = time.time()
        self.total_connections = 0
        self.rejected_connections = 0
        self.killed_connections = 0
        self.acl: AccessList | None = None
        self.control: ControlServer | None = None
        #: called with the peer address before any byte is sent; False refuses it
        self.accept_filter: Callable[[str], bool] | None = None

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
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((bind_addr, port))
            s.listen(1024)
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

    # --- running ---------------------------------------------------------------------

    def start(self) -> None:
        if self.limits.request_timeout > 0:
            t = threading.Thread(target=self._watchdog, daemon=True, name="killswitch")
            t.start()
        for lst in self.listeners:
            t = threading.Thread(target=self._accept_loop, args=(lst,), daemon=True,
                                 name=f"accept-{lst.address}")
            t.start()
            self._threads.append(t)

    def _accept_loop(self, lst: Listener) -> None:
        sock = lst.sock
        sock.settimeout(0.5)
        while not self._stopping.is_set():
            try:
                conn, addr = sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("accept on %s failed: %s", lst.address, exc)
                time.sleep(0.05)
                continue
            self._admit(conn, addr, lst)

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

    def _admit(self, sock: socket.socket, addr: object, lst: Listener) -> None:
        host = self._peer_host(addr, lst)
        peer = host if lst.kind == "unix" else f"{host}:{addr[1]}"  # type: ignore[index]
        if self.accept_filter is not None and lst.kind == "tcp" and not self.accept_filter(host):
            log.info("%s: refused by the access list", peer)
            self.rejected_connections += 1
            sock.close()
            return
        with self._lock:
            total = len(self.connections)
            mine = self._per_address.get(host, 0)
            if self._stopping.is_set() or total >= self.limits.max_connections or (
                    lst.kind == "tcp" and mine >= self.limits.max_connections_per_address):
                self.rejected_connections += 1
                too_many = True
            else:
                too_many = False
                self._per_address[host] = mine + 1
        if too_many:
            log.warning("%s: refused: connection limit reached (%d total, %d from this address)",
                        peer, total, mine)
            sock.close()
            return
        if lst.kind == "tcp":
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        client = ClientConnection(self, sock, peer)
        client.host = host
        with self._lock:
            self.connections.add(client)
            self.total_connections += 1
        t = threading.Thread(target=client.run, daemon=True, name=f"nbd-{peer}")
        t.start()

    def _watchdog(self) -> None:
        """flexnbd's killswitch: drop clients whose request takes too long."""
        limit = self.limits.request_timeout
        period = min(1.0, max(0.05, limit / 4))
        while not self._stopping.wait(period):
            now = time.monotonic()
            with self._lock:
                conns = list(self.connections)
            for c in conns:
                age = c.oldest_request_age(now)
                if age > limit:
                    log.warning("%s: request running for %.1f s (limit %.1f s): dropping client",
                                c.peer, age, limit)
                    self.killed_connections += 1
                    c.abort()

    # --- access list -------------------------------------------------------------------

    def set_acl(self, entries: list[str], default_deny: bool | None = None) -> int:
        """Replace the access list; disconnect clients it no longer allows."""
        from pynbd.server.acl import AccessList

        if self.acl is None:
            self.acl = AccessList(entries, default_deny=bool(default_deny))
        else:
            self.acl.replace(entries)
            if default_deny is not None:
                self.acl.default_deny = default_deny
        self.accept_filter = self.acl.allows
        with self._lock:
            conns = [c for c in self.connections if c.host != "unix"]
        dropped = 0
        for c in conns:
            if not self.acl.allows(c.host):
                log.info("%s: no longer allowed by the access list: disconnecting", c.peer)
                c.abort()
                dropped += 1
        return dropped

    # --- status ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        exports = []
        for name, e in self.registry.exports.items():
            c = e.counters()
            exports.append({
                "name": name,
                "default": name == self.registry.default,
                "target": e.backend.name,
                "size_bytes": e.info.size,
                "read_only": e.read_only,
                "multi_conn": e.info.can_multi_conn,
                "clients": e.clients,
                "bytes_read": c.bytes_read,
                "bytes_written": c.bytes_written,
                "requests": c.requests,
                "errors": c.errors,
            })
        with self._lock:
            clients = [{"peer": c.peer, "export": c.export.name if c.export else None,
                        "tls": c.tls, "connected_seconds": round(time.monotonic() - c.started, 3)}
                       for c in self.connections]
        return {
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "uris": self.uris(),
            "tls": self.options.tls.value,
            "exports": exports,
            "clients": len(clients),
            "client_list": clients,
            "connections_total": self.total_connections,
            "connections_rejected": self.rejected_connections,
            "connections_killed": self.killed_connections,
            "acl": {"entries": self.acl.entries if self.acl else [],
                    "default_deny": self.acl.default_deny if self.acl else False},
            "limits": {
                "max_connections": self.limits.max_connections,
                "max_connections_per_address": self.limits.max_connections_per_address,
                "handshake_timeout_seconds": self.limits.handshake_timeout,
                "max_inflight": self.limits.max_inflight,
                "request_timeout_seconds": self.limits.request_timeout,
            },
        }

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

        control.register("status", do_status)
        control.register("acl", do_acl)
        self.control = control

    def _connection_closed(self, client: ClientConnection) -> None:
        host = client.host
        with self._lock:
            self.connections.discard(client)
            n = self._per_address.get(host, 0) - 1
            if n <= 0:
                self._per_address.pop(host, None)
            else:
                self._per_address[host] = n

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting, let connections finish what they received, close."""
        self._stopping.set()
        for lst in self.listeners:
            with contextlib.suppress(OSError):
                lst.sock.close()
            if lst.kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(lst.path)
        if self.control is not None:
            self.control.stop()
        for t in self._threads:
            t.join(timeout=2)
        with self._lock:
            conns = list(self.connections)
        for c in conns:
            c.stop()
        deadline = time.monotonic() + timeout
        for c in conns:
            c.closed.wait(max(0.0, deadline - time.monotonic()))
        self.registry.close()

    def serve_forever(self) -> None:
        self.start()
        self._stopping.wait()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()
