"""The fixed layouts of NBD messages (structs, sizes, magics as bytes) and the
bounds-checked reader every decoder uses."""

from __future__ import annotations

import struct
from typing import Final

from pynbd.protocol.constants import EXTENDED_REQUEST_MAGIC, MAX_STRING, REQUEST_MAGIC
from pynbd.protocol.errors import PeerProtocolError


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by the state machines' next_event() when more bytes must arrive first
NEED_DATA: Final = _NeedData()

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_REQUEST = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
#: a chunk header and the data's offset in one pack (OFFSET_DATA before its data)
CHUNK_OFFSET = struct.Struct(">IHHQIQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
OFFSET = struct.Struct(">Q")
HOLE = struct.Struct(">QI")  # offset, length (OFFSET_HOLE body)
ERROR_CHUNK = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, flags
# extended headers (NBD_OPT_EXTENDED_HEADERS)
EXT_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXT_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, payload length
EXT_REPLY_OFFSET = struct.Struct(">IHHQQQQ")  # the same and the data's offset
EXTENT_EXT = struct.Struct(">QQ")  # length, flags (NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")  # context id, descriptor count

GREETING_SIZE = GREETING.size  # 18
REQUEST_SIZE = REQUEST.size  # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
CHUNK_SIZE = CHUNK.size  # 20
EXT_REQUEST_SIZE = EXT_REQUEST.size  # 32
EXT_REPLY_SIZE = EXT_REPLY.size  # 32
EXPORT_NAME_REPLY_SIZE = EXPORT_NAME_REPLY.size + 124  # without NBD_FLAG_NO_ZEROES
ZEROES_124 = bytes(124)
#: the four magic bytes that open a request / a reply, for checks on a partial header
REQUEST_MAGIC_BYTES = REQUEST_MAGIC.to_bytes(4, "big")
EXT_REQUEST_MAGIC_BYTES = EXTENDED_REQUEST_MAGIC.to_bytes(4, "big")
#: the smallest ERROR chunk body (error value, message length)
ERROR_BODY_MIN = ERROR_CHUNK.size


def _exact(data: bytes | bytearray | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise PeerProtocolError(f"{what} of {len(data)} bytes (expected {size})")


def _magic(found: int, expected: int, what: str) -> None:
    if found != expected:
        raise PeerProtocolError(f"bad {what} magic 0x{found:x} (expected 0x{expected:x})")


def truncate_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return U32.pack(len(raw)) + raw


def decode_string(data: bytes | bytearray | memoryview, limit: int = MAX_STRING) -> str:
    r = Reader(data, "string")
    text = r.string(limit)
    r.end()
    return text


class Reader:
    """Bounds-checked reads from an option payload; malformed input is the peer's fault."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self.data = bytes(data)
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.remaining():
            raise PeerProtocolError(
                f"{self.what}: field of {n} bytes overruns the {len(self.data)}-byte payload")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        value: int = U16.unpack(self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = U32.unpack(self.take(4))[0]
        return value

    def u64(self) -> int:
        value: int = U64.unpack(self.take(8))[0]
        return value

    def string(self, limit: int = MAX_STRING) -> str:
        n = self.u32()
        if n > limit:
            raise PeerProtocolError(f"{self.what}: string of {n} bytes exceeds limit {limit}")
        return self.text(self.take(n))

    def text(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PeerProtocolError(f"{self.what}: string is not UTF-8") from exc

    def rest_text(self) -> str:
        return self.text(self.take(self.remaining()))

    def end(self) -> None:
        if self.remaining():
            raise PeerProtocolError(f"{self.what}: {self.remaining()} trailing bytes")


