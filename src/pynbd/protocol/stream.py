"""What both NBD cores share: a receive buffer, an output queue, a payload that the
driver receives in place, and the negotiated flags.

A WRITE payload (server) or read data (client) is never copied through the parser: once
the core has announced ``payload_remaining`` bytes, the driver drains what is already
buffered with :meth:`ByteStream.payload_into` and reports bytes it received itself
(``recv_into`` straight into its buffer) with :meth:`ByteStream.payload_received`.
Bytes of a refused request's payload are dropped as they stream in
(:meth:`ByteStream._discard`), so a refusal never holds more than one receive.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from pynbd.protocol.errors import LocalProtocolError, PeerProtocolError


class ByteStream:
    """Base of :class:`~pynbd.protocol.server.ServerConnection` and
    :class:`~pynbd.protocol.client.ClientConnection`.

    A subclass names its state enum (``states=``), whose PAYLOAD, TRANSMISSION,
    CLOSED, TLS_PENDING and OPTIONS members are a pending payload, the phase that
    follows it, the end, STARTTLS agreed and the option phase; what its payload is and
    who its peer is (``payload=``, ``peer=``: for error messages).
    """

    _PAYLOAD: ClassVar[enum.Enum]
    _AFTER_PAYLOAD: ClassVar[enum.Enum]
    _CLOSED: ClassVar[enum.Enum]
    _PAYLOAD_NAME: ClassVar[str]
    _TLS_PENDING: ClassVar[enum.Enum]
    _OPTIONS: ClassVar[enum.Enum]
    #: who is at the other end, in error messages
    _PEER: ClassVar[str]

    state: enum.Enum
    # what was negotiated (both sides keep the same record)
    no_zeroes: bool
    tls_active: bool
    structured_replies: bool
    extended_headers: bool
    #: pynbd's safe-close extension (NBD_OPT_X_CLOSE) was agreed
    x_close: bool
    #: selected metadata contexts: id -> name
    meta_contexts: dict[int, str]
    #: the export SET_META_CONTEXT named
    _meta_export: str | None

    def __init_subclass__(cls, states: type[enum.Enum] | None = None,
                          payload: str = "payload", peer: str = "peer",
                          **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if states is not None:
            cls._PAYLOAD = states["PAYLOAD"]
            cls._AFTER_PAYLOAD = states["TRANSMISSION"]
            cls._CLOSED = states["CLOSED"]
            cls._TLS_PENDING = states["TLS_PENDING"]
            cls._OPTIONS = states["OPTIONS"]
            cls._PAYLOAD_NAME = payload
            cls._PEER = peer

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out: list[bytes] = []
        #: payload bytes the driver still has to receive (state is ``_PAYLOAD``)
        self.payload_remaining = 0
        self._discard_left = 0

    def _forget_options(self) -> None:
        """What the options agreed is gone (at the start, and when TLS comes up: the
        spec has both sides forget it)."""
        self.structured_replies = False
        self.extended_headers = False
        self.x_close = False
        self.meta_contexts = {}
        self._meta_export = None

    def tls_established(self) -> None:
        """The TLS handshake completed: every option state is forgotten."""
        if self.state is not self._TLS_PENDING:
            raise LocalProtocolError(f"tls_established() in state {self.state.value}")
        if self._buf:
            # bytes sent in the clear after STARTTLS and before the TLS handshake
            self.state = self._CLOSED
            raise PeerProtocolError(f"{self._PEER} sent plaintext data after "
                                    "NBD_OPT_STARTTLS")
        self.tls_active = True
        self._forget_options()
        self.state = self._OPTIONS

    @property
    def chunked(self) -> bool:
        """Replies are chunks (structured replies or extended headers negotiated)."""
        return self.structured_replies or self.extended_headers

    # --- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is self._CLOSED:
            return  # nothing is read after the end
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # --- output -----------------------------------------------------------------------

    def take_output(self) -> bytes:
        """Bytes produced while negotiating; send them in order."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    # --- payload received in place ---------------------------------------------------

    def _expect_payload(self, n: int) -> None:
        self.payload_remaining = n
        self.state = self._PAYLOAD

    def payload_into(self, dest: memoryview) -> int:
        """Move already-buffered payload bytes into ``dest``; returns how many."""
        if self.state is not self._PAYLOAD:
            raise LocalProtocolError(f"payload_into() in state {self.state.value}")
        buf = self._buf
        n = min(len(dest), len(buf), self.payload_remaining)
        if n:
            with memoryview(buf) as view:  # one copy (a slice of buf would be two)
                dest[:n] = view[:n]
            del buf[:n]
            self._consume_payload(n)
        return n

    def payload_received(self, n: int) -> None:
        """The driver received ``n`` payload bytes itself (e.g. ``recv_into``)."""
        if self.state is not self._PAYLOAD or n > self.payload_remaining or n < 0:
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
            self.state = self._AFTER_PAYLOAD

    def _pending_payload_error(self) -> LocalProtocolError:
        return LocalProtocolError(f"next_event() with {self.payload_remaining} "
                                  f"{self._PAYLOAD_NAME} bytes pending")

    # --- bytes to drop ----------------------------------------------------------------

    def _start_discard(self, n: int) -> None:
        self._discard_left = n

    def _discard(self) -> bool:
        """Drop buffered bytes that were announced for discarding; True once all of
        them are gone."""
        n = min(self._discard_left, len(self._buf))
        del self._buf[:n]
        self._discard_left -= n
        return not self._discard_left
