"""NBD wire formats: fixed headers and payload encodings, both directions.

Pure functions over bytes; the client and server state machines build on them. Decoders
raise :class:`PeerProtocolError` for malformed input and never allocate from an
unvalidated length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from pynbd.protocol.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyType,
)
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
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")  # info type, size, flags
INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
OFFSET = struct.Struct(">Q")
ERROR_CHUNK = struct.Struct(">IH")  # error, message length
EXTENT = struct.Struct(">II")  # length, flags

GREETING_SIZE = GREETING.size  # 18
REQUEST_SIZE = REQUEST.size  # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
CHUNK_SIZE = CHUNK.size  # 20
ZEROES_124 = bytes(124)


# --- handshake --------------------------------------------------------------------

def encode_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_REQUEST.pack(IHAVEOPT, option, len(data)) + data


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + ZEROES_124


def truncate_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


def encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return U32.pack(len(raw)) + raw


def encode_info_request(name: str, infos: Sequence[int]) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    parts = [encode_string(name), U16.pack(len(infos))]
    parts.extend(U16.pack(i) for i in infos)
    return b"".join(parts)


def encode_meta_context_request(name: str, queries: Sequence[str]) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    parts = [encode_string(name), U32.pack(len(queries))]
    parts.extend(encode_string(q) for q in queries)
    return b"".join(parts)


def encode_info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def encode_info_name(name: str) -> bytes:
    return U16.pack(Info.NAME) + name.encode("utf-8")


def encode_info_description(text: str) -> bytes:
    return U16.pack(Info.DESCRIPTION) + text.encode("utf-8")


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def encode_rep_server(name: str, description: str = "") -> bytes:
    return encode_string(name) + description.encode("utf-8")


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode("utf-8")


class Reader:
    """Bounds-checked reads from an option payload; malformed input is the peer's fault."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes | memoryview, what: str) -> None:
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


def decode_info_request(data: bytes | memoryview) -> tuple[str, list[int]]:
    r = Reader(data, "NBD_OPT_INFO/GO data")
    name = r.string()
    count = r.u16()
    if count * 2 != r.remaining():
        raise PeerProtocolError(
            f"NBD_OPT_INFO/GO data: {count} info requests need {count * 2} bytes, "
            f"{r.remaining()} present")
    return name, [r.u16() for _ in range(count)]


def decode_meta_context_request(data: bytes | memoryview,
                                max_queries: int = 1024) -> tuple[str, list[str]]:
    r = Reader(data, "meta context option data")
    name = r.string()
    count = r.u32()
    if count > max_queries or count * 4 > r.remaining():
        raise PeerProtocolError(f"meta context option data: {count} queries do not fit")
    queries = [r.string() for _ in range(count)]
    r.end()
    return name, queries


# --- transmission -----------------------------------------------------------------

def encode_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk_header(cookie: int, reply_type: int, flags: int, length: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def encode_offset_data_header(cookie: int, offset: int, data_length: int, flags: int) -> bytes:
    """Chunk header + offset; the data itself follows (sent separately, zero-copy)."""
    return encode_chunk_header(cookie, ReplyType.OFFSET_DATA, flags, 8 + data_length) + \
        OFFSET.pack(offset)


def encode_offset_hole(cookie: int, offset: int, length: int, flags: int) -> bytes:
    return encode_chunk_header(cookie, ReplyType.OFFSET_HOLE, flags, 12) + \
        struct.pack(">QI", offset, length)


def encode_error_chunk(cookie: int, error: int, message: str, flags: int,
                       offset: int | None = None) -> bytes:
    raw = truncate_utf8(message, MAX_STRING)
    if offset is None:
        body = ERROR_CHUNK.pack(error, len(raw)) + raw
        rtype = ReplyType.ERROR
    else:
        body = ERROR_CHUNK.pack(error, len(raw)) + raw + OFFSET.pack(offset)
        rtype = ReplyType.ERROR_OFFSET
    return encode_chunk_header(cookie, rtype, flags, len(body)) + body


def encode_block_status(cookie: int, context_id: int, extents: Iterable[tuple[int, int]],
                        flags: int) -> bytes:
    body = [U32.pack(context_id)]
    body.extend(EXTENT.pack(length, state) for length, state in extents)
    payload = b"".join(body)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, flags, len(payload)) + payload


@dataclass(frozen=True, slots=True)
class RequestHeader:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def decode_request(data: bytes | memoryview) -> RequestHeader:
    if len(data) != REQUEST.size:
        raise PeerProtocolError(f"request header of {len(data)} bytes (expected {REQUEST.size})")
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise PeerProtocolError(f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)
