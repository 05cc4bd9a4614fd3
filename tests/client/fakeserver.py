"""A scripted, deliberately misbehaving NBD server on a raw loopback socket (a thread).

The protocol is spelled out with ``struct`` from the spec, not with pynbd's encoders, so
the tests do not share bugs with the client under test.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.nbd_magic import (
    CHUNK_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
)

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 8, 9, 10
OPT_X_CLOSE = 0x4E42A001
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
CT_NONE, CT_DATA, CT_HOLE, CT_BS, CT_ERROR, CT_ERROR_OFFSET = 0, 1, 2, 5, 32769, 32770
DONE = 1
SIZE = 1 << 20
FLAGS = 1 | 4 | 8 | 32 | 64 | 128 | 1024  # has flags, flush, fua, trim, zeroes, df, cache
CONTEXT_ID = 7
TIMEOUT = 10.0


class Gone(Exception):
    pass


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise Gone
        buf += chunk
    return bytes(buf)


@dataclass
class Req:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def opt_reply(s: socket.socket, opt: int, rep: int, data: bytes = b"") -> None:
    s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, rep, len(data)) + data)


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, cookie)


def chunk(cookie: int, ctype: int, flags: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return struct.pack(">IHHQI", CHUNK_MAGIC, flags, ctype, cookie, n) + payload


def data_chunk(cookie: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return chunk(cookie, CT_DATA, flags, struct.pack(">Q", offset) + data)


def hole_chunk(cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return chunk(cookie, CT_HOLE, flags, struct.pack(">QI", offset, length))


def error_chunk(cookie: int, error: int, msg: bytes = b"", flags: int = DONE,
                ctype: int = CT_ERROR) -> bytes:
    return chunk(cookie, ctype, flags, struct.pack(">IH", error, len(msg)) + msg)


def none_chunk(cookie: int) -> bytes:
    return chunk(cookie, CT_NONE, DONE, b"")


Handler = Callable[[socket.socket, Req], bool]
Greeting = Callable[[socket.socket], bool]


class FakeServer:
    """Listens on 127.0.0.1:0. ``greeting`` may replace the whole handshake (return False
    to stop); ``handler(sock, req)`` answers each transmission request (return False to
    close the connection)."""

    def __init__(self, handler: Handler | None = None, *, greeting: Greeting | None = None,
                 structured: bool = True) -> None:
        self.handler = handler
        self.greeting = greeting
        self.structured = structured
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1)
        self.lsock.settimeout(TIMEOUT)
        self.port = self.lsock.getsockname()[1]
        self.error: BaseException | None = None
        self.requests: list[Req] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def _run(self) -> None:
        try:
            conn, _ = self.lsock.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                self._serve(conn)
            except (Gone, ConnectionError, TimeoutError):
                pass
            except BaseException as exc:  # surfaced by stop()
                self.error = exc

    def _serve(self, s: socket.socket) -> None:
        if self.greeting is not None:
            if not self.greeting(s):
                return
        else:
            s.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
            recv_exact(s, 4)
            if not self._options(s):
                return
        for _ in range(10000):
            hdr = recv_exact(s, 28)
            magic, flags, cmd, cookie, offset, length = struct.unpack(">IHHQQI", hdr)
            assert magic == REQUEST_MAGIC
            req = Req(flags, cmd, cookie, offset, length)
            self.requests.append(req)
            if cmd == 1:
                recv_exact(s, length)
            if cmd == 2:
                return
            assert self.handler is not None
            if not self.handler(s, req):
                return

    def _options(self, s: socket.socket) -> bool:
        for _ in range(100):
            _magic, opt, length = struct.unpack(">QII", recv_exact(s, 16))
            recv_exact(s, length)
            if opt == OPT_STRUCTURED and self.structured:
                opt_reply(s, opt, REP_ACK)
            elif opt == OPT_SET_META and self.structured:
                opt_reply(s, opt, REP_META, struct.pack(">I", CONTEXT_ID) + b"base:allocation")
                opt_reply(s, opt, REP_ACK)
            elif opt == OPT_GO:
                opt_reply(s, opt, REP_INFO, struct.pack(">HQH", 0, SIZE, FLAGS))
                opt_reply(s, opt, REP_ACK)
                return True
            elif opt == OPT_ABORT:
                return False
            else:
                opt_reply(s, opt, REP_ERR_UNSUP)
        return False

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.lsock.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "fake server thread did not finish"
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
