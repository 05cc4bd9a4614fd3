"""Protocol errors: who broke the rules.

``PeerProtocolError`` means the bytes that arrived violate the NBD spec: the peer is
broken or hostile and the connection cannot continue. ``LocalProtocolError`` means this
side's code asked the state machine for something invalid in its current state (a bug in
the caller). ``NBDRequestError`` is an ordinary error reply from the server to one
request; the connection stays usable.
"""

from __future__ import annotations

import errno as _errno
import os


class ProtocolError(Exception):
    """Base class of every error raised by the NBD protocol core."""


class PeerProtocolError(ProtocolError):
    """The peer sent something the spec does not allow; drop the connection."""


class LocalProtocolError(ProtocolError):
    """This side misused the state machine (wrong state, invalid argument)."""


class OptionError(ProtocolError):
    """The server refused an option during negotiation (NBD_REP_ERR_*)."""

    def __init__(self, option: int, reply: int, message: str = "") -> None:
        from pynbd.protocol.constants import Opt, Rep

        try:
            opt_name = Opt(option).name
        except ValueError:
            opt_name = hex(option)
        try:
            rep_name = Rep(reply).name
        except ValueError:
            rep_name = hex(reply)
        text = f"server refused NBD_OPT_{opt_name}: NBD_REP_{rep_name}"
        if message:
            text += f" ({message})"
        super().__init__(text)
        self.option = option
        self.reply = reply
        self.message = message


class NBDRequestError(ProtocolError, OSError):
    """An NBD error reply to one request. ``errno`` is the host errno value."""

    def __init__(self, nbd_error: int, message: str = "", command: str = "",
                 offset: int | None = None) -> None:
        from pynbd.protocol.constants import nbd_to_errno

        host = nbd_to_errno(nbd_error)
        name = _errno.errorcode.get(host, str(host))
        text = f"{command or 'request'} failed: {name} ({os.strerror(host)})"
        if offset is not None:
            text += f" at offset {offset}"
        if message:
            text += f": {message}"
        OSError.__init__(self, host, text)
        self.nbd_error = nbd_error
        self.server_message = message
        self.command = command
        self.error_offset = offset

    def __str__(self) -> str:
        return str(self.strerror)
