"""The front door of ``pynbd listen``: the access list, checked when a connection is
accepted and before any byte is sent or read, and a refusal log that stays small under
a flood.

``listen_guarded`` starts a :class:`pynbd.msgr2.aio.Msgr2Server` whose connections pass
a :class:`PeerGuard` first: a peer the access list refuses is closed at once (it reads
EOF, not even the msgr2 banner). A peer that connects but never establishes a msgr2
session (failed authentication, garbage, silence) is counted and logged through the same
:class:`RefusalLog`: at most one line per address per ``interval`` seconds, and a summary
line ("refused N connections from M addresses") for the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pynbd.msgr2.aio import Handler, Msgr2Server, SessionOptions
from pynbd.msgr2.auth import ServerAuth
from pynbd.msgr2.constants import EntityType
from pynbd.msgr2.errors import AuthenticationError
from pynbd.server.acl import AccessList

log = logging.getLogger("pynbd.listen")

#: seconds between two log lines about the same refused address, and between summaries
REFUSAL_LOG_INTERVAL = 60.0
#: addresses remembered for rate limiting (more are only counted)
REFUSAL_LOG_ADDRESSES = 1024
#: connections that have not established a msgr2 session yet (banner, authentication);
#: when more arrive the oldest is dropped, so silent peers cannot exhaust descriptors
MAX_HANDSHAKES = 128


class RefusalLog:
    """Counts refused peers and decides which refusals get a log line (pure: the caller
    passes ``now`` and logs the lines it gets back).

    The first refusal of an address (for each ``kind`` of refusal: access list, failed
    authentication, ...) is logged; further ones within ``interval`` seconds are only
    counted, and :meth:`summary` reports them in one line. At most ``max_addresses``
    (address, kind) pairs are remembered, so a flood from many addresses costs bounded
    memory and at most that many lines per interval.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL,
                 max_addresses: int = REFUSAL_LOG_ADDRESSES) -> None:
        self.interval = interval
        self.max_addresses = max_addresses
        self.total = 0
        self.by_reason: dict[str, int] = {}
        self._last: dict[tuple[str, str], float] = {}
        self._window_count = 0
        self._window_logged = 0
        self._window_addrs: set[str] = set()
        self._window_overflow = 0
        self._window_start: float | None = None

    def refused(self, host: str, reason: str, now: float, kind: str = "") -> str | None:
        """Count one refusal; the line to log for it, or None (summarized later)."""
        self.total += 1
        kind = kind or reason
        self.by_reason[kind] = self.by_reason.get(kind, 0) + 1
        if self._window_start is None:
            self._window_start = now
        self._window_count += 1
        if host in self._window_addrs or len(self._window_addrs) < self.max_addresses:
            self._window_addrs.add(host)
        else:
            self._window_overflow += 1
        key = (host, kind)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return None
        if last is None and len(self._last) >= self.max_addresses:
            self._prune(now)
            if len(self._last) >= self.max_addresses:
                return None
        self._last[key] = now
        self._window_logged += 1
        return (f"refused {host}: {reason} (more of these from this address are "
                f"summarized for {self.interval:g} s)")

    def _prune(self, now: float) -> None:
        for h in [h for h, t in self._last.items() if now - t >= self.interval]:
            del self._last[h]

    def summary(self, now: float) -> str | None:
        """The line summarizing refusals not logged one by one since the last summary
        (None if there were none); starts a new window."""
        unlogged = self._window_count - self._window_logged
        line = None
        if unlogged > 0:
            start = self._window_start if self._window_start is not None else now
            addrs = len(self._window_addrs)
            more = f" (and more addresses: {self._window_overflow} connections)" \
                if self._window_overflow else ""
            line = (f"refused {self._window_count} connections from {addrs} addresses in "
                    f"the last {max(now - start, 0.0):.0f} s{more}; "
                    f"{self._window_logged} logged individually")
        self._window_count = 0
        self._window_logged = 0
        self._window_addrs = set()
        self._window_overflow = 0
        self._window_start = None
        self._prune(now)
        return line


