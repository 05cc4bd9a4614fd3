"""Codecs of the handshake and option haggling: greeting, client flags, options and
their replies, and the payloads they carry."""

from __future__ import annotations

from collections.abc import Sequence

from pynbd.protocol.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    OPTION_REPLY_MAGIC,
    Info,
)
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.wire.formats import (
    CLIENT_FLAGS,
    EXPORT_NAME_REPLY,
    EXPORT_NAME_REPLY_SIZE,
    GREETING,
    GREETING_SIZE,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    OPTION_REPLY,
    OPTION_REQUEST,
    U16,
    U32,
    U64,
    ZEROES_124,
    Reader,
    _exact,
    encode_string,
)

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


