"""Exceptions: the peer broke the protocol vs. the caller misused the API."""

from __future__ import annotations


class Msgr2Error(Exception):
    """Base class of every msgr2 error."""


class ProtocolError(Msgr2Error):
    """The peer sent something the protocol forbids (bad crc, bad tag, bad GCM tag, a frame
    out of phase, a length past the configured maximum, ...). The connection must be closed."""


class AuthenticationError(ProtocolError):
    """Authentication failed (wrong key, rejected method, bad signature)."""


class UsageError(Msgr2Error):
    """The caller used the API wrongly (sent a message before the session was established,
    gave an invalid argument, ...). Nothing was put on the wire."""


class ConnectionClosedError(Msgr2Error):
    """The connection (or the session, after giving up reconnecting) is closed."""


class SessionResetError(ConnectionClosedError):
    """The peer reset the session: queued messages may have been lost."""
