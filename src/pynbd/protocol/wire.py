"""NBD wire formats: fixed headers and payload encodings, both directions.

Pure functions over bytes; the client and server state machines build on them. Every
``encode_X`` has a ``decode_X`` that takes the encoder's bytes and gives back its
arguments (tests/protocol/test_protocol_wire.py checks the pairs). Decoders raise
:class:`PeerProtocolError` for malformed input and never allocate from an unvalidated
length. The state machines parse their hot paths with the structs below (``unpack_from``
on the receive buffer, no copy) and use the decoders for everything else.
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
    OLDSTYLE_MAGIC,
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
HOLE = struct.Struct(">QI")  # offset, length (OFFSET_HOLE body)
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


# --- handshake --------------------------------------------------------------------

def encode_greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def greeting_problem(head: bytes | bytearray | memoryview) -> str | None:
    """What is wrong with the first 8 or 16 bytes of a server greeting, if anything
    (so that a client can tell an oldstyle or non-NBD server from its first bytes)."""
    if len(head) >= 8:
        (magic,) = U64.unpack_from(head)
        if magic != NBDMAGIC:
            return f"bad greeting magic 0x{magic:016x} (not an NBD server?)"
    if len(head) >= 16:
        (second,) = U64.unpack_from(head, 8)
        if second == OLDSTYLE_MAGIC:
            return "server speaks oldstyle negotiation (unsupported; only fixed newstyle)"
        if second != IHAVEOPT:
            return f"bad greeting: 0x{second:016x} where IHAVEOPT was expected"
    return None


def decode_greeting(data: bytes | bytearray | memoryview) -> int:
    """The handshake flags of a newstyle greeting."""
    problem = greeting_problem(data[:16])
    if problem is not None:
        raise PeerProtocolError(problem)
    _exact(data, GREETING_SIZE, "greeting")
    flags: int = GREETING.unpack(data)[2]
    return flags


def encode_client_flags(flags: int) -> bytes:
    return CLIENT_FLAGS.pack(flags)


def decode_client_flags(data: bytes | bytearray | memoryview) -> int:
    _exact(data, CLIENT_FLAGS.size, "client flags")
    flags: int = CLIENT_FLAGS.unpack(data)[0]
    return flags


def encode_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_REQUEST.pack(IHAVEOPT, option, len(data)) + data


def decode_option_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(option, data length) of an option request header."""
    magic, option, length = OPTION_REQUEST.unpack_from(data)
    if magic != IHAVEOPT:
        raise PeerProtocolError(f"bad option magic 0x{magic:016x} (expected IHAVEOPT)")
    return option, length


