"""A msgr2 session over asyncio (both roles): send and receive messages with
back-pressure, keepalive-based dead-peer detection, and a clean close."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.aio.link import Link, LinkOwner, log
from pynbd.msgr2.errors import ConnectionClosedError, Msgr2Error, SessionResetError, UsageError
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
from pynbd.msgr2.session import OutMessage, Session


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


class Msgr2Session(LinkOwner):
    """A msgr2 session (both roles): send/recv messages, keepalive, close."""

    def __init__(self, session: Session, options: SessionOptions) -> None:
        self.session = session
        self.options = options
        self.link: Link | None = None
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

    def link_events(self, link: Link, events: list[Event]) -> None:
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

    def _live_link(self) -> Link | None:
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
                link.conn.send_keepalive(now=time.time())
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
        if link is not None and link.paused_reading and \
                len(self._rx) < self.options.max_rx_queue // 2:
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
        link.conn.send_keepalive(now=time.time())
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
