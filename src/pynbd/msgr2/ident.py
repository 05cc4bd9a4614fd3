"""The IDENT phase of a msgr2 connection: establishing a session, or resuming one.

Client: CLIENT_IDENT for a new session, SESSION_RECONNECT to resume an established
lossless one; then the server's SERVER_IDENT / SESSION_RECONNECT_OK establish it,
SESSION_RETRY(_GLOBAL) and SESSION_RESET make the client send its ident again, WAIT ends
the attempt. Server: finds the lossless session a client reconnects to in the registry
(or tells it to retry or reset), or starts a new one. These functions keep the
:class:`~pynbd.msgr2.session.Session` books (cookies, sequence numbers, acknowledged
messages); the connection sends what they return and goes ready on :class:`Established`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pynbd.msgr2.constants import MSG_CONNECT_LOSSY, Tag
from pynbd.msgr2.encoding import EntityAddrVec
from pynbd.msgr2.errors import ProtocolError
from pynbd.msgr2.events import SessionWasReset
from pynbd.msgr2.payloads import (
    ClientIdent,
    IdentMissingFeatures,
    ServerIdent,
    SessionReconnect,
    SessionReconnectOk,
    SessionReset,
    SessionRetry,
    SessionRetryGlobal,
    Wait,
)
from pynbd.msgr2.session import Session, SessionRegistry, random_cookie

if TYPE_CHECKING:
    from pynbd.msgr2.connection import ConnectionConfig

#: the frames a client expects in the IDENT phase (and a server)
CLIENT_TAGS = (Tag.SERVER_IDENT, Tag.IDENT_MISSING_FEATURES, Tag.SESSION_RECONNECT_OK,
               Tag.SESSION_RETRY, Tag.SESSION_RETRY_GLOBAL, Tag.SESSION_RESET, Tag.WAIT)
SERVER_TAGS = (Tag.CLIENT_IDENT, Tag.SESSION_RECONNECT)


@dataclass(frozen=True)
class Established:
    """The session is established: the connection goes ready."""

    session: Session
    reconnected: bool
    lossy: bool
    #: (server) the connection that owned the session until now, if another one did
    taken_from: object | None = None


@dataclass(frozen=True)
class IdentAgain:
    """(client) Send our ident again; after SESSION_RESET, with the event to report."""

    reset: SessionWasReset | None = None


@dataclass(frozen=True)
class PeerWaits:
    """(client) The server answered WAIT: it is connecting to us itself."""


# ---------------------------------------------------------------------------- client
def client_ident(s: Session, config: ConnectionConfig, my_addrs: EntityAddrVec,
                 global_id: int) -> ClientIdent | SessionReconnect:
    """What the client sends: SESSION_RECONNECT to resume, else CLIENT_IDENT."""
    if s.lossless and s.established and s.server_cookie:
        s.connect_seq += 1
        return SessionReconnect(my_addrs, s.client_cookie, s.server_cookie, s.global_seq,
                                s.connect_seq, s.in_seq)
    flags = 0 if s.lossless else MSG_CONNECT_LOSSY
    return ClientIdent(my_addrs, config.target_addr, config.gid or global_id, s.global_seq,
                       config.features, config.required_features, flags, s.client_cookie)


def client_on_ident(s: Session, required_features: int, tag: Tag,
                    seg0: memoryview) -> Established | IdentAgain | PeerWaits:
    """The server's answer to our ident (``tag`` is one of CLIENT_TAGS)."""
    if tag is Tag.SERVER_IDENT:
        si = ServerIdent.decode(seg0)
        missing = required_features & ~si.supported_features
        if missing:
            raise ProtocolError(f"server lacks required features 0x{missing:x}")
        reconnected = s.established
        s.server_cookie = si.cookie
        s.established = True
        s.peer_addrs, s.peer_gid, s.peer_features = si.addrs, si.gid, si.supported_features
        s.in_seq = 0
        s.connect_seq = 0
        s.renumber()
        return Established(s, reconnected, bool(si.flags & MSG_CONNECT_LOSSY))
    if tag is Tag.IDENT_MISSING_FEATURES:
        f = IdentMissingFeatures.decode(seg0)
        raise ProtocolError(f"server requires features we lack: 0x{f.value:x}")
    if tag is Tag.SESSION_RECONNECT_OK:
        s.ack(SessionReconnectOk.decode(seg0).value)
        return Established(s, True, False)
    if tag is Tag.SESSION_RETRY:
        s.connect_seq = SessionRetry.decode(seg0).value
        return IdentAgain()
    if tag is Tag.SESSION_RETRY_GLOBAL:
        s.global_seq = max(s.global_seq, SessionRetryGlobal.decode(seg0).value) + 1
        return IdentAgain()
    if tag is Tag.SESSION_RESET:
        r = SessionReset.decode(seg0)
        dropped = 0
        if r.full:
            dropped = s.drop_all()
            s.client_cookie = random_cookie()
        s.server_cookie = 0
        s.connect_seq = 0
        s.in_seq = 0
        s.established = False
        return IdentAgain(SessionWasReset(r.full, dropped))
    assert tag is Tag.WAIT, tag
    Wait.decode(seg0)
    return PeerWaits()


