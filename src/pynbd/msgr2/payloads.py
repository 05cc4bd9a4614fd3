"""Payloads of the msgr2 control frames and the message header (ceph_msg_header2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.constants import SIGNATURE_LEN, Tag
from pynbd.msgr2.encoding import (
    EntityAddr,
    EntityAddrVec,
    Reader,
    blob,
    i32,
    u8,
    u32,
    u32_list,
    u64,
)
from pynbd.msgr2.errors import ProtocolError


def _r(buf: Buffer, tag: Tag) -> Reader:
    return Reader(buf, tag.name)


@dataclass(frozen=True)
class Hello:
    entity_type: int
    peer_addr: EntityAddr
    TAG = Tag.HELLO

    def encode(self) -> bytes:
        return u8(self.entity_type) + self.peer_addr.encode()

    @classmethod
    def decode(cls, buf: Buffer) -> Hello:
        r = _r(buf, cls.TAG)
        return cls(r.u8(), EntityAddr.decode(r))


@dataclass(frozen=True)
class AuthRequest:
    method: int
    preferred_modes: tuple[int, ...]
    payload: bytes
    TAG = Tag.AUTH_REQUEST

    def encode(self) -> bytes:
        return u32(self.method) + u32_list(self.preferred_modes) + blob(self.payload)

    @classmethod
    def decode(cls, buf: Buffer) -> AuthRequest:
        r = _r(buf, cls.TAG)
        return cls(r.u32(), tuple(r.u32_list()), r.blob())


@dataclass(frozen=True)
class AuthBadMethod:
    method: int
    result: int
    allowed_methods: tuple[int, ...]
    allowed_modes: tuple[int, ...]
    TAG = Tag.AUTH_BAD_METHOD

    def encode(self) -> bytes:
        return (u32(self.method) + i32(self.result) + u32_list(self.allowed_methods)
                + u32_list(self.allowed_modes))

    @classmethod
    def decode(cls, buf: Buffer) -> AuthBadMethod:
        r = _r(buf, cls.TAG)
        return cls(r.u32(), r.i32(), tuple(r.u32_list()), tuple(r.u32_list()))


@dataclass(frozen=True)
class AuthReplyMore:
    payload: bytes
    TAG = Tag.AUTH_REPLY_MORE

    def encode(self) -> bytes:
        return blob(self.payload)

    @classmethod
    def decode(cls, buf: Buffer) -> AuthReplyMore:
        return cls(_r(buf, cls.TAG).blob())


@dataclass(frozen=True)
class AuthRequestMore:
    payload: bytes
    TAG = Tag.AUTH_REQUEST_MORE

    def encode(self) -> bytes:
        return blob(self.payload)

    @classmethod
    def decode(cls, buf: Buffer) -> AuthRequestMore:
        return cls(_r(buf, cls.TAG).blob())


@dataclass(frozen=True)
class AuthDone:
    global_id: int
    con_mode: int
    payload: bytes
    TAG = Tag.AUTH_DONE

    def encode(self) -> bytes:
        return u64(self.global_id) + u32(self.con_mode) + blob(self.payload)

    @classmethod
    def decode(cls, buf: Buffer) -> AuthDone:
        r = _r(buf, cls.TAG)
        return cls(r.u64(), r.u32(), r.blob())


@dataclass(frozen=True)
class AuthSignature:
    signature: bytes
    TAG = Tag.AUTH_SIGNATURE

    def encode(self) -> bytes:
        return self.signature

    @classmethod
    def decode(cls, buf: Buffer) -> AuthSignature:
        r = _r(buf, cls.TAG)
        return cls(r.raw(SIGNATURE_LEN))


@dataclass(frozen=True)
class ClientIdent:
    addrs: EntityAddrVec
    target_addr: EntityAddr
    gid: int
    global_seq: int
    supported_features: int
    required_features: int
    flags: int
    cookie: int
    TAG = Tag.CLIENT_IDENT

    def encode(self) -> bytes:
        return (self.addrs.encode() + self.target_addr.encode()
                + struct.pack("<qQQQQQ", self.gid, self.global_seq, self.supported_features,
                              self.required_features, self.flags, self.cookie))

    @classmethod
    def decode(cls, buf: Buffer) -> ClientIdent:
        r = _r(buf, cls.TAG)
        addrs = EntityAddrVec.decode(r)
        target = EntityAddr.decode(r)
        return cls(addrs, target, r.i64(), r.u64(), r.u64(), r.u64(), r.u64(), r.u64())


@dataclass(frozen=True)
class ServerIdent:
    addrs: EntityAddrVec
    gid: int
    global_seq: int
    supported_features: int
    required_features: int
    flags: int
    cookie: int
    TAG = Tag.SERVER_IDENT

    def encode(self) -> bytes:
        return self.addrs.encode() + struct.pack(
            "<qQQQQQ", self.gid, self.global_seq, self.supported_features,
            self.required_features, self.flags, self.cookie)

    @classmethod
    def decode(cls, buf: Buffer) -> ServerIdent:
        r = _r(buf, cls.TAG)
        addrs = EntityAddrVec.decode(r)
        return cls(addrs, r.i64(), r.u64(), r.u64(), r.u64(), r.u64(), r.u64())


@dataclass(frozen=True)
class SessionReconnect:
    addrs: EntityAddrVec
    client_cookie: int
    server_cookie: int
    global_seq: int
    connect_seq: int
    msg_seq: int
    TAG = Tag.SESSION_RECONNECT

    def encode(self) -> bytes:
        return self.addrs.encode() + struct.pack(
            "<QQQQQ", self.client_cookie, self.server_cookie, self.global_seq,
            self.connect_seq, self.msg_seq)

    @classmethod
    def decode(cls, buf: Buffer) -> SessionReconnect:
        r = _r(buf, cls.TAG)
        addrs = EntityAddrVec.decode(r)
        return cls(addrs, r.u64(), r.u64(), r.u64(), r.u64(), r.u64())


@dataclass(frozen=True)
class _U64Frame:
    value: int

    def encode(self) -> bytes:
        return u64(self.value)


@dataclass(frozen=True)
class IdentMissingFeatures(_U64Frame):
    TAG = Tag.IDENT_MISSING_FEATURES

    @classmethod
    def decode(cls, buf: Buffer) -> IdentMissingFeatures:
        return cls(_r(buf, cls.TAG).u64())


@dataclass(frozen=True)
class SessionRetry(_U64Frame):
    """value = connect_seq"""

    TAG = Tag.SESSION_RETRY

    @classmethod
    def decode(cls, buf: Buffer) -> SessionRetry:
        return cls(_r(buf, cls.TAG).u64())


@dataclass(frozen=True)
class SessionRetryGlobal(_U64Frame):
    """value = global_seq"""

    TAG = Tag.SESSION_RETRY_GLOBAL

    @classmethod
    def decode(cls, buf: Buffer) -> SessionRetryGlobal:
        return cls(_r(buf, cls.TAG).u64())


@dataclass(frozen=True)
class SessionReconnectOk(_U64Frame):
    """value = last message seq received"""

    TAG = Tag.SESSION_RECONNECT_OK

    @classmethod
    def decode(cls, buf: Buffer) -> SessionReconnectOk:
        return cls(_r(buf, cls.TAG).u64())


@dataclass(frozen=True)
class Ack(_U64Frame):
    TAG = Tag.ACK

    @classmethod
    def decode(cls, buf: Buffer) -> Ack:
        return cls(_r(buf, cls.TAG).u64())


@dataclass(frozen=True)
class SessionReset:
    full: bool
    TAG = Tag.SESSION_RESET

    def encode(self) -> bytes:
        return u8(1 if self.full else 0)

    @classmethod
    def decode(cls, buf: Buffer) -> SessionReset:
        return cls(bool(_r(buf, cls.TAG).u8()))


@dataclass(frozen=True)
class Wait:
    TAG = Tag.WAIT

    def encode(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, buf: Buffer) -> Wait:
        return cls()


@dataclass(frozen=True)
class Keepalive2:
    sec: int
    nsec: int
    TAG = Tag.KEEPALIVE2

    def encode(self) -> bytes:
        return struct.pack("<II", self.sec, self.nsec)

    @classmethod
    def decode(cls, buf: Buffer) -> Keepalive2:
        r = _r(buf, cls.TAG)
        return cls(r.u32(), r.u32())


@dataclass(frozen=True)
class Keepalive2Ack:
    sec: int
    nsec: int
    TAG = Tag.KEEPALIVE2_ACK

    def encode(self) -> bytes:
        return struct.pack("<II", self.sec, self.nsec)

    @classmethod
    def decode(cls, buf: Buffer) -> Keepalive2Ack:
        r = _r(buf, cls.TAG)
        return cls(r.u32(), r.u32())


_HDR2 = struct.Struct("<QQHHHIHQBHH")


@dataclass(frozen=True)
class MessageHeader2:
    """ceph_msg_header2 (41 bytes)."""

    seq: int
    tid: int
    type: int
    priority: int = 127
    version: int = 1
    data_pre_padding_len: int = 0
    data_off: int = 0
    ack_seq: int = 0
    flags: int = 0
    compat_version: int = 1
    reserved: int = 0

    def encode(self) -> bytes:
        return _HDR2.pack(self.seq, self.tid, self.type, self.priority, self.version,
                          self.data_pre_padding_len, self.data_off, self.ack_seq, self.flags,
                          self.compat_version, self.reserved)

    @classmethod
    def decode(cls, buf: Buffer) -> MessageHeader2:
        if len(buf) != _HDR2.size:
            raise ProtocolError(f"MESSAGE header is {len(buf)} bytes, expected {_HDR2.size}")
        return cls(*_HDR2.unpack(buf))


CONTROL_PAYLOADS: dict[int, type] = {
    c.TAG: c
    for c in (Hello, AuthRequest, AuthBadMethod, AuthReplyMore, AuthRequestMore, AuthDone,
              AuthSignature, ClientIdent, ServerIdent, SessionReconnect, IdentMissingFeatures,
              SessionRetry, SessionRetryGlobal, SessionReconnectOk, Ack, SessionReset, Wait,
              Keepalive2, Keepalive2Ack)
}
