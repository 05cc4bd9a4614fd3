"""The server side: :meth:`Msgr2Server.listen` accepts connections and calls the
handler once per new session; lossless sessions survive reconnects (and linger a
while for one)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

from pynbd.msgr2.aio.link import Link, LinkOwner, log
from pynbd.msgr2.aio.session import Msgr2Session, SessionOptions
from pynbd.msgr2.auth import ServerAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AddrType, EntityType
from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec
from pynbd.msgr2.errors import ConnectionClosedError, ProtocolError
from pynbd.msgr2.events import Event, SessionEstablished, SessionTakenOver
from pynbd.msgr2.session import Session, SessionRegistry


class ServerSession(Msgr2Session):
    """Server side of a session, handed to the server's handler."""

    def __init__(self, server: Msgr2Server, session: Session, options: SessionOptions) -> None:
        super().__init__(session, options)
        self.server = server
        self._linger: asyncio.TimerHandle | None = None

    def link_lost(self, link: Link) -> None:
        if link is not self.link or self._closed or link.taken_over:
            return
        if self.session.lossless and not isinstance(link.error, ProtocolError):
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(self.options.session_linger, self._expire)
        else:
            self._set_error(link.error or ConnectionClosedError("connection lost"))

    def _expire(self) -> None:
        if self._live_link() is None and not self._closed:
            self._set_error(ConnectionClosedError("client did not reconnect in time"))
            self.server.registry.remove(self.session)

    def attach(self, link: Link) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.link = link

    def _on_closed(self) -> None:
        self.server.registry.remove(self.session)


Handler = Callable[[ServerSession], Awaitable[None]]


class _ServerConnOwner(LinkOwner):
    """Owns a server link until the handshake establishes (or resumes) a session."""

    def __init__(self, server: Msgr2Server) -> None:
        self.server = server
        self.session: ServerSession | None = None

    def link_made(self, link: Link) -> None:
        self.server._links.add(link)
        # a peer that never completes the handshake does not get to hold a connection
        asyncio.get_running_loop().call_later(
            self.server.options.connect_timeout, self._handshake_deadline, link)

    def _handshake_deadline(self, link: Link) -> None:
        if self.session is None and not link.closed.is_set():
            link.fail(ConnectionClosedError("peer did not complete the msgr2 handshake in "
                                            f"{self.server.options.connect_timeout:g}s"))

    def link_events(self, link: Link, events: list[Event]) -> None:
        if self.session is None:
            for i, ev in enumerate(events):
                if isinstance(ev, SessionTakenOver):
                    self.server._take_over(ev.previous_owner)
                elif isinstance(ev, SessionEstablished):
                    self.session = self.server._bind(link)
                    self.session.link_events(link, events[i:])
                    return
            return
        for ev in events:
            if isinstance(ev, SessionTakenOver):
                self.server._take_over(ev.previous_owner)
        self.session.link_events(link, events)

    def link_lost(self, link: Link) -> None:
        self.server._links.discard(link)
        if self.session is not None:
            self.session.link_lost(link)


class Msgr2Server:
    """A msgr2 server: calls ``handler(session)`` once per new session."""

    def __init__(self, auth: ServerAuth, handler: Handler, options: SessionOptions,
                 entity_type: int) -> None:
        self.auth = auth
        self.handler = handler
        self.options = options
        self.entity_type = entity_type
        self.registry = SessionRegistry()
        self.nonce = int.from_bytes(os.urandom(4), "little")
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()
        self._sessions: dict[int, ServerSession] = {}
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self.host = ""
        self.port = 0

    @classmethod
    async def listen(cls, host: str, port: int, *, auth: ServerAuth, handler: Handler,
                     options: SessionOptions | None = None,
                     entity_type: int = EntityType.OSD) -> Msgr2Server:
        srv = cls(auth, handler, options or SessionOptions(), entity_type)
        loop = asyncio.get_running_loop()
        srv._server = await loop.create_server(srv._make_link, host, port)
        sockname = srv._server.sockets[0].getsockname()
        srv.host, srv.port = sockname[0], sockname[1]
        return srv

    def _make_link(self) -> Link:
        cfg = ConnectionConfig(
            entity_type=self.entity_type, auth_server=self.auth,
            my_addrs=EntityAddrVec((EntityAddr(AddrType.MSGR2, self.nonce, self.host, self.port),)),
            registry=self.registry, max_segment_len=self.options.max_segment_len)
        conn = Connection(Role.SERVER, cfg)
        return Link(conn, _ServerConnOwner(self))

    def _bind(self, link: Link) -> ServerSession:
        s = link.conn.session
        assert s is not None
        ss = self._sessions.get(id(s))
        if ss is None or ss.session is not s or ss.closed:
            ss = ServerSession(self, s, self.options)
            self._sessions[id(s)] = ss
            ss.attach(link)
            task = asyncio.ensure_future(self._run_handler(ss))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_tasks.discard)
        else:
            ss.attach(link)
        return ss

    def _take_over(self, previous: object) -> None:
        for link in list(self._links):
            if link.conn is previous:
                link.taken_over = True
                link.abort()

    async def _run_handler(self, ss: ServerSession) -> None:
        try:
            await self.handler(ss)
        except (ConnectionClosedError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("msgr2 session handler failed")
        finally:
            await ss.close(timeout=1.0)
            self._sessions.pop(id(ss.session), None)

    @property
    def sessions(self) -> list[ServerSession]:
        return list(self._sessions.values())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.abort()
        for t in list(self._handler_tasks):
            t.cancel()
        if self._handler_tasks:
            await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        for ss in list(self._sessions.values()):
            await ss.close(timeout=0.1)
        if self._server is not None:
            await self._server.wait_closed()
