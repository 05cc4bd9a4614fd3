"""The client session: what an NBD client decides, once, for every driver.

:class:`ClientSession` sits on the sans-I/O protocol core
(:class:`~pynbd.protocol.client.ClientConnection`) and holds everything a client
decides that is not I/O: which options to send and what their answers mean, whether a
request may be sent (the spec's client-side MUST NOTs), where each reply event goes,
how a large request is split, and how a connection ends (the close plan). The blocking
driver (:mod:`pynbd.client.blocking`) and the asyncio driver (:mod:`pynbd.client.aio`)
subclass it and add only the transport.

What takes more than one round trip is written once, as a plan
(:mod:`pynbd.client.plans`) that the driver runs with its own I/O. The single-request
hot path (read, write, flush) does not go through plans: the drivers call
:meth:`ClientSession._start` and :meth:`ClientSession._route` directly.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

from pynbd.client._common import (
    DEFAULT_INFOS,
    Chunk,
    CloseResult,
    Extent,
    ReadSink,
    Request,
)
from pynbd.client.plans import (
    PERFORMERS,
    Drain,
    Goodbye,
    Greet,
    Negotiate,
    Plan,
    Send,
    Step,
    Submit,
    UpgradeTLS,
    Wait,
    WaitAll,
    WaitAny,
)
from pynbd.client.rules import (
    IN_TRANSMISSION,
    check_option,
    effect_pieces,
    extents_by_name,
    max_request_for,
    probe_ok,
    request_error,
    validate_request,
    zero_fill,
)
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI
from pynbd.protocol import wire
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
from pynbd.protocol.client_types import _NeedData
from pynbd.protocol.constants import (
    MAX_PAYLOAD,
    Cmd,
    Errno,
    Opt,
    TransmissionFlag,
)
from pynbd.protocol.errors import (
    LocalProtocolError,
    NBDRequestError,
    OptionError,
    PeerProtocolError,
)

__all__ = ["ClientSession", "ExportEntry", "ExportInfo", "MetaContext"]


#: at most this many requests of one split operation are in flight at once
WINDOW = 8
_READ = int(Cmd.READ)
_X_CLOSE = int(Cmd.X_CLOSE)
_ESHUTDOWN = int(Errno.ESHUTDOWN)


class ClientSession:
    """One NBD connection's decisions; a driver adds the transport.

    A driver implements ``_hard_close`` (drop the transport now) and a ``_do_<step>``
    method for each step of :data:`PERFORMERS`, and may override ``_on_broken``.
    """

    def __init__(self, uri: NBDURI | None, tls: TLSConfig | None, strict: bool) -> None:
        self.uri = uri
        self.strict = strict
        self._tls_config = tls
        self._conn = ClientConnection()
        self._ops: dict[int, Request] = {}
        self._sinks = 0  # sink reads in flight
        self._payload: memoryview | None = None  # where the rest of a ReadData goes
        self._tls = False
        self._broken: BaseException | None = None
        self._closed = False
        self.close_result: CloseResult | None = None
        self.export: ExportInfo | None = None
        self.handshake_flags = 0
        self.max_request = MAX_PAYLOAD
        #: an NBD_ESHUTDOWN reply arrived: the spec wants a soft disconnect now
        self.server_shutting_down = False

    # --- driver hooks ---------------------------------------------------------------

    def _hard_close(self) -> None:
        raise NotImplementedError

    def _on_broken(self, exc: BaseException) -> None:
        """The connection broke: requests in flight will never complete."""

    def _perform(self, step: Step) -> Any:
        """The driver's method for ``step`` called with it."""
        return getattr(self, PERFORMERS[type(step)])(step)

    # --- what was negotiated ----------------------------------------------------------

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

    def _negotiated(self) -> ExportInfo:
        if self.export is None:
            raise RuntimeError("no export negotiated yet")
        return self.export

    def _flag(self, flag: TransmissionFlag) -> bool:
        return bool(self._negotiated().flags & flag)

    @property
    def size(self) -> int:
        return self._negotiated().size

    @property
    def flags(self) -> int:
        return self._negotiated().flags

    def is_read_only(self) -> bool:
        return self._flag(TransmissionFlag.READ_ONLY)

    def is_rotational(self) -> bool:
        return self._flag(TransmissionFlag.ROTATIONAL)

    def can_flush(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FUA)

    def can_trim(self) -> bool:
        return self._flag(TransmissionFlag.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_WRITE_ZEROES)

    def can_fast_zero(self) -> bool:
        return self._flag(TransmissionFlag.SEND_FAST_ZERO)

    def can_df(self) -> bool:
        return self._flag(TransmissionFlag.SEND_DF)

    def can_multi_conn(self) -> bool:
        return self._flag(TransmissionFlag.CAN_MULTI_CONN)

    def can_cache(self) -> bool:
        return self._flag(TransmissionFlag.SEND_CACHE)

    def can_safe_close(self) -> bool:
        return self._flag(TransmissionFlag.X_SEND_CLOSE)

    def can_block_status_payload(self) -> bool:
        """The server takes block status queries naming their contexts (extended)."""
        return self._flag(TransmissionFlag.BLOCK_STATUS_PAYLOAD)

    # --- health -----------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise PeerProtocolError(f"connection is unusable after an earlier error: "
                                    f"{self._broken}") from self._broken
        if self._closed:
            raise LocalProtocolError("connection is closed")

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        self._on_broken(exc)
        self._hard_close()

    def _drop_on_exit(self, et: type[BaseException] | None) -> bool:
        """Leaving a ``with`` block: True when the connection is dropped without a
        goodbye (an exception with requests in flight, or a broken connection: their
        replies may never come), else the driver closes it the safe way. Both drivers
        leave the same way; requests still in flight fail."""
        if et is None or (self._broken is None and not self._ops):
            return False
        if self._broken is None:
            why = f"{et.__name__} with {len(self._ops)} request(s) in flight"
            self._fail(LocalProtocolError(f"connection dropped: {why}"))
        else:
            why = str(self._broken)
            self._hard_close()
        if self.close_result is None:
            self.close_result = CloseResult(False, False, "none", why)
        return True

    # --- negotiation plans ------------------------------------------------------------

    def _name(self, name: str | None) -> str:
        if name is not None:
            return name
        return self.uri.export if self.uri is not None else ""

    def _handshake_plan(self) -> Plan[Handshake]:
        self._check_usable()
        ev: Handshake = yield Greet()
        self.handshake_flags = ev.handshake_flags
        if self._tls_config is not None and (self.uri is None or self.uri.tls):
            yield from self._starttls_plan(self._tls_config)
        return ev

    def _starttls_plan(self, config: TLSConfig | None) -> Plan[None]:
        config = config or self._tls_config or (
            TLSConfig.from_uri(self.uri) if self.uri else TLSConfig())
        check_option((yield Negotiate(Opt.STARTTLS)))
        yield UpgradeTLS(config)
        self._tls = True
        self._conn.tls_established()

    def _list_plan(self) -> Plan[list[ExportEntry]]:
        done = check_option((yield Negotiate(Opt.LIST)))
        return [r for r in done.replies if isinstance(r, ExportEntry)]

    def _info_plan(self, option: Opt, name: str | None,
                   infos: tuple[int, ...]) -> Plan[ExportInfo]:
        """NBD_OPT_INFO, or NBD_OPT_GO (which enters the transmission phase)."""
        data = wire.encode_info_request(self._name(name), infos)
        done = check_option((yield Negotiate(option, data)))
        assert done.info is not None
        if option == Opt.GO:
            self._enter(done.info)
        return done.info

    def _export_name_plan(self, name: str | None) -> Plan[ExportInfo]:
        done: OptionDone = yield Negotiate(Opt.EXPORT_NAME, self._name(name).encode("utf-8"))
        assert done.info is not None
        self._enter(done.info)
        return done.info

    def _enter(self, info: ExportInfo) -> None:
        self.export = info
        self.max_request = max_request_for(info)

    def _probe_plan(self, option: Opt) -> Plan[bool]:
        return probe_ok((yield Negotiate(option)))

    def _meta_plan(self, option: Opt, queries: Sequence[str],
                   export: str | None) -> Plan[list[MetaContext]]:
        data = wire.encode_meta_context_request(self._name(export), list(queries))
        done = check_option((yield Negotiate(option, data)))
        return [r for r in done.replies if isinstance(r, MetaContext)]

    def _connect_plan(self, export: str | None, structured: bool,
                      meta_contexts: tuple[str, ...], safe_close: bool,
                      extended_headers: bool) -> Plan[None]:
        """``connect(uri)`` after dialing: handshake, extended headers (else
        structured replies), meta contexts and safe close where offered, then GO."""
        yield from self._handshake_plan()
        chunked = structured and (
            (extended_headers and (yield from self._probe_plan(Opt.EXTENDED_HEADERS)))
            or (yield from self._probe_plan(Opt.STRUCTURED_REPLY)))
        if chunked and meta_contexts:
            try:
                yield from self._meta_plan(Opt.SET_META_CONTEXT, meta_contexts, export)
            except OptionError:
                pass  # no contexts: block status is unavailable, nothing else changes
        if safe_close:
            yield from self._probe_plan(Opt.X_CLOSE)
        yield from self._info_plan(Opt.GO, export, DEFAULT_INFOS)

    # --- requests ---------------------------------------------------------------------

    def _start(self, cmd: int, offset: int, length: int, flags: int,
               view: memoryview | None = None, zeroed: bool = False,
               chunks: list[Chunk] | None = None, sink: ReadSink | None = None,
               contexts: tuple[int, ...] | None = None) -> tuple[Request, bytes]:
        """Check and register one request: it, and the header to send."""
        if self._broken is not None or self._closed:
            self._check_usable()
        if self.server_shutting_down and cmd != _X_CLOSE:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): "
                                     "only close() or disconnect() remain")
        if self.strict:
            validate_request(self.export, self._conn, self.max_request, cmd, offset,
                             length, flags)
        cookie, header = self._conn.request(cmd, offset, length, flags, contexts)
        req = Request(cookie, cmd, offset, length, view, zeroed, chunks, sink)
        self._ops[cookie] = req
        if sink is not None:
            self._sinks += 1
        return req, header

    def _status_submit(self, offset: int, length: int, flags: int,
                       contexts: Sequence[str] | None) -> Submit:
        """A block status query; ``contexts`` (names) limits the reply to those, with
        the payload form where the server offers it, else by filtering the reply."""
        want = None if contexts is None else tuple(contexts)
        return Submit(Cmd.BLOCK_STATUS, offset, length, flags,
                      contexts=self._payload_contexts(want), want=want)

    def _payload_contexts(self, names: tuple[str, ...] | None) -> tuple[int, ...] | None:
        """Context ids for a block status payload naming ``names``, or None when the
        reply must cover every negotiated context (no names given, or the server does
        not take the payload form). Unknown names are the caller's error."""
        if names is None:
            return None
        conn = self._conn
        by_name = {n: i for i, n in conn.meta_contexts.items()}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LocalProtocolError(f"metadata context(s) {missing} were not negotiated "
                                     f"(negotiated: {sorted(by_name)})")
        ids = tuple(dict.fromkeys(by_name[n] for n in names))
        ex = conn.export
        if not conn.extended_headers or ex is None or \
                not ex.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD or \
                len(ids) == len(by_name):
            return None
        return ids

    def extents_of(self, req: Request) -> dict[str, list[Extent]]:
        return extents_by_name(self._conn.meta_contexts, req.offset, req.extents or {},
                               req.want)

    def _window_plan(self, submits: Sequence[Submit]) -> Plan[None]:
        """Send ``submits`` with at most :data:`WINDOW` in flight; then wait for all of
        them and raise the first error."""
        sent: list[Request] = []
        pending: list[Request] = []
        for s in submits:
            req: Request = yield s
            sent.append(req)
            pending.append(req)
            if len(pending) >= WINDOW:
                pending.remove((yield WaitAny(tuple(pending))))
        yield WaitAll(tuple(sent))

    def _split_plan(self, cmd: Cmd, offset: int, view: memoryview, flags: int,
                    zeroed: bool) -> Plan[None]:
        """A READ or WRITE larger than the maximum payload, in pieces."""
        step = self.max_request
        parts = [view[pos:pos + step] for pos in range(0, len(view), step)]
        if cmd == _READ:
            submits = [Submit(cmd, offset + i * step, len(p), flags, view=p, zeroed=zeroed)
                       for i, p in enumerate(parts)]
        else:
            submits = [Submit(cmd, offset + i * step, len(p), flags, payload=p)
                       for i, p in enumerate(parts)]
        yield from self._window_plan(submits)

    def _effect_plan(self, cmd: Cmd, offset: int, length: int, flags: int) -> Plan[None]:
        """A command without payload over a range of any size: one request where the
        protocol allows it; in pieces without extended headers, or when the server
        refuses an effect length above its maximum payload (qemu-nbd does for CACHE;
        the spec allows EINVAL/EOVERFLOW there)."""
        if length <= 0xFFFFFFFF or self._conn.extended_headers:
            try:
                yield Wait((yield Submit(cmd, offset, length, flags)))
                return
            except NBDRequestError as exc:
                if length <= self.max_request or exc.errno not in (errno.EINVAL,
                                                                   errno.EOVERFLOW):
                    raise
            pieces = effect_pieces(offset, length, self.max_request)
        else:
            pieces = effect_pieces(offset, length)
        yield from self._window_plan([Submit(cmd, pos, n, flags) for pos, n in pieces])

    def _block_status_plan(self, offset: int, length: int, flags: int,
                           contexts: Sequence[str] | None) -> Plan[dict[str, list[Extent]]]:
        req: Request = yield Wait((yield self._status_submit(offset, length, flags, contexts)))
        return self.extents_of(req)

    def _read_chunks_plan(self, offset: int, length: int,
                          flags: int) -> Plan[tuple[bytearray, list[Chunk]]]:
        buf = bytearray(length)
        chunks: list[Chunk] = []
        yield Wait((yield Submit(Cmd.READ, offset, length, flags, view=memoryview(buf),
                                 zeroed=True, chunks=chunks)))
        return buf, chunks

    # --- replies ----------------------------------------------------------------------

    def _route(self, fill: Callable[[], None] | None = None
               ) -> Request | ReadData | Handshake | OptionDone | _NeedData:
        """Apply buffered reply events to their requests until the driver is needed:
        returns a completed Request, a negotiation event, NEED_DATA (unless ``fill``
        receives more), or a ReadData whose payload the driver receives (into
        ``_payload``, or for a sink read into the sink; then
        ``_conn.payload_received``)."""
        conn = self._conn
        ops = self._ops
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                if fill is None:
                    return ev
                fill()
                continue
            if isinstance(ev, ReplyDone):  # (inline: the hot path)
                req = ops.pop(ev.cookie)
                req.done = True
                if ev.error or req.sink is not None:
                    self._completed_badly(req, ev)
                return req
            if isinstance(ev, ReadData):
                req = ops[ev.cookie]
                if req.sink is not None:
                    return ev
                view = req.view
                assert view is not None
                start = ev.offset - req.offset
                dest = view[start:start + ev.length]
                if req.chunks is not None:
                    req.chunks.append(Chunk(ev.offset, ev.length, dest))
                n = conn.payload_into(dest)
                if n < len(dest):
                    self._payload = dest[n:]
                    return ev
            elif isinstance(ev, ReadHole):
                self._hole(ev)
            elif isinstance(ev, BlockStatusChunk):
                req = ops[ev.cookie]
                if req.extents is None:
                    req.extents = {}
                req.extents[ev.context_id] = ev.extents
            elif not isinstance(ev, ReplyError):  # errors are reported with ReplyDone
                return ev  # a negotiation event

    def _completed_badly(self, req: Request, ev: ReplyDone) -> None:
        """The rarer ends of a request: a sink read, an error reply."""
        if req.sink is not None:
            self._sinks -= 1
        if ev.error:
            if ev.error == _ESHUTDOWN:
                self.server_shutting_down = True
            req.error = request_error(ev.cmd, ev.error, ev.message, ev.error_offset)

    def _hole(self, ev: ReadHole) -> None:
        req = self._ops[ev.cookie]
        if req.sink is not None:
            try:
                req.sink.hole(ev.offset, ev.length)
            except BaseException as exc:
                self._fail(exc)
                raise
            return
        assert req.view is not None
        if not req.zeroed:
            start = ev.offset - req.offset
            zero_fill(req.view[start:start + ev.length])
        if req.chunks is not None:
            req.chunks.append(Chunk(ev.offset, ev.length, None))

    # --- the end ----------------------------------------------------------------------

    def _abort_plan(self) -> Plan[None]:
        """NBD_OPT_ABORT: end negotiation politely (nothing outside the option phase)."""
        if self._closed or self._conn.state is not State.OPTIONS:
            return
        try:
            yield Send(self._conn.send_option(Opt.ABORT))
            yield Goodbye(1.0)  # the server may ACK; whatever comes is ignored
        except OSError:
            pass
        finally:
            self._hard_close()
        self.close_result = CloseResult(False, False, "abort")

    def _disconnect_plan(self) -> Plan[None]:
        """Finish requests in flight, send NBD_CMD_DISC and close the transport."""
        if self._closed or self._broken is not None:
            self._hard_close()
            return
        if self._conn.state is State.OPTIONS:
            yield from self._abort_plan()
            return
        if self._conn.state not in IN_TRANSMISSION:
            return
        try:
            yield Drain()
            yield Send(self._conn.request(Cmd.DISC)[1])
            yield Goodbye(5.0)
        finally:
            self._hard_close()
        self.close_result = CloseResult(False, False, "disc")

    def _close_plan(self) -> Plan[CloseResult]:
        """The safest end available, and how safe it was.

        In transmission: finish requests in flight, then NBD_CMD_X_CLOSE if it was
        negotiated (safe = the server's reply carried no error), else FLUSH (if the
        export has it and is writable) and NBD_CMD_DISC. In negotiation: NBD_OPT_ABORT.
        """
        if self.close_result is not None:
            return self.close_result
        st = self._conn.state
        if self._closed or self._broken is not None or (
                st not in IN_TRANSMISSION and st is not State.OPTIONS):
            self._hard_close()
            self.close_result = CloseResult(False, False, "none", str(self._broken or ""))
            return self.close_result
        if st is State.OPTIONS:
            yield from self._abort_plan()
            assert self.close_result is not None
            return self.close_result
        try:
            err = yield Drain()
            if self._conn.x_close and self.can_safe_close():
                result = yield from self._x_close_plan(err)
            else:
                result = yield from self._flush_disc_plan(err)
        except (PeerProtocolError, OSError, LocalProtocolError) as exc:
            result = CloseResult(False, False, "none", str(exc))
        finally:
            self._hard_close()
        self.close_result = result
        return result

    def _x_close_plan(self, err: str) -> Plan[CloseResult]:
        req = yield Submit(Cmd.X_CLOSE)
        try:
            yield Wait(req)
            result = CloseResult(True, True, "x_close", err)
        except NBDRequestError as exc:
            result = CloseResult(False, False, "x_close", str(exc))
        yield Goodbye(5.0)
        return result

    def _flush_disc_plan(self, err: str) -> Plan[CloseResult]:
        flushed = False
        if self.can_flush() and not self.server_shutting_down:
            try:
                yield Wait((yield Submit(Cmd.FLUSH)))
                flushed = True
            except NBDRequestError as exc:
                err = err or str(exc)
        yield Send(self._conn.request(Cmd.DISC)[1])
        yield Goodbye(5.0)
        return CloseResult(False, flushed, "flush+disc" if flushed else "disc", err)
