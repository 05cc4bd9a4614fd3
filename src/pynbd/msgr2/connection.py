"""The sans-I/O msgr2.1 connection state machine (client and server roles).

Feed received bytes with :meth:`Connection.receive_data` (or receive straight into
:meth:`Connection.recv_buffer` and call :meth:`Connection.received`), act on the returned
events, and write out whatever :meth:`Connection.data_to_send` returns.

The connection owns the phases' order (banner, hello, auth, auth signature, ident, ready),
its frame streams, the switch to secure mode and the ready phase (messages, acks,
keepalives). Each handshake phase's rules live in their own module: :mod:`.banner`,
:mod:`.auth_exchange` (method and mode), :mod:`.ident` (establishing or resuming a
session).
"""

from __future__ import annotations

import enum
import hmac
import os
from dataclasses import dataclass, field

from pynbd.msgr2 import auth_exchange, ident
from pynbd.msgr2._types import Buffer
from pynbd.msgr2.auth import AuthResult, ClientAuth, ServerAuth, auth_signature
from pynbd.msgr2.auth_exchange import (
    AuthOutcome,
    ClientAuthExchange,
    ServerAuthExchange,
)
from pynbd.msgr2.banner import BannerReader, banner_bytes
from pynbd.msgr2.constants import (
    CEPH_FEATURES_ALL,
    MSG_HEADER2_LEN,
    SEGMENT_ALIGN_DEFAULT,
    SEGMENT_ALIGN_PAGE,
    AddrType,
    ConMode,
    EntityType,
    Tag,
)
from pynbd.msgr2.crypto import split_connection_secret
from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec
from pynbd.msgr2.errors import (
    AuthenticationError,
    ConnectionClosedError,
    ProtocolError,
    UsageError,
)
from pynbd.msgr2.events import (
    AckReceived,
    AuthCompleted,
    BannerReceived,
    Event,
    HelloReceived,
    KeepaliveAckReceived,
    KeepaliveReceived,
    MessageReceived,
    SessionEstablished,
    SessionTakenOver,
    WaitRequested,
)
from pynbd.msgr2.frames import (
    DEFAULT_MAX_SEGMENT_LEN,
    BufferPool,
    Frame,
    FrameAssembler,
    FrameReader,
)
from pynbd.msgr2.payloads import (
    Ack,
    AuthSignature,
    Hello,
    Keepalive2,
    Keepalive2Ack,
    MessageHeader2,
)
from pynbd.msgr2.session import OutMessage, Session, SessionRegistry


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    BANNER = "banner"
    HELLO = "hello"
    AUTH = "auth"
    AUTH_SIGNATURE = "auth_signature"
    IDENT = "ident"
    READY = "ready"
    CLOSED = "closed"


@dataclass
class ConnectionConfig:
    """Settings of one connection. Client: set ``auth_client`` (and ``target_addr``, the
    server's address with its exact nonce, which Ceph checks). Server: set ``auth_server``,
    ``my_addrs`` and (for lossless sessions) ``registry``."""

    entity_type: int = EntityType.CLIENT
    auth_client: ClientAuth | None = None
    auth_server: ServerAuth | None = None
    #: client: connection modes in order of preference
    modes: tuple[int, ...] = (ConMode.CRC,)
    target_addr: EntityAddr = field(default_factory=EntityAddr)
    my_addrs: EntityAddrVec = field(default_factory=EntityAddrVec)
    #: our address nonce (client: sent in CLIENT_IDENT)
    nonce: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "little"))
    gid: int = 0
    features: int = CEPH_FEATURES_ALL
    required_features: int = 0
    max_segment_len: int = DEFAULT_MAX_SEGMENT_LEN
    registry: SessionRegistry | None = None


