"""Authentication methods: ``none``, pynbd's pre-shared key (both roles; see
docs/msgr2-psk-auth.md) and the client side of Ceph's cephx. Pure computation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pynbd.msgr2.constants import AUTH_MODE_MON, AuthMethod, ConMode, EntityType
from pynbd.msgr2.encoding import EntityName, Reader, blob, u8, u16, u32, u64
from pynbd.msgr2.errors import AuthenticationError, ProtocolError, UsageError

EOPNOTSUPP = 95
EACCES = 13
#: length of the connection secret pynbd hands out (Ceph pacific sends 64, uses 40)
CON_SECRET_LEN = 64


@dataclass(frozen=True)
class AuthResult:
    """What a finished handshake yields: the HMAC key for AUTH_SIGNATURE (None: zeros) and
    the connection secret for secure mode (None: crc mode only)."""

    session_key: bytes | None
    con_secret: bytes | None


def auth_signature(session_key: bytes | None, data: bytes) -> bytes:
    if not session_key:
        return bytes(32)
    return hmac.new(session_key, data, hashlib.sha256).digest()


# ----------------------------------------------------------------------------------------
# Interfaces


class ClientHandshake(Protocol):
    method: int

    def start(self) -> bytes: ...

    def more(self, payload: bytes) -> bytes: ...

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult: ...


class ClientAuth(Protocol):
    """Client-side auth provider, shared by all connections of a client."""

    def handshake(self, peer_type: int) -> ClientHandshake: ...


@dataclass(frozen=True)
class More:
    payload: bytes


@dataclass(frozen=True)
class Done:
    global_id: int
    payload: bytes
    result: AuthResult


@dataclass(frozen=True)
class Reject:
    reason: str
    result: int = -EACCES


ServerStep = More | Done | Reject


class ServerHandshake(Protocol):
    def start(self, payload: bytes, con_mode: int) -> ServerStep: ...

    def more(self, payload: bytes) -> ServerStep: ...


class ServerAuth(Protocol):
    """Server-side auth policy: which methods, and a handshake per connection."""

    @property
    def methods(self) -> tuple[int, ...]: ...

    def server_handshake(self, method: int) -> ServerHandshake | None: ...

    def allowed_modes(self, method: int) -> tuple[int, ...]: ...


_global_ids = iter(range(4096, 1 << 62))


def next_global_id() -> int:
    return next(_global_ids)


# ----------------------------------------------------------------------------------------
# none


@dataclass
class _NoneClientHandshake:
    name: EntityName
    peer_type: int
    global_id: int
    method: int = AuthMethod.NONE

    def start(self) -> bytes:
        if self.peer_type == EntityType.MON:
            return u8(AUTH_MODE_MON) + self.name.encode() + u64(self.global_id)
        # to other daemons: an AuthNoneAuthorizer (struct_v 1, name, global_id)
        return u8(1) + self.name.encode() + u64(self.global_id)

    def more(self, payload: bytes) -> bytes:
        raise ProtocolError("auth none: unexpected AUTH_REPLY_MORE")

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        return AuthResult(None, None)


@dataclass
class AuthNone:
    """``auth none``: client and server roles. Only crc mode is possible."""

    name: EntityName = field(default_factory=lambda: EntityName(EntityType.CLIENT, "admin"))
    global_id: int = 0
    methods: tuple[int, ...] = (AuthMethod.NONE,)

    def handshake(self, peer_type: int) -> _NoneClientHandshake:
        return _NoneClientHandshake(self.name, peer_type, self.global_id)

    # server role
    def server_handshake(self, method: int) -> _NoneServerHandshake | None:
        return _NoneServerHandshake() if method == AuthMethod.NONE else None

    def allowed_modes(self, method: int) -> tuple[int, ...]:
        return (ConMode.CRC,)


class _NoneServerHandshake:
    def start(self, payload: bytes, con_mode: int) -> ServerStep:
        return Done(next_global_id(), b"", AuthResult(None, None))

    def more(self, payload: bytes) -> ServerStep:
        return Reject("auth none: unexpected AUTH_REQUEST_MORE")


# ----------------------------------------------------------------------------------------
# pynbd pre-shared key

PSK_VERSION = 1
PSK_NONCE_LEN = 32
_CTX = b"pynbd-msgr2-psk-v1"


def _psk_transcript(key_id: bytes, cn: bytes, sn: bytes) -> bytes:
    return _CTX + u32(len(key_id)) + key_id + cn + sn


def _psk_mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


def _psk_derive(key: bytes, transcript: bytes, label: bytes, n: int) -> bytes:
    salt = hashlib.sha256(transcript).digest()
    return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=_CTX + label).derive(key)


def _psk_result(key: bytes, transcript: bytes) -> AuthResult:
    return AuthResult(
        _psk_derive(key, transcript, b" session key", 32),
        _psk_derive(key, transcript, b" connection secret", CON_SECRET_LEN),
    )


@dataclass
class _PskClientHandshake:
    key_id: bytes
    key: bytes
    method: int = AuthMethod.PYNBD_PSK
    cn: bytes = b""
    transcript: bytes = b""

    def start(self) -> bytes:
        self.cn = os.urandom(PSK_NONCE_LEN)
        return u8(PSK_VERSION) + blob(self.key_id) + self.cn

    def more(self, payload: bytes) -> bytes:
        r = Reader(payload, "psk server challenge")
        if r.u8() != PSK_VERSION:
            raise AuthenticationError("psk: unsupported version from server")
        sn = r.raw(PSK_NONCE_LEN)
        r.expect_end()
        self.transcript = _psk_transcript(self.key_id, self.cn, sn)
        return _psk_mac(self.key, b" client proof", self.transcript)

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        if not self.transcript:
            raise ProtocolError("psk: AUTH_DONE before the challenge")
        expect = _psk_mac(self.key, b" server proof", self.transcript)
        if not hmac.compare_digest(expect, bytes(payload)):
            raise AuthenticationError("psk: server proof is wrong (server has a different key?)")
        return _psk_result(self.key, self.transcript)


@dataclass
class _PskServerHandshake:
    keys: dict[bytes, bytes]
    key_id: bytes = b""
    transcript: bytes = b""

    def start(self, payload: bytes, con_mode: int) -> ServerStep:
        try:
            r = Reader(payload, "psk request")
            if r.u8() != PSK_VERSION:
                return Reject("psk: unsupported version", -EOPNOTSUPP)
            self.key_id = r.blob(256)
            cn = r.raw(PSK_NONCE_LEN)
            r.expect_end()
        except ProtocolError as exc:
            return Reject(str(exc))
        if self.key_id not in self.keys:
            return Reject(f"psk: unknown key id {self.key_id!r}")
        sn = os.urandom(PSK_NONCE_LEN)
        self.transcript = _psk_transcript(self.key_id, cn, sn)
        return More(u8(PSK_VERSION) + sn)

    def more(self, payload: bytes) -> ServerStep:
        if not self.transcript:
            return Reject("psk: AUTH_REQUEST_MORE before AUTH_REQUEST")
        key = self.keys[self.key_id]
        expect = _psk_mac(key, b" client proof", self.transcript)
        if not hmac.compare_digest(expect, bytes(payload)):
            return Reject("psk: client proof is wrong")
        proof = _psk_mac(key, b" server proof", self.transcript)
        return Done(next_global_id(), proof, _psk_result(key, self.transcript))


@dataclass
class PskAuth:
    """Pre-shared-key auth between pynbd peers. Client role uses ``key_id``/``key``; the
    server role accepts any key in ``keys`` (defaults to {key_id: key}). Secure and crc mode."""

    key: bytes
    key_id: bytes = b"pynbd"
    keys: dict[bytes, bytes] | None = None
    modes: tuple[int, ...] = (ConMode.SECURE, ConMode.CRC)
    methods: tuple[int, ...] = (AuthMethod.PYNBD_PSK,)

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise UsageError("a pre-shared key must be at least 16 bytes")
        if self.keys is None:
            self.keys = {self.key_id: self.key}

    def handshake(self, peer_type: int) -> _PskClientHandshake:
        return _PskClientHandshake(self.key_id, self.key)

    def server_handshake(self, method: int) -> _PskServerHandshake | None:
        if method != AuthMethod.PYNBD_PSK:
            return None
        assert self.keys is not None
        return _PskServerHandshake(self.keys)

    def allowed_modes(self, method: int) -> tuple[int, ...]:
        return self.modes


# ----------------------------------------------------------------------------------------
# cephx (client side)

CEPHX_GET_AUTH_SESSION_KEY = 0x0100
CEPHX_GET_PRINCIPAL_SESSION_KEY = 0x0200
CEPHX_ENC_MAGIC = 0xFF009CAD8826AA55
_CEPH_IV = b"cephsageyudagreg"
CRYPTO_AES = 1


@dataclass(frozen=True)
class CryptoKey:
    """Ceph's CryptoKey: le16 type, utime created, le16 len, secret."""

    secret: bytes
    type: int = CRYPTO_AES
    created: tuple[int, int] = (0, 0)

    @classmethod
    def decode(cls, r: Reader) -> CryptoKey:
        typ = r.u16()
        sec, nsec = r.u32(), r.u32()
        secret = r.raw(r.u16())
        if typ != CRYPTO_AES or len(secret) != 16:
            raise ProtocolError(f"cephx: unsupported key (type {typ}, {len(secret)} bytes)")
        return cls(secret, typ, (sec, nsec))

    @classmethod
    def from_base64(cls, text: str) -> CryptoKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except ValueError as exc:
            raise UsageError(f"key is not valid base64: {exc}") from None
        try:
            return cls.decode(Reader(raw, "keyring key"))
        except ProtocolError as exc:
            raise UsageError(f"bad Ceph key: {exc}") from None

    def _cipher(self) -> Cipher[modes.CBC]:
        return Cipher(algorithms.AES(self.secret), modes.CBC(_CEPH_IV))

    def encrypt(self, plain: bytes) -> bytes:
        p = padding.PKCS7(128).padder()
        data = p.update(plain) + p.finalize()
        e = self._cipher().encryptor()
        return e.update(data) + e.finalize()

    def decrypt(self, ct: bytes) -> bytes:
        if len(ct) == 0 or len(ct) % 16:
            raise ProtocolError(f"cephx: ciphertext length {len(ct)} is not a block multiple")
        d = self._cipher().decryptor()
        data = d.update(ct) + d.finalize()
        u = padding.PKCS7(128).unpadder()
        try:
            return u.update(data) + u.finalize()
        except ValueError:
            raise AuthenticationError("cephx: decryption failed (wrong key?)") from None

    def encrypt_enc(self, payload: bytes) -> bytes:
        """Ciphertext of magic header + payload (no length prefix)."""
        return self.encrypt(u8(1) + u64(CEPHX_ENC_MAGIC) + payload)

    def encode_encrypt(self, payload: bytes) -> bytes:
        return blob(self.encrypt_enc(payload))

    def decrypt_enc(self, ct: bytes) -> bytes:
        plain = self.decrypt(ct)
        if len(plain) < 9 or plain[0] != 1 or \
                struct.unpack_from("<Q", plain, 1)[0] != CEPHX_ENC_MAGIC:
            raise AuthenticationError("cephx: bad magic after decryption (wrong key?)")
        return plain[9:]

    def decode_decrypt(self, r: Reader) -> bytes:
        return self.decrypt_enc(r.blob())


