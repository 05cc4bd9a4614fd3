"""Property tests: whatever bytes a server sends, the client state machine either
produces events or raises PeerProtocolError; it never raises anything else, never
loops, and never buffers more than it was given."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.client import NEED_DATA, ClientConnection, ReadData, State
from pynbd.protocol.constants import Cmd, Opt, Rep
from pynbd.protocol.errors import PeerProtocolError

CHUNK_MAGIC = struct.pack(">I", 0x668E33EF)
SIMPLE_MAGIC = struct.pack(">I", 0x67446698)


def transmission(structured: bool) -> ClientConnection:
    c = ClientConnection()
    c.receive_data(wire.encode_greeting(3))
    c.next_event()
    c.take_output()
    if structured:
        c.send_option(Opt.STRUCTURED_REPLY)
        c.receive_data(wire.encode_option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
        c.next_event()
        c.send_option(Opt.SET_META_CONTEXT,
                      wire.encode_meta_context_request("", ["base:allocation"]))
        c.receive_data(wire.encode_option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                                                wire.encode_rep_meta_context(1, "base:allocation"))
                       + wire.encode_option_reply(Opt.SET_META_CONTEXT, Rep.ACK))
        c.next_event()
    c.send_option(Opt.GO, wire.encode_info_request("", []))
    c.receive_data(wire.encode_option_reply(Opt.GO, Rep.INFO, wire.encode_info_export(1 << 20, 1))
                   + wire.encode_option_reply(Opt.GO, Rep.ACK))
    c.next_event()
    assert c.state is State.TRANSMISSION
    return c


def drive(c: ClientConnection, data: bytes, split: int) -> None:
    pieces = [data[i:i + split] for i in range(0, len(data), split)] or [b""]
    fed = 0
    for p in pieces:
        c.receive_data(p)
        fed += len(p)
        for _ in range(10 * len(data) + 10):
            if c.state is State.PAYLOAD:
                c.payload_into(memoryview(bytearray(min(c.payload_remaining, 1 << 20))))
                if c.state is State.PAYLOAD:
                    break
                continue
            try:
                ev = c.next_event()
            except PeerProtocolError:
                assert c.state is State.CLOSED
                return
            if ev is NEED_DATA:
                break
            if isinstance(ev, ReadData):
                assert ev.length <= 65536
        else:
            raise AssertionError("state machine did not make progress")
        assert c.buffered <= fed


# structured-reply-looking garbage: valid magic, random header fields, cookies 1..3
chunk = st.builds(
    lambda flags, ctype, cookie, length, body: CHUNK_MAGIC
    + struct.pack(">HHQI", flags, ctype, cookie, length) + body,
    st.integers(0, 3), st.sampled_from([0, 1, 2, 3, 5, 6, 77, 32769, 32770, 40000, 65535]),
    st.integers(0, 4), st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    st.binary(max_size=80))
simple = st.builds(lambda err, cookie: SIMPLE_MAGIC + struct.pack(">IQ", err, cookie),
                   st.integers(0, 30), st.integers(0, 4))
stream = st.lists(st.one_of(chunk, simple, st.binary(max_size=40)), max_size=8).map(b"".join)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream, st.integers(1, 64), st.booleans())
def test_transmission_garbage(data: bytes, split: int, structured: bool) -> None:
    c = transmission(structured)
    c.request(Cmd.READ, 0, 65536)
    c.request(Cmd.BLOCK_STATUS, 0, 65536) if structured else c.request(Cmd.FLUSH)
    c.request(Cmd.WRITE, 4096, 512)
    drive(c, data, split)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 32))
def test_negotiation_garbage(data: bytes, split: int) -> None:
    c = ClientConnection()
    pieces = [data[i:i + split] for i in range(0, len(data), split)]
    try:
        c.receive_data(wire.encode_greeting(3))
        c.next_event()
        c.send_option(Opt.LIST)
        for p in pieces:
            c.receive_data(p)
            for _ in range(len(data) + 5):
                if c.state is not State.OPTION_REPLY:
                    break
                if c.next_event() is NEED_DATA:
                    break
    except PeerProtocolError:
        assert c.state is State.CLOSED
