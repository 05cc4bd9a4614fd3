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
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pynbd.backends.base import STATE_HOLE, Extent, ThreadModel
from pynbd.filters.base import Verdict
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, CmdFlag, Errno, errno_to_nbd
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import (
    NEED_DATA,
    Aborted,
    Command,
    Disconnect,
    ExportSelected,
    InvalidCommand,
    OptionHandled,
    SafeClose,
    ServerConnection,
    StartTLS,
)
from pynbd.server.buffers import Buffer
from pynbd.server.logsafe import safe
from pynbd.server.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT

if TYPE_CHECKING:
    from pynbd.server.worker import ExportRuntime, Worker

log = logging.getLogger("pynbd.server")

RECV_SIZE = 256 * 1024
HANDSHAKE_RECV = 4096
#: reads at least this large are checked for holes (structured replies only)
SPARSE_READ_MIN = 64 * 1024
#: reads at least this large are sent on their own (sendfile or a pooled buffer)
BIG_REPLY = 64 * 1024
MAX_IOV = 512
#: stop reading and executing while this many reply bytes wait for the socket
HIGH_WATER = 8 * 1024 * 1024

# plain ints on the request path: ``int & IntFlag`` builds a new flag object (~2 us)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_DF = int(CmdFlag.DF)
_ZEROS = bytes(1024 * 1024)
_AIO_COMMANDS = frozenset((Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES))

OutItem = Any  # bytes | bytearray | memoryview | _FileSlice | Callable[[], None]


class Phase(enum.Enum):
    HANDSHAKE = "handshake"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    CLOSING = "closing"  # DISC/safe close received: finish, flush, close
    CLOSED = "closed"