@dataclass
class Ticket:
    service: int
    session_key: CryptoKey
    secret_id: int
    blob: bytes


def _decode_ticket_reply(r: Reader, secret: CryptoKey, tickets: dict[int, Ticket]) -> None:
    if r.u8() != 1:
        raise ProtocolError("cephx: unsupported ticket reply version")
    n = r.u32()
    if n > 16:
        raise ProtocolError(f"cephx: {n} tickets is too many")
    for _ in range(n):
        service = r.u32()
        if r.u8() != 1:
            raise ProtocolError("cephx: unsupported ticket version")
        mine = Reader(secret.decode_decrypt(r), "cephx service ticket")
        if mine.u8() != 1:
            raise ProtocolError("cephx: unsupported service ticket version")
        session_key = CryptoKey.decode(mine)
        mine.u32(), mine.u32()  # validity
        if r.u8():  # ticket encrypted with the old session key
            old = tickets.get(service)
            if old is None:
                raise ProtocolError("cephx: encrypted ticket without an old session key")
            tr = Reader(old.session_key.decode_decrypt(r), "cephx ticket blob")
        else:
            tr = r
        tb = Reader(tr.blob(), "cephx ticket blob")
        if tb.u8() != 1:
            raise ProtocolError("cephx: unsupported ticket blob version")
        secret_id = tb.u64()
        tblob = tb.blob()
        tickets[service] = Ticket(service, session_key, secret_id, tblob)


