"""Blocking NBD client with its own fast path on blocking sockets.

go-nbd's shape::

    c = Client.dial("nbd://127.0.0.1/disk")    # transport
    c.connect()                                 # handshake (+ STARTTLS for nbds://)
    c.extended_headers() or c.structured_replies()
    c.set_meta_context("base:allocation")
    c.go()                                      # transmission phase
    data = c.read(0, 4096)
    c.close()                                   # safe close, reports whether it was safe

Read data is received with ``recv_into`` straight into the caller's buffer; a write is
one ``sendmsg([header, payload])``. Many requests can be in flight: ``submit_*`` return
a :class:`Request`, collected with :meth:`Client.wait`, :meth:`Client.wait_any` or
:meth:`Client.wait_all` (or ``with client.batch():``). A client is not thread-safe; use
one per thread (see :mod:`pynbd.client.pool`).

A read with a :class:`ReadSink` has no buffer: each chunk is handed to the sink while
its payload is still in the socket, and :meth:`Client.submit_write_from` on another
connection can take it from there with ``splice(2)`` (the data never enters Python).

Pipelining note: the client sends from the calling thread and only reads replies while
waiting, so keep the bytes in flight bounded (a server that blocks writing large read
replies while a large write payload is being sent could otherwise stall both sides).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, cast

from pynbd.client._common import (
    DEFAULT_INFOS,
    Chunk,
    CloseResult,
    Extent,
    FlagsMixin,
    as_uri,
    check_option,
    dial_socket,
    effect_pieces,
    extents_by_name,
    info_data,
    list_result,
    max_request_for,
    meta_data,
    meta_result,
    payload_contexts,
    probe_ok,
    request_error,
)
from pynbd.client._splice import Mover
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI
from pynbd.protocol.client import (
    NEED_DATA,
    BlockStatusChunk,
    ClientConnection,
    ExportEntry,
    ExportInfo,
    Handshake,
    MetaContext,
    OptionDone,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
    State,
)
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    MAX_PAYLOAD,
    Cmd,
    CmdFlag,
    Opt,
    TransmissionFlag,
)
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, PeerProtocolError

if TYPE_CHECKING:  # ssl is imported only when TLS is used (start-up time)
    import ssl

_List = list  # Client.list() shadows the builtin inside the class
_RECV_SIZE = 256 * 1024
_ZEROES = bytes(1024 * 1024)
_ESHUTDOWN = 108  # NBD_ESHUTDOWN
_EINVAL, _EOVERFLOW = errno.EINVAL, errno.EOVERFLOW  # host errno of NBDRequestError
_WAITALL = socket.MSG_WAITALL
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
#: receive size while sink reads are in flight: small, so that little payload is pulled
#: into user space ahead of the sink (what is, reaches it as ``head``), yet large enough
#: for a block status reply or a run of small replies in one call
_SINK_RECV = 4096

# plain ints: IntFlag arithmetic is a Python-level call on the hot path
_CMD_NEEDS: dict[int, int] = {
    int(Cmd.FLUSH): int(TransmissionFlag.SEND_FLUSH),
    int(Cmd.TRIM): int(TransmissionFlag.SEND_TRIM),
    int(Cmd.WRITE_ZEROES): int(TransmissionFlag.SEND_WRITE_ZEROES),
    int(Cmd.CACHE): int(TransmissionFlag.SEND_CACHE),
}
_FLAG_NEEDS: dict[int, tuple[int, str]] = {
    int(CmdFlag.FUA): (int(TransmissionFlag.SEND_FUA), "FUA"),
    int(CmdFlag.DF): (int(TransmissionFlag.SEND_DF), "DF"),
    int(CmdFlag.FAST_ZERO): (int(TransmissionFlag.SEND_FAST_ZERO), "FAST_ZERO"),
}
_WRITES = (int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES))
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
_RW = (int(Cmd.READ), int(Cmd.WRITE))
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FLUSH = int(Cmd.FLUSH)


def _zero_fill(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        k = min(n - pos, len(_ZEROES))
        view[pos:pos + k] = _ZEROES[:k]
        pos += k


class ReadSink(Protocol):
    """Receives a read reply's payload without a buffer (``submit_read(..., sink=)``).

    ``data`` is called for each data chunk: ``head`` holds the first bytes of the chunk
    that the client had already received; the remaining ``length - len(head)`` bytes
    are waiting on the descriptor ``fd`` (the connection's socket) and ``data`` must
    consume exactly that many bytes from it before returning (for example with
    :meth:`Client.submit_write_from` on another connection). Over TLS, ``head`` is the
    whole chunk and ``fd`` is -1. ``hole`` is called for each chunk that reads as zeroes.
    An exception from either breaks the connection (the stream position is unknown).
    """

    def data(self, offset: int, length: int, head: memoryview, fd: int) -> None: ...

    def hole(self, offset: int, length: int) -> None: ...


class Request:
    """A request in flight (or completed) on a :class:`Client`."""

    __slots__ = ("chunks", "cmd", "cookie", "done", "error", "extents", "length", "offset",
                 "sink", "view", "want", "zeroed")

    def __init__(self, cookie: int, cmd: int, offset: int, length: int,
                 view: memoryview | None = None, zeroed: bool = False,
                 chunks: list[Chunk] | None = None, sink: ReadSink | None = None) -> None:
        self.cookie = cookie
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.view = view
        self.zeroed = zeroed
        self.chunks = chunks
        self.sink = sink
        self.extents: dict[int, tuple[tuple[int, int], ...]] | None = None
        #: context names a block status asked for (None: all)
        self.want: tuple[str, ...] | None = None
        self.done = False
        self.error: NBDRequestError | None = None

    def __repr__(self) -> str:
        state = "error" if self.error else ("done" if self.done else "pending")
        return f"<Request {self.cookie} cmd={self.cmd} {self.offset}+{self.length} {state}>"


class Client(FlagsMixin):
    """One NBD connection driven with blocking sockets."""

    def __init__(self, sock: socket.socket, uri: NBDURI | None = None, *,
                 tls: TLSConfig | None = None, strict: bool = True) -> None:
        # an ssl.SSLSocket after STARTTLS (self._tls)
        self._sock: socket.socket = sock
        self.uri = uri
        self._tls_config = tls
        self.strict = strict
        self._conn = ClientConnection()
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._ops: dict[int, Request] = {}
        self._sinks = 0  # sink reads in flight
        self._mover: Mover | None = None
        self._tls = False
        self._broken: BaseException | None = None
        self._closed = False
        self.close_result: CloseResult | None = None
        self.export: ExportInfo | None = None
        self.handshake_flags = 0
        self.max_request = MAX_PAYLOAD
        #: an NBD_ESHUTDOWN reply arrived: the spec wants a soft disconnect now
        self.server_shutting_down = False

    # --- transport ------------------------------------------------------------------

    @classmethod
    def dial(cls, uri: str | NBDURI, *, timeout: float | None = None,
             tls: TLSConfig | None = None, strict: bool = True) -> Client:
        """Open the transport (TCP or Unix socket) named by ``uri``."""
        u = as_uri(uri)
        sock = dial_socket(u, timeout)
        if tls is None and u.tls:
            tls = TLSConfig.from_uri(u)
        return cls(sock, u, tls=tls, strict=strict)

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def state(self) -> State:
        return self._conn.state

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def structured(self) -> bool:
        """Replies come in chunks: structured replies or extended headers negotiated."""
        return self._conn.chunked

    @property
    def extended(self) -> bool:
        """NBD_OPT_EXTENDED_HEADERS was negotiated (32-byte headers, 64-bit lengths)."""
        return self._conn.extended_headers

    @property
    def meta_contexts(self) -> dict[int, str]:
        return dict(self._conn.meta_contexts)

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    def _fill(self) -> None:
        # with sink reads in flight, take little more than a reply header at a time so
        # that payload stays in the socket for the sink (not worth it over TLS)
        n = self._sock.recv_into(self._rview, _SINK_RECV if self._sinks and not self._tls
                                 else _RECV_SIZE)
        if not n:
            self._conn.connection_closed()
            raise PeerProtocolError("server closed the connection")
        self._conn.receive_data(self._rview[:n])

    def _recv_exact(self, view: memoryview) -> None:
        want = len(view)
        pos = 0
        flags = 0 if self._tls else _WAITALL
        sock = self._sock
        while pos < want:
            n = sock.recv_into(view[pos:], want - pos, flags)
            if not n:
                self._conn.payload_received(pos)
                self._conn.connection_closed()
                raise PeerProtocolError("server closed the connection")
            pos += n

    def _sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def _send_payload(self, header: bytes, payload: memoryview) -> None:
        if self._tls:
            self._sock.sendall(header)
            self._sock.sendall(payload)
            return
        total = len(header) + len(payload)
        sock = self._sock
        sent = sock.sendmsg([header, payload])
        if sent < total:
            if sent < len(header):
                self._sock.sendall(header[sent:])
                sent = len(header)
            self._sock.sendall(payload[sent - len(header):])

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        self._hard_close()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise PeerProtocolError(f"connection is unusable after an earlier error: "
                                    f"{self._broken}") from self._broken
        if self._closed:
            raise LocalProtocolError("connection is closed")

    def _hard_close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._sock.close()
            if self._mover is not None:
                self._mover.close()

    def hard_close(self) -> None:
        """Close the transport now (go-nbd's Conn.Close): no goodbye to the server."""
        self._hard_close()

    # --- handshake and options --------------------------------------------------------

    def _event(self) -> object:
        conn = self._conn
        try:
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    self._fill()
                    continue
                return ev
        except (PeerProtocolError, OSError) as exc:
            self._fail(exc)
            raise

    def connect(self) -> Handshake:
        """Receive the greeting, send client flags; STARTTLS first if the URI says so."""
        self._check_usable()
        ev = self._event()
        assert isinstance(ev, Handshake)
        self.handshake_flags = ev.handshake_flags
        self._sendall(self._conn.take_output())
        if self._tls_config is not None and (self.uri is None or self.uri.tls):
            self.starttls(self._tls_config)
        return ev

    def option(self, option: int, data: bytes = b"") -> OptionDone:
        """Send one option and collect every reply (no error check)."""
        self._check_usable()
        self._sendall(self._conn.send_option(option, data))
        ev = self._event()
        assert isinstance(ev, OptionDone)
        return ev

    def starttls(self, config: TLSConfig | None = None) -> None:
        config = config or self._tls_config or (
            TLSConfig.from_uri(self.uri) if self.uri else TLSConfig())
        check_option(self.option(Opt.STARTTLS))
        ctx = config.context()
        sock = self._sock
        assert isinstance(sock, socket.socket)
        try:
            self._sock = ctx.wrap_socket(sock, server_hostname=config.server_hostname)
        except OSError as exc:  # ssl.SSLError is an OSError
            self._fail(exc)
            raise
        self._tls = True
        self._conn.tls_established()

    def _name(self, name: str | None) -> str:
        if name is not None:
            return name
        return self.uri.export if self.uri is not None else ""

    def list(self) -> _List[ExportEntry]:
        """NBD_OPT_LIST: the exports the server is willing to list."""
        return list_result(self.option(Opt.LIST))

    def info(self, name: str | None = None,
             infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        """NBD_OPT_INFO: describe an export without entering transmission."""
        done = check_option(self.option(Opt.INFO, info_data(self._name(name), infos)))
        assert done.info is not None
        return done.info

    def go(self, name: str | None = None, infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        """NBD_OPT_GO: select the export and enter the transmission phase."""
        done = check_option(self.option(Opt.GO, info_data(self._name(name), infos)))
        assert done.info is not None
        self._enter(done.info)
        return done.info

    def export_name(self, name: str | None = None) -> ExportInfo:
        """NBD_OPT_EXPORT_NAME (old way to select an export; the server closes on error)."""
        done = self.option(Opt.EXPORT_NAME, self._name(name).encode("utf-8"))
        assert done.info is not None
        self._enter(done.info)
        return done.info

    def _enter(self, info: ExportInfo) -> None:
        self.export = info
        self.max_request = max_request_for(info)

    def structured_replies(self) -> bool:
        """NBD_OPT_STRUCTURED_REPLY; False if the server does not support them."""
        return probe_ok(self.option(Opt.STRUCTURED_REPLY))

    def extended_headers(self) -> bool:
        """NBD_OPT_EXTENDED_HEADERS (64-bit requests and extents); False if the server
        does not speak them (then negotiate structured replies instead)."""
        return probe_ok(self.option(Opt.EXTENDED_HEADERS))

    def negotiate_safe_close(self) -> bool:
        """Probe pynbd's safe-close extension (NBD_OPT_X_CLOSE); safe with any server."""
        return probe_ok(self.option(Opt.X_CLOSE))

    def list_meta_context(self, *queries: str, export: str | None = None) -> _List[MetaContext]:
        return meta_result(self.option(Opt.LIST_META_CONTEXT,
                                       meta_data(self._name(export), queries)))

    def set_meta_context(self, *queries: str, export: str | None = None) -> _List[MetaContext]:
        return meta_result(self.option(Opt.SET_META_CONTEXT,
                                       meta_data(self._name(export), queries)))

    def abort(self) -> None:
        """NBD_OPT_ABORT: end negotiation politely (no-op outside the option phase)."""
        if self._closed or self._conn.state is not State.OPTIONS:
            return
        from pynbd.protocol import wire
        with contextlib.suppress(OSError):
            self._sendall(self._conn.send_option(Opt.ABORT))
            # the server may ACK; read (bounded) and ignore whatever comes
            self._sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                self._sock.recv(wire.OPTION_REPLY.size)
        self._hard_close()
        self.close_result = CloseResult(False, False, "abort")

    # --- transmission: submit -----------------------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int,
                view: memoryview | None = None, payload: memoryview | None = None,
                zeroed: bool = False, chunks: _List[Chunk] | None = None,
                sink: ReadSink | None = None, contexts: tuple[int, ...] | None = None
                ) -> Request:
        if self._broken is not None or self._closed:
            self._check_usable()
        if self.server_shutting_down and cmd != Cmd.X_CLOSE:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): "
                                     "only close() or disconnect() remain")
        if self.strict:
            self._validate(cmd, offset, length, flags)
        conn = self._conn
        cookie, header = conn.request(cmd, offset, length, flags, contexts)
        req = Request(cookie, cmd, offset, length, view, zeroed, chunks, sink)
        self._ops[cookie] = req
        if sink is not None:
            self._sinks += 1
        try:
            if payload is None:
                self._sock.sendall(header)
            else:
                self._send_payload(header, payload)
        except OSError as exc:
            self._fail(exc)
            raise
        return req

    def _validate(self, cmd: int, offset: int, length: int, flags: int) -> None:
        validate_request(self.export, self._conn, self.max_request, cmd, offset, length, flags)

    def submit_read(self, offset: int, buf: int | bytearray | memoryview, flags: int = 0, *,
                    chunks: bool = False, sink: ReadSink | None = None) -> Request:
        """Queue a read into ``buf`` (or a fresh buffer of that many bytes).

        With ``sink`` (pass the length as ``buf``) there is no buffer: each chunk of the
        reply is handed to the :class:`ReadSink` as it arrives, and the payload stays in
        the socket until the sink consumes it (see :meth:`submit_write_from`)."""
        if sink is not None:
            if not isinstance(buf, int) or chunks:
                raise TypeError("a read with a sink takes a length and no chunks")
            return self._submit(Cmd.READ, offset, buf, flags, None, None, False, None, sink)
        if isinstance(buf, int):
            view = memoryview(bytearray(buf))
            zeroed = True
        else:
            view = memoryview(buf).cast("B")
            zeroed = False
        return self._submit(Cmd.READ, offset, len(view), flags, view, None, zeroed,
                            [] if chunks else None)

    def submit_write(self, offset: int, data: bytes | bytearray | memoryview,
                     flags: int = 0) -> Request:
        view = memoryview(data).cast("B")
        return self._submit(Cmd.WRITE, offset, len(view), flags, None, view)

    def submit_write_from(self, offset: int, length: int, fd: int,
                          head: bytes | bytearray | memoryview = b"", flags: int = 0, *,
                          fd_offset: int | None = None) -> Request:
        """Queue a WRITE of ``length`` bytes whose payload is ``head`` followed by
        ``length - len(head)`` bytes taken from the descriptor ``fd``: from its current
        position (a socket or pipe, e.g. the socket handed to a :class:`ReadSink`), or
        with ``fd_offset`` from that offset of a regular file.

        The kernel moves the bytes (``splice(2)`` through a pipe for sockets,
        ``sendfile(2)`` for files) without copying them through Python; where it cannot
        (TLS on this connection, another OS) they are read into a buffer and sent.
        Blocks until the whole payload is sent (waits on ``fd`` are bounded by this
        connection's timeout). If taking the payload fails midway the connection is
        unusable afterwards (the server got a partial request)."""
        hv = memoryview(head).cast("B")
        if len(hv) > length:
            raise ValueError("head is longer than the write")
        if self._broken is not None or self._closed:
            self._check_usable()
        if self.server_shutting_down:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): "
                                     "only close() or disconnect() remain")
        if self.strict:
            self._validate(Cmd.WRITE, offset, length, flags)
        cookie, header = self._conn.request(Cmd.WRITE, offset, length, flags)
        req = Request(cookie, Cmd.WRITE, offset, length)
        self._ops[cookie] = req
        rest = length - len(hv)
        try:
            sock = self._sock
            if self._tls:
                sock.sendall(header)
                if hv:
                    sock.sendall(hv)
            else:
                self._send_head(header, hv, _MSG_MORE if rest else 0)
            if rest:
                mover = self._mover
                if mover is None:
                    mover = self._mover = Mover()
                if self._tls:
                    mover.splice_ok = mover.sendfile_ok = False
                if fd_offset is None:
                    mover.stream(fd, sock.fileno(), rest, sock.gettimeout(), sock.sendall)
                else:
                    mover.file(fd, fd_offset, sock.fileno(), rest, sock.gettimeout(),
                               sock.sendall)
        except BaseException as exc:
            self._fail(exc)
            raise
        return req

    def _send_head(self, header: bytes, head: memoryview, flags: int) -> None:
        sock = self._sock
        total = len(header) + len(head)
        sent = sock.sendmsg([header, head] if head else [header], (), flags)
        if sent < total:
            rest = memoryview(header + bytes(head))[sent:]
            while rest:
                rest = rest[sock.send(rest, flags):]

    def submit_flush(self, flags: int = 0) -> Request:
        return self._submit(Cmd.FLUSH, 0, 0, flags)

    def submit_trim(self, offset: int, length: int, flags: int = 0) -> Request:
        return self._submit(Cmd.TRIM, offset, length, flags)

    def submit_cache(self, offset: int, length: int, flags: int = 0) -> Request:
        return self._submit(Cmd.CACHE, offset, length, flags)

    def submit_write_zeroes(self, offset: int, length: int, flags: int = 0) -> Request:
        return self._submit(Cmd.WRITE_ZEROES, offset, length, flags)

    def submit_block_status(self, offset: int, length: int, flags: int = 0,
                            contexts: Sequence[str] | None = None) -> Request:
        """Queue a block status query; ``contexts`` (names) limits the reply to those
        contexts with the payload form where the server offers it
        (NBD_FLAG_BLOCK_STATUS_PAYLOAD), otherwise the reply covers every negotiated
        context and :meth:`extents_of` filters it."""
        ids = payload_contexts(self._conn, contexts)
        req = self._submit(Cmd.BLOCK_STATUS, offset, length, flags, contexts=ids)
        req.want = None if contexts is None else tuple(contexts)
        return req

    # --- transmission: replies -----------------------------------------------------------

    def _pump(self, until: Request | None) -> Request:
        """Process replies until ``until`` completes (or any request, if None)."""
        conn = self._conn
        ops = self._ops
        try:
            while True:
                ev = conn.next_event()
                t = type(ev)
                if t is ReplyDone:
                    assert isinstance(ev, ReplyDone)
                    req = ops.pop(ev.cookie)
                    req.done = True
                    if req.sink is not None:
                        self._sinks -= 1
                    if ev.error:
                        if ev.error == _ESHUTDOWN:
                            self.server_shutting_down = True
                        req.error = request_error(ev.cmd, ev.error, ev.message,
                                                  ev.error_offset)
                    if until is None or req is until:
                        return req
                elif t is ReadData:
                    assert isinstance(ev, ReadData)
                    req = ops[ev.cookie]
                    if req.sink is not None:
                        self._to_sink(req.sink, ev)
                        continue
                    assert req.view is not None
                    start = ev.offset - req.offset
                    dest = req.view[start:start + ev.length]
                    n = conn.payload_into(dest)
                    if n < ev.length:
                        self._recv_exact(dest[n:])
                        conn.payload_received(ev.length - n)
                    if req.chunks is not None:
                        req.chunks.append(Chunk(ev.offset, ev.length, dest))
                elif ev is NEED_DATA:
                    self._fill()
                elif t is ReadHole:
                    assert isinstance(ev, ReadHole)
                    req = ops[ev.cookie]
                    if req.sink is not None:
                        try:
                            req.sink.hole(ev.offset, ev.length)
                        except BaseException as exc:
                            self._fail(exc)
                            raise
                        continue
                    assert req.view is not None
                    if not req.zeroed:
                        start = ev.offset - req.offset
                        _zero_fill(req.view[start:start + ev.length])
                    if req.chunks is not None:
                        req.chunks.append(Chunk(ev.offset, ev.length, None))
                elif t is BlockStatusChunk:
                    assert isinstance(ev, BlockStatusChunk)
                    req = ops[ev.cookie]
                    if req.extents is None:
                        req.extents = {}
                    req.extents[ev.context_id] = ev.extents
                elif t is ReplyError:
                    pass  # recorded by the state machine; reported with ReplyDone
                else:  # pragma: no cover
                    raise PeerProtocolError(f"unexpected event {ev!r}")
        except (PeerProtocolError, OSError) as exc:
            self._fail(exc)
            raise

    def _to_sink(self, sink: ReadSink, ev: ReadData) -> None:
        conn = self._conn
        length = ev.length
        k = min(conn.buffered, length)
        head = memoryview(bytearray(length if self._tls else k))
        if k:
            conn.payload_into(head[:k])
        rest = length - k
        try:
            if self._tls:
                if rest:
                    self._recv_exact(head[k:])
                    conn.payload_received(rest)
                sink.data(ev.offset, length, head, -1)
                return
            sink.data(ev.offset, length, head, self._sock.fileno())
        except BaseException as exc:
            self._fail(exc)
            raise
        if rest:
            conn.payload_received(rest)

    def wait(self, req: Request) -> Request:
        """Wait for ``req``; raises its NBDRequestError if the server refused it."""
        if not req.done:
            if req.cookie not in self._ops:
                raise LocalProtocolError(f"{req!r} does not belong to this client")
            self._check_usable()
            self._pump(req)
        if req.error is not None:
            raise req.error
        return req

    def wait_any(self) -> Request:
        """Wait for the next request to complete (errors are left in ``req.error``)."""
        if not self._ops:
            raise LocalProtocolError("no requests in flight")
        self._check_usable()
        return self._pump(None)

    def wait_all(self) -> _List[Request]:
        """Complete every request in flight; raise the first error after draining."""
        done: _List[Request] = []
        first: NBDRequestError | None = None
        n = len(self._ops)
        for _ in range(n):
            if not self._ops:
                break
            req = self.wait_any()
            done.append(req)
            if req.error is not None and first is None:
                first = req.error
        if first is not None:
            raise first
        return done

    @contextlib.contextmanager
    def batch(self) -> Iterator[Client]:
        """``with client.batch(): client.submit_...`` waits for all of them on exit."""
        try:
            yield self
        except BaseException:
            if self._broken is None and not self._closed:
                with contextlib.suppress(Exception):
                    self.wait_all()
            raise
        self.wait_all()

    # --- transmission: synchronous calls ---------------------------------------------

    def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        """Read ``length`` bytes (holes read as zeroes)."""
        buf = bytearray(length)
        if length == 0:  # zero-length requests are discouraged by the spec
            return buf
        if length <= self.max_request:
            self.wait(self._submit(Cmd.READ, offset, length, flags, memoryview(buf), None,
                                   True))
        else:
            self._read_split(offset, memoryview(buf), flags, True)
        return buf

    def read_into(self, offset: int, buf: bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        if not view:
            return
        if len(view) <= self.max_request:
            self.wait(self._submit(Cmd.READ, offset, len(view), flags, view))
        else:
            self._read_split(offset, view, flags, False)

    def _read_split(self, offset: int, view: memoryview, flags: int, zeroed: bool) -> None:
        step = self.max_request
        for pos in range(0, len(view), step):
            part = view[pos:pos + step]
            self._submit(Cmd.READ, offset + pos, len(part), flags, part, None, zeroed)
            if len(self._ops) >= 8:
                self.wait_any()
        self.wait_all()

    def read_chunks(self, offset: int, length: int, flags: int = 0) -> tuple[bytearray,
                                                                              _List[Chunk]]:
        """Read and also return the reply's chunks in arrival order (holes have
        ``data=None``; with simple replies there is one data chunk)."""
        req = self.submit_read(offset, length, flags, chunks=True)
        self.wait(req)
        assert req.view is not None and req.chunks is not None
        return req.view.obj, req.chunks  # type: ignore[return-value]

    def write(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        if not view:
            return
        if len(view) <= self.max_request:
            self.wait(self._submit(Cmd.WRITE, offset, len(view), flags, None, view))
            return
        step = self.max_request
        for pos in range(0, len(view), step):
            part = view[pos:pos + step]
            self._submit(Cmd.WRITE, offset + pos, len(part), flags, None, part)
            if len(self._ops) >= 8:
                self.wait_any()
        self.wait_all()

    def flush(self, flags: int = 0) -> None:
        self.wait(self._submit(Cmd.FLUSH, 0, 0, flags))

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        """NBD_CMD_TRIM: one request under extended headers (64-bit length), else as
        many as 32-bit lengths need."""
        self._effect(Cmd.TRIM, offset, length, flags)

    def cache(self, offset: int, length: int, flags: int = 0) -> None:
        self._effect(Cmd.CACHE, offset, length, flags)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._effect(Cmd.WRITE_ZEROES, offset, length, flags)

    def _effect(self, cmd: int, offset: int, length: int, flags: int) -> None:
        """A command without payload over a range of any size: one request where the
        protocol allows it; in pieces without extended headers, or when the server
        refuses an effect length above its maximum payload (qemu-nbd does for CACHE;
        the spec allows EINVAL/EOVERFLOW there)."""
        if length <= 0xFFFFFFFF or self.extended:
            try:
                self.wait(self._submit(cmd, offset, length, flags))
                return
            except NBDRequestError as exc:
                if length <= self.max_request or exc.errno not in (_EINVAL, _EOVERFLOW):
                    raise
            pieces = [(pos, min(self.max_request, offset + length - pos))
                      for pos in range(offset, offset + length, self.max_request)]
        else:
            pieces = effect_pieces(offset, length)
        for pos, n in pieces:
            self._submit(cmd, pos, n, flags)
            if len(self._ops) >= 8:
                self.wait_any()
        self.wait_all()

    def block_status(self, offset: int, length: int, flags: int = 0,
                     contexts: Sequence[str] | None = None) -> dict[str, _List[Extent]]:
        """NBD_CMD_BLOCK_STATUS: extents per context name (every negotiated one, or
        ``contexts``). Under extended headers ``length`` may exceed 32 bits."""
        req = self.wait(self.submit_block_status(offset, length, flags, contexts))
        return self.extents_of(req)

    def extents_of(self, req: Request) -> dict[str, _List[Extent]]:
        return extents_by_name(self._conn.meta_contexts, req.offset, req.extents or {},
                               req.want)

    def iter_extents(self, offset: int = 0, length: int | None = None,
                     context: str = BASE_ALLOCATION,
                     step: int | None = None) -> Iterator[Extent]:
        """Extents of ``context`` covering [offset, offset+length), clipped to it;
        repeats block status as needed (each query makes progress, so this ends).
        Each query asks for the rest of the range (at most ``step`` bytes; without
        extended headers at most 1 GiB, the most a 32-bit reply can be trusted with)."""
        end = self.size if length is None else offset + length
        pos = offset
        limit = step if step is not None else (end if self.extended else 1 << 30)
        while pos < end:
            want = min(end - pos, limit) if self.extended else min(end - pos, limit,
                                                                    0xFFFFFFFF)
            got = self.block_status(pos, want, contexts=(context,)).get(context)
            if not got:
                raise PeerProtocolError(f"block status reply without context {context}")
            for e in got:
                if e.offset >= end:
                    break
                ln = min(e.length, end - e.offset)
                yield Extent(e.offset, ln, e.flags)
                pos = e.offset + ln

    # --- teardown ---------------------------------------------------------------------

    def _drain(self) -> None:
        for _ in range(len(self._ops)):
            if not self._ops:
                break
            self.wait_any()

    def disconnect(self) -> None:
        """Finish requests in flight, send NBD_CMD_DISC and close the transport."""
        if self._closed or self._broken is not None:
            self._hard_close()
            return
        if self._conn.state in (State.TRANSMISSION, State.PAYLOAD):
            try:
                self._drain()
                _, header = self._conn.request(Cmd.DISC)
                self._sock.sendall(header)
                self._await_eof()
            finally:
                self._hard_close()
            self.close_result = CloseResult(False, False, "disc")
        elif self._conn.state is State.OPTIONS:
            self.abort()

    def _await_eof(self) -> None:
        """After DISC/X_CLOSE: wait (bounded) for the server to close, for TLS too."""
        with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
            if self._tls:
                self._sock.settimeout(5.0)
                with contextlib.suppress(OSError, ValueError):
                    cast("ssl.SSLSocket", self._sock).unwrap()
                return
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(5.0)
            deadline = time.monotonic() + 5.0
            for _ in range(1024):
                if time.monotonic() > deadline or not self._sock.recv(65536):
                    break

    def close(self) -> CloseResult:
        """End the connection the safest way available and say how safe it was.

        In transmission: finish requests in flight, then NBD_CMD_X_CLOSE if it was
        negotiated (safe = the server's reply carried no error), else FLUSH (if the
        export has it and is writable) and NBD_CMD_DISC. In negotiation: NBD_OPT_ABORT.
        """
        if self.close_result is not None:
            return self.close_result
        if self._closed or self._broken is not None:
            self._hard_close()
            self.close_result = CloseResult(False, False, "none",
                                            str(self._broken or ""))
            return self.close_result
        st = self._conn.state
        if st in (State.GREETING, State.OPTION_REPLY, State.EXPORT_NAME_REPLY,
                  State.TLS_PENDING, State.CLOSED, State.CLOSING):
            self._hard_close()
            self.close_result = CloseResult(False, False, "none")
            return self.close_result
        if st is State.OPTIONS:
            self.abort()
            assert self.close_result is not None
            return self.close_result
        result: CloseResult
        try:
            err = ""
            try:
                self._drain()
            except NBDRequestError as exc:
                err = str(exc)
            if self._conn.x_close and self.export is not None and \
                    self.export.flags & TransmissionFlag.X_SEND_CLOSE:
                cookie, header = self._conn.request(Cmd.X_CLOSE)
                req = Request(cookie, Cmd.X_CLOSE, 0, 0)
                self._ops[cookie] = req
                self._sock.sendall(header)
                self._pump(req)
                self._await_eof()
                if req.error is not None:
                    result = CloseResult(False, False, "x_close", str(req.error))
                else:
                    result = CloseResult(True, True, "x_close", err)
            else:
                flushed = False
                if self.export is not None and self.export.flags & \
                        TransmissionFlag.SEND_FLUSH and not self.server_shutting_down:
                    try:
                        self.flush()
                        flushed = True
                    except NBDRequestError as exc:
                        err = err or str(exc)
                _, header = self._conn.request(Cmd.DISC)
                self._sock.sendall(header)
                self._await_eof()
                result = CloseResult(False, flushed, "flush+disc" if flushed else "disc", err)
        except (PeerProtocolError, OSError, LocalProtocolError) as exc:
            result = CloseResult(False, False, "none", str(exc))
        finally:
            self._hard_close()
        self.close_result = result
        return result

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is not None and (self._broken is not None or self._ops):
            self._hard_close()
            return
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._sock.close()


def validate_request(ex: ExportInfo | None, conn: ClientConnection, max_request: int,
                     cmd: int, offset: int, length: int, flags: int) -> None:
    """The spec's client-side MUST NOTs, checked before a request is sent."""
    if ex is None or conn.state not in (State.TRANSMISSION, State.PAYLOAD):
        raise LocalProtocolError("not in the transmission phase")
    xf = ex.flags
    need = _CMD_NEEDS.get(cmd)
    if need is not None and not xf & need:
        raise LocalProtocolError(f"server does not support {Cmd(cmd).name}")
    if flags:
        for f, (fneed, fname) in _FLAG_NEEDS.items():
            if flags & f and not xf & fneed:
                raise LocalProtocolError(f"server does not support NBD_CMD_FLAG_{fname}")
    if cmd in _WRITES and xf & _READ_ONLY:
        raise LocalProtocolError("export is read-only")
    if cmd == _BLOCK_STATUS and not conn.meta_contexts:
        raise LocalProtocolError("block status needs a negotiated meta context")
    if length > 0xFFFFFFFF and not conn.extended_headers:
        raise LocalProtocolError(f"a length of {length} bytes needs extended headers")
    if offset + length > ex.size and cmd != _FLUSH:
        raise LocalProtocolError(
            f"request [{offset}, {offset + length}) beyond the export size {ex.size}")
    if length > max_request and cmd in _RW:
        raise LocalProtocolError(
            f"request of {length} bytes exceeds the maximum {max_request}")


def dial(uri: str | NBDURI, *, timeout: float | None = None,
         tls: TLSConfig | None = None, strict: bool = True) -> Client:
    return Client.dial(uri, timeout=timeout, tls=tls, strict=strict)


def connect(uri: str | NBDURI, *, export: str | None = None, structured: bool = True,
            meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,), safe_close: bool = True,
            timeout: float | None = None, tls: TLSConfig | None = None,
            strict: bool = True, extended_headers: bool = True) -> Client:
    """Dial, handshake (STARTTLS for nbds), negotiate extended headers (falling back to
    structured replies; ``extended_headers=False`` opts out), meta contexts and safe
    close where offered, then NBD_OPT_GO. Returns a client in transmission."""
    c = Client.dial(uri, timeout=timeout, tls=tls, strict=strict)
    try:
        c.connect()
        chunked = structured and ((extended_headers and c.extended_headers())
                                  or c.structured_replies())
        if chunked and meta_contexts:
            try:
                c.set_meta_context(*meta_contexts, export=export)
            except Exception as exc:
                from pynbd.protocol.errors import OptionError
                if not isinstance(exc, OptionError):
                    raise
        if safe_close:
            c.negotiate_safe_close()
        c.go(export)
    except BaseException:
        c.hard_close()
        raise
    return c
