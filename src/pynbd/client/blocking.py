"""Blocking NBD client: the session (:mod:`pynbd.client.session`) on a blocking socket.

go-nbd's shape::

    c = Client.dial("nbd://127.0.0.1/disk")    # transport
    c.handshake()                               # greeting (+ STARTTLS for nbds://)
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
connection can take it from there with ``splice(2)`` (the data never enters Python;
:mod:`pynbd.client.forward`).

Pipelining note: the client sends from the calling thread and only reads replies while
waiting, so keep the bytes in flight bounded (a server that blocks writing large read
replies while a large write payload is being sent could otherwise stall both sides).
"""

from __future__ import annotations

import builtins
import contextlib
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from pynbd.client import plans
from pynbd.client._common import DEFAULT_INFOS, Chunk, CloseResult, Extent, ReadSink, Request
from pynbd.client._splice import Mover
from pynbd.client.forward import Forwarding
from pynbd.client.rules import as_uri, validate_request
from pynbd.client.session import ExportEntry, ExportInfo, MetaContext
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI
from pynbd.protocol.client import Handshake, OptionDone, ReadData
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, Opt
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, PeerProtocolError

if TYPE_CHECKING:  # ssl is imported only when TLS is used (start-up time)
    import ssl

__all__ = ["Client", "ReadSink", "Request", "connect", "dial", "validate_request"]

_RECV_SIZE = 256 * 1024
_WAITALL = socket.MSG_WAITALL
#: receive size while sink reads are in flight: small, so that little payload is pulled
#: into user space ahead of the sink (what is, reaches it as ``head``), yet large enough
#: for a block status reply or a run of small replies in one call
_SINK_RECV = 4096
_READ = Cmd.READ
_WRITE = Cmd.WRITE


def dial_socket(uri: NBDURI, timeout: float | None) -> socket.socket:
    if uri.is_unix:
        assert uri.socket is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        path = uri.socket
        try:
            sock.connect("\0" + path[1:] if path.startswith("\0") else path)
        except BaseException:
            sock.close()
            raise
    else:
        assert uri.host is not None
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    return sock


