"""One TCP connection driving one sans-I/O :class:`~pynbd.msgr2.connection.Connection`:
an asyncio ``BufferedProtocol`` that receives straight into the frame buffers, coalesces
small writes and reports events to its owner (a session, or the server until the
handshake binds the connection to one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.connection import Connection
from pynbd.msgr2.errors import ConnectionClosedError, Msgr2Error
from pynbd.msgr2.events import Event

log = logging.getLogger("pynbd.msgr2.aio")

#: receive straight into the frame buffer when at least this much of the unit is missing
DIRECT_RECV_MIN = 32 * 1024
SCRATCH_LEN = 256 * 1024
#: CPython 3.11's selector transport copies whatever it cannot send at once, so a buffer
#: is free again as soon as write() returns; later versions keep a reference to it
_WRITE_COPIES = sys.version_info < (3, 12)
#: small frames sent in a burst are gathered into one write up to this size
COALESCE_BYTES = 64 * 1024


class Link(asyncio.BufferedProtocol):
    """One TCP connection driving one sans-I/O Connection."""

    def __init__(self, conn: Connection, owner: LinkOwner) -> None:
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


class LinkOwner:
    def link_made(self, link: Link) -> None:
        pass

    def link_events(self, link: Link, events: list[Event]) -> None:
        raise NotImplementedError

    def link_lost(self, link: Link) -> None:
        raise NotImplementedError
