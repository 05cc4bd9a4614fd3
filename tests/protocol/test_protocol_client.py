"""The sans-I/O client state machine, driven byte by byte (no sockets)."""

from __future__ import annotations

import struct

import pytest

from pynbd.protocol import wire
from pynbd.protocol.client import (
    NEED_DATA,
    ClientConnection,
    Handshake,
    OptionDone,
    ReadData,
    ReadHole,
    ReplyDone,
    State,
)
from pynbd.protocol.constants import Cmd, Info, Opt, Rep
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError


def feed_all(conn: ClientConnection, data: bytes, one_byte: bool = False) -> list[object]:
    """Feed ``data`` (optionally one byte at a time) and collect events."""
    events: list[object] = []
    pieces = [data[i:i + 1] for i in range(len(data))] if one_byte else [data]
    for p in pieces:
        conn.receive_data(p)
        for _ in range(1000):
            if conn.state is State.PAYLOAD:
                conn.payload_into(memoryview(bytearray(conn.payload_remaining)))
                if conn.payload_remaining:
                    break
                continue
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, ReadData):
                buf = memoryview(bytearray(ev.length))
                conn.payload_into(buf)
                if conn.payload_remaining:
                    break
    return events


def negotiated(structured: bool = True) -> ClientConnection:
    c = ClientConnection()
    ev = feed_all(c, wire.encode_greeting(3))
    assert isinstance(ev[0], Handshake) and ev[0].no_zeroes
    assert c.take_output() == struct.pack(">I", 3)
    if structured:
        c.send_option(Opt.STRUCTURED_REPLY)
        (done,) = feed_all(c, wire.encode_option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        assert isinstance(done, OptionDone) and done.ok
        c.send_option(Opt.SET_META_CONTEXT,
                      wire.encode_meta_context_request("", ["base:allocation"]))
        ctx = wire.encode_rep_meta_context(3, "base:allocation")
        (done,) = feed_all(c, wire.encode_option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, ctx)
                           + wire.encode_option_reply(Opt.SET_META_CONTEXT, Rep.ACK))
        assert c.meta_contexts == {3: "base:allocation"}
    c.send_option(Opt.GO, wire.encode_info_request("", [Info.BLOCK_SIZE]))
    export = wire.encode_info_export(1 << 20, 1 | 4)
    block_size = wire.encode_info_block_size(1, 4096, 1 << 25)
    evs = feed_all(c, wire.encode_option_reply(Opt.GO, Rep.INFO, export)
                   + wire.encode_option_reply(Opt.GO, Rep.INFO, block_size)
                   + wire.encode_option_reply(Opt.GO, Rep.ACK), one_byte=True)
    (done,) = evs
    assert isinstance(done, OptionDone) and done.info is not None
    assert done.info.size == 1 << 20 and done.info.block_size == (1, 4096, 1 << 25)
    assert c.state is State.TRANSMISSION
    return c


@pytest.mark.parametrize("one_byte", [False, True])
def test_structured_read_reassembly(one_byte: bool) -> None:
    c = negotiated()
    cookie, hdr = c.request(Cmd.READ, 4096, 8192)
    assert wire.decode_request(hdr).length == 8192
    data = (wire.encode_offset_hole(cookie, 8192, 4096, 0)
            + wire.encode_offset_data_header(cookie, 4096, 4096, 0) + b"x" * 4096
            + wire.encode_chunk_header(cookie, 0, 1, 0))
    evs = feed_all(c, data, one_byte)
    assert [type(e) for e in evs] == [ReadHole, ReadData, ReplyDone]
    assert evs[-1] == ReplyDone(cookie, Cmd.READ)
    assert c.in_flight == 0


