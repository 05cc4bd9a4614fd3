"""Table-driven tests of the sans-I/O NBD server state machine (pynbd.protocol.server).

No sockets: bytes go in through ``receive_data``, events and the exact bytes of
``take_output`` and the reply builders come out. Client messages and expected server
bytes are built here with ``struct`` and the spec's literal magics, independent of
pynbd.protocol.wire.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest

from pynbd.protocol.constants import Cmd, Errno
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError
from pynbd.protocol.server import (
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

# --- spec values, spelled out -------------------------------------------------------

NBDMAGIC = H("4e42444d41474943")
IHAVEOPT = H("49484156454f5054")
OPT_REPLY_MAGIC = H("0003e889045565a9")
REQUEST_MAGIC = H("25609513")
GREETING = NBDMAGIC + IHAVEOPT + H("0003")  # FIXED_NEWSTYLE | NO_ZEROES

# options
EXPORT_NAME, ABORT, LIST, PEEK_EXPORT, STARTTLS, INFO, GO = 1, 2, 3, 4, 5, 6, 7
STRUCTURED_REPLY, LIST_META, SET_META, EXTENDED_HEADERS = 8, 9, 10, 11
X_CLOSE_OPT = 0x4E42A001
# replies
ACK, SERVER, REP_INFO, META_CONTEXT = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID = 0x80000001, 0x80000002, 0x80000003
ERR_TLS_REQD, ERR_UNKNOWN, ERR_TOO_BIG = 0x80000005, 0x80000006, 0x80000009
# commands
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS, RESIZE = range(9)
X_CLOSE_CMD = 0x7F01
# command flags
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
# errors
EPERM, EINVAL, ENOSPC, EOVERFLOW = 1, 22, 28, 75

KIB, MIB = 1024, 1024 * 1024

# --- exports ------------------------------------------------------------------------

DISK = ExportInfo("disk", MIB, description="The disk", can_trim=True, can_fast_zero=True,
                  can_multi_conn=True)
RO = ExportInfo("ro", 64 * KIB, read_only=True)
# an export with few features and non-default block sizes
BARE = ExportInfo("bare", MIB, can_flush=False, can_fua=False, can_zero=False,
                  can_cache=False, block_size=(512, 4096, 64 * KIB), meta_contexts=())
BITMAP = ExportInfo("bitmap", MIB, meta_contexts=("base:allocation", "qemu:dirty-bitmap:b0"))

# transmission flags computed by hand from the spec's bit numbers
DISK_FLAGS = 0x0001 | 0x0004 | 0x0008 | 0x0020 | 0x0040 | 0x0100 | 0x0400 | 0x0800  # 0x0D6D
RO_FLAGS = 0x0001 | 0x0002 | 0x0004 | 0x0400  # 0x0407
BARE_FLAGS = 0x0001
SEND_DF = 0x0080
X_SEND_CLOSE = 0x8000


class Provider:
    def __init__(self, exports: Sequence[ExportInfo], default: str | None = "disk") -> None:
        self.exports = {e.name: e for e in exports}
        self.default = default

    def lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default is not None:
            name = self.default
        return self.exports.get(name)

    def list_exports(self) -> Sequence[ExportInfo]:
        return list(self.exports.values())


PROVIDER = Provider([DISK, RO, BARE, BITMAP])


# --- client-side bytes --------------------------------------------------------------

def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPT_REPLY_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack(">I", len(raw)) + raw


def info_data(name: str, infos: Sequence[int] = ()) -> bytes:
    return string(name) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: Sequence[str]) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def req(cmd: int, flags: int = 0, cookie: int = 1, offset: int = 0, length: int = 0) -> bytes:
    return REQUEST_MAGIC + struct.pack(">HHQQI", flags, cmd, cookie, offset, length)


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", 0, size, flags)


def parse_replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Split server output into option replies, checking every frame."""
    replies = []
    pos = 0
    while pos < len(out):
        assert out[pos:pos + 8] == OPT_REPLY_MAGIC, out[pos:]
        option, reply, length = struct.unpack_from(">III", out, pos + 8)
        data = out[pos + 20:pos + 20 + length]
        assert len(data) == length
        replies.append((option, reply, data))
        pos += 20 + length
    return replies


def kinds(out: bytes) -> list[tuple[int, int]]:
    """(option, reply type) of every reply; error messages must be UTF-8."""
    result = []
    for option, reply, data in parse_replies(out):
        if reply & 0x80000000:
            data.decode("utf-8")
        result.append((option, reply))
    return result


# --- driving the state machine ------------------------------------------------------

def new_conn(provider: Provider = PROVIDER, **config: object) -> ServerConnection:
    conn = ServerConnection(provider, ServerConfig(**config))  # type: ignore[arg-type]
    assert conn.initiate() == GREETING
    return conn


def events(conn: ServerConnection, data: bytes = b"") -> list[object]:
    """Feed ``data``; collect events until NEED_DATA or a WRITE payload is due."""
    if data:
        conn.receive_data(data)
    evs: list[object] = []
    while conn.state is not State.PAYLOAD:
        ev = conn.next_event()
        if ev is NEED_DATA:
            break
        evs.append(ev)
    return evs


def started(client_flags: int = 3, provider: Provider = PROVIDER, **config: object
            ) -> ServerConnection:
    conn = new_conn(provider, **config)
    assert events(conn, struct.pack(">I", client_flags)) == []
    assert conn.state is State.OPTIONS
    return conn


def transmission(name: str = "disk", structured: bool = False, meta: Sequence[str] = (),
                 x_close: bool = False, **config: object) -> ServerConnection:
    conn = started(**config)
    data = b""
    if structured:
        data += opt(STRUCTURED_REPLY)
    if x_close:
        data += opt(X_CLOSE_OPT)
    if meta:
        data += opt(SET_META, meta_data(name, meta))
    data += opt(GO, info_data(name))
    evs = events(conn, data)
    assert isinstance(evs[-1], ExportSelected), evs
    assert conn.state is State.TRANSMISSION
    conn.take_output()
    return conn


# === handshake ======================================================================

def test_greeting_bytes():
    conn = ServerConnection(PROVIDER)
    assert conn.initiate() == H("4e42444d41474943 49484156454f5054 0003")
    with pytest.raises(LocalProtocolError):
        conn.initiate()


def test_next_event_before_initiate():
    conn = ServerConnection(PROVIDER)
    conn.receive_data(H("00000003"))
    with pytest.raises(LocalProtocolError):
        conn.next_event()


@pytest.mark.parametrize(("flags", "fixed", "no_zeroes"), [
    (0, False, False), (1, True, False), (2, False, True), (3, True, True),
])
def test_client_flags_accepted(flags, fixed, no_zeroes):
    conn = new_conn()
    for byte in struct.pack(">I", flags):  # one byte at a time
        assert conn.next_event() is NEED_DATA
        conn.receive_data(bytes([byte]))
    assert conn.next_event() is NEED_DATA
    assert conn.state is State.OPTIONS
    assert (conn.fixed_newstyle, conn.no_zeroes) == (fixed, no_zeroes)
    assert conn.take_output() == b""


