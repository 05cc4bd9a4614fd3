"""Events returned by :class:`pynbd.msgr2.connection.Connection` (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

from pynbd.msgr2.encoding import EntityAddr, EntityAddrVec
from pynbd.msgr2.payloads import MessageHeader2


@dataclass(frozen=True)
class Event:
    """Base class of all events."""


@dataclass(frozen=True)
class BannerReceived(Event):
    supported: int
    required: int


@dataclass(frozen=True)
class HelloReceived(Event):
    peer_type: int
    #: our address as the peer sees it
    my_addr: EntityAddr


@dataclass(frozen=True)
class AuthCompleted(Event):
    global_id: int
    con_mode: int
    method: int


@dataclass(frozen=True)
class SessionEstablished(Event):
    peer_addrs: EntityAddrVec
    peer_gid: int
    peer_features: int
    lossy: bool
    #: True when an existing session was resumed (RECONNECT_OK, or a repeated CLIENT_IDENT)
    reconnected: bool
    #: number of unacknowledged messages (re)sent right after establishment
    resent: int
    client_cookie: int
    server_cookie: int


@dataclass(frozen=True)
class MessageReceived(Event):
    header: MessageHeader2
    front: memoryview
    middle: memoryview
    data: memoryview
    #: the receive buffer the views point into (see Connection.release)
    buffer: bytearray | None = None


@dataclass(frozen=True)
class KeepaliveReceived(Event):
    sec: int
    nsec: int


@dataclass(frozen=True)
class KeepaliveAckReceived(Event):
    sec: int
    nsec: int


@dataclass(frozen=True)
class AckReceived(Event):
    seq: int


@dataclass(frozen=True)
class SessionWasReset(Event):
    """The server reset our session (SESSION_RESET). With ``full`` the unacknowledged
    messages were dropped: the application lost them."""

    full: bool
    dropped: int


@dataclass(frozen=True)
class WaitRequested(Event):
    """The server answered WAIT: close this connection and retry later."""


@dataclass(frozen=True)
class SessionTakenOver(Event):
    """(server) A reconnect moved a session to this connection; ``previous_owner`` is the
    connection that held it (close it)."""

    previous_owner: object


@dataclass(frozen=True)
class FrameAborted(Event):
    tag: int
