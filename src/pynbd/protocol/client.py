"""Client side of the NBD protocol as a sans-I/O state machine.

Bytes in (:meth:`ClientConnection.receive_data`), events out
(:meth:`ClientConnection.next_event`), bytes to send from :meth:`take_output`
(handshake), :meth:`send_option` (option haggling) and :meth:`request`
(transmission). It mirrors :mod:`pynbd.protocol.server`::

    conn = ClientConnection()
    while True:                      # handshake
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(sock.recv(65536)); continue
        break                        # Handshake event
    sock.sendall(conn.take_output())  # client flags
    sock.sendall(conn.send_option(Opt.GO, wire.encode_info_request("", [])))
    ...                              # next_event() until OptionDone

In the transmission phase a :class:`ReadData` event is followed by ``length`` bytes of
read payload: the driver drains what is already buffered with :meth:`payload_into` and
reports bytes it received itself (``recv_into`` straight into the caller's buffer) with
:meth:`payload_received`.

Everything the server sends is validated: magics, option reply types, chunk types,
read chunks outside the requested range or overlapping earlier chunks, incomplete
successful reads, unknown cookies, lengths (bounded before anything is buffered).
A violation raises :class:`PeerProtocolError` and closes the state machine.

Once ``NBD_OPT_EXTENDED_HEADERS`` is acknowledged, :meth:`request` builds 32-byte
requests (64-bit lengths; WRITE carries ``NBD_CMD_FLAG_PAYLOAD_LEN``; BLOCK_STATUS may
name the contexts it wants in a payload) and replies are parsed in their 32-byte form
(``NBD_REPLY_TYPE_BLOCK_STATUS_EXT`` with 64-bit extents). The events are the same.
"""

from __future__ import annotations

import bisect
import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
    rep_is_error,
    reply_type_is_error,
)
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError

NEED_DATA: Final = wire.NEED_DATA
_NeedData = wire._NeedData

#: largest option reply payload accepted (longer ones drop the connection)
MAX_OPTION_REPLY = 1024 * 1024
#: total option reply bytes accepted for one option (e.g. a long NBD_OPT_LIST)
MAX_OPTION_TOTAL = 16 * 1024 * 1024
#: largest non-data structured chunk (block status: 4 + 8 * 2^20, plus slack)
MAX_META_CHUNK = 4 + 8 * (1 << 20) + 4096
#: largest NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk (8 + 16 * 2^20, plus slack)
MAX_META_CHUNK_EXT = 8 + 16 * MAX_EXTENTS_PER_CHUNK + 4096
#: cookies are 64-bit
_COOKIE_MASK = (1 << 64) - 1

_OPT_REPLY = wire.OPTION_REPLY
_SIMPLE = wire.SIMPLE_REPLY
_CHUNK = wire.CHUNK
_REQUEST = wire.REQUEST
_EXT_REQUEST = wire.EXT_REQUEST
_EXT_REPLY = wire.EXT_REPLY
_EXT_MAGIC = EXTENDED_REPLY_MAGIC
_OFFSET = wire.OFFSET
_HOLE = struct.Struct(">QI")
_ERR_HDR = wire.ERROR_CHUNK
# plain ints for the hot path (IntFlag's & is a Python-level call)
_DONE = int(ReplyFlag.DONE)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_READ = int(Cmd.READ)
_T_DATA = int(ReplyType.OFFSET_DATA)
_T_HOLE = int(ReplyType.OFFSET_HOLE)
_T_NONE = int(ReplyType.NONE)
_T_BS = int(ReplyType.BLOCK_STATUS)
_T_BS_EXT = int(ReplyType.BLOCK_STATUS_EXT)
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_WRITE = int(Cmd.WRITE)
_U64_MAX = (1 << 64) - 1


# --- results and events -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Handshake:
    """The server greeting was accepted; client flags are in :meth:`take_output`."""

    handshake_flags: int
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class ExportEntry:
    """One NBD_REP_SERVER reply to NBD_OPT_LIST."""

    name: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class MetaContext:
    """One NBD_REP_META_CONTEXT reply."""

    context_id: int
    name: str


@dataclass(slots=True)
class ExportInfo:
    """What NBD_OPT_INFO / NBD_OPT_GO / NBD_OPT_EXPORT_NAME told about an export."""

    name: str = ""
    size: int = 0
    flags: int = 0
    canonical_name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None

    def has(self, flag: TransmissionFlag) -> bool:
        return bool(self.flags & flag)


@dataclass(frozen=True, slots=True)
class OptionDone:
    """The server finished answering an option.

    ``reply`` is the final reply type (ACK or an NBD_REP_ERR_*), ``message`` the
    error text, ``replies`` the parsed intermediate replies in order
    (:class:`ExportEntry`, :class:`MetaContext`, or ``(info_type, raw)`` tuples),
    ``info`` the export information for INFO/GO/EXPORT_NAME.
    """

    option: int
    reply: int
    message: str = ""
    replies: tuple[object, ...] = ()
    info: ExportInfo | None = None

    @property
    def ok(self) -> bool:
        return not rep_is_error(self.reply)