def _ticket_blob(t: Ticket | None) -> bytes:
    if t is None:
        return u8(1) + u64(0) + u32(0)
    return u8(1) + u64(t.secret_id) + blob(t.blob)


@dataclass
class _CephxMonHandshake:
    owner: CephxAuth
    method: int = AuthMethod.CEPHX
    server_challenge: int | None = None

    def start(self) -> bytes:
        o = self.owner
        return u8(AUTH_MODE_MON) + o.name.encode() + u64(o.global_id)

    def more(self, payload: bytes) -> bytes:
        r = Reader(payload, "cephx server challenge")
        r.u8()
        self.server_challenge = r.u64()
        client_challenge = int.from_bytes(os.urandom(8), "little")
        enc = self.owner.key.encode_encrypt(u64(self.server_challenge) + u64(client_challenge))
        proof = 0
        for i in range(len(enc) // 8):
            proof ^= struct.unpack_from("<Q", enc, i * 8)[0]
        want = self.owner.want_keys & ~EntityType.AUTH
        return (u16(CEPHX_GET_AUTH_SESSION_KEY) + u8(3) + u64(client_challenge) + u64(proof)
                + _ticket_blob(self.owner.tickets.get(EntityType.AUTH)) + u32(want))

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        o = self.owner
        r = Reader(payload, "cephx AUTH_DONE")
        op = r.u16()
        status = r.i32()
        if status != 0:
            raise AuthenticationError(f"cephx: the monitor refused authentication ({status})")
        if op != CEPHX_GET_AUTH_SESSION_KEY:
            raise ProtocolError(f"cephx: unexpected reply op 0x{op:x}")
        _decode_ticket_reply(r, o.key, o.tickets)
        o.global_id = global_id
        auth = o.tickets.get(EntityType.AUTH)
        if auth is None:
            raise ProtocolError("cephx: no AUTH ticket in the reply")
        con_secret = None
        if r.remaining():
            enc = r.blob()
            if enc:
                cs = Reader(auth.session_key.decode_decrypt(Reader(enc, "cephx secret")),
                            "cephx connection secret")
                con_secret = cs.blob(4096) or None
            svc = r.blob()
            if svc:
                _decode_ticket_reply(Reader(svc, "cephx service tickets"), auth.session_key,
                                     o.tickets)
        return AuthResult(auth.session_key.secret, con_secret)


@dataclass
class _CephxAuthorizerHandshake:
    owner: CephxAuth
    ticket: Ticket
    method: int = AuthMethod.CEPHX
    nonce: int = 0

    def _authorizer(self, challenge: int | None) -> bytes:
        t = self.ticket
        inner = u8(2) + u64(self.nonce)
        inner += (u8(1) + u64((challenge + 1) & ((1 << 64) - 1))) if challenge is not None \
            else (u8(0) + u64(0))
        return (u8(1) + u64(self.owner.global_id) + u32(t.service) + _ticket_blob(t)
                + t.session_key.encode_encrypt(inner))

    def start(self) -> bytes:
        self.nonce = int.from_bytes(os.urandom(8), "little")
        return self._authorizer(None)

    def more(self, payload: bytes) -> bytes:
        r = Reader(self.ticket.session_key.decrypt_enc(payload), "cephx authorizer challenge")
        r.u8()
        return self._authorizer(r.u64())

    def done(self, global_id: int, con_mode: int, payload: bytes) -> AuthResult:
        r = Reader(self.ticket.session_key.decode_decrypt(Reader(payload, "cephx reply")),
                   "cephx authorizer reply")
        v = r.u8()
        if r.u64() != (self.nonce + 1) & ((1 << 64) - 1):
            raise AuthenticationError("cephx: the daemon failed to prove it knows the ticket")
        con_secret = r.blob(4096) if v >= 2 else None
        return AuthResult(self.ticket.session_key.secret, con_secret)


@dataclass
class CephxAuth:
    """cephx client: authenticates to a monitor (getting tickets for ``want_keys``), then
    builds authorizers for other daemons (OSD, MGR) from those tickets."""

    name: EntityName
    key: CryptoKey
    want_keys: int = EntityType.MON | EntityType.OSD | EntityType.MGR | EntityType.AUTH
    global_id: int = 0
    tickets: dict[int, Ticket] = field(default_factory=dict)

    def handshake(self, peer_type: int) -> _CephxMonHandshake | _CephxAuthorizerHandshake:
        if peer_type == EntityType.MON:
            return _CephxMonHandshake(self)
        t = self.tickets.get(peer_type)
        if t is None:
            raise UsageError(
                f"cephx: no ticket for entity type {peer_type}: authenticate to a monitor first"
            )
        return _CephxAuthorizerHandshake(self, t)
