"""Extended headers (NBD_OPT_EXTENDED_HEADERS) in the sans-I/O server core.

Byte tables: client bytes and expected server bytes are spelled out with ``struct``
and the magics of the ``extension-ext-header`` branch of doc/proto.md, independent of
pynbd.protocol.wire. Bad input gets the spec's answer and the stream stays in sync (or
the connection is dropped): PAYLOAD_LEN disagreeing with the data, an extended request
before negotiation, a compact one after, 64-bit lengths past the end, payloads naming
unknown or duplicate context ids, huge effect lengths on READ.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from pynbd.protocol.constants import Cmd
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError
from pynbd.protocol.server import (
    NEED_DATA,
    Command,
    Disconnect,
    ExportInfo,
    ExportSelected,
    InvalidCommand,
    OptionHandled,
    SafeClose,
    ServerConfig,
    ServerConnection,
    StartTLS,
    State,
    TLSMode,
)

H = bytes.fromhex

IHAVEOPT = H("49484156454f5054")
OPT_REPLY_MAGIC = H("0003e889045565a9")
REQUEST_MAGIC = H("25609513")
EXT_REQUEST_MAGIC = H("21e41c71")
EXT_REPLY_MAGIC = H("6e8a278c")

EXPORT_NAME, STARTTLS, INFO, GO = 1, 5, 6, 7
STRUCTURED_REPLY, LIST_META, SET_META, EXTENDED_HEADERS = 8, 9, 10, 11
X_CLOSE_OPT = 0x4E42A001
ACK, REP_INFO, META_CONTEXT = 1, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD = 0x80000001, 0x80000003, 0x80000005
ERR_EXT_HEADER_REQD = 0x8000000A

READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
X_CLOSE_CMD = 0x7F01
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75
# reply types
T_NONE, T_DATA, T_HOLE, T_BS, T_BS_EXT, T_ERROR = 0, 1, 2, 5, 6, 0x8001
DONE = 1

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

DISK = ExportInfo("disk", MIB, can_trim=True, can_fast_zero=True)
HUGE = ExportInfo("huge", 16 * TIB, can_trim=True, can_fast_zero=True,
                  meta_contexts=("base:allocation", "qemu:allocation-depth"))
RO = ExportInfo("ro", MIB, read_only=True)

# transmission flags from the spec's bit numbers: HAS_FLAGS 0, SEND_FLUSH 2, SEND_FUA 3,
# SEND_TRIM 5, SEND_WRITE_ZEROES 6, SEND_DF 7, SEND_CACHE 10, SEND_FAST_ZERO 11,
# BLOCK_STATUS_PAYLOAD 12
DISK_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0400 | 0x0800
SEND_DF = 0x0080
BLOCK_STATUS_PAYLOAD = 0x1000


class Provider:
    def __init__(self) -> None:
        self.exports = {e.name: e for e in (DISK, HUGE, RO)}

    def lookup(self, name: str) -> ExportInfo | None:
        return self.exports.get(name or "disk")

    def list_exports(self) -> Sequence[ExportInfo]:
        return list(self.exports.values())


# --- bytes --------------------------------------------------------------------------

def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def string(s: str) -> bytes:
    return struct.pack(">I", len(s.encode())) + s.encode()


def info_data(name: str, infos: Sequence[int] = ()) -> bytes:
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: Sequence[str]) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def xreq(cmd: int, flags: int = 0, cookie: int = 1, offset: int = 0, length: int = 0) -> bytes:
    return EXT_REQUEST_MAGIC + struct.pack(">HHQQQ", flags, cmd, cookie, offset, length)


def creq(cmd: int, flags: int = 0, cookie: int = 1, offset: int = 0, length: int = 0) -> bytes:
    return REQUEST_MAGIC + struct.pack(">HHQQI", flags, cmd, cookie, offset, length)


def xrep(rtype: int, flags: int, cookie: int, offset: int, payload: bytes = b"") -> bytes:
    return EXT_REPLY_MAGIC + struct.pack(">HHQQQ", flags, rtype, cookie, offset,
                                         len(payload)) + payload


def kinds(out: bytes) -> list[tuple[int, int]]:
    result, pos = [], 0
    while pos < len(out):
        assert out[pos:pos + 8] == OPT_REPLY_MAGIC, out[pos:]
        option, reply, length = struct.unpack_from(">III", out, pos + 8)
        result.append((option, reply))
        pos += 20 + length
    return result


# --- driving ------------------------------------------------------------------------

def events(conn: ServerConnection, data: bytes = b"") -> list[object]:
    if data:
        conn.receive_data(data)
    evs: list[object] = []
    while conn.state not in (State.PAYLOAD, State.CLOSED):
        ev = conn.next_event()
        if ev is NEED_DATA:
            break
        evs.append(ev)
    return evs


def started(**config: object) -> ServerConnection:
    conn = ServerConnection(Provider(), ServerConfig(**config))  # type: ignore[arg-type]
    conn.initiate()
    assert events(conn, struct.pack(">I", 3)) == []
    return conn


def extended(name: str = "disk", meta: Sequence[str] = ("base:allocation",),
             **config: object) -> ServerConnection:
    conn = started(**config)
    data = opt(EXTENDED_HEADERS)
    if meta:
        data += opt(SET_META, meta_data(name, meta))
    evs = events(conn, data + opt(GO, info_data(name)))
    assert isinstance(evs[-1], ExportSelected), evs
    assert evs[-1].extended_headers and evs[-1].structured_replies
    conn.take_output()
    return conn


def in_sync(conn: ServerConnection, cookie: int = 99) -> None:
    """The next request after whatever came before is decoded exactly."""
    conn.receive_data(xreq(READ, 0, cookie, 512, 512))
    assert conn.next_event() == Command(Cmd.READ, 0, cookie, 512, 512)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


# === negotiation ===================================================================

def test_extended_headers_ack_and_flags() -> None:
    conn = started()
    evs = events(conn, opt(EXTENDED_HEADERS) + opt(INFO, info_data("disk"))
                 + opt(SET_META, meta_data("disk", ["base:allocation"]))
                 + opt(INFO, info_data("disk")) + opt(GO, info_data("disk")))
    out = conn.take_output()
    flags_no_meta = DISK_FLAGS | SEND_DF
    flags_meta = flags_no_meta | BLOCK_STATUS_PAYLOAD
    assert out == (
        rep(EXTENDED_HEADERS, ACK)
        + rep(INFO, REP_INFO, struct.pack(">HQH", 0, MIB, flags_no_meta)) + rep(INFO, ACK)
        + rep(SET_META, META_CONTEXT, struct.pack(">I", 1) + b"base:allocation")
        + rep(SET_META, ACK)
        + rep(INFO, REP_INFO, struct.pack(">HQH", 0, MIB, flags_meta)) + rep(INFO, ACK)
        + rep(GO, REP_INFO, struct.pack(">HQH", 0, MIB, flags_meta)) + rep(GO, ACK))
    assert evs[0] == OptionHandled(EXTENDED_HEADERS, ACK)
    sel = evs[-1]
    assert isinstance(sel, ExportSelected)
    assert (sel.flags, sel.structured_replies, sel.extended_headers, sel.meta_contexts) == \
        (flags_meta, True, True, {1: "base:allocation"})
    assert sel.block_size == (1, 4096, 64 * MIB)
    assert conn.extended_headers and not conn.structured_replies


def test_extended_headers_with_data_is_invalid_and_consumed() -> None:
    conn = started()
    evil = opt(GO, info_data("disk"))  # would end negotiation if parsed as an option
    evs = events(conn, opt(EXTENDED_HEADERS, evil) + opt(EXTENDED_HEADERS))
    assert evs == [OptionHandled(EXTENDED_HEADERS, ERR_INVALID),
                   OptionHandled(EXTENDED_HEADERS, ACK)]
    assert conn.state is State.OPTIONS


def test_extended_headers_disabled_is_unsupported() -> None:
    conn = started(extended_headers=False)
    evs = events(conn, opt(EXTENDED_HEADERS) + opt(STRUCTURED_REPLY) + opt(GO, info_data("")))
    assert evs[:2] == [OptionHandled(EXTENDED_HEADERS, ERR_UNSUP),
                       OptionHandled(STRUCTURED_REPLY, ACK)]
    assert isinstance(evs[2], ExportSelected) and not evs[2].extended_headers
    assert not evs[2].flags & BLOCK_STATUS_PAYLOAD


def test_structured_reply_after_extended_headers_is_refused() -> None:
    conn = started()
    evs = events(conn, opt(EXTENDED_HEADERS) + opt(STRUCTURED_REPLY))
    assert evs == [OptionHandled(EXTENDED_HEADERS, ACK),
                   OptionHandled(STRUCTURED_REPLY, ERR_EXT_HEADER_REQD)]
    assert kinds(conn.take_output()) == [(EXTENDED_HEADERS, ACK),
                                         (STRUCTURED_REPLY, ERR_EXT_HEADER_REQD)]
    assert not conn.structured_replies and conn.extended_headers


def test_extended_headers_after_structured_replies_is_fine() -> None:
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(EXTENDED_HEADERS) + opt(GO, info_data("")))
    assert evs[:2] == [OptionHandled(STRUCTURED_REPLY, ACK),
                       OptionHandled(EXTENDED_HEADERS, ACK)]
    assert isinstance(evs[2], ExportSelected) and evs[2].extended_headers
    # replies are extended from now on, not structured
    assert conn.ok_reply(5, req_offset=0)[:4] == EXT_REPLY_MAGIC


def test_export_name_after_extended_headers_drops() -> None:
    conn = started()
    conn.receive_data(opt(EXTENDED_HEADERS) + opt(EXPORT_NAME, b"disk"))
    assert conn.next_event() == OptionHandled(EXTENDED_HEADERS, ACK)
    with pytest.raises(PeerProtocolError, match="EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS"):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_meta_contexts_need_only_extended_headers() -> None:
    conn = started()
    evs = events(conn, opt(LIST_META, meta_data("huge", [])) + opt(EXTENDED_HEADERS)
                 + opt(LIST_META, meta_data("huge", [])))
    assert evs == [OptionHandled(LIST_META, ERR_INVALID), OptionHandled(EXTENDED_HEADERS, ACK),
                   OptionHandled(LIST_META, ACK)]
    assert kinds(conn.take_output())[2:] == [(LIST_META, META_CONTEXT)] * 2 + [(LIST_META, ACK)]


def test_tls_required_refuses_extended_headers_and_starttls_forgets_them() -> None:
    conn = started(tls=TLSMode.REQUIRE)
    assert events(conn, opt(EXTENDED_HEADERS)) == [OptionHandled(EXTENDED_HEADERS, ERR_TLS_REQD)]
    conn = started(tls=TLSMode.ON)
    evs = events(conn, opt(EXTENDED_HEADERS) + opt(STARTTLS))
    assert evs == [OptionHandled(EXTENDED_HEADERS, ACK), StartTLS()]
    assert conn.extended_headers
    conn.tls_established()
    assert not conn.extended_headers  # the spec: renegotiate after STARTTLS
    evs = events(conn, opt(GO, info_data("disk")))
    assert isinstance(evs[-1], ExportSelected) and not evs[-1].extended_headers


def test_block_status_payload_flag_only_for_the_export_with_contexts() -> None:
    conn = started()
    evs = events(conn, opt(EXTENDED_HEADERS)
                 + opt(SET_META, meta_data("huge", ["base:allocation"]))
                 + opt(GO, info_data("disk")))
    sel = evs[-1]
    assert isinstance(sel, ExportSelected)
    assert sel.meta_contexts == {} and not sel.flags & BLOCK_STATUS_PAYLOAD
    # without extended headers the flag is never set
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(SET_META, meta_data("disk", ["base:"
                                                                                "allocation"]))
                 + opt(GO, info_data("disk")))
    assert isinstance(evs[-1], ExportSelected) and not evs[-1].flags & BLOCK_STATUS_PAYLOAD


@pytest.mark.parametrize(("configured", "advertised"), [
    (64 * MIB, 64 * MIB), (32 * MIB, 32 * MIB), (4096, 4096), (0xFFFFFFFF, 0xFFFFFFFF)])
def test_max_request_size_is_advertised(configured: int, advertised: int) -> None:
    conn = started(max_request_size=configured)
    events(conn, opt(INFO, info_data("disk", [3])))
    out = conn.take_output()
    assert struct.pack(">HIII", 3, 1, 4096, advertised) in out


def test_max_request_size_is_validated() -> None:
    with pytest.raises(ValueError):
        ServerConfig(max_request_size=100)
    with pytest.raises(ValueError):
        ServerConfig(max_request_size=1 << 32)


def test_small_maximum_lowers_the_preferred_size() -> None:
    exp = ExportInfo("e", MIB, block_size=(512, 64 * KIB, 0xFFFFFFFF))

    class P:
        def lookup(self, name: str) -> ExportInfo:
            return exp

        def list_exports(self) -> list[ExportInfo]:
            return [exp]

    conn = ServerConnection(P(), ServerConfig(max_request_size=8192))
    conn.initiate()
    events(conn, struct.pack(">I", 3) + opt(INFO, info_data("e", [3])))
    assert struct.pack(">HIII", 3, 512, 8192, 8192) in conn.take_output()


# === requests =======================================================================

@pytest.mark.parametrize(("cmd", "flags", "offset", "length"), [
    (READ, 0, 0, 4096),
    (READ, DF | FUA, 512, 64 * KIB),
    (FLUSH, 0, 0, 0),
    (TRIM, FUA, 0, MIB),
    (CACHE, 0, 4096, MIB - 4096),
    (WRITE_ZEROES, NO_HOLE | FAST_ZERO | FUA, 0, MIB),
    (BLOCK_STATUS, REQ_ONE, 0, MIB),
])
def test_extended_request_table(cmd: int, flags: int, offset: int, length: int) -> None:
    conn = extended()
    evs = events(conn, xreq(cmd, flags, 0x0102030405060708, offset, length))
    contexts = (1,) if cmd == BLOCK_STATUS else ()
    assert evs == [Command(Cmd(cmd), flags, 0x0102030405060708, offset, length, contexts)]
    in_sync(conn)


@pytest.mark.parametrize(("cmd", "flags", "offset", "length"), [
    (TRIM, 0, 0, 16 * TIB),
    (TRIM, 0, 5 * GIB, 11 * TIB),
    (WRITE_ZEROES, 0, 0, 16 * TIB),
    (WRITE_ZEROES, FAST_ZERO, 0, 8 * TIB + 4096),
    (CACHE, 0, 0, 16 * TIB),
    (BLOCK_STATUS, 0, 0, 16 * TIB),
    (BLOCK_STATUS, REQ_ONE, 4 * GIB, 12 * TIB),
])
def test_64_bit_effect_lengths(cmd: int, flags: int, offset: int, length: int) -> None:
    conn = extended("huge")
    evs = events(conn, xreq(cmd, flags, 7, offset, length))
    contexts = (1,) if cmd == BLOCK_STATUS else ()
    assert evs == [Command(Cmd(cmd), flags, 7, offset, length, contexts)]
    in_sync(conn)


@pytest.mark.parametrize(("cmd", "offset", "length", "error"), [
    (TRIM, 0, 16 * TIB + 1, EINVAL),
    (TRIM, 16 * TIB, 1, EINVAL),
    (WRITE_ZEROES, 8 * TIB, 8 * TIB + 512, ENOSPC),
    (CACHE, 1, 16 * TIB, EINVAL),
    (BLOCK_STATUS, 0, 16 * TIB + 1, EINVAL),
    (BLOCK_STATUS, 0, 0, EINVAL),
    # offset + length beyond 2^64: Python integers do not wrap
    (TRIM, (1 << 64) - 1, (1 << 64) - 1, EINVAL),
    (WRITE_ZEROES, (1 << 64) - 512, 1024, ENOSPC),
])
def test_64_bit_lengths_past_the_end(cmd: int, offset: int, length: int, error: int) -> None:
    conn = extended("huge")
    ev = events(conn, xreq(cmd, 0, 7, offset, length))[0]
    assert isinstance(ev, InvalidCommand) and ev.error == error and ev.message
    assert (ev.offset, ev.length) == (offset, length)
    in_sync(conn)


@pytest.mark.parametrize("length", [64 * MIB + 1, 1 << 32, 1 << 63, (1 << 64) - 1])
def test_huge_read_effect_length_is_refused_without_buffering(length: int) -> None:
    conn = extended("huge")
    ev = events(conn, xreq(READ, 0, 7, 0, length))[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EOVERFLOW
    assert conn.buffered == 0
    in_sync(conn)


def test_read_at_the_configured_maximum() -> None:
    conn = extended("huge", max_request_size=32 * MIB)
    assert events(conn, xreq(READ, 0, 7, 0, 32 * MIB)) == [
        Command(Cmd.READ, 0, 7, 0, 32 * MIB)]
    ev = events(conn, xreq(READ, 0, 8, 0, 32 * MIB + 1))[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EOVERFLOW


def test_write_with_payload_len() -> None:
    conn = extended()
    data = bytes(range(256)) * 16
    conn.receive_data(xreq(WRITE, PAYLOAD_LEN | FUA, 3, 8192, len(data)) + data[:100])
    assert conn.next_event() == Command(Cmd.WRITE, PAYLOAD_LEN | FUA, 3, 8192, len(data))
    assert conn.state is State.PAYLOAD
    buf = bytearray(len(data))
    n = conn.payload_into(memoryview(buf))
    assert n == 100
    conn.receive_data(data[100:])
    assert conn.payload_into(memoryview(buf)[n:]) == len(data) - 100
    assert buf == data and conn.state is State.TRANSMISSION
    in_sync(conn)


def test_write_of_64_mib_is_accepted() -> None:
    conn = extended()
    conn.receive_data(xreq(WRITE, PAYLOAD_LEN, 3, 0, 64 * MIB))
    ev = conn.next_event()
    # past the 1 MiB export, but the payload is within the maximum: consumed, ENOSPC
    assert ev is NEED_DATA and conn.state is State.PAYLOAD_DISCARD
    conn = extended("huge")
    conn.receive_data(xreq(WRITE, PAYLOAD_LEN, 3, 0, 64 * MIB))
    assert conn.next_event() == Command(Cmd.WRITE, PAYLOAD_LEN, 3, 0, 64 * MIB)
    assert conn.payload_remaining == 64 * MIB


def test_write_without_payload_len_still_carries_its_data() -> None:
    """The spec wants PAYLOAD_LEN on every WRITE, but qemu 10's client sends WRITE
    without it: a WRITE's length is its payload either way (never desynchronise)."""
    conn = extended()
    conn.receive_data(xreq(WRITE, FUA, 3, 0, 4) + b"abcd")
    assert conn.next_event() == Command(Cmd.WRITE, FUA, 3, 0, 4)
    buf = bytearray(4)
    assert conn.payload_into(memoryview(buf)) == 4 and buf == b"abcd"
    in_sync(conn)
    # past the end: refused, and its data consumed all the same
    ev = events(conn, xreq(WRITE, 0, 4, MIB, 4) + b"efgh")[0]
    assert isinstance(ev, InvalidCommand) and ev.error == ENOSPC
    in_sync(conn)


