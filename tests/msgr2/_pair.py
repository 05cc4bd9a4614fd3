"""Helpers: drive a client and a server Connection against each other in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pynbd.msgr2.auth import AuthNone, PskAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AddrType, ConMode, EntityType
from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec
from pynbd.msgr2.events import Event
from pynbd.msgr2.session import Session, SessionRegistry

KEY = bytes(range(32))
SERVER_ADDR = EntityAddr(AddrType.MSGR2, 1234, "127.0.0.1", 3300)

MODES = [("none", "crc"), ("psk", "crc"), ("psk", "secure")]


def auth_for(kind: str) -> AuthNone | PskAuth:
    return AuthNone() if kind == "none" else PskAuth(KEY)


def client_config(kind: str, mode: str) -> ConnectionConfig:
    return ConnectionConfig(
        auth_client=auth_for(kind),
        modes=(ConMode.SECURE,) if mode == "secure" else (ConMode.CRC,),
        target_addr=SERVER_ADDR,
    )


def server_config(kind: str, registry: SessionRegistry | None = None) -> ConnectionConfig:
    return ConnectionConfig(
        entity_type=EntityType.OSD,
        auth_server=auth_for(kind),
        my_addrs=EntityAddrVec((SERVER_ADDR,)),
        registry=registry if registry is not None else SessionRegistry(),
    )


def wire(conn: Connection) -> bytes:
    return b"".join(bytes(c) for c in conn.data_to_send())


@dataclass
class Pair:
    client: Connection
    server: Connection
    cev: list[Event] = field(default_factory=list)
    sev: list[Event] = field(default_factory=list)

    def pump(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            a = wire(self.client)
            b = wire(self.server)
            if not a and not b:
                return
            if a:
                self.sev += self.server.receive_data(a)
            if b:
                self.cev += self.client.receive_data(b)
        raise AssertionError("connections did not settle")


def make_pair(kind: str = "psk", mode: str = "crc", *, session: Session | None = None,
              registry: SessionRegistry | None = None, lossless: bool = True) -> Pair:
    s = session if session is not None else Session(lossless=lossless)
    c = Connection(Role.CLIENT, client_config(kind, mode), s)
    srv = Connection(Role.SERVER, server_config(kind, registry))
    return Pair(c, srv)


def established(kind: str = "psk", mode: str = "crc", **kw: object) -> Pair:
    p = make_pair(kind, mode, **kw)  # type: ignore[arg-type]
    p.pump()
    assert p.client.ready and p.server.ready, (p.cev, p.sev)
    return p


def rand(n: int) -> bytes:
    return os.urandom(n)
