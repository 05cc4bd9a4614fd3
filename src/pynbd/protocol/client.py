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

The core is split by phase behind this face: handshake and options
(:mod:`.client_options`), reply parsing (:mod:`.client_replies`); requests are built
here; the receive buffer and in-place payload are :mod:`.stream`'s, the events and
types :mod:`.client_types`'.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.client_options import MAX_OPTION_REPLY, MAX_OPTION_TOTAL, OptionPhase
from pynbd.protocol.client_replies import MAX_META_CHUNK, MAX_META_CHUNK_EXT, ReplyPhase
from pynbd.protocol.client_types import (
    NEED_DATA,
    BlockStatusChunk,
    Event,
    ExportEntry,
    ExportInfo,
    Handshake,
    MetaContext,
    OptionDone,
    ReadData,
    ReadHole,
    ReplyDone,
    ReplyError,
    State,
    _Inflight,
    _NeedData,
)
from pynbd.protocol.constants import (
    EXTENDED_REQUEST_MAGIC,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    TransmissionFlag,
    cmd_name,
    opt_name,
)
from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError

#: cookies are 64-bit
_COOKIE_MASK = (1 << 64) - 1
_U64_MAX = (1 << 64) - 1
_PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
_WRITE = int(Cmd.WRITE)
_REQUEST = wire.REQUEST
_EXT_REQUEST = wire.EXT_REQUEST


class ClientConnection(OptionPhase, ReplyPhase):
    """One client-side NBD connection, from greeting to close, without I/O."""

    def __init__(self) -> None:
        super().__init__()
        self.state = State.GREETING
        self.handshake_flags = 0
        self.no_zeroes = False
        self.tls_active = False
        # option phase
        self._opt = 0
        self._opt_replies = []
        self._opt_bytes = 0
        self._opt_info = None
        self._opt_export = ""
        self._meta_queries = ()
        self._meta_pending = {}
        self._forget_options()
        # transmission
        self.export = None
        self._next_cookie = 1
        self._inflight = {}
        self._payload_cookie = 0
        self._payload_done = False  # reply is done once the payload is in

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
        if st is State.TRANSMISSION and not self._inflight and not self._buf:
            raise PeerProtocolError("server closed the connection")
        raise PeerProtocolError(f"server closed the connection {self._closed_when(st)}"
                                .rstrip())

    def _closed_when(self, st: State) -> str:
        return {
            State.GREETING: "before the greeting was complete",
            State.OPTIONS: "during negotiation",
            State.OPTION_REPLY: f"while answering {opt_name(self._opt)}",
            State.TLS_PENDING: "during STARTTLS",
            State.TRANSMISSION: f"with {len(self._inflight)} request(s) in flight",
            State.PAYLOAD: f"in the middle of read data ({self.payload_remaining} "
                           "bytes missing)",
            State.CLOSING: "before replying to NBD_CMD_X_CLOSE",
            State.CLOSED: f"with {len(self._inflight)} request(s) in flight",
        }.get(st, "")

    # --- events -------------------------------------------------------------------

    def next_event(self) -> Event | _NeedData:
        st = self.state
        try:
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
        except PeerProtocolError:
            self.state = State.CLOSED
            self._buf.clear()
            raise
        if st is State.PAYLOAD:
            raise self._pending_payload_error()
        if st is State.CLOSED and self._inflight:
            return NEED_DATA
        if self._buf and st in (State.OPTIONS, State.TLS_PENDING):
            self.state = State.CLOSED
            self._buf.clear()
            raise PeerProtocolError("server sent unsolicited data during negotiation")
        return NEED_DATA

    # --- transmission: requests -------------------------------------------------------

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
        if cmd == Cmd.DISC or cmd == Cmd.X_CLOSE:
            self._closing(cmd, st)
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & _COOKIE_MASK or 1
        if cmd != Cmd.DISC:
            self._inflight[cookie] = _Inflight(cmd, flags, offset, length, contexts=contexts)
        if not ext:
            return cookie, _REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if cmd == _WRITE:
            return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags | _PAYLOAD_LEN, cmd,
                                             cookie, offset, length)
        if contexts is not None:
            payload = wire.encode_block_status_payload(length, contexts)
            return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags | _PAYLOAD_LEN,
                                             cmd, cookie, offset, len(payload)) + payload
        return cookie, _EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset,
                                         length)

    def _closing(self, cmd: int, st: State) -> None:
        """NBD_CMD_DISC ends the transmission now; NBD_CMD_X_CLOSE once answered."""
        name = cmd_name(cmd)
        if cmd == Cmd.X_CLOSE and not self.x_close:
            raise LocalProtocolError("NBD_CMD_X_CLOSE without a negotiated NBD_OPT_X_CLOSE")
        if self._inflight or st is State.PAYLOAD:
            raise LocalProtocolError(f"{name} with requests in flight")
        self.state = State.CLOSED if cmd == Cmd.DISC else State.CLOSING

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


__all__ = [
    "MAX_META_CHUNK",
    "MAX_META_CHUNK_EXT",
    "MAX_OPTION_REPLY",
    "MAX_OPTION_TOTAL",
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
