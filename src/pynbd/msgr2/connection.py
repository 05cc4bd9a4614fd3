"""The sans-I/O msgr2.1 connection state machine (client and server roles).

Feed received bytes with :meth:`Connection.receive_data` (or receive straight into
:meth:`Connection.recv_buffer` and call :meth:`Connection.received`), act on the returned
events, and write out whatever :meth:`Connection.data_to_send` returns.

(Longer than most modules, ~700 lines, on purpose: it is one class, the state machine of
both roles through every phase -- banner, hello, auth, ident/reconnect, ready -- and the
phases share its frame streams, crypto and session; payload codecs, auth methods and
session bookkeeping already live in their own modules.)
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
from dataclasses import dataclass, field

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.auth import (
    EOPNOTSUPP,
    AuthResult,
    ClientAuth,
    ClientHandshake,
    Done,
    More,
    Reject,
    ServerAuth,
    ServerHandshake,
    auth_signature,
)
from pynbd.msgr2.constants import (
    BANNER_PAYLOAD_LEN,
    BANNER_PREFIX,
    CEPH_FEATURES_ALL,
    MSG_CONNECT_LOSSY,
    MSG_HEADER2_LEN,
    MSGR2_REQUIRED,
    MSGR2_SUPPORTED,
    SEGMENT_ALIGN_DEFAULT,
    SEGMENT_ALIGN_PAGE,
    AddrType,
    ConMode,
    EntityType,
    Msgr2Feature,
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
    SessionWasReset,
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
    AuthBadMethod,
    AuthDone,
    AuthReplyMore,
    AuthRequest,
    AuthRequestMore,
    AuthSignature,
    ClientIdent,
    Hello,
    IdentMissingFeatures,
    Keepalive2,
    Keepalive2Ack,
    MessageHeader2,
    ServerIdent,
    SessionReconnect,
    SessionReconnectOk,
    SessionReset,
    SessionRetry,
    SessionRetryGlobal,
    Wait,
)
from pynbd.msgr2.session import OutMessage, Session, SessionRegistry, random_cookie

_BANNER_HEAD = struct.Struct("<8sH")
_BANNER_BODY = struct.Struct("<QQ")


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
        self._banner = bytearray(_BANNER_HEAD.size)
        self._banner_have = 0
        self._banner_body = False
        self._client_hs: ClientHandshake | None = None
        self._server_hs: ServerHandshake | None = None
        self._server_method = 0
        self._auth_result: AuthResult | None = None
        self._pending: list[OutMessage] = []
        self._ack_due = False
        self._events: list[Event] = []
        if self.is_client:
            assert self.session is not None
            self.session.global_seq += 1
        self._send_raw(_BANNER_HEAD.pack(BANNER_PREFIX, BANNER_PAYLOAD_LEN)
                       + _BANNER_BODY.pack(MSGR2_SUPPORTED, MSGR2_REQUIRED))

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
            return memoryview(self._banner)[self._banner_have :]
        return self._reader.buffer()

    def received(self, n: int) -> list[Event]:
        """``n`` bytes were written into :meth:`recv_buffer`."""
        self._check_open()
        try:
            if self.state is State.BANNER:
                self._banner_have += n
                if self._banner_have == len(self._banner):
                    self._on_banner_unit()
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
                    n = min(len(mv), len(self._banner) - self._banner_have)
                    self._banner[self._banner_have : self._banner_have + n] = mv[:n]
                    self._banner_have += n
                    mv = mv[n:]
                    if self._banner_have == len(self._banner):
                        self._on_banner_unit()
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
            return len(self._banner) - self._banner_have
        return self._reader.want()

    # ------------------------------------------------------------------ banner
    def _on_banner_unit(self) -> None:
        if not self._banner_body:
            prefix, length = _BANNER_HEAD.unpack(self._banner)
            if prefix != BANNER_PREFIX:
                if prefix.startswith(b"ceph v"):
                    raise ProtocolError(f"peer speaks msgr1 ({bytes(prefix)!r}), not msgr2")
                raise ProtocolError(f"bad banner {bytes(prefix)!r}: not a msgr2 peer")
            if not BANNER_PAYLOAD_LEN <= length <= 4096:
                raise ProtocolError(f"bad banner payload length {length}")
            if self._rx_record is not None:
                self._rx_record += self._banner
            self._banner = bytearray(length)
            self._banner_have = 0
            self._banner_body = True
            return
        if self._rx_record is not None:
            self._rx_record += self._banner
        supported, required = _BANNER_BODY.unpack_from(self._banner)
        self.peer_supported = supported
        if required & ~MSGR2_SUPPORTED:
            raise ProtocolError(f"peer requires msgr2 features 0x{required:x} we lack")
        if not supported & Msgr2Feature.REVISION_1:
            raise ProtocolError("peer speaks only msgr2.0 frames, which pynbd does not support")
        self._events.append(BannerReceived(supported, required))
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
        if st is State.AUTH:
            if self.is_client and tag in (Tag.AUTH_REPLY_MORE, Tag.AUTH_DONE, Tag.AUTH_BAD_METHOD):
                self._client_auth_frame(tag, seg0)
                return
            if not self.is_client and tag in (Tag.AUTH_REQUEST, Tag.AUTH_REQUEST_MORE):
                self._server_auth_frame(tag, seg0)
                return
        if st is State.AUTH_SIGNATURE and tag is Tag.AUTH_SIGNATURE:
            self._on_signature(AuthSignature.decode(seg0))
            return
        if st is State.IDENT:
            if self.is_client and tag in (
                Tag.SERVER_IDENT, Tag.IDENT_MISSING_FEATURES, Tag.SESSION_RECONNECT_OK,
                Tag.SESSION_RETRY, Tag.SESSION_RETRY_GLOBAL, Tag.SESSION_RESET, Tag.WAIT,
            ):
                self._client_ident_frame(tag, seg0)
                return
            if not self.is_client and tag in (Tag.CLIENT_IDENT, Tag.SESSION_RECONNECT):
                self._server_ident_frame(tag, seg0)
                return
        if tag in (Tag.KEEPALIVE2,) and st in (State.IDENT,):
            self._on_keepalive(seg0)
            return
        raise ProtocolError(f"frame {tag.name} out of phase (connection state {st.value})")

    # ------------------------------------------------------------------ auth (client)
    def _client_start_auth(self) -> None:
        auth = self.config.auth_client
        assert auth is not None
        self._client_hs = auth.handshake(self.peer_type)
        payload = self._client_hs.start()
        self._send_control(AuthRequest(self._client_hs.method, tuple(self.config.modes), payload))

    def _client_auth_frame(self, tag: Tag, seg0: memoryview) -> None:
        hs = self._client_hs
        assert hs is not None
        if tag is Tag.AUTH_BAD_METHOD:
            bad = AuthBadMethod.decode(seg0)
            why = {-13: "permission denied: wrong key or unknown entity",
                   -95: "method or mode not supported"}.get(bad.result, f"error {bad.result}")
            raise AuthenticationError(
                f"server rejected auth method {bad.method} ({why}); it allows methods "
                f"{list(bad.allowed_methods)} and modes {list(bad.allowed_modes)}"
            )
        if tag is Tag.AUTH_REPLY_MORE:
            more = AuthReplyMore.decode(seg0)
            self._send_control(AuthRequestMore(hs.more(more.payload)))
            return
        done = AuthDone.decode(seg0)
        if done.con_mode not in self.config.modes:
            raise ProtocolError(f"server chose connection mode {done.con_mode}, not offered")
        result = hs.done(done.global_id, done.con_mode, done.payload)
        self.global_id = done.global_id
        self._finish_auth(done.con_mode, result, hs.method)

    def _finish_auth(self, mode: int, result: AuthResult, method: int) -> None:
        """AUTH_DONE sent (server) or received (client): switch mode, send our signature."""
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
        self._events.append(AuthCompleted(self.global_id, mode, method))
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

    # ------------------------------------------------------------------ auth (server)
    def _server_auth_frame(self, tag: Tag, seg0: memoryview) -> None:
        auth = self.config.auth_server
        assert auth is not None
        if tag is Tag.AUTH_REQUEST:
            req = AuthRequest.decode(seg0)
            hs = auth.server_handshake(req.method) if req.method in auth.methods else None
            allowed = auth.allowed_modes(req.method) if hs is not None else ()
            mode = next((m for m in req.preferred_modes if m in allowed), None)
            if hs is None or mode is None:
                self._send_control(AuthBadMethod(req.method, -EOPNOTSUPP, tuple(auth.methods),
                                                 tuple(auth.allowed_modes(auth.methods[0]))))
                return
            self._server_hs = hs
            self._server_method = req.method
            self._server_mode = mode
            step = hs.start(req.payload, mode)
        else:
            if self._server_hs is None:
                raise ProtocolError("AUTH_REQUEST_MORE before AUTH_REQUEST")
            step = self._server_hs.more(AuthRequestMore.decode(seg0).payload)
        if isinstance(step, More):
            self._send_control(AuthReplyMore(step.payload))
        elif isinstance(step, Done):
            self.global_id = step.global_id
            self._send_control(AuthDone(step.global_id, self._server_mode, step.payload))
            self._finish_auth(self._server_mode, step.result, self._server_method)
        else:
            assert isinstance(step, Reject)
            self._send_control(AuthBadMethod(self._server_method, step.result,
                                             tuple(auth.methods), tuple(auth.allowed_modes(
                                                 self._server_method))))
            raise AuthenticationError(f"client failed authentication: {step.reason}")

    # ------------------------------------------------------------------ ident (client)
    def _my_addrs(self) -> EntityAddrVec:
        seen = self.my_addr_seen
        return EntityAddrVec((EntityAddr(AddrType.ANY, self.config.nonce, seen.host, 0),))

    def _client_send_ident(self) -> None:
        s = self.session
        assert s is not None
        if s.lossless and s.established and s.server_cookie:
            s.connect_seq += 1
            self._send_control(SessionReconnect(self._my_addrs(), s.client_cookie, s.server_cookie,
                                                s.global_seq, s.connect_seq, s.in_seq))
            return
        flags = 0 if s.lossless else MSG_CONNECT_LOSSY
        self._send_control(ClientIdent(
            self._my_addrs(), self.config.target_addr, self.config.gid or self.global_id,
            s.global_seq, self.config.features, self.config.required_features, flags,
            s.client_cookie))

    def _client_ident_frame(self, tag: Tag, seg0: memoryview) -> None:
        s = self.session
        assert s is not None
        if tag is Tag.SERVER_IDENT:
            si = ServerIdent.decode(seg0)
            missing = self.config.required_features & ~si.supported_features
            if missing:
                raise ProtocolError(f"server lacks required features 0x{missing:x}")
            reconnected = s.established
            s.server_cookie = si.cookie
            s.established = True
            s.peer_addrs, s.peer_gid, s.peer_features = si.addrs, si.gid, si.supported_features
            s.in_seq = 0
            s.connect_seq = 0
            s.renumber()
            self._become_ready(reconnected, bool(si.flags & MSG_CONNECT_LOSSY))
        elif tag is Tag.IDENT_MISSING_FEATURES:
            f = IdentMissingFeatures.decode(seg0)
            raise ProtocolError(f"server requires features we lack: 0x{f.value:x}")
        elif tag is Tag.SESSION_RECONNECT_OK:
            ok = SessionReconnectOk.decode(seg0)
            s.ack(ok.value)
            self._become_ready(True, False)
        elif tag is Tag.SESSION_RETRY:
            s.connect_seq = SessionRetry.decode(seg0).value
            self._client_send_ident()
        elif tag is Tag.SESSION_RETRY_GLOBAL:
            s.global_seq = max(s.global_seq, SessionRetryGlobal.decode(seg0).value) + 1
            self._client_send_ident()
        elif tag is Tag.SESSION_RESET:
            r = SessionReset.decode(seg0)
            dropped = 0
            if r.full:
                dropped = s.drop_all()
                s.client_cookie = random_cookie()
            s.server_cookie = 0
            s.connect_seq = 0
            s.in_seq = 0
            s.established = False
            self._events.append(SessionWasReset(r.full, dropped))
            self._client_send_ident()
        elif tag is Tag.WAIT:
            Wait.decode(seg0)
            self._events.append(WaitRequested())
            self.state = State.CLOSED

    # ------------------------------------------------------------------ ident (server)
    def _server_ident_frame(self, tag: Tag, seg0: memoryview) -> None:
        reg = self.config.registry
        if tag is Tag.SESSION_RECONNECT:
            rc = SessionReconnect.decode(seg0)
            s = reg.get(rc.client_cookie) if reg is not None else None
            if s is None or s.server_cookie != rc.server_cookie or not s.lossless:
                self._send_control(SessionReset(True))
                return
            if rc.global_seq <= s.peer_global_seq:
                self._send_control(SessionRetryGlobal(s.peer_global_seq))
                return
            if rc.connect_seq <= s.connect_seq:
                self._send_control(SessionRetry(s.connect_seq))
                return
            s.peer_global_seq = rc.global_seq
            s.connect_seq = rc.connect_seq
            self._adopt(s)
            s.ack(rc.msg_seq)
            self._send_control(SessionReconnectOk(s.in_seq))
            self._become_ready(True, False)
            return
        ci = ClientIdent.decode(seg0)
        missing = self.config.required_features & ~ci.supported_features
        if missing:
            self._send_control(IdentMissingFeatures(missing))
            return
        lossless = not ci.flags & MSG_CONNECT_LOSSY
        existing = reg.get(ci.cookie) if (reg is not None and lossless) else None
        if existing is not None:
            # the client never saw our SERVER_IDENT: same session, new server cookie
            s = existing
            self._adopt(s)
            s.in_seq = 0
            s.renumber()
            reconnected = True
        else:
            s = Session(lossless=lossless, client_cookie=ci.cookie)
            s.owner = self
            if reg is not None and lossless:
                reg.add(s)
            reconnected = False
        s.server_cookie = random_cookie()
        s.peer_global_seq = ci.global_seq
        s.connect_seq = 0
        s.peer_addrs, s.peer_gid, s.peer_features = ci.addrs, ci.gid, ci.supported_features
        s.established = True
        self.session = s
        self._send_control(ServerIdent(
            self.config.my_addrs, self.config.gid, s.peer_global_seq, self.config.features,
            self.config.required_features, 0 if lossless else MSG_CONNECT_LOSSY,
            s.server_cookie))
        self._become_ready(reconnected, not lossless)

    def _adopt(self, s: Session) -> None:
        prev = s.owner
        s.owner = self
        self.session = s
        if prev is not None and prev is not self:
            self._events.append(SessionTakenOver(prev))

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