@pytest.mark.parametrize("flags", [4, 5, 7, 0x80000000, 0x80000003, 0xFFFFFFFF])
def test_unknown_client_flags_drop(flags):
    conn = new_conn()
    conn.receive_data(struct.pack(">I", flags))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED
    assert conn.take_output() == b""


@pytest.mark.parametrize(("client_flags", "expected_len"), [(1, 134), (3, 10), (0, 134), (2, 10)])
def test_export_name_reply(client_flags, expected_len):
    conn = started(client_flags)
    evs = events(conn, opt(EXPORT_NAME, b"disk"))
    head = struct.pack(">QH", MIB, DISK_FLAGS)
    assert conn.take_output() == (head if expected_len == 10 else head + bytes(124))
    assert len(head) == 10
    assert evs == [ExportSelected(DISK, DISK_FLAGS, False, {}, False)]
    assert conn.state is State.TRANSMISSION


def test_export_name_default_and_read_only():
    conn = started()
    events(conn, opt(EXPORT_NAME))
    assert conn.take_output() == struct.pack(">QH", MIB, DISK_FLAGS)
    conn = started()
    events(conn, opt(EXPORT_NAME, b"ro"))
    assert conn.take_output() == struct.pack(">QH", 64 * KIB, RO_FLAGS)


def test_export_name_after_structured_reply_advertises_df():
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(EXPORT_NAME, b"disk"))
    assert conn.take_output() == rep(STRUCTURED_REPLY, ACK) + struct.pack(
        ">QH", MIB, DISK_FLAGS | SEND_DF)
    assert evs[-1] == ExportSelected(DISK, DISK_FLAGS | SEND_DF, True, {}, False)


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe", b"DISK"])
def test_export_name_unknown_drops(name):
    conn = started()
    conn.receive_data(opt(EXPORT_NAME, name))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.take_output() == b""
    assert conn.state is State.CLOSED


def test_export_name_without_default_export_drops():
    conn = started(provider=Provider([DISK], default=None))
    conn.receive_data(opt(EXPORT_NAME))
    with pytest.raises(PeerProtocolError):
        conn.next_event()


def test_client_without_fixed_newstyle_may_only_export_name():
    conn = started(0)
    events(conn, opt(EXPORT_NAME, b"disk"))
    assert len(conn.take_output()) == 134
    for option in (GO, LIST, ABORT, STRUCTURED_REPLY, 99):
        conn = started(0)
        conn.receive_data(opt(option))
        with pytest.raises(PeerProtocolError):
            conn.next_event()
        assert conn.take_output() == b""


def test_bad_option_magic_drops():
    conn = started()
    conn.receive_data(b"IHAVEOPS" + struct.pack(">II", LIST, 0))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED


# === options ========================================================================

def test_abort():
    conn = started()
    evs = events(conn, opt(ABORT))
    assert evs == [Aborted()]
    assert conn.take_output() == rep(ABORT, ACK)
    assert conn.state is State.CLOSED
    conn.receive_data(opt(LIST))
    assert conn.next_event() is NEED_DATA
    assert conn.take_output() == b""


def test_abort_with_data_is_still_acked():
    conn = started()
    assert events(conn, opt(ABORT, b"junk")) == [Aborted()]
    assert conn.take_output() == rep(ABORT, ACK)


def test_list():
    conn = started()
    evs = events(conn, opt(LIST))
    assert evs == [OptionHandled(LIST, ACK)]
    assert conn.take_output() == (
        rep(LIST, SERVER, string("disk") + b"The disk")
        + rep(LIST, SERVER, string("ro"))
        + rep(LIST, SERVER, string("bare"))
        + rep(LIST, SERVER, string("bitmap"))
        + rep(LIST, ACK))


def test_list_with_data_is_invalid_and_stream_stays_in_sync():
    conn = started()
    evs = events(conn, opt(LIST, b"\x00\x00\x00\x04disk") + opt(LIST))
    assert evs == [OptionHandled(LIST, ERR_INVALID), OptionHandled(LIST, ACK)]
    assert kinds(conn.take_output()) == [(LIST, ERR_INVALID)] + [(LIST, SERVER)] * 4 + [(LIST, ACK)]


def test_list_disabled():
    conn = started(allow_list=False)
    events(conn, opt(LIST))
    assert kinds(conn.take_output()) == [(LIST, ERR_POLICY)]


INFO_CASES = [
    pytest.param("disk", [], [info_export(MIB, DISK_FLAGS)], id="no-requests"),
    pytest.param("", [], [info_export(MIB, DISK_FLAGS)], id="default-export"),
    pytest.param("disk", [1], [info_export(MIB, DISK_FLAGS), H("0001") + b"disk"], id="name"),
    pytest.param("", [1], [info_export(MIB, DISK_FLAGS), H("0001") + b"disk"],
                 id="name-of-default"),
    pytest.param("disk", [2], [info_export(MIB, DISK_FLAGS), H("0002") + b"The disk"],
                 id="description"),
    pytest.param("ro", [2], [info_export(64 * KIB, RO_FLAGS)], id="no-description"),
    pytest.param("disk", [3], [info_export(MIB, DISK_FLAGS), H("0003 00000001 00001000 04000000")],
                 id="block-size"),
    pytest.param("bare", [3], [info_export(MIB, BARE_FLAGS), H("0003 00000200 00001000 00010000")],
                 id="block-size-bare"),
    pytest.param("disk", [0, 1, 1, 99, 0x8000], [info_export(MIB, DISK_FLAGS), H("0001") + b"disk"],
                 id="duplicates-and-unknown"),
    pytest.param("disk", [3, 2, 1], [info_export(MIB, DISK_FLAGS),
                                     H("0003 00000001 00001000 04000000"),
                                     H("0002") + b"The disk", H("0001") + b"disk"], id="all"),
]


@pytest.mark.parametrize(("name", "infos", "expected"), INFO_CASES)
def test_info(name, infos, expected):
    conn = started()
    evs = events(conn, opt(INFO, info_data(name, infos)))
    assert evs == [OptionHandled(INFO, ACK)]
    assert conn.take_output() == b"".join(rep(INFO, REP_INFO, d) for d in expected) + rep(INFO, ACK)
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize(("name", "infos", "expected"), INFO_CASES)
def test_go(name, infos, expected):
    conn = started()
    evs = events(conn, opt(GO, info_data(name, infos)))
    assert conn.take_output() == b"".join(rep(GO, REP_INFO, d) for d in expected) + rep(GO, ACK)
    assert len(evs) == 1 and isinstance(evs[0], ExportSelected)
    assert evs[0].export.name == (name or "disk")
    assert evs[0].flags == struct.unpack(">H", expected[0][-2:])[0]
    assert conn.state is State.TRANSMISSION


