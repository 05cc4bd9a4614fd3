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

The core is split by phase, one module each, behind this face: handshake and option
haggling (:mod:`.server_options`), request parsing and validation
(:mod:`.server_requests`), reply building (:mod:`.server_replies`); the receive buffer
and the in-place payload are :mod:`.stream`'s, the types :mod:`.server_types`'.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.constants import HandshakeFlag
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError
from pynbd.protocol.server_options import OptionPhase
from pynbd.protocol.server_replies import ReplyBuilder
from pynbd.protocol.server_requests import RequestPhase
from pynbd.protocol.server_types import (
    MAX_OPTION_DATA,
    MAX_OPTION_DISCARD,
    MAX_OPTIONS,
    MAX_WRITE_DISCARD,
    NEED_DATA,
    Aborted,
    Command,
    Disconnect,
    Event,
    ExportInfo,
    ExportProvider,
    ExportSelected,
    InvalidCommand,
    OptionHandled,
    SafeClose,
    ServerConfig,
    StartTLS,
    State,
    TLSMode,
    _NeedData,
)


class ServerConnection(OptionPhase, RequestPhase, ReplyBuilder):
    """One server-side NBD connection, from greeting to close, without I/O."""

    def __init__(self, provider: ExportProvider, config: ServerConfig | None = None) -> None:
        super().__init__()
        self.provider = provider
        self.config = config or ServerConfig()
        self.state = State.GREETING
        self._initiated = False
        self.no_zeroes = False
        self.fixed_newstyle = False
        self.tls_active = False
        self._forget_options()
        self._options_seen = 0
        # current option being read
        self._opt = 0
        self._opt_len = 0
        self._pending_invalid = None
        # transmission
        self.export = None
        self.transmission_flags = 0
        self.block_size = (1, 4096, self.config.max_request_size)
        self._fast_size = 0
        self._fast_read_max = self._fast_write_max = -1
        self._fast_write_flags = 0

    def initiate(self) -> bytes:
        """The server greeting; send it first."""
        if self._initiated:
            raise LocalProtocolError("initiate() called twice")
        self._initiated = True
        return wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)

    def next_event(self) -> Event | _NeedData:
        try:
            if self.state is State.TRANSMISSION:
                return self._next_request()
            return self._next_negotiation_event()
        except PeerProtocolError:
            self.state = State.CLOSED
            raise

    def _next_negotiation_event(self) -> Event | _NeedData:
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
                raise self._pending_payload_error()
            else:  # TLS_PENDING, CLOSED
                return NEED_DATA
            if ev is None:
                continue
            return ev


__all__ = [
    "MAX_OPTIONS",
    "MAX_OPTION_DATA",
    "MAX_OPTION_DISCARD",
    "MAX_WRITE_DISCARD",
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
