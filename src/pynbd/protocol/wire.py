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
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
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
# extended headers (NBD_OPT_EXTENDED_HEADERS)
EXT_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
EXT_REPLY = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, payload length
EXTENT_EXT = struct.Struct(">QQ")  # length, flags (NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
BLOCK_STATUS_EXT_HEAD = struct.Struct(">II")  # context id, descriptor count

GREETING_SIZE = GREETING.size  # 18
REQUEST_SIZE = REQUEST.size  # 28
SIMPLE_REPLY_SIZE = SIMPLE_REPLY.size  # 16
CHUNK_SIZE = CHUNK.size  # 20
EXT_REQUEST_SIZE = EXT_REQUEST.size  # 32
EXT_REPLY_SIZE = EXT_REPLY.size  # 32
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


def _error_body(error: int, message: str, offset: int | None) -> tuple[int, bytes]:
    raw = truncate_utf8(message, MAX_STRING)
    if offset is None:
        return ReplyType.ERROR, ERROR_CHUNK.pack(error, len(raw)) + raw
    return ReplyType.ERROR_OFFSET, ERROR_CHUNK.pack(error, len(raw)) + raw + OFFSET.pack(offset)


def encode_error_chunk(cookie: int, error: int, message: str, flags: int,
                       offset: int | None = None) -> bytes:
    rtype, body = _error_body(error, message, offset)
    return encode_chunk_header(cookie, rtype, flags, len(body)) + body


def encode_block_status(cookie: int, context_id: int, extents: Iterable[tuple[int, int]],
                        flags: int) -> bytes:
    body = [U32.pack(context_id)]
    body.extend(EXTENT.pack(length, state) for length, state in extents)
    payload = b"".join(body)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, flags, len(payload)) + payload


# --- extended headers ---------------------------------------------------------------

def encode_ext_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    """32-byte request; ``length`` is the payload length with NBD_CMD_FLAG_PAYLOAD_LEN,
    else the 64-bit effect length."""
    return EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def encode_ext_chunk_header(cookie: int, reply_type: int, flags: int, offset: int,
                            length: int) -> bytes:
    """32-byte reply header; ``offset`` is the request's offset (the spec: MUST match)."""
    return EXT_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, offset, length)


def encode_ext_offset_data_header(cookie: int, req_offset: int, offset: int,
                                  data_length: int, flags: int) -> bytes:
    """Extended OFFSET_DATA header + data offset; the data follows (sent separately)."""
    return encode_ext_chunk_header(cookie, ReplyType.OFFSET_DATA, flags, req_offset,
                                   8 + data_length) + OFFSET.pack(offset)


def encode_ext_offset_hole(cookie: int, req_offset: int, offset: int, length: int,
                           flags: int) -> bytes:
    """Extended OFFSET_HOLE: the hole size stays 32 bits (spec)."""
    return encode_ext_chunk_header(cookie, ReplyType.OFFSET_HOLE, flags, req_offset, 12) + \
        struct.pack(">QI", offset, length)


def encode_ext_error_chunk(cookie: int, req_offset: int, error: int, message: str,
                           flags: int, offset: int | None = None) -> bytes:
    rtype, body = _error_body(error, message, offset)
    return encode_ext_chunk_header(cookie, rtype, flags, req_offset, len(body)) + body


def encode_block_status_ext(cookie: int, req_offset: int, context_id: int,
                            extents: Sequence[tuple[int, int]], flags: int) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 64-bit extent lengths and status flags."""
    body = [BLOCK_STATUS_EXT_HEAD.pack(context_id, len(extents))]
    body.extend(EXTENT_EXT.pack(length, state) for length, state in extents)
    payload = b"".join(body)
    return encode_ext_chunk_header(cookie, ReplyType.BLOCK_STATUS_EXT, flags, req_offset,
                                   len(payload)) + payload


def encode_block_status_payload(effect_length: int, context_ids: Sequence[int]) -> bytes:
    """Payload of an NBD_CMD_BLOCK_STATUS with NBD_CMD_FLAG_PAYLOAD_LEN: the effect
    length, then the context ids to report (NBD_FLAG_BLOCK_STATUS_PAYLOAD)."""
    return U64.pack(effect_length) + b"".join(U32.pack(i) for i in context_ids)


def decode_block_status_payload(data: bytes | memoryview) -> tuple[int, list[int]]:
    if len(data) < 8 or (len(data) - 8) % 4:
        raise PeerProtocolError(
            f"block status payload of {len(data)} bytes (must be 8 + 4n)")
    (length,) = U64.unpack_from(data)
    n = (len(data) - 8) // 4
    return length, list(struct.unpack_from(f">{n}I", data, 8))


@dataclass(frozen=True, slots=True)
class RequestHeader:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def decode_ext_request(data: bytes | memoryview) -> RequestHeader:
    if len(data) != EXT_REQUEST.size:
        raise PeerProtocolError(
            f"extended request header of {len(data)} bytes (expected {EXT_REQUEST.size})")
    magic, flags, cmd, cookie, offset, length = EXT_REQUEST.unpack(data)
    if magic != EXTENDED_REQUEST_MAGIC:
        raise PeerProtocolError(f"bad extended request magic 0x{magic:08x} "
                                f"(expected 0x{EXTENDED_REQUEST_MAGIC:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)


def decode_request(data: bytes | memoryview) -> RequestHeader:
    if len(data) != REQUEST.size:
        raise PeerProtocolError(f"request header of {len(data)} bytes (expected {REQUEST.size})")
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise PeerProtocolError(f"bad request magic 0x{magic:08x} (expected 0x{REQUEST_MAGIC:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)
