"""What a backend failure becomes on one connection: an ``OSError`` is the NBD error
its errno maps to (logged as a warning); anything else is a bug in the backend, EIO
for that request only, with its traceback logged once per kind and export.
"""

from __future__ import annotations

import logging

from pynbd.protocol.constants import Cmd, Errno, errno_to_nbd
from pynbd.protocol.server import Command
from pynbd.server.conn_state import _FAST_ZERO, ConnState
from pynbd.server.logsafe import safe

log = logging.getLogger("pynbd.server")


class ErrorsMixin(ConnState):
    """Error replies for :class:`~pynbd.server.connection.Connection`."""

    def _bug(self, ev: Command, exc: BaseException) -> bytes:
        """The backend raised something other than OSError (even SystemExit): EIO for
        this request; the connection and the server carry on. The traceback is logged
        once per kind."""
        self.counters.errors += 1
        self._log_bug(ev.cmd, exc)
        return self.proto.error_reply(ev.cookie, Errno.EIO,
                                      f"{ev.cmd.name} failed: internal error in the backend",
                                      ev.offset)

    def _log_bug(self, cmd: Cmd, exc: BaseException) -> None:
        """Log a backend bug: with its traceback the first time this kind (command,
        exception class) happens on the export, in one debug line afterwards."""
        rt = self.runtime
        key = (cmd, type(exc))
        if rt is not None and key not in rt.bugs_logged:
            rt.bugs_logged.add(key)
            log.error("%s: the backend raised %s in %s: %s (a bug in the backend; the "
                      "client gets EIO)", self.peer, type(exc).__name__, cmd.name,
                      safe(exc), exc_info=exc)
        else:
            log.debug("%s: backend raised %s in %s: %s", self.peer, type(exc).__name__,
                      cmd.name, safe(exc))

    def _error(self, ev: Command, exc: OSError) -> bytes:
        self.counters.errors += 1
        err = errno_to_nbd(exc.errno)
        if ev.cmd is Cmd.WRITE_ZEROES and ev.flags & _FAST_ZERO and err == Errno.ENOTSUP:
            log.debug("%s: fast zero refused", self.peer)
        else:
            log.warning("%s: %s offset %d length %d failed: %s", self.peer, ev.cmd.name,
                        ev.offset, ev.length, exc)
        return self.proto.error_reply(ev.cookie, err,
                                      f"{ev.cmd.name} failed: {exc.strerror or exc}", ev.offset)