def decode_option(data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """(option, data) of a whole option request."""
    if len(data) < OPTION_REQUEST.size:
        raise PeerProtocolError(f"option request of {len(data)} bytes")
    option, length = decode_option_header(data)
    _exact(data, OPTION_REQUEST.size + length, "option request")
    return option, bytes(data[OPTION_REQUEST.size:])


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def decode_option_reply_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(option, reply type, data length) of an option reply header."""
    magic, option, reply, length = OPTION_REPLY.unpack_from(data)
    if magic != OPTION_REPLY_MAGIC:
        raise PeerProtocolError(f"bad option reply magic 0x{magic:016x}")
    return option, reply, length


def decode_option_reply(data: bytes | bytearray | memoryview) -> tuple[int, int, bytes]:
    """(option, reply type, data) of a whole option reply."""
    if len(data) < OPTION_REPLY.size:
        raise PeerProtocolError(f"option reply of {len(data)} bytes")
    option, reply, length = decode_option_reply_header(data)
    _exact(data, OPTION_REPLY.size + length, "option reply")
    return option, reply, bytes(data[OPTION_REPLY.size:])


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    head = EXPORT_NAME_REPLY.pack(size, flags)
    return head if no_zeroes else head + ZEROES_124


def decode_export_name_reply(data: bytes | bytearray | memoryview) -> tuple[int, int, bool]:
    """(size, transmission flags, no_zeroes) of an NBD_OPT_EXPORT_NAME reply: 10 bytes
    (NBD_FLAG_C_NO_ZEROES) or 134 (the zeroes are not checked, as the spec says)."""
    if len(data) not in (EXPORT_NAME_REPLY.size, EXPORT_NAME_REPLY_SIZE):
        raise PeerProtocolError(f"NBD_OPT_EXPORT_NAME reply of {len(data)} bytes")
    size, flags = EXPORT_NAME_REPLY.unpack_from(data)
    return size, flags, len(data) == EXPORT_NAME_REPLY.size


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


def info_type(data: bytes | bytearray | memoryview) -> int:
    """The NBD_INFO_* type that opens an NBD_REP_INFO payload."""
    return Reader(data, "NBD_REP_INFO").u16()


def decode_info_export(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(size, transmission flags) of NBD_INFO_EXPORT."""
    if len(data) != INFO_EXPORT.size or info_type(data) != Info.EXPORT:
        raise PeerProtocolError("NBD_INFO_EXPORT must be 12 bytes")
    _, size, flags = INFO_EXPORT.unpack(data)
    return size, flags


def encode_info_name(name: str) -> bytes:
    return U16.pack(Info.NAME) + name.encode("utf-8")


def decode_info_name(data: bytes | bytearray | memoryview) -> str:
    return _info_text(data, Info.NAME, "NBD_INFO_NAME")


def encode_info_description(text: str) -> bytes:
    return U16.pack(Info.DESCRIPTION) + text.encode("utf-8")


def decode_info_description(data: bytes | bytearray | memoryview) -> str:
    return _info_text(data, Info.DESCRIPTION, "NBD_INFO_DESCRIPTION")


def _info_text(data: bytes | bytearray | memoryview, kind: Info, what: str) -> str:
    r = Reader(data, what)
    if r.u16() != kind:
        raise PeerProtocolError(f"{what}: wrong info type")
    return r.rest_text()


def encode_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def decode_info_block_size(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) of NBD_INFO_BLOCK_SIZE (values not judged here)."""
    if len(data) != INFO_BLOCK_SIZE.size or info_type(data) != Info.BLOCK_SIZE:
        raise PeerProtocolError("NBD_INFO_BLOCK_SIZE must be 14 bytes")
    _, minimum, preferred, maximum = INFO_BLOCK_SIZE.unpack(data)
    return minimum, preferred, maximum


def encode_rep_server(name: str, description: str = "") -> bytes:
    return encode_string(name) + description.encode("utf-8")


def decode_rep_server(data: bytes | bytearray | memoryview) -> tuple[str, str]:
    """(name, description) of an NBD_REP_SERVER reply."""
    r = Reader(data, "NBD_REP_SERVER")
    name = r.string()
    return name, r.rest_text()


def encode_rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode("utf-8")


def decode_rep_meta_context(data: bytes | bytearray | memoryview) -> tuple[int, str]:
    """(context id, name) of an NBD_REP_META_CONTEXT reply."""
    r = Reader(data, "NBD_REP_META_CONTEXT")
    context_id = r.u32()
    if r.remaining() > MAX_STRING:
        raise PeerProtocolError("meta context name too long")
    return context_id, r.rest_text()


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


def decode_info_request(data: bytes | bytearray | memoryview) -> tuple[str, list[int]]:
    r = Reader(data, "NBD_OPT_INFO/GO data")
    name = r.string()
    count = r.u16()
    if count * 2 != r.remaining():
        raise PeerProtocolError(
            f"NBD_OPT_INFO/GO data: {count} info requests need {count * 2} bytes, "
            f"{r.remaining()} present")
    return name, [r.u16() for _ in range(count)]


def decode_meta_context_request(data: bytes | bytearray | memoryview,
                                max_queries: int = 1024) -> tuple[str, list[str]]:
    r = Reader(data, "meta context option data")
    name = r.string()
    count = r.u32()
    if count > max_queries or count * 4 > r.remaining():
        raise PeerProtocolError(f"meta context option data: {count} queries do not fit")
    queries = [r.string() for _ in range(count)]
    r.end()
    return name, queries


# --- transmission: requests ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestHeader:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int


def encode_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(data: bytes | bytearray | memoryview) -> RequestHeader:
    _exact(data, REQUEST.size, "request header")
    magic, flags, cmd, cookie, offset, length = REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise PeerProtocolError(f"bad request magic 0x{magic:08x} "
                                f"(expected 0x{REQUEST_MAGIC:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)


def encode_ext_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    """32-byte request; ``length`` is the payload length with NBD_CMD_FLAG_PAYLOAD_LEN,
    else the 64-bit effect length."""
    return EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_ext_request(data: bytes | bytearray | memoryview) -> RequestHeader:
    _exact(data, EXT_REQUEST.size, "extended request header")
    magic, flags, cmd, cookie, offset, length = EXT_REQUEST.unpack(data)
    if magic != EXTENDED_REQUEST_MAGIC:
        raise PeerProtocolError(f"bad extended request magic 0x{magic:08x} "
                                f"(expected 0x{EXTENDED_REQUEST_MAGIC:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)


def encode_block_status_payload(effect_length: int, context_ids: Sequence[int]) -> bytes:
    """Payload of an NBD_CMD_BLOCK_STATUS with NBD_CMD_FLAG_PAYLOAD_LEN: the effect
    length, then the context ids to report (NBD_FLAG_BLOCK_STATUS_PAYLOAD)."""
    return U64.pack(effect_length) + b"".join(U32.pack(i) for i in context_ids)


def decode_block_status_payload(data: bytes | bytearray | memoryview) -> tuple[int, list[int]]:
    if len(data) < 8 or (len(data) - 8) % 4:
        raise PeerProtocolError(
            f"block status payload of {len(data)} bytes (must be 8 + 4n)")
    (length,) = U64.unpack_from(data)
    n = (len(data) - 8) // 4
    return length, list(struct.unpack_from(f">{n}I", data, 8))


# --- transmission: replies ----------------------------------------------------------
#
# A chunk is a header (20 bytes compact, 32 extended) and a body; the body decoders
# below are shared by the compact and extended forms and by the client core.

def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def decode_simple_reply(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(cookie, error) of a simple reply."""
    _exact(data, SIMPLE_REPLY.size, "simple reply")
    magic, error, cookie = SIMPLE_REPLY.unpack(data)
    _magic(magic, SIMPLE_REPLY_MAGIC, "simple reply")
    return cookie, error


def encode_chunk_header(cookie: int, reply_type: int, flags: int, length: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def decode_chunk_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(cookie, reply type, flags, body length) of a structured reply chunk header."""
    magic, flags, reply_type, cookie, length = CHUNK.unpack_from(data)
    _magic(magic, STRUCTURED_REPLY_MAGIC, "structured reply")
    return cookie, reply_type, flags, length


def encode_ext_chunk_header(cookie: int, reply_type: int, flags: int, offset: int,
                            length: int) -> bytes:
    """32-byte reply header; ``offset`` is the request's offset (the spec: MUST match)."""
    return EXT_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, offset, length)


def decode_ext_chunk_header(data: bytes | bytearray | memoryview
                            ) -> tuple[int, int, int, int, int]:
    """(cookie, reply type, flags, request offset, body length) of an extended header."""
    magic, flags, reply_type, cookie, offset, length = EXT_REPLY.unpack_from(data)
    _magic(magic, EXTENDED_REPLY_MAGIC, "extended reply")
    return cookie, reply_type, flags, offset, length


def _chunk(data: bytes | bytearray | memoryview, extended: bool, reply_type: int
           ) -> tuple[int, int, int, memoryview]:
    """(cookie, flags, request offset (0 compact), body) of a whole chunk of a type."""
    if extended:
        cookie, rtype, flags, req_offset, length = decode_ext_chunk_header(data)
        size = EXT_REPLY_SIZE
    else:
        cookie, rtype, flags, length = decode_chunk_header(data)
        req_offset, size = 0, CHUNK_SIZE
    if rtype != reply_type:
        raise PeerProtocolError(f"chunk type {rtype} where {reply_type} was expected")
    _exact(data, size + length, "reply chunk")
    return cookie, flags, req_offset, memoryview(data)[size:]


#: the smallest OFFSET_DATA body: the offset and at least one byte of data
OFFSET_DATA_MIN = OFFSET.size + 1


def decode_offset_data_length(length: int) -> int:
    """The data length an OFFSET_DATA chunk of body ``length`` carries."""
    if length < OFFSET_DATA_MIN:
        raise PeerProtocolError(f"OFFSET_DATA chunk of length {length} (minimum 9)")
    return length - OFFSET.size


def encode_offset_data_header(cookie: int, offset: int, data_length: int, flags: int) -> bytes:
    """Chunk header + offset; the data itself follows (sent separately, zero-copy)."""
    return encode_chunk_header(cookie, ReplyType.OFFSET_DATA, flags, 8 + data_length) + \
        OFFSET.pack(offset)


def decode_offset_data_header(data: bytes | bytearray | memoryview
                              ) -> tuple[int, int, int, int]:
    """(cookie, offset, data length, flags) of an OFFSET_DATA header and offset."""
    cookie, rtype, flags, length = decode_chunk_header(data)
    if rtype != ReplyType.OFFSET_DATA:
        raise PeerProtocolError(f"chunk type {rtype} where OFFSET_DATA was expected")
    _exact(data, CHUNK_SIZE + OFFSET.size, "OFFSET_DATA header")
    (offset,) = OFFSET.unpack_from(data, CHUNK_SIZE)
    return cookie, offset, decode_offset_data_length(length), flags


def encode_ext_offset_data_header(cookie: int, req_offset: int, offset: int,
                                  data_length: int, flags: int) -> bytes:
    """Extended OFFSET_DATA header + data offset; the data follows (sent separately)."""
    return encode_ext_chunk_header(cookie, ReplyType.OFFSET_DATA, flags, req_offset,
                                   8 + data_length) + OFFSET.pack(offset)


def decode_ext_offset_data_header(data: bytes | bytearray | memoryview
                                  ) -> tuple[int, int, int, int, int]:
    """(cookie, request offset, offset, data length, flags) of an extended OFFSET_DATA
    header and offset."""
    cookie, rtype, flags, req_offset, length = decode_ext_chunk_header(data)
    if rtype != ReplyType.OFFSET_DATA:
        raise PeerProtocolError(f"chunk type {rtype} where OFFSET_DATA was expected")
    _exact(data, EXT_REPLY_SIZE + OFFSET.size, "OFFSET_DATA header")
    (offset,) = OFFSET.unpack_from(data, EXT_REPLY_SIZE)
    return cookie, req_offset, offset, decode_offset_data_length(length), flags


def decode_hole(body: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(offset, length) of an OFFSET_HOLE body."""
    if len(body) != HOLE.size:
        raise PeerProtocolError(f"OFFSET_HOLE chunk of length {len(body)} (must be 12)")
    offset, length = HOLE.unpack(body)
    if length == 0:
        raise PeerProtocolError("OFFSET_HOLE chunk with zero hole size")
    return offset, length


def encode_offset_hole(cookie: int, offset: int, length: int, flags: int) -> bytes:
    return encode_chunk_header(cookie, ReplyType.OFFSET_HOLE, flags, HOLE.size) + \
        HOLE.pack(offset, length)


def decode_offset_hole(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(cookie, offset, length, flags) of an OFFSET_HOLE chunk."""
    cookie, flags, _, body = _chunk(data, False, ReplyType.OFFSET_HOLE)
    return (cookie, *decode_hole(body), flags)


def encode_ext_offset_hole(cookie: int, req_offset: int, offset: int, length: int,
                           flags: int) -> bytes:
    """Extended OFFSET_HOLE: the hole size stays 32 bits (spec)."""
    return encode_ext_chunk_header(cookie, ReplyType.OFFSET_HOLE, flags, req_offset,
                                   HOLE.size) + HOLE.pack(offset, length)


def decode_ext_offset_hole(data: bytes | bytearray | memoryview
                           ) -> tuple[int, int, int, int, int]:
    """(cookie, request offset, offset, length, flags) of an extended OFFSET_HOLE."""
    cookie, flags, req_offset, body = _chunk(data, True, ReplyType.OFFSET_HOLE)
    return (cookie, req_offset, *decode_hole(body), flags)


def _error_body(error: int, message: str, offset: int | None) -> tuple[int, bytes]:
    raw = truncate_utf8(message, MAX_STRING)
    if offset is None:
        return ReplyType.ERROR, ERROR_CHUNK.pack(error, len(raw)) + raw
    return ReplyType.ERROR_OFFSET, ERROR_CHUNK.pack(error, len(raw)) + raw + OFFSET.pack(offset)


def decode_error_body(reply_type: int, body: bytes | bytearray | memoryview
                      ) -> tuple[int, str, int | None]:
    """(error, message, offset or None) of an ERROR / ERROR_OFFSET body (an unknown
    error type is read as ERROR: its body starts the same way)."""
    length = len(body)
    if length < ERROR_BODY_MIN:
        raise PeerProtocolError(f"error chunk of length {length} (minimum 6)")
    error, mlen = ERROR_CHUNK.unpack_from(body)
    if ERROR_BODY_MIN + mlen > length:
        raise PeerProtocolError("error chunk message overruns the chunk")
    message = bytes(body[6:6 + mlen]).decode("utf-8", "replace")
    offset: int | None = None
    if reply_type == ReplyType.ERROR_OFFSET:
        if length != ERROR_BODY_MIN + mlen + OFFSET.size:
            raise PeerProtocolError("ERROR_OFFSET chunk has the wrong length")
        (offset,) = OFFSET.unpack_from(body, 6 + mlen)
    elif reply_type == ReplyType.ERROR and length != ERROR_BODY_MIN + mlen:
        raise PeerProtocolError("ERROR chunk has the wrong length")
    if error == 0:
        raise PeerProtocolError("error chunk with error value 0")
    return error, message, offset


def encode_error_chunk(cookie: int, error: int, message: str, flags: int,
                       offset: int | None = None) -> bytes:
    rtype, body = _error_body(error, message, offset)
    return encode_chunk_header(cookie, rtype, flags, len(body)) + body


def decode_error_chunk(data: bytes | bytearray | memoryview
                       ) -> tuple[int, int, str, int, int | None]:
    """(cookie, error, message, flags, offset) of an ERROR / ERROR_OFFSET chunk."""
    cookie, rtype, flags, _ = decode_chunk_header(data)
    _, _, _, body = _chunk(data, False, rtype)
    error, message, offset = decode_error_body(rtype, body)
    return cookie, error, message, flags, offset


def encode_ext_error_chunk(cookie: int, req_offset: int, error: int, message: str,
                           flags: int, offset: int | None = None) -> bytes:
    rtype, body = _error_body(error, message, offset)
    return encode_ext_chunk_header(cookie, rtype, flags, req_offset, len(body)) + body


def decode_ext_error_chunk(data: bytes | bytearray | memoryview
                           ) -> tuple[int, int, int, str, int, int | None]:
    """(cookie, request offset, error, message, flags, offset) of an extended error."""
    cookie, rtype, flags, req_offset, _ = decode_ext_chunk_header(data)
    _, _, _, body = _chunk(data, True, rtype)
    error, message, offset = decode_error_body(rtype, body)
    return cookie, req_offset, error, message, flags, offset


def decode_extents(body: bytes | bytearray | memoryview, extended: bool
                   ) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(context id, (length, flags) pairs) of a BLOCK_STATUS or BLOCK_STATUS_EXT body
    whose length was checked (compact: 4 + 8n; extended: 8 + 16n)."""
    if extended:
        ctx, count = BLOCK_STATUS_EXT_HEAD.unpack_from(body)
        n = (len(body) - 8) // 16
        if count != n:
            raise PeerProtocolError(
                f"BLOCK_STATUS_EXT chunk says {count} descriptors, carries {n}")
        vals = struct.unpack_from(f">{2 * n}Q", body, 8)
    else:
        (ctx,) = U32.unpack_from(body)
        n = (len(body) - 4) // 8
        vals = struct.unpack_from(f">{2 * n}I", body, 4)
    return ctx, tuple(zip(vals[0::2], vals[1::2], strict=True))


def encode_block_status(cookie: int, context_id: int, extents: Iterable[tuple[int, int]],
                        flags: int) -> bytes:
    body = [U32.pack(context_id)]
    body.extend(EXTENT.pack(length, state) for length, state in extents)
    payload = b"".join(body)
    return encode_chunk_header(cookie, ReplyType.BLOCK_STATUS, flags, len(payload)) + payload


def decode_block_status(data: bytes | bytearray | memoryview
                        ) -> tuple[int, int, list[tuple[int, int]], int]:
    """(cookie, context id, extents, flags) of a BLOCK_STATUS chunk."""
    cookie, flags, _, body = _chunk(data, False, ReplyType.BLOCK_STATUS)
    if len(body) < 4 or (len(body) - 4) % 8:
        raise PeerProtocolError(f"BLOCK_STATUS chunk of invalid length {len(body)}")
    ctx, extents = decode_extents(body, False)
    return cookie, ctx, list(extents), flags


def encode_block_status_ext(cookie: int, req_offset: int, context_id: int,
                            extents: Sequence[tuple[int, int]], flags: int) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS_EXT: 64-bit extent lengths and status flags."""
    body = [BLOCK_STATUS_EXT_HEAD.pack(context_id, len(extents))]
    body.extend(EXTENT_EXT.pack(length, state) for length, state in extents)
    payload = b"".join(body)
    return encode_ext_chunk_header(cookie, ReplyType.BLOCK_STATUS_EXT, flags, req_offset,
                                   len(payload)) + payload


def decode_block_status_ext(data: bytes | bytearray | memoryview
                            ) -> tuple[int, int, int, list[tuple[int, int]], int]:
    """(cookie, request offset, context id, extents, flags) of BLOCK_STATUS_EXT."""
    cookie, flags, req_offset, body = _chunk(data, True, ReplyType.BLOCK_STATUS_EXT)
    if len(body) < 8 or (len(body) - 8) % 16:
        raise PeerProtocolError(f"BLOCK_STATUS_EXT chunk of invalid length {len(body)}")
    ctx, extents = decode_extents(body, True)
    return cookie, req_offset, ctx, list(extents), flags
