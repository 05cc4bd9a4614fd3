"""Ceph's msgr2.1 wire protocol as a sans-I/O core: frames, the connection state
machine, sessions, auth (none, pre-shared key, the cephx client). Nothing here does I/O
or reads a clock: callers feed bytes in, take bytes out, and pass ``now`` in.

The asyncio driver is its own package, not imported here: ``from pynbd.msgr2.aio import
Msgr2Client, Msgr2Server``. Ceph as an application (ceph.conf, keyrings, the monitor
client) is :mod:`pynbd.ceph`. See docs/msgr2.md.
"""

from pynbd.msgr2.auth import AuthNone, CephxAuth, CryptoKey, PskAuth
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.constants import AuthMethod, ConMode, EntityType, MsgType, Tag
from pynbd.msgr2.errors import (
    AuthenticationError,
    ConnectionClosedError,
    Msgr2Error,
    ProtocolError,
    SessionResetError,
    UsageError,
)
from pynbd.msgr2.session import Session, SessionRegistry

__all__ = [
    "AuthMethod",
    "AuthNone",
    "AuthenticationError",
    "CephxAuth",
    "ConMode",
    "Connection",
    "ConnectionClosedError",
    "ConnectionConfig",
    "CryptoKey",
    "EntityType",
    "MsgType",
    "Msgr2Error",
    "ProtocolError",
    "PskAuth",
    "Role",
    "Session",
    "SessionRegistry",
    "SessionResetError",
    "Tag",
    "UsageError",
]
