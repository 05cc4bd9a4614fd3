"""asyncio NBD client: the session (:mod:`pynbd.client.session`) on an asyncio transport;
many requests awaited concurrently on one connection.

Same shape as the blocking client::

    async with await pynbd.client.aio.connect("nbd://127.0.0.1/disk") as c:
        a, b = await asyncio.gather(c.read(0, 4096), c.read(4096, 4096))

The transport is driven by an :class:`asyncio.BufferedProtocol`: read data is received
straight into the caller's buffer (``get_buffer`` hands out the destination slice while
a read payload is pending), never through ``StreamReader.readexactly``. With a
``timeout``, every wait on the server is bounded by it, closing included.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import socket
import ssl
import warnings
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from pynbd.client import plans
from pynbd.client._common import DEFAULT_INFOS, Chunk, CloseResult, Extent, Request
from pynbd.client.rules import as_uri
from pynbd.client.session import ClientSession, ExportEntry, ExportInfo, MetaContext
from pynbd.client.tls import TLSConfig
from pynbd.client.uri import NBDURI
from pynbd.protocol.client import NEED_DATA, Handshake, OptionDone, ReadData, State
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, Opt
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, PeerProtocolError

_RECV_SIZE = 256 * 1024
_READ = Cmd.READ
_WRITE = Cmd.WRITE


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: AsyncClient) -> None:
        self.c = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.c._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        c = self.c
        payload = c._payload
        if payload is not None:
            return payload
        return c._rview

    def buffer_updated(self, nbytes: int) -> None:
        c = self.c
        try:
            payload = c._payload
            if payload is not None:
                c._conn.payload_received(nbytes)
                if nbytes < len(payload):
                    c._payload = payload[nbytes:]
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
        c._can_write.set()  # nothing will drain any more: writers must not wait
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


class AsyncClient(ClientSession):
    """One NBD connection on asyncio."""

    def __init__(self, uri: NBDURI | None = None, *, tls: TLSConfig | None = None,
                 timeout: float | None = None, strict: bool = True) -> None:
        super().__init__(uri, tls, strict)
        self.timeout = timeout
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._early: list[Handshake | OptionDone] = []
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

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

    async def _run(self, plan: plans.Plan[Any]) -> Any:
        return await plans.run_async(plan, self._perform)

    # --- transport --------------------------------------------------------------------

    def _on_broken(self, exc: BaseException) -> None:
        self._can_write.set()  # a writer waiting for the transport to drain: wake it
        ops, self._ops = self._ops, {}
        for req in ops.values():
            fut = req.waiter
            if fut is not None and not fut.done():
                fut.set_exception(exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._waiter = None

    def _hard_close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.abort()
        self._closed = True

    def hard_close(self) -> None:
        self._hard_close()

    def _check_usable(self) -> None:
        super()._check_usable()
        if self._transport is None:
            raise LocalProtocolError("connection is closed")

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        if self.timeout is None:
            return await fut
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except TimeoutError:
            raise self._timed_out() from None

    def _timed_out(self) -> TimeoutError:
        """The server did not answer within the timeout: the connection is unusable."""
        err = TimeoutError(f"timed out waiting for the server ({self.timeout:g} s)")
        self._fail(err)
        return err

    async def _close_transport(self, timeout: float) -> None:
        t = self._transport
        if t is not None and not t.is_closing():
            if t.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    t.write_eof()
            else:
                t.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        self._hard_close()

    # --- event processing -------------------------------------------------------------

    def _process(self) -> None:
        route = self._route
        while True:
            r = route()
            if type(r) is Request:
                fut = r.waiter
                if fut is not None and not fut.done():
                    if r.error is not None:
                        fut.set_exception(r.error)
                    else:
                        fut.set_result(r)
            elif r is NEED_DATA:
                return
            elif isinstance(r, ReadData):
                return  # the rest arrives straight into self._payload (get_buffer)
            else:
                assert isinstance(r, Handshake | OptionDone)
                w = self._waiter
                self._waiter = None
                if w is not None and not w.done():
                    w.set_result(r)
                else:  # arrived before anyone asked (e.g. the greeting)
                    self._early.append(r)
                if self._conn.state is not State.OPTION_REPLY:
                    return  # one negotiation event at a time

    async def _negotiation_event(self) -> Handshake | OptionDone:
        if self._early:
            return self._early.pop(0)
        self._check_usable()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiter = fut
        try:
            self._process()  # it may already be buffered
        except PeerProtocolError as exc:
            self._fail(exc)
        ev: Handshake | OptionDone = await self._wait(fut)
        return ev

    # --- steps of the session's plans -------------------------------------------------

    async def _do_greet(self, step: plans.Greet) -> Handshake:
        ev = await self._negotiation_event()
        assert isinstance(ev, Handshake) and self._transport is not None
        self._transport.write(self._conn.take_output())
        return ev

    async def _do_negotiate(self, step: plans.Negotiate) -> OptionDone:
        return await self.option(step.option, step.data)

    async def _do_upgrade_tls(self, step: plans.UpgradeTLS) -> None:
        loop = asyncio.get_running_loop()
        assert self._transport is not None
        proto = self._transport.get_protocol()
        try:
            new = await asyncio.wait_for(loop.start_tls(
                self._transport, proto, step.config.context(),
                server_hostname=step.config.server_hostname), self.timeout)
        except (ssl.SSLError, OSError) as exc:
            self._fail(exc)
            raise
        assert new is not None
        self._transport = new

    async def _do_submit(self, step: plans.Submit) -> Request:
        req = self._submit(step.cmd, step.offset, step.length, step.flags, step.view,
                           step.payload, step.zeroed, step.chunks, step.contexts)
        req.want = step.want
        if step.payload is not None:
            try:
                await self._drain_writes()
            except BaseException:
                if req.waiter is not None:
                    _retrieved(req.waiter)
                raise
        return req

    async def _do_wait(self, step: plans.Wait) -> Request:
        req: Request = await self._wait(step.req.waiter)
        return req

    async def _do_wait_any(self, step: plans.WaitAny) -> Request:
        for req in step.reqs:
            if req.done:
                return req
        futs = {req.waiter: req for req in step.reqs}
        done, _ = await asyncio.wait(futs, timeout=self.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise self._timed_out()
        return futs[next(iter(done))]

    async def _do_wait_all(self, step: plans.WaitAll) -> None:
        results = await asyncio.gather(*(self._wait(r.waiter) for r in step.reqs),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _do_drain(self, step: plans.Drain) -> str:
        err = ""
        futs = [req.waiter for req in self._ops.values()]
        results = await asyncio.gather(*(self._wait(f) for f in futs),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, NBDRequestError):
                err = err or str(r)
            elif isinstance(r, BaseException):
                raise r
        return err

    async def _do_send(self, step: plans.Send) -> None:
        assert self._transport is not None
        self._transport.write(step.data)

    async def _do_goodbye(self, step: plans.Goodbye) -> None:
        await self._close_transport(step.timeout)

    # --- handshake and options --------------------------------------------------------

    async def handshake(self) -> Handshake:
        """Receive the greeting, send client flags; STARTTLS first if the URI says so."""
        hs: Handshake = await self._run(self._handshake_plan())
        return hs

    async def option(self, option: int, data: bytes = b"") -> OptionDone:
        """Send one option and collect every reply (no error check)."""
        self._check_usable()
        assert self._transport is not None
        self._transport.write(self._conn.send_option(option, data))
        ev = await self._negotiation_event()
        assert isinstance(ev, OptionDone)
        return ev

    async def starttls(self, config: TLSConfig | None = None) -> None:
        await self._run(self._starttls_plan(config))

    async def list_exports(self) -> list[ExportEntry]:
        exports: list[ExportEntry] = await self._run(self._list_plan())
        return exports

    async def info(self, name: str | None = None,
                   infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        info: ExportInfo = await self._run(self._info_plan(Opt.INFO, name, infos))
        return info

    async def go(self, name: str | None = None,
                 infos: tuple[int, ...] = DEFAULT_INFOS) -> ExportInfo:
        info: ExportInfo = await self._run(self._info_plan(Opt.GO, name, infos))
        return info

    async def export_name(self, name: str | None = None) -> ExportInfo:
        info: ExportInfo = await self._run(self._export_name_plan(name))
        return info

    async def structured_replies(self) -> bool:
        return bool(await self._run(self._probe_plan(Opt.STRUCTURED_REPLY)))

    async def extended_headers(self) -> bool:
        """NBD_OPT_EXTENDED_HEADERS; False if the server does not speak them."""
        return bool(await self._run(self._probe_plan(Opt.EXTENDED_HEADERS)))

    async def negotiate_safe_close(self) -> bool:
        return bool(await self._run(self._probe_plan(Opt.X_CLOSE)))

    async def list_meta_context(self, *queries: str,
                                export: str | None = None) -> list[MetaContext]:
        return await self._contexts(Opt.LIST_META_CONTEXT, queries, export)

    async def set_meta_context(self, *queries: str,
                               export: str | None = None) -> list[MetaContext]:
        return await self._contexts(Opt.SET_META_CONTEXT, queries, export)

    async def _contexts(self, option: Opt, queries: Sequence[str],
                        export: str | None) -> list[MetaContext]:
        contexts: list[MetaContext] = await self._run(self._meta_plan(option, queries,
                                                                      export))
        return contexts

    async def abort(self) -> None:
        await self._run(self._abort_plan())

    # --- transmission -----------------------------------------------------------------

    def _submit(self, cmd: int, offset: int, length: int, flags: int,
                view: memoryview | None = None, payload: memoryview | None = None,
                zeroed: bool = False, chunks: list[Chunk] | None = None,
                contexts: tuple[int, ...] | None = None) -> Request:
        req, header = self._start(cmd, offset, length, flags, view, zeroed, chunks, None,
                                  contexts)
        req.waiter = asyncio.get_running_loop().create_future()
        transport = self._transport
        assert transport is not None
        transport.write(header)
        if payload is not None:
            transport.write(payload)
        return req

    async def _drain_writes(self) -> None:
        """Wait until the transport takes more (bounded by the timeout); a connection
        that broke meanwhile raises."""
        if not self._can_write.is_set():
            if self.timeout is None:
                await self._can_write.wait()
            else:
                try:
                    await asyncio.wait_for(self._can_write.wait(), self.timeout)
                except TimeoutError:
                    raise self._timed_out() from None
            self._check_usable()

    async def read(self, offset: int, length: int, flags: int = 0) -> bytearray:
        buf = bytearray(length)
        if length > self.max_request:
            await self._run(self._split_plan(_READ, offset, memoryview(buf), flags, True))
        elif length:
            await self._wait(self._submit(_READ, offset, length, flags, memoryview(buf),
                                          None, True).waiter)
        return buf

    async def read_into(self, offset: int, buf: bytearray | memoryview, flags: int = 0) -> None:
        view = memoryview(buf).cast("B")
        if len(view) > self.max_request:
            await self._run(self._split_plan(_READ, offset, view, flags, False))
        elif view:
            await self._wait(self._submit(_READ, offset, len(view), flags, view).waiter)

    async def read_chunks(self, offset: int, length: int,
                          flags: int = 0) -> tuple[bytearray, list[Chunk]]:
        got: tuple[bytearray, list[Chunk]] = await self._run(
            self._read_chunks_plan(offset, length, flags))
        return got

    async def write(self, offset: int, data: bytes | bytearray | memoryview,
                    flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        if len(view) > self.max_request:
            await self._run(self._split_plan(_WRITE, offset, view, flags, False))
        elif view:
            fut = self._submit(_WRITE, offset, len(view), flags, None, view).waiter
            try:
                await self._drain_writes()
            except BaseException:
                _retrieved(fut)  # it holds the same error: not "never retrieved"
                raise
            await self._wait(fut)

    async def flush(self, flags: int = 0) -> None:
        await self._wait(self._submit(Cmd.FLUSH, 0, 0, flags).waiter)

    async def trim(self, offset: int, length: int, flags: int = 0) -> None:
        """One request under extended headers (64-bit length), else as many as 32-bit
        lengths need."""
        await self._run(self._effect_plan(Cmd.TRIM, offset, length, flags))

    async def cache(self, offset: int, length: int, flags: int = 0) -> None:
        await self._run(self._effect_plan(Cmd.CACHE, offset, length, flags))

    async def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        await self._run(self._effect_plan(Cmd.WRITE_ZEROES, offset, length, flags))

    async def block_status(self, offset: int, length: int, flags: int = 0,
                           contexts: Sequence[str] | None = None) -> dict[str, list[Extent]]:
        """Extents per context name (every negotiated one, or ``contexts``: the payload
        form where the server offers it, else filtered here)."""
        got: dict[str, list[Extent]] = await self._run(
            self._block_status_plan(offset, length, flags, contexts))
        return got

    async def gather(self, coros: Iterable[Any]) -> list[Any]:
        """Run request coroutines concurrently; convenience for ``asyncio.gather``."""
        return list(await asyncio.gather(*coros))

    # --- teardown ---------------------------------------------------------------------

    async def disconnect(self) -> None:
        await self._run(self._disconnect_plan())

    async def close(self) -> CloseResult:
        """Safe close (NBD_CMD_X_CLOSE) where negotiated, else FLUSH + DISC; see the
        blocking client's :meth:`~pynbd.client.blocking.Client.close`."""
        result: CloseResult = await self._run(self._close_plan())
        return result

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._drop_on_exit(et):
            await self.close()

    # --- deprecated names (last: ``list`` would shadow the builtin in the class) -------

    async def connect(self) -> Handshake:
        """Deprecated: :meth:`handshake` (``connect`` is the module's dial-and-negotiate)."""
        warnings.warn("AsyncClient.connect() is now AsyncClient.handshake()",
                      DeprecationWarning, stacklevel=2)
        return await self.handshake()

    async def list(self) -> builtins.list[ExportEntry]:
        """Deprecated: :meth:`list_exports`."""
        warnings.warn("AsyncClient.list() is now AsyncClient.list_exports()",
                      DeprecationWarning, stacklevel=2)
        return await self.list_exports()


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
        await c._run(c._connect_plan(export, structured, meta_contexts, safe_close,
                                     extended_headers))
    except BaseException:
        c.hard_close()
        raise
    return c


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark ``fut``'s exception as seen (now or when it comes): its error has been
    raised to the caller another way. An unretrieved one is logged from the garbage
    collector, at any moment, e.g. in the middle of a compile() of another module."""
    if fut.done():
        if not fut.cancelled():
            fut.exception()
    else:
        fut.add_done_callback(lambda f: None if f.cancelled() else f.exception())
