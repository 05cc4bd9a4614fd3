"""The client side: :meth:`Msgr2Client.connect` opens a session; lossless sessions
reconnect transparently when the connection drops."""

from __future__ import annotations

import asyncio
import socket
import time

from pynbd.msgr2.aio.link import Link
from pynbd.msgr2.aio.session import Msgr2Session, SessionOptions
from pynbd.msgr2.auth import ClientAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AddrType, ConMode, EntityType
from pynbd.msgr2.encoding import EntityAddr
from pynbd.msgr2.errors import (
    AuthenticationError,
    ConnectionClosedError,
    Msgr2Error,
    ProtocolError,
    SessionResetError,
    UsageError,
)
from pynbd.msgr2.session import Session


def _mode_tuple(mode: str | tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(mode, tuple):
        return mode
    table = {"crc": (ConMode.CRC,), "secure": (ConMode.SECURE,),
             "prefer-secure": (ConMode.SECURE, ConMode.CRC)}
    try:
        return tuple(int(m) for m in table[mode])
    except KeyError:
        raise UsageError(f"mode must be one of {sorted(table)}, not {mode!r}") from None


class ClientSession(Msgr2Session):
    """Client side; lossless sessions reconnect transparently."""

    def __init__(self, host: str, port: int, config: ConnectionConfig, session: Session,
                 options: SessionOptions) -> None:
        super().__init__(session, options)
        self.host = host
        self.port = port
        self.config = config
        self._reconnecting = False

    async def _open(self) -> Link:
        loop = asyncio.get_running_loop()
        conn = Connection(Role.CLIENT, self.config, self.session)
        self._ready.clear()
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: Link(conn, self), self.host, self.port),
            self.options.connect_timeout)
        link = proto
        self.link = link
        ready = asyncio.ensure_future(self._ready.wait())
        lost = asyncio.ensure_future(link.closed.wait())
        try:
            done, _ = await asyncio.wait({ready, lost}, timeout=self.options.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            lost.cancel()
        if not done:
            link.abort()
            raise TimeoutError(f"msgr2 handshake with {self.host}:{self.port} timed out")
        self._check()
        if not link.conn.ready:
            err = link.error
            if isinstance(err, Msgr2Error):
                raise err
            raise ConnectionClosedError(
                f"{self.host}:{self.port} closed the connection during the handshake"
                + (f" ({err})" if err else ""))
        return link

    def link_lost(self, link: Link) -> None:
        if link is not self.link or self._closed:
            return
        if not link.conn.ready and self.established is None:
            return  # handshake failure: _open reports it
        if isinstance(link.error, (ProtocolError,)) and not self.session.lossless:
            self._set_error(link.error)
            return
        if self.session.lossless and self.established is not None:
            if not self._reconnecting:
                self._reconnecting = True
                self._start_task(self._reconnect_loop())
        else:
            self._set_error(link.error or ConnectionClosedError("connection lost"))

    async def _reconnect_loop(self) -> None:
        deadline = time.monotonic() + self.options.reconnect_timeout
        delay = 0.01
        last: BaseException | None = None
        try:
            while not self._closed and time.monotonic() < deadline:
                try:
                    await self._open()
                    self.reconnects += 1
                    return
                except (OSError, TimeoutError, Msgr2Error) as exc:
                    last = exc
                    if isinstance(exc, (SessionResetError, AuthenticationError)):
                        break  # retrying cannot help
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            if not self._closed:
                self._set_error(ConnectionClosedError(
                    f"could not reconnect to {self.host}:{self.port}: {last}"))
        finally:
            self._reconnecting = False
            link = self.link
            if link is not None and link.closed.is_set() and not self._closed and \
                    self._error is None:
                # lost again while we were finishing: go round once more
                self.link_lost(link)


class Msgr2Client:
    """Factory for client sessions."""

    @staticmethod
    async def connect(host: str, port: int, *, auth: ClientAuth, mode: str = "crc",
                      lossless: bool = True, entity_type: int = EntityType.CLIENT,
                      target_nonce: int = 0, options: SessionOptions | None = None,
                      gid: int = 0) -> ClientSession:
        opts = options or SessionOptions()
        cfg = ConnectionConfig(
            entity_type=entity_type, auth_client=auth, modes=_mode_tuple(mode),
            target_addr=EntityAddr(AddrType.MSGR2, target_nonce, _resolve(host), port),
            gid=gid, max_segment_len=opts.max_segment_len)
        session = Session(lossless=lossless)
        cs = ClientSession(host, port, cfg, session, opts)
        try:
            await cs._open()
        except BaseException:
            await cs.close(timeout=0.5)
            raise
        return cs


def _resolve(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        return host