class Client(Forwarding):
    """One NBD connection driven with blocking sockets."""

    def __init__(self, sock: socket.socket, uri: NBDURI | None = None, *,
                 tls: TLSConfig | None = None, strict: bool = True) -> None:
        super().__init__(uri, tls, strict)
        # an ssl.SSLSocket after STARTTLS
        self._sock: socket.socket = sock
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._mover: Mover | None = None

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

    def _run(self, plan: plans.Plan[Any]) -> Any:
        return plans.run(plan, self._perform)

    # --- transport --------------------------------------------------------------------

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

    def _await_eof(self, timeout: float) -> None:
        """Stop sending and wait (bounded) for the server to close, for TLS too."""
        with contextlib.suppress(OSError):  # ssl.SSLError is an OSError
            if self._tls:
                self._sock.settimeout(timeout)
                with contextlib.suppress(OSError, ValueError):
                    cast("ssl.SSLSocket", self._sock).unwrap()
                return
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            for _ in range(1024):
                if time.monotonic() > deadline or not self._sock.recv(65536):
                    break

    # --- steps of the session's plans -------------------------------------------------

    def _do_greet(self, step: plans.Greet) -> Handshake:
        ev = self._event()
        assert isinstance(ev, Handshake)
        self._sendall(self._conn.take_output())
        return ev

    def _do_negotiate(self, step: plans.Negotiate) -> OptionDone:
        return self.option(step.option, step.data)

    def _do_upgrade_tls(self, step: plans.UpgradeTLS) -> None:
        ctx = step.config.context()
        try:
            self._sock = ctx.wrap_socket(self._sock, server_hostname=step.config.server_hostname)
        except OSError as exc:  # ssl.SSLError is an OSError
            self._fail(exc)
            raise

    def _do_submit(self, step: plans.Submit) -> Request:
        req = self._submit(step.cmd, step.offset, step.length, step.flags, step.view,
                           step.payload, step.zeroed, step.chunks, None, step.contexts)
        req.want = step.want
        return req

    def _do_wait(self, step: plans.Wait) -> Request:
        return self.wait(step.req)

    def _do_wait_any(self, step: plans.WaitAny) -> Request:
        while True:
            for req in step.reqs:
                if req.done:
                    return req
            self._check_usable()
            self._pump(None)

    def _do_wait_all(self, step: plans.WaitAll) -> None:
        for req in step.reqs:
            if not req.done:
                self._check_usable()
                self._pump(req)
        for req in step.reqs:
            if req.error is not None:
                raise req.error

    def _do_drain(self, step: plans.Drain) -> str:
        err = ""
        for _ in range(len(self._ops)):
            if not self._ops:
                break
            req = self.wait_any()
            if req.error is not None and not err:
                err = str(req.error)
        return err

    def _do_send(self, step: plans.Send) -> None:
        self._sock.sendall(step.data)

    def _do_goodbye(self, step: plans.Goodbye) -> None:
        self._await_eof(step.timeout)

    # --- handshake and options --------------------------------------------------------

    def _event(self) -> Handshake | OptionDone:
        try:
            ev = self._route(self._fill)
            assert isinstance(ev, Handshake | OptionDone)
            return ev
        except (PeerProtocolError, OSError) as exc:
            self._fail(exc)
            raise

    def handshake(self) -> Handshake:
        """Receive the greeting, send client flags; STARTTLS first if the URI says so."""
        hs: Handshake = self._run(self._handshake_plan())
        return hs

    def option(self, option: int, data: bytes = b"") -> OptionDone:
        """Send one option and collect every reply (no error check)."""
        self._check_usable()
        self._sendall(self._conn.send_option(option, data))
        ev = self._event()
        assert isinstance(ev, OptionDone)
        return ev

    def starttls(self, config: TLSConfig | None = None) -> None:
        self._run(self._starttls_plan(config))

    def list_exports(self) -> list[ExportEntry]:
        """NBD_OPT_LIST: the exports the server is willing to list."""
        exports: list[ExportEntry] = self._run(self._list_plan())
        return exports

    def info(self, name: str | None = None,
             infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        """NBD_OPT_INFO: describe an export without entering transmission."""
        info: ExportInfo = self._run(self._info_plan(Opt.INFO, name, infos))
        return info

    def go(self, name: str | None = None, infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        """NBD_OPT_GO: select the export and enter the transmission phase."""
        info: ExportInfo = self._run(self._info_plan(Opt.GO, name, infos))
        return info

    def export_name(self, name: str | None = None) -> ExportInfo:
        """NBD_OPT_EXPORT_NAME (old way to select an export; the server closes on error)."""
        info: ExportInfo = self._run(self._export_name_plan(name))
        return info

    def structured_replies(self) -> bool:
        """NBD_OPT_STRUCTURED_REPLY; False if the server does not support them."""
        return bool(self._run(self._probe_plan(Opt.STRUCTURED_REPLY)))

    def extended_headers(self) -> bool:
        """NBD_OPT_EXTENDED_HEADERS (64-bit requests and extents); False if the server
        does not speak them (then negotiate structured replies instead)."""
        return bool(self._run(self._probe_plan(Opt.EXTENDED_HEADERS)))

    def negotiate_safe_close(self) -> bool:
        """Probe pynbd's safe-close extension (NBD_OPT_X_CLOSE); safe with any server."""
        return bool(self._run(self._probe_plan(Opt.X_CLOSE)))

    def list_meta_context(self, *queries: str, export: str | None = None
                          ) -> list[MetaContext]:
        contexts: list[MetaContext] = self._run(
            self._meta_plan(Opt.LIST_META_CONTEXT, queries, export))
        return contexts

    def set_meta_context(self, *queries: str, export: str | None = None
                         ) -> list[MetaContext]:
        contexts: list[MetaContext] = self._run(
            self._meta_plan(Opt.SET_META_CONTEXT, queries, export))
        return contexts

    def abort(self) -> None:
        """NBD_OPT_ABORT: end negotiation politely (no-op outside the option phase)."""
        self._run(self._abort_plan())

    # --- transmission: submit ---------------------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int,
                view: memoryview | None = None, payload: memoryview | None = None,
                zeroed: bool = False, chunks: list[Chunk] | None = None,
                sink: ReadSink | None = None, contexts: tuple[int, ...] | None = None
                ) -> Request:
        req, header = self._start(cmd, offset, length, flags, view, zeroed, chunks, sink,
                                  contexts)
        try:
            if payload is None:
                self._sock.sendall(header)
            else:
                self._send_payload(header, payload)
        except OSError as exc:
            self._fail(exc)
            raise
        return req

    def submit_read(self, offset: int, buf: int | bytearray | memoryview, flags: int = 0, *,
                    chunks: bool = False, sink: ReadSink | None = None) -> Request:
        """Queue a read into ``buf`` (or a fresh buffer of that many bytes).

        With ``sink`` (pass the length as ``buf``) there is no buffer: each chunk of the
        reply is handed to the :class:`ReadSink` as it arrives, and the payload stays in
        the socket until the sink consumes it (see :meth:`submit_write_from`)."""
        if sink is not None:
            if not isinstance(buf, int) or chunks:
                raise TypeError("a read with a sink takes a length and no chunks")
            return self._submit(_READ, offset, buf, flags, None, None, False, None, sink)
        if isinstance(buf, int):
            view = memoryview(bytearray(buf))
            zeroed = True
        else:
            view = memoryview(buf).cast("B")
            zeroed = False
        return self._submit(_READ, offset, len(view), flags, view, None, zeroed,
                            [] if chunks else None)

    def submit_write(self, offset: int, data: bytes | bytearray | memoryview,
                     flags: int = 0) -> Request:
        view = memoryview(data).cast("B")
        return self._submit(_WRITE, offset, len(view), flags, None, view)

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
        return self._do_submit(self._status_submit(offset, length, flags, contexts))

    # --- transmission: replies --------------------------------------------------------

    def _pump(self, until: Request | None) -> Request:
        """Process replies until ``until`` completes (or any request, if None)."""
        route = self._route
        fill = self._fill
        try:
            while True:
                r = route(fill)
                if type(r) is Request:
                    if until is None or r is until:
                        return r
                else:
                    assert isinstance(r, ReadData)
                    self._receive_payload(r)
        except (PeerProtocolError, OSError) as exc:
            self._fail(exc)
            raise

    def _receive_payload(self, ev: ReadData) -> None:
        """The rest of a read chunk, straight into its place (or to the sink)."""
        sink = self._ops[ev.cookie].sink
        if sink is not None:
            self._to_sink(sink, ev)
            return
        dest = self._payload
        assert dest is not None
        self._payload = None
        self._recv_exact(dest)
        self._conn.payload_received(len(dest))

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

    def wait_all(self) -> list[Request]:
        """Complete every request in flight; raise the first error after draining."""
        done: list[Request] = []
        first: NBDRequestError | None = None
        for _ in range(len(self._ops)):
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

    # --- transmission: synchronous calls ----------------------------------------------

    def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        """Read ``length`` bytes (holes read as zeroes)."""
        buf = bytearray(length)
        if length > self.max_request:
            self._run(self._split_plan(_READ, offset, memoryview(buf), flags, True))
        elif length:  # zero-length requests are discouraged by the spec
            self.wait(self._submit(_READ, offset, length, flags, memoryview(buf), None, True))
        return buf

    def read_into(self, offset: int, buf: bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        if len(view) > self.max_request:
            self._run(self._split_plan(_READ, offset, view, flags, False))
        elif view:
            self.wait(self._submit(_READ, offset, len(view), flags, view))

    def read_chunks(self, offset: int, length: int, flags: int = 0
                    ) -> tuple[bytearray, list[Chunk]]:
        """Read and also return the reply's chunks in arrival order (holes have
        ``data=None``; with simple replies there is one data chunk)."""
        got: tuple[bytearray, list[Chunk]] = self._run(
            self._read_chunks_plan(offset, length, flags))
        return got

    def write(self, offset: int, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        if len(view) > self.max_request:
            self._run(self._split_plan(_WRITE, offset, view, flags, False))
        elif view:
            self.wait(self._submit(_WRITE, offset, len(view), flags, None, view))

    def flush(self, flags: int = 0) -> None:
        self.wait(self._submit(Cmd.FLUSH, 0, 0, flags))

    def trim(self, offset: int, length: int, flags: int = 0) -> None:
        """NBD_CMD_TRIM: one request under extended headers (64-bit length), else as
        many as 32-bit lengths need."""
        self._run(self._effect_plan(Cmd.TRIM, offset, length, flags))

    def cache(self, offset: int, length: int, flags: int = 0) -> None:
        self._run(self._effect_plan(Cmd.CACHE, offset, length, flags))

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._run(self._effect_plan(Cmd.WRITE_ZEROES, offset, length, flags))

    def block_status(self, offset: int, length: int, flags: int = 0,
                     contexts: Sequence[str] | None = None) -> dict[str, list[Extent]]:
        """NBD_CMD_BLOCK_STATUS: extents per context name (every negotiated one, or
        ``contexts``). Under extended headers ``length`` may exceed 32 bits."""
        got: dict[str, list[Extent]] = self._run(
            self._block_status_plan(offset, length, flags, contexts))
        return got

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

    def disconnect(self) -> None:
        """Finish requests in flight, send NBD_CMD_DISC and close the transport."""
        self._run(self._disconnect_plan())

    def close(self) -> CloseResult:
        """End the connection the safest way available and say how safe it was (see
        :meth:`ClientSession._close_plan`)."""
        result: CloseResult = self._run(self._close_plan())
        return result

    def __enter__(self) -> Client:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._drop_on_exit(et):
            self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self._sock.close()

    # --- deprecated names (last: ``list`` would shadow the builtin in the class) -------

    def connect(self) -> Handshake:
        """Deprecated: :meth:`handshake` (``connect`` is the module's dial-and-negotiate)."""
        warnings.warn("Client.connect() is now Client.handshake()", DeprecationWarning,
                      stacklevel=2)
        return self.handshake()

    def list(self) -> builtins.list[ExportEntry]:
        """Deprecated: :meth:`list_exports`."""
        warnings.warn("Client.list() is now Client.list_exports()", DeprecationWarning,
                      stacklevel=2)
        return self.list_exports()


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
        c._run(c._connect_plan(export, structured, meta_contexts, safe_close,
                               extended_headers))
    except BaseException:
        c.hard_close()
        raise
    return c