class _FileSlice:
    """``length`` bytes of file ``fd`` at ``offset``, sent with os.sendfile."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length


class _Payload:
    """A WRITE whose payload is still arriving."""

    __slots__ = ("buf", "cmd", "got", "mv")

    def __init__(self, cmd: Command, buf: Buffer, mv: memoryview, got: int) -> None:
        self.cmd = cmd
        self.buf = buf
        self.mv = mv
        self.got = got


class Counters:
    __slots__ = ("bytes_read", "bytes_written", "errors", "requests")

    def __init__(self) -> None:
        self.bytes_read = 0
        self.bytes_written = 0
        self.requests = 0
        self.errors = 0

    def add(self, other: Counters) -> None:
        self.bytes_read += other.bytes_read
        self.bytes_written += other.bytes_written
        self.requests += other.requests
        self.errors += other.errors

    def as_dict(self) -> dict[str, int]:
        return {"bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "requests": self.requests, "errors": self.errors}


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


class Connection:
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
        self._wq: deque[OutItem] = deque()
        self._wq_bytes = 0
        self._mask = 0
        self._payload: _Payload | None = None
        self._parked: deque[tuple[Command, Buffer | None, memoryview | None]] = deque()
        self.inflight = 0
        #: cookie -> monotonic start, for requests on worker threads (killswitch)
        self.busy: dict[int, float] = {}
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

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def negotiating(self) -> bool:
        return self.phase in (Phase.HANDSHAKE, Phase.TLS_HANDSHAKE)

    @property
    def export_name(self) -> str | None:
        return self.runtime.name if self.runtime is not None else None

    def _handshake_expired(self) -> None:
        if self.negotiating:
            log.info("%s: handshake deadline passed; dropping connection", self.peer)
            self.close()

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
            self.worker.turn_done(rt, self)  # SERIALIZE_CONNECTIONS: the next one's turn

        if rt.blocking:
            self.worker.run_in_thread(close, closed)
        else:
            close()
            closed()

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

    def _on_readable(self) -> None:
        if self.phase is Phase.TLS_HANDSHAKE:
            self._continue_tls_handshake()
            return
        tls = self.tls
        while self._want_read():
            p = self._payload
            try:
                if p is not None:
                    want = len(p.mv) - p.got
                    n = self._recv_into(p.mv[p.got:])
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
                self._execute_write(p.cmd, p.buf, p.mv)
            else:
                self.proto.receive_data(self._rmv[:n])
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
        self.worker.connection_negotiated(self)
        log.info("%s: export %s selected (structured replies %s, extended headers %s, "
                 "flags 0x%x)", self.peer, safe(rt.name), ev.structured_replies,
                 ev.extended_headers, ev.flags)
        if rt.thread_model is ThreadModel.SERIALIZE_CONNECTIONS:
            if rt.turn is not None:
                # served (and opened in the plugin) once the connections before it
                # have closed
                self.waiting_turn = True
                rt.turn_queue.append(self)
                return
            rt.turn = self
        self._open_own(resume=False)

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

    # --- sending --------------------------------------------------------------------

    def _send(self, bufs: list[OutItem]) -> None:
        if self.closed:
            for item in bufs:
                if callable(item):
                    item()
            return
        if self.tls is not None and self.tls.established:
            # encrypt in order; release callbacks run once the ciphertext is queued
            plain = [b for b in bufs if not callable(b)]
            cbs = [b for b in bufs if callable(b)]
            self._send_raw([self.tls.encrypt(plain), *cbs])
            return
        self._send_raw(bufs)

    def _send_raw(self, bufs: list[OutItem]) -> None:  # noqa: C901 - per-reply hot path, kept in one frame; the lead owns this file
        wq = self._wq
        if wq:
            for b in bufs:
                wq.append(b)
                if not callable(b):
                    self._wq_bytes += b.length if type(b) is _FileSlice else len(b)
            return
        # fast path: nothing queued, every item plain bytes (sendmsg refuses anything
        # else with TypeError before sending a byte): one call, no per-item Python
        if len(bufs) <= MAX_IOV:
            try:
                sent = self.sock.sendmsg(bufs)
            except TypeError:
                pass
            except (BlockingIOError, InterruptedError):
                sent = 0
                bufs = list(bufs)
                self._queue_rest(bufs, 0, 0)
                return
            except OSError as exc:
                self._send_failed(exc)
                return
            else:
                if sent == sum(map(len, bufs)):
                    return
                self._queue_rest(bufs, 0, sent)
                return
        i = 0
        n = len(bufs)
        while i < n:
            item = bufs[i]
            if callable(item):
                item()
                i += 1
                continue
            if type(item) is _FileSlice:
                if not self._sendfile(item):
                    break
                i += 1
                continue
            j = i
            batch: list[OutItem] = []
            while j < n and j - i < MAX_IOV:
                b = bufs[j]
                if callable(b) or type(b) is _FileSlice:
                    break
                batch.append(b)
                j += 1
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._send_failed(exc)
                for b in bufs[i:]:
                    if callable(b):
                        b()
                return
            k = i
            while k < j:
                ln = len(bufs[k])
                if sent >= ln:
                    sent -= ln
                    k += 1
                else:
                    break
            if k < j:
                if sent:
                    bufs[k] = memoryview(bufs[k]).cast("B")[sent:]
                i = k
                break
            i = j
        if i < n:
            for b in bufs[i:]:
                wq.append(b)
                if not callable(b):
                    self._wq_bytes += b.length if type(b) is _FileSlice else len(b)
            self._update_interest()

    def _queue_rest(self, bufs: list[OutItem], i: int, sent: int) -> None:
        """Queue what ``sendmsg`` did not take of plain ``bufs[i:]``."""
        wq = self._wq
        for b in bufs[i:]:
            ln = len(b)
            if sent >= ln:
                sent -= ln
                continue
            if sent:
                b = memoryview(b).cast("B")[sent:]
                sent = 0
            wq.append(b)
            self._wq_bytes += len(b)
        self._update_interest()

    def _sendfile(self, item: _FileSlice) -> bool:
        """Send what the socket takes of ``item``; True when all of it is sent."""
        while item.length:
            try:
                if item.fd < 0:
                    n = self.sock.send(_ZEROS[:min(item.length, len(_ZEROS))])
                else:
                    n = os.sendfile(self.fd, item.fd, item.offset, item.length)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._send_failed(exc)
                return True
            if n == 0 and item.fd >= 0:
                item.fd = -1  # the file shrank underneath us: the rest reads as zeros
                continue
            item.offset += n
            item.length -= n
        return True

    def _send_failed(self, exc: OSError) -> None:
        log.info("%s: send failed: %s", self.peer, exc)
        self.loop.call_soon(self.close)

    def _flush_wq(self) -> None:  # noqa: C901 - per-reply hot path (each item kind sent its own way); the lead owns this file
        wq = self._wq
        while wq and not self.closed:
            item = wq[0]
            if callable(item):
                wq.popleft()
                item()
                continue
            if type(item) is _FileSlice:
                before = item.length
                done = self._sendfile(item)
                self._wq_bytes -= before - item.length
                if not done:
                    break
                wq.popleft()
                continue
            batch: list[OutItem] = []
            for b in wq:
                if callable(b) or type(b) is _FileSlice or len(batch) >= MAX_IOV:
                    break
                batch.append(b)
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._send_failed(exc)
                return
            self._wq_bytes -= sent
            while sent:
                b = wq[0]
                ln = len(b)
                if sent >= ln:
                    sent -= ln
                    wq.popleft()
                else:
                    wq[0] = memoryview(b).cast("B")[sent:]
                    sent = 0
                    break
            else:
                continue
            break
        if self.closed:
            return
        if not wq:
            if self.phase is Phase.CLOSING or self._eof:
                self._maybe_finish()
                if self.closed:
                    return
            elif self._payload is None and self._can_execute():
                self._process()
        self._update_interest()

    # --- requests ---------------------------------------------------------------------

    def _command(self, ev: Command, out: list[OutItem]) -> None:
        self.counters.requests += 1
        cmd = ev.cmd
        # identity tests: an Enum's __hash__ is Python code (a set lookup costs ~0.3 us)
        if cmd is Cmd.WRITE or cmd is Cmd.TRIM or cmd is Cmd.WRITE_ZEROES:
            self._wrote = True
        if ev.cmd is Cmd.WRITE and ev.length:
            buf = self.worker.buffers.get(ev.length)
            mv = memoryview(buf)[:ev.length]
            got = self.proto.payload_into(mv)
            if got < ev.length:
                self._payload = _Payload(ev, buf, mv, got)
                if out:
                    self._send(out)
                    out.clear()
                return
            self._dispatch(ev, buf, mv, out)
            return
        self._dispatch(ev, None, None, out)

    def _execute_write(self, ev: Command, buf: Buffer, mv: memoryview) -> None:
        """A WRITE whose payload has just arrived."""
        out: list[OutItem] = []
        self._dispatch(ev, buf, mv, out)
        if out:
            self._send(out)

    def _dispatch(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                  out: list[OutItem], front: bool = False) -> bool:
        """Admission (if a filter asks for it), then run the request inline or start it
        on a thread. False when it was held (parked) instead."""
        rt = self.runtime
        assert rt is not None
        if self._debug:
            log.debug("%s: %s offset %d length %d flags 0x%x cookie %d", self.peer,
                      ev.cmd.name, ev.offset, ev.length, ev.flags, ev.cookie)
        if rt.admits:
            a = self.backend.admit(ev.cmd.name, ev.offset, ev.length, time.monotonic())
            if a.verdict is Verdict.WAIT:
                if out:
                    self._send(out)
                    out.clear()
                if front:
                    self._parked.appendleft((ev, buf, mv))
                else:
                    self._parked.append((ev, buf, mv))
                rt.parked_connections.add(self)
                if a.delay is not None:
                    self.loop.call_later(a.delay, self.unpark)
                return False
            if a.verdict is Verdict.REFUSE:
                self._release(buf, mv)
                self.counters.errors += 1
                out.append(self.proto.error_reply(ev.cookie, a.errno, a.message, ev.offset))
                return True
        if rt.blocking or (rt.slow_sync and (ev.cmd is Cmd.FLUSH or ev.flags & _FUA)):
            self._submit(ev, buf, mv)
        elif mv is not None:
            try:
                self._do_write(ev, mv, out)
            finally:
                self._release(buf, mv)
        else:
            self._execute(ev, out)
        return True

    def _release(self, buf: Buffer | None, mv: memoryview | None) -> None:
        if mv is not None:
            mv.release()
        if buf is not None:
            self.worker.buffers.put(buf)

    def unpark(self) -> None:
        """A filter that held requests lets them go (resumed, or its delay passed)."""
        self._guarded(self._unpark)

    def _unpark(self) -> None:
        if self.runtime is None or self.closed:
            return
        out: list[OutItem] = []
        while self._parked:
            ev, buf, mv = self._parked.popleft()
            if not self._dispatch(ev, buf, mv, out, front=True):
                break
        if out:
            self._send(out)
        if not self._parked and not self.closed:
            if self.phase is Phase.CLOSING or self._eof:
                self._maybe_finish()
                return
            self._process()
            self._update_interest()

    def _do_write(self, ev: Command, mv: memoryview, out: list[OutItem]) -> None:
        try:
            self.backend.pwrite(mv, ev.offset, bool(ev.flags & _FUA))
            self.counters.bytes_written += ev.length
            out.append(self.proto.ok_reply(ev.cookie, ev.offset))
        except OSError as exc:
            out.append(self._error(ev, exc))
        except BaseException as exc:
            out.append(self._bug(ev, exc))

    def _execute(self, ev: Command, out: list[OutItem]) -> None:
        """Run one request inline and append its reply to ``out``."""
        cmd = ev.cmd
        if cmd is Cmd.READ:
            self._read(ev, out)
            return
        backend = self.backend
        proto = self.proto
        try:
            if cmd is Cmd.FLUSH:
                backend.flush()
            elif cmd is Cmd.TRIM:
                backend.trim(ev.offset, ev.length, bool(ev.flags & _FUA))
            elif cmd is Cmd.WRITE_ZEROES:
                backend.zero(ev.offset, ev.length,
                             may_trim=not ev.flags & _NO_HOLE,
                             fast=bool(ev.flags & _FAST_ZERO),
                             fua=bool(ev.flags & _FUA))
            elif cmd is Cmd.CACHE:
                backend.cache(ev.offset, ev.length)
            elif cmd is Cmd.BLOCK_STATUS:
                out.extend(self._block_status_chunks(ev))
                return
            elif cmd is Cmd.WRITE:  # zero-length write
                backend.pwrite(memoryview(b""), ev.offset, bool(ev.flags & _FUA))
            else:  # pragma: no cover - the core validated the command
                out.append(proto.error_reply(ev.cookie, Errno.EINVAL, "unsupported", ev.offset))
                return
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        except BaseException as exc:
            out.append(self._bug(ev, exc))
            return
        out.append(proto.ok_reply(ev.cookie, ev.offset))

    def _bug(self, ev: Command, exc: BaseException) -> bytes:
        """The backend raised something other than OSError (even SystemExit): EIO for
        this request; the connection and the server carry on. The traceback is logged
        once per kind."""
        self.counters.errors += 1
        self._log_bug(ev.cmd, exc)
        return self.proto.error_reply(ev.cookie, Errno.EIO,
                                      f"{ev.cmd.name} failed: internal error in the backend",
                                      ev.offset)

    def _log_bug(self, cmd: Cmd, exc: BaseException) -> None:
        """Log a backend bug: with its traceback the first time this kind (command,
        exception class) happens on the export, in one debug line afterwards."""
        rt = self.runtime
        key = (cmd, type(exc))
        if rt is not None and key not in rt.bugs_logged:
            rt.bugs_logged.add(key)
            log.error("%s: the backend raised %s in %s: %s (a bug in the backend; the "
                      "client gets EIO)", self.peer, type(exc).__name__, cmd.name,
                      safe(exc), exc_info=exc)
        else:
            log.debug("%s: backend raised %s in %s: %s", self.peer, type(exc).__name__,
                      cmd.name, safe(exc))

    def _error(self, ev: Command, exc: OSError) -> bytes:
        self.counters.errors += 1
        err = errno_to_nbd(exc.errno)
        if ev.cmd is Cmd.WRITE_ZEROES and ev.flags & _FAST_ZERO and err == Errno.ENOTSUP:
            log.debug("%s: fast zero refused", self.peer)
        else:
            log.warning("%s: %s offset %d length %d failed: %s", self.peer, ev.cmd.name,
                        ev.offset, ev.length, exc)
        return self.proto.error_reply(ev.cookie, err,
                                      f"{ev.cmd.name} failed: {exc.strerror or exc}", ev.offset)

    def _block_status_chunks(self, ev: Command) -> list[bytes]:
        """Status chunks for the contexts the request asks about (every selected one, or
        those its payload named under extended headers)."""
        rt = self.runtime
        assert rt is not None
        names = self.proto.meta_contexts
        per: dict[int, list[tuple[int, int]]] = {}
        base: list[tuple[int, int]] | None = None
        for cid in ev.contexts:
            name = names.get(cid, "")
            if name == BASE_ALLOCATION:
                if base is None:
                    base = self._block_status(self.backend.extents(ev.offset, ev.length), ev)
                per[cid] = base
            else:
                per[cid] = self._block_status(rt.context_extents(name, ev.offset, ev.length),
                                              ev)
        return self.proto.block_status_reply(ev.cookie, (), contexts=ev.contexts,
                                             req_offset=ev.offset, per_context=per)

    @staticmethod
    def _block_status(extents: list[Extent], ev: Command) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        left = ev.length
        for e in extents:
            if left <= 0:
                break
            n = min(e.length, left)
            if n <= 0:
                break
            out.append((n, e.flags))
            left -= n
            if ev.flags & _REQ_ONE:
                break
        if not out:
            raise OSError(errno.EIO, "backend returned no extents")
        return out

    def _read(self, ev: Command, out: list[OutItem]) -> None:
        try:
            self._read_inline(ev, out)
        except BaseException as exc:
            out.append(self._bug(ev, exc))

    def _read_inline(self, ev: Command, out: list[OutItem]) -> None:
        rt = self.runtime
        assert rt is not None
        backend = self.backend
        proto = self.proto
        length, offset, cookie = ev.length, ev.offset, ev.cookie
        if (length >= SPARSE_READ_MIN and self.structured and rt.can_extents
                and not ev.flags & _DF):
            extents = self._read_extents(ev)
            if extents is not None:
                self._sparse_read(ev, extents, out)
                return
        if length >= BIG_REPLY:
            if not backend.resident(offset, length):
                self._submit(ev, None, None)  # not in the page cache: read on a thread
                return
            if self._sendfile_ok:
                out.append(proto.read_reply_header(cookie, offset, length))
                out.append(_FileSlice(self._sendfile_fd, offset, length))
                self.counters.bytes_read += length
                return
            pool = self.worker.buffers
            buf = pool.get(length)
            mv = memoryview(buf)[:length]
            try:
                backend.pread_into(mv, offset)
            except BaseException as exc:
                mv.release()
                pool.put(buf)
                out.append(self._error(ev, exc) if isinstance(exc, OSError)
                           else self._bug(ev, exc))
                return
            out.append(proto.read_reply_header(cookie, offset, length))
            out.append(mv)
            out.append(_releaser(pool, buf, mv))
            self.counters.bytes_read += length
            return
        data = bytearray(length)
        try:
            if not backend.pread_nowait(memoryview(data), offset):
                self._submit(ev, None, None)  # not in the page cache: read on a thread
                return
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        out.append(proto.read_reply_header(cookie, offset, length))
        out.append(data)
        self.counters.bytes_read += length

    def _read_extents(self, ev: Command) -> list[Extent] | None:
        """The extents of a large READ if some of it is a hole (sent as hole chunks),
        else None. Extents are only a hint here: if the backend fails or answers
        nonsense, the whole range is read."""
        try:
            extents = self.backend.extents(ev.offset, ev.length)
            if not isinstance(extents, list) or not all(
                    type(e) is Extent and type(e.length) is int and e.length > 0
                    and type(e.flags) is int for e in extents):
                raise TypeError(f"extents() returned {safe(repr(extents)[:100])}, not a "
                                "list of Extent with lengths > 0")
        except OSError:
            return None
        except BaseException as exc:
            self._log_bug(Cmd.BLOCK_STATUS, exc)
            return None
        if any(e.flags & STATE_HOLE for e in extents):
            return extents
        return None

    def _sparse_read(self, ev: Command, extents: list[Extent], out: list[OutItem]) -> None:
        rt = self.runtime
        assert rt is not None
        proto = self.proto
        end = ev.offset + ev.length
        pos = ev.offset
        pieces: list[tuple[int, int, bool]] = []
        for e in extents:
            if pos >= end:
                break
            n = min(e.length, end - pos)
            hole = bool(e.flags & STATE_HOLE)
            if pieces and pieces[-1][2] == hole:
                p = pieces[-1]
                pieces[-1] = (p[0], p[1] + n, hole)
            else:
                pieces.append((pos, n, hole))
            pos += n
        if pos < end:  # extents stopped short: the rest is data
            if pieces and not pieces[-1][2]:
                p = pieces[-1]
                pieces[-1] = (p[0], p[1] + end - pos, False)
            else:
                pieces.append((pos, end - pos, False))
        pool = self.worker.buffers
        chunks: list[OutItem] = []
        for i, (off, n, hole) in enumerate(pieces):
            last = i == len(pieces) - 1
            if hole:
                chunks.append(proto.hole_chunk(ev.cookie, off, n, last, ev.offset))
                continue
            if self._sendfile_ok and n >= BIG_REPLY:
                chunks.append(proto.read_reply_header(ev.cookie, off, n, done=last,
                                                      req_offset=ev.offset))
                chunks.append(_FileSlice(self._sendfile_fd, off, n))
                continue
            buf = pool.get(n)
            mv = memoryview(buf)[:n]
            try:
                self.backend.pread_into(mv, off)
            except BaseException as exc:
                mv.release()
                pool.put(buf)
                # the chunks built so far are dropped: one error reply for the request
                for c in chunks:
                    if callable(c):
                        c()
                out.append(self._error(ev, exc) if isinstance(exc, OSError)
                           else self._bug(ev, exc))
                return
            chunks.append(proto.read_reply_header(ev.cookie, off, n, done=last,
                                                  req_offset=ev.offset))
            chunks.append(mv)
            chunks.append(_releaser(pool, buf, mv))
        out.extend(chunks)
        self.counters.bytes_read += ev.length

    # --- worker threads (blocking backends) -----------------------------------------

    def _submit(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None:
        rt = self.runtime
        assert rt is not None
        self.inflight += 1
        rt.active += 1
        rt.begin(self, ev.cookie)
        self.busy[ev.cookie] = time.monotonic()
        if rt.aio and ev.cmd in _AIO_COMMANDS:
            self._submit_aio(ev, buf, mv)
            return
        self.worker.run_blocking(self._blocking_call, ev, buf, mv, self._completed)

    def _submit_aio(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None:
        """Start a request on a backend with an asynchronous interface (librbd aio):
        the call returns at once, the completion comes back on the loop."""
        backend = self.backend
        cmd = ev.cmd
        loop = self.loop
        if cmd is Cmd.READ:
            buf = self.worker.buffers.get(ev.length)
            mv = memoryview(buf)[:ev.length]
        fua = bool(ev.flags & _FUA)

        def done(err: OSError | None, data: Any = None) -> None:  # any thread
            loop.call_soon_threadsafe(lambda: self._aio_done(ev, buf, mv, err, data))

        try:
            if cmd is Cmd.READ:
                assert mv is not None
                backend.aio_pread(mv, ev.offset, done)
            elif cmd is Cmd.WRITE:
                backend.aio_pwrite(mv if mv is not None else memoryview(b""), ev.offset, fua,
                                   done)
            elif cmd is Cmd.FLUSH:
                backend.aio_flush(done)
            elif cmd is Cmd.TRIM:
                backend.aio_trim(ev.offset, ev.length, fua, done)
            else:
                backend.aio_zero(ev.offset, ev.length, not ev.flags & _NO_HOLE,
                                 bool(ev.flags & _FAST_ZERO), fua, done)
        except OSError as exc:
            done(exc)
        except BaseException as exc:
            self._log_bug(cmd, exc)
            done(OSError(errno.EIO, "internal error in the backend"))

    def _aio_done(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                  err: OSError | None, data: Any = None) -> None:
        self._guarded(self._aio_done_impl, ev, buf, mv, err, data)

    def _aio_done_impl(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                       err: OSError | None, data: Any = None) -> None:
        out: list[OutItem] = []
        cmd = ev.cmd
        if err is not None:
            out.append(self._error(ev, err))
        elif cmd is Cmd.READ and data is not None:
            # the backend handed over a buffer of its own (buf stayed untouched)
            if len(data) != ev.length:
                out.append(self._error(ev, OSError(
                    errno.EIO, f"backend returned {len(data)} bytes for a {ev.length}-byte "
                    "read")))
            else:
                out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
                out.append(data)
                self.counters.bytes_read += ev.length
        elif cmd is Cmd.READ and buf is not None and mv is not None:
            out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
            out.append(mv)
            out.append(_releaser(self.worker.buffers, buf, mv))
            self.counters.bytes_read += ev.length
            buf = mv = None  # released once sent
        else:
            if cmd is Cmd.WRITE:
                self.counters.bytes_written += ev.length
            out.append(self.proto.ok_reply(ev.cookie, ev.offset))
        self._completed_impl(ev, buf, mv, out)

    def _blocking_call(self, ev: Command, mv: memoryview | None) -> list[OutItem]:
        """Runs on a worker thread: the backend call and its reply bytes (always one
        reply, whatever the backend does)."""
        out: list[OutItem] = []
        lock = self._serial
        if lock is not None:
            lock.acquire()
        try:
            if mv is not None:
                self._do_write(ev, mv, out)
            elif ev.cmd is Cmd.READ:
                self._read_threaded(ev, out)
            else:
                self._execute(ev, out)
        except BaseException as exc:
            out = [self._bug(ev, exc)]
        finally:
            if lock is not None:
                lock.release()
        return out

    def _read_threaded(self, ev: Command, out: list[OutItem]) -> None:
        data = bytearray(ev.length)
        try:
            self.backend.pread_into(memoryview(data), ev.offset)
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        except BaseException as exc:
            out.append(self._bug(ev, exc))
            return
        out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
        out.append(data)
        self.counters.bytes_read += ev.length

    def _completed(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                   out: list[OutItem]) -> None:
        self._guarded(self._completed_impl, ev, buf, mv, out)

    def _completed_impl(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                        out: list[OutItem]) -> None:
        """Back on the loop: send the reply of a request that ran on a thread."""
        rt = self.runtime
        assert rt is not None
        self.inflight -= 1
        rt.active -= 1
        rt.end(self, ev.cookie)
        self.busy.pop(ev.cookie, None)
        if mv is not None:
            mv.release()
        if buf is not None:
            self.worker.buffers.put(buf)
        if rt.active == 0:
            rt.quiesced()
        if self.closed:
            self._close_own()
            return
        if out:
            self._send(out)
        if self.phase is Phase.CLOSING or self._eof:
            self._maybe_finish()
            return
        if self._payload is None and self._can_execute():
            self._process()
        self._update_interest()

    # --- ending -------------------------------------------------------------------------

    def _maybe_finish(self) -> None:  # noqa: C901 - one table of ending cases (DISC, safe close, EOF, stop); the lead owns this file
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


def _releaser(pool: Any, buf: Buffer, mv: memoryview) -> Callable[[], None]:
    def release() -> None:
        mv.release()
        pool.put(buf)
    return release
