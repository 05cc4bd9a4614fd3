"""The sans-I/O client with extended headers: request bytes, reply parsing, and what a
broken server gets (a PeerProtocolError and a closed state machine, never a hang)."""

from __future__ import annotations

import struct

import pytest

from pynbd.protocol.client import (
    NEED_DATA,
    BlockStatusChunk,
    ClientConnection,
    OptionDone,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
    State,
)
from pynbd.protocol.constants import Cmd, Opt, Rep
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError

H = bytes.fromhex
NBDMAGIC, IHAVEOPT = H("4e42444d41474943"), H("49484156454f5054")
OPT_REPLY_MAGIC = H("0003e889045565a9")
EXT_REQ, EXT_REP = H("21e41c71"), H("6e8a278c")
SIMPLE, CHUNK = H("67446698"), H("668e33ef")
GIB, TIB = 1 << 30, 1 << 40
PAYLOAD_LEN, REQ_ONE, FUA = 32, 8, 1
BLOCK_STATUS_PAYLOAD = 0x1000


def orep(opt: int, rep: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", opt, rep, len(data)) + data


def xrep(rtype: int, flags: int, cookie: int, offset: int, payload: bytes = b"") -> bytes:
    return EXT_REP + struct.pack(">HHQQQ", flags, rtype, cookie, offset, len(payload)) + payload


def feed(c: ClientConnection, data: bytes) -> list[object]:
    c.receive_data(data)
    out: list[object] = []
    for _ in range(10000):
        if c.state is State.PAYLOAD:
            buf = bytearray(c.payload_remaining)
            c.payload_into(memoryview(buf))
            out.append(bytes(buf))
            continue
        ev = c.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
    raise AssertionError("no end")


def negotiated(size: int = 16 * TIB, flags: int = 1 | 4 | 0x20 | 0x40 | 0x400 | 0x1000,
               contexts: tuple[str, ...] = ("base:allocation", "qemu:allocation-depth")
               ) -> ClientConnection:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.take_output()
    assert c.send_option(Opt.EXTENDED_HEADERS) == IHAVEOPT + struct.pack(">II", 11, 0)
    (done,) = feed(c, orep(11, Rep.ACK))
    assert isinstance(done, OptionDone) and done.ok and c.extended_headers and c.chunked
    data = struct.pack(">I", 0) + struct.pack(">I", len(contexts))
    data += b"".join(struct.pack(">I", len(n)) + n.encode() for n in contexts)
    c.send_option(Opt.SET_META_CONTEXT, data)
    reps = b"".join(orep(10, Rep.META_CONTEXT, struct.pack(">I", 7 + i) + n.encode())
                    for i, n in enumerate(contexts))
    feed(c, reps + orep(10, Rep.ACK))
    c.send_option(Opt.GO, struct.pack(">IH", 0, 0))
    feed(c, orep(7, Rep.INFO, struct.pack(">HQH", 0, size, flags)) + orep(7, Rep.ACK))
    assert c.state is State.TRANSMISSION
    return c


# --- requests ---------------------------------------------------------------------------

def test_request_bytes() -> None:
    c = negotiated()
    cookie, hdr = c.request(Cmd.READ, 4096, 512, 0)
    assert hdr == EXT_REQ + struct.pack(">HHQQQ", 0, 0, cookie, 4096, 512)
    cookie, hdr = c.request(Cmd.WRITE, 0, 3, FUA)
    assert hdr == EXT_REQ + struct.pack(">HHQQQ", FUA | PAYLOAD_LEN, 1, cookie, 0, 3)
    cookie, hdr = c.request(Cmd.TRIM, 0, 16 * TIB)
    assert hdr == EXT_REQ + struct.pack(">HHQQQ", 0, 4, cookie, 0, 16 * TIB)
    cookie, hdr = c.request(Cmd.BLOCK_STATUS, 1 << 33, 6 * GIB, REQ_ONE, contexts=(8,))
    assert hdr == EXT_REQ + struct.pack(">HHQQQ", REQ_ONE | PAYLOAD_LEN, 7, cookie, 1 << 33,
                                        12) + struct.pack(">QI", 6 * GIB, 8)


def test_request_misuse() -> None:
    c = negotiated()
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.READ, 0, 512, PAYLOAD_LEN)  # set by request() itself
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.BLOCK_STATUS, 0, 512, contexts=(99,))  # not negotiated
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.BLOCK_STATUS, 0, 512, contexts=(7, 7))
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.READ, 0, 512, contexts=(7,))
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.TRIM, 0, 1 << 64)
    # no NBD_FLAG_BLOCK_STATUS_PAYLOAD from the server: no payload form
    c = negotiated(flags=1 | 4)
    with pytest.raises(LocalProtocolError, match="BLOCK_STATUS_PAYLOAD"):
        c.request(Cmd.BLOCK_STATUS, 0, 512, contexts=(7,))


