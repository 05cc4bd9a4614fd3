"""Admission: whether a client may come in, decided before a byte is sent, and the
bookkeeping that decides it for every connection of every worker.

The access list and the connection limits (per address and in total) refuse at
accept time. Connections still negotiating share a separate, smaller pool, from which
silent ones and then old ones are evicted when it is full, so silent clients cannot
keep well-behaved ones out: the supervisor greets each client and waits for its first
bytes itself, and only a client that has said something is handed to a worker. Workers
report negotiation and closing; a run-time access-list change drops everyone it no
longer allows, wherever they are.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.server.acl import AccessList
from pynbd.server.loop import EPOLLIN
from pynbd.server.server_listeners import Listener
from pynbd.server.server_state import ServerState
from pynbd.server.server_workers import _NO_WORKER, RemoteWorker, WorkerHandle

log = logging.getLogger("pynbd.server")

#: connections accepted per listener event: below the negotiating pool's size, so a
#: client accepted in one batch is read before a flood can push it out of the pool
ACCEPT_BATCH = 16
#: bytes the supervisor reads itself (client flags and the first options)
FIRST_READ = 4096


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


class AdmissionMixin(ServerState):
    """Accepting and admitting connections for :class:`~pynbd.server.server.Server`."""

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
