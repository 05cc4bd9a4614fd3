"""A deliberately tiny raw-socket NBD client for bad-input tests (no pynbd, no libnbd).

Everything is spelled out with ``struct`` from the spec so the tests do not share code
(or bugs) with the server under test.
"""

from __future__ import annotations

import socket
import struct

from tests.support.nbd_magic import (
    CHUNK_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_MAGIC,
)

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED = 1, 2, 3, 6, 7, 8
OPT_LIST_META, OPT_SET_META = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_INVALID = ERR + 1, ERR + 3
REP_ERR_UNKNOWN, REP_ERR_TOO_BIG = ERR + 6, ERR + 9

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZERO, CMD_BS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP = 1, 5, 22, 28, 75, 95

TIMEOUT = 15.0


class Dropped(Exception):
    """The server closed (or reset) the connection."""


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = s.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError as exc:
            raise Dropped(str(exc)) from exc
        if not chunk:
            raise Dropped(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def is_dropped(s: socket.socket, timeout: float = TIMEOUT) -> bool:
    """True if the server closes the connection (EOF/RST) within ``timeout``, sending
    nothing more (any stray byte counts as not dropped)."""
    s.settimeout(timeout)
    try:
        data = s.recv(65536)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return data == b""


class Raw:
    def __init__(self, addr: tuple[str, int] | str, family: int = socket.AF_INET) -> None:
        if isinstance(addr, str):
            family = socket.AF_UNIX
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(addr)
        self.structured = False
        self.size = 0
        self.tflags = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        return recv_exact(self.sock, n)

    # handshake
    def greeting(self, client_flags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert magic == NBDMAGIC and opt == IHAVEOPT, (hex(magic), hex(opt))
        assert hflags & 1, "fixed newstyle"
        self.send(struct.pack(">I", client_flags))
        return int(hflags)

    def send_option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv(20))
        assert magic == REPLY_MAGIC, hex(magic)
        assert length <= 64 * 1024
        return opt, rep, self.recv(length)

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, collect replies up to the final ACK or error."""
        self.send_option(opt, data)
        out = []
        for _ in range(1000):
            o, rep, payload = self.reply()
            assert o == opt, (o, opt)
            out.append((rep, payload))
            if rep == REP_ACK or rep & ERR:
                return out
        raise AssertionError("too many option replies")

    def go(self, name: str = "", structured: bool = True, meta: bool = False) -> None:
        if structured:
            assert self.option(OPT_STRUCTURED)[-1][0] == REP_ACK
            self.structured = True
        if meta:
            q = b"base:allocation"
            data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">II", 1, len(q)) + q
            reps = self.option(OPT_SET_META, data)
            assert reps[-1][0] == REP_ACK and reps[0][0] == REP_META
        n = name.encode()
        reps = self.option(OPT_GO, struct.pack(">I", len(n)) + n + struct.pack(">H", 0))
        assert reps[-1][0] == REP_ACK, reps
        for rep, payload in reps:
            if rep == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
                _, self.size, self.tflags = struct.unpack(">HQH", payload)

    def connect(self, name: str = "", structured: bool = True, meta: bool = False) -> Raw:
        self.greeting()
        self.go(name, structured, meta)
        return self

    # transmission
    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, payload: bytes = b"") -> None:
        self.send(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length)
                  + payload)

    def response(self, read_length: int = 0) -> tuple[int, int, bytes]:
        """(cookie, error, data) of one whole reply (all chunks of a structured one)."""
        if not self.structured:
            magic, err, cookie = struct.unpack(">IIQ", self.recv(16))
            assert magic == SIMPLE_MAGIC, hex(magic)
            data = self.recv(read_length) if (read_length and not err) else b""
            return cookie, err, data
        error = 0
        buf = bytearray()
        for _ in range(100000):
            magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", self.recv(20))
            assert magic == CHUNK_MAGIC, hex(magic)
            body = self.recv(length)
            if rtype == 1:  # OFFSET_DATA
                buf += body[8:]
            elif rtype == 2:  # OFFSET_HOLE
                buf += bytes(struct.unpack(">QI", body)[1])
            elif rtype & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            elif rtype == 5:
                buf += body
            else:
                assert rtype == 0, rtype
            if flags & 1:
                return cookie, error, bytes(buf)
        raise AssertionError("reply never ended")

    def call(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
             payload: bytes = b"", cookie: int = 7) -> tuple[int, bytes]:
        self.request(cmd, offset, length, flags, cookie, payload)
        c, err, data = self.response(length if cmd == CMD_READ else 0)
        assert c == cookie, (c, cookie)
        return err, data

    def disc(self) -> None:
        self.request(CMD_DISC)
        assert is_dropped(self.sock)
        self.close()


def healthy(addr: tuple[str, int] | str, name: str = "", offset: int = 0,
            writable: bool = True) -> None:
    """A fresh connection negotiates, writes, reads back, and disconnects cleanly."""
    c = Raw(addr).connect(name, structured=True)
    try:
        pattern = bytes((offset + i) % 251 for i in range(4096))
        if writable:
            assert c.call(CMD_WRITE, offset, 4096, payload=pattern)[0] == 0
        err, data = c.call(CMD_READ, offset, 4096)
        assert err == 0
        if writable:
            assert data == pattern
        c.disc()
    finally:
        c.close()
