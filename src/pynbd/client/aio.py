"""asyncio NBD client: many requests awaited concurrently on one connection.

Same shape as the blocking client::

    async with await pynbd.client.aio.connect("nbd://127.0.0.1/disk") as c:
        a, b = await asyncio.gather(c.read(0, 4096), c.read(4096, 4096))

The transport is driven by an :class:`asyncio.BufferedProtocol`: read data is received
straight into the caller's buffer (``get_buffer`` hands out the destination slice while
a read payload is pending), never through ``StreamReader.readexactly``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from pynbd.client._common import (
    DEFAULT_INFOS,
    Chunk,
    CloseResult,
    Extent,
    FlagsMixin,
    as_uri,
    check_option,
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
    Opt,
    TransmissionFlag,
)
from pynbd.protocol.errors import (
    LocalProtocolError,
    NBDRequestError,
    OptionError,
    PeerProtocolError,
)

_List = list
_RECV_SIZE = 256 * 1024
_ZEROES = bytes(1024 * 1024)
_ESHUTDOWN = 108  # NBD_ESHUTDOWN


class _Op:
    __slots__ = ("chunks", "cmd", "extents", "fut", "length", "offset", "view", "zeroed")

    def __init__(self, cmd: int, offset: int, length: int, fut: asyncio.Future[Any],
                 view: memoryview | None, zeroed: bool, chunks: _List[Chunk] | None) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.fut = fut
        self.view = view
        self.zeroed = zeroed
        self.chunks = chunks
        self.extents: dict[int, tuple[tuple[int, int], ...]] = {}


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: AsyncClient) -> None:
        self.c = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.c._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        c = self.c
        if c._payload is not None:
            return c._payload[c._payload_pos:]
        return c._rview

    def buffer_updated(self, nbytes: int) -> None:
        c = self.c
        try:
            if c._payload is not None:
                c._conn.payload_received(nbytes)
                c._payload_pos += nbytes
                if c._payload_pos < len(c._payload):
                    return
                c._payload = None
            else:
                c._conn.receive_data(c._rview[:nbytes])
            c._process()
        except (PeerProtocolError, LocalProtocolError) as exc:
            c._fail(exc)

    def eof_received(self) -> bool | None:
        c = self.c
        try:
            c._conn.connection_closed()
            if c._ops or c._waiter is not None:
                raise PeerProtocolError("server closed the connection")
        except PeerProtocolError as exc:
            c._fail(exc)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.c
        if not c._lost.done():
            c._lost.set_result(None)
        err: BaseException = exc or PeerProtocolError("connection closed")
        if c._ops or c._waiter is not None:
            if exc is None:
                try:
                    c._conn.connection_closed()
                except PeerProtocolError as e:
                    err = e
            c._fail(err)
        c._closed = True

    def pause_writing(self) -> None:
        self.c._can_write.clear()

    def resume_writing(self) -> None:
        self.c._can_write.set()


class AsyncClient(FlagsMixin):
    """One NBD connection on asyncio."""

    def __init__(self, uri: NBDURI | None = None, *, tls: TLSConfig | None = None,
                 timeout: float | None = None, strict: bool = True) -> None:
        self.uri = uri
        self.timeout = timeout
        self.strict = strict
        self._tls_config = tls
        self._conn = ClientConnection()
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._transport: asyncio.Transport | None = None
        self._ops: dict[int, _Op] = {}
        self._waiter: asyncio.Future[Any] | None = None
        self._early: _List[Any] = []
        self._payload: memoryview | None = None
        self._payload_pos = 0
        self._broken: BaseException | None = None
        self._closed = False
        self._tls = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.export: ExportInfo | None = None
        self.handshake_flags = 0
        self.max_request = MAX_PAYLOAD
        #: an NBD_ESHUTDOWN reply arrived: the spec wants a soft disconnect now
        self.server_shutting_down = False
        self.close_result: CloseResult | None = None

    # --- transport ------------------------------------------------------------------

    @classmethod
    async def dial(cls, uri: str | NBDURI, *, timeout: float | None = None,
                   tls: TLSConfig | None = None, strict: bool = True) -> AsyncClient:
        u = as_uri(uri)
        if tls is None and u.tls:
            tls = TLSConfig.from_uri(u)
        self = cls(u, tls=tls, timeout=timeout, strict=strict)
        loop = asyncio.get_running_loop()
        coro: Any
        if u.is_unix:
            assert u.socket is not None
            path = u.socket
            coro = loop.create_unix_connection(
                lambda: _Protocol(self), "\0" + path[1:] if path.startswith("\0") else path)
        else:
            assert u.host is not None
            coro = loop.create_connection(lambda: _Protocol(self), u.host, u.port)
        transport, _ = await asyncio.wait_for(coro, timeout)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    @property
    def state(self) -> State:
        return self._conn.state

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
    def tls_active(self) -> bool:
        return self._tls

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    def _fail(self, exc: BaseException) -> None:
        if self._broken is None:
            self._broken = exc
        ops, self._ops = self._ops, {}
        for op in ops.values():
            if not op.fut.done():
                op.fut.set_exception(exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None
        self._hard_close()

    def _hard_close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._closed = True

    def hard_close(self) -> None:
        self._hard_close()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise PeerProtocolError(f"connection is unusable after an earlier error: "
                                    f"{self._broken}") from self._broken
        if self._closed or self._transport is None:
            raise LocalProtocolError("connection is closed")

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        if self.timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            self._fail(TimeoutError("timed out waiting for the server"))
            raise

    # --- event processing --------------------------------------------------------

    def _process(self) -> None:
        conn = self._conn
        ops = self._ops
        while True:
            ev = conn.next_event()
            t = type(ev)
            if ev is NEED_DATA:
                return
            if t is ReplyDone:
                assert isinstance(ev, ReplyDone)
                op = ops.pop(ev.cookie)
                if ev.error == _ESHUTDOWN:
                    self.server_shutting_down = True
                if not op.fut.done():
                    if ev.error:
                        op.fut.set_exception(request_error(ev.cmd, ev.error, ev.message,
                                                           ev.error_offset))
                    else:
                        op.fut.set_result(op)
            elif t is ReadData:
                assert isinstance(ev, ReadData)
                op = ops[ev.cookie]
                assert op.view is not None
                start = ev.offset - op.offset
                dest = op.view[start:start + ev.length]
                if op.chunks is not None:
                    op.chunks.append(Chunk(ev.offset, ev.length, dest))
                n = conn.payload_into(dest)
                if n < ev.length:
                    self._payload = dest
                    self._payload_pos = n
                    return  # the rest arrives straight into dest (get_buffer)
            elif t is ReadHole:
                assert isinstance(ev, ReadHole)
                op = ops[ev.cookie]
                assert op.view is not None
                if not op.zeroed:
                    start = ev.offset - op.offset
                    v = op.view[start:start + ev.length]
                    for pos in range(0, len(v), len(_ZEROES)):
                        k = min(len(v) - pos, len(_ZEROES))
                        v[pos:pos + k] = _ZEROES[:k]
                if op.chunks is not None:
                    op.chunks.append(Chunk(ev.offset, ev.length, None))
            elif t is BlockStatusChunk:
                assert isinstance(ev, BlockStatusChunk)
                ops[ev.cookie].extents[ev.context_id] = ev.extents
            elif t is ReplyError:
                pass
            elif t is Handshake or t is OptionDone:
                w = self._waiter
                self._waiter = None
                if w is not None and not w.done():
                    w.set_result(ev)
                else:  # arrived before anyone asked (e.g. the greeting)
                    self._early.append(ev)
                if conn.state is not State.OPTION_REPLY:
                    return  # one negotiation event at a time
            else:  # pragma: no cover
                raise PeerProtocolError(f"unexpected event {ev!r}")

    async def _negotiation_event(self) -> Any:
        if self._early:
            return self._early.pop(0)
        self._check_usable()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._waiter = fut
        try:
            self._process()  # it may already be buffered
        except PeerProtocolError as exc:
            self._fail(exc)
        return await self._wait(fut)

    # --- handshake and options ------------------------------------------------------

    async def connect(self) -> Handshake:
        ev = await self._negotiation_event()
        assert isinstance(ev, Handshake)
        self.handshake_flags = ev.handshake_flags
        assert self._transport is not None
        self._transport.write(self._conn.take_output())
        if self._tls_config is not None and (self.uri is None or self.uri.tls):
            await self.starttls(self._tls_config)
        return ev

    async def option(self, option: int, data: bytes = b"") -> OptionDone:
        self._check_usable()
        assert self._transport is not None
        self._transport.write(self._conn.send_option(option, data))
        ev = await self._negotiation_event()
        assert isinstance(ev, OptionDone)
        return ev

    async def starttls(self, config: TLSConfig | None = None) -> None:
        config = config or self._tls_config or (
            TLSConfig.from_uri(self.uri) if self.uri else TLSConfig())
        check_option(await self.option(Opt.STARTTLS))
        loop = asyncio.get_running_loop()
        assert self._transport is not None
        proto = self._transport.get_protocol()
        try:
            new = await asyncio.wait_for(loop.start_tls(
                self._transport, proto, config.context(),
                server_hostname=config.server_hostname), self.timeout)
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            raise
        assert new is not None
        self._transport = new
        self._tls = True
        self._conn.tls_established()

    def _name(self, name: str | None) -> str:
        if name is not None:
            return name
        return self.uri.export if self.uri is not None else ""

    async def list(self) -> _List[ExportEntry]:
        return list_result(await self.option(Opt.LIST))

    async def info(self, name: str | None = None,
                   infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        done = check_option(await self.option(Opt.INFO, info_data(self._name(name), infos)))
        assert done.info is not None
        return done.info

    async def go(self, name: str | None = None,
                 infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        done = check_option(await self.option(Opt.GO, info_data(self._name(name), infos)))
        assert done.info is not None
        self._enter(done.info)
        return done.info

    async def export_name(self, name: str | None = None) -> ExportInfo:
        done = await self.option(Opt.EXPORT_NAME, self._name(name).encode("utf-8"))
        assert done.info is not None
        self._enter(done.info)
        return done.info

    def _enter(self, info: ExportInfo) -> None:
        self.export = info
        self.max_request = max_request_for(info)

    async def structured_replies(self) -> bool:
        return probe_ok(await self.option(Opt.STRUCTURED_REPLY))

    async def extended_headers(self) -> bool:
        """NBD_OPT_EXTENDED_HEADERS; False if the server does not speak them."""
        return probe_ok(await self.option(Opt.EXTENDED_HEADERS))

    async def negotiate_safe_close(self) -> bool:
        return probe_ok(await self.option(Opt.X_CLOSE))

    async def list_meta_context(self, *queries: str,
                                export: str | None = None) -> _List[MetaContext]:
        return meta_result(await self.option(Opt.LIST_META_CONTEXT,
                                             meta_data(self._name(export), queries)))

    async def set_meta_context(self, *queries: str,
                               export: str | None = None) -> _List[MetaContext]:
        return meta_result(await self.option(Opt.SET_META_CONTEXT,
                                             meta_data(self._name(export), queries)))

    async def abort(self) -> None:
        if self._closed or self._conn.state is not State.OPTIONS:
            return
        assert self._transport is not None
        self._transport.write(self._conn.send_option(Opt.ABORT))
        await self._close_transport()
        self.close_result = CloseResult(False, False, "abort")

    async def _close_transport(self) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            if t.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    t.write_eof()
            else:
                t.close()
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), 5.0)
            except TimeoutError:
                pass
        self._hard_close()

    # --- transmission ------------------------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int,
                view: memoryview | None = None, payload: memoryview | None = None,
                zeroed: bool = False, chunks: _List[Chunk] | None = None,
                contexts: tuple[int, ...] | None = None) -> asyncio.Future[Any]:
        if self._broken is not None or self._closed:
            self._check_usable()
        if self.server_shutting_down and cmd != Cmd.X_CLOSE:
            raise LocalProtocolError("the server is shutting down (NBD_ESHUTDOWN): "
                                     "only close() or disconnect() remain")
        if self.strict:
            self._validate(cmd, offset, length, flags)
        cookie, header = self._conn.request(cmd, offset, length, flags, contexts)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops[cookie] = _Op(cmd, offset, length, fut, view, zeroed, chunks)
        assert self._transport is not None
        self._transport.write(header)
        if payload is not None:
            self._transport.write(payload)
        return fut

    def _validate(self, cmd: int, offset: int, length: int, flags: int) -> None:
        from pynbd.client.blocking import validate_request
        validate_request(self.export, self._conn, self.max_request, cmd, offset, length, flags)

    async def _drain_writes(self) -> None:
        if not self._can_write.is_set():
            await self._can_write.wait()

    async def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        buf = bytearray(length)
        if length > self.max_request:
            await self._split(Cmd.READ, offset, memoryview(buf), flags, True)
        elif length:
            await self._wait(self._submit(Cmd.READ, offset, length, flags, memoryview(buf),
                                          None, True))
        return buf

    async def read_into(self, offset: int, buf: bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        if len(view) > self.max_request:
            await self._split(Cmd.READ, offset, view, flags, False)
        elif view:
            await self._wait(self._submit(Cmd.READ, offset, len(view), flags, view))

    async def _split(self, cmd: int, offset: int, view: memoryview, flags: int,
                     zeroed: bool) -> None:
        """Requests larger than the maximum payload, as several in flight at once."""
        step = self.max_request
        futs = []
        for pos in range(0, len(view), step):
            part = view[pos:pos + step]
            if cmd == Cmd.READ:
                futs.append(self._submit(cmd, offset + pos, len(part), flags, part, None,
                                         zeroed))
            else:
                futs.append(self._submit(cmd, offset + pos, len(part), flags, None, part))
                await self._drain_writes()
        results = await asyncio.gather(*(self._wait(f) for f in futs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def read_chunks(self, offset: int, length: int,
                          flags: int = 0) -> tuple[bytearray, _List[Chunk]]:
        buf = bytearray(length)
        chunks: _List[Chunk] = []
        await self._wait(self._submit(Cmd.READ, offset, length, flags, memoryview(buf), None,
                                      True, chunks))
        return buf, chunks

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        if len(view) > self.max_request:
            await self._split(Cmd.WRITE, offset, view, flags, False)
            return
        if not view:
            return
        fut = self._submit(Cmd.WRITE, offset, len(view), flags, None, view)
        await self._drain_writes()
        await self._wait(fut)

    async def flush(self, flags: int = 0) -> None:
        await self._wait(self._submit(Cmd.FLUSH, 0, 0, flags))

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        """One request under extended headers (64-bit length), else as many as 32-bit
        lengths need."""
        await self._effect(Cmd.TRIM, offset, length, flags)

    async def cache(self, offset: int, length: int, flags: int = 0) -> None:
        await self._effect(Cmd.CACHE, offset, length, flags)

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self._effect(Cmd.WRITE_ZEROES, offset, length, flags)

    async def _effect(self, cmd: int, offset: int, length: int, flags: int) -> None:
        """See the blocking client's ``_effect``: one request where possible."""
        if length <= 0xFFFFFFFF or self.extended:
            try:
                await self._wait(self._submit(cmd, offset, length, flags))
                return
            except NBDRequestError as exc:
                if length <= self.max_request or \
                        exc.errno not in (errno.EINVAL, errno.EOVERFLOW):
                    raise
            pieces = [(pos, min(self.max_request, offset + length - pos))
                      for pos in range(offset, offset + length, self.max_request)]
        else:
            pieces = effect_pieces(offset, length)
        futs = [self._submit(cmd, pos, n, flags) for pos, n in pieces]
        results = await asyncio.gather(*(self._wait(f) for f in futs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def block_status(self, offset: int, length: int, flags: int = 0,
                           contexts: Sequence[str] | None = None) -> dict[str, _List[Extent]]:
        """Extents per context name (every negotiated one, or ``contexts``: the payload
        form where the server offers it, else filtered here)."""
        ids = payload_contexts(self._conn, contexts)
        op: _Op = await self._wait(self._submit(Cmd.BLOCK_STATUS, offset, length, flags,
                                                contexts=ids))
        return extents_by_name(self._conn.meta_contexts, offset, op.extents,
                               None if contexts is None else tuple(contexts))

    async def gather(self, coros: Iterable[Any]) -> _List[Any]:
        """Run request coroutines concurrently; convenience for ``asyncio.gather``."""
        return _List(await asyncio.gather(*coros))

    # --- teardown ----------------------------------------------------------------

    async def _drain(self) -> str:
        err = ""
        futs = [op.fut for op in self._ops.values()]
        if futs:
            results = await asyncio.gather(*futs, return_exceptions=True)
            for r in results:
                if isinstance(r, NBDRequestError) and not err:
                    err = str(r)
                elif isinstance(r, BaseException) and not isinstance(r, NBDRequestError):
                    raise r
        return err

    async def disconnect(self) -> None:
        if self._closed or self._broken is not None:
            self._hard_close()
            return
        if self._conn.state in (State.TRANSMISSION, State.PAYLOAD):
            try:
                await self._drain()
                _, header = self._conn.request(Cmd.DISC)
                assert self._transport is not None
                self._transport.write(header)
                await self._close_transport()
            finally:
                self._hard_close()
            self.close_result = CloseResult(False, False, "disc")
        elif self._conn.state is State.OPTIONS:
            await self.abort()

    async def close(self) -> CloseResult:
        """Safe close (NBD_CMD_X_CLOSE) where negotiated, else FLUSH + DISC; see the
        blocking client's :meth:`~pynbd.client.blocking.Client.close`."""
        if self.close_result is not None:
            return self.close_result
        if self._closed or self._broken is not None:
            self._hard_close()
            self.close_result = CloseResult(False, False, "none", str(self._broken or ""))
            return self.close_result
        st = self._conn.state
        if st is State.OPTIONS:
            await self.abort()
            assert self.close_result is not None
            return self.close_result
        if st not in (State.TRANSMISSION, State.PAYLOAD):
            self._hard_close()
            self.close_result = CloseResult(False, False, "none")
            return self.close_result
        try:
            err = await self._drain()
            assert self._transport is not None
            if self._conn.x_close and self.export is not None and \
                    self.export.flags & TransmissionFlag.X_SEND_CLOSE:
                cookie, header = self._conn.request(Cmd.X_CLOSE)
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._ops[cookie] = _Op(Cmd.X_CLOSE, 0, 0, fut, None, False, None)
                self._transport.write(header)
                try:
                    await self._wait(fut)
                    result = CloseResult(True, True, "x_close", err)
                except NBDRequestError as exc:
                    result = CloseResult(False, False, "x_close", str(exc))
                await self._close_transport()
            else:
                flushed = False
                if self.export is not None and self.export.flags & \
                        TransmissionFlag.SEND_FLUSH and not self.server_shutting_down:
                    try:
                        await self.flush()
                        flushed = True
                    except NBDRequestError as exc:
                        err = err or str(exc)
                _, header = self._conn.request(Cmd.DISC)
                self._transport.write(header)
                await self._close_transport()
                result = CloseResult(False, flushed, "flush+disc" if flushed else "disc", err)
        except (PeerProtocolError, OSError, LocalProtocolError) as exc:
            result = CloseResult(False, False, "none", str(exc))
        finally:
            self._hard_close()
        self.close_result = result
        return result

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if et is not None and self._broken is not None:
            self._hard_close()
            return
        await self.close()


async def dial(uri: str | NBDURI, *, timeout: float | None = None,
               tls: TLSConfig | None = None, strict: bool = True) -> AsyncClient:
    return await AsyncClient.dial(uri, timeout=timeout, tls=tls, strict=strict)


async def connect(uri: str | NBDURI, *, export: str | None = None, structured: bool = True,
                  meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,),
                  safe_close: bool = True, timeout: float | None = None,
                  tls: TLSConfig | None = None, strict: bool = True,
                  extended_headers: bool = True) -> AsyncClient:
    """asyncio twin of :func:`pynbd.client.connect`."""
    c = await AsyncClient.dial(uri, timeout=timeout, tls=tls, strict=strict)
    try:
        await c.connect()
        chunked = structured and ((extended_headers and await c.extended_headers())
                                  or await c.structured_replies())
        if chunked and meta_contexts:
            with contextlib.suppress(OptionError):
                await c.set_meta_context(*meta_contexts, export=export)
        if safe_close:
            await c.negotiate_safe_close()
        await c.go(export)
    except BaseException:
        c.hard_close()
        raise
    return c
