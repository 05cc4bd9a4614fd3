"""Control frame payloads, entity encodings and cephx primitives.
(Keyrings, ceph.conf and monitor messages: tests/ceph.)"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.msgr2.auth import CEPHX_ENC_MAGIC, CryptoKey
from pynbd.msgr2.connection import Connection, Role, State
from pynbd.msgr2.constants import AddrType, Tag
from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec, EntityName, Reader
from pynbd.msgr2.errors import ProtocolError, UsageError
from pynbd.msgr2.events import WaitRequested
from pynbd.msgr2.frames import FrameAssembler
from pynbd.msgr2.payloads import (
    CONTROL_PAYLOADS,
    AuthBadMethod,
    AuthDone,
    AuthRequest,
    ClientIdent,
    Hello,
    Keepalive2,
    MessageHeader2,
    ServerIdent,
    SessionReconnect,
    SessionReset,
)

from ._pair import client_config, wire

u64s = st.integers(0, (1 << 64) - 1)
addrs = st.builds(EntityAddr, st.sampled_from([0, 1, 2, 3]), st.integers(0, (1 << 32) - 1),
                  st.sampled_from(["127.0.0.1", "10.1.2.3", "::1"]), st.integers(0, 65535)) | \
    st.builds(EntityAddr, st.sampled_from([0, 3]), st.integers(0, (1 << 32) - 1))


def test_entity_addr_bytes() -> None:
    a = EntityAddr(AddrType.MSGR2, 0x01020304, "127.0.0.1", 3300)
    want = (b"\x01\x01\x01" + struct.pack("<I", 28) + struct.pack("<II", 2, 0x01020304)
            + struct.pack("<I", 16) + struct.pack("<H", 2) + struct.pack(">H", 3300)
            + bytes([127, 0, 0, 1]) + bytes(8))
    assert a.encode() == want
    assert EntityAddrVec((a,)).encode() == b"\x02" + struct.pack("<I", 1) + want


def test_message_header2_is_41_bytes() -> None:
    h = MessageHeader2(seq=1, tid=2, type=50, ack_seq=3)
    assert len(h.encode()) == 41
    assert MessageHeader2.decode(h.encode()) == h


@settings(max_examples=100, deadline=None)
@given(a=addrs, b=addrs, x=u64s, y=u64s, gid=st.integers(-(1 << 63), (1 << 63) - 1))
def test_payload_round_trips(a: EntityAddr, b: EntityAddr, x: int, y: int, gid: int) -> None:
    vec = EntityAddrVec((a, b))
    for p in [
        Hello(8, a), AuthRequest(2, (2, 1), b"payload"), AuthBadMethod(2, -13, (1, 2), (1,)),
        AuthDone(x, 2, b"z"), ClientIdent(vec, b, gid, x, y, x, 1, y),
        ServerIdent(vec, gid, x, y, x, 0, y), SessionReconnect(vec, x, y, x, y, x),
        SessionReset(True), Keepalive2(x & 0xFFFFFFFF, y & 0xFFFFFFFF),
    ]:
        cls = CONTROL_PAYLOADS[p.TAG]
        assert cls.decode(p.encode()) == p  # type: ignore[attr-defined]


@settings(max_examples=300, deadline=None)
@given(tag=st.sampled_from(sorted(CONTROL_PAYLOADS)), data=st.binary(max_size=200))
def test_payload_garbage(tag: int, data: bytes) -> None:
    try:
        CONTROL_PAYLOADS[tag].decode(data)  # type: ignore[attr-defined]
    except ProtocolError:
        pass


def test_cephx_encrypt_layout() -> None:
    key = CryptoKey(bytes(range(16)))
    enc = key.encode_encrypt(b"abc")
    (n,) = struct.unpack_from("<I", enc)
    assert n == len(enc) - 4 == 16  # 1 + 8 + 3 bytes padded to one block
    assert key.decode_decrypt(Reader(enc)) == b"abc"
    plain = key.decrypt(enc[4:])
    assert plain[0] == 1 and struct.unpack_from("<Q", plain, 1)[0] == CEPHX_ENC_MAGIC


def test_entity_name_parse() -> None:
    n = EntityName.parse("client.admin")
    assert EntityName.parse(str(n)) == n
    with pytest.raises(UsageError, match="bad entity name"):
        EntityName.parse("admin")


def test_client_handles_wait() -> None:
    """A server answering WAIT to our ident: the connection reports it and closes."""
    from ._pair import server_config

    c = Connection(Role.CLIENT, client_config("none", "crc"))
    s = Connection(Role.SERVER, server_config("none"))
    for _ in range(6):
        s.receive_data(wire(c))
        c.receive_data(wire(s))
        if c.state is State.IDENT:
            break
    wire(c)  # its CLIENT_IDENT: the server answers WAIT instead
    assert c.state is State.IDENT
    ev = c.receive_data(b"".join(bytes(x) for x in FrameAssembler().build(Tag.WAIT, [b""])))
    assert ev == [WaitRequested()] and c.state is State.CLOSED
