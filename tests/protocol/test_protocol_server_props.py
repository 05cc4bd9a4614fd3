"""Hypothesis properties and end-to-end pumps for the sans-I/O NBD server core.

* garbage in -> PeerProtocolError or valid events, never another exception, never
  unbounded buffering, in each phase (option haggling, transmission);
* the same bytes give the same events and output however they are split;
* a hand-written client byte sequence against the core, with exact server bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pynbd.protocol.constants import Cmd, Errno
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import (
    MAX_OPTION_DATA,
    NEED_DATA,
    Aborted,
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
KIB, MIB = 1024, 1024 * 1024

PROPS = settings(max_examples=200, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DISK = ExportInfo("disk", MIB, description="d", can_trim=True, can_fast_zero=True)
RO = ExportInfo("ro", 64 * KIB, read_only=True)
BARE = ExportInfo("bare", MIB, can_flush=False, can_fua=False, can_zero=False, can_cache=False,
                  block_size=(512, 4096, 64 * KIB), meta_contexts=())
BITMAP = ExportInfo("bitmap", MIB, meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0"))
EXPORTS = {e.name: e for e in (DISK, RO, BARE, BITMAP)}


class Provider:
    def lookup(self, name: str) -> ExportInfo | None:
        return EXPORTS.get(name or "disk")

    def list_exports(self) -> Sequence[ExportInfo]:
        return list(EXPORTS.values())


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str | bytes, infos: Sequence[int] = ()) -> bytes:
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str | bytes, queries: Sequence[str | bytes]) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def req(cmd: int, flags: int = 0, cookie: int = 1, offset: int = 0, length: int = 0) -> bytes:
    return REQUEST_MAGIC + struct.pack(">HHQQI", flags, cmd, cookie, offset, length)


# --- the fuzz driver -----------------------------------------------------------------

EVENT_TYPES = (OptionHandled, StartTLS, Aborted, ExportSelected, Command, InvalidCommand,
               Disconnect, SafeClose)


def check_output(piece: bytes, ev: object) -> None:
    """Server output produced by one event: option replies, or an EXPORT_NAME reply."""
    if not piece:
        return
    pos = 0
    while pos < len(piece):
        if piece[pos:pos + 8] != OPT_REPLY_MAGIC:
            # only the last thing, ending the handshake after NBD_OPT_EXPORT_NAME
            assert isinstance(ev, ExportSelected) and len(piece) - pos in (10, 134), piece[pos:]
            size, flags = struct.unpack_from(">QH", piece, pos)
            assert (size, flags) == (ev.export.size, ev.flags)
            return
        _option, reply, length = struct.unpack_from(">III", piece, pos + 8)
        data = piece[pos + 20:pos + 20 + length]
        assert len(data) == length
        if reply & 0x80000000:
            assert length <= 4096
            data.decode("utf-8")
        pos += 20 + length


def check_event(conn: ServerConnection, ev: object) -> None:
    assert isinstance(ev, EVENT_TYPES), ev
    if isinstance(ev, ExportSelected):
        assert ev.export in EXPORTS.values()
        assert ev.flags & 1
        assert conn.state is State.TRANSMISSION
    elif isinstance(ev, Command):
        export = conn.export
        assert export is not None
        assert isinstance(ev.cmd, Cmd) and ev.cmd not in (Cmd.DISC, Cmd.X_CLOSE, Cmd.RESIZE)
        if ev.cmd is not Cmd.FLUSH:  # FLUSH's offset and length are reserved (ignored)
            assert ev.offset + ev.length <= export.size
        assert not ev.flags & ~0x1F
        if ev.cmd in (Cmd.READ, Cmd.WRITE):
            assert ev.length <= export.block_size[2]
        if ev.cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES):
            assert not export.read_only
        if ev.cmd is Cmd.BLOCK_STATUS:
            assert conn.meta_contexts
    elif isinstance(ev, InvalidCommand):
        assert isinstance(ev.error, Errno) and ev.error != Errno.OK
        assert isinstance(ev.message, str) and ev.message
    elif isinstance(ev, SafeClose):
        assert conn.x_close


def check_bounded(conn: ServerConnection) -> None:
    """Called at NEED_DATA: what is buffered is less than the next message needs."""
    st_ = conn.state
    if st_ is State.GREETING:
        assert conn.buffered < 4
    elif st_ is State.OPTIONS:
        assert conn.buffered < 16
    elif st_ is State.OPTION_DATA:
        assert conn.buffered < MAX_OPTION_DATA
    elif st_ is State.TRANSMISSION:
        assert conn.buffered < 28
    elif st_ in (State.OPTION_DISCARD, State.PAYLOAD_DISCARD, State.PAYLOAD):
        assert conn.buffered == 0
    else:
        assert st_ is State.CLOSED, st_


def run(conn: ServerConnection, chunks: Sequence[bytes]
        ) -> tuple[list[object], bytes, type[Exception] | None]:
    """Drive ``conn`` like an I/O layer would; return (events, output, exception type).

    WRITE payloads are drained with payload_into and reported as ("payload", bytes)
    entries merged across chunks, so results do not depend on how the input was split.
    """
    evs: list[object] = []
    out = bytearray()

    def payload(data: bytes) -> None:
        if evs and isinstance(evs[-1], tuple) and evs[-1][0] == "payload":
            evs[-1] = ("payload", evs[-1][1] + data)
        else:
            evs.append(("payload", data))

    try:
        for chunk in chunks:
            before = conn.buffered
            conn.receive_data(chunk)
            if conn.state is State.CLOSED:
                assert conn.buffered == before  # nothing is read after close
            while True:
                if conn.state is State.PAYLOAD:
                    dest = bytearray(min(conn.payload_remaining, conn.buffered))
                    n = conn.payload_into(memoryview(dest))
                    if n:
                        payload(bytes(dest[:n]))
                    if conn.state is State.PAYLOAD:
                        assert conn.buffered == 0
                        break
                    continue
                ev = conn.next_event()
                piece = conn.take_output()
                out += piece
                if ev is NEED_DATA:
                    assert not piece
                    check_bounded(conn)
                    break
                check_event(conn, ev)
                check_output(piece, ev)
                evs.append(ev)
                if isinstance(ev, StartTLS):
                    # a real driver does the TLS handshake here
                    conn.tls_established()
        return evs, bytes(out), None
    except PeerProtocolError:
        out += conn.take_output()
        assert conn.state is State.CLOSED  # a dropped connection reads nothing more
        return evs, bytes(out), PeerProtocolError


def label(result: tuple[list[object], bytes, type[Exception] | None], conn: ServerConnection
          ) -> None:
    """Hypothesis statistics (--hypothesis-show-statistics): how runs ended, what they saw."""
    evs, _out, exc = result
    event(f"ended: {exc.__name__ if exc else conn.state.value}")
    for kind in sorted({type(e).__name__ for e in evs}):
        event(f"saw: {'payload' if kind == 'tuple' else kind}")


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def new_conn(config: ServerConfig) -> ServerConnection:
    conn = ServerConnection(Provider(), config)
    conn.initiate()
    return conn


def after_go(name: str, structured: bool, meta: Sequence[str], x_close: bool) -> ServerConnection:
    conn = new_conn(ServerConfig())
    data = H("00000003")
    if structured:
        data += opt(8)
        if meta:
            data += opt(10, meta_data(name, meta))
    if x_close:
        data += opt(0x4E42A001)
    conn.receive_data(data + opt(7, info_data(name, [3])))
    while True:
        ev = conn.next_event()
        assert ev is not NEED_DATA
        if isinstance(ev, ExportSelected):
            break
    conn.take_output()
    return conn


# --- strategies ------------------------------------------------------------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
names = st.one_of(st.sampled_from(["", "disk", "ro", "bare", "bitmap"]), st.just("nope"),
                  st.text(max_size=8))
queries = st.sampled_from(["base:", "base:allocation", "qemu:", "qemu:dirty-bitmap:b0", "nocolon",
                           "x-a:b", ""]) | st.text(max_size=8)
junk = st.binary(max_size=40)

option_numbers = st.sampled_from([*range(12), 0x4E42A001]) | u32
option_data = st.one_of(
    st.just(b""),
    junk,
    st.builds(info_data, names, st.lists(st.integers(0, 5) | u16, max_size=5)),
    st.builds(meta_data, names, st.lists(queries, max_size=4)),
    names.map(lambda n: n.encode()),
)
option_frame = st.builds(opt, option_numbers, option_data)
# an option header whose length disagrees with what follows (discard, drop, resync)
option_header = st.builds(
    lambda o, n: IHAVEOPT + struct.pack(">II", o, n), option_numbers,
    st.sampled_from([0, 1, 16, MAX_OPTION_DATA, MAX_OPTION_DATA + 1, MIB, MIB + 1, 2**32 - 1])
    | u32)
good_names = st.sampled_from(["", "disk", "ro", "bare", "bitmap"])
good_queries = st.lists(st.sampled_from(["base:allocation", "qemu:dirty-bitmap:b0", "base:"]),
                        max_size=2)
good_option = st.one_of(
    st.sampled_from([opt(8), opt(8), opt(3), opt(0x4E42A001), opt(2), opt(5)]),
    st.builds(lambda n, q: opt(10, meta_data(n, q)), good_names, good_queries),
    st.builds(lambda n, q: opt(9, meta_data(n, q)), good_names, good_queries),
    st.builds(lambda o, n, i: opt(o, info_data(n, i)), st.sampled_from([6, 7]), good_names,
              st.lists(st.integers(0, 4), max_size=3)),
    good_names.map(lambda n: opt(1, n.encode())),
)
# mostly well-formed options, then a tail that may break the framing
handshake_items = st.builds(
    lambda head, tail: head + tail,
    st.lists(st.one_of(good_option, good_option, option_frame), max_size=8),
    st.lists(st.one_of(option_frame, option_header, junk), max_size=2))
client_flags = st.one_of(st.just(3), st.just(3), st.sampled_from([0, 1, 2]), u32)

commands = st.one_of(*[st.sampled_from([*range(10), 0x7F01])] * 4, u16)
cmd_flags = st.one_of(st.just(0), st.just(0), st.sampled_from([1, 2, 4, 8, 16, 32, 3, 0x1F]), u16)
offsets = st.one_of(st.sampled_from([0, 512, 4096]), st.just(0),
                    st.sampled_from([64 * KIB, MIB - 512, MIB, MIB + 512]), u64)
lengths = st.one_of(st.sampled_from([0, 8, 512, 4096]), st.sampled_from([512, 4096]),
                    st.sampled_from([1, 64 * KIB + 512, 32 * MIB + 1, 64 * MIB + 1]), u32)


@st.composite
def request_frame(draw: st.DrawFn) -> bytes:
    cmd, length = draw(commands), draw(lengths)
    head = req(cmd, draw(cmd_flags), draw(u64), draw(offsets), length)
    if cmd == 1 and length <= 4096 and draw(st.booleans()):
        return head + bytes(length)  # a WRITE with its whole payload
    return head + draw(st.sampled_from([b"", b"", b"\x00" * 3]) | junk)


@st.composite
def good_request(draw: st.DrawFn) -> bytes:
    """A well-framed request (WRITE carries its whole payload); may still be refused."""
    cmd = draw(st.sampled_from([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7, 0x7F01, 8, 42]))
    flags = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8, 16, 1 | 2 | 16]))
    offset = draw(st.sampled_from([0, 512, 4096, 60 * KIB, MIB - 4096, MIB]))
    length = draw(st.sampled_from([0, 512, 512, 4096, 4096, 8192]))
    if cmd in (2, 0x7F01) and draw(st.booleans()):
        offset = length = 0
    head = req(cmd, flags, draw(u64), offset, length)
    return head + (bytes([cmd]) * length if cmd == 1 else b"")


# mostly well-framed requests, then a tail that may break the framing
transmission_items = st.builds(
    lambda head, tail: head + tail,
    st.lists(st.one_of(good_request(), good_request(), request_frame()), max_size=10),
    st.lists(st.one_of(request_frame(), junk), max_size=2))


# --- properties --------------------------------------------------------------------------

@PROPS
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=6),
       tls=st.sampled_from(list(TLSMode)))
def test_raw_garbage_after_greeting(data, cuts, tls):
    conn = new_conn(ServerConfig(tls=tls))
    label(run(conn, split(data, cuts)), conn)


@PROPS
@given(flags=client_flags, items=handshake_items, cuts=st.lists(st.integers(0, 2000), max_size=6),
       tls=st.sampled_from(list(TLSMode)), x_close=st.booleans(), allow_list=st.booleans())
def test_framed_garbage_after_greeting(flags, items, cuts, tls, x_close, allow_list):
    data = struct.pack(">I", flags) + b"".join(items)
    conn = new_conn(ServerConfig(tls=tls, x_close=x_close, allow_list=allow_list))
    label(run(conn, split(data, cuts)), conn)


@PROPS
@given(flags=st.sampled_from([1, 3]), items=handshake_items,
       cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_handshake_split_invariance(flags, items, cuts):
    data = struct.pack(">I", flags) + b"".join(items)
    whole = run(new_conn(ServerConfig()), [data])
    conn = new_conn(ServerConfig())
    pieces = run(conn, split(data, cuts))
    assert pieces == whole
    label(pieces, conn)


exports_for_tx = st.sampled_from([
    ("disk", False, (), False),
    ("disk", True, ("base:allocation",), True),
    ("ro", True, (), False),
    ("bare", False, (), True),
    ("bitmap", True, ("base:allocation", "qemu:dirty-bitmap:b0"), False),
])


@PROPS
@given(setup=exports_for_tx, data=st.binary(max_size=300),
       cuts=st.lists(st.integers(0, 300), max_size=6))
def test_raw_garbage_after_go(setup, data, cuts):
    conn = after_go(*setup)
    label(run(conn, split(data, cuts)), conn)


@PROPS
@given(setup=exports_for_tx, items=transmission_items,
       cuts=st.lists(st.integers(0, 50_000), max_size=8))
def test_framed_garbage_after_go(setup, items, cuts):
    data = b"".join(items)
    whole = run(after_go(*setup), [data])
    conn = after_go(*setup)
    pieces = run(conn, split(data, cuts))
    assert pieces == whole
    label(pieces, conn)


# --- pumps: a hand-written client against the core, exact bytes -----------------------

CHUNK = H("668e33ef")
SIMPLE = H("67446698")


def pump(conn: ServerConnection, client: bytes, store: bytearray, piece: int) -> bytes:
    """A minimal I/O layer over a bytearray: feed ``client`` in ``piece``-byte bits."""
    out = [conn.initiate()]
    pos = 0
    closed = False
    while not closed:
        ev = conn.next_event()
        out.append(conn.take_output())
        if ev is NEED_DATA:
            assert pos < len(client), "server waits for more than the client sent"
            conn.receive_data(client[pos:pos + piece])
            pos += piece
            continue
        if isinstance(ev, Command):
            c, off, n = ev.cmd, ev.offset, ev.length
            if c is Cmd.WRITE:
                mv = memoryview(store)[off:off + n]
                got = conn.payload_into(mv)
                while got < n:  # the driver "receives" the rest itself
                    k = min(piece, n - got)
                    mv[got:got + k] = client[pos:pos + k]
                    pos += k
                    conn.payload_received(k)
                    got += k
                out.append(conn.ok_reply(ev.cookie))
            elif c is Cmd.READ:
                out.append(conn.read_reply_header(ev.cookie, off, n))
                out.append(bytes(store[off:off + n]))
            elif c is Cmd.BLOCK_STATUS:
                out.extend(conn.block_status_reply(ev.cookie, [(4096, 0)]))
            else:
                out.append(conn.ok_reply(ev.cookie))
        elif isinstance(ev, InvalidCommand):
            out.append(conn.error_reply(ev.cookie, ev.error))
        elif isinstance(ev, SafeClose):
            out.append(conn.ok_reply(ev.cookie))
            closed = True
        elif isinstance(ev, Disconnect | Aborted):
            closed = True
    return b"".join(out)


def test_pump_structured_go_session():
    client = (
        H("00000003")
        + opt(8)
        + opt(10, meta_data("disk", ["base:allocation"]))
        + opt(0x4E42A001)
        + opt(7, info_data("disk", [3]))
        + req(1, 1, 1, 0, 8) + b"ABCDEFGH"          # WRITE FUA
        + req(0, 0, 2, 4, 8)                         # READ
        + req(7, 8, 3, 0, 4096)                      # BLOCK_STATUS REQ_ONE
        + req(1, 0, 4, MIB - 4, 8) + b"12345678"     # WRITE past the end
        + req(3, 0, 5)                               # FLUSH
        + req(0x7F01, 0, 6)                          # X_CLOSE
    )
    # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF, SEND_CACHE,
    # SEND_FAST_ZERO, X_SEND_CLOSE
    flags = 0x8CED
    expected = (
        H("4e42444d41474943 49484156454f5054 0003")
        + rep(8, 1)
        + rep(10, 4, H("00000001") + b"base:allocation") + rep(10, 1)
        + rep(0x4E42A001, 1)
        + rep(7, 3, H("0000") + struct.pack(">QH", MIB, flags))
        + rep(7, 3, H("0003 00000001 00001000 04000000"))
        + rep(7, 1)
        + CHUNK + H("0001 0000 0000000000000001 00000000")
        + CHUNK + H("0001 0001 0000000000000002 00000010 0000000000000004") + b"EFGH" + bytes(4)
        + CHUNK + H("0001 0005 0000000000000003 0000000c 00000001 00001000 00000000")
        + CHUNK + H("0001 8001 0000000000000004 00000006 0000001c 0000")
        + CHUNK + H("0001 0000 0000000000000005 00000000")
        + CHUNK + H("0001 0000 0000000000000006 00000000")
    )
    for piece in (1, 5, 64, len(client)):
        store = bytearray(MIB)
        conn = ServerConnection(Provider())
        assert pump(conn, client, store, piece) == expected
        assert store[:8] == b"ABCDEFGH" and store[MIB - 4:] == bytes(4)
        assert conn.state is State.CLOSED


def test_pump_simple_export_name_session():
    client = (
        H("00000001")                                # fixed newstyle, no NO_ZEROES
        + opt(3)                                     # LIST
        + opt(12, b"whatever")                       # unknown option
        + opt(1, b"ro")                              # EXPORT_NAME
        + req(0, 0, 0xA, 16, 4)                      # READ
        + req(1, 0, 0xB, 0, 6) + b"refuse"           # WRITE to read-only
        + req(42, 0, 0xC)                            # unknown command
        + req(2, 0, 0xD)                             # DISC
        + req(0, 0, 0xE, 0, 4)                       # ignored
    )
    expected = (
        H("4e42444d41474943 49484156454f5054 0003")
        + rep(3, 2, string("disk") + b"d") + rep(3, 2, string("ro")) + rep(3, 2, string("bare"))
        + rep(3, 2, string("bitmap")) + rep(3, 1)
        + rep(12, 0x80000001, b"@")  # the text is for humans: "@" stands for it
        + struct.pack(">QH", 64 * KIB, 0x0407) + bytes(124)
        + SIMPLE + H("00000000 000000000000000a") + b"\x10\x11\x12\x13"
        + SIMPLE + H("00000001 000000000000000b")
        + SIMPLE + H("00000016 000000000000000c")
    )
    for piece in (1, 3, 100, len(client)):
        store = bytearray(range(256)) * 256  # the 64 KiB read-only export
        conn = ServerConnection(Provider())
        got = pump(conn, client, store, piece)
        head = expected.index(rep(12, 0x80000001, b"@"))
        assert got[:head] == expected[:head]
        (msg_len,) = struct.unpack_from(">I", got, head + 16)
        assert got[head:head + 16] == rep(12, 0x80000001)[:16]
        got[head + 20:head + 20 + msg_len].decode("utf-8")
        assert got[head + 20 + msg_len:] == expected[head + 21:]
        assert store == bytearray(range(256)) * 256
        assert conn.state is State.CLOSED
