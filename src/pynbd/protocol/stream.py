"""The byte plumbing both NBD cores share: a receive buffer, an output queue, and a
payload that the driver receives in place.

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

from pynbd.protocol.errors import LocalProtocolError


class ByteStream:
    """Base of :class:`~pynbd.protocol.server.ServerConnection` and
    :class:`~pynbd.protocol.client.ClientConnection`.

    A subclass names the states its ``state`` takes for a pending payload, for the
    phase that follows it and for a closed connection.
    """

    _PAYLOAD: ClassVar[enum.Enum]
    _AFTER_PAYLOAD: ClassVar[enum.Enum]
    _CLOSED: ClassVar[enum.Enum]
    #: what the payload is, in error messages
    _PAYLOAD_NAME: ClassVar[str] = "payload"

    state: enum.Enum

    def __init__(self) -> None:
        self._buf = bytearray()
        self._out: list[bytes] = []
        #: payload bytes the driver still has to receive (state is ``_PAYLOAD``)
        self.payload_remaining = 0
        self._discard_left = 0

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
        n = min(len(dest), len(self._buf), self.payload_remaining)
        if n:
            dest[:n] = self._buf[:n]
            del self._buf[:n]
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