def test_info_then_go():
    conn = started()
    evs = events(conn, opt(INFO, info_data("ro")) + opt(GO, info_data("ro")))
    assert evs[0] == OptionHandled(INFO, ACK)
    assert evs[1] == ExportSelected(RO, RO_FLAGS, False, {}, False)
    export = info_export(64 * KIB, RO_FLAGS)
    assert conn.take_output() == (rep(INFO, REP_INFO, export) + rep(INFO, ACK)
                                  + rep(GO, REP_INFO, export) + rep(GO, ACK))


@pytest.mark.parametrize("option", [INFO, GO])
def test_info_go_unknown_export(option):
    conn = started()
    evs = events(conn, opt(option, info_data("nope", [1])) + opt(option, info_data("disk")))
    assert evs[0] == OptionHandled(option, ERR_UNKNOWN)
    assert kinds(conn.take_output()) == [(option, ERR_UNKNOWN), (option, REP_INFO), (option, ACK)]


def test_go_without_default_export():
    conn = started(provider=Provider([DISK], default=None))
    events(conn, opt(GO, info_data("")))
    assert kinds(conn.take_output()) == [(GO, ERR_UNKNOWN)]
    assert conn.state is State.OPTIONS


MALFORMED_INFO = [
    pytest.param(b"", id="empty"),
    pytest.param(H("0000"), id="short"),
    pytest.param(H("00000004") + b"disk", id="no-count"),
    pytest.param(H("00000004") + b"disk" + H("0001"), id="count-without-infos"),
    pytest.param(H("00000004") + b"disk" + H("0000 00"), id="trailing-byte"),
    pytest.param(H("00000005") + b"disk" + H("0000"), id="name-overruns"),
    pytest.param(H("00000002 fffe 0000"), id="name-not-utf8"),
]


@pytest.mark.parametrize("option", [INFO, GO])
@pytest.mark.parametrize("data", MALFORMED_INFO)
def test_info_go_malformed(option, data):
    conn = started()
    evs = events(conn, opt(option, data) + opt(LIST))
    assert evs == [OptionHandled(option, ERR_INVALID), OptionHandled(LIST, ACK)]
    assert kinds(conn.take_output())[0] == (option, ERR_INVALID)
    assert conn.state is State.OPTIONS


def test_structured_reply():
    conn = started()
    assert events(conn, opt(STRUCTURED_REPLY)) == [OptionHandled(STRUCTURED_REPLY, ACK)]
    assert conn.take_output() == rep(STRUCTURED_REPLY, ACK)
    assert conn.structured_replies


def test_structured_reply_with_data_is_invalid():
    conn = started()
    events(conn, opt(STRUCTURED_REPLY, b"x") + opt(GO, info_data("disk")))
    out = kinds(conn.take_output())
    assert out == [(STRUCTURED_REPLY, ERR_INVALID), (GO, REP_INFO), (GO, ACK)]
    assert not conn.structured_replies


LIST_META_CASES = [
    pytest.param("disk", [], [(0, "base:allocation")], id="zero-queries-all"),
    pytest.param("bitmap", [], [(0, "base:allocation"), (0, "qemu:dirty-bitmap:b0")],
                 id="zero-queries-all-two"),
    pytest.param("", [], [(0, "base:allocation")], id="default-export"),
    pytest.param("disk", ["base:"], [(0, "base:allocation")], id="base-namespace"),
    pytest.param("bitmap", ["base:"], [(0, "base:allocation")], id="base-namespace-only-base"),
    pytest.param("bitmap", ["qemu:"], [(0, "qemu:dirty-bitmap:b0")], id="qemu-namespace"),
    pytest.param("disk", ["base:allocation"], [(0, "base:allocation")], id="exact"),
    pytest.param("disk", ["base:nothing"], [], id="unknown-leaf-ignored"),
    pytest.param("disk", ["x-unknown:foo", "qemu:dirty-bitmap:b0"], [],
                 id="unknown-namespace-ignored"),
    pytest.param("disk", ["x-unknown:", "base:allocation"], [(0, "base:allocation")],
                 id="unknown-and-known"),
    pytest.param("bare", [], [], id="export-without-contexts"),
]


@pytest.mark.parametrize(("name", "queries", "expected"), LIST_META_CASES)
def test_list_meta_context(name, queries, expected):
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(LIST_META, meta_data(name, queries)))
    assert evs[-1] == OptionHandled(LIST_META, ACK)
    assert conn.take_output() == rep(STRUCTURED_REPLY, ACK) + b"".join(
        rep(LIST_META, META_CONTEXT, struct.pack(">I", cid) + ctx.encode()) for cid, ctx in expected
    ) + rep(LIST_META, ACK)


@pytest.mark.parametrize("option", [LIST_META, SET_META])
@pytest.mark.parametrize(("data", "reply"), [
    pytest.param(meta_data("disk", ["allocation"]), ERR_INVALID, id="query-without-colon"),
    pytest.param(meta_data("disk", ["base:allocation", "nocolon"]), ERR_INVALID,
                 id="second-query-without-colon"),
    pytest.param(meta_data("nope", ["base:"]), ERR_UNKNOWN, id="unknown-export"),
    pytest.param(b"", ERR_INVALID, id="empty-data"),
    pytest.param(meta_data("disk", ["base:allocation"]) + b"x", ERR_INVALID, id="trailing"),
    pytest.param(string("disk") + H("00000002") + string("base:allocation"), ERR_INVALID,
                 id="missing-query"),
    pytest.param(string("disk") + H("ffffffff"), ERR_INVALID, id="absurd-count"),
])
def test_meta_context_errors(option, data, reply):
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(option, data) + opt(LIST))
    assert evs[1] == OptionHandled(option, reply)
    assert evs[2] == OptionHandled(LIST, ACK)  # still in sync
    assert kinds(conn.take_output())[:2] == [(STRUCTURED_REPLY, ACK), (option, reply)]


@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_meta_context_needs_structured_replies(option):
    conn = started()
    evs = events(conn, opt(option, meta_data("disk", ["base:allocation"])))
    assert evs == [OptionHandled(option, ERR_INVALID)]
    assert kinds(conn.take_output()) == [(option, ERR_INVALID)]


SET_META_CASES = [
    pytest.param("disk", ["base:allocation"], {1: "base:allocation"}, id="base-allocation"),
    pytest.param("disk", ["base:allocation", "base:allocation"], {1: "base:allocation"},
                 id="duplicate-query"),
    pytest.param("disk", [], {}, id="zero-queries-select-nothing"),
    pytest.param("disk", ["base:"], {}, id="namespace-ignored-in-set"),
    pytest.param("disk", ["qemu:dirty-bitmap:b0", "x-foo:bar"], {}, id="unknown-ignored"),
    pytest.param("bitmap", ["qemu:dirty-bitmap:b0", "base:allocation"],
                 {1: "base:allocation", 2: "qemu:dirty-bitmap:b0"}, id="two-contexts"),
]