def test_compact_requests_stay_32_bit() -> None:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.GO, struct.pack(">IH", 0, 0))
    feed(c, orep(7, Rep.INFO, struct.pack(">HQH", 0, 16 * TIB, 1)) + orep(7, Rep.ACK))
    with pytest.raises(LocalProtocolError, match="extended headers"):
        c.request(Cmd.TRIM, 0, 1 << 32)
    _, hdr = c.request(Cmd.TRIM, 0, (1 << 32) - 1)
    assert len(hdr) == 28


def test_export_name_after_extended_headers_is_refused() -> None:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.EXTENDED_HEADERS)
    feed(c, orep(11, Rep.ACK))
    with pytest.raises(LocalProtocolError, match="EXPORT_NAME"):
        c.send_option(Opt.EXPORT_NAME, b"")


def test_unsupported_falls_back() -> None:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.EXTENDED_HEADERS)
    (done,) = feed(c, orep(11, Rep.ERR_UNSUP, b"no"))
    assert isinstance(done, OptionDone) and not done.ok and not c.extended_headers
    c.send_option(Opt.STRUCTURED_REPLY)
    feed(c, orep(8, Rep.ACK))
    assert c.structured_replies and c.chunked and not c.extended_headers


# --- replies --------------------------------------------------------------------------

def test_read_reply_in_pieces() -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.READ, 1 << 32, 8192)
    evs = feed(c, xrep(2, 0, cookie, 1 << 32, struct.pack(">QI", (1 << 32) + 4096, 4096))
               + xrep(1, 1, cookie, 1 << 32, struct.pack(">Q", 1 << 32) + b"a" * 4096))
    assert evs == [ReadHole(cookie, (1 << 32) + 4096, 4096), ReadData(cookie, 1 << 32, 4096),
                   b"a" * 4096, ReplyDone(cookie, Cmd.READ)]


def test_block_status_ext_reply() -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.BLOCK_STATUS, 0, 16 * TIB)
    body7 = struct.pack(">IIQQQQ", 7, 2, 6 * GIB, 3, 10 * TIB, 0)
    body8 = struct.pack(">IIQQ", 8, 1, 16 * TIB, 1)
    evs = feed(c, xrep(6, 0, cookie, 0, body7) + xrep(6, 1, cookie, 0, body8))
    assert evs == [BlockStatusChunk(cookie, 7, ((6 * GIB, 3), (10 * TIB, 0))),
                   BlockStatusChunk(cookie, 8, ((16 * TIB, 1),)),
                   ReplyDone(cookie, Cmd.BLOCK_STATUS)]
    # the payload form: only the chosen context may answer
    cookie, _ = c.request(Cmd.BLOCK_STATUS, 0, GIB, contexts=(8,))
    evs = feed(c, xrep(6, 1, cookie, 0, struct.pack(">IIQQ", 8, 1, GIB, 1)))
    assert evs == [BlockStatusChunk(cookie, 8, ((GIB, 1),)), ReplyDone(cookie, Cmd.BLOCK_STATUS)]


def test_error_chunk_under_extended_headers() -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.TRIM, 0, 16 * TIB)
    evs = feed(c, xrep(0x8001, 1, cookie, 0, struct.pack(">IH", 28, 4) + b"full"))
    assert evs == [ReplyDone(cookie, Cmd.TRIM, 28, "full")]
    cookie, _ = c.request(Cmd.READ, 512, 1024)
    evs = feed(c, xrep(0x8002, 0, cookie, 512, struct.pack(">IH", 5, 0) + struct.pack(">Q", 600))
               + xrep(0, 1, cookie, 512))
    assert evs == [ReplyError(cookie, 5, "", 600), ReplyDone(cookie, Cmd.READ, 5, "", 600)]


