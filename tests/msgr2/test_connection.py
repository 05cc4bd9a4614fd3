"""The sans-I/O connection: handshakes in every mode, messages, bad input, nonces and the
session failure scenarios drawn in the seed document."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.msgr2.auth import PskAuth
from pynbd.msgr2.connection import Connection, Role, State
from pynbd.msgr2.constants import AuthMethod, ConMode, Tag
from pynbd.msgr2.crypto import GcmStream
from pynbd.msgr2.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ProtocolError,
    UsageError,
)
from pynbd.msgr2.events import (
    AuthCompleted,
    KeepaliveAckReceived,
    MessageReceived,
    SessionEstablished,
    SessionTakenOver,
    SessionWasReset,
)
from pynbd.msgr2.frames import FrameAssembler
from pynbd.msgr2.session import Session, SessionRegistry

from ._pair import MODES, Pair, client_config, established, make_pair, server_config, wire


def msgs(events: list[object]) -> list[MessageReceived]:
    return [e for e in events if isinstance(e, MessageReceived)]


@pytest.mark.parametrize("kind,mode", MODES)
def test_handshake_and_messages(kind: str, mode: str) -> None:
    p = established(kind, mode)
    done = next(e for e in p.cev if isinstance(e, AuthCompleted))
    assert done.con_mode == (ConMode.SECURE if mode == "secure" else ConMode.CRC)
    assert done.method == (AuthMethod.NONE if kind == "none" else AuthMethod.PYNBD_PSK)
    est = next(e for e in p.cev if isinstance(e, SessionEstablished))
    assert not est.reconnected and not est.lossy
    for i, size in enumerate([0, 1, 47, 48, 49, 4096, 70000]):
        p.client.send_message(0x7001, b"f%d" % i, bytes([i]) * size)
        p.server.send_message(0x7002, b"g%d" % i, middle=b"mid")
    p.pump()
    got = msgs(p.sev)
    assert [bytes(m.front) for m in got] == [b"f%d" % i for i in range(7)]
    assert [m.header.seq for m in got] == list(range(1, 8))
    assert bytes(got[-1].data) == bytes([6]) * 70000
    back = msgs(p.cev)
    assert [bytes(m.middle) for m in back] == [b"mid"] * 7
    # both sides acknowledged everything
    assert not p.client.session.unacked and not p.server.session.unacked  # type: ignore[union-attr]
    p.client.send_keepalive(12.5)
    p.pump()
    ka = [e for e in p.cev if isinstance(e, KeepaliveAckReceived)]
    assert ka == [KeepaliveAckReceived(12, 500000000)]


def test_secure_mode_with_auth_none_is_refused() -> None:
    p = make_pair("none", "secure")
    with pytest.raises(AuthenticationError, match="rejected auth method"):
        p.pump()


def test_wrong_psk_is_refused_without_revealing_the_key() -> None:
    c = Connection(Role.CLIENT, client_config("psk", "secure"), Session(lossless=True))
    c.config.auth_client = PskAuth(b"x" * 32)
    s = Connection(Role.SERVER, server_config("psk"))
    sent = b""
    with pytest.raises(AuthenticationError):
        for _ in range(10):
            a = wire(c)
            sent += a
            s.receive_data(a)
            c.receive_data(wire(s))
    assert b"x" * 16 not in sent


def test_auth_signature_mismatch_detected() -> None:
    p = make_pair("psk", "crc")
    # tamper with what the server believes it sent: its check of our signature must fail
    for _ in range(3):
        p.server.receive_data(wire(p.client))
        p.client.receive_data(wire(p.server))
    assert p.server.state is State.AUTH_SIGNATURE
    p.server._tx_record_final = b"something else"
    with pytest.raises(AuthenticationError, match="AUTH_SIGNATURE"):
        p.server.receive_data(wire(p.client))


def _frame(tag: int, payload: bytes) -> bytes:
    return b"".join(bytes(c) for c in FrameAssembler().build(tag, [payload]))


def test_frame_out_of_phase_before_auth() -> None:
    s = Connection(Role.SERVER, server_config("psk"))
    c = Connection(Role.CLIENT, client_config("psk", "crc"))
    banner = wire(c)[:26]
    s.receive_data(banner)
    with pytest.raises(ProtocolError, match="MESSAGE out of phase"):
        s.receive_data(_frame(Tag.MESSAGE, bytes(41)))
    assert s.state is State.CLOSED
    with pytest.raises(ConnectionClosedError):
        s.receive_data(b"x")


def test_frame_out_of_phase_when_ready() -> None:
    p = established("psk", "crc")
    with pytest.raises(ProtocolError, match="CLIENT_IDENT out of phase"):
        p.server.receive_data(_frame(Tag.CLIENT_IDENT, b"x"))


@pytest.mark.parametrize("offset,match", [(3, "preamble crc"), (40, "segment 0 crc"),
                                          (30, "preamble crc")])
def test_corrupted_crc_frame_closes(offset: int, match: str) -> None:
    p = established("psk", "crc")
    p.client.send_message(0x7001, b"hello world" * 3)
    data = bytearray(wire(p.client))
    data[offset] ^= 0x10
    with pytest.raises(ProtocolError, match=match):
        p.server.receive_data(bytes(data))
    assert p.server.state is State.CLOSED


def test_segment_length_past_max() -> None:
    p = make_pair("psk", "crc")
    p.server.config.max_segment_len = 1000
    p.server._reader.max_segment_len = 1000
    p.pump()
    p.client.send_message(0x7001, b"x", b"y" * 1001)
    with pytest.raises(ProtocolError, match="exceeds the maximum 1000"):
        p.server.receive_data(wire(p.client))


def test_banner_errors() -> None:
    s = Connection(Role.SERVER, server_config("psk"))
    with pytest.raises(ProtocolError, match="not a msgr2 peer"):
        s.receive_data(b"GET / HTTP/1.1\r\n\r\n")
    s = Connection(Role.SERVER, server_config("psk"))
    with pytest.raises(ProtocolError, match="msgr1"):
        s.receive_data(b"ceph v027xxxxxxxxxxxxxxxxxxxx")
    s = Connection(Role.SERVER, server_config("psk"))
    with pytest.raises(ProtocolError, match=r"msgr2\.0"):
        s.receive_data(b"ceph v2\n" + struct.pack("<HQQ", 16, 0, 0))


def test_secure_bad_tag_replay_and_reorder() -> None:
    p = established("psk", "secure")
    p.client.send_message(0x7001, b"one")
    wire(p.client)
    p.client.send_message(0x7001, b"two")
    f2 = wire(p.client)
    # bad tag
    q = established("psk", "secure")
    q.client.send_message(0x7001, b"one")
    qbad = bytearray(wire(q.client))
    qbad[-1] ^= 1
    with pytest.raises(ProtocolError, match="GCM authentication"):
        q.server.receive_data(bytes(qbad))
    # reorder: the second frame first
    with pytest.raises(ProtocolError, match="GCM authentication"):
        p.server.receive_data(f2)
    # replay: deliver a frame twice
    r = established("psk", "secure")
    r.client.send_message(0x7001, b"one")
    rf = wire(r.client)
    assert [bytes(m.front) for m in msgs(r.server.receive_data(rf))] == [b"one"]
    with pytest.raises(ProtocolError, match="GCM authentication"):
        r.server.receive_data(rf)


def test_nonce_counter_never_repeats() -> None:
    p = established("psk", "secure")
    seen: dict[str, list[bytes]] = {"c_tx": [], "c_rx": [], "s_tx": [], "s_rx": []}
    streams: list[tuple[str, GcmStream | None]] = [
        ("c_tx", p.client._asm.tx), ("c_rx", p.client._reader.rx),
        ("s_tx", p.server._asm.tx), ("s_rx", p.server._reader.rx)]
    for name, stream in streams:
        assert stream is not None
        stream.on_nonce = seen[name].append
    for i in range(200):
        size = (i * 37) % 300
        p.client.send_message(0x7001, b"x" * (i % 90), b"d" * size, b"m" * (i % 3))
        if i % 7 == 0:
            p.server.send_message(0x7002, b"y" * (i % 60))
            p.client.send_keepalive(now=1000.0 + i)
        p.pump()
    for name, values in seen.items():
        assert len(values) == len(set(values)), f"{name}: nonce reused"
        counters = [int.from_bytes(v[4:], "little") for v in values]
        assert counters == list(range(counters[0], counters[0] + len(counters))), name
    # each direction: tx of one side is rx of the other, same sequence
    assert seen["c_tx"] == seen["s_rx"] and seen["s_tx"] == seen["c_rx"]
    # the two directions never share a nonce
    assert not set(seen["c_tx"]) & set(seen["s_tx"])


def test_usage_errors_put_nothing_on_the_wire() -> None:
    p = make_pair("psk", "crc")
    with pytest.raises(UsageError):
        p.client.send_keepalive(now=0.0)
    with pytest.raises(UsageError):
        p.client.send_message(1 << 16, b"")
    with pytest.raises(UsageError):
        Connection(Role.CLIENT, server_config("psk"))
    with pytest.raises(UsageError):
        PskAuth(b"short")


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(min_size=1, max_size=300), after=st.integers(0, 3))
def test_garbage_into_connection(garbage: bytes, after: int) -> None:
    """Any bytes after a valid prefix of the handshake give ProtocolError or nothing."""
    c = Connection(Role.CLIENT, client_config("psk", "crc"))
    s = Connection(Role.SERVER, server_config("psk"))
    for _ in range(after):
        s.receive_data(wire(c))
        c.receive_data(wire(s))
    try:
        s.receive_data(garbage)
    except ProtocolError:
        assert s.state is State.CLOSED


# --------------------------------------------------------------------------------------
# Session scenarios from the seed document


def handshake_to_ident(p: Pair) -> bytes:
    """Run the handshake until the client has emitted CLIENT_IDENT/RECONNECT; return it."""
    for _ in range(10):
        a = wire(p.client)
        if p.client.state is State.IDENT and a:
            return a
        p.sev += p.server.receive_data(a)
        p.cev += p.client.receive_data(wire(p.server))
    raise AssertionError("client never identified")


def test_scenario_client_ident_lost() -> None:
    reg = SessionRegistry()
    s = Session(lossless=True)
    cookie_a = s.client_cookie
    p = make_pair(session=s, registry=reg)
    handshake_to_ident(p)  # CLIENT_IDENT(a) lost with the connection
    p.client.close()
    q = make_pair(session=s, registry=reg)
    q.pump()
    assert q.client.ready and s.client_cookie == cookie_a
    assert list(reg.sessions) == [cookie_a]
    assert reg.sessions[cookie_a].server_cookie == s.server_cookie != 0


def test_scenario_server_ident_lost() -> None:
    reg = SessionRegistry()
    s = Session(lossless=True)
    p = make_pair(session=s, registry=reg)
    p.server.receive_data(handshake_to_ident(p))
    assert p.server.ready
    cookie_b = p.server.session.server_cookie  # type: ignore[union-attr]
    p.server.data_to_send()  # SERVER_IDENT(b) lost
    p.server.send_message(0x7002, b"queued on the server")  # stays unacked
    p.server.data_to_send()
    q = make_pair(session=s, registry=reg)
    q.pump()
    assert q.client.ready
    server_side = reg.sessions[s.client_cookie]
    assert s.server_cookie == server_side.server_cookie != cookie_b
    # the server's unacked message is delivered on the new connection, numbered from 1
    got = msgs(q.cev)
    assert [(m.header.seq, bytes(m.front)) for m in got] == [(1, b"queued on the server")]
    assert any(isinstance(e, SessionTakenOver) for e in q.sev)


def test_scenario_reconnect_resends_only_unacked() -> None:
    reg = SessionRegistry()
    s = Session(lossless=True)
    p = established(session=s, registry=reg)
    for i in range(5):
        p.client.send_message(0x7001, b"m%d" % i)
    frames = wire(p.client)
    per = len(frames) // 5
    # the server receives the first three; its ACK is lost with the connection
    got1 = msgs(p.server.receive_data(frames[: 3 * per]))
    p.server.data_to_send()
    p.client.close()
    q = make_pair(session=s, registry=reg)
    q.pump()
    est = next(e for e in q.cev if isinstance(e, SessionEstablished))
    assert est.reconnected and est.resent == 2
    got2 = msgs(q.sev)
    assert [bytes(m.front) for m in got1 + got2] == [b"m%d" % i for i in range(5)]
    assert any(isinstance(e, SessionTakenOver) for e in q.sev)
    # the old connection can no longer touch the session
    with pytest.raises(ConnectionClosedError):
        p.server.receive_data(frames[3 * per : 4 * per])


def test_scenario_server_reset() -> None:
    s = Session(lossless=True)
    p = established(session=s, registry=SessionRegistry())
    cookie_a = s.client_cookie
    p.client.send_message(0x7001, b"lost with the server")
    p.client.data_to_send()
    p.client.close()
    q = make_pair(session=s, registry=SessionRegistry())  # server restarted: no sessions
    q.pump()
    reset = [e for e in q.cev if isinstance(e, SessionWasReset)]
    assert reset == [SessionWasReset(full=True, dropped=1)]
    assert q.client.ready and s.client_cookie != cookie_a  # client_ident(c)
    assert not msgs(q.sev)


def test_scenario_client_reset() -> None:
    reg = SessionRegistry()
    p = established(session=Session(lossless=True), registry=reg)
    old = p.client.session
    fresh = Session(lossless=True)  # client restarted: new cookie
    q = make_pair(session=fresh, registry=reg)
    q.pump()
    est = next(e for e in q.cev if isinstance(e, SessionEstablished))
    assert not est.reconnected and fresh.client_cookie != old.client_cookie  # type: ignore[union-attr]


def test_retry_global_and_retry_session() -> None:
    reg = SessionRegistry()
    s = Session(lossless=True)
    established(session=s, registry=reg)
    srv_side = reg.sessions[s.client_cookie]
    srv_side.peer_global_seq = s.global_seq + 10  # server has seen a newer connection
    srv_side.connect_seq = 5
    q = make_pair(session=s, registry=reg)
    q.pump()
    assert q.client.ready
    assert s.global_seq > srv_side.peer_global_seq - 1 and s.connect_seq == 6


@pytest.mark.parametrize("mode", ["crc", "secure"])
def test_pooled_buffers_keep_data_intact(mode: str) -> None:
    """Large frames reuse pooled buffers once released/recycled; contents never mix."""
    p = established("psk", mode)
    for i in range(6):
        data = bytes([i]) * (300_000 + i * 4096)
        p.client.send_message(0x7001, b"%d" % i, data)
        chunks = p.client.data_to_send()
        for c in chunks:
            p.sev += p.server.receive_data(c)
            p.client.recycle(c)
        m = msgs(p.sev)[-1]
        assert bytes(m.front) == b"%d" % i and m.data == data
        p.server.release(m)
        p.client.receive_data(wire(p.server))
    assert p.server.rx_pool._free and (mode == "crc" or p.client.tx_pool._free)


@pytest.mark.parametrize("kind,mode", MODES)
def test_unknown_tag_after_handshake(kind: str, mode: str) -> None:
    p = established(kind, mode)
    frame = b"".join(bytes(c) for c in p.client._asm.build(99, [b"whatever"]))
    with pytest.raises(ProtocolError, match="unknown frame tag 99"):
        p.server.receive_data(frame)
    assert p.server.state is State.CLOSED


@pytest.mark.parametrize("kind,mode", MODES)
def test_control_frame_with_extra_segments_is_rejected(kind: str, mode: str) -> None:
    p = established(kind, mode)
    frame = b"".join(bytes(c) for c in p.client._asm.build(Tag.ACK, [bytes(8), b"extra"]))
    with pytest.raises(ProtocolError, match="more than one segment"):
        p.server.receive_data(frame)


def test_ident_missing_features() -> None:
    p = make_pair("psk", "crc")
    p.server.config.required_features = 1 << 62
    p.client.config.features = 0xFFFF
    with pytest.raises(ProtocolError,
                       match=r"server requires features we lack: 0x4000000000000000"):
        p.pump()
