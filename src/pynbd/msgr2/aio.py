"""asyncio transport for msgr2: client sessions (with transparent reconnect for lossless
sessions), a server, back-pressure, keepalive-based dead-peer detection and clean close.

    session = await Msgr2Client.connect(host, port, auth=PskAuth(key), mode="secure")
    await session.send(0x7001, b"front", data)
    msg = await session.recv()

    server = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(key), handler=serve)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.auth import ClientAuth, ServerAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AddrType, ConMode, EntityType
from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec
from pynbd.msgr2.errors import (
    AuthenticationError,
    ConnectionClosedError,
    Msgr2Error,
    ProtocolError,
    SessionResetError,
    UsageError,
)
from pynbd.msgr2.events import (
    Event,
    KeepaliveAckReceived,
    MessageReceived,
    SessionEstablished,
    SessionTakenOver,
    SessionWasReset,
    WaitRequested,
)
from pynbd.msgr2.frames import DEFAULT_MAX_SEGMENT_LEN, BufferPool
from pynbd.msgr2.session import OutMessage, Session, SessionRegistry

log = logging.getLogger(__name__)

#: receive straight into the frame buffer when at least this much of the unit is missing
DIRECT_RECV_MIN = 32 * 1024
SCRATCH_LEN = 256 * 1024
#: CPython 3.11's selector transport copies whatever it cannot send at once, so a buffer
#: is free again as soon as write() returns; later versions keep a reference to it
_WRITE_COPIES = sys.version_info < (3, 12)
#: small frames sent in a burst are gathered into one write up to this size
COALESCE_BYTES = 64 * 1024


def _mode_tuple(mode: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(mode, tuple):
        return mode
    table = {"crc": (ConMode.CRC,), "secure": (ConMode.SECURE,),
             "prefer-secure": (ConMode.SECURE, ConMode.CRC)}
    try:
        return tuple(int(m) for m in table[mode])
    except KeyError:
        raise UsageError(f"mode must be one of {sorted(table)}, not {mode!r}") from None


@dataclass(frozen=True)
class ReceivedMessage:
    type: int
    seq: int
    tid: int
    front: bytes
    middle: bytes
    #: a view into the receive buffer (no copy)
    data: memoryview
    version: int = 1
    _pool: BufferPool | None = field(default=None, repr=False, compare=False)
    _buffer: bytearray | None = field(default=None, repr=False, compare=False)

    def release(self) -> None:
        """Optional: done with ``data`` (and every view of it) -- its buffer is reused for
        a later message. Do not touch ``data`` afterwards, and do not release a message whose
        ``data`` was passed to ``send()`` (a lossless session keeps it until ACKed)."""
        if self._pool is not None and self._buffer is not None:
            try:
                self.data.release()
            except BufferError:
                return  # something still exports it: leave it to the garbage collector
            self._pool.put(self._buffer)


@dataclass
class SessionOptions:
    keepalive_interval: float = 5.0
    #: no bytes from the peer for this long: the connection is dead
    keepalive_timeout: float = 30.0
    connect_timeout: float = 10.0
    #: lossless client: how long to keep trying to reconnect before giving up
    reconnect_timeout: float = 60.0
    #: queued received messages before reading from the socket pauses
    max_rx_queue: int = 256
    #: unacknowledged bytes before send() waits for acks (lossless)
    max_unacked_bytes: int = 256 * 1024 * 1024
    max_segment_len: int = DEFAULT_MAX_SEGMENT_LEN
    #: server: keep a disconnected lossless session this long for a reconnect
    session_linger: float = 120.0


class _Link(asyncio.BufferedProtocol):
    """One TCP connection driving one sans-I/O Connection."""

    def __init__(self, conn: Connection, owner: _LinkOwner) -> None:
        self.conn = conn
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(SCRATCH_LEN)
        self._direct = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = asyncio.Event()
        self.error: BaseException | None = None
        self.last_rx = time.monotonic()
        self.taken_over = False
        self.paused_reading = False
        self._held: list[Buffer] = []
        self._held_len = 0
        self._flush_scheduled = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.owner.link_made(self)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        try:
            if self.conn.wants >= DIRECT_RECV_MIN:
                self._direct = True
                return self.conn.recv_buffer()
        except Msgr2Error:
            pass
        self._direct = False
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        try:
            if self._direct:
                events = self.conn.received(nbytes)
            else:
                events = self.conn.receive_data(memoryview(self._scratch)[:nbytes])
            self.flush(now=not self.conn.ready)
            self.owner.link_events(self, events)
        except Msgr2Error as exc:
            self.fail(exc)

    def fail(self, exc: BaseException, abort: bool = False) -> None:
        """Close after an error: whatever the connection still has to say (e.g. the
        AUTH_BAD_METHOD explaining a rejection) is flushed first unless ``abort``."""
        if self.error is None:
            self.error = exc
        log.debug("msgr2 connection failed: %s", exc)
        t = self.transport
        if t is not None and not abort:
            with contextlib.suppress(Exception):
                self.flush()
        self.conn.close()
        if t is not None:
            if abort:
                t.abort()
            else:
                t.close()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.conn.close()
        self._held, self._held_len = [], 0
        if self.error is None:
            self.error = exc or ConnectionClosedError("connection closed by peer")
        self._writable.set()
        self.closed.set()
        self.owner.link_lost(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # helpers
    def flush(self, now: bool = True) -> None:
        """Write what the connection produced. With ``now=False`` small frames are held
        back (up to COALESCE_BYTES, until the event loop's next turn) so bursts of small
        messages share one write."""
        chunks = self.conn.data_to_send()
        for c in chunks:
            self._held.append(c)
            self._held_len += len(c)
        if not self._held:
            return
        if now or self._held_len >= COALESCE_BYTES:
            self._write_held()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._write_held)

    def _write_held(self) -> None:
        self._flush_scheduled = False
        held, self._held, self._held_len = self._held, [], 0
        t = self.transport
        if t is None or t.is_closing() or not held:
            return
        small: list[Buffer] = []
        for c in held:
            if len(c) < 16384:
                small.append(c)
                continue
            if small:
                t.write(b"".join(small))
                small = []
            t.write(c)
            if isinstance(c, memoryview) and (
                    (_WRITE_COPIES and type(t).__name__ == "_SelectorSocketTransport")
                    or t.get_write_buffer_size() == 0):
                self.conn.recycle(c)
        if small:
            t.write(small[0] if len(small) == 1 else b"".join(small))

    async def drain(self) -> None:
        await self._writable.wait()

    def abort(self) -> None:
        self.conn.close()
        if self.transport is not None:
            self.transport.abort()


class _LinkOwner:
    def link_made(self, link: _Link) -> None:
        pass

    def link_events(self, link: _Link, events: list[Event]) -> None:
        raise NotImplementedError

    def link_lost(self, link: _Link) -> None:
        raise NotImplementedError


class Msgr2Session(_LinkOwner):
    """A msgr2 session (both roles): send/recv messages, keepalive, close."""

    def __init__(self, session: Session, options: SessionOptions) -> None:
        self.session = session
        self.options = options
        self.link: _Link | None = None
        self._rx: deque[ReceivedMessage] = deque()
        self._rx_event = asyncio.Event()
        self._ready = asyncio.Event()
        self._acked = asyncio.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._keepalive_waiters: deque[asyncio.Future[float]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self.reconnects = 0
        self.established: SessionEstablished | None = None
        self._start_task(self._keepalive_loop())

    # ---------------------------------------------------------------- plumbing
    def _start_task(self, coro: Awaitable[None]) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def link_events(self, link: _Link, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, MessageReceived):
                h = ev.header
                self._rx.append(ReceivedMessage(h.type, h.seq, h.tid, bytes(ev.front),
                                                bytes(ev.middle), ev.data, h.version,
                                                link.conn.rx_pool, ev.buffer))
                self._rx_event.set()
            elif isinstance(ev, KeepaliveAckReceived):
                now = time.time()
                sent = ev.sec + ev.nsec / 1e9
                while self._keepalive_waiters:
                    fut = self._keepalive_waiters.popleft()
                    if not fut.done():
                        fut.set_result(max(0.0, now - sent))
            elif isinstance(ev, SessionEstablished):
                self.established = ev
                self.link = link
                self._ready.set()
            elif isinstance(ev, SessionWasReset):
                # the peer no longer has our session (restarted, or it ended the session):
                # whatever state the application built on it is gone -- do not silently
                # start a new session
                self._set_error(SessionResetError(
                    f"peer reset the session ({ev.dropped} unacknowledged messages lost)"))
            elif isinstance(ev, SessionTakenOver):
                self.on_taken_over(ev.previous_owner)
            elif isinstance(ev, WaitRequested):
                link.abort()
        self._acked.set()
        if len(self._rx) >= self.options.max_rx_queue and link.transport is not None \
                and not link.paused_reading:
            link.paused_reading = True
            link.transport.pause_reading()

    def on_taken_over(self, previous: object) -> None:
        pass

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._closed = True
        self._rx_event.set()
        self._ready.set()
        self._acked.set()
        for fut in self._keepalive_waiters:
            if not fut.done():
                fut.set_exception(ConnectionClosedError(str(exc)))
        self._keepalive_waiters.clear()
        if self.link is not None:
            self.link.abort()

    def _live_link(self) -> _Link | None:
        link = self.link
        if link is not None and link.conn.ready and not link.closed.is_set():
            return link
        return None

    async def _keepalive_loop(self) -> None:
        opts = self.options
        while not self._closed:
            await asyncio.sleep(min(opts.keepalive_interval, opts.keepalive_timeout / 3))
            link = self._live_link()
            if link is None:
                continue
            if time.monotonic() - link.last_rx > opts.keepalive_timeout:
                log.info("msgr2 peer silent for %.1fs: dropping connection", opts.keepalive_timeout)
                link.fail(ConnectionClosedError("peer stopped answering keepalives"), abort=True)
                continue
            try:
                link.conn.send_keepalive()
                link.flush()
            except Msgr2Error:
                pass

    # ---------------------------------------------------------------- public API
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lossless(self) -> bool:
        return self.session.lossless

    def _check(self) -> None:
        if self._closed:
            if isinstance(self._error, Msgr2Error):
                raise self._error
            raise ConnectionClosedError(f"session is closed ({self._error or 'closed'})")

    async def send(self, msg_type: int, front: Buffer = b"", data: Buffer = b"",
                   middle: Buffer = b"", *, tid: int = 0, version: int = 1,
                   compat_version: int = 1, priority: int = 127) -> None:
        """Send a message. Waits while the transport is congested (back-pressure); on a
        lossless session that is reconnecting, queues the message for the new connection."""
        self._check()
        for part in (front, middle, data):
            if len(part) > self.options.max_segment_len:
                raise UsageError(f"message part of {len(part)} bytes exceeds max_segment_len")
        s = self.session
        while s.lossless and s.unacked_bytes > self.options.max_unacked_bytes:
            self._acked.clear()
            await self._acked.wait()
            self._check()
        link = self._live_link()
        if link is not None:
            link.conn.send_message(msg_type, front, data, middle, tid=tid, priority=priority,
                                   version=version, compat_version=compat_version)
            link.flush(now=False)
            await link.drain()
        elif s.lossless:
            s.next_out(OutMessage(0, msg_type, front, middle, data, tid, priority, version,
                                  compat_version))
        else:
            await self._ready.wait()
            self._check()
            await self.send(msg_type, front, data, middle, tid=tid, version=version,
                            compat_version=compat_version, priority=priority)

    async def recv(self) -> ReceivedMessage:
        """The next message, in order. Raises ConnectionClosedError once closed."""
        while not self._rx:
            self._check()
            self._rx_event.clear()
            await self._rx_event.wait()
        msg = self._rx.popleft()
        link = self.link
        if link is not None and link.paused_reading and len(self._rx) < self.options.max_rx_queue // 2:
            link.paused_reading = False
            if link.transport is not None and not link.transport.is_closing():
                link.transport.resume_reading()
        return msg

    async def keepalive(self, timeout: float = 10.0) -> float:
        """Send KEEPALIVE2 and wait for its ACK; returns the round trip in seconds."""
        self._check()
        link = self._live_link()
        if link is None:
            await asyncio.wait_for(self._ready.wait(), timeout)
            self._check()
            link = self._live_link()
            if link is None:
                raise ConnectionClosedError("no connection")
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._keepalive_waiters.append(fut)
        link.conn.send_keepalive()
        link.flush()
        return await asyncio.wait_for(fut, timeout)

    async def wait_acked(self, timeout: float = 30.0) -> None:
        """Wait until the peer acknowledged every message sent (lossless)."""
        deadline = time.monotonic() + timeout
        while self.session.lossless and self.session.unacked:
            self._check()
            self._acked.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.session.unacked)} messages still unacknowledged")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(left, 1.0))

    async def close(self, timeout: float = 5.0) -> None:
        """Clean close: wait (bounded) for outstanding acks and flushed output, then close."""
        if not self._closed and self._live_link() is not None:
            with contextlib.suppress(Msgr2Error, TimeoutError):
                await self.wait_acked(timeout)
        self._closed = True
        if self._error is None:
            self._error = ConnectionClosedError("session closed locally")
        self._rx_event.set()
        self._ready.set()
        link = self.link
        if link is not None and link.transport is not None:
            with contextlib.suppress(Exception):
                link.flush()
            link.conn.close()
            link.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.closed.wait(), timeout)
        for t in list(self._tasks):
            t.cancel()
        self._on_closed()

    def _on_closed(self) -> None:
        pass


class ClientSession(Msgr2Session):
    """Client side; lossless sessions reconnect transparently."""

    def __init__(self, host: str, port: int, config: ConnectionConfig, session: Session,
                 options: SessionOptions) -> None:
        super().__init__(session, options)
        self.host = host
        self.port = port
        self.config = config
        self._reconnecting = False

    async def _open(self) -> _Link:
        loop = asyncio.get_running_loop()
        conn = Connection(Role.CLIENT, self.config, self.session)
        self._ready.clear()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: _Link(conn, self), self.host, self.port),
            self.options.connect_timeout)
        link = proto
        self.link = link
        ready = asyncio.ensure_future(self._ready.wait())
        lost = asyncio.ensure_future(link.closed.wait())
        try:
            done, _ = await asyncio.wait({ready, lost}, timeout=self.options.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            lost.cancel()
        if not done:
            link.abort()
            raise TimeoutError(f"msgr2 handshake with {self.host}:{self.port} timed out")
        self._check()
        if not link.conn.ready:
            err = link.error
            if isinstance(err, Msgr2Error):
                raise err
            raise ConnectionClosedError(
                f"{self.host}:{self.port} closed the connection during the handshake"
                + (f" ({err})" if err else ""))
        return link

    def link_lost(self, link: _Link) -> None:
        if link is not self.link or self._closed:
            return
        if not link.conn.ready and self.established is None:
            return  # handshake failure: _open reports it
        if isinstance(link.error, (ProtocolError,)) and not self.session.lossless:
            self._set_error(link.error)
            return
        if self.session.lossless and self.established is not None:
            if not self._reconnecting:
                self._reconnecting = True
                self._start_task(self._reconnect_loop())
        else:
            self._set_error(link.error or ConnectionClosedError("connection lost"))

    async def _reconnect_loop(self) -> None:
        deadline = time.monotonic() + self.options.reconnect_timeout
        delay = 0.01
        last: BaseException | None = None
        try:
            while not self._closed and time.monotonic() < deadline:
                try:
                    await self._open()
                    self.reconnects += 1
                    return
                except (OSError, TimeoutError, Msgr2Error) as exc:
                    last = exc
                    if isinstance(exc, (SessionResetError, AuthenticationError)):
                        break  # retrying cannot help
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            if not self._closed:
                self._set_error(ConnectionClosedError(
                    f"could not reconnect to {self.host}:{self.port}: {last}"))
        finally:
            self._reconnecting = False
            link = self.link
            if link is not None and link.closed.is_set() and not self._closed and \
                    self._error is None:
                # lost again while we were finishing: go round once more
                self.link_lost(link)


class Msgr2Client:
    """Factory for client sessions."""

    @staticmethod
    async def connect(host: str, port: int, *, auth: ClientAuth, mode: str = "crc",
                      lossless: bool = True, entity_type: int = EntityType.CLIENT,
                      target_nonce: int = 0, options: SessionOptions | None = None,
                      gid: int = 0) -> ClientSession:
        opts = options or SessionOptions()
        cfg = ConnectionConfig(
            entity_type=entity_type, auth_client=auth, modes=_mode_tuple(mode),
            target_addr=EntityAddr(AddrType.MSGR2, target_nonce, _resolve(host), port),
            gid=gid, max_segment_len=opts.max_segment_len)
        session = Session(lossless=lossless)
        cs = ClientSession(host, port, cfg, session, opts)
        try:
            await cs._open()
        except BaseException:
            await cs.close(timeout=0.5)
            raise
        return cs


def _resolve(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return host


class ServerSession(Msgr2Session):
    """Server side of a session, handed to the server's handler."""

    def __init__(self, server: Msgr2Server, session: Session, options: SessionOptions) -> None:
        super().__init__(session, options)
        self.server = server
        self._linger: asyncio.TimerHandle | None = None

    def link_lost(self, link: _Link) -> None:
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

    def attach(self, link: _Link) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        self.link = link

    def _on_closed(self) -> None:
        self.server.registry.remove(self.session)


Handler = Callable[[ServerSession], Awaitable[None]]


class _ServerConnOwner(_LinkOwner):
    """Owns a server link until the handshake establishes (or resumes) a session."""

    def __init__(self, server: Msgr2Server) -> None:
        self.server = server
        self.session: ServerSession | None = None

    def link_made(self, link: _Link) -> None:
        self.server._links.add(link)
        # a peer that never completes the handshake does not get to hold a connection
        asyncio.get_running_loop().call_later(
            self.server.options.connect_timeout, self._handshake_deadline, link)

    def _handshake_deadline(self, link: _Link) -> None:
        if self.session is None and not link.closed.is_set():
            link.fail(ConnectionClosedError("peer did not complete the msgr2 handshake in "
                                            f"{self.server.options.connect_timeout:g}s"))

    def link_events(self, link: _Link, events: list[Event]) -> None:
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

    def link_lost(self, link: _Link) -> None:
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
        self._links: set[_Link] = set()
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

    def _make_link(self) -> _Link:
        cfg = ConnectionConfig(
            entity_type=self.entity_type, auth_server=self.auth,
            my_addrs=EntityAddrVec((EntityAddr(AddrType.MSGR2, self.nonce, self.host, self.port),)),
            registry=self.registry, max_segment_len=self.options.max_segment_len)
        conn = Connection(Role.SERVER, cfg)
        return _Link(conn, _ServerConnOwner(self))

    def _bind(self, link: _Link) -> ServerSession:
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