@pytest.mark.parametrize("cmd", [READ, FLUSH, TRIM, CACHE, WRITE_ZEROES, X_CLOSE_CMD, 0x99,
                                 RESIZE])
def test_unexpected_payload_is_consumed_then_einval(cmd: int) -> None:
    conn = extended()
    evil = xreq(DISC)  # if parsed as a request it would end the connection
    ev = events(conn, xreq(cmd, PAYLOAD_LEN, 5, 0, len(evil)) + evil)[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL and ev.cookie == 5
    assert ev.length == len(evil)
    in_sync(conn)


def test_payload_larger_than_the_maximum_drops() -> None:
    conn = extended(max_request_size=32 * MIB)
    conn.receive_data(xreq(TRIM, PAYLOAD_LEN, 5, 0, 32 * MIB + 1))
    with pytest.raises(PeerProtocolError, match="exceeds the maximum payload"):
        conn.next_event()
    assert conn.state is State.CLOSED
    conn = extended()
    conn.receive_data(xreq(WRITE, PAYLOAD_LEN, 5, 0, (1 << 64) - 1))
    with pytest.raises(PeerProtocolError):
        conn.next_event()


def test_payload_shorter_than_announced_desyncs_into_a_drop() -> None:
    """PAYLOAD_LEN disagreeing with the data: the server takes the announced bytes (it
    cannot know), so the next header lands in the payload and what follows is garbage:
    the connection is dropped, never misread as a request."""
    conn = extended()
    data = b"x" * 100
    conn.receive_data(xreq(WRITE, PAYLOAD_LEN, 3, 0, 128) + data + xreq(READ, 0, 4, 0, 512)
                      + xreq(READ, 0, 5, 0, 512))
    assert conn.next_event() == Command(Cmd.WRITE, PAYLOAD_LEN, 3, 0, 128)
    buf = bytearray(128)
    assert conn.payload_into(memoryview(buf)) == 128
    assert buf[:100] == data and buf[100:] == xreq(READ, 0, 4, 0, 512)[:28]
    with pytest.raises(PeerProtocolError, match="magic"):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_extended_request_before_negotiation_drops() -> None:
    conn = started()
    events(conn, opt(STRUCTURED_REPLY) + opt(GO, info_data("disk")))
    conn.receive_data(xreq(READ, 0, 1, 0, 512))
    with pytest.raises(PeerProtocolError, match="EXTENDED_HEADERS was not negotiated"):
        conn.next_event()
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("extra", [b"", bytes(4)])
def test_compact_request_after_negotiation_drops(extra: bytes) -> None:
    """Dropped as soon as the magic is there: a lone 28-byte compact header (a DISC, say)
    must not leave the server waiting for 4 more bytes."""
    conn = extended()
    conn.receive_data(creq(DISC, 0, 1, 0, 0) + extra)
    with pytest.raises(PeerProtocolError, match="compact request header after"):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_extended_magic_before_negotiation_drops_early() -> None:
    conn = started()
    events(conn, opt(STRUCTURED_REPLY) + opt(GO, info_data("disk")))
    conn.receive_data(EXT_REQUEST_MAGIC)
    with pytest.raises(PeerProtocolError, match="not negotiated"):
        conn.next_event()


def test_disc_and_safe_close_under_extended_headers() -> None:
    conn = extended()
    assert events(conn, xreq(DISC) + xreq(READ)) == [Disconnect()]
    assert conn.state is State.CLOSED and conn.buffered == 0
    conn = started()
    evs = events(conn, opt(EXTENDED_HEADERS) + opt(X_CLOSE_OPT) + opt(GO, info_data("disk")))
    assert isinstance(evs[-1], ExportSelected) and evs[-1].x_close
    assert events(conn, xreq(X_CLOSE_CMD, 0, 9)) == [SafeClose(9)]
    # its reply is an extended NONE chunk echoing offset 0
    assert conn.ok_reply(9, req_offset=0) == xrep(T_NONE, DONE, 9, 0)


def test_read_only_and_unsupported_under_extended_headers() -> None:
    conn = extended("ro", meta=())
    for cmd, flags, error in ((TRIM, 0, EPERM), (WRITE_ZEROES, 0, EPERM),
                              (BLOCK_STATUS, 0, EINVAL), (RESIZE, 0, EINVAL),
                              (READ, REQ_ONE, EINVAL)):
        ev = events(conn, xreq(cmd, flags, 3, 0, 512))[0]
        assert isinstance(ev, InvalidCommand) and ev.error == error, (cmd, ev)
    ev = events(conn, xreq(WRITE, PAYLOAD_LEN, 3, 0, 4) + b"abcd")[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EPERM
    in_sync(conn)


# --- the BLOCK_STATUS payload ---------------------------------------------------------

def bs_payload(effect: int, ids: Sequence[int]) -> bytes:
    return struct.pack(f">Q{len(ids)}I", effect, *ids)


BOTH = ("base:allocation", "qemu:allocation-depth")


def test_block_status_payload_selects_contexts() -> None:
    conn = extended("huge", BOTH)
    assert conn.meta_contexts == {1: "base:allocation", 2: "qemu:allocation-depth"}
    assert conn.transmission_flags & BLOCK_STATUS_PAYLOAD
    for ids in ([2], [1], [2, 1], [1, 2]):
        p = bs_payload(6 * GIB, ids)
        evs = events(conn, xreq(BLOCK_STATUS, PAYLOAD_LEN, 4, 4096, len(p)) + p)
        assert evs == [Command(Cmd.BLOCK_STATUS, PAYLOAD_LEN, 4, 4096, 6 * GIB, tuple(ids))]
    # without a payload: every selected context
    assert events(conn, xreq(BLOCK_STATUS, REQ_ONE, 5, 0, 8 * TIB)) == [
        Command(Cmd.BLOCK_STATUS, REQ_ONE, 5, 0, 8 * TIB, (1, 2))]
    in_sync(conn)


def test_block_status_payload_arriving_in_pieces() -> None:
    conn = extended("huge", BOTH)
    data = xreq(BLOCK_STATUS, PAYLOAD_LEN | REQ_ONE, 4, 0, 12) + bs_payload(MIB, [2])
    for b in data[:-1]:
        conn.receive_data(bytes([b]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(data[-1:])
    assert conn.next_event() == Command(Cmd.BLOCK_STATUS, PAYLOAD_LEN | REQ_ONE, 4, 0, MIB,
                                        (2,))


@pytest.mark.parametrize(("ids", "why"), [
    ([3], "unknown"), ([0], "unknown"), ([1, 7], "unknown"), ([2, 2], "twice"),
    ([], "no metadata context")])
def test_block_status_payload_unknown_or_duplicate_ids(ids: list[int], why: str) -> None:
    conn = extended("huge", BOTH)
    p = bs_payload(MIB, ids)
    ev = events(conn, xreq(BLOCK_STATUS, PAYLOAD_LEN, 4, 0, len(p)) + p)[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL and why in ev.message
    in_sync(conn)


@pytest.mark.parametrize("payload", [
    b"", b"\x00" * 4, bs_payload(MIB, [1]) + b"\x00\x00",  # not 8 + 4n
    bs_payload(MIB, [1, 2, 1]),  # more ids than selected contexts
    bs_payload(MIB, [1]) + bytes(4096)])
def test_block_status_payload_malformed_is_consumed(payload: bytes) -> None:
    conn = extended("huge", BOTH)
    ev = events(conn, xreq(BLOCK_STATUS, PAYLOAD_LEN, 4, 0, len(payload)) + payload)[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL
    in_sync(conn)


@pytest.mark.parametrize(("effect", "error"), [(16 * TIB + 1, EINVAL), (0, EINVAL)])
def test_block_status_payload_effect_length_validated(effect: int, error: int) -> None:
    conn = extended("huge", BOTH)
    p = bs_payload(effect, [1])
    ev = events(conn, xreq(BLOCK_STATUS, PAYLOAD_LEN, 4, 0, len(p)) + p)[0]
    assert isinstance(ev, InvalidCommand) and ev.error == error and ev.length == effect
    in_sync(conn)


def test_block_status_payload_without_the_flag_is_consumed() -> None:
    conn = extended("disk", meta=())  # no contexts: no NBD_FLAG_BLOCK_STATUS_PAYLOAD
    assert not conn.transmission_flags & BLOCK_STATUS_PAYLOAD
    p = bs_payload(MIB, [1])
    ev = events(conn, xreq(BLOCK_STATUS, PAYLOAD_LEN, 4, 0, len(p)) + p)[0]
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL
    assert "BLOCK_STATUS_PAYLOAD" in ev.message
    in_sync(conn)


def test_payload_len_in_compact_mode_is_an_unknown_flag() -> None:
    conn = started()
    events(conn, opt(STRUCTURED_REPLY) + opt(SET_META, meta_data("disk", ["base:allocation"]))
           + opt(GO, info_data("disk")))
    conn.receive_data(creq(BLOCK_STATUS, PAYLOAD_LEN, 4, 0, 4096) + creq(READ, 0, 5, 0, 512))
    ev = conn.next_event()
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL
    assert conn.next_event() == Command(Cmd.READ, 0, 5, 0, 512)


# === replies ========================================================================

COOKIE = 0x0102030405060708


def test_extended_reply_table() -> None:
    conn = extended()
    ro = 0x1122334455667788
    assert conn.ok_reply(COOKIE, req_offset=ro) == \
        H("6e8a278c 0001 0000 0102030405060708 1122334455667788 0000000000000000")
    assert conn.error_reply(COOKIE, ENOSPC, "full", req_offset=ro) == \
        H("6e8a278c 0001 8001 0102030405060708 1122334455667788 000000000000000a"
          "0000001c 0004") + b"full"
    # OFFSET_DATA: payload length = 8 + data; the data offset may differ from the
    # request's (a sparse read in pieces)
    assert conn.read_reply_header(COOKIE, 8192, 4096, done=False, req_offset=4096) == \
        H("6e8a278c 0000 0001 0102030405060708 0000000000001000 0000000000001008"
          "0000000000002000")
    assert conn.read_reply_header(COOKIE, 4096, 512) == \
        H("6e8a278c 0001 0001 0102030405060708 0000000000001000 0000000000000208"
          "0000000000001000")
    # a zero-length read: a NONE chunk
    assert conn.read_reply_header(COOKIE, 4096, 0) == xrep(T_NONE, DONE, COOKIE, 4096)
    # OFFSET_HOLE keeps its 32-bit size
    assert conn.hole_chunk(COOKIE, 1 << 33, 65536, True, req_offset=1 << 32) == \
        H("6e8a278c 0001 0002 0102030405060708 0000000100000000 000000000000000c"
          "0000000200000000 00010000")
    assert conn.done_chunk(COOKIE, req_offset=7) == xrep(T_NONE, DONE, COOKIE, 7)


def test_block_status_ext_reply_with_extents_over_4_gib() -> None:
    conn = extended("huge", BOTH)
    chunks = conn.block_status_reply(
        COOKIE, [(6 * GIB, 3), (4096, 0), (10 * TIB, 3)], req_offset=0, contexts=[1])
    assert chunks == [
        H("6e8a278c 0001 0006 0102030405060708 0000000000000000 0000000000000038"
          "00000001 00000003"
          "0000000180000000 0000000000000003"
          "0000000000001000 0000000000000000"
          "00000a0000000000 0000000000000003")]
    # one chunk per context, DONE on the last; each with its own extents
    chunks = conn.block_status_reply(COOKIE, [], req_offset=4096, contexts=(2, 1),
                                     per_context={1: [(MIB, 0)], 2: [(8 * TIB, 1)]})
    assert chunks == [
        xrep(T_BS_EXT, 0, COOKIE, 4096, H("00000002 00000001 0000080000000000 0000000000000001")),
        xrep(T_BS_EXT, DONE, COOKIE, 4096,
             H("00000001 00000001 0000000000100000 0000000000000000"))]


def test_block_status_reply_caps() -> None:
    conn = extended("huge", BOTH)
    many = [(512, i % 2) for i in range((1 << 20) + 5)]
    (chunk,) = conn.block_status_reply(COOKIE, many, req_offset=0, contexts=[1])
    assert struct.unpack_from(">QII", chunk, 24)[1:] == (1, 1 << 20)
    assert len(chunk) == 32 + 8 + 16 * (1 << 20)
    # compact: an extent over 32 bits is cut (and nothing may follow it)
    conn = started()
    events(conn, opt(STRUCTURED_REPLY) + opt(SET_META, meta_data("huge", ["base:allocation"]))
           + opt(GO, info_data("huge")))
    (chunk,) = conn.block_status_reply(COOKIE, [(4096, 0), (6 * GIB, 3), (512, 0)])
    assert chunk == H("668e33ef 0001 0005 0102030405060708 00000014 00000001"
                      "00001000 00000000 ffff0000 00000003")


def test_reply_builders_need_the_request_offset() -> None:
    conn = extended()
    for call in (lambda: conn.ok_reply(COOKIE), lambda: conn.error_reply(COOKIE, EINVAL),
                 lambda: conn.hole_chunk(COOKIE, 0, 512, True),
                 lambda: conn.done_chunk(COOKIE),
                 lambda: conn.block_status_reply(COOKIE, [(512, 0)])):
        with pytest.raises(LocalProtocolError, match="req_offset"):
            call()
    with pytest.raises(LocalProtocolError, match="simple replies"):
        conn.simple_reply(COOKIE)


def test_compact_replies_ignore_the_request_offset() -> None:
    conn = started()
    events(conn, opt(STRUCTURED_REPLY) + opt(GO, info_data("disk")))
    assert conn.ok_reply(COOKIE, req_offset=1234) == \
        H("668e33ef 0001 0000 0102030405060708 00000000")
    assert conn.error_reply(COOKIE, EINVAL, "", req_offset=9) == \
        H("668e33ef 0001 8001 0102030405060708 00000006 00000016 0000")