class PeerGuard:
    """The access list of a listener and what it refused."""

    def __init__(self, acl: AccessList | None, refusals: RefusalLog | None = None,
                 logger: logging.Logger = log,
                 clock: Callable[[], float] | None = None,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.acl = acl
        self.refusals = refusals or RefusalLog()
        self.logger = logger
        self._clock = clock
        self.max_handshakes = max_handshakes
        self.refused_acl = 0
        self.refused_handshake = 0
        self.evicted = 0
        #: connections still in the msgr2 handshake, oldest first
        self._handshaking: dict[_Guarded, None] = {}

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    def allows(self, host: str) -> bool:
        return self.acl is None or self.acl.allows(host)

    def refuse(self, host: str, reason: str, kind: str,
               level: int = logging.WARNING) -> None:
        line = self.refusals.refused(host, reason, self._now(), kind)
        if line is not None:
            self.logger.log(level, "%s", line)

    def summarize(self) -> None:
        line = self.refusals.summary(self._now())
        if line is not None:
            self.logger.warning("%s", line)

    def admit(self, conn: _Guarded) -> None:
        """A new connection starts its handshake; drop the oldest beyond the limit."""
        for c in [c for c in self._handshaking if c.established()]:
            del self._handshaking[c]
        while len(self._handshaking) >= self.max_handshakes:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            self.evicted += 1
            oldest.evict()
        self._handshaking[conn] = None

    def finished(self, conn: _Guarded) -> None:
        self._handshaking.pop(conn, None)

    def status(self) -> dict[str, Any]:
        return {"refused_by_access_list": self.refused_acl,
                "failed_handshakes": self.refused_handshake,
                "handshakes_evicted": self.evicted,
                "handshaking": len(self._handshaking),
                "access_list": self.acl.entries if self.acl is not None else [],
                "default_deny": bool(self.acl.default_deny) if self.acl is not None else False}


def _peer_host(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "?")


class _Guarded(asyncio.BufferedProtocol):
    """Checks the peer against the guard before the msgr2 link exists (so a refused peer
    gets nothing, not even the banner); afterwards everything goes to the link."""

    def __init__(self, guard: PeerGuard, make_link: Callable[[], Any]) -> None:
        self.guard = guard
        self.make_link = make_link
        self.inner: Any = None
        self.host = "?"
        self.transport: asyncio.Transport | None = None
        self.evicted = False

    def established(self) -> bool:
        inner = self.inner
        return inner is not None and getattr(inner.owner, "session", None) is not None

    def evict(self) -> None:
        self.evicted = True
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.host = _peer_host(transport)
        if not self.guard.allows(self.host):
            self.guard.refused_acl += 1
            self.guard.refuse(self.host, "not allowed by the access list", "acl")
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            return
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.inner = self.make_link()
        self.guard.admit(self)
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> Any:
        if self.inner is None:
            return memoryview(bytearray(64))
        return self.inner.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.inner is not None:
            self.inner.buffer_updated(nbytes)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            return bool(self.inner.eof_received())
        return False

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        inner = self.inner
        if inner is None:
            return
        self.guard.finished(self)
        try:
            if not self.established():
                err = inner.error
                self.guard.refused_handshake += 1
                if self.evicted:
                    self.guard.refuse(self.host, "dropped in the msgr2 handshake: "
                                                 f"{self.guard.max_handshakes} newer "
                                                 "connections were waiting", "evicted")
                elif isinstance(err, AuthenticationError):
                    self.guard.refuse(self.host, f"msgr2 authentication failed ({err})",
                                      "auth")
                else:
                    self.guard.refuse(self.host, "left before completing the msgr2 "
                                                 "handshake and authentication",
                                      "handshake", level=logging.INFO)
        finally:
            inner.connection_lost(exc)


class _GuardedMsgr2Server(Msgr2Server):
    guard: PeerGuard | None = None

    def _make_link(self) -> Any:
        guard = self.guard
        make = super()._make_link
        if guard is None:
            return make()
        return _Guarded(guard, make)


async def listen_guarded(host: str | None, port: int, *, auth: ServerAuth, handler: Handler,
                         options: SessionOptions, guard: PeerGuard,
                         sock: Any = None) -> Msgr2Server:
    """``Msgr2Server.listen`` with ``guard`` checking every accepted connection first;
    on ``sock`` (a listening socket, e.g. from systemd) instead of ``host:port``."""
    srv = _GuardedMsgr2Server(auth, handler, options, EntityType.OSD)
    srv.guard = guard
    loop = asyncio.get_running_loop()
    if sock is not None:
        server = await loop.create_server(srv._make_link, sock=sock)
    else:
        server = await loop.create_server(srv._make_link, host, port)
    srv._server = server
    sockname = server.sockets[0].getsockname()
    srv.host, srv.port = sockname[0], sockname[1]
    return srv