BAD_REPLIES = {
    "offset-mismatch": lambda ck: xrep(0, 1, ck, 4096),
    "simple-reply": lambda ck: SIMPLE + struct.pack(">IQ", 0, ck) + bytes(16),
    "structured-chunk": lambda ck: CHUNK + struct.pack(">HHQI", 1, 0, ck, 0) + bytes(12),
    "bad-magic": lambda ck: H("deadbeef") + bytes(28),
    "unknown-cookie": lambda ck: xrep(0, 1, ck + 100, 0),
    "none-with-length": lambda ck: xrep(0, 1, ck, 0, b"x"),
    "unknown-type": lambda ck: xrep(77, 1, ck, 0),
    "data-for-trim": lambda ck: xrep(1, 1, ck, 0, bytes(9)),
}


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_bad_replies_drop(name: str) -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.TRIM, 0, 4096)
    with pytest.raises(PeerProtocolError):
        feed(c, BAD_REPLIES[name](cookie))
    assert c.state is State.CLOSED


BAD_STATUS = {
    "compact-type-5": lambda ck: xrep(5, 1, ck, 0, struct.pack(">III", 7, 512, 0)),
    "count-mismatch": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQ", 7, 2, 512, 0)),
    "count-zero": lambda ck: xrep(6, 1, ck, 0, struct.pack(">II", 7, 0)),
    "bad-length": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQ", 7, 1, 512, 0) + b"x"),
    "unnegotiated-context": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQ", 9, 1, 512, 0)),
    "not-asked-for": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQ", 8, 1, 512, 0)),
    "zero-extent": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQ", 7, 1, 0, 0)),
    "past-the-range": lambda ck: xrep(6, 1, ck, 0, struct.pack(">IIQQQQ", 7, 2, GIB, 0,
                                                               512, 0)),
    "huge-chunk": lambda ck: EXT_REP + struct.pack(">HHQQQ", 1, 6, ck, 0, 1 << 40),
}


@pytest.mark.parametrize("name", list(BAD_STATUS))
def test_bad_block_status_drops(name: str) -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.BLOCK_STATUS, 0, GIB, contexts=(7,))
    with pytest.raises(PeerProtocolError):
        feed(c, BAD_STATUS[name](cookie))
    assert c.state is State.CLOSED


def test_extended_reply_without_negotiation_drops() -> None:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.STRUCTURED_REPLY)
    feed(c, orep(8, Rep.ACK))
    c.send_option(Opt.GO, struct.pack(">IH", 0, 0))
    feed(c, orep(7, Rep.INFO, struct.pack(">HQH", 0, GIB, 1)) + orep(7, Rep.ACK))
    cookie, _ = c.request(Cmd.READ, 0, 512)
    with pytest.raises(PeerProtocolError, match="extended headers were not negotiated"):
        feed(c, xrep(0, 1, cookie, 0))
    # and BLOCK_STATUS_EXT inside a structured chunk
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.STRUCTURED_REPLY)
    feed(c, orep(8, Rep.ACK))
    c.send_option(Opt.GO, struct.pack(">IH", 0, 0))
    feed(c, orep(7, Rep.INFO, struct.pack(">HQH", 0, GIB, 1)) + orep(7, Rep.ACK))
    cookie, _ = c.request(Cmd.READ, 0, 512)
    with pytest.raises(PeerProtocolError, match="BLOCK_STATUS_EXT"):
        feed(c, CHUNK + struct.pack(">HHQI", 1, 6, cookie, 24) + bytes(24))


def test_starttls_forgets_extended_headers() -> None:
    c = ClientConnection()
    feed(c, NBDMAGIC + IHAVEOPT + H("0003"))
    c.send_option(Opt.EXTENDED_HEADERS)
    feed(c, orep(11, Rep.ACK))
    c.send_option(Opt.STARTTLS)
    feed(c, orep(5, Rep.ACK))
    c.tls_established()
    assert not c.extended_headers and not c.chunked