@pytest.mark.parametrize(("name", "queries", "selected"), SET_META_CASES)
def test_set_meta_context(name, queries, selected):
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(SET_META, meta_data(name, queries))
                 + opt(GO, info_data(name)))
    assert evs[1] == OptionHandled(SET_META, ACK)
    out = parse_replies(conn.take_output())
    contexts = [(o, r, d) for o, r, d in out if o == SET_META]
    assert contexts[-1] == (SET_META, ACK, b"")
    got = {struct.unpack(">I", d[:4])[0]: d[4:].decode() for _, r, d in contexts[:-1]}
    assert all(r == META_CONTEXT for _, r, _ in contexts[:-1])
    assert got == selected
    assert evs[-1].meta_contexts == selected
    assert conn.meta_contexts == selected


@pytest.mark.parametrize(("set_name", "go_name", "applies"), [
    ("disk", "disk", True),
    ("disk", "", True),       # "" is the default export, which is "disk"
    ("", "disk", True),
    ("", "", True),
    ("disk", "bitmap", False),
    ("bitmap", "disk", False),
    ("bitmap", "", False),
])
def test_set_meta_context_applies_only_to_selected_export(set_name, go_name, applies):
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY)
                 + opt(SET_META, meta_data(set_name, ["base:allocation"]))
                 + opt(GO, info_data(go_name)))
    assert isinstance(evs[-1], ExportSelected)
    expected = {1: "base:allocation"} if applies else {}
    assert evs[-1].meta_contexts == expected
    assert conn.meta_contexts == expected


def test_set_meta_context_replaced_even_on_failure():
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY)
                 + opt(SET_META, meta_data("disk", ["base:allocation"]))
                 + opt(SET_META, meta_data("disk", ["nocolon"]))
                 + opt(GO, info_data("disk")))
    assert evs[2] == OptionHandled(SET_META, ERR_INVALID)
    assert evs[-1].meta_contexts == {}


def test_set_meta_context_last_one_wins():
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY)
                 + opt(SET_META, meta_data("bitmap", ["base:allocation", "qemu:dirty-bitmap:b0"]))
                 + opt(SET_META, meta_data("bitmap", ["qemu:dirty-bitmap:b0"]))
                 + opt(GO, info_data("bitmap")))
    assert evs[-1].meta_contexts == {1: "qemu:dirty-bitmap:b0"}


def test_set_meta_context_with_export_name():
    conn = started()
    evs = events(conn, opt(STRUCTURED_REPLY)
                 + opt(SET_META, meta_data("disk", ["base:allocation"]))
                 + opt(EXPORT_NAME, b"disk"))
    assert evs[-1].meta_contexts == {1: "base:allocation"}


# --- STARTTLS -----------------------------------------------------------------------

def test_starttls_without_tls_configured():
    conn = started()
    assert events(conn, opt(STARTTLS)) == [OptionHandled(STARTTLS, ERR_UNSUP)]
    assert kinds(conn.take_output()) == [(STARTTLS, ERR_UNSUP)]
    assert conn.state is State.OPTIONS


@pytest.mark.parametrize("option", [LIST, INFO, GO, STRUCTURED_REPLY, LIST_META, SET_META,
                                    X_CLOSE_OPT, PEEK_EXPORT, EXTENDED_HEADERS, 0xDEADBEEF])
def test_tls_required_refuses_options(option):
    conn = started(tls=TLSMode.REQUIRE)
    data = info_data("disk") if option in (INFO, GO) else b""
    evs = events(conn, opt(option, data) + opt(option, data))
    assert evs == [OptionHandled(option, ERR_TLS_REQD)] * 2
    assert kinds(conn.take_output()) == [(option, ERR_TLS_REQD)] * 2
    assert not conn.structured_replies and not conn.x_close


def test_tls_required_export_name_drops():
    conn = started(tls=TLSMode.REQUIRE)
    conn.receive_data(opt(EXPORT_NAME, b"disk"))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.take_output() == b""
    assert conn.state is State.CLOSED


def test_tls_required_abort_allowed():
    conn = started(tls=TLSMode.REQUIRE)
    assert events(conn, opt(ABORT)) == [Aborted()]
    assert conn.take_output() == rep(ABORT, ACK)


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_starttls_flow(mode):
    conn = started(tls=mode)
    assert events(conn, opt(STARTTLS)) == [StartTLS()]
    assert conn.take_output() == rep(STARTTLS, ACK)
    assert conn.state is State.TLS_PENDING
    assert conn.next_event() is NEED_DATA
    conn.tls_established()
    assert conn.tls_active
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(STARTTLS) + opt(GO, info_data("disk")))
    assert evs[:2] == [OptionHandled(STRUCTURED_REPLY, ACK), OptionHandled(STARTTLS, ERR_INVALID)]
    assert evs[2] == ExportSelected(DISK, DISK_FLAGS | SEND_DF, True, {}, False)
    assert kinds(conn.take_output()) == [(STRUCTURED_REPLY, ACK), (STARTTLS, ERR_INVALID),
                                         (GO, REP_INFO), (GO, ACK)]


def test_starttls_with_data_is_invalid():
    conn = started(tls=TLSMode.REQUIRE)
    assert events(conn, opt(STARTTLS, b"x")) == [OptionHandled(STARTTLS, ERR_INVALID)]
    assert conn.state is State.OPTIONS


def test_starttls_forgets_option_state():
    conn = started(tls=TLSMode.ON)
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(X_CLOSE_OPT)
                 + opt(SET_META, meta_data("disk", ["base:allocation"])) + opt(STARTTLS))
    assert evs[-1] == StartTLS()
    conn.take_output()
    conn.tls_established()
    # structured replies are forgotten: SET_META_CONTEXT needs them again
    evs = events(conn, opt(SET_META, meta_data("disk", ["base:allocation"]))
                 + opt(GO, info_data("disk")))
    assert evs[0] == OptionHandled(SET_META, ERR_INVALID)
    assert evs[1] == ExportSelected(DISK, DISK_FLAGS, False, {}, False)


def test_starttls_forgets_meta_contexts():
    conn = started(tls=TLSMode.ON)
    events(conn, opt(STRUCTURED_REPLY) + opt(SET_META, meta_data("disk", ["base:allocation"]))
           + opt(STARTTLS))
    conn.tls_established()
    evs = events(conn, opt(STRUCTURED_REPLY) + opt(GO, info_data("disk")))
    assert evs[-1] == ExportSelected(DISK, DISK_FLAGS | SEND_DF, True, {}, False)


