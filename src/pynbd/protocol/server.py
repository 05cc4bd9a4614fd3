"""Server side of the NBD protocol as a sans-I/O state machine.

Bytes in (:meth:`ServerConnection.receive_data`), events out
(:meth:`ServerConnection.next_event`); replies are built by methods that return bytes
for the I/O layer to send. The state machine does the whole handshake and option
haggling itself (it only needs an :class:`ExportProvider`, a pure lookup), validates
every transmission request against the negotiated export, and tells the I/O layer when
the next N bytes are a WRITE payload so they can be received straight into a buffer::

    conn = ServerConnection(provider)
    send(conn.initiate())
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            conn.receive_data(sock.recv(65536)); continue
        ...                       # handshake events / Command / InvalidCommand
        send(conn.take_output())  # option replies produced while haggling

A WRITE ``Command`` is followed by ``length`` payload bytes: the driver drains what is
already buffered with :meth:`payload_into` and reports bytes it received itself with
:meth:`payload_received`.

Extended headers (``NBD_OPT_EXTENDED_HEADERS``) live entirely in here: after the ACK
requests are parsed in their 32-byte form (64-bit effect lengths for TRIM,
WRITE_ZEROES, CACHE, BLOCK_STATUS; ``NBD_CMD_FLAG_PAYLOAD_LEN``; the BLOCK_STATUS
payload that selects contexts, consumed here and reported as
:attr:`Command.contexts`), and every reply builder produces the 32-byte extended
chunks. The driver passes each builder the request's offset (``req_offset``, which
extended replies echo) and otherwise does not need to know what was negotiated.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_REQUEST,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_BLOCK_SIZE_FIELD,
    MAX_EXTENTS_PER_CHUNK,
    MAX_STRING,
    REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError

NEED_DATA: Final = wire.NEED_DATA
_NeedData = wire._NeedData

#: option payloads larger than this are not buffered
MAX_OPTION_DATA = 64 * 1024
#: option payloads up to this size are read and discarded; beyond it the connection drops
MAX_OPTION_DISCARD = 1024 * 1024
#: WRITE payloads past the limit up to this size are discarded to stay in sync
MAX_WRITE_DISCARD = 64 * 1024 * 1024
#: number of options a client may send before the server gives up on it
MAX_OPTIONS = 1024


class TLSMode(enum.Enum):
    OFF = "off"
    ON = "on"
    REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the protocol needs to know about one export."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = False
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    can_multi_conn: bool = False
    rotational: bool = False
    #: minimum, preferred, maximum payload; the server's ``max_request_size`` caps the
    #: maximum (0xFFFFFFFF: no limit of the export's own)
    block_size: tuple[int, int, int] = (1, 4096, MAX_BLOCK_SIZE_FIELD)
    meta_contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    #: contexts the export has but will not serve, each with the reason (e.g. a dirty
    #: bitmap left inconsistent by an unclean stop): a query naming one exactly gets
    #: NBD_REP_ERR_POLICY with the reason, never a silently missing context
    refused_contexts: tuple[tuple[str, str], ...] = ()

    def transmission_flags(self, structured: bool, x_close: bool,
                           block_status_payload: bool = False) -> int:
        """``structured``: reply chunks are in use (structured replies or extended
        headers); ``block_status_payload``: extended headers and meta contexts were
        negotiated (NBD_FLAG_BLOCK_STATUS_PAYLOAD)."""
        f = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            f |= TransmissionFlag.READ_ONLY
        if self.can_flush:
            f |= TransmissionFlag.SEND_FLUSH
        if self.can_fua and not self.read_only:
            f |= TransmissionFlag.SEND_FUA
        if self.rotational:
            f |= TransmissionFlag.ROTATIONAL
        if self.can_trim and not self.read_only:
            f |= TransmissionFlag.SEND_TRIM
        if self.can_zero and not self.read_only:
            f |= TransmissionFlag.SEND_WRITE_ZEROES
            if self.can_fast_zero:
                f |= TransmissionFlag.SEND_FAST_ZERO
        if structured:
            f |= TransmissionFlag.SEND_DF
        if self.can_multi_conn:
            f |= TransmissionFlag.CAN_MULTI_CONN
        if self.can_cache:
            f |= TransmissionFlag.SEND_CACHE
        if block_status_payload:
            f |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        if x_close:
            f |= TransmissionFlag.X_SEND_CLOSE
        return int(f)


class ExportProvider(Protocol):
    """A pure lookup of exports (no I/O): the server core's only dependency."""

    def lookup(self, name: str) -> ExportInfo | None:
        """The export for ``name`` ("" is the default export), or None."""
        ...

    def list_exports(self) -> Sequence[ExportInfo]:
        ...


@dataclass(frozen=True, slots=True)
class ServerConfig:
    tls: TLSMode = TLSMode.OFF
    #: offer pynbd's safe-close extension (NBD_OPT_X_CLOSE)
    x_close: bool = True
    #: allow NBD_OPT_LIST to enumerate exports
    allow_list: bool = True
    #: offer NBD_OPT_EXTENDED_HEADERS (32-byte headers, 64-bit lengths)
    extended_headers: bool = True
    #: largest READ/WRITE payload accepted (advertised in NBD_INFO_BLOCK_SIZE, capped
    #: further by an export's own maximum)
    max_request_size: int = DEFAULT_MAX_REQUEST

    def __post_init__(self) -> None:
        if not 4096 <= self.max_request_size <= MAX_BLOCK_SIZE_FIELD:
            raise ValueError(f"max_request_size {self.max_request_size} is outside "
                             f"[4096, {MAX_BLOCK_SIZE_FIELD}]")


