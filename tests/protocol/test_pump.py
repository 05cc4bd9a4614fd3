"""Table-driven tests of the client core against the server core, in memory
(tests/protocol/pump.py): what one side sends, the other understands, for each reply
mode, and both end in agreement about what was negotiated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pynbd.protocol import wire
from pynbd.protocol.client import ExportEntry
from pynbd.protocol.client import State as CState
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_REQUEST,
    Cmd,
    CmdFlag,
    Errno,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from pynbd.protocol.server import ExportInfo, ServerConfig, TLSMode
from pynbd.protocol.server import State as SState
from tests.protocol.pump import Pump

KIB, MIB = 1024, 1024 * 1024
BITMAP = "qemu:dirty-bitmap:b0"
DISK = ExportInfo("", MIB, can_trim=True, can_fast_zero=True,
                  meta_contexts=(BASE_ALLOCATION, BITMAP))
RO = ExportInfo("ro", 64 * KIB, read_only=True)
BARE = ExportInfo("bare", 64 * KIB, can_flush=False, can_fua=False, can_zero=False,
                  can_cache=False, block_size=(512, 4096, 32 * KIB), meta_contexts=())
EXPORTS = (DISK, RO, BARE)
MODES = ("simple", "structured", "extended")
PIECES = (7, 1 << 20)  # every header and payload split, and all at once


def pump(piece: int = 1 << 20, **config: Any) -> Pump:
    return Pump(EXPORTS, ServerConfig(**config), piece)


# --- negotiation ---------------------------------------------------------------------

@dataclass(frozen=True)
class Negotiation:
    """Options the client sends in order, what the server answers to each, and what
    both sides then agree on."""

    config: dict[str, Any]
    options: tuple[tuple[int, bytes], ...]
    replies: tuple[int, ...]
    structured: bool = False
    extended: bool = False
    x_close: bool = False
    contexts: tuple[str, ...] = ()


def _meta(*queries: str, name: str = "") -> bytes:
    return wire.encode_meta_context_request(name, queries)


NEGOTIATIONS = {
    "nothing": Negotiation({}, (), ()),
    "structured": Negotiation({}, ((Opt.STRUCTURED_REPLY, b""),), (Rep.ACK,),
                              structured=True),
    "extended": Negotiation({}, ((Opt.EXTENDED_HEADERS, b""),), (Rep.ACK,), extended=True),
    "extended-refused-then-structured": Negotiation(
        {"extended_headers": False},
        ((Opt.EXTENDED_HEADERS, b""), (Opt.STRUCTURED_REPLY, b"")),
        (Rep.ERR_UNSUP, Rep.ACK), structured=True),
    "structured-after-extended": Negotiation(
        {}, ((Opt.EXTENDED_HEADERS, b""), (Opt.STRUCTURED_REPLY, b"")),
        (Rep.ACK, Rep.ERR_EXT_HEADER_REQD), extended=True),
    "contexts": Negotiation(
        {}, ((Opt.STRUCTURED_REPLY, b""),
             (Opt.SET_META_CONTEXT, _meta(BASE_ALLOCATION, BITMAP, "qemu:nope"))),
        (Rep.ACK, Rep.ACK), structured=True, contexts=(BASE_ALLOCATION, BITMAP)),
    "contexts-need-chunks": Negotiation(
        {}, ((Opt.SET_META_CONTEXT, _meta(BASE_ALLOCATION)),), (Rep.ERR_INVALID,)),
    "contexts-for-another-export": Negotiation(
        {}, ((Opt.EXTENDED_HEADERS, b""),
             (Opt.SET_META_CONTEXT, _meta(BASE_ALLOCATION, name="ro"))),
        (Rep.ACK, Rep.ACK), extended=True),
    "safe-close": Negotiation({}, ((Opt.X_CLOSE, b""),), (Rep.ACK,), x_close=True),
    "safe-close-disabled": Negotiation({"x_close": False}, ((Opt.X_CLOSE, b""),),
                                       (Rep.ERR_UNSUP,)),
    "tls-required": Negotiation(
        {"tls": TLSMode.REQUIRE},
        ((Opt.STRUCTURED_REPLY, b""), (Opt.STARTTLS, b""), (Opt.EXTENDED_HEADERS, b"")),
        (Rep.ERR_TLS_REQD, Rep.ACK, Rep.ACK), extended=True),
    "tls-forgets-options": Negotiation(
        {"tls": TLSMode.ON},
        ((Opt.STRUCTURED_REPLY, b""), (Opt.X_CLOSE, b""), (Opt.STARTTLS, b"")),
        (Rep.ACK, Rep.ACK, Rep.ACK)),
    "malformed-data": Negotiation({}, ((Opt.STRUCTURED_REPLY, b"x"), (Opt.X_CLOSE, b"")),
                                  (Rep.ERR_INVALID, Rep.ACK), x_close=True),
}


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("case", list(NEGOTIATIONS), ids=list(NEGOTIATIONS))
def test_negotiation(case: str, piece: int) -> None:
    n = NEGOTIATIONS[case]
    p = pump(piece, **n.config)
    p.handshake()
    got = tuple(p.option(opt, data).reply for opt, data in n.options)
    assert got == n.replies
    done = p.go()
    assert done.ok and done.info is not None
    client, server = p.client, p.server
    assert client.state is CState.TRANSMISSION and server.state is SState.TRANSMISSION
    # both sides agree, and the client saw what the server decided
    for side in (client, server):
        assert (side.structured_replies, side.extended_headers, side.x_close) == \
            (n.structured, n.extended, n.x_close), type(side).__name__
    assert done.info.flags == server.transmission_flags
    assert bool(done.info.flags & TransmissionFlag.X_SEND_CLOSE) == n.x_close
    assert bool(done.info.flags & TransmissionFlag.SEND_DF) == (n.structured or n.extended)
    assert sorted(client.meta_contexts.values()) == sorted(n.contexts)
    assert client.meta_contexts == server.meta_contexts
    assert bool(done.info.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD) == \
        (n.extended and bool(n.contexts))
    assert done.info.block_size == server.block_size == (1, 4096, DEFAULT_MAX_REQUEST)


@pytest.mark.parametrize("piece", PIECES)
def test_list_and_info(piece: int) -> None:
    p = pump(piece)
    p.handshake()
    listed = p.option(Opt.LIST)
    assert listed.replies == (ExportEntry("", ""), ExportEntry("ro", ""),
                              ExportEntry("bare", ""))
    info = p.option(Opt.INFO, wire.encode_info_request("bare", [Info.NAME, Info.BLOCK_SIZE]))
    assert info.ok and info.info is not None
    assert (info.info.size, info.info.canonical_name, info.info.block_size) == \
        (64 * KIB, "bare", (512, 4096, 32 * KIB))
    assert p.client.state is CState.OPTIONS
    unknown = p.option(Opt.INFO, wire.encode_info_request("nope", []))
    assert unknown.reply == Rep.ERR_UNKNOWN and "nope" in unknown.message
    refused = pump(piece, allow_list=False)
    refused.handshake()
    assert refused.option(Opt.LIST).reply == Rep.ERR_POLICY


# --- requests ------------------------------------------------------------------------

@dataclass(frozen=True)
class Req:
    """A request on export ``export`` and its outcome per reply mode: an NBD errno
    (0: success), or a different one for the modes in ``errno_by_mode``."""

    cmd: int
    offset: int = 0
    length: int = 0
    flags: int = 0
    export: str = ""
    payload: bool = False
    errno: int = 0
    errno_by_mode: tuple[tuple[str, int], ...] = ()
    modes: tuple[str, ...] = MODES

    def expected(self, mode: str) -> int:
        return dict(self.errno_by_mode).get(mode, self.errno)


REQUESTS = {
    "read": Req(Cmd.READ, 0, 16384),
    "read-df": Req(Cmd.READ, 0, 16384, CmdFlag.DF, modes=("structured", "extended")),
    "read-df-simple": Req(Cmd.READ, 0, 8192, CmdFlag.DF, errno=Errno.EINVAL,
                          modes=("simple",)),
    "read-past-end": Req(Cmd.READ, MIB - 4096, 8192, errno=Errno.EINVAL),
    "read-over-maximum": Req(Cmd.READ, 0, 32 * KIB + 512, export="bare",
                             errno=Errno.EOVERFLOW, errno_by_mode=(("simple", Errno.EINVAL),)),
    "read-unaligned": Req(Cmd.READ, 100, 512, export="bare", errno=Errno.EINVAL),
    "write": Req(Cmd.WRITE, 8192, 4096, CmdFlag.FUA, payload=True),
    "write-read-only": Req(Cmd.WRITE, 0, 512, export="ro", payload=True, errno=Errno.EPERM),
    "write-past-end": Req(Cmd.WRITE, MIB - 100, 200, payload=True, errno=Errno.ENOSPC),
    "write-fua-unsupported": Req(Cmd.WRITE, 0, 512, CmdFlag.FUA, export="bare",
                                 payload=True, errno=Errno.EINVAL),
    "write-unknown-flag": Req(Cmd.WRITE, 0, 512, 1 << 9, payload=True, errno=Errno.EINVAL),
    "flush": Req(Cmd.FLUSH),
    "flush-unsupported": Req(Cmd.FLUSH, export="bare", errno=Errno.EINVAL),
    "trim": Req(Cmd.TRIM, 0, 64 * KIB),
    "trim-unsupported": Req(Cmd.TRIM, 0, 512, export="bare", errno=Errno.EINVAL),
    "zero-fast": Req(Cmd.WRITE_ZEROES, 0, 64 * KIB, CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE),
    "zero-read-only": Req(Cmd.WRITE_ZEROES, 0, 512, export="ro", errno=Errno.EPERM),
    "zero-past-end": Req(Cmd.WRITE_ZEROES, MIB, 1, errno=Errno.ENOSPC),
    "cache": Req(Cmd.CACHE, 0, MIB),
    "cache-unsupported": Req(Cmd.CACHE, 0, 512, export="bare", errno=Errno.EINVAL),
    "block-status": Req(Cmd.BLOCK_STATUS, 0, MIB, modes=("structured", "extended")),
    "block-status-req-one": Req(Cmd.BLOCK_STATUS, 0, MIB, CmdFlag.REQ_ONE,
                                modes=("structured", "extended")),
    "block-status-no-context": Req(Cmd.BLOCK_STATUS, 0, 4096, export="bare",
                                   errno=Errno.EINVAL, modes=("structured", "extended")),
    "block-status-empty": Req(Cmd.BLOCK_STATUS, 0, 0, errno=Errno.EINVAL,
                              modes=("structured", "extended")),
    "resize": Req(Cmd.RESIZE, 0, 0, errno=Errno.EINVAL),
    "unknown-command": Req(42, errno=Errno.EINVAL),
    "trim-64-bit-past-end": Req(Cmd.TRIM, 0, 1 << 33, errno=Errno.EINVAL,
                                modes=("extended",)),
}


def _contents(p: Pump, name: str) -> bytearray:
    """Data around holes in the store, so that reads see both chunk kinds."""
    store = p.stores[name]
    for pos in range(0, len(store), 3 * 4096):
        store[pos:pos + 4096] = bytes([pos // 4096 % 251 + 1]) * min(4096, len(store) - pos)
    return bytearray(store)


REQUEST_CASES = [pytest.param(case, mode, id=f"{case}-{mode}")
                 for case, r in REQUESTS.items() for mode in r.modes]


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize(("case", "mode"), REQUEST_CASES)
def test_request(case: str, mode: str, piece: int) -> None:
    r = REQUESTS[case]
    p = pump(piece)
    p.negotiate(mode, r.export, meta=(BASE_ALLOCATION, BITMAP) if not r.export else
                (BASE_ALLOCATION,))
    before = _contents(p, r.export)
    payload = bytes((i * 7) % 256 for i in range(r.length if r.payload else 0))
    reply = p.request(r.cmd, r.offset, r.length, r.flags, payload if r.payload else None)
    want = r.expected(mode)
    assert reply.error == want, reply.message
    store = p.stores[r.export]
    end = r.offset + r.length
    if want:
        assert reply.message if mode != "simple" else not reply.message
        assert store == before  # a refusal changes nothing
        if r.payload:  # the refused payload was consumed: the stream is in sync
            assert p.request(Cmd.FLUSH if r.export != "bare" else Cmd.READ, 0,
                             0 if r.export != "bare" else 512).error == 0
        return
    if r.cmd == Cmd.READ:
        assert reply.data == before[r.offset:end]
        kinds = {k for k, _, _ in reply.chunks}
        if mode == "simple" or r.flags & CmdFlag.DF:  # DF: one data chunk
            assert reply.chunks == [("data", r.offset, r.length)]
        else:
            assert kinds == {"data", "hole"}
    elif r.cmd == Cmd.WRITE:
        assert store[r.offset:end] == payload
    elif r.cmd in (Cmd.TRIM, Cmd.WRITE_ZEROES):
        assert store[r.offset:end] == bytes(r.length)
    elif r.cmd == Cmd.BLOCK_STATUS:
        _check_extents(p, reply.extents, r)


def _check_extents(p: Pump, extents: dict[int, tuple[tuple[int, int], ...]], r: Req) -> None:
    assert set(extents) == set(p.client.meta_contexts)
    for cid, ext in extents.items():
        if r.flags & CmdFlag.REQ_ONE:
            assert len(ext) == 1
        assert 0 < sum(n for n, _ in ext) <= r.length
        if p.client.meta_contexts[cid] == BASE_ALLOCATION:
            pos = r.offset
            store = p.stores[r.export]
            for n, flags in ext:
                assert bool(any(store[pos:pos + n])) == (flags == 0)
                pos += n


@pytest.mark.parametrize("piece", PIECES)
def test_block_status_payload_selects_contexts(piece: int) -> None:
    """Extended headers: the request names the context it wants (the payload form)."""
    p = pump(piece)
    info = p.negotiate("extended", meta=(BASE_ALLOCATION, BITMAP))
    assert info.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
    ids = {name: cid for cid, name in p.client.meta_contexts.items()}
    reply = p.request(Cmd.BLOCK_STATUS, 0, MIB, contexts=(ids[BITMAP],))
    assert reply.error == 0
    assert list(reply.extents) == [ids[BITMAP]] and reply.extents[ids[BITMAP]] == ((MIB, 0),)


@pytest.mark.parametrize("piece", PIECES)
@pytest.mark.parametrize("mode", MODES)
def test_sessions_end_in_agreement(mode: str, piece: int) -> None:
    """Safe close: both sides close after the reply; DISC: the server stops reading."""
    p = pump(piece)
    p.negotiate(mode)
    assert p.request(Cmd.X_CLOSE).error == 0
    assert p.both_closed
    p = pump(piece)
    p.negotiate(mode, x_close=False)
    p.request(Cmd.DISC)
    assert p.both_closed
    assert type(p.server_events[-1]).__name__ == "Disconnect"


@pytest.mark.parametrize("mode", MODES)
def test_many_requests_in_flight(mode: str) -> None:
    """Replies to requests in flight together are routed by cookie."""
    p = pump(3)
    p.negotiate(mode)
    data = bytes(range(256)) * 64
    assert p.request(Cmd.WRITE, 0, len(data), payload=data).error == 0
    reads = {p.submit(Cmd.READ, i * 2048, 2048): i for i in range(8)}
    flush = p.submit(Cmd.FLUSH)
    refused = p.submit(Cmd.READ, MIB, 512)
    assert p.client.in_flight == 10
    replies = p.replies()
    assert p.client.in_flight == 0
    for cookie, i in reads.items():
        assert replies[cookie].data == data[i * 2048:(i + 1) * 2048]
    assert replies[flush].error == 0 and replies[refused].error == Errno.EINVAL