@dataclass(frozen=True, slots=True)
class ReadData:
    """``length`` bytes of read data for ``offset`` follow: receive them into place."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadHole:
    """The range reads as zeroes (structured NBD_REPLY_TYPE_OFFSET_HOLE)."""

    cookie: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockStatusChunk:
    """One NBD_REPLY_TYPE_BLOCK_STATUS chunk: ``extents`` as (length, flags) pairs."""

    cookie: int
    context_id: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class ReplyError:
    """An error chunk (or error simple reply) for ``cookie``; the reply is not done."""

    cookie: int
    error: int
    message: str
    offset: int | None


@dataclass(frozen=True, slots=True)
class ReplyDone:
    """The reply for ``cookie`` is complete. ``error`` is 0 on success, else the first
    NBD error reported (``message``/``error_offset`` from that error chunk)."""

    cookie: int
    cmd: int
    error: int = 0
    message: str = ""
    error_offset: int | None = None


Event = (Handshake | OptionDone | ReadData | ReadHole | BlockStatusChunk | ReplyError
         | ReplyDone)


class State(enum.Enum):
    GREETING = "greeting"
    OPTIONS = "options"  # may send an option
    OPTION_REPLY = "option-reply"  # waiting for replies to one option
    EXPORT_NAME_REPLY = "export-name-reply"
    TLS_PENDING = "tls-pending"
    TRANSMISSION = "transmission"
    PAYLOAD = "payload"  # read data for the driver
    CLOSING = "closing"  # X_CLOSE sent, waiting for its reply
    CLOSED = "closed"


@dataclass(slots=True)
class _Inflight:
    cmd: int
    flags: int
    offset: int
    length: int
    # read reassembly: sorted disjoint [start, end) ranges seen so far
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    covered: int = 0
    content_chunks: int = 0
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    status_contexts: set[int] = field(default_factory=set)
    #: contexts named in a block status payload (None: every negotiated one)
    contexts: tuple[int, ...] | None = None


_CMD_NAMES = {c.value: c.name for c in Cmd}


def cmd_name(cmd: int) -> str:
    return "NBD_CMD_" + _CMD_NAMES.get(cmd, hex(cmd))


def _opt_name(opt: int) -> str:
    try:
        return "NBD_OPT_" + Opt(opt).name
    except ValueError:
        return f"option {opt:#x}"


class ClientConnection:
    """One client-side NBD connection, from greeting to close, without I/O."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self._buf = bytearray()
        self._out: list[bytes] = []
        self.handshake_flags = 0
        self.no_zeroes = False
        self.tls_active = False
        # option phase
        self._opt = 0
        self._opt_replies: list[object] = []
        self._opt_bytes = 0
        self._opt_info: ExportInfo | None = None
        self._opt_export = ""
        self._meta_queries: tuple[str, ...] = ()
        self.structured_replies = False
        self.extended_headers = False  # NBD_OPT_EXTENDED_HEADERS was ACKed
        self.x_close = False  # NBD_OPT_X_CLOSE was ACKed
        self.meta_contexts: dict[int, str] = {}
        self._meta_pending: dict[int, str] = {}
        self._meta_export: str | None = None
        # transmission
        self.export: ExportInfo | None = None
        self._next_cookie = 1
        self._inflight: dict[int, _Inflight] = {}
        self.payload_remaining = 0
        self._payload_cookie = 0
        self._payload_done = False  # reply is done once the payload is in

    @property
    def chunked(self) -> bool:
        """Replies come in chunks (structured replies or extended headers)."""
        return self.structured_replies or self.extended_headers

    # --- plumbing ---------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is State.CLOSED:
            return
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_output(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _fail(self, message: str) -> PeerProtocolError:
        self.state = State.CLOSED
        self._buf.clear()
        return PeerProtocolError(message)

    def connection_closed(self) -> None:
        """The transport reached EOF: explain why that is (or is not) an error."""
        st = self.state
        self.state = State.CLOSED
        if st is State.EXPORT_NAME_REPLY:
            raise PeerProtocolError(
                f"server closed the connection: export {self._opt_export!r} refused "
                "(NBD_OPT_EXPORT_NAME)")
        if st is State.CLOSED and not self._inflight:
            return
        if st is State.OPTIONS and not self._buf:
            raise PeerProtocolError("server closed the connection during negotiation")
        what = {
            State.GREETING: "before the greeting was complete",
            State.OPTIONS: "during negotiation",
            State.OPTION_REPLY: f"while answering {_opt_name(self._opt)}",
            State.TLS_PENDING: "during STARTTLS",
            State.TRANSMISSION: f"with {len(self._inflight)} request(s) in flight",
            State.PAYLOAD: f"in the middle of read data ({self.payload_remaining} "
                           "bytes missing)",
            State.CLOSING: "before replying to NBD_CMD_X_CLOSE",
            State.CLOSED: f"with {len(self._inflight)} request(s) in flight",
        }.get(st, "")
        if st is State.TRANSMISSION and not self._inflight and not self._buf:
            raise PeerProtocolError("server closed the connection")
        raise PeerProtocolError(f"server closed the connection {what}".rstrip())

    # --- handshake ----------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        st = self.state
        if st is State.TRANSMISSION or st is State.CLOSING:
            return self._next_reply()
        if st is State.OPTION_REPLY:
            while True:
                ev = self._next_option_reply()
                if ev is not None:
                    return ev
        if st is State.GREETING:
            return self._greeting()
        if st is State.EXPORT_NAME_REPLY:
            return self._export_name_reply()
        if st is State.PAYLOAD:
            raise LocalProtocolError(
                f"next_event() with {self.payload_remaining} read payload bytes pending")
        if st is State.CLOSED and self._inflight:
            return NEED_DATA
        if self._buf and st in (State.OPTIONS, State.TLS_PENDING):
            raise self._fail("server sent unsolicited data during negotiation")
        return NEED_DATA

    def _greeting(self) -> Event | _NeedData:
        if len(self._buf) < 8:
            return NEED_DATA
        (magic,) = wire.U64.unpack_from(self._buf)
        if magic != NBDMAGIC:
            raise self._fail(f"bad greeting magic 0x{magic:016x} (not an NBD server?)")
        if len(self._buf) < 16:
            return NEED_DATA
        (second,) = wire.U64.unpack_from(self._buf, 8)
        if second != IHAVEOPT:
            raise self._fail(
                "server speaks oldstyle negotiation (unsupported; only fixed newstyle)"
                if second == 0x00420281861253 else
                f"bad greeting: 0x{second:016x} where IHAVEOPT was expected")
        if len(self._buf) < wire.GREETING_SIZE:
            return NEED_DATA
        _, _, hflags = wire.GREETING.unpack_from(self._buf)
        del self._buf[:wire.GREETING_SIZE]
        if not hflags & HandshakeFlag.FIXED_NEWSTYLE:
            raise self._fail("server does not support fixed newstyle negotiation")
        self.handshake_flags = hflags
        self.no_zeroes = bool(hflags & HandshakeFlag.NO_ZEROES)
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if self.no_zeroes:
            cflags |= ClientFlag.C_NO_ZEROES
        self._out.append(wire.CLIENT_FLAGS.pack(cflags))
        self.state = State.OPTIONS
        return Handshake(hflags, self.no_zeroes)

    # --- options ------------------------------------------------------------------------

    def send_option(self, option: int, data: bytes = b"") -> bytes:
        """Bytes of one option request; then call next_event() until OptionDone.

        The data of INFO/GO/LIST_META_CONTEXT/SET_META_CONTEXT is parsed here to
        know what the replies refer to (use the ``wire.encode_*`` helpers).
        """
        if self.state is not State.OPTIONS:
            raise LocalProtocolError(f"send_option() in state {self.state.value}")
        if option == Opt.ABORT:
            self.state = State.CLOSED
            return wire.encode_option(option, data)
        self._opt = option
        self._opt_replies = []
        self._opt_bytes = 0
        self._opt_info = None
        if option in (Opt.INFO, Opt.GO):
            name, _ = wire.decode_info_request(data)
            self._opt_export = name
            self._opt_info = ExportInfo(name=name)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            name, queries = wire.decode_meta_context_request(data)
            self._opt_export = name
            self._meta_queries = tuple(queries)
            if option == Opt.SET_META_CONTEXT:
                self._meta_pending = {}
        elif option == Opt.EXPORT_NAME:
            if self.extended_headers:
                raise LocalProtocolError("NBD_OPT_EXPORT_NAME after extended headers were "
                                         "negotiated (the spec forbids it; use NBD_OPT_GO)")
            self._opt_export = data.decode("utf-8")
            self.state = State.EXPORT_NAME_REPLY
            return wire.encode_option(option, data)
        self.state = State.OPTION_REPLY
        return wire.encode_option(option, data)

    def _export_name_reply(self) -> Event | _NeedData:
        need = 10 if self.no_zeroes else 134
        if len(self._buf) < need:
            return NEED_DATA
        size, flags = wire.EXPORT_NAME_REPLY.unpack_from(self._buf)
        del self._buf[:need]
        info = ExportInfo(name=self._opt_export, size=size, flags=flags)
        self._enter_transmission(info)
        return OptionDone(Opt.EXPORT_NAME, Rep.ACK, info=info)

    def _next_option_reply(self) -> Event | _NeedData | None:
        if len(self._buf) < _OPT_REPLY.size:
            return NEED_DATA
        magic, opt, rep, length = _OPT_REPLY.unpack_from(self._buf)
        if magic != OPTION_REPLY_MAGIC:
            raise self._fail(f"bad option reply magic 0x{magic:016x}")
        if opt != self._opt:
            raise self._fail(
                f"option reply for {_opt_name(opt)} while waiting for {_opt_name(self._opt)}")
        if length > MAX_OPTION_REPLY:
            raise self._fail(f"option reply of {length} bytes exceeds {MAX_OPTION_REPLY}")
        self._opt_bytes += length
        if self._opt_bytes > MAX_OPTION_TOTAL:
            raise self._fail(f"replies to {_opt_name(opt)} exceed {MAX_OPTION_TOTAL} bytes")
        total = _OPT_REPLY.size + length
        if len(self._buf) < total:
            return NEED_DATA
        data = bytes(self._buf[_OPT_REPLY.size:total])
        del self._buf[:total]
        return self._handle_option_reply(opt, rep, data)

    def _handle_option_reply(self, opt: int, rep: int, data: bytes) -> Event | None:
        if rep_is_error(rep):
            try:
                message = data.decode("utf-8", "replace")
            except Exception:  # pragma: no cover
                message = ""
            return self._option_done(rep, message)
        if rep == Rep.ACK:
            if data:
                raise self._fail(f"NBD_REP_ACK to {_opt_name(opt)} with {len(data)} bytes")
            return self._option_ack(opt)
        r = wire.Reader(data, f"reply to {_opt_name(opt)}")
        if rep == Rep.SERVER and opt == Opt.LIST:
            name = r.string()
            self._opt_replies.append(ExportEntry(name, r.rest_text()))
            return None
        if rep == Rep.INFO and opt in (Opt.INFO, Opt.GO):
            self._handle_info(r)
            return None
        if rep == Rep.META_CONTEXT and opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            ctx_id = r.u32()
            name = r.rest_text()
            if len(name) > MAX_STRING:
                raise self._fail("meta context name too long")
            if opt == Opt.SET_META_CONTEXT:
                if ctx_id in self._meta_pending:
                    raise self._fail(f"meta context id {ctx_id} assigned twice")
                self._meta_pending[ctx_id] = name
            self._opt_replies.append(MetaContext(ctx_id, name))
            return None
        raise self._fail(f"unexpected option reply type {rep:#x} to {_opt_name(opt)}")

    def _handle_info(self, r: wire.Reader) -> None:
        info = self._opt_info
        assert info is not None
        itype = r.u16()
        if itype == Info.EXPORT:
            if r.remaining() != 10:
                raise self._fail("NBD_INFO_EXPORT must be 12 bytes")
            info.size = r.u64()
            info.flags = r.u16()
            self._opt_replies.append((itype, info.size, info.flags))
        elif itype == Info.NAME:
            info.canonical_name = r.rest_text()
        elif itype == Info.DESCRIPTION:
            info.description = r.rest_text()
        elif itype == Info.BLOCK_SIZE:
            if r.remaining() != 12:
                raise self._fail("NBD_INFO_BLOCK_SIZE must be 14 bytes")
            mn, pref, mx = r.u32(), r.u32(), r.u32()
            if mn == 0 or mn & (mn - 1) or mn > 65536 or pref < mn or pref & (pref - 1) \
                    or mx < mn:
                raise self._fail(f"invalid block size constraints {mn}/{pref}/{mx}")
            info.block_size = (mn, pref, mx)
        else:
            # unknown info types are ignored (spec: the client MUST ignore them)
            self._opt_replies.append((itype, r.take(r.remaining())))

    def _option_ack(self, opt: int) -> Event:
        if opt == Opt.STRUCTURED_REPLY:
            self.structured_replies = True
        elif opt == Opt.EXTENDED_HEADERS:
            self.extended_headers = True
        elif opt == Opt.X_CLOSE:
            self.x_close = True
        elif opt == Opt.SET_META_CONTEXT:
            self.meta_contexts = dict(self._meta_pending)
            self._meta_export = self._opt_export
        elif opt == Opt.STARTTLS:
            done = OptionDone(opt, Rep.ACK, replies=tuple(self._opt_replies))
            self.state = State.TLS_PENDING
            if self._buf:
                raise self._fail("server sent data after acknowledging STARTTLS")
            return done
        info = self._opt_info
        if opt in (Opt.INFO, Opt.GO):
            assert info is not None
            if not any(isinstance(x, tuple) and x[0] == Info.EXPORT
                       for x in self._opt_replies):
                raise self._fail(f"NBD_REP_ACK to {_opt_name(opt)} without NBD_INFO_EXPORT")
        done = OptionDone(opt, Rep.ACK, replies=tuple(self._opt_replies), info=info)
        self.state = State.OPTIONS
        if opt == Opt.GO:
            assert info is not None
            self._enter_transmission(info)
        return done

    def _option_done(self, rep: int, message: str) -> Event:
        self.state = State.OPTIONS
        return OptionDone(self._opt, rep, message, tuple(self._opt_replies), self._opt_info)

    def tls_established(self) -> None:
        """The TLS handshake completed: every option state is forgotten."""
        if self.state is not State.TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in state {self.state.value}")
        self.tls_active = True
        self.structured_replies = False
        self.extended_headers = False
        self.x_close = False
        self.meta_contexts = {}
        self._meta_export = None
        self.state = State.OPTIONS

    def _enter_transmission(self, info: ExportInfo) -> None:
        if self._meta_export is not None and self._meta_export != info.name:
            self.meta_contexts = {}  # contexts were negotiated for another export
        if not self.chunked:
            self.meta_contexts = {}
        self.export = info
        self.state = State.TRANSMISSION

    # --- transmission: requests -----------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                contexts: tuple[int, ...] | None = None) -> tuple[int, bytes]:
        """Register one request; returns (cookie, header). A WRITE's payload of
        ``length`` bytes must be sent right after the header.

        The header is 28 bytes, or 32 once extended headers are negotiated: then
        ``length`` may be 64-bit for commands without payload, WRITE gets
        ``NBD_CMD_FLAG_PAYLOAD_LEN``, and a BLOCK_STATUS with ``contexts`` (ids of
        negotiated contexts; needs ``NBD_FLAG_BLOCK_STATUS_PAYLOAD``) carries them in its
        payload, which is part of the returned bytes."""
        st = self.state
        if st is not State.TRANSMISSION and st is not State.PAYLOAD:
            raise LocalProtocolError(f"request() in state {st.value}")
        ext = self.extended_headers
        if offset < 0 or length < 0 or offset > _U64_MAX or \
                length > (_U64_MAX if ext else 0xFFFFFFFF):
            raise LocalProtocolError(
                f"invalid offset/length {offset}/{length}"
                + ("" if ext else " (lengths over 32 bits need extended headers)"))
        if flags & _PAYLOAD_LEN:
            raise LocalProtocolError("NBD_CMD_FLAG_PAYLOAD_LEN is set by request() itself")
        if contexts is not None:
            self._check_payload_contexts(cmd, contexts)
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & _COOKIE_MASK or 1
        if cmd == Cmd.DISC:
            if self._inflight or st is State.PAYLOAD:
                raise LocalProtocolError("NBD_CMD_DISC with requests in flight")
            self.state = State.CLOSED
        elif cmd == Cmd.X_CLOSE:
            if not self.x_close:
                raise LocalProtocolError("NBD_CMD_X_CLOSE without a negotiated NBD_OPT_X_CLOSE")
            if self._inflight or st is State.PAYLOAD:
                raise LocalProtocolError("NBD_CMD_X_CLOSE with requests in flight")
            self.state = State.CLOSING
        if cmd != Cmd.DISC:
            self._inflight[cookie] = _Inflight(cmd, flags, offset, length, contexts=contexts)
        if not ext:
            return cookie, _REQUEST.pack(0x25609513, flags, cmd, cookie, offset, length)
        if cmd == _WRITE:
            return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags | _PAYLOAD_LEN, cmd,
                                             cookie, offset, length)
        if contexts is not None:
            payload = wire.encode_block_status_payload(length, contexts)
            return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags | _PAYLOAD_LEN,
                                             cmd, cookie, offset, len(payload)) + payload
        return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset,
                                         length)

    def _check_payload_contexts(self, cmd: int, contexts: tuple[int, ...]) -> None:
        if cmd != Cmd.BLOCK_STATUS:
            raise LocalProtocolError("only NBD_CMD_BLOCK_STATUS takes context ids")
        if not self.extended_headers or self.export is None or \
                not self.export.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD:
            raise LocalProtocolError(
                "choosing block status contexts needs extended headers and "
                "NBD_FLAG_BLOCK_STATUS_PAYLOAD from the server")
        if not contexts or len(set(contexts)) != len(contexts) or \
                any(c not in self.meta_contexts for c in contexts):
            raise LocalProtocolError(
                f"block status contexts {contexts} must be distinct negotiated ids "
                f"({sorted(self.meta_contexts)})")

    def forget(self, cookie: int) -> None:
        """Stop tracking a request (only for requests that were never sent)."""
        self._inflight.pop(cookie, None)

    # --- transmission: replies ------------------------------------------------------------

    def payload_into(self, dest: memoryview) -> int:
        """Move already-buffered read data into ``dest``; returns how many bytes."""
        n = min(len(dest), len(self._buf), self.payload_remaining)
        if n:
            dest[:n] = self._buf[:n]
            del self._buf[:n]
            self.payload_received(n)
        return n

    def payload_received(self, n: int) -> None:
        """The driver received ``n`` read data bytes itself (e.g. ``recv_into``)."""
        if self.state is not State.PAYLOAD or n > self.payload_remaining or n < 0:
            raise LocalProtocolError(
                f"payload_received({n}) with {self.payload_remaining} expected in "
                f"state {self.state.value}")
        self.payload_remaining -= n
        if self.payload_remaining == 0:
            self.state = State.TRANSMISSION

    def _next_reply(self) -> Event | _NeedData:
        if self._payload_done:
            self._payload_done = False
            return self._finish(self._payload_cookie)
        if self.extended_headers:
            return self._next_ext_reply()
        buf = self._buf
        if len(buf) < 4:
            return NEED_DATA
        magic = buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3]
        if magic == SIMPLE_REPLY_MAGIC:
            if len(buf) < 16:
                return NEED_DATA
            _, error, cookie = _SIMPLE.unpack_from(buf)
            op = self._inflight.get(cookie)
            if op is None:
                raise self._fail(f"simple reply with unknown cookie {cookie}")
            del buf[:16]
            if error:
                op.error, op.message = error, ""
                return self._finish(cookie)
            if op.cmd == Cmd.READ:
                if self.structured_replies:
                    raise self._fail("simple reply to NBD_CMD_READ after structured "
                                     "replies were negotiated")
                if op.length:
                    self.payload_remaining = op.length
                    self._payload_cookie = cookie
                    self._payload_done = True
                    self.state = State.PAYLOAD
                    return ReadData(cookie, op.offset, op.length)
            elif op.cmd == Cmd.BLOCK_STATUS:
                raise self._fail("simple success reply to NBD_CMD_BLOCK_STATUS")
            return self._finish(cookie)
        if magic != STRUCTURED_REPLY_MAGIC:
            if magic == _EXT_MAGIC:
                raise self._fail("extended reply, but extended headers were not negotiated")
            raise self._fail(f"bad reply magic 0x{magic:08x}")
        if not self.structured_replies:
            raise self._fail("structured reply chunk but structured replies were not "
                             "negotiated")
        if len(buf) < 20:
            return NEED_DATA
        _, cflags, ctype, cookie, length = _CHUNK.unpack_from(buf)
        op = self._inflight.get(cookie)
        if op is None:
            raise self._fail(f"reply chunk with unknown cookie {cookie}")
        done = bool(cflags & _DONE)
        if ctype == _T_DATA:
            if op.cmd != _READ:
                raise self._fail(f"OFFSET_DATA chunk in reply to {cmd_name(op.cmd)}")
            if length < 9:
                raise self._fail(f"OFFSET_DATA chunk of length {length} (minimum 9)")
            if len(buf) < 28:
                return NEED_DATA
            (offset,) = _OFFSET.unpack_from(buf, 20)
            dlen = length - 8
            self._claim(op, offset, dlen, "OFFSET_DATA")
            del buf[:28]
            self.payload_remaining = dlen
            self._payload_cookie = cookie
            self._payload_done = done
            self.state = State.PAYLOAD
            return ReadData(cookie, offset, dlen)
        if ctype == ReplyType.OFFSET_HOLE:
            if op.cmd != Cmd.READ:
                raise self._fail(f"OFFSET_HOLE chunk in reply to {cmd_name(op.cmd)}")
            if length != 12:
                raise self._fail(f"OFFSET_HOLE chunk of length {length} (must be 12)")
            if len(buf) < 32:
                return NEED_DATA
            offset, hlen = _HOLE.unpack_from(buf, 20)
            if hlen == 0:
                raise self._fail("OFFSET_HOLE chunk with zero hole size")
            self._claim(op, offset, hlen, "OFFSET_HOLE")
            del buf[:32]
            if done:
                self._payload_cookie = cookie
                self._payload_done = True
            return ReadHole(cookie, offset, hlen)
        if ctype == ReplyType.NONE:
            if length != 0:
                raise self._fail(f"NONE chunk with length {length}")
            if not done:
                raise self._fail("NONE chunk without NBD_REPLY_FLAG_DONE")
            del buf[:20]
            return self._finish(cookie)
        if ctype == _T_BS_EXT:
            raise self._fail("BLOCK_STATUS_EXT chunk without extended headers")
        if ctype == ReplyType.BLOCK_STATUS:
            if op.cmd != Cmd.BLOCK_STATUS:
                raise self._fail(f"BLOCK_STATUS chunk in reply to {cmd_name(op.cmd)}")
            if length < 12 or (length - 4) % 8:
                raise self._fail(f"BLOCK_STATUS chunk of invalid length {length}")
            if length > MAX_META_CHUNK:
                raise self._fail(f"BLOCK_STATUS chunk of {length} bytes is too large")
            if len(buf) < 20 + length:
                return NEED_DATA
            ev = self._block_status(op, cookie, bytes(buf[20:20 + length]))
            del buf[:20 + length]
            if done:
                self._payload_cookie = cookie
                self._payload_done = True
            return ev
        if reply_type_is_error(ctype):
            return self._error_chunk(op, cookie, ctype, done, length, 20)
        raise self._fail(f"unknown structured reply chunk type {ctype}")

    def _error_chunk(self, op: _Inflight, cookie: int, ctype: int, done: bool, length: int,
                     hsize: int) -> Event | _NeedData:
        buf = self._buf
        if length < 6:
            raise self._fail(f"error chunk of length {length} (minimum 6)")
        if length > 6 + MAX_STRING + 64:
            raise self._fail(f"error chunk of {length} bytes is too large")
        if len(buf) < hsize + length:
            return NEED_DATA
        body = bytes(buf[hsize:hsize + length])
        del buf[:hsize + length]
        error, mlen = _ERR_HDR.unpack_from(body)
        if 6 + mlen > length:
            raise self._fail("error chunk message overruns the chunk")
        message = body[6:6 + mlen].decode("utf-8", "replace")
        eoff: int | None = None
        if ctype == ReplyType.ERROR_OFFSET:
            if length != 6 + mlen + 8:
                raise self._fail("ERROR_OFFSET chunk has the wrong length")
            (eoff,) = _OFFSET.unpack_from(body, 6 + mlen)
            if op.cmd in (Cmd.READ, Cmd.BLOCK_STATUS) and not (
                    op.offset <= eoff < op.offset + op.length):
                raise self._fail(f"ERROR_OFFSET {eoff} outside the request")
        elif ctype == ReplyType.ERROR and length != 6 + mlen:
            raise self._fail("ERROR chunk has the wrong length")
        if error == 0:
            raise self._fail("error chunk with error value 0")
        if not op.error:
            op.error, op.message, op.error_offset = error, message, eoff
        if done:
            return self._finish(cookie)
        return ReplyError(cookie, error, message, eoff)

    def _next_ext_reply(self) -> Event | _NeedData:
        """One 32-byte extended reply chunk (the only kind once negotiated)."""
        buf = self._buf
        if len(buf) < 32:
            if len(buf) >= 4:
                magic = buf[0] << 24 | buf[1] << 16 | buf[2] << 8 | buf[3]
                if magic != _EXT_MAGIC:
                    raise self._bad_ext_magic(magic)
            return NEED_DATA
        magic, cflags, ctype, cookie, roff, length = _EXT_REPLY.unpack_from(buf)
        if magic != _EXT_MAGIC:
            raise self._bad_ext_magic(magic)
        op = self._inflight.get(cookie)
        if op is None:
            raise self._fail(f"reply chunk with unknown cookie {cookie}")
        if roff != op.offset:
            raise self._fail(f"extended reply for cookie {cookie} carries offset {roff}, "
                             f"the request's is {op.offset}")
        done = bool(cflags & _DONE)
        if ctype == _T_DATA:
            if op.cmd != _READ:
                raise self._fail(f"OFFSET_DATA chunk in reply to {cmd_name(op.cmd)}")
            if length < 9:
                raise self._fail(f"OFFSET_DATA chunk of length {length} (minimum 9)")
            if len(buf) < 40:
                return NEED_DATA
            (offset,) = _OFFSET.unpack_from(buf, 32)
            dlen = length - 8
            self._claim(op, offset, dlen, "OFFSET_DATA")
            del buf[:40]
            self.payload_remaining = dlen
            self._payload_cookie = cookie
            self._payload_done = done
            self.state = State.PAYLOAD
            return ReadData(cookie, offset, dlen)
        if ctype == _T_NONE:
            if length != 0:
                raise self._fail(f"NONE chunk with length {length}")
            if not done:
                raise self._fail("NONE chunk without NBD_REPLY_FLAG_DONE")
            del buf[:32]
            return self._finish(cookie)
        if ctype == _T_HOLE:
            if op.cmd != _READ:
                raise self._fail(f"OFFSET_HOLE chunk in reply to {cmd_name(op.cmd)}")
            if length != 12:
                raise self._fail(f"OFFSET_HOLE chunk of length {length} (must be 12)")
            if len(buf) < 44:
                return NEED_DATA
            offset, hlen = _HOLE.unpack_from(buf, 32)
            if hlen == 0:
                raise self._fail("OFFSET_HOLE chunk with zero hole size")
            self._claim(op, offset, hlen, "OFFSET_HOLE")
            del buf[:44]
            if done:
                self._payload_cookie = cookie
                self._payload_done = True
            return ReadHole(cookie, offset, hlen)
        if ctype == _T_BS_EXT:
            if op.cmd != Cmd.BLOCK_STATUS:
                raise self._fail(f"BLOCK_STATUS_EXT chunk in reply to {cmd_name(op.cmd)}")
            if length < 24 or (length - 8) % 16:
                raise self._fail(f"BLOCK_STATUS_EXT chunk of invalid length {length}")
            if length > MAX_META_CHUNK_EXT:
                raise self._fail(f"BLOCK_STATUS_EXT chunk of {length} bytes is too large")
            if len(buf) < 32 + length:
                return NEED_DATA
            ev = self._block_status_ext(op, cookie, bytes(buf[32:32 + length]))
            del buf[:32 + length]
            if done:
                self._payload_cookie = cookie
                self._payload_done = True
            return ev
        if ctype == _T_BS:
            raise self._fail("compact BLOCK_STATUS chunk under extended headers (the spec "
                             "requires BLOCK_STATUS_EXT)")
        if reply_type_is_error(ctype):
            return self._error_chunk(op, cookie, ctype, done, length, 32)
        raise self._fail(f"unknown extended reply chunk type {ctype}")

    def _bad_ext_magic(self, magic: int) -> PeerProtocolError:
        if magic in (SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC):
            return self._fail(f"compact reply (magic 0x{magic:08x}) after extended headers "
                              "were negotiated")
        return self._fail(f"bad extended reply magic 0x{magic:08x}")

    def _claim(self, op: _Inflight, offset: int, length: int, what: str) -> None:
        end = offset + length
        if offset < op.offset or end > op.offset + op.length:
            raise self._fail(
                f"{what} chunk [{offset}, {end}) outside the request "
                f"[{op.offset}, {op.offset + op.length})")
        if op.flags & _DF and op.content_chunks:
            raise self._fail("second content chunk for a read with NBD_CMD_FLAG_DF")
        i = bisect.bisect_right(op.starts, offset)
        if (i and op.ends[i - 1] > offset) or (i < len(op.starts) and op.starts[i] < end):
            raise self._fail(f"{what} chunk [{offset}, {end}) overlaps an earlier chunk")
        op.starts.insert(i, offset)
        op.ends.insert(i, end)
        op.covered += length
        op.content_chunks += 1

    def _status_context(self, op: _Inflight, ctx: int) -> None:
        if ctx not in self.meta_contexts:
            raise self._fail(f"BLOCK_STATUS chunk for unnegotiated context id {ctx}")
        if op.contexts is not None and ctx not in op.contexts:
            raise self._fail(f"BLOCK_STATUS chunk for context id {ctx}, which the request "
                             f"did not ask for ({list(op.contexts)})")
        if ctx in op.status_contexts:
            raise self._fail(f"two BLOCK_STATUS chunks for context id {ctx}")
        op.status_contexts.add(ctx)

    def _block_status_ext(self, op: _Inflight, cookie: int, body: bytes) -> Event:
        ctx, count = wire.BLOCK_STATUS_EXT_HEAD.unpack_from(body)
        n = (len(body) - 8) // 16
        if count != n:
            raise self._fail(f"BLOCK_STATUS_EXT chunk says {count} descriptors, carries {n}")
        self._status_context(op, ctx)
        vals = struct.unpack_from(f">{2 * n}Q", body, 8)
        return self._extents(op, cookie, ctx, tuple(zip(vals[0::2], vals[1::2], strict=True)))

    def _block_status(self, op: _Inflight, cookie: int, body: bytes) -> Event:
        (ctx,) = wire.U32.unpack_from(body)
        self._status_context(op, ctx)
        n = (len(body) - 4) // 8
        vals = struct.unpack_from(f">{2 * n}I", body, 4)
        return self._extents(op, cookie, ctx, tuple(zip(vals[0::2], vals[1::2], strict=True)))

    def _extents(self, op: _Inflight, cookie: int, ctx: int,
                 extents: tuple[tuple[int, int], ...]) -> Event:
        n = len(extents)
        if op.flags & _REQ_ONE and n != 1:
            raise self._fail(f"{n} extents in reply to a REQ_ONE block status")
        total = 0
        for i, (ln, _) in enumerate(extents):
            if ln == 0:
                raise self._fail("block status extent of length 0")
            if i < n - 1:
                total += ln
                if total >= op.length:
                    raise self._fail("block status extents run past the requested range")
        if op.flags & _REQ_ONE and extents[0][0] > op.length:
            raise self._fail("REQ_ONE block status extent longer than the request")
        return BlockStatusChunk(cookie, ctx, extents)

    def _finish(self, cookie: int) -> Event:
        op = self._inflight.pop(cookie)
        if self.state is State.CLOSING:
            self.state = State.CLOSED
        if not op.error:
            if op.cmd == Cmd.READ and self.chunked and op.covered != op.length:
                raise self._fail(
                    f"read reply for [{op.offset}, {op.offset + op.length}) completed "
                    f"successfully with only {op.covered} bytes covered")
            if op.cmd == Cmd.BLOCK_STATUS and not op.status_contexts:
                raise self._fail("block status reply without any BLOCK_STATUS chunk")
        return ReplyDone(cookie, op.cmd, op.error, op.message, op.error_offset)


__all__ = [
    "NEED_DATA",
    "BlockStatusChunk",
    "ClientConnection",
    "Event",
    "ExportEntry",
    "ExportInfo",
    "Handshake",
    "MetaContext",
    "OptionDone",
    "ReadData",
    "ReadHole",
    "ReplyDone",
    "ReplyError",
    "State",
    "cmd_name",
]