# ---------------------------------------------------------------------------- server
def server_on_ident(config: ConnectionConfig, owner: object, tag: Tag,
                    seg0: memoryview) -> tuple[object, Established | None]:
    """A client's CLIENT_IDENT or SESSION_RECONNECT (``owner``: the connection it came
    on): the reply to send, and the session if that reply establishes it."""
    reg = config.registry
    if tag is Tag.SESSION_RECONNECT:
        return _server_reconnect(reg, owner, SessionReconnect.decode(seg0))
    ci = ClientIdent.decode(seg0)
    missing = config.required_features & ~ci.supported_features
    if missing:
        return IdentMissingFeatures(missing), None
    lossless = not ci.flags & MSG_CONNECT_LOSSY
    existing = reg.get(ci.cookie) if (reg is not None and lossless) else None
    taken: object | None = None
    if existing is not None:
        # the client never saw our SERVER_IDENT: same session, new server cookie
        s = existing
        taken = _adopt(s, owner)
        s.in_seq = 0
        s.renumber()
        reconnected = True
    else:
        s = Session(lossless=lossless, client_cookie=ci.cookie)
        s.owner = owner
        if reg is not None and lossless:
            reg.add(s)
        reconnected = False
    s.server_cookie = random_cookie()
    s.peer_global_seq = ci.global_seq
    s.connect_seq = 0
    s.peer_addrs, s.peer_gid, s.peer_features = ci.addrs, ci.gid, ci.supported_features
    s.established = True
    reply = ServerIdent(config.my_addrs, config.gid, s.peer_global_seq, config.features,
                        config.required_features, 0 if lossless else MSG_CONNECT_LOSSY,
                        s.server_cookie)
    return reply, Established(s, reconnected, not lossless, taken)


def _server_reconnect(reg: SessionRegistry | None, owner: object,
                      rc: SessionReconnect) -> tuple[object, Established | None]:
    s = reg.get(rc.client_cookie) if reg is not None else None
    if s is None or s.server_cookie != rc.server_cookie or not s.lossless:
        return SessionReset(True), None
    if rc.global_seq <= s.peer_global_seq:
        return SessionRetryGlobal(s.peer_global_seq), None
    if rc.connect_seq <= s.connect_seq:
        return SessionRetry(s.connect_seq), None
    s.peer_global_seq = rc.global_seq
    s.connect_seq = rc.connect_seq
    taken = _adopt(s, owner)
    s.ack(rc.msg_seq)
    return SessionReconnectOk(s.in_seq), Established(s, True, False, taken)


def _adopt(s: Session, owner: object) -> object | None:
    """Move ``s`` to ``owner``: the connection that had it, if another one did."""
    prev = s.owner
    s.owner = owner
    return prev if prev is not None and prev is not owner else None
