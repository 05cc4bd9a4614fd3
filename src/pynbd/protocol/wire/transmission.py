"""Codecs of the transmission phase: requests (compact and extended), simple replies
and reply chunks (compact and extended headers, and the bodies both share)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynbd.protocol.constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    MAX_STRING,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ReplyType,
)
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.wire.formats import (
    BLOCK_STATUS_EXT_HEAD,
    CHUNK,
    CHUNK_OFFSET,
    CHUNK_SIZE,
    ERROR_BODY_MIN,
    ERROR_CHUNK,
    EXT_REPLY,
    EXT_REPLY_OFFSET,
    EXT_REPLY_SIZE,
    EXT_REQUEST,
    EXTENT,
    EXTENT_EXT,
    HOLE,
    OFFSET,
    REQUEST,
    SIMPLE_REPLY,
    U32,
    U64,
    _exact,
    _magic,
    truncate_utf8,
)

# --- transmission: requests ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RequestHeader:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

#: plain ints for the per-request encoders (packing an IntEnum takes a slower path)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)


def encode_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_request(data: bytes | bytearray | memoryview) -> RequestHeader:
    return _decode_request(data, REQUEST, REQUEST_MAGIC, "request")


def _decode_request(data: bytes | bytearray | memoryview, layout: struct.Struct,
                    expected: int, what: str) -> RequestHeader:
    _exact(data, layout.size, f"{what} header")
    magic, flags, cmd, cookie, offset, length = layout.unpack(data)
    if magic != expected:
        raise PeerProtocolError(f"bad {what} magic 0x{magic:08x} (expected 0x{expected:08x})")
    return RequestHeader(flags, cmd, cookie, offset, length)


def encode_ext_request(cmd: int, flags: int, cookie: int, offset: int, length: int) -> bytes:
    """32-byte request; ``length`` is the payload length with NBD_CMD_FLAG_PAYLOAD_LEN,
    else the 64-bit effect length."""
    return EXT_REQUEST.pack(EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def decode_ext_request(data: bytes | bytearray | memoryview) -> RequestHeader:
    return _decode_request(data, EXT_REQUEST, EXTENDED_REQUEST_MAGIC, "extended request")


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
    return CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                             8 + data_length, offset)


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
    return EXT_REPLY_OFFSET.pack(EXTENDED_REPLY_MAGIC, flags, _OFFSET_DATA, cookie,
                                 req_offset, 8 + data_length, offset)


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