def test_plaintext_after_starttls_is_a_protocol_error():
    conn = started(tls=TLSMode.ON)
    assert events(conn, opt(STARTTLS) + opt(LIST)) == [StartTLS()]
    with pytest.raises(PeerProtocolError):
        conn.tls_established()
    assert conn.state is State.CLOSED


def test_tls_established_in_wrong_state():
    conn = started(tls=TLSMode.ON)
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


# --- safe-close option --------------------------------------------------------------

def test_x_close_option():
    conn = started()
    evs = events(conn, opt(X_CLOSE_OPT) + opt(GO, info_data("disk")))
    assert evs == [OptionHandled(X_CLOSE_OPT, ACK),
                   ExportSelected(DISK, DISK_FLAGS | X_SEND_CLOSE, False, {}, True)]
    assert conn.take_output() == (rep(X_CLOSE_OPT, ACK)
                                  + rep(GO, REP_INFO, info_export(MIB, DISK_FLAGS | X_SEND_CLOSE))
                                  + rep(GO, ACK))


def test_no_x_send_close_flag_without_option():
    conn = started()
    evs = events(conn, opt(GO, info_data("disk")))
    assert not evs[-1].flags & X_SEND_CLOSE
    assert not evs[-1].x_close


def test_x_close_option_with_data_is_invalid():
    conn = started()
    evs = events(conn, opt(X_CLOSE_OPT, b"x") + opt(GO, info_data("disk")))
    assert evs[0] == OptionHandled(X_CLOSE_OPT, ERR_INVALID)
    assert not evs[1].flags & X_SEND_CLOSE


def test_x_close_option_disabled():
    conn = started(x_close=False)
    evs = events(conn, opt(X_CLOSE_OPT) + opt(GO, info_data("disk")))
    assert evs[0] == OptionHandled(X_CLOSE_OPT, ERR_UNSUP)
    assert not evs[1].flags & X_SEND_CLOSE


# --- unknown and oversized options --------------------------------------------------

@pytest.mark.parametrize("option", [0, PEEK_EXPORT, 12, 0x4E42A002, 0x7FFFFFFF, 0xFFFFFFFF])
@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"IHAVEOPT" + bytes(8)])
def test_unknown_option_consumed(option, data):
    conn = started()
    evs = events(conn, opt(option, data) + opt(INFO, info_data("disk")))
    assert evs == [OptionHandled(option, ERR_UNSUP), OptionHandled(INFO, ACK)]
    out = kinds(conn.take_output())
    assert out == [(option, ERR_UNSUP), (INFO, REP_INFO), (INFO, ACK)]


def test_option_of_exactly_64k_is_read():
    conn = started()
    evs = events(conn, opt(99, bytes(64 * KIB)) + opt(LIST))
    assert evs[0] == OptionHandled(99, ERR_UNSUP)
    assert evs[1] == OptionHandled(LIST, ACK)


@pytest.mark.parametrize("length", [64 * KIB + 1, 200 * KIB, MIB])
@pytest.mark.parametrize("option", [LIST, GO, 99])
def test_oversized_option_discarded_without_buffering(option, length):
    conn = started()
    conn.receive_data(IHAVEOPT + struct.pack(">II", option, length))
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0
    piece = bytes(10_000)
    left = length
    while left > 10_000:
        conn.receive_data(piece)
        assert conn.next_event() is NEED_DATA
        assert conn.buffered == 0
        left -= 10_000
    evs = events(conn, bytes(left) + opt(LIST))
    assert evs[0] == OptionHandled(option, ERR_TOO_BIG)
    assert evs[1] == OptionHandled(LIST, ACK)
    assert kinds(conn.take_output())[0] == (option, ERR_TOO_BIG)


@pytest.mark.parametrize(("option", "length"), [
    (99, MIB + 1), (LIST, 0xFFFFFFFF), (EXPORT_NAME, 64 * KIB + 1), (EXPORT_NAME, 0xFFFFFFFF),
])
def test_absurd_option_length_drops_at_once(option, length):
    conn = started()
    conn.receive_data(IHAVEOPT + struct.pack(">II", option, length))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED
    assert conn.take_output() == b""


def test_too_many_options():
    conn = started()
    evs = events(conn, opt(99) * 1024)
    assert len(evs) == 1024
    conn.take_output()
    conn.receive_data(opt(99))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.take_output() == b""


def test_options_byte_by_byte_match_all_at_once():
    data = (opt(99, b"xyz") + opt(LIST) + opt(STRUCTURED_REPLY)
            + opt(LIST_META, meta_data("disk", [])) + opt(INFO, info_data("disk", [1, 2, 3]))
            + opt(SET_META, meta_data("disk", ["base:allocation"])) + opt(GO, info_data("")))
    whole = started()
    evs_whole = events(whole, data)
    out_whole = whole.take_output()
    split = started()
    evs_split: list[object] = []
    for byte in data:
        evs_split += events(split, bytes([byte]))
    assert evs_split == evs_whole
    assert split.take_output() == out_whole
    assert isinstance(evs_whole[-1], ExportSelected)


def test_error_reply_messages_are_valid_utf8_and_capped():
    conn = started()
    # a 4096-byte export name of 2-byte characters: the error text exceeds 4096 bytes
    events(conn, opt(INFO, info_data("é" * 2048)))
    ((option, reply, data),) = parse_replies(conn.take_output())
    assert (option, reply) == (INFO, ERR_UNKNOWN)
    assert len(data) <= 4096
    data.decode("utf-8")


# === transmission ===================================================================

def cmd_ok(cmd: int, flags: int = 0, offset: int = 0, length: int = 0) -> Command:
    return Command(Cmd(cmd), flags, 1, offset, length)


def cmd_err(cmd: int, flags: int, offset: int, length: int, error: int) -> tuple[object, ...]:
    return (cmd, flags, 1, offset, length, error)


