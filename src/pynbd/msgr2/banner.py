"""The banner exchange that opens every msgr2 connection (both roles send one).

A banner is ``ceph v2\\n``, a le16 payload length, then the payload: the le64 msgr2
features the sender supports and the le64 features it requires. :func:`banner_bytes` is
ours; :class:`BannerReader` receives the peer's, one unit at a time (the fixed head, then a
payload of the announced length), and checks that the peer speaks msgr2.1.
"""

from __future__ import annotations

import struct

from pynbd.msgr2.constants import (
    BANNER_PAYLOAD_LEN,
    BANNER_PREFIX,
    MSGR2_REQUIRED,
    MSGR2_SUPPORTED,
    Msgr2Feature,
)
from pynbd.msgr2.errors import ProtocolError
from pynbd.msgr2.events import BannerReceived

_BANNER_HEAD = struct.Struct("<8sH")
_BANNER_BODY = struct.Struct("<QQ")
#: a banner payload longer than this is not a msgr2 peer's
MAX_BANNER_PAYLOAD = 4096


def banner_bytes() -> bytes:
    """Our banner: what we support and require."""
    return (_BANNER_HEAD.pack(BANNER_PREFIX, BANNER_PAYLOAD_LEN)
            + _BANNER_BODY.pack(MSGR2_SUPPORTED, MSGR2_REQUIRED))


class BannerReader:
    """Receives the peer's banner: receive into :meth:`buffer` and call :meth:`advance`,
    or :meth:`feed` bytes; both return the BannerReceived event once it is complete."""

    def __init__(self) -> None:
        self._buf = bytearray(_BANNER_HEAD.size)
        self._have = 0
        self._body = False
        #: every byte of the banner received so far (the auth signature covers them)
        self.raw = bytearray()

    def want(self) -> int:
        """How many bytes complete the unit being received."""
        return len(self._buf) - self._have

    def buffer(self) -> memoryview:
        """Exactly the rest of the current unit."""
        return memoryview(self._buf)[self._have :]

    def feed(self, data: memoryview) -> tuple[int, BannerReceived | None]:
        """Take what belongs to the current unit from ``data``: (bytes taken, event)."""
        n = min(len(data), self.want())
        self._buf[self._have : self._have + n] = data[:n]
        return n, self.advance(n)

    def advance(self, n: int) -> BannerReceived | None:
        """``n`` bytes were written into :meth:`buffer`."""
        self._have += n
        if self._have < len(self._buf):
            return None
        self.raw += self._buf
        if not self._body:
            self._on_head()
            return None
        supported, required = _BANNER_BODY.unpack_from(self._buf)
        if required & ~MSGR2_SUPPORTED:
            raise ProtocolError(f"peer requires msgr2 features 0x{required:x} we lack")
        if not supported & Msgr2Feature.REVISION_1:
            raise ProtocolError("peer speaks only msgr2.0 frames, which pynbd does not support")
        return BannerReceived(supported, required)

    def _on_head(self) -> None:
        prefix, length = _BANNER_HEAD.unpack(self._buf)
        if prefix != BANNER_PREFIX:
            if prefix.startswith(b"ceph v"):
                raise ProtocolError(f"peer speaks msgr1 ({bytes(prefix)!r}), not msgr2")
            raise ProtocolError(f"bad banner {bytes(prefix)!r}: not a msgr2 peer")
        if not BANNER_PAYLOAD_LEN <= length <= MAX_BANNER_PAYLOAD:
            raise ProtocolError(f"bad banner payload length {length}")
        self._buf = bytearray(length)
        self._have = 0
        self._body = True
