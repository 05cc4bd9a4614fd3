"""What the client core reports and keeps: events, export descriptions, states.

Shared by the phase modules behind :class:`~pynbd.protocol.client.ClientConnection`
(options, replies) and re-exported by :mod:`pynbd.protocol.client`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from pynbd.protocol import wire
from pynbd.protocol.constants import TransmissionFlag, rep_is_error
from pynbd.protocol.stream import ByteStream

NEED_DATA: Final = wire.NEED_DATA
_NeedData = wire._NeedData

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


class ClientState(ByteStream, states=State, payload="read payload", peer="server"):
    """The state every phase of the client core reads and writes (set up by
    :class:`~pynbd.protocol.client.ClientConnection`)."""

    state: State
    handshake_flags: int
    export: ExportInfo | None
    _inflight: dict[int, _Inflight]
    #: the reply whose read payload is being received, and whether it is done after it
    _payload_cookie: int
    _payload_done: bool


