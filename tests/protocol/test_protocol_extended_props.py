"""Hypothesis round trips for extended headers: the client core's 32-byte requests
through the server core, the server core's extended chunks through the client core,
the wire codecs, and garbage after negotiation (only PeerProtocolError, never another
exception or unbounded buffering)."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.client import (
    NEED_DATA,
    BlockStatusChunk,
    ClientConnection,
    ReadData,
    ReadHole,
    ReplyDone,
)
from pynbd.protocol.client import State as CState
from pynbd.protocol.constants import Cmd, CmdFlag
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import NEED_DATA as S_NEED_DATA
from pynbd.protocol.server import (
    Command,
    Disconnect,
    ExportInfo,
    ExportSelected,
    InvalidCommand,
    SafeClose,
    ServerConnection,
)
from pynbd.protocol.server import State as SState

PROPS = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TIB = 1 << 40
SIZE = 16 * TIB
EXPORT = ExportInfo("big", SIZE, can_trim=True, can_fast_zero=True,
                    meta_contexts=("base:allocation", "qemu:allocation-depth"))

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


class Provider:
    def lookup(self, name: str) -> ExportInfo:
        return EXPORT

    def list_exports(self) -> Sequence[ExportInfo]:
        return [EXPORT]


def pair() -> tuple[ClientConnection, ServerConnection]:
    """A client and a server core that negotiated extended headers and both contexts,
    wired together in memory."""
    s = ServerConnection(Provider())
    c = ClientConnection()

    def pump() -> list[object]:
        evs = []
        while True:
            ev = c.next_event()
            if ev is NEED_DATA:
                return evs
            evs.append(ev)

    c.receive_data(s.initiate())
    pump()
    s.receive_data(c.take_output())
    for opt, data in ((11, b""), (10, wire.encode_meta_context_request(
            "big", ["base:allocation", "qemu:allocation-depth"])),
            (7, wire.encode_info_request("big", []))):
        s.receive_data(c.send_option(opt, data))
        while True:
            ev = s.next_event()
            if ev is S_NEED_DATA or isinstance(ev, ExportSelected):
                break
        c.receive_data(s.take_output())
        pump()
    assert c.extended_headers and s.extended_headers and c.state is CState.TRANSMISSION
    assert s.meta_contexts == c.meta_contexts == {1: "base:allocation",
                                                  2: "qemu:allocation-depth"}
    return c, s


# --- wire ---------------------------------------------------------------------------

@PROPS
@given(u16, u16, u64, u64, u64)
def test_ext_request_round_trip(flags: int, cmd: int, cookie: int, offset: int,
                                length: int) -> None:
    raw = wire.encode_ext_request(cmd, flags, cookie, offset, length)
    assert len(raw) == 32 and raw[:4] == bytes.fromhex("21e41c71")
    assert wire.decode_ext_request(raw) == wire.RequestHeader(flags, cmd, cookie, offset, length)


@PROPS
@given(u64, st.lists(u32, max_size=50))
def test_block_status_payload_round_trip(effect: int, ids: list[int]) -> None:
    raw = wire.encode_block_status_payload(effect, ids)
    assert len(raw) == 8 + 4 * len(ids)
    assert wire.decode_block_status_payload(raw) == (effect, ids)


# --- client requests through the server ------------------------------------------------

FLAGS = {Cmd.READ: [0, int(CmdFlag.DF), int(CmdFlag.FUA)],
         Cmd.TRIM: [0, int(CmdFlag.FUA)],
         Cmd.CACHE: [0],
         Cmd.WRITE_ZEROES: [0, int(CmdFlag.NO_HOLE), int(CmdFlag.FAST_ZERO | CmdFlag.FUA)],
         Cmd.BLOCK_STATUS: [0, int(CmdFlag.REQ_ONE)],
         Cmd.WRITE: [0, int(CmdFlag.FUA)],
         Cmd.FLUSH: [0]}


@st.composite
def client_request(draw: st.DrawFn) -> tuple[Cmd, int, int, int, tuple[int, ...] | None]:
    cmd = draw(st.sampled_from(list(FLAGS)))
    flags = draw(st.sampled_from(FLAGS[cmd]))
    if cmd is Cmd.FLUSH:
        return cmd, flags, 0, 0, None
    offset = draw(st.integers(0, SIZE - 1))
    cap = 4096 if cmd is Cmd.WRITE else (1 << 20 if cmd is Cmd.READ else SIZE - offset)
    length = draw(st.integers(1, min(cap, SIZE - offset)))
    contexts = None
    if cmd is Cmd.BLOCK_STATUS:
        contexts = draw(st.one_of(st.none(), st.sampled_from([(1,), (2,), (2, 1), (1, 2)])))
    return cmd, flags, offset, length, contexts


@PROPS
@given(st.lists(client_request(), min_size=1, max_size=12), st.integers(1, 64))
def test_client_requests_decode_identically(reqs: list[tuple[Cmd, int, int, int,
                                                              tuple[int, ...] | None]],
                                            piece: int) -> None:
    c, s = pair()
    stream = b""
    expected = []
    for cmd, flags, offset, length, contexts in reqs:
        cookie, hdr = c.request(cmd, offset, length, flags, contexts)
        payload = bytes([cookie & 0xFF]) * length if cmd is Cmd.WRITE else b""
        stream += hdr + payload
        wire_flags = flags | (int(CmdFlag.PAYLOAD_LEN) if cmd is Cmd.WRITE or contexts else 0)
        ctx: tuple[int, ...] = ()
        if cmd is Cmd.BLOCK_STATUS:
            ctx = contexts if contexts is not None else (1, 2)
        expected.append((Command(cmd, wire_flags, cookie, offset, length, ctx), payload))
    got = []
    pos = 0
    payload_buf = bytearray()
    while pos < len(stream) or s.buffered:
        if pos < len(stream):
            s.receive_data(stream[pos:pos + piece])
            pos += piece
        while True:
            if s.state is SState.PAYLOAD:
                buf = bytearray(s.payload_remaining)
                n = s.payload_into(memoryview(buf))
                payload_buf += buf[:n]
                if s.state is SState.PAYLOAD:
                    break
                got[-1] = (got[-1][0], bytes(payload_buf))
                continue
            ev = s.next_event()
            if ev is S_NEED_DATA:
                break
            assert isinstance(ev, Command), ev
            payload_buf = bytearray()
            got.append((ev, b""))
        if pos >= len(stream) and s.state is not SState.PAYLOAD and not s.buffered:
            break
    assert got == expected


# --- server replies through the client ------------------------------------------------

@st.composite
def read_pieces(draw: st.DrawFn) -> tuple[int, int, list[tuple[int, int, bool]]]:
    offset = draw(st.integers(0, SIZE - 65536))
    sizes = draw(st.lists(st.integers(1, 4096), min_size=1, max_size=10))
    holes = draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)))
    pieces, pos = [], offset
    for n, h in zip(sizes, holes, strict=True):
        pieces.append((pos, n, h))
        pos += n
    order = draw(st.permutations(range(len(pieces))))
    return offset, pos - offset, [pieces[i] for i in order]


@PROPS
@given(read_pieces(), st.integers(1, 97))
def test_sparse_read_reply_reassembles(case: tuple[int, int, list[tuple[int, int, bool]]],
                                       piece: int) -> None:
    offset, length, pieces = case
    c, s = pair()
    cookie, _ = c.request(Cmd.READ, offset, length)
    out = b""
    for i, (off, n, hole) in enumerate(pieces):
        last = i == len(pieces) - 1
        if hole:
            out += s.hole_chunk(cookie, off, n, last, req_offset=offset)
        else:
            out += s.read_reply_header(cookie, off, n, done=last, req_offset=offset)
            out += bytes([off & 0xFF]) * n
    image = bytearray(b"\xee" * length)
    done = []
    dest = memoryview(bytearray())
    for p in range(0, len(out), piece):
        c.receive_data(out[p:p + piece])
        while True:
            if c.state is CState.PAYLOAD:
                dest = dest[c.payload_into(dest):]
                if c.state is CState.PAYLOAD:
                    break
                continue
            ev = c.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, ReadData):
                dest = memoryview(image)[ev.offset - offset:ev.offset - offset + ev.length]
            elif isinstance(ev, ReadHole):
                image[ev.offset - offset:ev.offset - offset + ev.length] = bytes(ev.length)
            else:
                assert isinstance(ev, ReplyDone)
                done.append(ev)
    assert done == [ReplyDone(cookie, Cmd.READ)]
    expected = bytearray()
    for off, n, hole in sorted(pieces):
        expected += bytes(n) if hole else bytes([off & 0xFF]) * n
    assert image == expected


@PROPS
@given(st.integers(0, SIZE - 1), st.data())
def test_block_status_ext_round_trip(offset: int, data: st.DataObject) -> None:
    c, s = pair()
    length = data.draw(st.integers(1, SIZE - offset))
    extents1 = data.draw(st.lists(st.tuples(st.integers(1, 1 << 44), st.integers(0, 3)),
                                  min_size=1, max_size=20))
    # the spec: all but the last extent end before the requested range does
    total, ext1 = 0, []
    for ln, fl in extents1:
        ext1.append((ln, fl))
        total += ln
        if total >= length:
            break
    ext2 = [(min(length, 1 << 40), 1)]
    contexts = data.draw(st.sampled_from([None, (1,), (2,), (2, 1)]))
    cookie, _ = c.request(Cmd.BLOCK_STATUS, offset, length, 0, contexts)
    ids = contexts or (1, 2)
    chunks = s.block_status_reply(cookie, [], contexts=ids, req_offset=offset,
                                  per_context={1: ext1, 2: ext2})
    c.receive_data(b"".join(chunks))
    evs = []
    while (ev := c.next_event()) is not NEED_DATA:
        evs.append(ev)
    assert evs == [BlockStatusChunk(cookie, i, tuple(ext1 if i == 1 else ext2)) for i in ids] \
        + [ReplyDone(cookie, Cmd.BLOCK_STATUS)]


# --- garbage after negotiation --------------------------------------------------------

junk_requests = st.builds(
    lambda f, cmd, ck, off, ln, tail: struct.pack(">IHHQQQ", 0x21E41C71, f, cmd, ck, off, ln)
    + tail,
    st.one_of(st.sampled_from([0, 1, 8, 32, 33, 40, 0xFFFF]), u16),
    st.one_of(st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 0x7F01]), u16),
    u64, st.one_of(st.sampled_from([0, 4096, SIZE - 512, SIZE]), u64),
    st.one_of(st.sampled_from([0, 8, 12, 16, 512, 1 << 32, SIZE]), u64),
    st.one_of(st.just(b""), st.binary(max_size=64)))


@PROPS
@given(st.lists(st.one_of(junk_requests, st.binary(max_size=40)), max_size=8),
       st.integers(1, 50))
def test_garbage_after_negotiation(frames: list[bytes], piece: int) -> None:
    _, s = pair()
    data = b"".join(frames)
    try:
        for p in range(0, len(data), piece):
            s.receive_data(data[p:p + piece])
            for _ in range(10000):
                if s.state is SState.PAYLOAD:
                    s.payload_into(memoryview(bytearray(s.payload_remaining)))
                    if s.state is SState.PAYLOAD:
                        break
                    continue
                ev = s.next_event()
                if ev is S_NEED_DATA:
                    break
                assert isinstance(ev, Command | InvalidCommand | Disconnect | SafeClose), ev
                if isinstance(ev, Command) and ev.cmd is not Cmd.FLUSH:
                    # what reaches the driver is within the export and the maximum (a
                    # FLUSH's offset and length mean nothing: the spec has them ignored)
                    assert ev.offset + ev.length <= SIZE
                    if ev.cmd in (Cmd.READ, Cmd.WRITE):
                        assert ev.length <= 64 << 20
            # nothing waits on more than a header and a block status payload
            assert s.buffered < 32 + 8 + 4 * 2 + piece or s.state is SState.CLOSED
    except PeerProtocolError:
        assert s.state is SState.CLOSED
