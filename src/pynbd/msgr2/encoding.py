"""Ceph's little-endian encoding primitives, entity addresses and names.

:class:`Reader` bounds-checks every read and raises :class:`ProtocolError` on short or
malformed input, so decoding peer data never raises anything else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from pynbd.msgr2._types import Buffer
from pynbd.msgr2.constants import AddrType
from pynbd.msgr2.errors import ProtocolError, UsageError

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

AF_INET_CEPH = 2
AF_INET6_CEPH = 10


def u8(v: int) -> bytes:
    return _U8.pack(v)


def u16(v: int) -> bytes:
    return _U16.pack(v)


def u32(v: int) -> bytes:
    return _U32.pack(v)


def i32(v: int) -> bytes:
    return _I32.pack(v)


def u64(v: int) -> bytes:
    return _U64.pack(v)


def i64(v: int) -> bytes:
    return _I64.pack(v)


def blob(data: Buffer) -> bytes:
    """A bufferlist / string: le32 length + bytes."""
    return _U32.pack(len(data)) + bytes(data)


def string(s: str) -> bytes:
    return blob(s.encode())


def u32_list(values: list[int] | tuple[int, ...]) -> bytes:
    return _U32.pack(len(values)) + b"".join(_U32.pack(v) for v in values)


class Reader:
    """Bounds-checked sequential decoder over a buffer."""

    __slots__ = ("_buf", "_end", "pos", "what")

    def __init__(self, buf: Buffer, what: str = "payload") -> None:
        self._buf = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
        self._end = len(self._buf)
        self.pos = 0
        self.what = what

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self._end:
            raise ProtocolError(
                f"{self.what}: truncated (need {n} bytes at offset {self.pos}, "
                f"have {self._end - self.pos})"
            )
        mv = self._buf[self.pos : self.pos + n]
        self.pos += n
        return mv

    def remaining(self) -> int:
        return self._end - self.pos

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def i32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def i64(self) -> int:
        return int(_I64.unpack(self._take(8))[0])

    def raw(self, n: int) -> bytes:
        return bytes(self._take(n))

    def blob(self, limit: int = 1 << 26) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{self.what}: length {n} past limit {limit}")
        return self.raw(n)

    def string(self, limit: int = 1 << 20) -> str:
        data = self.blob(limit)
        try:
            return data.decode()
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"{self.what}: string is not UTF-8") from exc

    def u32_list(self, limit: int = 64) -> list[int]:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{self.what}: list of {n} entries past limit {limit}")
        return [self.u32() for _ in range(n)]

    def rest(self) -> bytes:
        return self.raw(self.remaining())

    def expect_end(self) -> None:
        if self.pos != self._end:
            raise ProtocolError(f"{self.what}: {self._end - self.pos} trailing bytes")


@dataclass(frozen=True)
class EntityAddr:
    """entity_addr_t (IPv4 or IPv6 socket address, or none)."""

    type: int = AddrType.NONE
    nonce: int = 0
    host: str = ""
    port: int = 0

    def encode(self) -> bytes:
        if not self.host:
            sockaddr = b""
        else:
            ip = ipaddress.ip_address(self.host)
            if ip.version == 4:
                sockaddr = (
                    u16(AF_INET_CEPH) + struct.pack(">H", self.port) + ip.packed + bytes(8)
                )
            else:
                sockaddr = (
                    u16(AF_INET6_CEPH) + struct.pack(">H", self.port) + bytes(4) + ip.packed
                    + bytes(4)
                )
        body = u32(self.type) + u32(self.nonce) + blob(sockaddr)
        # marker 1, struct_v 1, compat 1, le32 length
        return b"\x01\x01\x01" + blob(body)

    @classmethod
    def decode(cls, r: Reader) -> EntityAddr:
        marker = r.u8()
        if marker != 1:
            raise ProtocolError(f"entity_addr_t: unsupported marker {marker} (legacy encoding)")
        r.u8()  # struct_v
        compat = r.u8()
        if compat > 1:
            raise ProtocolError(f"entity_addr_t: unsupported compat version {compat}")
        body = Reader(r.blob(1024), "entity_addr_t")
        typ = body.u32()
        nonce = body.u32()
        sa = Reader(body.blob(128), "sockaddr")
        host = ""
        port = 0
        if sa.remaining() >= 2:
            family = sa.u16()
            if family == AF_INET_CEPH:
                port = struct.unpack(">H", sa.raw(2))[0]
                host = str(ipaddress.IPv4Address(sa.raw(4)))
            elif family == AF_INET6_CEPH:
                port = struct.unpack(">H", sa.raw(2))[0]
                sa.raw(4)
                host = str(ipaddress.IPv6Address(sa.raw(16)))
        return cls(typ, nonce, host, port)


@dataclass(frozen=True)
class EntityAddrVec:
    """entity_addrvec_t."""

    addrs: tuple[EntityAddr, ...] = ()

    def encode(self) -> bytes:
        return b"\x02" + u32(len(self.addrs)) + b"".join(a.encode() for a in self.addrs)

    @classmethod
    def decode(cls, r: Reader) -> EntityAddrVec:
        marker = r.u8()
        if marker == 1:  # a single entity_addr_t is accepted as a one-element vector
            r.pos -= 1
            return cls((EntityAddr.decode(r),))
        if marker != 2:
            raise ProtocolError(f"entity_addrvec_t: unsupported marker {marker}")
        n = r.u32()
        if n > 16:
            raise ProtocolError(f"entity_addrvec_t: {n} addresses is too many")
        return cls(tuple(EntityAddr.decode(r) for _ in range(n)))


@dataclass(frozen=True)
class EntityName:
    """EntityName: type + id string (``client.admin`` -> CLIENT, ``admin``)."""

    type: int
    id: str

    @classmethod
    def parse(cls, text: str) -> EntityName:
        from pynbd.msgr2.constants import EntityType

        kind, sep, ident = text.partition(".")
        types = {"client": EntityType.CLIENT, "mon": EntityType.MON, "osd": EntityType.OSD,
                 "mds": EntityType.MDS, "mgr": EntityType.MGR}
        if not sep or kind not in types:
            raise UsageError(f"bad entity name {text!r}: expected TYPE.ID, e.g. client.admin")
        return cls(int(types[kind]), ident)

    def __str__(self) -> str:
        names = {1: "mon", 2: "mds", 4: "osd", 8: "client", 16: "mgr"}
        return f"{names.get(self.type, str(self.type))}.{self.id}"

    def encode(self) -> bytes:
        return u32(self.type) + string(self.id)

    @classmethod
    def decode(cls, r: Reader) -> EntityName:
        return cls(r.u32(), r.string(4096))
