"""The AUTH phase of a msgr2 connection: the AUTH_REQUEST / AUTH_REQUEST_MORE /
AUTH_REPLY_MORE / AUTH_DONE / AUTH_BAD_METHOD exchange, for both roles.

The client offers one method and its connection modes in order of preference; the server
takes the method if it allows it and picks the first offered mode allowed for it (else
AUTH_BAD_METHOD lists what it allows); both then drive the method's handshake object
(:mod:`pynbd.msgr2.auth`) until it is done. Replies go out through the ``send`` the
connection passes in, and the finished exchange is an :class:`AuthOutcome`. Switching to
secure mode and the AUTH_SIGNATURE check belong to the connection: they touch its frame
streams.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pynbd.msgr2.auth import (
    EOPNOTSUPP,
    AuthResult,
    ClientAuth,
    Done,
    More,
    Reject,
    ServerAuth,
    ServerHandshake,
)
from pynbd.msgr2.constants import Tag
from pynbd.msgr2.errors import AuthenticationError, ProtocolError
from pynbd.msgr2.payloads import (
    AuthBadMethod,
    AuthDone,
    AuthReplyMore,
    AuthRequest,
    AuthRequestMore,
)

#: queues a control frame payload (one of :mod:`pynbd.msgr2.payloads`)
Send = Callable[[object], None]

CLIENT_TAGS = (Tag.AUTH_REPLY_MORE, Tag.AUTH_DONE, Tag.AUTH_BAD_METHOD)
SERVER_TAGS = (Tag.AUTH_REQUEST, Tag.AUTH_REQUEST_MORE)


@dataclass(frozen=True)
class AuthOutcome:
    """Authentication succeeded: the peer's global id, the connection mode, the method's
    result (session key, connection secret) and the method used."""

    global_id: int
    con_mode: int
    result: AuthResult
    method: int


class ClientAuthExchange:
    """The client's side: :meth:`start` sends AUTH_REQUEST; feed each AUTH_* frame to
    :meth:`on_frame` until it returns the outcome."""

    def __init__(self, auth: ClientAuth, peer_type: int, modes: tuple[int, ...],
                 send: Send) -> None:
        self._hs = auth.handshake(peer_type)
        self._modes = modes
        self._send = send

    def start(self) -> None:
        payload = self._hs.start()
        self._send(AuthRequest(self._hs.method, self._modes, payload))

    def on_frame(self, tag: Tag, seg0: memoryview) -> AuthOutcome | None:
        hs = self._hs
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
            self._send(AuthRequestMore(hs.more(more.payload)))
            return None
        done = AuthDone.decode(seg0)
        if done.con_mode not in self._modes:
            raise ProtocolError(f"server chose connection mode {done.con_mode}, not offered")
        result = hs.done(done.global_id, done.con_mode, done.payload)
        return AuthOutcome(done.global_id, done.con_mode, result, hs.method)


class ServerAuthExchange:
    """The server's side: feed each AUTH_REQUEST(_MORE) frame to :meth:`on_frame`; it
    answers through ``send`` and returns the outcome once AUTH_DONE went out. A client
    that fails authentication gets AUTH_BAD_METHOD, then AuthenticationError is raised."""

    def __init__(self, auth: ServerAuth, send: Send) -> None:
        self._auth = auth
        self._send = send
        self._hs: ServerHandshake | None = None
        self._method = 0
        self._mode = 0

    def on_frame(self, tag: Tag, seg0: memoryview) -> AuthOutcome | None:
        auth = self._auth
        if tag is Tag.AUTH_REQUEST:
            req = AuthRequest.decode(seg0)
            hs = auth.server_handshake(req.method) if req.method in auth.methods else None
            allowed = auth.allowed_modes(req.method) if hs is not None else ()
            mode = next((m for m in req.preferred_modes if m in allowed), None)
            if hs is None or mode is None:
                self._send(AuthBadMethod(req.method, -EOPNOTSUPP, tuple(auth.methods),
                                         tuple(auth.allowed_modes(auth.methods[0]))))
                return None
            self._hs = hs
            self._method = req.method
            self._mode = mode
            step = hs.start(req.payload, mode)
        else:
            if self._hs is None:
                raise ProtocolError("AUTH_REQUEST_MORE before AUTH_REQUEST")
            step = self._hs.more(AuthRequestMore.decode(seg0).payload)
        if isinstance(step, More):
            self._send(AuthReplyMore(step.payload))
            return None
        if isinstance(step, Done):
            self._send(AuthDone(step.global_id, self._mode, step.payload))
            return AuthOutcome(step.global_id, self._mode, step.result, self._method)
        assert isinstance(step, Reject)
        self._send(AuthBadMethod(self._method, step.result, tuple(auth.methods),
                                 tuple(auth.allowed_modes(self._method))))
        raise AuthenticationError(f"client failed authentication: {step.reason}")
