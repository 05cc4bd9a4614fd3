"""Negotiation: one connection from the client's first option to its export selected,
with TLS (STARTTLS over memory BIOs, the loop owns the socket), the plugin's
per-connection object opened (once it is this connection's turn under
SERIALIZE_CONNECTIONS) and closed again, and the handshake deadline.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

from pynbd.backends.base import ThreadModel
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import (
    NEED_DATA,
    Aborted,
    ExportSelected,
    OptionHandled,
    StartTLS,
)
from pynbd.server.conn_state import RECV_SIZE, ConnState, OutItem, Phase
from pynbd.server.logsafe import safe

if TYPE_CHECKING:
    from pynbd.server.connection import Connection

log = logging.getLogger("pynbd.server")


class TLSLayer:
    """TLS on a non-blocking socket, through memory BIOs (the loop owns the socket)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False

    def take_output(self) -> bytes:
        return self.outgoing.read() if self.outgoing.pending else b""

    def encrypt(self, bufs: list[OutItem]) -> bytes:
        for b in bufs:
            self.obj.write(b)
        return self.outgoing.read()


class NegotiationMixin(ConnState):
    """The handshake phase of :class:`~pynbd.server.connection.Connection`."""

    def _handshake_expired(self) -> None:
        if self.negotiating:
            log.info("%s: handshake deadline passed; dropping connection", self.peer)
            self.close()

    def _handshake_events(self) -> None:
        proto = self.proto
        while self.phase is Phase.HANDSHAKE:
            try:
                ev = proto.next_event()
            finally:
                data = proto.take_output()
                if data:
                    self._send([data])
            if ev is NEED_DATA or isinstance(ev, OptionHandled):
                if ev is NEED_DATA:
                    return
                continue
            if isinstance(ev, StartTLS):
                self._start_tls()
                return
            if isinstance(ev, Aborted):
                log.debug("%s: client aborted negotiation", self.peer)
                self._eof = True
                self.phase = Phase.CLOSING
                self._maybe_finish()
                return
            if isinstance(ev, ExportSelected):
                self._selected(ev)
                return
            raise PeerProtocolError(f"unexpected event during handshake: {ev!r}")

    def _selected(self, ev: ExportSelected) -> None:
        rt = self.worker.runtime_for(ev.export.name)
        if rt is None:  # pragma: no cover - the provider only names known exports
            raise PeerProtocolError(f"export {ev.export.name!r} vanished")
        self.runtime = rt
        self.structured = ev.structured_replies
        self._rmv.release()
        self._rbuf = bytearray(RECV_SIZE)
        self._rmv = memoryview(self._rbuf)
        self.phase = Phase.TRANSMISSION
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._debug = log.isEnabledFor(logging.DEBUG)
        me = cast("Connection", self)  # this part is only ever part of a Connection
        self.worker.connection_negotiated(me)
        log.info("%s: export %s selected (structured replies %s, extended headers %s, "
                 "flags 0x%x)", self.peer, safe(rt.name), ev.structured_replies,
                 ev.extended_headers, ev.flags)
        if rt.thread_model is ThreadModel.SERIALIZE_CONNECTIONS:
            if rt.turn is not None:
                # served (and opened in the plugin) once the connections before it
                # have closed
                self.waiting_turn = True
                rt.turn_queue.append(me)
                return
            rt.turn = me
        self._open_own(resume=False)

    # --- the plugin's object for this connection ------------------------------------

    def _open_own(self, resume: bool) -> None:
        """The plugin's object for this connection (the shared one unless it keeps state
        per connection), wrapped in the runtime's own layers. A blocking plugin's
        open_connection runs on a thread (it may take long); requests wait for it."""
        rt = self.runtime
        assert rt is not None
        self.own_open = True
        self.waiting_turn = True

        lock = rt.serial_lock

        def open_() -> tuple[Any, BaseException | None]:
            if lock is not None:
                lock.acquire()
            try:
                return rt.base.open_connection(rt.name, rt.read_only), None
            except BaseException as exc:
                return None, exc
            finally:
                if lock is not None:
                    lock.release()

        if rt.blocking:
            self.worker.run_in_thread(open_, lambda r: self._guarded(self._opened, *r, True))
        else:
            self._opened(*open_(), resume)

    def _opened(self, own: Any, exc: BaseException | None, resume: bool) -> None:
        if exc is not None:
            log.error("%s: the backend's open_connection raised %s: %s; dropping the "
                      "connection", self.peer, type(exc).__name__, safe(exc), exc_info=exc)
            self.own_open = False
            self.close()
            return
        self._own = own
        if self.closed:  # the client left while it was being opened
            self._close_own()
            return
        self.waiting_turn = False
        self.rebind()
        if resume:  # requests that arrived meanwhile
            self._unpark()

    def take_turn(self) -> None:
        """SERIALIZE_CONNECTIONS: the connections before this one have closed."""
        self._guarded(self._take_turn)

    def _take_turn(self) -> None:
        if not self.closed:
            self._open_own(resume=True)

    def rebind(self) -> None:
        """(Re)build this connection's stack: the runtime's layers (pause, write tracking,
        serialization) around the plugin's per-connection object."""
        rt = self.runtime
        assert rt is not None
        if self._own is None:  # not opened yet (waiting for its turn) or closed
            return
        self.backend = rt.wrap(self._own)
        fd = getattr(self.backend, "sendfile_fd", None)
        self._sendfile_fd = fd if isinstance(fd, int) else -1
        self._sendfile_ok = self.tls is None and self._sendfile_fd >= 0
        self._serial = rt.serial_lock
        self._splice_fd = self._splice_target()
        if self._splice_fd < 0:
            self._unsplice()  # a payload being spliced goes through the new stack

    def _close_own(self) -> None:
        """Tell the plugin the connection ended, once nothing of it runs any more."""
        own = self._own
        if own is None or self.inflight:
            return
        self._own = None
        rt = self.runtime
        assert rt is not None
        lock = rt.serial_lock

        def close() -> None:
            if lock is not None:
                lock.acquire()
            try:
                own.close_connection()
            except BaseException as exc:
                log.error("%s: the backend's close_connection raised %s: %s", self.peer,
                          type(exc).__name__, safe(exc), exc_info=exc)
            finally:
                if lock is not None:
                    lock.release()

        def closed(_result: object = None) -> None:
            self.own_open = False
            # SERIALIZE_CONNECTIONS: the next one's turn
            self.worker.turn_done(rt, cast("Connection", self))

        if rt.blocking:
            self.worker.run_in_thread(close, closed)
        else:
            close()
            closed()

    # --- TLS --------------------------------------------------------------------------

    def _start_tls(self) -> None:
        ctx = self.worker.tls_context
        assert ctx is not None
        self.tls = TLSLayer(ctx)
        self.phase = Phase.TLS_HANDSHAKE
        # the client may already have sent its ClientHello behind the option
        leftover = bytes(self.proto._buf)
        if leftover:
            self.proto._buf.clear()
            self.tls.incoming.write(leftover)
        self._continue_tls_handshake(read=False)

    def _continue_tls_handshake(self, read: bool = True) -> None:
        tls = self.tls
        assert tls is not None
        if read:
            try:
                raw = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                raw = None
            if raw == b"":
                log.info("%s: client closed during the TLS handshake", self.peer)
                self.close()
                return
            if raw:
                tls.incoming.write(raw)
        try:
            tls.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        out = tls.take_output()
        if out:
            self._send_raw([out])
        if not done:
            self._update_interest()
            return
        tls.established = True
        self.phase = Phase.HANDSHAKE
        self.proto.tls_established()
        # anything that arrived with the last handshake record is plaintext now
        self._drain_tls()
        self._process()
        self._update_interest()

    def _drain_tls(self) -> None:
        tls = self.tls
        assert tls is not None
        while True:
            try:
                n = int(tls.obj.read(len(self._rmv), self._rmv))
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                return
            if not n:
                return
            self.proto.receive_data(self._rmv[:n])