def test_simple_read_and_error() -> None:
    c = negotiated(structured=False)
    cookie, _ = c.request(Cmd.READ, 0, 512)
    cookie2, _ = c.request(Cmd.WRITE, 0, 512)
    evs = feed_all(c, wire.encode_simple_reply(cookie2, 28) + wire.encode_simple_reply(cookie)
                   + b"y" * 512, one_byte=True)
    assert evs[0] == ReplyDone(cookie2, Cmd.WRITE, 28)
    assert evs[1] == ReadData(cookie, 0, 512)
    assert evs[2] == ReplyDone(cookie, Cmd.READ)


def test_local_misuse() -> None:
    c = ClientConnection()
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.READ, 0, 1)
    c = negotiated()
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.X_CLOSE)  # not negotiated
    c.request(Cmd.READ, 0, 1)
    with pytest.raises(LocalProtocolError):
        c.request(Cmd.DISC)  # requests in flight


def test_tls_resets_state_and_rejects_early_data() -> None:
    c = ClientConnection()
    feed_all(c, wire.encode_greeting(3))
    c.send_option(Opt.STRUCTURED_REPLY)
    feed_all(c, wire.encode_option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    c.send_option(Opt.STARTTLS)
    (done,) = feed_all(c, wire.encode_option_reply(Opt.STARTTLS, Rep.ACK))
    assert isinstance(done, OptionDone) and c.state is State.TLS_PENDING
    c.tls_established()
    assert not c.structured_replies and c.state is State.OPTIONS
    c2 = ClientConnection()
    feed_all(c2, wire.encode_greeting(3))
    c2.send_option(Opt.STARTTLS)
    with pytest.raises(PeerProtocolError, match="after acknowledging STARTTLS"):
        feed_all(c2, wire.encode_option_reply(Opt.STARTTLS, Rep.ACK) + b"junk")


def test_option_error_reply_keeps_negotiating() -> None:
    c = ClientConnection()
    feed_all(c, wire.encode_greeting(1))
    assert c.take_output() == struct.pack(">I", 1)  # no NO_ZEROES when not offered
    c.send_option(Opt.INFO, wire.encode_info_request("x", []))
    (done,) = feed_all(c, wire.encode_option_reply(Opt.INFO, Rep.ERR_UNKNOWN, b"no such export"))
    assert isinstance(done, OptionDone) and not done.ok and done.message == "no such export"
    assert c.state is State.OPTIONS
    c.send_option(Opt.EXPORT_NAME, b"x")
    (done,) = feed_all(c, struct.pack(">QH", 4096, 1) + bytes(124))
    assert isinstance(done, OptionDone) and done.info is not None and done.info.size == 4096


def test_x_close_round_trip() -> None:
    c = ClientConnection()
    feed_all(c, wire.encode_greeting(3))
    c.send_option(Opt.X_CLOSE)
    feed_all(c, wire.encode_option_reply(Opt.X_CLOSE, Rep.ACK))
    assert c.x_close
    c.send_option(Opt.GO, wire.encode_info_request("", []))
    export = wire.encode_info_export(4096, 1 | 1 << 15)
    feed_all(c, wire.encode_option_reply(Opt.GO, Rep.INFO, export)
             + wire.encode_option_reply(Opt.GO, Rep.ACK))
    cookie, hdr = c.request(Cmd.X_CLOSE)
    assert struct.unpack(">IHHQQI", hdr)[2] == 0x7F01
    assert c.state is State.CLOSING
    (ev,) = feed_all(c, wire.encode_simple_reply(cookie))
    assert ev == ReplyDone(cookie, Cmd.X_CLOSE) and c.state is State.CLOSED
    c.connection_closed()  # a clean end after the reply


def test_connection_closed_mid_payload() -> None:
    c = negotiated()
    cookie, _ = c.request(Cmd.READ, 0, 4096)
    c.receive_data(wire.encode_offset_data_header(cookie, 0, 4096, 1) + b"x" * 10)
    ev = c.next_event()
    assert isinstance(ev, ReadData)
    c.payload_into(memoryview(bytearray(4096)))
    with pytest.raises(PeerProtocolError, match="read data"):
        c.connection_closed()