# (export, structured, meta, x_close, cmd, flags, offset, length, expected error or None)
TX_CASES = [
    # READ
    ("disk", False, False, False, READ, 0, 0, 4096, None),
    ("disk", False, False, False, READ, 0, MIB - 1, 1, None),
    ("disk", False, False, False, READ, FUA, 0, 512, None),  # FUA valid on every command
    ("disk", False, False, False, READ, DF, 0, 512, EINVAL),  # DF needs structured replies
    ("disk", True, False, False, READ, DF, 0, 512, None),
    ("disk", True, False, False, READ, DF | FUA, 0, 512, None),
    ("disk", False, False, False, READ, NO_HOLE, 0, 512, EINVAL),
    ("disk", False, False, False, READ, REQ_ONE, 0, 512, EINVAL),
    ("disk", False, False, False, READ, PAYLOAD_LEN, 0, 512, EINVAL),
    ("disk", False, False, False, READ, 0x8000, 0, 512, EINVAL),
    ("disk", False, False, False, READ, 0, MIB - 512, 1024, EINVAL),  # past the end
    ("disk", False, False, False, READ, 0, MIB, 1, EINVAL),
    ("disk", False, False, False, READ, 0, 2**64 - 1, 1, EINVAL),
    ("bare", False, False, False, READ, FUA, 0, 512, EINVAL),  # FUA not advertised
    ("bare", False, False, False, READ, 0, 1, 512, EINVAL),  # unaligned offset
    ("bare", False, False, False, READ, 0, 0, 100, EINVAL),  # unaligned length
    ("bare", True, False, False, READ, 0, 0, 64 * KIB + 512, EOVERFLOW),  # over max payload
    ("bare", False, False, False, READ, 0, 0, 64 * KIB + 512, EINVAL),  # no EOVERFLOW w/o DF
    ("bare", True, False, False, READ, 0, 0, 64 * KIB, None),
    # WRITE
    ("disk", False, False, False, WRITE, 0, 0, 4096, None),
    ("disk", False, False, False, WRITE, FUA, 4096, 4096, None),
    ("disk", False, False, False, WRITE, 0, 0, 0, None),
    ("disk", True, False, False, WRITE, DF, 0, 16, EINVAL),
    ("disk", False, False, False, WRITE, NO_HOLE, 0, 16, EINVAL),
    ("disk", False, False, False, WRITE, 0, MIB - 8, 16, ENOSPC),
    ("disk", False, False, False, WRITE, 0, MIB, 0, None),
    ("disk", False, False, False, WRITE, 0, MIB + 1, 0, ENOSPC),
    ("ro", False, False, False, WRITE, 0, 0, 16, EPERM),
    ("ro", False, False, False, WRITE, 0, 64 * KIB, 16, EPERM),  # EPERM wins over ENOSPC
    ("bare", False, False, False, WRITE, FUA, 0, 512, EINVAL),
    ("bare", False, False, False, WRITE, 0, 512, 100, EINVAL),
    ("bare", False, False, False, WRITE, 0, 0, 128 * KIB, EINVAL),  # over max payload
    # FLUSH
    ("disk", False, False, False, FLUSH, 0, 0, 0, None),
    ("disk", False, False, False, FLUSH, FUA, 0, 0, None),
    ("ro", False, False, False, FLUSH, 0, 0, 0, None),
    ("disk", False, False, False, FLUSH, NO_HOLE, 0, 0, EINVAL),
    ("bare", False, False, False, FLUSH, 0, 0, 0, EINVAL),
    # TRIM
    ("disk", False, False, False, TRIM, 0, 0, 4096, None),
    ("disk", False, False, False, TRIM, FUA, 0, 4096, None),
    ("disk", False, False, False, TRIM, NO_HOLE, 0, 4096, EINVAL),
    ("disk", False, False, False, TRIM, 0, MIB - 4096, 8192, EINVAL),  # EINVAL, not ENOSPC
    ("disk", False, False, False, TRIM, 0, 0, MIB, None),  # larger than a payload is fine
    ("ro", False, False, False, TRIM, 0, 0, 4096, EPERM),
    ("bare", False, False, False, TRIM, 0, 0, 4096, EINVAL),
    # CACHE
    ("disk", False, False, False, CACHE, 0, 0, 4096, None),
    ("disk", False, False, False, CACHE, FUA, 0, 4096, None),
    ("ro", False, False, False, CACHE, 0, 0, 4096, None),
    ("disk", True, False, False, CACHE, DF, 0, 4096, EINVAL),
    ("disk", False, False, False, CACHE, 0, MIB, 1, EINVAL),
    ("bare", False, False, False, CACHE, 0, 0, 4096, EINVAL),
    # WRITE_ZEROES
    ("disk", False, False, False, WRITE_ZEROES, 0, 0, 4096, None),
    ("disk", False, False, False, WRITE_ZEROES, NO_HOLE, 0, 4096, None),
    ("disk", False, False, False, WRITE_ZEROES, FAST_ZERO, 0, 4096, None),
    ("disk", False, False, False, WRITE_ZEROES, FUA | NO_HOLE | FAST_ZERO, 0, MIB, None),
    ("disk", True, False, False, WRITE_ZEROES, DF, 0, 4096, EINVAL),
    ("disk", False, False, False, WRITE_ZEROES, REQ_ONE, 0, 4096, EINVAL),
    ("disk", False, False, False, WRITE_ZEROES, 0, MIB - 1, 2, ENOSPC),
    ("ro", False, False, False, WRITE_ZEROES, 0, 0, 4096, EPERM),
    ("bitmap", False, False, False, WRITE_ZEROES, FAST_ZERO, 0, 4096, EINVAL),  # not advertised
    ("bitmap", False, False, False, WRITE_ZEROES, NO_HOLE, 0, 4096, None),
    ("bare", False, False, False, WRITE_ZEROES, 0, 0, 4096, EINVAL),
    # BLOCK_STATUS
    ("disk", True, True, False, BLOCK_STATUS, 0, 0, MIB, None),
    ("disk", True, True, False, BLOCK_STATUS, REQ_ONE, 0, 4096, None),
    ("disk", True, True, False, BLOCK_STATUS, FUA, 0, 4096, None),
    ("disk", True, True, False, BLOCK_STATUS, DF, 0, 4096, EINVAL),
    ("disk", True, True, False, BLOCK_STATUS, 0, 0, 0, EINVAL),
    ("disk", True, True, False, BLOCK_STATUS, 0, MIB - 512, 1024, EINVAL),
    ("disk", True, False, False, BLOCK_STATUS, 0, 0, 4096, EINVAL),  # no context selected
    ("disk", False, False, False, BLOCK_STATUS, 0, 0, 4096, EINVAL),
    # DISC is handled separately; RESIZE and unknown commands
    ("disk", False, False, False, RESIZE, 0, 0, 0, EINVAL),
    ("disk", True, True, True, 9, 0, 0, 0, EINVAL),
    ("disk", False, False, False, 0x7F00, 0, 0, 0, EINVAL),
    ("disk", False, False, False, 0xFFFF, 0, 0, 0, EINVAL),
    # safe close
    ("disk", False, False, False, X_CLOSE_CMD, 0, 0, 0, EINVAL),  # option not negotiated
    ("disk", False, False, True, X_CLOSE_CMD, 0, 1, 0, EINVAL),
    ("disk", False, False, True, X_CLOSE_CMD, 0, 0, 1, EINVAL),
    ("disk", False, False, True, X_CLOSE_CMD, NO_HOLE, 0, 0, EINVAL),
]


def _drain_payload(conn: ServerConnection) -> bytes:
    out = bytearray(conn.payload_remaining)
    n = conn.payload_into(memoryview(out))
    assert n == len(out)
    assert conn.state is State.TRANSMISSION
    return bytes(out)


