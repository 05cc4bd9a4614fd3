"""What the server core works with: exports, configuration, events and states.

Shared by the phase modules behind :class:`~pynbd.protocol.server.ServerConnection`
(options, requests, replies) and re-exported by :mod:`pynbd.protocol.server`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, Protocol

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    BASE_ALLOCATION,
    DEFAULT_MAX_REQUEST,
    MAX_BLOCK_SIZE_FIELD,
    Cmd,
    Errno,
    TransmissionFlag,
)
from pynbd.protocol.stream import ByteStream

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


class Command(NamedTuple):
    """A valid transmission request. For WRITE, ``length`` payload bytes follow.

    ``length`` is the effect length: under extended headers it may exceed 32 bits for
    TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS (never past the end of the export).
    ``contexts`` (BLOCK_STATUS only) are the metadata context ids to answer, in order:
    every selected one, or those the request's payload named.

    The one event that is not a frozen dataclass: it is built once per request, and a
    NamedTuple (as immutable) costs ~0.5 us to build against ~1.5 us for a frozen
    dataclass's ``__init__`` (an ``object.__setattr__`` per field).
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


class ServerState(ByteStream, states=State, payload="WRITE payload", peer="client"):
    """The state every phase of the server core reads and writes (set up by
    :class:`~pynbd.protocol.server.ServerConnection`)."""

    state: State
    provider: ExportProvider
    config: ServerConfig
    fixed_newstyle: bool
    #: the contexts SET_META_CONTEXT selected (for ``_meta_export``)
    _meta: dict[int, str]
    # transmission
    export: ExportInfo | None
    transmission_flags: int
    block_size: tuple[int, int, int]
    #: the READ/WRITE fast path's bounds, set on entering transmission: the export's
    #: size; the largest READ and WRITE that need no other test (-1: every one takes the
    #: full validation, e.g. a minimum block size or a read-only export); the request
    #: flags a WRITE may carry without other tests (FUA when negotiated, else 0)
    _fast_size: int
    _fast_read_max: int
    _fast_write_max: int
    _fast_write_flags: int
