"""Ceph's msgr2.1 wire protocol: a sans-I/O core (frames, connection state machine,
sessions, auth none / pre-shared key / cephx client) and an asyncio layer (``aio``).

See docs/msgr2.md. The asyncio layer is not imported here: ``from pynbd.msgr2.aio import
Msgr2Client, Msgr2Server``.
"""

from pynbd.msgr2.auth import AuthNone, CephxAuth, CryptoKey, PskAuth, read_keyring
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
    "read_keyring",
]
