"""Byte-level frame layout tests (against an independent reference written from the seed
document and msgr2.md), round trips and garbage input."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.msgr2.constants import Tag
from pynbd.msgr2.crc import ceph_crc32c, preamble_crc, segment_crc
from pynbd.msgr2.crypto import GcmStream
from pynbd.msgr2.errors import ProtocolError
from pynbd.msgr2.frames import FrameAssembler, FrameReader


def ref_crc(seed: int, data: bytes) -> int:
    """Bitwise raw Castagnoli register (reflected 0x82F63B78), no inversions."""
    crc = seed
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc


@pytest.mark.parametrize("seed,data", [
    (0, b""), (0xFFFFFFFF, b""), (0, b"123456789"), (0xFFFFFFFF, b"123456789"),
    (0x12345678, bytes(range(256))), (0, b"\x00" * 28),
])
def test_crc_matches_reference(seed: int, data: bytes) -> None:
    assert ceph_crc32c(seed, data) == ref_crc(seed, data)


def test_crc_known_values() -> None:
    # standard CRC-32C("123456789") = 0xE3069283; Ceph's raw register with seed -1 is its
    # complement, and an empty present segment has crc 0xFFFFFFFF
    assert segment_crc(b"123456789") == 0xE3069283 ^ 0xFFFFFFFF
    assert segment_crc(b"") == 0xFFFFFFFF
    assert preamble_crc(b"") == 0


def ref_preamble(tag: int, lengths: list[int]) -> bytes:
    lens = lengths + [0] * (4 - len(lengths))
    n = 4
    while n > 1 and lens[n - 1] == 0:
        n -= 1
    body = bytes([tag, n])
    for i in range(4):
        body += struct.pack("<IH", lens[i] if i < n else 0, 8 if i < n else 0)
    body += b"\x00\x00"
    assert len(body) == 28
    return body + struct.pack("<I", ref_crc(0, body))


def segs(lengths: list[int]) -> list[bytes]:
    return [bytes((i * 7 + j) & 0xFF for j in range(n)) for i, n in enumerate(lengths)]


# (lengths, expected on-wire size) -- the examples drawn in the seed document
CRC_TABLE = [
    ([0], 32),
    ([20], 32 + 20 + 4),
    ([0, 70], 32 + 70 + 13),
    ([20, 70, 0, 350], 32 + 20 + 4 + 70 + 350 + 13),
    ([41, 72, 0, 741], 32 + 41 + 4 + 72 + 741 + 13),
    ([105], 32 + 105 + 4),
    ([3, 0, 0, 0], 32 + 3 + 4),
]


@pytest.mark.parametrize("lengths,size", CRC_TABLE)
def test_crc_frame_layout(lengths: list[int], size: int) -> None:
    s = segs(lengths)
    wire = b"".join(bytes(c) for c in FrameAssembler().build(Tag.MESSAGE, s))
    assert len(wire) == size
    expect = ref_preamble(Tag.MESSAGE, lengths)
    if lengths[0]:
        expect += s[0] + struct.pack("<I", ref_crc(0xFFFFFFFF, s[0]))
    n = 4
    while n > 1 and (lengths + [0] * 4)[n - 1] == 0:
        n -= 1
    if n > 1:
        crcs = [ref_crc(0xFFFFFFFF, s[i]) for i in range(1, n)] + [0] * (4 - n)
        expect += b"".join(s[1:n]) + struct.pack("<BIII", 0x0E, *crcs)
    assert wire == expect


KEY16 = bytes(range(16))
NONCE = bytes(range(100, 112))


def ref_nonces() -> list[bytes]:
    fixed, ctr = NONCE[:4], int.from_bytes(NONCE[4:], "little")
    return [fixed + (ctr + i).to_bytes(8, "little") for i in range(3)]


SECURE_TABLE = [
    # lengths, sizes of the GCM operations on the wire (ciphertext + 16-byte tag)
    ([0], [96]),
    ([20], [96]),
    ([0, 70], [96, 80 + 16 + 16]),
    ([20, 70, 0, 350], [96, 80 + 352 + 16 + 16]),
    ([105], [96, 64 + 16]),
    ([105, 70, 0, 350], [96, 64 + 16, 80 + 352 + 16 + 16]),
    ([48], [96]),
    ([49], [96, 16 + 16]),
]


@pytest.mark.parametrize("lengths,ops", SECURE_TABLE)
def test_secure_frame_layout(lengths: list[int], ops: list[int]) -> None:
    s = segs(lengths)
    asm = FrameAssembler()
    asm.tx = GcmStream(KEY16, NONCE)
    wire = b"".join(bytes(c) for c in asm.build(Tag.MESSAGE, s))
    assert len(wire) == sum(ops)
    aead = AESGCM(KEY16)
    nonces = ref_nonces()

    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 16)

    plain = [ref_preamble(Tag.MESSAGE, lengths) + (s[0][:48] + bytes(48))[:48]]
    if lengths[0] > 48:
        plain.append(pad(s[0][48:]))
    if len(ops) > len(plain):
        plain.append(b"".join(pad(x) for x in s[1:]) + b"\x0e" + bytes(15))
    expect = b"".join(aead.encrypt(nonces[i], p, None) for i, p in enumerate(plain))
    assert wire == expect


def test_secure_large_streamed_equals_joined() -> None:
    """Big segments take the streaming GCM path; the bytes must not change."""
    big = bytes(range(256)) * 2048  # 512 KiB, above STREAM_THRESHOLD
    s = [b"h" * 41, b"front", b"", big + b"x"]
    a1, a2 = FrameAssembler(), FrameAssembler()
    a1.tx = GcmStream(KEY16, NONCE)
    a2.tx = GcmStream(KEY16, NONCE)
    w1 = b"".join(bytes(c) for c in a1.build(Tag.MESSAGE, s))
    aead = AESGCM(KEY16)
    nonces = ref_nonces()
    pre = ref_preamble(Tag.MESSAGE, [41, 5, 0, len(big) + 1])
    pad = bytes(-len(big + b"x") % 16)
    op3 = b"front" + bytes(11) + big + b"x" + pad + b"\x0e" + bytes(15)
    expect = aead.encrypt(nonces[0], pre + b"h" * 41 + bytes(7), None) + aead.encrypt(
        nonces[1], op3, None)
    assert w1 == expect


def read_all(reader: FrameReader, wire: bytes, chunk: int) -> list[tuple[int, list[bytes]]]:
    out = []
    mv = memoryview(wire)
    while len(mv):
        n, f = reader.feed(mv[:chunk])
        mv = mv[n:]
        if f is not None:
            out.append((f.tag, [bytes(x) for x in f.segments]))
    return out


seg_strategy = st.lists(st.binary(max_size=300), min_size=1, max_size=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(seg_strategy, min_size=1, max_size=5), secure=st.booleans(),
       chunk=st.integers(1, 700))
def test_round_trip(frames: list[list[bytes]], secure: bool, chunk: int) -> None:
    asm = FrameAssembler()
    reader = FrameReader()
    if secure:
        asm.tx = GcmStream(KEY16, NONCE)
        reader.rx = GcmStream(KEY16, NONCE)
        reader._reset_unit()
    wire = b"".join(bytes(c) for f in frames for c in asm.build(Tag.MESSAGE, f))
    got = read_all(reader, wire, chunk)
    expect = []
    for f in frames:
        n = len(f)
        while n > 1 and not f[n - 1]:
            n -= 1
        expect.append((Tag.MESSAGE, list(f[:n])))
    assert got == expect


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=400), secure=st.booleans())
def test_garbage_is_a_protocol_error_never_a_crash(garbage: bytes, secure: bool) -> None:
    reader = FrameReader(max_segment_len=1 << 20)
    if secure:
        reader.rx = GcmStream(KEY16, NONCE)
        reader._reset_unit()
    try:
        read_all(reader, garbage, 97)
    except ProtocolError:
        pass


def _valid_preamble_with(tag: int, length: int) -> bytes:
    body = bytes([tag, 1]) + struct.pack("<IH", length, 8) + bytes(18) + b"\x00\x00"
    return body + struct.pack("<I", ref_crc(0, body))


@pytest.mark.parametrize("wire,message", [
    (_valid_preamble_with(99, 4), "unknown frame tag 99"),
    (_valid_preamble_with(0, 4), "unknown frame tag 0"),
    (_valid_preamble_with(Tag.MESSAGE, 2_000_000), "exceeds the maximum"),
    (bytes(32)[:28] + b"\x01\x00\x00\x00", "preamble crc"),
    (bytes([1, 0]) + bytes(26) + struct.pack("<I", ref_crc(0, bytes([1, 0]) + bytes(26))),
     "segment count"),
])
def test_bad_preambles(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        read_all(FrameReader(max_segment_len=1 << 20), wire, 1000)


def test_corrupted_segment_crc() -> None:
    wire = bytearray(b"".join(bytes(c) for c in FrameAssembler().build(Tag.MESSAGE,
                                                                      segs([10, 20]))))
    wire[40] ^= 1
    with pytest.raises(ProtocolError, match="segment 0 crc"):
        read_all(FrameReader(), bytes(wire), 1000)
    wire[40] ^= 1
    wire[50] ^= 0x80
    with pytest.raises(ProtocolError, match="segment 1 crc"):
        read_all(FrameReader(), bytes(wire), 1000)


def test_aborted_frame_is_dropped_and_bad_late_status_rejected() -> None:
    wire = bytearray(b"".join(bytes(c) for c in FrameAssembler().build(Tag.MESSAGE,
                                                                      segs([10, 20]))))
    pos = 32 + 10 + 4 + 20
    wire[pos] = 0x01  # aborted
    assert read_all(FrameReader(), bytes(wire), 1000) == []
    wire[pos] = 0x05
    with pytest.raises(ProtocolError, match="late_status"):
        read_all(FrameReader(), bytes(wire), 1000)


def test_bad_gcm_tag() -> None:
    asm = FrameAssembler()
    asm.tx = GcmStream(KEY16, NONCE)
    wire = bytearray(b"".join(bytes(c) for c in asm.build(Tag.MESSAGE, segs([100, 5]))))
    wire[-1] ^= 1
    reader = FrameReader()
    reader.rx = GcmStream(KEY16, NONCE)
    reader._reset_unit()
    with pytest.raises(ProtocolError, match="GCM"):
        read_all(reader, bytes(wire), 1000)