@pytest.mark.parametrize(
    ("name", "structured", "meta", "x_close", "cmd", "flags", "offset", "length", "error"),
    TX_CASES)
def test_transmission_request(name, structured, meta, x_close, cmd, flags, offset, length, error):
    conn = transmission(name, structured, ("base:allocation",) if meta else (), x_close)
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256) if cmd == WRITE else b""
    follow = req(READ, cookie=99, offset=0, length=512)
    conn.receive_data(req(cmd, flags, 1, offset, length) + payload + follow)
    ev = conn.next_event()
    if error is None:
        assert ev == Command(Cmd(cmd), flags, 1, offset, length,
                             (1,) if cmd == BLOCK_STATUS else ())
        if cmd == WRITE and length:
            assert conn.state is State.PAYLOAD
            assert _drain_payload(conn) == payload
    else:
        assert isinstance(ev, InvalidCommand), ev
        assert (ev.cmd, ev.flags, ev.cookie, ev.offset, ev.length, ev.error) == \
            (cmd, flags, 1, offset, length, error)
        assert isinstance(ev.error, Errno) and ev.message
    # the stream is still in sync: the next request is decoded correctly
    assert conn.next_event() == Command(Cmd.READ, 0, 99, 0, 512)
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0
    assert conn.take_output() == b""


def test_x_close_command():
    conn = transmission(x_close=True)
    conn.receive_data(req(X_CLOSE_CMD, 0, 0xABCD) + req(READ, length=1))
    assert conn.next_event() == SafeClose(0xABCD)
    assert conn.state is State.CLOSED
    assert conn.buffered == 0
    conn.receive_data(req(READ))
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0


@pytest.mark.parametrize(("flags", "offset", "length"), [(0, 0, 0), (FUA, 5, 7)])
def test_disc(flags, offset, length):
    conn = transmission()
    conn.receive_data(req(READ, cookie=5, length=512) + req(DISC, flags, 6, offset, length)
                      + req(WRITE, length=4) + b"data")
    assert conn.next_event() == Command(Cmd.READ, 0, 5, 0, 512)
    assert conn.next_event() == Disconnect()
    assert conn.state is State.CLOSED
    assert conn.buffered == 0
    conn.receive_data(req(READ))
    assert conn.buffered == 0
    assert conn.next_event() is NEED_DATA


