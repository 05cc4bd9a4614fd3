"""One client connection: a non-blocking driver around the sans-I/O core.

Every worker runs one event loop (``server/loop.py``) that serves all of its
connections; nothing here blocks the loop except the backend calls of fast backends
(memory, page-cache files), which are called inline because a thread hand-off costs
30-50x a page-cache read. Backends marked ``blocking`` (librbd, network plugins) run on
the worker's thread pool and complete back on the loop.

Per connection: bytes are read into one receive buffer and fed to the protocol core;
every request already received is executed and the replies go out in one ``sendmsg``.
A WRITE payload is received straight into a pooled buffer that the kernel backs only as
bytes arrive. Replies that the socket cannot take yet wait in a queue; while it is over
:data:`HIGH_WATER`, the connection stops reading and executing (a client that never
reads its replies holds at most that much).

The connection is one object built from parts, one module each (mixins, so the request
path costs no extra lookup): this module has its life (start, read, feed the protocol
core, end: the final flush, the safe-close reply); :mod:`.conn_state` the shared
attributes and limits; :mod:`.conn_negotiation` the handshake and TLS;
:mod:`.conn_requests` running requests inline; :mod:`.conn_offload` on threads or aio;
:mod:`.conn_output` the reply queue; :mod:`.conn_errors` what backend failures become.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynbd.protocol.constants import Cmd, errno_to_nbd
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import (
    NEED_DATA,
    Command,
    Disconnect,
    InvalidCommand,
    SafeClose,
    ServerConnection,
)
from pynbd.server.buffers import Buffer
from pynbd.server.conn_errors import ErrorsMixin
from pynbd.server.conn_negotiation import NegotiationMixin, TLSLayer
from pynbd.server.conn_offload import OffloadMixin
from pynbd.server.conn_output import OutputMixin
from pynbd.server.conn_requests import RequestsMixin
from pynbd.server.conn_splice import SpliceMixin
from pynbd.server.conn_state import (
    BIG_REPLY,
    HANDSHAKE_RECV,
    HIGH_WATER,
    MAX_IOV,
    RECV_SIZE,
    SPARSE_READ_MIN,
    Counters,
    OutItem,
    Phase,
    _Payload,
    _Spliced,
)
from pynbd.server.logsafe import safe
from pynbd.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT

if TYPE_CHECKING:
    from pynbd.server.worker import ExportRuntime, Worker

__all__ = [
    "BIG_REPLY",
    "HANDSHAKE_RECV",
    "HIGH_WATER",
    "MAX_IOV",
    "RECV_SIZE",
    "SPARSE_READ_MIN",
    "Connection",
    "Counters",
    "OutItem",
    "Phase",
    "TLSLayer",
]

#: a WRITE payload at least this large makes the next read take one request header only
#: (below it, copying the payload out of the receive buffer costs less than a recv call)
HEADER_ONLY_AFTER = 128 * 1024

log = logging.getLogger("pynbd.server")


class Connection(NegotiationMixin, RequestsMixin, OffloadMixin, OutputMixin, SpliceMixin,
                 ErrorsMixin):
    def __init__(self, worker: Worker, sock: socket.socket, conn_id: int, peer: str,
                 host: str) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.id = conn_id
        self.peer = peer
        self.host = host
        self.proto = ServerConnection(worker.provider, worker.protocol_config)
        self.phase = Phase.HANDSHAKE
        self.started = time.monotonic()
        self.bytes_in = 0  # handshake progress, for the eviction policy
        self.runtime: ExportRuntime | None = None
        self.counters = Counters()
        self.structured = False
        self.tls: TLSLayer | None = None
        # small while negotiating (a flood of silent connections costs little), full
        # size once transmission starts
        self._rbuf = bytearray(HANDSHAKE_RECV)
        self._rmv = memoryview(self._rbuf)
        #: read just one request header next (see _on_readable)
        self._header_only = False
        self._wq: deque[OutItem] = deque()
        self._wq_bytes = 0
        self._mask = 0
        self._payload: _Payload | _Spliced | None = None
        self._splice_fd = -1
        self._parked: deque[tuple[Command, Buffer | None, memoryview | None]] = deque()
        self.inflight = 0
        #: cookie -> monotonic start, for requests on worker threads (killswitch)
        self.busy: dict[int, float] = {}
        #: aio completions delivered on the loop, answered together (conn_offload)
        self._aio_ready: list[tuple[Command, Buffer | None, memoryview | None,
                                    OSError | None, Any]] = []
        self._wrote = False
        self._ending: Disconnect | SafeClose | None = None
        self._eof = False
        self._timer: Any = None
        self._sendfile_ok = True
        self._final_flushing = False
        self._final_flush_done = False
        #: the plugin's object for this connection, and the stack that serves it
        self._own: Any = None
        #: open_connection was called and close_connection has not finished yet
        self.own_open = False
        self.backend: Any = None
        self._sendfile_fd = -1
        self._serial: Any = None
        #: not served yet: its open_connection is running, or (SERIALIZE_CONNECTIONS)
        #: another connection is being served first
        self.waiting_turn = False
        #: why the connection ended, for the access log
        self.end_reason = ""
        self._debug = False
        self._final_flush_error: OSError | None = None

    # --- lifecycle ------------------------------------------------------------------

    def start(self, handshake_timeout: float, received: bytes = b"") -> None:
        """Begin serving. The supervisor already sent the greeting and read ``received``
        (the client's flags and maybe its first options)."""
        self.loop.add(self.fd, EPOLLIN, self._on_event)
        self._mask = EPOLLIN
        self._timer = self.loop.call_later(handshake_timeout, self._handshake_expired)
        self.proto.initiate()  # the supervisor sent these bytes
        if received:
            self.bytes_in += len(received)
            self.proto.receive_data(received)
            self._guarded(self._start_processing)

    def _start_processing(self) -> None:
        self._process()
        self._update_interest()

    def abort(self, reason: str = "") -> None:
        """Drop the connection now (ACL change, killswitch, eviction, worker stop)."""
        if self.closed:
            return
        if reason:
            log.info("%s: %s", self.peer, reason)
        self.close()

    def stop(self) -> None:
        """Server shutdown: stop reading, finish what was received, flush, close."""
        if self.closed:
            return
        if self.negotiating:
            self.close()
            return
        self._drop_payload("server stopping: WRITE payload not complete; not written")
        self.end_reason = self.end_reason or "server stopping"
        self._eof = True
        self._maybe_finish()

    def _drop_payload(self, why: str) -> None:
        p = self._payload
        if p is None:
            return
        self._payload = None
        if isinstance(p, _Spliced):
            self._drop_spliced(p, why)
            return
        log.info("%s: %s (%d of %d bytes received)", self.peer, why, p.got, len(p.mv))
        p.mv.release()
        self.worker.buffers.put(p.buf)

    def _drop_parked(self) -> None:
        pool = self.worker.buffers
        while self._parked:
            _cmd, buf, mv = self._parked.popleft()
            if mv is not None:
                mv.release()
            if buf is not None:
                pool.put(buf)

    def close(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove(self.fd)
        try:
            self.sock.close()
        except OSError:
            pass
        if self._payload is not None:
            p, self._payload = self._payload, None
            if isinstance(p, _Payload):
                p.mv.release()
                self.worker.buffers.put(p.buf)
        self._drop_parked()
        for item in self._wq:
            if callable(item):
                item()
        self._wq.clear()
        self._wq_bytes = 0
        self._close_own()
        self.worker.connection_closed(self)

    # --- events ---------------------------------------------------------------------

    def _on_event(self, ev: int) -> None:
        self._guarded(self._handle_event, ev)

    def _handle_event(self, ev: int) -> None:
        if ev & EPOLLOUT:
            self._flush_wq()
            if self.closed:
                return
        if ev & EPOLLIN or (ev & (EPOLLERR | EPOLLHUP) and not ev & EPOLLOUT):
            self._on_readable()

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn``; whatever goes wrong ends this connection only, with a clear log."""
        try:
            fn(*args)
        except PeerProtocolError as exc:
            log.warning("%s: protocol error: %s; dropping connection", self.peer, safe(exc))
            self.end_reason = f"protocol error: {safe(exc, 80)}"
            self.close()
        except ssl.SSLError as exc:
            log.warning("%s: TLS error: %s", self.peer, exc)
            self.close()
        except (ConnectionError, TimeoutError) as exc:
            log.info("%s: connection ended: %s", self.peer, exc or type(exc).__name__)
            self.close()
        except OSError as exc:
            log.info("%s: socket error: %s", self.peer, exc)
            self.close()
        except Exception:  # one connection must never take the worker down
            log.exception("%s: internal error; dropping connection", self.peer)
            self.close()

    def _update_interest(self) -> None:
        if self.closed:
            return
        mask = 0
        if self._wq:
            mask |= EPOLLOUT
        if self._want_read():
            mask |= EPOLLIN
        if mask != self._mask:
            self._mask = mask
            self.loop.modify(self.fd, mask)

    def _want_read(self) -> bool:
        if self._eof or self.phase in (Phase.CLOSING, Phase.CLOSED):
            return False
        if self.phase is Phase.TLS_HANDSHAKE:
            return True
        if self._payload is not None:
            return True
        return self._can_execute()

    def _can_execute(self) -> bool:
        rt = self.runtime
        limit = rt.max_inflight if rt is not None else 1
        return (self._wq_bytes < HIGH_WATER and not self._parked
                and self.inflight < limit and not self.waiting_turn)

    # --- reading ----------------------------------------------------------------------

    def _recv_into(self, mv: memoryview) -> int:
        """Bytes received into ``mv`` (>0), 0 at end of stream; raises BlockingIOError
        when nothing is available."""
        tls = self.tls
        if tls is None:
            return self.sock.recv_into(mv)
        while True:
            try:
                n = int(tls.obj.read(len(mv), mv))
                out = tls.take_output()
                if out:
                    self._send_raw([out])
                return n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return 0
            raw = self.sock.recv(RECV_SIZE)
            if not raw:
                return 0
            tls.incoming.write(raw)

    def _on_readable(self) -> None:  # noqa: C901 - the receive loop: header, payload, spliced payload
        if self.phase is Phase.TLS_HANDSHAKE:
            self._continue_tls_handshake()
            return
        tls = self.tls
        while self._want_read():
            p = self._payload
            if isinstance(p, _Spliced):
                if self._splice_step(p):
                    continue
                break
            try:
                if p is not None:
                    want = len(p.mv) - p.got
                    n = self._recv_into(p.mv[p.got:])
                elif self._header_only:
                    rmv = self._rmv[:32 if self.proto.extended_headers else 28]
                    want = len(rmv)
                    n = self._recv_into(rmv)
                else:
                    want = len(self._rmv)
                    n = self._recv_into(self._rmv)
            except (BlockingIOError, InterruptedError):
                break
            if n == 0:
                self._on_eof()
                return
            self.bytes_in += n
            if p is not None:
                self.proto.payload_received(n)
                p.got += n
                if p.got < len(p.mv):
                    if tls is None and n < want:
                        break  # drained: wait for the next readable event
                    continue
                self._payload = None
                # after a large payload, read only the next request header: its payload
                # then goes straight into its own buffer, not through _rmv and a copy
                self._header_only = p.got >= HEADER_ONLY_AFTER
                self._execute_write(p.cmd, p.buf, p.mv)
            else:
                self.proto.receive_data(self._rmv[:n])
                if self._header_only:
                    self._process()
                    # back to large reads unless that header began another payload
                    self._header_only = self._payload is not None
                    if self.closed:
                        return
                    continue
            self._process()
            if self.closed:
                return
            if tls is None and n < want:
                break  # level-triggered: the loop calls again when more arrives
        self._update_interest()

    def _on_eof(self) -> None:
        self._drop_payload("client closed in the middle of a WRITE payload")
        if self.negotiating:
            log.info("%s: client closed during the handshake", self.peer)
            self.close()
            return
        if self.phase is Phase.TRANSMISSION and self._ending is None:
            log.info("%s: client closed without NBD_CMD_DISC", self.peer)
            self.end_reason = self.end_reason or "client closed without NBD_CMD_DISC"
        self._eof = True
        self._maybe_finish()

    # --- the protocol ---------------------------------------------------------------

    def _process(self) -> None:
        """Handle every event the core can produce from what was received."""
        proto = self.proto
        out: list[OutItem] = []
        try:
            while self.phase is Phase.TRANSMISSION and self._payload is None:
                if not self._can_execute():
                    break
                ev = proto.next_event()
                if ev is NEED_DATA:
                    break
                if type(ev) is Command:
                    self._command(ev, out)
                elif isinstance(ev, InvalidCommand):
                    self.counters.requests += 1
                    self.counters.errors += 1
                    log.debug("%s: refused request: %s", self.peer, safe(ev.message))
                    out.append(proto.error_reply(ev.cookie, ev.error, ev.message, ev.offset))
                elif isinstance(ev, Disconnect | SafeClose):
                    self._ending = ev
                    self.phase = Phase.CLOSING
                else:
                    raise PeerProtocolError(f"unexpected event in transmission: {ev!r}")
            if self.negotiating:
                self._handshake_events()
                if self.phase is Phase.TRANSMISSION:
                    self._process()
                    return
        finally:
            if out and not self.closed:
                self._send(out)
        if self.phase is Phase.CLOSING:
            self._maybe_finish()

    # --- ending -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:  # noqa: C901 - one table of ending cases (DISC, safe close, EOF, stop)
        """After DISC, safe close, EOF or stop: once nothing is in flight, flush and
        close (safe close: reply first)."""
        if self.closed:
            return
        if self.phase is Phase.TRANSMISSION:
            self.phase = Phase.CLOSING
        if self.inflight or self._payload is not None:
            self._update_interest()
            return
        if self._parked:
            if not self._eof:
                self._update_interest()  # held by a filter (paused export, rate limit)
                return
            # the export stays paused but the client is gone: the held requests are
            # dropped unanswered (like requests in flight at a disconnect)
            self._drop_parked()
        ending = self._ending
        if (isinstance(ending, SafeClose) or self._wrote) and not self._final_flush_done:
            if self._final_flushing:
                return
            rt = self.runtime
            if rt is None or rt.read_only:
                self._final_flush_done = True
            elif rt.blocking or rt.slow_sync:
                # fdatasync can take long: not on the loop, other clients keep going
                self._final_flushing = True
                self.inflight += 1
                backend = self.backend
                lock = rt.serial_lock

                def flush() -> OSError | None:
                    if lock is None:
                        return _flush(backend, self._log_bug)
                    with lock:  # serializing thread models: one call at a time
                        return _flush(backend, self._log_bug)

                self.worker.run_in_thread(flush, self._final_flushed)
                return
            else:
                self._final_flush_error = _flush(self.backend, self._log_bug)
                self._final_flush_done = True
        err = self._final_flush_error
        out: list[OutItem] = []
        if isinstance(ending, SafeClose):
            self._ending = None
            self.end_reason = "safe close" if err is None else "safe close failed (flush)"
            if err is None:
                out.append(self.proto.ok_reply(ending.cookie, 0))
                log.info("%s: safe close", self.peer)
            else:
                self.counters.errors += 1
                out.append(self.proto.error_reply(ending.cookie, errno_to_nbd(err.errno),
                                                  f"flush failed: {err}", 0))
                log.warning("%s: safe close failed: flush: %s", self.peer, err)
        else:
            if err is not None:
                log.warning("%s: flush at disconnect failed: %s", self.peer, err)
            if isinstance(ending, Disconnect):
                self._ending = None
                self.end_reason = self.end_reason or "NBD_CMD_DISC"
                log.info("%s: client disconnected (NBD_CMD_DISC)", self.peer)
        if out:
            self._send(out)
        if self._wq:
            self._update_interest()
            return  # the replies leave first; _flush_wq calls back
        if self.tls is not None and self.tls.established:
            try:
                self.tls.obj.unwrap()
            except (ssl.SSLError, OSError, ValueError):
                pass
            data = self.tls.take_output()
            if data:
                try:
                    self.sock.send(data)
                except OSError:
                    pass
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close()

    def _final_flushed(self, err: OSError | None) -> None:
        self._guarded(self._final_flushed_impl, err)

    def _final_flushed_impl(self, err: OSError | None) -> None:
        self.inflight -= 1
        self._final_flushing = False
        self._final_flush_done = True
        self._final_flush_error = err
        if self.closed:  # dropped while flushing: the plugin still hears of the close
            self._close_own()
            return
        self._maybe_finish()

    # --- status ------------------------------------------------------------------------

    def oldest_request_age(self, now: float) -> float:
        busy = self.busy
        return now - min(busy.values()) if busy else 0.0

    def describe(self, now: float) -> dict[str, Any]:
        return {"peer": self.peer, "export": self.export_name, "tls": self.tls is not None,
                "state": "negotiating" if self.negotiating else "negotiated",
                "connected_seconds": round(now - self.started, 3)}


def _flush(backend: Any, bug: Callable[[Cmd, BaseException], None]) -> OSError | None:
    """The FLUSH when a client leaves; a backend bug (``bug`` logs it) is EIO."""
    try:
        backend.flush()
    except OSError as exc:
        return exc
    except BaseException as exc:
        bug(Cmd.FLUSH, exc)
        return OSError(errno.EIO, f"internal error in the backend: {safe(exc)}")
    return None
