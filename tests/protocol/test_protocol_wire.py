"""Byte-exact tests of the NBD wire codecs (pynbd.protocol.wire).

Expected bytes are spelled out as hex taken from the spec (doc/proto.md), never built
with the code under test, so a wrong constant or field order cannot cancel itself out.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.errors import PeerProtocolError

H = bytes.fromhex

NBDMAGIC = H("4e42444d41474943")
IHAVEOPT = H("49484156454f5054")
OPT_REPLY_MAGIC = H("0003e889045565a9")
REQUEST_MAGIC = H("25609513")
SIMPLE_MAGIC = H("67446698")
CHUNK_MAGIC = H("668e33ef")

COOKIE = 0x0102030405060708
COOKIE_B = H("0102030405060708")

PROPS = settings(max_examples=200, deadline=None)

# --- encoders: (callable, expected bytes) -------------------------------------------

ENCODE_CASES = [
    pytest.param(lambda: wire.encode_greeting(3), NBDMAGIC + IHAVEOPT + H("0003"),
                 id="greeting"),
    pytest.param(lambda: wire.encode_option(7), IHAVEOPT + H("00000007 00000000"),
                 id="option-no-data"),
    pytest.param(lambda: wire.encode_option(0x4E42A001, b"ab"),
                 IHAVEOPT + H("4e42a001 00000002") + b"ab", id="option-x-close-with-data"),
    pytest.param(lambda: wire.encode_option_reply(3, 1),
                 OPT_REPLY_MAGIC + H("00000003 00000001 00000000"),
                 id="option-reply-ack"),
    pytest.param(lambda: wire.encode_option_reply(9, 0x80000001, b"no"),
                 OPT_REPLY_MAGIC + H("00000009 80000001 00000002") + b"no",
                 id="option-reply-err-unsup"),
    pytest.param(lambda: wire.encode_export_name_reply(0x100000, 0x010D, True),
                 H("0000000000100000 010d"), id="export-name-reply-no-zeroes"),
    pytest.param(lambda: wire.encode_export_name_reply(0x100000, 0x010D, False),
                 H("0000000000100000 010d") + bytes(124), id="export-name-reply-zeroes"),
    pytest.param(lambda: wire.encode_string("é"), H("00000002 c3a9"), id="string-utf8"),
    pytest.param(lambda: wire.encode_info_request("ab", [1, 3]),
                 H("00000002") + b"ab" + H("0002 0001 0003"), id="info-request"),
    pytest.param(lambda: wire.encode_info_request("", []), H("00000000 0000"),
                 id="info-request-empty"),
    pytest.param(lambda: wire.encode_meta_context_request("d", ["base:", "qemu:x"]),
                 H("00000001") + b"d" + H("00000002") + H("00000005") + b"base:"
                 + H("00000006") + b"qemu:x", id="meta-context-request"),
    pytest.param(lambda: wire.encode_meta_context_request("", []), H("00000000 00000000"),
                 id="meta-context-request-empty"),
    pytest.param(lambda: wire.encode_info_export(0x123456789A, 0x0003),
                 H("0000 000000123456789a 0003"), id="info-export"),
    pytest.param(lambda: wire.encode_info_name("disk"), H("0001") + b"disk", id="info-name"),
    pytest.param(lambda: wire.encode_info_description("A disk"), H("0002") + b"A disk",
                 id="info-description"),
    pytest.param(lambda: wire.encode_info_block_size(1, 4096, 32 << 20),
                 H("0003 00000001 00001000 02000000"), id="info-block-size"),
    pytest.param(lambda: wire.encode_rep_server("disk", "desc"),
                 H("00000004") + b"disk" + b"desc", id="rep-server"),
    pytest.param(lambda: wire.encode_rep_server("", ""), H("00000000"), id="rep-server-empty"),
    pytest.param(lambda: wire.encode_rep_meta_context(1, "base:allocation"),
                 H("00000001") + b"base:allocation", id="rep-meta-context"),
    pytest.param(lambda: wire.encode_request(1, 0x0001, COOKIE, 0x1000, 0x200),
                 REQUEST_MAGIC + H("0001 0001") + COOKIE_B + H("0000000000001000 00000200"),
                 id="request-write-fua"),
    pytest.param(lambda: wire.encode_request(0x7F01, 0, 0, 0, 0),
                 REQUEST_MAGIC + H("0000 7f01") + bytes(8 + 8 + 4), id="request-x-close"),
    pytest.param(lambda: wire.encode_simple_reply(COOKIE), SIMPLE_MAGIC + H("00000000") + COOKIE_B,
                 id="simple-reply-ok"),
    pytest.param(lambda: wire.encode_simple_reply(COOKIE, 28),
                 SIMPLE_MAGIC + H("0000001c") + COOKIE_B, id="simple-reply-enospc"),
    pytest.param(lambda: wire.encode_chunk_header(COOKIE, 0, 1, 0),
                 CHUNK_MAGIC + H("0001 0000") + COOKIE_B + H("00000000"), id="chunk-none-done"),
    pytest.param(lambda: wire.encode_offset_data_header(COOKIE, 0x2000, 0x1000, 0),
                 CHUNK_MAGIC + H("0000 0001") + COOKIE_B + H("00001008") + H("0000000000002000"),
                 id="offset-data-header"),
    pytest.param(lambda: wire.encode_offset_data_header(COOKIE, 0, 1, 1),
                 CHUNK_MAGIC + H("0001 0001") + COOKIE_B + H("00000009") + bytes(8),
                 id="offset-data-header-done"),
    pytest.param(lambda: wire.encode_offset_hole(COOKIE, 0x10000, 0x3000, 1),
                 CHUNK_MAGIC + H("0001 0002") + COOKIE_B + H("0000000c")
                 + H("0000000000010000 00003000"), id="offset-hole"),
    pytest.param(lambda: wire.encode_error_chunk(COOKIE, 22, "bad", 1),
                 CHUNK_MAGIC + H("0001 8001") + COOKIE_B + H("00000009")
                 + H("00000016 0003") + b"bad", id="error-chunk"),
    pytest.param(lambda: wire.encode_error_chunk(COOKIE, 5, "", 1),
                 CHUNK_MAGIC + H("0001 8001") + COOKIE_B + H("00000006") + H("00000005 0000"),
                 id="error-chunk-no-message"),
    pytest.param(lambda: wire.encode_error_chunk(COOKIE, 5, "io", 0, offset=0x200),
                 CHUNK_MAGIC + H("0000 8002") + COOKIE_B + H("00000010")
                 + H("00000005 0002") + b"io" + H("0000000000000200"), id="error-offset-chunk"),
    pytest.param(lambda: wire.encode_block_status(COOKIE, 1, [(0x1000, 0), (0x2000, 3)], 1),
                 CHUNK_MAGIC + H("0001 0005") + COOKIE_B + H("00000014")
                 + H("00000001") + H("00001000 00000000") + H("00002000 00000003"),
                 id="block-status"),
]


@pytest.mark.parametrize(("encode", "expected"), ENCODE_CASES)
def test_encoders_byte_exact(encode, expected):
    assert encode() == expected


def test_struct_sizes_match_spec():
    assert wire.GREETING_SIZE == 18
    assert wire.REQUEST_SIZE == 28
    assert wire.SIMPLE_REPLY_SIZE == 16
    assert wire.CHUNK_SIZE == 20
    assert wire.OPTION_REQUEST.size == 16
    assert wire.OPTION_REPLY.size == 20
    assert wire.EXPORT_NAME_REPLY.size == 10


def test_error_chunk_message_is_capped_at_4096_bytes():
    out = wire.encode_error_chunk(COOKIE, 5, "x" * 5000, 1)
    (length,) = struct.unpack(">I", out[16:20])
    msg_len = struct.unpack(">H", out[24:26])[0]
    assert msg_len == 4096
    assert length == 6 + 4096 == len(out) - 20


def test_error_chunk_truncation_keeps_utf8_valid():
    # 4095 ASCII bytes then a 2-byte character: a byte cut would leave half a character
    out = wire.encode_error_chunk(COOKIE, 5, "x" * 4095 + "é" * 10, 1)
    msg_len = struct.unpack(">H", out[24:26])[0]
    assert msg_len <= 4096
    out[26:26 + msg_len].decode("utf-8")
    assert struct.unpack(">I", out[16:20])[0] == 6 + msg_len == len(out) - 20


# --- decoders -------------------------------------------------------------------------

def test_decode_request_fields():
    raw = REQUEST_MAGIC + H("0014 0006") + COOKIE_B + H("ffffffffffffffff fffffffe")
    hdr = wire.decode_request(raw)
    assert hdr == wire.RequestHeader(flags=0x14, cmd=6, cookie=COOKIE,
                                     offset=2**64 - 1, length=2**32 - 2)


@pytest.mark.parametrize("raw", [
    pytest.param(H("25609514") + bytes(24), id="bad-magic"),
    pytest.param(H("67446698") + bytes(24), id="reply-magic"),
    pytest.param(REQUEST_MAGIC + bytes(23), id="short"),
    pytest.param(REQUEST_MAGIC + bytes(25), id="long"),
    pytest.param(b"", id="empty"),
])
def test_decode_request_rejects(raw):
    with pytest.raises(PeerProtocolError):
        wire.decode_request(raw)


def test_decode_info_request_ok():
    assert wire.decode_info_request(H("00000002") + b"ab" + H("0002 0001 0003")) == ("ab", [1, 3])
    assert wire.decode_info_request(memoryview(H("00000000 0000"))) == ("", [])


@pytest.mark.parametrize("raw", [
    pytest.param(b"", id="empty"),
    pytest.param(H("000000"), id="short-name-length"),
    pytest.param(H("00000005") + b"ab", id="name-overruns"),
    pytest.param(H("00000002") + b"ab", id="no-count"),
    pytest.param(H("00000002") + b"ab" + H("00"), id="half-count"),
    pytest.param(H("00000002") + b"ab" + H("0002 0001"), id="too-few-infos"),
    pytest.param(H("00000002") + b"ab" + H("0001 0001 0003"), id="trailing-bytes"),
    pytest.param(H("00000002") + b"ab" + H("0001 00"), id="odd-info-bytes"),
    pytest.param(H("00000002 ff fe 0000"), id="name-not-utf8"),
    pytest.param(H("00001001") + b"a" * 4097 + H("0000"), id="name-too-long"),
    pytest.param(H("ffffffff 0000"), id="huge-name-length"),
])
def test_decode_info_request_rejects(raw):
    with pytest.raises(PeerProtocolError):
        wire.decode_info_request(raw)


def test_decode_meta_context_request_ok():
    raw = H("00000001") + b"d" + H("00000002 00000005") + b"base:" + H("00000006") + b"qemu:x"
    assert wire.decode_meta_context_request(raw) == ("d", ["base:", "qemu:x"])
    assert wire.decode_meta_context_request(H("00000000 00000000")) == ("", [])


@pytest.mark.parametrize("raw", [
    pytest.param(b"", id="empty"),
    pytest.param(H("00000000"), id="no-count"),
    pytest.param(H("00000000 000000"), id="short-count"),
    pytest.param(H("00000000 00000001"), id="missing-query"),
    pytest.param(H("00000000 00000001 00000009") + b"base:", id="query-overruns"),
    pytest.param(H("00000000 00000000 00"), id="trailing-byte"),
    pytest.param(H("00000000 00000001 00000005") + b"base:" + b"x", id="trailing-after-query"),
    pytest.param(H("00000000 ffffffff"), id="absurd-count"),
    pytest.param(H("00000000 00000002 00000000"), id="count-exceeds-data"),
    pytest.param(H("00000000 00000001 00000002 c328"), id="query-not-utf8"),
])
def test_decode_meta_context_request_rejects(raw):
    with pytest.raises(PeerProtocolError):
        wire.decode_meta_context_request(raw)


def test_decode_meta_context_request_query_limit():
    raw = wire.encode_meta_context_request("", ["a:"] * 3)
    assert wire.decode_meta_context_request(raw, max_queries=3)[1] == ["a:"] * 3
    with pytest.raises(PeerProtocolError):
        wire.decode_meta_context_request(raw, max_queries=2)


def test_reader_bounds():
    r = wire.Reader(H("0001 00000002 6869"), "test")
    assert r.u16() == 1
    assert r.string() == "hi"
    r.end()
    with pytest.raises(PeerProtocolError):
        r.u16()
    with pytest.raises(PeerProtocolError):
        wire.Reader(b"abc", "test").take(-1)
    with pytest.raises(PeerProtocolError):
        wire.Reader(b"abc", "test").end()
    with pytest.raises(PeerProtocolError):
        wire.Reader(H("00000003 616263"), "test").string(limit=2)


# --- Hypothesis: round trips and "garbage -> PeerProtocolError" ---------------------

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# strings the spec allows: UTF-8, at most 4096 bytes once encoded
nbd_text = st.text(max_size=300).filter(lambda s: len(s.encode("utf-8")) <= 4096)


@PROPS
@given(cmd=u16, flags=u16, cookie=u64, offset=u64, length=u32)
def test_request_round_trip(cmd, flags, cookie, offset, length):
    raw = wire.encode_request(cmd, flags, cookie, offset, length)
    assert len(raw) == 28
    assert raw[:4] == REQUEST_MAGIC
    assert wire.decode_request(raw) == wire.RequestHeader(flags, cmd, cookie, offset, length)


@PROPS
@given(name=nbd_text, infos=st.lists(u16, max_size=50))
def test_info_request_round_trip(name, infos):
    raw = wire.encode_info_request(name, infos)
    assert wire.decode_info_request(raw) == (name, infos)
    assert wire.decode_info_request(memoryview(bytearray(raw))) == (name, infos)


@PROPS
@given(name=nbd_text, queries=st.lists(nbd_text, max_size=20))
def test_meta_context_request_round_trip(name, queries):
    raw = wire.encode_meta_context_request(name, queries)
    assert wire.decode_meta_context_request(raw) == (name, queries)


@PROPS
@given(cookie=u64, error=u32, message=st.text(max_size=5000), flags=u16,
       offset=st.none() | u64)
def test_error_chunk_well_formed(cookie, error, message, flags, offset):
    raw = wire.encode_error_chunk(cookie, error, message, flags, offset)
    magic, f, rtype, c, length = struct.unpack(">IHHQI", raw[:20])
    assert (magic, f, c) == (0x668E33EF, flags, cookie)
    assert rtype == (0x8001 if offset is None else 0x8002)
    assert length == len(raw) - 20
    err, mlen = struct.unpack(">IH", raw[20:26])
    assert err == error and mlen <= 4096
    msg = raw[26:26 + mlen].decode("utf-8")
    assert message.startswith(msg)
    tail = raw[26 + mlen:]
    assert tail == (b"" if offset is None else struct.pack(">Q", offset))


@PROPS
@given(data=st.binary(max_size=200))
def test_decode_info_request_garbage(data):
    try:
        name, infos = wire.decode_info_request(data)
    except PeerProtocolError:
        return
    assert wire.encode_info_request(name, infos) == data


@PROPS
@given(data=st.binary(max_size=200))
def test_decode_meta_context_request_garbage(data):
    try:
        name, queries = wire.decode_meta_context_request(data)
    except PeerProtocolError:
        return
    assert wire.encode_meta_context_request(name, queries) == data


@PROPS
@given(data=st.binary(max_size=40))
def test_decode_request_garbage(data):
    try:
        hdr = wire.decode_request(data)
    except PeerProtocolError:
        return
    assert wire.encode_request(hdr.cmd, hdr.flags, hdr.cookie, hdr.offset, hdr.length) == data


@PROPS
@given(cookie=u64, offset=u64, length=u32, done=st.booleans(),
       extents=st.lists(st.tuples(u32, u32), min_size=1, max_size=20), context=u32)
def test_chunk_headers_parse_back(cookie, offset, length, done, extents, context):
    flags = 1 if done else 0
    head = wire.encode_offset_data_header(cookie, offset, min(length, 2**32 - 9), flags)
    assert struct.unpack(">IHHQIQ", head) == (
        0x668E33EF, flags, 1, cookie, 8 + min(length, 2**32 - 9), offset)
    hole = wire.encode_offset_hole(cookie, offset, length, flags)
    assert struct.unpack(">IHHQIQI", hole) == (0x668E33EF, flags, 2, cookie, 12, offset, length)
    bs = wire.encode_block_status(cookie, context, iter(extents), flags)
    magic, f, rtype, c, n = struct.unpack(">IHHQI", bs[:20])
    assert (magic, f, rtype, c, n) == (0x668E33EF, flags, 5, cookie, 4 + 8 * len(extents))
    assert struct.unpack(">I", bs[20:24])[0] == context
    assert list(struct.iter_unpack(">II", bs[24:])) == extents


# --- every encoder has its decoder ----------------------------------------------------

#: (encoder, arguments, decoder, what the decoder gives back)
ROUND_TRIPS = [
    (wire.encode_greeting, (3,), wire.decode_greeting, 3),
    (wire.encode_client_flags, (3,), wire.decode_client_flags, 3),
    (wire.encode_option, (7, b"ab"), wire.decode_option, (7, b"ab")),
    (wire.encode_option_reply, (9, 0x80000001, b"no"), wire.decode_option_reply,
     (9, 0x80000001, b"no")),
    (wire.encode_export_name_reply, (0x100000, 0x10D, True), wire.decode_export_name_reply,
     (0x100000, 0x10D, True)),
    (wire.encode_export_name_reply, (0x100000, 0x10D, False), wire.decode_export_name_reply,
     (0x100000, 0x10D, False)),
    (wire.encode_string, ("é",), wire.decode_string, "é"),
    (wire.encode_info_request, ("ab", [1, 3]), wire.decode_info_request, ("ab", [1, 3])),
    (wire.encode_meta_context_request, ("d", ["base:"]), wire.decode_meta_context_request,
     ("d", ["base:"])),
    (wire.encode_info_export, (2**40, 3), wire.decode_info_export, (2**40, 3)),
    (wire.encode_info_name, ("disk",), wire.decode_info_name, "disk"),
    (wire.encode_info_description, ("A disk",), wire.decode_info_description, "A disk"),
    (wire.encode_info_block_size, (1, 4096, 1 << 25), wire.decode_info_block_size,
     (1, 4096, 1 << 25)),
    (wire.encode_rep_server, ("disk", "desc"), wire.decode_rep_server, ("disk", "desc")),
    (wire.encode_rep_meta_context, (1, "base:allocation"), wire.decode_rep_meta_context,
     (1, "base:allocation")),
    (wire.encode_request, (1, 1, COOKIE, 4096, 512), wire.decode_request,
     wire.RequestHeader(1, 1, COOKIE, 4096, 512)),
    (wire.encode_ext_request, (4, 0, COOKIE, 4096, 1 << 40), wire.decode_ext_request,
     wire.RequestHeader(0, 4, COOKIE, 4096, 1 << 40)),
    (wire.encode_block_status_payload, (1 << 40, [1, 2]), wire.decode_block_status_payload,
     (1 << 40, [1, 2])),
    (wire.encode_simple_reply, (COOKIE, 28), wire.decode_simple_reply, (COOKIE, 28)),
    (wire.encode_chunk_header, (COOKIE, 0, 1, 0), wire.decode_chunk_header, (COOKIE, 0, 1, 0)),
    (wire.encode_ext_chunk_header, (COOKIE, 0, 1, 4096, 0), wire.decode_ext_chunk_header,
     (COOKIE, 0, 1, 4096, 0)),
    (wire.encode_offset_data_header, (COOKIE, 8192, 4096, 1), wire.decode_offset_data_header,
     (COOKIE, 8192, 4096, 1)),
    (wire.encode_ext_offset_data_header, (COOKIE, 0, 8192, 4096, 0),
     wire.decode_ext_offset_data_header, (COOKIE, 0, 8192, 4096, 0)),
    (wire.encode_offset_hole, (COOKIE, 8192, 4096, 1), wire.decode_offset_hole,
     (COOKIE, 8192, 4096, 1)),
    (wire.encode_ext_offset_hole, (COOKIE, 0, 8192, 4096, 1), wire.decode_ext_offset_hole,
     (COOKIE, 0, 8192, 4096, 1)),
    (wire.encode_error_chunk, (COOKIE, 22, "bad", 1), wire.decode_error_chunk,
     (COOKIE, 22, "bad", 1, None)),
    (wire.encode_error_chunk, (COOKIE, 5, "io", 0, 512), wire.decode_error_chunk,
     (COOKIE, 5, "io", 0, 512)),
    (wire.encode_ext_error_chunk, (COOKIE, 4096, 5, "io", 1, 4608),
     wire.decode_ext_error_chunk, (COOKIE, 4096, 5, "io", 1, 4608)),
    (wire.encode_block_status, (COOKIE, 1, [(4096, 0), (8192, 3)], 1),
     wire.decode_block_status, (COOKIE, 1, [(4096, 0), (8192, 3)], 1)),
    (wire.encode_block_status_ext, (COOKIE, 0, 2, [(1 << 40, 1)], 1),
     wire.decode_block_status_ext, (COOKIE, 0, 2, [(1 << 40, 1)], 1)),
]


@pytest.mark.parametrize(("encode", "args", "decode", "expected"), ROUND_TRIPS,
                         ids=[e.__name__ + f"-{i}" for i, (e, *_) in enumerate(ROUND_TRIPS)])
def test_decoder_gives_back_what_the_encoder_took(encode, args, decode, expected):
    raw = encode(*args)
    assert decode(raw) == expected
    assert decode(memoryview(bytearray(raw))) == expected


def test_every_encoder_has_a_decoder_and_a_round_trip():
    encoders = {n for n in dir(wire) if n.startswith("encode_")}
    assert encoders, "the scan sees wire's names"
    missing = {n for n in encoders if not hasattr(wire, "decode_" + n[len("encode_"):])}
    assert not missing, f"encoders without a decoder: {sorted(missing)}"
    tested = {e.__name__ for e, *_ in ROUND_TRIPS}
    assert encoders <= tested, f"no round trip for {sorted(encoders - tested)}"


@pytest.mark.parametrize(("decode", "raw"), [
    pytest.param(wire.decode_greeting, NBDMAGIC + bytes(8) + H("0003"), id="greeting-oldstyle"),
    pytest.param(wire.decode_greeting, NBDMAGIC + H("0000420281861253 0003"),
                 id="greeting-oldstyle-magic"),
    pytest.param(wire.decode_greeting, b"HTTP/1.1 200 OK\r\n\r\n", id="greeting-not-nbd"),
    pytest.param(wire.decode_client_flags, H("000000"), id="client-flags-short"),
    pytest.param(wire.decode_option, IHAVEOPT + H("00000007 00000004") + b"ab",
                 id="option-short-data"),
    pytest.param(wire.decode_option, H("0000000000000000 00000007 00000000"),
                 id="option-bad-magic"),
    pytest.param(wire.decode_option_reply, OPT_REPLY_MAGIC + H("00000003 00000001 00000001"),
                 id="option-reply-short"),
    pytest.param(wire.decode_export_name_reply, bytes(11), id="export-name-reply-length"),
    pytest.param(wire.decode_info_export, H("0000 0000000000001000"), id="info-export-short"),
    pytest.param(wire.decode_info_export, H("0003 0000000000001000 0000"),
                 id="info-export-wrong-type"),
    pytest.param(wire.decode_info_block_size, H("0003 00000001 00001000"),
                 id="info-block-size-short"),
    pytest.param(wire.decode_info_name, H("0002") + b"x", id="info-name-wrong-type"),
    pytest.param(wire.decode_rep_server, H("00000009") + b"ab", id="rep-server-overrun"),
    pytest.param(wire.decode_rep_meta_context, H("000001"), id="rep-meta-context-short"),
    pytest.param(wire.decode_simple_reply, CHUNK_MAGIC + bytes(12), id="simple-wrong-magic"),
    pytest.param(wire.decode_chunk_header, SIMPLE_MAGIC + bytes(16), id="chunk-wrong-magic"),
    pytest.param(wire.decode_offset_hole, wire.encode_offset_hole(COOKIE, 0, 0, 1),
                 id="hole-of-zero-bytes"),
    pytest.param(wire.decode_offset_data_header,
                 wire.encode_chunk_header(COOKIE, 1, 0, 8) + bytes(8), id="data-without-data"),
    pytest.param(wire.decode_error_chunk, wire.encode_error_chunk(COOKIE, 0, "", 1),
                 id="error-value-0"),
    pytest.param(wire.decode_error_chunk,
                 wire.encode_chunk_header(COOKIE, 0x8001, 1, 7) + H("00000005 0009 41"),
                 id="error-message-overruns"),
    pytest.param(wire.decode_block_status, wire.encode_chunk_header(COOKIE, 5, 1, 6)
                 + bytes(6), id="block-status-bad-length"),
    pytest.param(wire.decode_block_status_ext,
                 wire.encode_ext_chunk_header(COOKIE, 6, 1, 0, 24) + H("00000001 00000002")
                 + bytes(16), id="block-status-ext-count-mismatch"),
])
def test_decoders_refuse_malformed_input(decode, raw):
    with pytest.raises(PeerProtocolError):
        decode(raw)