@pytest.mark.parametrize("magic", [H("25609514"), H("67446698"), H("21e41c71"), bytes(4)])
def test_bad_request_magic_drops(magic):
    conn = transmission()
    conn.receive_data(magic + req(READ)[4:])
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_request_header_byte_by_byte():
    conn = transmission()
    for byte in req(CACHE, FUA, 0x1122334455667788, 4096, 8192)[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(req(CACHE, FUA, 0x1122334455667788, 4096, 8192)[-1:])
    assert conn.next_event() == Command(Cmd.CACHE, FUA, 0x1122334455667788, 4096, 8192)


def test_write_payload_split_across_receive_calls():
    conn = transmission()
    payload = bytes(range(256)) * 40  # 10240 bytes
    conn.receive_data(req(WRITE, FUA, 7, 8192, len(payload)) + payload[:1000])
    assert conn.next_event() == Command(Cmd.WRITE, FUA, 7, 8192, len(payload))
    assert conn.state is State.PAYLOAD
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    dest = bytearray(len(payload))
    mv = memoryview(dest)
    got = conn.payload_into(mv)
    assert got == 1000 and conn.payload_remaining == len(payload) - 1000
    assert conn.payload_into(mv[got:]) == 0  # nothing buffered
    # the driver receives 3000 bytes itself (recv_into)
    mv[got:got + 3000] = payload[got:got + 3000]
    conn.payload_received(3000)
    got += 3000
    # the rest arrives through receive_data together with the next request
    conn.receive_data(payload[got:got + 5000])
    conn.receive_data(payload[got + 5000:] + req(FLUSH, cookie=8))
    got += conn.payload_into(mv[got:got + 100])  # a small destination takes only 100
    got += conn.payload_into(mv[got:])
    assert got == len(payload) and bytes(dest) == payload
    assert conn.state is State.TRANSMISSION and conn.payload_remaining == 0
    assert conn.buffered == 28
    assert conn.next_event() == Command(Cmd.FLUSH, 0, 8, 0, 0)


def test_payload_misuse_is_local_error():
    conn = transmission()
    with pytest.raises(LocalProtocolError):
        conn.payload_into(memoryview(bytearray(4)))
    with pytest.raises(LocalProtocolError):
        conn.payload_received(1)
    conn.receive_data(req(WRITE, length=8))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.payload_received(9)
    with pytest.raises(LocalProtocolError):
        conn.payload_received(-1)
    conn.payload_received(8)
    assert conn.state is State.TRANSMISSION
    # bytes still buffered must be taken first, or the payload would be reordered
    conn.receive_data(req(WRITE, length=8) + b"abc")
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.payload_received(5)
    conn.payload_received(0)
    assert conn.payload_into(memoryview(bytearray(8))) == 3
    conn.payload_received(5)
    assert conn.state is State.TRANSMISSION


@pytest.mark.parametrize(("name", "offset", "length", "error"), [
    ("ro", 0, 40_000, EPERM),
    ("disk", MIB - 100, 40_000, ENOSPC),
    ("bare", 0, 64 * KIB + 512, EINVAL),  # over the export's maximum payload
])
def test_refused_write_payload_consumed_in_pieces(name, offset, length, error):
    conn = transmission(name)
    conn.receive_data(req(WRITE, 0, 3, offset, length))
    assert conn.next_event() is NEED_DATA
    assert conn.buffered == 0
    left = length
    while left > 7000:
        conn.receive_data(b"\xAA" * 7000)
        assert conn.next_event() is NEED_DATA
        assert conn.buffered == 0
        left -= 7000
    conn.receive_data(b"\xAA" * left + req(READ, cookie=4, length=512))
    ev = conn.next_event()
    assert isinstance(ev, InvalidCommand)
    assert (ev.cmd, ev.cookie, ev.length, ev.error) == (WRITE, 3, length, error)
    assert conn.next_event() == Command(Cmd.READ, 0, 4, 0, 512)


def test_oversized_write_under_64m_is_refused_and_discarded():
    conn = transmission(max_request_size=32 * MIB)
    length = 33 * MIB  # over the (configured) 32 MiB maximum payload
    conn.receive_data(req(WRITE, 0, 3, 0, length))
    assert conn.next_event() is NEED_DATA
    chunk = bytes(MIB)
    for _ in range(33):
        assert conn.next_event() is NEED_DATA
        conn.receive_data(chunk)
    ev = conn.next_event()
    assert isinstance(ev, InvalidCommand) and ev.error == EINVAL
    assert conn.buffered == 0


@pytest.mark.parametrize("length", [64 * MIB + 1, 0xFFFFFFFF])
def test_absurd_write_length_drops(length):
    conn = transmission()
    conn.receive_data(req(WRITE, 0, 3, 0, length))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED


def test_absurd_read_length_is_refused_not_dropped():
    conn = transmission(structured=True)
    conn.receive_data(req(READ, 0, 3, 0, 0xFFFFFFFF) + req(READ, 0, 4, 0, 1))
    ev = conn.next_event()
    assert isinstance(ev, InvalidCommand) and ev.error in (EOVERFLOW, EINVAL)
    assert conn.next_event() == Command(Cmd.READ, 0, 4, 0, 1)


def test_pipelined_requests_in_one_buffer():
    conn = transmission(structured=True, meta=("base:allocation",))
    data = (req(READ, cookie=1, length=4096) + req(WRITE, cookie=2, length=3) + b"abc"
            + req(BLOCK_STATUS, REQ_ONE, 3, 0, 4096) + req(99, cookie=4)
            + req(TRIM, cookie=5, length=512) + req(DISC, cookie=6))
    conn.receive_data(data)
    assert conn.next_event() == Command(Cmd.READ, 0, 1, 0, 4096)
    assert conn.next_event() == Command(Cmd.WRITE, 0, 2, 0, 3)
    assert _drain_payload(conn) == b"abc"
    assert conn.next_event() == Command(Cmd.BLOCK_STATUS, REQ_ONE, 3, 0, 4096, (1,))
    ev = conn.next_event()
    assert isinstance(ev, InvalidCommand) and (ev.cookie, ev.error) == (4, EINVAL)
    assert conn.next_event() == Command(Cmd.TRIM, 0, 5, 0, 512)
    assert conn.next_event() == Disconnect()


# === reply builders =================================================================

COOKIE = 0x0102030405060708
COOKIE_B = H("0102030405060708")
SIMPLE = H("67446698")
CHUNK = H("668e33ef")


def test_simple_mode_replies():
    conn = transmission()
    assert conn.simple_reply(COOKIE) == SIMPLE + H("00000000") + COOKIE_B
    assert conn.simple_reply(COOKIE, EPERM) == SIMPLE + H("00000001") + COOKIE_B
    assert conn.ok_reply(COOKIE) == SIMPLE + H("00000000") + COOKIE_B
    assert conn.error_reply(COOKIE, ENOSPC, "ignored") == SIMPLE + H("0000001c") + COOKIE_B
    assert conn.read_reply_header(COOKIE, 4096, 512) == SIMPLE + H("00000000") + COOKIE_B
    with pytest.raises(LocalProtocolError):
        conn.hole_chunk(COOKIE, 0, 512, True)


def test_structured_mode_replies():
    conn = transmission(structured=True)
    assert conn.ok_reply(COOKIE) == CHUNK + H("0001 0000") + COOKIE_B + H("00000000")
    assert conn.done_chunk(COOKIE) == CHUNK + H("0001 0000") + COOKIE_B + H("00000000")
    assert conn.simple_reply(COOKIE, EINVAL) == SIMPLE + H("00000016") + COOKIE_B
    assert conn.error_reply(COOKIE, EINVAL, "no") == (
        CHUNK + H("0001 8001") + COOKIE_B + H("00000008") + H("00000016 0002") + b"no")
    assert conn.error_reply(COOKIE, EPERM) == (
        CHUNK + H("0001 8001") + COOKIE_B + H("00000006") + H("00000001 0000"))
    assert conn.read_reply_header(COOKIE, 0x3000, 0x200) == (
        CHUNK + H("0001 0001") + COOKIE_B + H("00000208") + H("0000000000003000"))
    assert conn.read_reply_header(COOKIE, 0x3000, 0x200, done=False) == (
        CHUNK + H("0000 0001") + COOKIE_B + H("00000208") + H("0000000000003000"))
    assert conn.hole_chunk(COOKIE, 0x10000, 0x8000, True) == (
        CHUNK + H("0001 0002") + COOKIE_B + H("0000000c") + H("0000000000010000 00008000"))
    assert conn.hole_chunk(COOKIE, 0, 1, False) == (
        CHUNK + H("0000 0002") + COOKIE_B + H("0000000c") + H("0000000000000000 00000001"))


def test_block_status_reply_one_context():
    conn = transmission(structured=True, meta=("base:allocation",))
    assert conn.block_status_reply(COOKIE, [(4096, 0), (8192, 3)]) == [
        CHUNK + H("0001 0005") + COOKIE_B + H("00000014") + H("00000001")
        + H("00001000 00000000") + H("00002000 00000003")]


def test_block_status_reply_two_contexts():
    conn = transmission("bitmap", structured=True,
                        meta=("base:allocation", "qemu:dirty-bitmap:b0"))
    assert conn.meta_contexts == {1: "base:allocation", 2: "qemu:dirty-bitmap:b0"}
    body = H("00000200 00000001")
    chunks = conn.block_status_reply(COOKIE, iter([(512, 1)]))
    assert chunks == [
        CHUNK + H("0000 0005") + COOKIE_B + H("0000000c") + H("00000001") + body,
        CHUNK + H("0001 0005") + COOKIE_B + H("0000000c") + H("00000002") + body,
    ]
    not_done = conn.block_status_reply(COOKIE, [(512, 1)], done=False)
    assert [c[4:6] for c in not_done] == [H("0000"), H("0000")]
    only = conn.block_status_reply(COOKIE, [(512, 1)], context_id=2)
    assert only == [CHUNK + H("0001 0005") + COOKIE_B + H("0000000c") + H("00000002") + body]


# === TLS modes and the end of the handshake ==========================================

def test_tls_required_export_name_after_starttls():
    conn = started(tls=TLSMode.REQUIRE)
    assert events(conn, opt(STARTTLS)) == [StartTLS()]
    conn.tls_established()
    conn.take_output()
    evs = events(conn, opt(EXPORT_NAME, b"disk"))
    assert evs == [ExportSelected(DISK, DISK_FLAGS, False, {}, False)]
    assert conn.take_output() == struct.pack(">QH", MIB, DISK_FLAGS)


def test_selective_tls_allows_options_without_tls():
    conn = started(tls=TLSMode.ON)
    evs = events(conn, opt(LIST) + opt(INFO, info_data("disk")) + opt(EXPORT_NAME, b"ro"))
    assert evs[:2] == [OptionHandled(LIST, ACK), OptionHandled(INFO, ACK)]
    assert evs[2] == ExportSelected(RO, RO_FLAGS, False, {}, False)
    assert not conn.tls_active


def test_no_output_and_no_options_in_transmission():
    conn = transmission()
    # option bytes after GO are just a bad request magic
    conn.receive_data(opt(LIST) + bytes(12))
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.take_output() == b""