class Connection:
    """One msgr2.1 connection. ``session`` carries cookies, sequence numbers and the
    unacknowledged messages across reconnects (client: pass the same Session again)."""

    def __init__(self, role: Role, config: ConnectionConfig, session: Session | None = None,
                 peer_socket_addr: EntityAddr | None = None) -> None:
        self.role = role
        self.peer_socket_addr = peer_socket_addr or EntityAddr()
        self.config = config
        self.state = State.BANNER
        self.is_client = role is Role.CLIENT
        if self.is_client and config.auth_client is None:
            raise UsageError("a client connection needs auth_client")
        if not self.is_client and config.auth_server is None:
            raise UsageError("a server connection needs auth_server")
        self.session: Session | None = session
        if self.is_client and session is None:
            self.session = Session(lossless=False)
        self.con_mode = ConMode.UNKNOWN
        self.peer_type = 0
        self.peer_supported = 0
        self.global_id = 0
        self.my_addr_seen = EntityAddr()
        self._out: list[Buffer] = []
        #: large buffers for ciphertext we send / frames we receive (see recycle/release)
        self.tx_pool = BufferPool()
        self.rx_pool = BufferPool()
        self._asm = FrameAssembler(self.tx_pool)
        self._reader = FrameReader(config.max_segment_len, self.rx_pool)
        self._reader.record = True
        self._rx_record: bytearray | None = bytearray()
        self._tx_record: bytearray | None = bytearray()
        self._banner = BannerReader()
        self._client_auth: ClientAuthExchange | None = None
        self._server_auth: ServerAuthExchange | None = None
        if config.auth_server is not None and not self.is_client:
            self._server_auth = ServerAuthExchange(config.auth_server, self._send_control)
        self._auth_result: AuthResult | None = None
        self._pending: list[OutMessage] = []
        self._ack_due = False
        self._events: list[Event] = []
        if self.is_client:
            assert self.session is not None
            self.session.global_seq += 1
        self._send_raw(banner_bytes())

    # ------------------------------------------------------------------ output
    def data_to_send(self) -> list[Buffer]:
        """Bytes to write, in order. Large chunks may come from :attr:`tx_pool`; once one
        is written out and no longer referenced, :meth:`recycle` it (optional)."""
        out, self._out = self._out, []
        return out

    def recycle(self, chunk: Buffer) -> None:
        """Return a chunk from :meth:`data_to_send` to the pool (caller must not keep it)."""
        if isinstance(chunk, memoryview):
            self.tx_pool.put(chunk)

    def release(self, event: MessageReceived) -> None:
        """The application is done with a received message's views: reuse its buffer."""
        if event.buffer is not None:
            self.rx_pool.put(event.buffer)

    def _send_raw(self, data: bytes) -> None:
        if self._tx_record is not None:
            self._tx_record += data
        self._out.append(data)

    def _send_frame(self, tag: Tag, *segments: Buffer, aligns: list[int] | None = None) -> None:
        chunks = self._asm.build(tag, segments, aligns)
        if self._tx_record is not None:
            for c in chunks:
                self._tx_record += c
        self._out.extend(chunks)

    def _send_control(self, payload: object) -> None:
        self._send_frame(payload.TAG, payload.encode())  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ input
    def recv_buffer(self) -> memoryview:
        """Where the next bytes belong (exactly the rest of the current unit): receive
        into it, then call :meth:`received`."""
        self._check_open()
        if self.state is State.BANNER:
            return self._banner.buffer()
        return self._reader.buffer()

    def received(self, n: int) -> list[Event]:
        """``n`` bytes were written into :meth:`recv_buffer`."""
        self._check_open()
        try:
            if self.state is State.BANNER:
                banner = self._banner.advance(n)
                if banner is not None:
                    self._on_banner(banner)
            else:
                frame = self._reader.advance(n)
                if frame is not None:
                    self._on_frame(frame)
            self._flush_ack()
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return self._take_events()

    def receive_data(self, data: Buffer) -> list[Event]:
        """Feed received bytes (any amount); returns the resulting events."""
        self._check_open()
        mv = memoryview(data).cast("B")
        try:
            while len(mv) and self.state is not State.CLOSED:
                if self.state is State.BANNER:
                    n, banner = self._banner.feed(mv)
                    mv = mv[n:]
                    if banner is not None:
                        self._on_banner(banner)
                    continue
                n, frame = self._reader.feed(mv)
                mv = mv[n:]
                if frame is not None:
                    self._on_frame(frame)
            self._flush_ack()
        except ProtocolError:
            self.state = State.CLOSED
            raise
        return self._take_events()

    def _take_events(self) -> list[Event]:
        ev, self._events = self._events, []
        return ev

    def _check_open(self) -> None:
        if self.state is State.CLOSED:
            raise ConnectionClosedError("connection is closed")

    def close(self) -> None:
        """Mark the connection closed (the caller closes the transport)."""
        self.state = State.CLOSED
        s = self.session
        if s is not None and s.owner is self:
            s.owner = None

    @property
    def wants(self) -> int:
        """How many bytes complete the unit being received."""
        if self.state is State.BANNER:
            return self._banner.want()
        return self._reader.want()

    # ------------------------------------------------------------------ banner
    def _on_banner(self, banner: BannerReceived) -> None:
        if self._rx_record is not None:
            self._rx_record += self._banner.raw
        self.peer_supported = banner.supported
        self._events.append(banner)
        self.state = State.HELLO
        self._send_control(Hello(self.config.entity_type, self._peer_addr_for_hello()))

    def _peer_addr_for_hello(self) -> EntityAddr:
        if self.is_client:
            return self.config.target_addr
        return self.peer_socket_addr

    # ------------------------------------------------------------------ frames
    def _on_frame(self, frame: Frame) -> None:
        if self._rx_record is not None:
            self._rx_record += frame.raw
        tag = Tag(frame.tag)
        seg0 = frame.segments[0]
        if tag is not Tag.MESSAGE and len(frame.segments) > 1 and any(
            len(s) for s in frame.segments[1:]
        ):
            raise ProtocolError(f"control frame {tag.name} has more than one segment")
        st = self.state
        if st is State.READY:
            self._on_ready_frame(tag, frame)
            return
        if st is State.HELLO and tag is Tag.HELLO:
            h = Hello.decode(seg0)
            self.peer_type = h.entity_type
            self.my_addr_seen = h.peer_addr
            self._events.append(HelloReceived(h.entity_type, h.peer_addr))
            self.state = State.AUTH
            if self.is_client:
                self._client_start_auth()
            return
        if st is State.AUTH and self._auth_frame(tag, seg0):
            return
        if st is State.AUTH_SIGNATURE and tag is Tag.AUTH_SIGNATURE:
            self._on_signature(AuthSignature.decode(seg0))
            return
        if st is State.IDENT:
            if self.is_client and tag in ident.CLIENT_TAGS:
                self._client_ident_frame(tag, seg0)
                return
            if not self.is_client and tag in ident.SERVER_TAGS:
                self._server_ident_frame(tag, seg0)
                return
        if tag in (Tag.KEEPALIVE2,) and st in (State.IDENT,):
            self._on_keepalive(seg0)
            return
        raise ProtocolError(f"frame {tag.name} out of phase (connection state {st.value})")

    # ------------------------------------------------------------------ auth
    def _client_start_auth(self) -> None:
        auth = self.config.auth_client
        assert auth is not None
        self._client_auth = ClientAuthExchange(auth, self.peer_type, tuple(self.config.modes),
                                               self._send_control)
        self._client_auth.start()

    def _auth_frame(self, tag: Tag, seg0: memoryview) -> bool:
        """An AUTH_* frame of the peer's role (False: not one)."""
        x: ClientAuthExchange | ServerAuthExchange | None
        if self.is_client:
            x = self._client_auth if tag in auth_exchange.CLIENT_TAGS else None
        else:
            x = self._server_auth if tag in auth_exchange.SERVER_TAGS else None
        if x is None:
            return False
        outcome = x.on_frame(tag, seg0)
        if outcome is not None:
            self._finish_auth(outcome)
        return True

    def _finish_auth(self, outcome: AuthOutcome) -> None:
        """AUTH_DONE sent (server) or received (client): switch mode, send our signature."""
        mode, result = outcome.con_mode, outcome.result
        self.global_id = outcome.global_id
        self._auth_result = result
        self.con_mode = ConMode(mode)
        if mode == ConMode.SECURE:
            if not result.con_secret:
                raise ProtocolError("secure mode chosen but the auth method gave no secret")
            rx, tx = split_connection_secret(result.con_secret, self.is_client)
            self._reader.rx = rx
            self._reader._reset_unit()
            self._asm.tx = tx
        rx_rec = bytes(self._rx_record or b"")
        self._rx_record = None
        self._reader.record = False
        self._events.append(AuthCompleted(self.global_id, mode, outcome.method))
        self.state = State.AUTH_SIGNATURE
        self._tx_record_final = bytes(self._tx_record or b"")
        self._tx_record = None
        self._send_control(AuthSignature(auth_signature(result.session_key, rx_rec)))

    def _on_signature(self, sig: AuthSignature) -> None:
        assert self._auth_result is not None
        expect = auth_signature(self._auth_result.session_key, self._tx_record_final)
        if not hmac.compare_digest(expect, sig.signature):
            raise AuthenticationError("peer's AUTH_SIGNATURE does not match what we sent")
        self.state = State.IDENT
        if self.is_client:
            self._client_send_ident()

    # ------------------------------------------------------------------ ident (client)
    def _my_addrs(self) -> EntityAddrVec:
        seen = self.my_addr_seen
        return EntityAddrVec((EntityAddr(AddrType.ANY, self.config.nonce, seen.host, 0),))

    def _client_send_ident(self) -> None:
        s = self.session
        assert s is not None
        self._send_control(ident.client_ident(s, self.config, self._my_addrs(), self.global_id))

    def _client_ident_frame(self, tag: Tag, seg0: memoryview) -> None:
        s = self.session
        assert s is not None
        step = ident.client_on_ident(s, self.config.required_features, tag, seg0)
        if isinstance(step, ident.Established):
            self._become_ready(step.reconnected, step.lossy)
        elif isinstance(step, ident.IdentAgain):
            if step.reset is not None:
                self._events.append(step.reset)
            self._client_send_ident()
        else:
            self._events.append(WaitRequested())
            self.state = State.CLOSED

    # ------------------------------------------------------------------ ident (server)
    def _server_ident_frame(self, tag: Tag, seg0: memoryview) -> None:
        reply, est = ident.server_on_ident(self.config, self, tag, seg0)
        if est is not None:
            self.session = est.session
            if est.taken_from is not None:
                self._events.append(SessionTakenOver(est.taken_from))
        self._send_control(reply)
        if est is not None:
            self._become_ready(est.reconnected, est.lossy)

    # ------------------------------------------------------------------ ready
    def _become_ready(self, reconnected: bool, lossy: bool) -> None:
        s = self.session
        assert s is not None
        s.owner = self
        self.state = State.READY
        resend = list(s.unacked) if s.lossless else []
        for m in resend:
            self._write_message(m)
        pending, self._pending = self._pending, []
        for m in pending:
            self._write_message(s.next_out(m))
        self._events.append(SessionEstablished(
            s.peer_addrs, s.peer_gid, s.peer_features, lossy, reconnected, len(resend),
            s.client_cookie, s.server_cookie))

    def _on_ready_frame(self, tag: Tag, frame: Frame) -> None:
        s = self.session
        assert s is not None
        if s.owner is not self:
            raise ConnectionClosedError("session moved to another connection")
        seg0 = frame.segments[0]
        if tag is Tag.MESSAGE:
            self._on_message(frame)
        elif tag is Tag.ACK:
            seq = Ack.decode(seg0).value
            s.ack(seq)
            self._events.append(AckReceived(seq))
        elif tag is Tag.KEEPALIVE2:
            self._on_keepalive(seg0)
        elif tag is Tag.KEEPALIVE2_ACK:
            k = Keepalive2Ack.decode(seg0)
            self._events.append(KeepaliveAckReceived(k.sec, k.nsec))
        else:
            raise ProtocolError(f"frame {tag.name} out of phase (connection state ready)")

    def _on_keepalive(self, seg0: memoryview) -> None:
        k = Keepalive2.decode(seg0)
        self._send_control(Keepalive2Ack(k.sec, k.nsec))
        self._events.append(KeepaliveReceived(k.sec, k.nsec))

    def _on_message(self, frame: Frame) -> None:
        s = self.session
        assert s is not None
        segs = frame.segments
        if len(segs[0]) != MSG_HEADER2_LEN:
            raise ProtocolError(f"MESSAGE header segment is {len(segs[0])} bytes, not 41")
        hdr = MessageHeader2.decode(segs[0])
        if hdr.ack_seq and s.lossless:
            s.ack(hdr.ack_seq)
        if hdr.seq <= s.in_seq:
            return  # duplicate after a reconnect: already delivered
        if s.lossless and hdr.seq != s.in_seq + 1:
            raise ProtocolError(f"message seq {hdr.seq} skips ahead of {s.in_seq + 1}")
        s.in_seq = hdr.seq
        if s.lossless:
            self._ack_due = True
        empty = memoryview(b"")
        self._events.append(MessageReceived(
            hdr, segs[1] if len(segs) > 1 else empty, segs[2] if len(segs) > 2 else empty,
            segs[3] if len(segs) > 3 else empty, frame.buffer))

    def _flush_ack(self) -> None:
        if self._ack_due and self.state is State.READY:
            self._ack_due = False
            s = self.session
            assert s is not None
            self._send_control(Ack(s.in_seq))

    def _write_message(self, m: OutMessage) -> None:
        s = self.session
        assert s is not None
        hdr = MessageHeader2(m.seq, m.tid, m.type, m.priority, m.version, 0, 0, s.in_seq, 0,
                             m.compat_version)
        self._ack_due = False
        self._send_frame(Tag.MESSAGE, hdr.encode(), m.front, m.middle, m.data,
                         aligns=[SEGMENT_ALIGN_DEFAULT, SEGMENT_ALIGN_DEFAULT,
                                 SEGMENT_ALIGN_DEFAULT, SEGMENT_ALIGN_PAGE])

    # ------------------------------------------------------------------ public sending
    @property
    def ready(self) -> bool:
        return self.state is State.READY

    def send_message(self, msg_type: int, front: Buffer = b"", data: Buffer = b"",
                     middle: Buffer = b"", *, tid: int = 0, priority: int = 127,
                     version: int = 1, compat_version: int = 1) -> None:
        """Queue a message (sent at once when the session is established)."""
        self._check_open()
        if not 0 <= msg_type < 1 << 16:
            raise UsageError(f"message type {msg_type} does not fit in 16 bits")
        for part in (front, middle, data):
            if len(part) > self.config.max_segment_len:
                raise UsageError(f"message part of {len(part)} bytes exceeds max_segment_len")
        m = OutMessage(0, msg_type, front, middle, data, tid, priority, version, compat_version)
        if self.state is State.READY:
            s = self.session
            assert s is not None
            self._write_message(s.next_out(m))
        else:
            self._pending.append(m)

    def send_keepalive(self, now: float) -> None:
        """Queue a KEEPALIVE2 stamped ``now`` (wall-clock seconds, as Ceph stamps it;
        the core has no clock: the driver passes it)."""
        self._check_open()
        if self.state is not State.READY:
            raise UsageError("keepalive before the session is established")
        self._send_control(Keepalive2(int(now) & 0xFFFFFFFF, int((now % 1) * 1e9)))

    def send_ack(self) -> None:
        self._check_open()
        if self.state is not State.READY:
            raise UsageError("ACK before the session is established")
        s = self.session
        assert s is not None
        self._send_control(Ack(s.in_seq))
