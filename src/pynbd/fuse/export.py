"""The NBD side of ``pynbd fuse``: one export seen as one fixed-size file.

Nothing here knows about FUSE; :mod:`pynbd.fuse.mount` turns kernel requests into calls
on :class:`ExportFile`, which is a block device's semantics over the blocking client:

* ``read``/``write`` clip at the end of the export (a write that starts at or past the
  end fails with ENOSPC, like a block device);
* ``fsync`` is NBD_CMD_FLUSH (a no-op when the server has no flush);
* ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` is NBD_CMD_TRIM followed by NBD_CMD_WRITE_ZEROES
  (see :meth:`ExportFile.fallocate`), ``ZERO_RANGE`` is NBD_CMD_WRITE_ZEROES with
  NO_HOLE (written as zero blocks when the server has no WRITE_ZEROES); plain
  allocation is EOPNOTSUPP and ranges past the end are EINVAL, as for block devices;
* the size never changes: truncating to it succeeds, to any other size is EINVAL.

Requests are spread over the connections (:class:`Connections`), or pipelined on the
only one (:class:`Pipeline`) when the server does not allow multi-conn (both in
:mod:`pynbd.fuse.connections`); a connection that
breaks (server gone, protocol violation, timeout) makes the whole export *gone*: the
failing request and every later one get EIO and ``on_gone`` is called once, so that the
mount can be torn down.

With ``reconnect`` (seconds, ``pynbd fuse --reconnect``) a broken connection is not the
end: the old connections are dropped, requests wait while new ones are dialled (with
back-off) for up to that long, and every request that failed or waited meanwhile is
sent again on the new connections (reads, writes, trims and zeroings are idempotent on
a block device). The export must come back with the same size and the same read-only
state. Writes the old server acknowledged but no FLUSH had covered may be lost with it
(a crash, a writeback cache): then the next fsync fails once with EIO, as the kernel
reports a writeback error, so a program that checks fsync knows to write again. Only
when no connection can be made in time is the export gone.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynbd.client import CloseResult, CmdFlag, connect
from pynbd.client.uri import NBDURI
from pynbd.fuse.connections import Connections, ExportGone, Pipeline
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, ProtocolError

log = logging.getLogger("pynbd.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: largest single TRIM / WRITE_ZEROES (the length field is 32 bits)
ZERO_CHUNK = 1 << 30
_ZEROES = bytes(1 << 20)
@dataclass(frozen=True, slots=True)
class Features:
    size: int
    read_only: bool
    can_flush: bool
    can_trim: bool
    can_zero: bool
    multi_conn: bool
    connections: int


class ExportFile:
    """One NBD export with a file's operations (thread-safe)."""

    def __init__(self, conns: Connections | Pipeline, *, read_only: bool = False,
                 on_gone: Callable[[str], None] | None = None,
                 redial: Callable[[float | None], Connections | Pipeline] | None = None,
                 reconnect: float = 0.0) -> None:
        first = conns.clients[0]
        self.conns = conns
        self._redial = redial
        self.reconnect = reconnect if redial is not None else 0.0
        self.reconnects = 0
        self._gen = 0  # bumped by every successful reconnect
        self._recover_lock = threading.Lock()
        self._gone: str | None = None
        self._gone_lock = threading.Lock()
        # writes (and trims, zeroings) started, and how many of them a FLUSH covered;
        # a reconnect with some not covered makes the next fsync fail once
        self._writes = 0
        self._flushed = 0
        self._writes_lock = threading.Lock()
        self._maybe_lost = False
        self.size = first.size
        self.read_only = read_only or first.is_read_only()
        self.can_flush = first.can_flush()
        self.can_trim = first.can_trim()
        self.can_zero = first.can_zero()
        self.on_gone = on_gone
        self.features = Features(self.size, self.read_only, self.can_flush, self.can_trim,
                                 self.can_zero, first.can_multi_conn(), len(conns))

    @property
    def gone(self) -> str | None:
        return self._gone

    # --- error handling -------------------------------------------------------------

    @staticmethod
    def _reason(exc: BaseException) -> str:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no reply from the server in time ({reason})"
        return reason

    def _lost(self, exc: BaseException) -> OSError:
        reason = self._reason(exc)
        self.conns.mark_gone(reason)
        with self._gone_lock:
            first = self._gone is None
            if first:
                self._gone = reason
        if first:
            log.error("lost the NBD server: %s", reason)
            if self.on_gone is not None:
                self.on_gone(reason)
        return OSError(errno.EIO, f"NBD server lost: {self._gone}")

    @staticmethod
    def _broken(exc: BaseException) -> bool:
        """Whether ``exc`` means the connection is gone and a new one may take over (not
        a refused request, and not a timeout: a server that is slow rather than dead may
        still carry out a write after its copy was sent again, over newer data)."""
        if isinstance(exc, TimeoutError) or (
                isinstance(exc, ExportGone) and str(exc).startswith("no reply from")):
            return False
        if isinstance(exc, ExportGone):
            return True
        if isinstance(exc, NBDRequestError):
            return exc.errno == errno.ESHUTDOWN
        if isinstance(exc, LocalProtocolError):
            return False
        return isinstance(exc, (ProtocolError, OSError))

    def _io(self, op: Callable[[Connections | Pipeline], object]) -> None:
        """Run ``op`` on the current connections; with ``reconnect``, again on new ones
        after a broken connection."""
        while True:
            if self._gone is not None:
                raise OSError(errno.EIO, f"NBD server lost: {self._gone}")
            conns, gen = self.conns, self._gen
            try:
                op(conns)
                return
            except Exception as exc:
                if self.reconnect <= 0 or not self._broken(exc):
                    raise self._failed(exc) from None
                self._recover(gen, exc)

    def _recover(self, gen: int, exc: BaseException) -> None:
        """Replace the connections of generation ``gen`` (unless someone already did);
        OSError(EIO) once the server cannot be reached within ``reconnect`` seconds."""
        with self._recover_lock:
            if self._gone is not None:
                raise OSError(errno.EIO, f"NBD server lost: {self._gone}")
            if self._gen != gen:
                return  # another caller reconnected meanwhile: just retry
            assert self._redial is not None
            reason = self._reason(exc)
            log.warning("lost the NBD server (%s); reconnecting for up to %g s", reason,
                        self.reconnect)
            old = self.conns
            with self._writes_lock:
                if self._writes > self._flushed and self.can_flush:
                    self._maybe_lost = True
            old.mark_gone(reason)  # callers waiting on it fail now and retry after us
            for c in old.clients:
                c.hard_close()
            deadline = time.monotonic() + self.reconnect
            delay, last = 0.05, reason
            while True:
                try:
                    new = self._redial(max(0.1, deadline - time.monotonic()))
                except (OSError, ProtocolError) as e:
                    last = self._reason(e)
                else:
                    first = new.clients[0]
                    changed = ("its size changed" if first.size != self.size else
                               "it became read-only" if first.is_read_only() and
                               not self.read_only else
                               "it lost FLUSH, TRIM or WRITE_ZEROES" if (
                                   (self.can_flush and not first.can_flush()) or
                                   (self.can_trim and not first.can_trim()) or
                                   (self.can_zero and not first.can_zero())) else "")
                    if not changed:
                        self.conns = new
                        self._gen += 1
                        self.reconnects += 1
                        log.warning("reconnected to the NBD server (%d connection(s))",
                                    len(new))
                        return
                    for c in new.clients:
                        c.hard_close()
                    raise self._lost(ConnectionError(f"{reason}; the export came back but "
                                                     f"{changed}")) from None
                if time.monotonic() + delay > deadline:
                    raise self._lost(ConnectionError(
                        f"{reason}; no new connection within {self.reconnect:g} s "
                        f"({last})")) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def idle_lost(self, reason: str, conns: Connections | Pipeline | None = None) -> None:
        """The idle check found ``conns`` (the current ones if None) closed: reconnect,
        or give up. Nothing happens if they have been replaced meanwhile."""
        gen = self._gen
        if self._gone is not None or (conns is not None and conns is not self.conns):
            return
        if self.reconnect <= 0:
            self._lost(ConnectionError(reason))
            return
        try:
            self._recover(gen, ConnectionError(reason))
        except OSError:
            pass  # gone: on_gone has been called

    def _failed(self, exc: BaseException) -> BaseException:
        """The errno the caller sees for a request that raised ``exc``."""
        if isinstance(exc, ExportGone):
            return OSError(errno.EIO, f"NBD server lost: {exc}")
        if isinstance(exc, NBDRequestError):
            # the server refused this request; the connection is fine, unless the
            # server said it is shutting down
            if exc.errno == errno.ESHUTDOWN:
                return self._lost(exc)
            return OSError(exc.errno or errno.EIO, str(exc))
        if isinstance(exc, LocalProtocolError):
            # our own check refused it (should not happen: ranges are clipped above)
            log.warning("request refused locally: %s", exc)
            return OSError(errno.EINVAL, str(exc))
        if isinstance(exc, (ProtocolError, OSError)):  # broken connection, timeout, bad peer
            return self._lost(exc)
        return exc

    def _check_write(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only")
        with self._writes_lock:
            self._writes += 1

    # --- file operations ------------------------------------------------------------

    def read_into(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset``; 0 at or past the end."""
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        part = view[:n] if n < len(view) else view
        self._io(lambda c: c.read_into(offset, part))
        return n

    def write(self, offset: int, data: memoryview) -> int:
        """Write ``data`` at ``offset`` (short at the end, ENOSPC past it)."""
        self._check_write()
        if offset >= self.size and len(data):
            raise OSError(errno.ENOSPC, "write past the end of the export")
        n = min(len(data), self.size - offset)
        if n <= 0:
            return 0
        part = data[:n] if n < len(data) else data
        self._io(lambda c: c.write(offset, part))
        return n

    def fsync(self) -> None:
        """NBD_CMD_FLUSH (with CAN_MULTI_CONN it covers writes on every connection)."""
        if self.read_only:
            return
        with self._writes_lock:
            covered = self._writes
        if self.can_flush:
            self._io(lambda c: c.flush())
        with self._writes_lock:
            self._flushed = max(self._flushed, covered)
            lost, self._maybe_lost = self._maybe_lost, False
        if lost:
            log.error("fsync: writes acknowledged before the reconnect may be lost")
            raise OSError(errno.EIO, "writes acknowledged by the NBD server before it went "
                                     "away may be lost (reconnected since): write them again")

    def truncate(self, length: int) -> None:
        if length != self.size:
            raise OSError(errno.EINVAL, f"the export's size is fixed at {self.size} bytes")

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """Block-device semantics for fallocate(2).

        ``PUNCH_HOLE|KEEP_SIZE``: NBD_CMD_TRIM, then NBD_CMD_WRITE_ZEROES without NO_HOLE.
        TRIM is how NBD says "deallocate", but the spec lets a server return anything
        from a trimmed range, while punch-hole promises zeroes (mkfs.ext4, for one,
        relies on it for regular files), so the zeroes are asked for explicitly; the
        server may satisfy them by deallocating too. Without WRITE_ZEROES the hole
        cannot be promised: EOPNOTSUPP (callers then write zeroes themselves), after
        nothing was sent. ``ZERO_RANGE``: WRITE_ZEROES with NO_HOLE (the blocks stay
        allocated), or zero blocks written where the server has no WRITE_ZEROES.
        """
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, "invalid range")
        punch = bool(mode & FALLOC_FL_PUNCH_HOLE)
        zero = bool(mode & FALLOC_FL_ZERO_RANGE)
        keep = bool(mode & FALLOC_FL_KEEP_SIZE)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) or \
                not (punch or zero) or (punch and zero) or (punch and not keep):
            raise OSError(errno.EOPNOTSUPP, "only punch-hole and zero-range are supported")
        self._check_write()
        if offset >= self.size:
            raise OSError(errno.EINVAL, "range starts past the end of the export")
        if offset + length > self.size:
            if not keep:
                raise OSError(errno.EINVAL, "the export cannot grow")
            length = self.size - offset
        if punch and not self.can_zero:
            raise OSError(errno.EOPNOTSUPP, "the server has no WRITE_ZEROES")
        if punch:
            if self.can_trim:
                _ranges(lambda o, n: self._io(lambda c: c.trim(o, n)), offset, length,
                        ZERO_CHUNK)
            _ranges(lambda o, n: self._io(lambda c: c.write_zeroes(o, n)), offset, length,
                    ZERO_CHUNK)
        elif self.can_zero:
            _ranges(lambda o, n: self._io(lambda c: c.write_zeroes(o, n, CmdFlag.NO_HOLE)),
                    offset, length, ZERO_CHUNK)
        else:
            zeroes = memoryview(_ZEROES)
            _ranges(lambda o, n: self._io(lambda c: c.write(o, zeroes[:n])), offset, length,
                    len(zeroes))

    def close(self) -> list[CloseResult]:
        return self.conns.close()


def _ranges(fn: Callable[[int, int], None], offset: int, length: int, step: int) -> None:
    end = offset + length
    for pos in range(offset, end, step):
        fn(pos, min(step, end - pos))


def _dial(uri: str | NBDURI, connections: int, timeout: float | None
          ) -> Connections | Pipeline:
    # no meta context: the file's operations never ask for block status
    first = connect(uri, timeout=timeout, meta_contexts=())
    clients = [first]
    try:
        if first.can_multi_conn():
            for _ in range(connections - 1):
                clients.append(connect(uri, timeout=timeout, meta_contexts=()))
    except BaseException:
        for c in clients:
            c.hard_close()
        raise
    return Connections(clients) if len(clients) > 1 else Pipeline(first)


def open_export(uri: str | NBDURI, *, connections: int = 4, read_only: bool = False,
                timeout: float | None = 60.0,
                on_gone: Callable[[str], None] | None = None,
                reconnect: float = 0.0) -> ExportFile:
    """Connect to ``uri``: ``connections`` connections when the server advertises
    CAN_MULTI_CONN, otherwise one. ``reconnect``: seconds to keep trying to reconnect
    after the connections break (0: the export is gone at once)."""
    if connections < 1:
        raise ValueError("connections must be at least 1")
    if reconnect < 0:
        raise ValueError("reconnect must not be negative")
    conns = _dial(uri, connections, timeout)

    def redial(window: float | None) -> Connections | Pipeline:
        # never wait past the reconnect window, whatever --timeout says
        t = window if timeout is None else min(timeout, window or timeout)
        return _dial(uri, connections, t)

    return ExportFile(conns, read_only=read_only, on_gone=on_gone, redial=redial,
                      reconnect=reconnect)


__all__ = ["FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE", "FALLOC_FL_ZERO_RANGE", "ZERO_CHUNK",
           "Connections", "ExportFile", "ExportGone", "Features", "Pipeline", "open_export"]