# --- events -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OptionHandled:
    """An option was answered (informational, for logs and metrics)."""

    option: int
    reply: int


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The ACK to NBD_OPT_STARTTLS is in the output; send it, then do the TLS handshake
    and call :meth:`ServerConnection.tls_established`."""


@dataclass(frozen=True, slots=True)
class Aborted:
    """The client ended the negotiation (NBD_OPT_ABORT); flush output and close."""


@dataclass(frozen=True, slots=True)
class ExportSelected:
    """Negotiation finished: transmission phase begins on this export."""

    export: ExportInfo
    flags: int
    #: reply chunks are in use: structured replies or extended headers were negotiated
    #: (holes may be sent as OFFSET_HOLE, BLOCK_STATUS is possible)
    structured_replies: bool
    #: selected metadata contexts: id -> name
    meta_contexts: dict[int, str]
    x_close: bool
    #: NBD_OPT_EXTENDED_HEADERS was negotiated (the reply builders take care of it)
    extended_headers: bool = False
    #: (minimum, preferred, maximum payload) in force on this connection
    block_size: tuple[int, int, int] = (1, 4096, DEFAULT_MAX_REQUEST)


@dataclass(frozen=True, slots=True)
class Command:
    """A valid transmission request. For WRITE, ``length`` payload bytes follow.

    ``length`` is the effect length: under extended headers it may exceed 32 bits for
    TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS (never past the end of the export).
    ``contexts`` (BLOCK_STATUS only) are the metadata context ids to answer, in order:
    every selected one, or those the request's payload named.
    """

    cmd: Cmd
    flags: int
    cookie: int
    offset: int
    length: int
    contexts: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class InvalidCommand:
    """A request the server must refuse; reply with ``error`` (any payload was consumed)."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    error: Errno
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish outstanding requests, flush, close. Nothing more is read."""


@dataclass(frozen=True, slots=True)
class SafeClose:
    """NBD_CMD_X_CLOSE: finish outstanding requests, flush, send one reply, close."""

    cookie: int


Event = (OptionHandled | StartTLS | Aborted | ExportSelected | Command | InvalidCommand
         | Disconnect | SafeClose)


class State(enum.Enum):
    GREETING = "greeting"  # waiting for client flags
    OPTIONS = "options"
    OPTION_DATA = "option-data"
    OPTION_DISCARD = "option-discard"
    TLS_PENDING = "tls-pending"
    TRANSMISSION = "transmission"
    PAYLOAD = "payload"  # WRITE payload for the driver
    PAYLOAD_DISCARD = "payload-discard"  # payload of a refused request
    CLOSED = "closed"


# Plain ints, not IntFlag: ``~`` of an IntFlag only covers the flag's defined bits, so
# ``flags & ~allowed`` would miss unknown bits. FUA "is valid for all commands" once
# SEND_FUA is negotiated (spec: the server MUST accept it, even by ignoring it).
_FLAGS_ALLOWED: dict[Cmd, int] = {
    Cmd.READ: int(CmdFlag.FUA | CmdFlag.DF),
    Cmd.WRITE: int(CmdFlag.FUA),
    Cmd.DISC: 0,
    Cmd.FLUSH: int(CmdFlag.FUA),
    Cmd.TRIM: int(CmdFlag.FUA),
    Cmd.CACHE: int(CmdFlag.FUA),
    Cmd.WRITE_ZEROES: int(CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO),
    Cmd.BLOCK_STATUS: int(CmdFlag.FUA | CmdFlag.REQ_ONE),
    Cmd.X_CLOSE: 0,
}


class ServerConnection:
    """One server-side NBD connection, from greeting to close, without I/O."""

    def __init__(self, provider: ExportProvider, config: ServerConfig | None = None) -> None:
        self.provider = provider
        self.config = config or ServerConfig()
        self.state = State.GREETING
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._initiated = False
        self.no_zeroes = False
        self.fixed_newstyle = False
        self.tls_active = False
        self.structured_replies = False
        self.extended_headers = False
        self.x_close = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}
        self._options_seen = 0
        # current option being read
        self._opt = 0
        self._opt_len = 0
        self._discard_left = 0
        self._pending_invalid: InvalidCommand | None = None
        # transmission
        self.export: ExportInfo | None = None
        self.meta_contexts: dict[int, str] = {}
        self.payload_remaining = 0
        self.transmission_flags = 0
        self.block_size: tuple[int, int, int] = (1, 4096, self.config.max_request_size)

    @property
    def chunked(self) -> bool:
        """Replies are chunks (structured replies or extended headers negotiated)."""
        return self.structured_replies or self.extended_headers

    # --- input ------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The server greeting; send it first."""
        if self._initiated:
            raise LocalProtocolError("initiate() called twice")
        self._initiated = True
        return wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is State.CLOSED:
            return  # after DISC/close nothing is read
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def take_output(self) -> bytes:
        """Bytes produced while handling options (replies); send them in order."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """TLS is up: every option state is forgotten, as the spec requires."""
        if self.state is not State.TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in state {self.state.value}")
        if self._buf:
            # bytes sent in the clear after STARTTLS and before the TLS handshake
            self.state = State.CLOSED
            raise PeerProtocolError("client sent plaintext data after NBD_OPT_STARTTLS")
        self.tls_active = True
        self.structured_replies = False
        self.extended_headers = False
        self.x_close = False
        self._meta_export = None
        self._meta = {}
        self.state = State.OPTIONS

    # --- WRITE payload ------------------------------------------------------------

    def payload_into(self, dest: memoryview) -> int:
        """Move already-buffered payload bytes into ``dest``; returns how many."""
        if self.state is not State.PAYLOAD:
            raise LocalProtocolError(f"payload_into() in state {self.state.value}")
        n = min(len(dest), len(self._buf), self.payload_remaining)
        if n:
            dest[:n] = self._buf[:n]
            del self._buf[:n]
            self._consume_payload(n)
        return n

    def payload_received(self, n: int) -> None:
        """The driver received ``n`` payload bytes itself (e.g. ``recv_into``)."""
        if self.state is not State.PAYLOAD or n > self.payload_remaining or n < 0:
            raise LocalProtocolError(
                f"payload_received({n}) with {self.payload_remaining} expected in "
                f"state {self.state.value}")
        if n and self._buf:
            # bytes received before these are still buffered: taking them later would
            # reorder the payload
            raise LocalProtocolError(
                f"payload_received({n}) with {len(self._buf)} bytes still buffered: "
                "drain them with payload_into() first")
        self._consume_payload(n)

    def _consume_payload(self, n: int) -> None:
        self.payload_remaining -= n
        if self.payload_remaining == 0:
            self.state = State.TRANSMISSION

    # --- events -------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        while True:
            st = self.state
            if st is State.TRANSMISSION:
                return self._next_request()
            if st is State.OPTIONS:
                ev = self._next_option_header()
            elif st is State.OPTION_DATA:
                ev = self._next_option_data()
            elif st is State.OPTION_DISCARD:
                ev = self._discard_option()
            elif st is State.PAYLOAD_DISCARD:
                ev = self._discard_payload()
            elif st is State.GREETING:
                ev = self._client_flags()
            elif st is State.PAYLOAD:
                raise LocalProtocolError(
                    f"next_event() with {self.payload_remaining} WRITE payload bytes pending")
            else:  # TLS_PENDING, CLOSED
                return NEED_DATA
            if ev is None:
                continue
            return ev

    # greeting
    def _client_flags(self) -> Event | _NeedData | None:
        if not self._initiated:
            raise LocalProtocolError("next_event() before initiate()")
        if len(self._buf) < 4:
            return NEED_DATA
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:4]
        known = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
        if flags & ~known:  # int, not IntFlag: ~IntFlag drops the undefined bits
            self.state = State.CLOSED
            raise PeerProtocolError(f"client sent unknown client flags 0x{flags:08x}")
        self.fixed_newstyle = bool(flags & ClientFlag.C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & ClientFlag.C_NO_ZEROES)
        self.state = State.OPTIONS
        return None

    # options
    def _next_option_header(self) -> Event | _NeedData | None:
        if len(self._buf) < wire.OPTION_REQUEST.size:
            return NEED_DATA
        magic, opt, length = wire.OPTION_REQUEST.unpack_from(self._buf)
        if magic != IHAVEOPT:
            self.state = State.CLOSED
            raise PeerProtocolError(f"bad option magic 0x{magic:016x} (expected IHAVEOPT)")
        del self._buf[:wire.OPTION_REQUEST.size]
        self._options_seen += 1
        if self._options_seen > MAX_OPTIONS:
            self.state = State.CLOSED
            raise PeerProtocolError(f"client sent more than {MAX_OPTIONS} options")
        if not self.fixed_newstyle and opt != Opt.EXPORT_NAME:
            self.state = State.CLOSED
            raise PeerProtocolError(
                f"option {opt} from a client without NBD_FLAG_C_FIXED_NEWSTYLE")
        self._opt, self._opt_len = opt, length
        if length > MAX_OPTION_DATA:
            if opt == Opt.EXPORT_NAME or length > MAX_OPTION_DISCARD:
                self.state = State.CLOSED
                raise PeerProtocolError(
                    f"option {_opt_name(opt)} with absurd data length {length}")
            self._discard_left = length
            self.state = State.OPTION_DISCARD
            return None
        self.state = State.OPTION_DATA
        return None

    def _discard_option(self) -> Event | _NeedData | None:
        n = min(self._discard_left, len(self._buf))
        del self._buf[:n]
        self._discard_left -= n
        if self._discard_left:
            return NEED_DATA
        self.state = State.OPTIONS
        if self._tls_blocked() and self._opt not in (Opt.STARTTLS, Opt.ABORT):
            return self._reply_error(self._opt, Rep.ERR_TLS_REQD,
                                     "TLS is required: send NBD_OPT_STARTTLS first")
        return self._reply_error(self._opt, Rep.ERR_TOO_BIG,
                                 f"option data of {self._opt_len} bytes is too large")

    def _next_option_data(self) -> Event | _NeedData | None:
        if len(self._buf) < self._opt_len:
            return NEED_DATA
        data = bytes(self._buf[:self._opt_len])
        del self._buf[:self._opt_len]
        self.state = State.OPTIONS
        return self._handle_option(self._opt, data)

    def _reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(wire.encode_option_reply(opt, rep, data))

    def _reply_error(self, opt: int, rep: Rep, message: str) -> OptionHandled:
        # the message is for humans; the spec allows a UTF-8 string with error replies
        # (cut on a character boundary: a byte cut could leave invalid UTF-8)
        self._reply(opt, rep, wire.truncate_utf8(message, MAX_STRING))
        return OptionHandled(opt, rep)

    def _tls_blocked(self) -> bool:
        return self.config.tls is TLSMode.REQUIRE and not self.tls_active

    def _handle_option(self, opt: int, data: bytes) -> Event | None:
        if opt == Opt.EXPORT_NAME:
            return self._opt_export_name(data)
        if opt == Opt.ABORT:
            self._reply(opt, Rep.ACK)
            self.state = State.CLOSED
            return Aborted()
        if opt == Opt.STARTTLS:
            return self._opt_starttls(data)
        if self._tls_blocked():
            return self._reply_error(opt, Rep.ERR_TLS_REQD,
                                     "TLS is required: send NBD_OPT_STARTTLS first")
        try:
            if opt == Opt.LIST:
                return self._opt_list(data)
            if opt in (Opt.INFO, Opt.GO):
                return self._opt_info_go(opt, data)
            if opt == Opt.STRUCTURED_REPLY:
                if data:
                    return self._reply_error(opt, Rep.ERR_INVALID,
                                             "NBD_OPT_STRUCTURED_REPLY takes no data")
                if self.extended_headers:
                    return self._reply_error(
                        opt, Rep.ERR_EXT_HEADER_REQD,
                        "extended headers were negotiated; they supersede structured replies")
                self.structured_replies = True
                self._reply(opt, Rep.ACK)
                return OptionHandled(opt, Rep.ACK)
            if opt == Opt.EXTENDED_HEADERS and self.config.extended_headers:
                if data:
                    return self._reply_error(opt, Rep.ERR_INVALID,
                                             "NBD_OPT_EXTENDED_HEADERS takes no data")
                self.extended_headers = True
                self._reply(opt, Rep.ACK)
                return OptionHandled(opt, Rep.ACK)
            if opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                return self._opt_meta_context(opt, data)
            if opt == Opt.X_CLOSE and self.config.x_close:
                if data:
                    return self._reply_error(opt, Rep.ERR_INVALID,
                                             "NBD_OPT_X_CLOSE takes no data")
                self.x_close = True
                self._reply(opt, Rep.ACK)
                return OptionHandled(opt, Rep.ACK)
        except PeerProtocolError as exc:
            # a malformed option payload: the stream is still in sync, refuse the option
            return self._reply_error(opt, Rep.ERR_INVALID, str(exc))
        return self._reply_error(opt, Rep.ERR_UNSUP, f"{_opt_name(opt)} not supported")

    def _opt_export_name(self, data: bytes) -> Event:
        if self._tls_blocked():
            self.state = State.CLOSED
            raise PeerProtocolError("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
        if self.extended_headers:
            # it cannot be refused, and its reply cannot say "compact headers only"
            self.state = State.CLOSED
            raise PeerProtocolError("NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS "
                                    "(the spec forbids it; use NBD_OPT_GO)")
        r = wire.Reader(data, "NBD_OPT_EXPORT_NAME")
        try:
            name = r.rest_text()
        except PeerProtocolError:
            self.state = State.CLOSED  # EXPORT_NAME cannot be refused: drop
            raise
        export = self.provider.lookup(name)
        if export is None:
            self.state = State.CLOSED
            raise PeerProtocolError(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        # the safe-close flag is only for clients that negotiated it; EXPORT_NAME
        # clients cannot, but keep the rule in one place
        flags = export.transmission_flags(self.structured_replies, self.x_close)
        self._out.append(wire.encode_export_name_reply(export.size, flags, self.no_zeroes))
        return self._enter_transmission(export, flags, name)

    def _opt_starttls(self, data: bytes) -> Event:
        opt = Opt.STARTTLS
        if self.config.tls is TLSMode.OFF:
            return self._reply_error(opt, Rep.ERR_UNSUP, "TLS is not configured on this server")
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            return self._reply_error(opt, Rep.ERR_INVALID, "TLS is already active")
        self._reply(opt, Rep.ACK)
        self.state = State.TLS_PENDING
        return StartTLS()

    def _opt_list(self, data: bytes) -> Event:
        opt = Opt.LIST
        if data:
            return self._reply_error(opt, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
        if not self.config.allow_list:
            return self._reply_error(opt, Rep.ERR_POLICY, "listing exports is disabled")
        for export in self.provider.list_exports():
            self._reply(opt, Rep.SERVER, wire.encode_rep_server(export.name, export.description))
        self._reply(opt, Rep.ACK)
        return OptionHandled(opt, Rep.ACK)

    def _opt_info_go(self, opt: int, data: bytes) -> Event:
        name, infos = wire.decode_info_request(data)
        export = self.provider.lookup(name)
        if export is None:
            return self._reply_error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(
            self.chunked, self.x_close,
            self.extended_headers and bool(self._selected_contexts(export, name)))
        self._reply(opt, Rep.INFO, wire.encode_info_export(export.size, flags))
        seen: set[int] = set()
        for info in infos:
            if info in seen:
                continue
            seen.add(info)
            if info == Info.NAME:
                self._reply(opt, Rep.INFO, wire.encode_info_name(export.name))
            elif info == Info.DESCRIPTION and export.description:
                self._reply(opt, Rep.INFO, wire.encode_info_description(export.description))
            elif info == Info.BLOCK_SIZE:
                self._reply(opt, Rep.INFO,
                            wire.encode_info_block_size(*self._block_size_for(export)))
        self._reply(opt, Rep.ACK)
        if opt == Opt.INFO:
            return OptionHandled(opt, Rep.ACK)
        return self._enter_transmission(export, flags, name)

    def _opt_meta_context(self, opt: int, data: bytes) -> Event:
        is_set = opt == Opt.SET_META_CONTEXT
        if is_set:
            # SET replaces the previous selection even when it fails
            self._meta_export, self._meta = None, {}
        if not self.chunked:
            return self._reply_error(opt, Rep.ERR_INVALID,
                                     "negotiate NBD_OPT_STRUCTURED_REPLY or "
                                     "NBD_OPT_EXTENDED_HEADERS first")
        name, queries = wire.decode_meta_context_request(data)
        export = self.provider.lookup(name)
        if export is None:
            return self._reply_error(opt, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        for q in queries:
            if ":" not in q:
                return self._reply_error(opt, Rep.ERR_INVALID,
                                         f"meta context query {q!r} has no namespace")
        if export.refused_contexts:
            refused = dict(export.refused_contexts)
            for q in queries:
                if q in refused:
                    return self._reply_error(opt, Rep.ERR_POLICY, f"{q}: {refused[q]}")
        matched: list[str] = []
        for ctx in export.meta_contexts:
            if not queries and not is_set:
                matched.append(ctx)
                continue
            for q in queries:
                # LIST: "ns:" names a namespace, and a query ending in ":" every context
                # under it (qemu: "qemu:dirty-bitmap:" lists every bitmap)
                if q == ctx or (not is_set and q.endswith(":") and ctx.startswith(q)):
                    matched.append(ctx)
                    break
        selected: dict[int, str] = {}
        for i, ctx in enumerate(matched, start=1):
            ctx_id = i if is_set else 0
            if is_set:
                selected[ctx_id] = ctx
            self._reply(opt, Rep.META_CONTEXT, wire.encode_rep_meta_context(ctx_id, ctx))
        self._reply(opt, Rep.ACK)
        if is_set:
            self._meta_export, self._meta = name, selected
        return OptionHandled(opt, Rep.ACK)

    def _selected_contexts(self, export: ExportInfo, requested: str) -> dict[int, str]:
        """The contexts SET_META_CONTEXT selected, if it named this export."""
        if self._meta_export is not None and (
                self._meta_export == requested
                or self.provider.lookup(self._meta_export) == export):
            return self._meta
        return {}

    def _block_size_for(self, export: ExportInfo) -> tuple[int, int, int]:
        """The export's block size constraints with the server's maximum applied."""
        minimum, preferred, maximum = export.block_size
        maximum = min(maximum, self.config.max_request_size)
        if preferred > maximum:  # the spec: maximum >= preferred, both powers of two
            preferred = max(minimum, 1 << (maximum.bit_length() - 1))
        return minimum, preferred, max(maximum, minimum)

    def _enter_transmission(self, export: ExportInfo, flags: int,
                            requested: str) -> ExportSelected:
        self.export = export
        self.meta_contexts = dict(self._selected_contexts(export, requested))
        self.state = State.TRANSMISSION
        self.transmission_flags = flags
        self.block_size = self._block_size_for(export)
        return ExportSelected(export, flags, self.chunked, dict(self.meta_contexts),
                              self.x_close, self.extended_headers, self.block_size)

    # transmission
    def _next_request(self) -> Event | _NeedData:
        if self.extended_headers:
            return self._next_ext_request()
        buf = self._buf
        if len(buf) < wire.REQUEST_SIZE:
            if len(buf) >= 4 and buf[:4] == _EXT_MAGIC_BYTES:
                self.state = State.CLOSED
                raise PeerProtocolError("extended request header, but NBD_OPT_EXTENDED_HEADERS "
                                        "was not negotiated")
            return NEED_DATA
        hdr = wire.REQUEST.unpack_from(buf)
        magic, flags, cmd, cookie, offset, length = hdr
        if magic != REQUEST_MAGIC:
            self.state = State.CLOSED
            if magic == EXTENDED_REQUEST_MAGIC:
                raise PeerProtocolError("extended request header, but NBD_OPT_EXTENDED_HEADERS "
                                        "was not negotiated")
            raise PeerProtocolError(
                f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
        del buf[:wire.REQUEST_SIZE]
        export = self.export
        assert export is not None
        try:
            command = Cmd(cmd)
        except ValueError:
            return InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL,
                                  f"unknown command {cmd}")
        if command is Cmd.WRITE:
            err = self._validate(command, flags, offset, length, export)
            if err is not None:
                if length > max(MAX_WRITE_DISCARD, self.block_size[2]):
                    self.state = State.CLOSED
                    raise PeerProtocolError(
                        f"WRITE payload of {length} bytes exceeds {MAX_WRITE_DISCARD}")
                inv = InvalidCommand(cmd, flags, cookie, offset, length, err[0], err[1])
                return self._refuse_payload(inv, length)
            if length:
                self.payload_remaining = length
                self.state = State.PAYLOAD
            return Command(command, flags, cookie, offset, length)
        return self._command(command, flags, cookie, offset, length, export)

    def _command(self, command: Cmd, flags: int, cookie: int, offset: int, length: int,
                 export: ExportInfo) -> Event:
        """A request without payload (compact or extended): validate, then the event."""
        if command is Cmd.DISC:
            self.state = State.CLOSED
            self._buf.clear()
            return Disconnect()
        err = self._validate(command, flags, offset, length, export)
        if err is not None:
            return InvalidCommand(command, flags, cookie, offset, length, err[0], err[1])
        if command is Cmd.X_CLOSE:
            self.state = State.CLOSED
            self._buf.clear()
            return SafeClose(cookie)
        if command is Cmd.BLOCK_STATUS:
            return Command(command, flags, cookie, offset, length,
                           tuple(sorted(self.meta_contexts)))
        return Command(command, flags, cookie, offset, length)

    def _next_ext_request(self) -> Event | _NeedData:
        buf = self._buf
        if len(buf) < wire.EXT_REQUEST_SIZE:
            # a compact header is 28 bytes: recognise it from its magic instead of
            # waiting for 4 bytes that may never come
            if len(buf) >= 4 and buf[:4] != _EXT_MAGIC_BYTES:
                self.state = State.CLOSED
                if buf[:4] == _COMPACT_MAGIC_BYTES:
                    raise PeerProtocolError("compact request header after "
                                            "NBD_OPT_EXTENDED_HEADERS was negotiated")
                raise PeerProtocolError(f"bad extended request magic 0x{bytes(buf[:4]).hex()} "
                                        f"(expected 0x{EXTENDED_REQUEST_MAGIC:08x})")
            return NEED_DATA
        magic, flags, cmd, cookie, offset, length = wire.EXT_REQUEST.unpack_from(buf)
        if magic != EXTENDED_REQUEST_MAGIC:
            self.state = State.CLOSED
            if magic == REQUEST_MAGIC:
                raise PeerProtocolError("compact request header after NBD_OPT_EXTENDED_HEADERS "
                                        "was negotiated")
            raise PeerProtocolError(f"bad extended request magic 0x{magic:08x} "
                                    f"(expected 0x{EXTENDED_REQUEST_MAGIC:08x})")
        export = self.export
        assert export is not None
        try:
            command: Cmd | None = Cmd(cmd)
        except ValueError:
            command = None
        if command is Cmd.DISC:
            del buf[:wire.EXT_REQUEST_SIZE]
            return self._command(Cmd.DISC, flags, cookie, offset, length, export)
        if not flags & _PAYLOAD_LEN and command is not Cmd.WRITE:
            # no payload: ``length`` is an effect length (64 bits)
            del buf[:wire.EXT_REQUEST_SIZE]
            if command is None:
                return InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL,
                                      f"unknown command {cmd}")
            return self._command(command, flags, cookie, offset, length, export)
        # a payload of ``length`` bytes follows the header. A WRITE always has one: the
        # spec wants NBD_CMD_FLAG_PAYLOAD_LEN on it, but qemu's client (10.0) leaves the
        # flag off, and refusing without reading the data would desynchronise the stream
        maximum = self.block_size[2]
        if length > maximum:
            # spec: SHOULD disconnect (reading it would be a denial of service)
            self.state = State.CLOSED
            raise PeerProtocolError(
                f"request payload of {length} bytes exceeds the maximum payload {maximum}")
        plain = flags & ~_PAYLOAD_LEN
        if command is Cmd.WRITE:
            del buf[:wire.EXT_REQUEST_SIZE]
            err = self._validate(command, plain, offset, length, export)
            if err is not None:
                inv = InvalidCommand(cmd, flags, cookie, offset, length, err[0], err[1])
                return self._refuse_payload(inv, length)
            if length:
                self.payload_remaining = length
                self.state = State.PAYLOAD
            return Command(command, flags, cookie, offset, length)
        if command is Cmd.BLOCK_STATUS and \
                self.transmission_flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD and \
                8 <= length <= 8 + 4 * len(self.meta_contexts) and length % 4 == 0:
            # small (bounded by the number of selected contexts): wait for all of it
            if len(buf) < wire.EXT_REQUEST_SIZE + length:
                return NEED_DATA
            payload = bytes(buf[wire.EXT_REQUEST_SIZE:wire.EXT_REQUEST_SIZE + length])
            del buf[:wire.EXT_REQUEST_SIZE + length]
            effect, ids = wire.decode_block_status_payload(payload)
            problem = ""
            if not ids:
                problem = "block status payload names no metadata context"
            elif len(set(ids)) != len(ids):
                problem = f"block status payload names a context id twice ({ids})"
            else:
                unknown = [i for i in ids if i not in self.meta_contexts]
                if unknown:
                    problem = f"block status payload names unknown context id(s) {unknown}"
            if problem:
                return InvalidCommand(cmd, flags, cookie, offset, effect, Errno.EINVAL,
                                      problem)
            err = self._validate(command, plain, offset, effect, export)
            if err is not None:
                return InvalidCommand(cmd, flags, cookie, offset, effect, err[0], err[1])
            return Command(command, flags, cookie, offset, effect, tuple(ids))
        # a command that takes no payload (or a malformed block status payload): the
        # spec wants the payload consumed, then EINVAL
        del buf[:wire.EXT_REQUEST_SIZE]
        if command is Cmd.BLOCK_STATUS:
            if not self.transmission_flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD:
                why = "block status payload, but NBD_FLAG_BLOCK_STATUS_PAYLOAD was not offered"
            else:
                why = (f"block status payload of {length} bytes (must be 8 + 4n with n "
                       f"between 1 and {len(self.meta_contexts)} selected contexts)")
        else:
            name = command.name if command is not None else f"command {cmd}"
            why = f"{name} takes no payload (NBD_CMD_FLAG_PAYLOAD_LEN set)"
        inv = InvalidCommand(cmd, flags, cookie, offset, length, Errno.EINVAL, why)
        return self._refuse_payload(inv, length)

    def _refuse_payload(self, inv: InvalidCommand, length: int) -> Event | _NeedData:
        """Consume ``length`` payload bytes of a refused request, then report it."""
        if not length:
            return inv
        self._pending_invalid = inv
        self._discard_left = length
        self.state = State.PAYLOAD_DISCARD
        return self._discard_payload()

    def _discard_payload(self) -> Event | _NeedData:
        n = min(self._discard_left, len(self._buf))
        del self._buf[:n]
        self._discard_left -= n
        if self._discard_left:
            return NEED_DATA
        self.state = State.TRANSMISSION
        inv = self._pending_invalid
        assert inv is not None
        self._pending_invalid = None
        return inv

    def _validate(self, cmd: Cmd, flags: int, offset: int, length: int,
                  export: ExportInfo) -> tuple[Errno, str] | None:
        name = cmd.name
        allowed = _FLAGS_ALLOWED.get(cmd)
        if allowed is None:
            return Errno.EINVAL, f"{name} is not supported"
        if flags & ~allowed:
            return Errno.EINVAL, f"flags 0x{flags:x} not valid for {name}"
        tf = self.transmission_flags
        if cmd in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES) and export.read_only:
            return Errno.EPERM, f"{name} on read-only export {export.name!r}"
        if flags & CmdFlag.FUA and not tf & TransmissionFlag.SEND_FUA:
            return Errno.EINVAL, "FUA not supported on this export"
        if cmd is Cmd.X_CLOSE:
            if not self.x_close:
                return Errno.EINVAL, "unknown command 0x7f01 (NBD_OPT_X_CLOSE not negotiated)"
            if offset or length:
                return Errno.EINVAL, "NBD_CMD_X_CLOSE needs offset and length 0"
            return None
        if cmd is Cmd.FLUSH:
            if not tf & TransmissionFlag.SEND_FLUSH:
                return Errno.EINVAL, "FLUSH not supported on this export"
            if offset or length:  # spec: reserved, MUST be all-zero
                return Errno.EINVAL, "FLUSH needs offset and length 0"
            return None
        if flags & CmdFlag.DF and not self.chunked:
            return Errno.EINVAL, "DF flag needs structured replies"
        if cmd is Cmd.RESIZE:
            return Errno.EINVAL, "RESIZE not supported"
        if cmd is Cmd.TRIM and not tf & TransmissionFlag.SEND_TRIM:
            return Errno.EINVAL, "TRIM not supported on this export"
        if cmd is Cmd.WRITE_ZEROES:
            if not tf & TransmissionFlag.SEND_WRITE_ZEROES:
                return Errno.EINVAL, "WRITE_ZEROES not supported on this export"
            if flags & CmdFlag.FAST_ZERO and not tf & TransmissionFlag.SEND_FAST_ZERO:
                return Errno.EINVAL, "FAST_ZERO not negotiated"
        if cmd is Cmd.CACHE and not tf & TransmissionFlag.SEND_CACHE:
            return Errno.EINVAL, "CACHE not supported on this export"
        if cmd is Cmd.BLOCK_STATUS:
            if not self.meta_contexts:
                return Errno.EINVAL, "BLOCK_STATUS without a negotiated metadata context"
            if length == 0:
                return Errno.EINVAL, "BLOCK_STATUS with length 0"
        maximum = self.block_size[2]
        if cmd in (Cmd.READ, Cmd.WRITE) and length > maximum:
            # spec: EOVERFLOW only for READ when DF is supported (reply chunks)
            overflow = cmd is Cmd.READ and self.chunked
            return Errno.EOVERFLOW if overflow else Errno.EINVAL, \
                f"{name} of {length} bytes exceeds the maximum payload {maximum}"
        if offset + length > export.size:
            err = Errno.ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            return err, (f"{name} at offset {offset} length {length} is past the end of "
                         f"export {export.name!r} (size {export.size})")
        minimum = export.block_size[0]
        if minimum > 1 and (offset % minimum or length % minimum):
            return Errno.EINVAL, f"{name} not aligned to the minimum block size {minimum}"
        return None

    # --- replies (bytes out) --------------------------------------------------------
    #
    # ``req_offset`` is the offset of the request being answered: extended replies echo
    # it (the spec: MUST match). Pass it always; compact replies ignore it.

    def _req_offset(self, req_offset: int | None, what: str) -> int:
        if req_offset is None:
            raise LocalProtocolError(f"{what} under extended headers needs req_offset "
                                     "(the request's offset)")
        return req_offset

    def simple_reply(self, cookie: int, error: int = 0) -> bytes:
        if self.extended_headers:
            raise LocalProtocolError("simple replies are not allowed under extended headers")
        return wire.encode_simple_reply(cookie, error)

    def ok_reply(self, cookie: int, req_offset: int | None = None) -> bytes:
        """Success without payload (WRITE, FLUSH, TRIM, ...)."""
        if self.extended_headers:
            return wire.encode_ext_chunk_header(cookie, ReplyType.NONE, ReplyFlag.DONE,
                                                self._req_offset(req_offset, "ok_reply"), 0)
        if self.structured_replies:
            return wire.encode_chunk_header(cookie, 0, ReplyFlag.DONE, 0)
        return wire.encode_simple_reply(cookie, 0)

    def error_reply(self, cookie: int, error: int, message: str = "",
                    req_offset: int | None = None) -> bytes:
        if self.extended_headers:
            return wire.encode_ext_error_chunk(cookie,
                                               self._req_offset(req_offset, "error_reply"),
                                               error, message, ReplyFlag.DONE)
        if self.structured_replies:
            return wire.encode_error_chunk(cookie, error, message, ReplyFlag.DONE)
        return wire.encode_simple_reply(cookie, error)

    def read_reply_header(self, cookie: int, offset: int, length: int,
                          done: bool = True, req_offset: int | None = None) -> bytes:
        """Header preceding ``length`` bytes of read data at ``offset`` (simple reply or
        OFFSET_DATA). ``req_offset`` defaults to ``offset`` (a reply in one piece)."""
        flags = ReplyFlag.DONE if done else 0
        if self.extended_headers:
            ro = offset if req_offset is None else req_offset
            if length == 0:
                return wire.encode_ext_chunk_header(cookie, ReplyType.NONE, flags, ro, 0)
            return wire.encode_ext_offset_data_header(cookie, ro, offset, length, flags)
        if self.structured_replies and length == 0:
            # OFFSET_DATA needs at least 1 byte of data (chunk length >= 9): a
            # zero-length read succeeds with a NONE chunk
            return wire.encode_chunk_header(cookie, 0, flags, 0)
        if self.structured_replies:
            return wire.encode_offset_data_header(cookie, offset, length, flags)
        return wire.encode_simple_reply(cookie, 0)

    def hole_chunk(self, cookie: int, offset: int, length: int, done: bool,
                   req_offset: int | None = None) -> bytes:
        flags = ReplyFlag.DONE if done else 0
        if self.extended_headers:
            return wire.encode_ext_offset_hole(cookie, self._req_offset(req_offset, "hole_chunk"),
                                               offset, length, flags)
        if not self.structured_replies:
            raise LocalProtocolError("OFFSET_HOLE needs structured replies")
        return wire.encode_offset_hole(cookie, offset, length, flags)

    def done_chunk(self, cookie: int, req_offset: int | None = None) -> bytes:
        if self.extended_headers:
            return wire.encode_ext_chunk_header(cookie, ReplyType.NONE, ReplyFlag.DONE,
                                                self._req_offset(req_offset, "done_chunk"), 0)
        return wire.encode_chunk_header(cookie, 0, ReplyFlag.DONE, 0)

    def block_status_reply(self, cookie: int, extents: Iterable[tuple[int, int]],
                           done: bool = True, context_id: int | None = None, *,
                           contexts: Sequence[int] | None = None,
                           req_offset: int | None = None,
                           per_context: Mapping[int, Sequence[tuple[int, int]]] | None = None,
                           ) -> list[bytes]:
        """One status chunk per context: ``contexts`` (a Command's ``contexts``; default
        every selected one, or just ``context_id``), each with ``extents`` or its own
        list from ``per_context``. Extents are (length, flags) pairs; at most 2^20 go in
        a chunk, and compact replies cap an extent below 4 GiB (a shorter answer is
        allowed: the client asks again for the rest)."""
        if contexts is not None:
            ids = list(contexts)
        elif context_id is not None:
            ids = [context_id]
        else:
            ids = sorted(self.meta_contexts)
        if not ids:
            raise LocalProtocolError("block status reply for no metadata context")
        ext = list(extents)
        ro = self._req_offset(req_offset, "block_status_reply") \
            if self.extended_headers else 0
        out = []
        for i, cid in enumerate(ids):
            last = i == len(ids) - 1
            flags = ReplyFlag.DONE if (done and last) else 0
            lst = _cap_extents(per_context[cid] if per_context is not None and
                               cid in per_context else ext, self.extended_headers)
            if self.extended_headers:
                out.append(wire.encode_block_status_ext(cookie, ro, cid, lst, flags))
            else:
                out.append(wire.encode_block_status(cookie, cid, lst, flags))
        return out


#: compact BLOCK_STATUS extents must fit 32 bits; cut at a multiple of every allowed
#: minimum block size (<= 64 KiB)
_COMPACT_EXTENT_MAX = 0x100000000 - 0x10000
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_EXT_MAGIC_BYTES = EXTENDED_REQUEST_MAGIC.to_bytes(4, "big")
_COMPACT_MAGIC_BYTES = REQUEST_MAGIC.to_bytes(4, "big")


def _cap_extents(extents: Sequence[tuple[int, int]], extended: bool) -> list[tuple[int, int]]:
    out = list(extents[:MAX_EXTENTS_PER_CHUNK])
    if not out:
        raise LocalProtocolError("block status chunk needs at least one extent")
    if not extended:
        for i, (length, state) in enumerate(out):
            if length > _COMPACT_EXTENT_MAX:
                # the rest would no longer start where this one ends: stop here
                out = [*out[:i], (_COMPACT_EXTENT_MAX, state)]
                break
    return out


def _opt_name(opt: int) -> str:
    try:
        return "NBD_OPT_" + Opt(opt).name
    except ValueError:
        return f"option {opt}"


__all__ = [
    "MAX_OPTION_DATA",
    "NEED_DATA",
    "Aborted",
    "Command",
    "Disconnect",
    "Event",
    "ExportInfo",
    "ExportProvider",
    "ExportSelected",
    "InvalidCommand",
    "OptionHandled",
    "SafeClose",
    "ServerConfig",
    "ServerConnection",
    "StartTLS",
    "State",
    "TLSMode",
]
