"""Hand-driven msgr2 peers for the destination tests: a source that sends any message
(or part of one), with or without the right key."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from pynbd.migration import wire
from pynbd.msgr2.auth import AuthNone, PskAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AddrType, ConMode
from pynbd.msgr2.encoding import EntityAddr
from pynbd.msgr2.events import Event, MessageReceived
from pynbd.msgr2.session import Session

SIZE = 8 * 1024 * 1024


class RawSource:
    """A msgr2 client on a blocking socket, driven by the sans-I/O ``Connection``: sends
    any message (or part of one) and sees when the destination hangs up. ``key``: the
    pre-shared key to authenticate with (None: auth none)."""

    def __init__(self, port: int, key: bytes | None, lossless: bool = False,
                 timeout: float = 10.0, secure: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        auth: AuthNone | PskAuth = PskAuth(key) if key is not None else AuthNone()
        cfg = ConnectionConfig(auth_client=auth,
                               modes=(ConMode.SECURE,) if secure else (ConMode.CRC,),
                               target_addr=EntityAddr(AddrType.MSGR2, 0, "127.0.0.1", port))
        self.conn = Connection(Role.CLIENT, cfg, Session(lossless=lossless))
        self.received: list[tuple[int, bytes]] = []
        #: every event of the connection (what this peer learned)
        self.events: list[Event] = []
        self.closed = False
        try:
            self._flush()
            deadline = time.monotonic() + timeout
            while not self.conn.ready:
                self._pump(deadline)
        except BaseException:
            self.close()
            raise

    def _flush(self) -> None:
        for c in self.conn.data_to_send():
            self.sock.sendall(c)

    def _pump(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("the destination said nothing")
        try:
            data = self.sock.recv(1 << 16)
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            raise ConnectionError("the destination closed the connection")
        events = self.conn.receive_data(data)
        self.events += events
        for ev in events:
            if isinstance(ev, MessageReceived):
                self.received.append((ev.header.type, bytes(ev.front)))
        self._flush()

    def send(self, msg_type: int, front: bytes = b"", data: bytes = b"") -> None:
        self.conn.send_message(msg_type, front, data)
        self._flush()

    def request(self, msg_type: int, obj: dict[str, Any],
                timeout: float = 10.0) -> dict[str, Any]:
        self.send(msg_type, wire.enc(dict(obj, token=7)))
        deadline = time.monotonic() + timeout
        while not self.received:
            self._pump(deadline)
        return wire.dec(self.received.pop(0)[1])

    def request_raw(self, msg_type: int, front: bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Send a message whose front is exactly ``front`` (e.g. captured bytes); the
        reply."""
        self.send(msg_type, front)
        deadline = time.monotonic() + timeout
        while not self.received:
            self._pump(deadline)
        return wire.dec(self.received.pop(0)[1])

    def hello(self, size: int = SIZE, purpose: str = "copy") -> dict[str, Any]:
        return self.request(wire.HELLO, {"size": size, "purpose": purpose})

    def send_part(self, msg_type: int, front: bytes, data: bytes, fraction: float) -> None:
        """Send only the first ``fraction`` of the message's bytes."""
        self.conn.send_message(msg_type, front, data)
        blob = b"".join(bytes(c) for c in self.conn.data_to_send())
        self.sock.sendall(blob[:int(len(blob) * fraction)])

    def hung_up(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) for the destination to close; True if it did."""
        deadline = time.monotonic() + timeout
        try:
            for _ in range(10000):
                self._pump(deadline)
        except ConnectionError:
            return True
        except TimeoutError:
            return False
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def hello_reply(self, size: int = SIZE, purpose: str = "copy",
                    **extra: Any) -> dict[str, Any]:
        """HELLO with any extra fields; the reply."""
        return self.request(wire.HELLO, dict(extra, size=size, purpose=purpose))

    @property
    def cookies(self) -> tuple[int, int]:
        """(client cookie, server cookie) of this msgr2 session."""
        s = self.conn.session
        assert s is not None
        return s.client_cookie, s.server_cookie

    def release(self) -> None:
        self.send(wire.RELEASE, wire.enc({"token": 0}))


def hello_when_free(port: int, key: bytes | None, lossless: bool = False,
                    timeout: float = 20.0) -> RawSource:
    """A RawSource whose copy HELLO was accepted: retried (bounded) while the destination
    says another source owns the copy (it does until that one's takeover grace passed)."""
    deadline = time.monotonic() + timeout
    while True:
        r = RawSource(port, key, lossless=lossless)
        reply = r.hello()
        if reply["ok"]:
            return r
        r.close()
        assert reply.get("busy"), reply
        if time.monotonic() > deadline:
            raise TimeoutError(f"the destination stayed busy: {reply}")
        time.sleep(0.1)


def try_connect(port: int, key: bytes | None, lossless: bool = False,
                secure: bool = False) -> tuple[list[Event], BaseException | None]:
    """Try to get a msgr2 session with ``key``: the events the peer saw and the error that
    ended the attempt (None: it got a session, which is closed again)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth: AuthNone | PskAuth = PskAuth(key) if key is not None else AuthNone()
    cfg = ConnectionConfig(auth_client=auth,
                           modes=(ConMode.SECURE,) if secure else (ConMode.CRC,),
                           target_addr=EntityAddr(AddrType.MSGR2, 0, "127.0.0.1", port))
    conn = Connection(Role.CLIENT, cfg, Session(lossless=lossless))
    events: list[Event] = []
    deadline = time.monotonic() + 10
    try:
        for c in conn.data_to_send():
            sock.sendall(c)
        while not conn.ready:
            if time.monotonic() > deadline:
                return events, TimeoutError("no answer")
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                return events, ConnectionError("the destination closed the connection")
            try:
                events += conn.receive_data(data)
            except Exception as exc:
                return events, exc
            for c in conn.data_to_send():
                sock.sendall(c)
        return events, None
    finally:
        sock.close()
