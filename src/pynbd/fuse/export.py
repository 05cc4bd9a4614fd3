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

Requests are spread over the connections (:class:`Connections`); a connection that
breaks (server gone, protocol violation, timeout) makes the whole export *gone*: the
failing request and every later one get EIO and ``on_gone`` is called once, so that the
mount can be torn down.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import select
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pynbd.client import Client, CloseResult, CmdFlag, connect
from pynbd.client.uri import NBDURI
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError, ProtocolError

log = logging.getLogger("pynbd.fuse")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: largest single TRIM / WRITE_ZEROES (the length field is 32 bits)
ZERO_CHUNK = 1 << 30
_ZEROES = bytes(1 << 20)
#: how long a request waits for a free connection before re-checking for shutdown
_LEASE_POLL = 1.0
_POLL_BAD = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | \
    getattr(select, "POLLRDHUP", 0)


class ExportGone(Exception):
    """The connection to the server is lost; the export cannot be used any more."""


@dataclass(frozen=True, slots=True)
class Features:
    size: int
    read_only: bool
    can_flush: bool
    can_trim: bool
    can_zero: bool
    multi_conn: bool
    connections: int


class Connections:
    """Blocking clients to one export, lent to one thread at a time.

    Free connections are handed out first-in first-out, so that even one sequential
    reader spreads its requests over every connection. :meth:`check_idle` notices a
    server that closed idle connections (an idle NBD connection never becomes
    readable: the server has nothing to say until it is asked).
    """

    def __init__(self, clients: list[Client]) -> None:
        if not clients:
            raise ValueError("no connections")
        self.clients = clients
        self._free: collections.deque[Client] = collections.deque(clients)
        self._cond = threading.Condition()
        self._waiters = 0
        self.gone: str | None = None

    def __len__(self) -> int:
        return len(self.clients)

    def acquire(self) -> Client:
        """Take a free connection (waiting for one if need be); ExportGone once the
        export is lost. Give it back with :meth:`release`."""
        try:
            c = self._free.popleft()  # the fast path: deque operations are atomic
        except IndexError:
            c = self._wait_free()
        if self.gone is not None:
            self.release(c)
            raise ExportGone(self.gone)
        return c

    def _wait_free(self) -> Client:
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    if self.gone is not None:
                        raise ExportGone(self.gone)
                    try:
                        return self._free.popleft()
                    except IndexError:
                        self._cond.wait(_LEASE_POLL)
            finally:
                self._waiters -= 1

    def release(self, c: Client) -> None:
        self._free.append(c)
        if self._waiters:  # a stale 0 is fine: a new waiter tries popleft() first
            with self._cond:
                self._cond.notify()

    @contextlib.contextmanager
    def lease(self) -> Iterator[Client]:
        c = self.acquire()
        try:
            yield c
        finally:
            self.release(c)

    def mark_gone(self, reason: str) -> bool:
        """Record that the export is lost; True for the first caller only."""
        with self._cond:
            first = self.gone is None
            if first:
                self.gone = reason
            self._cond.notify_all()
            return first

    def check_idle(self) -> str | None:
        """A reason if a connection nobody is using was closed by the server."""
        if self.gone is not None:
            return None
        idle: list[Client] = []
        try:  # borrow every idle connection for a moment (nobody else uses them then)
            while True:
                idle.append(self._free.popleft())
        except IndexError:
            pass
        try:
            return _closed_by_server(idle)
        finally:
            for c in idle:
                self.release(c)

    def close(self) -> list[CloseResult]:
        """Close every connection: the safest close the server offers (flushes), or
        just drop them when the export is gone."""
        results = []
        for c in self.clients:
            if self.gone is not None:
                c.hard_close()
                results.append(CloseResult(False, False, "none", self.gone))
            else:
                results.append(c.close())
        return results


def _closed_by_server(clients: list[Client]) -> str | None:
    p = select.poll()
    for c in clients:
        try:
            fd = c.socket.fileno()
        except (OSError, ValueError):
            fd = -1
        if fd < 0:
            return "connection closed"
        p.register(fd, _POLL_BAD)
    for _fd, ev in p.poll(0):
        if ev & (select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)):
            return "the server closed the connection"
        return "the server sent data on an idle connection (closing?)"
    return None


class ExportFile:
    """One NBD export with a file's operations (thread-safe)."""

    def __init__(self, conns: Connections, *, read_only: bool = False,
                 on_gone: Callable[[str], None] | None = None) -> None:
        first = conns.clients[0]
        self.conns = conns
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
        return self.conns.gone

    # --- error handling -------------------------------------------------------------

    def _lost(self, exc: BaseException) -> OSError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no reply from the server in time ({reason})"
        if self.conns.mark_gone(reason):
            log.error("lost the NBD server: %s", reason)
            if self.on_gone is not None:
                self.on_gone(reason)
        return OSError(errno.EIO, f"NBD server lost: {reason}")

    def _acquire(self) -> Client:
        try:
            return self.conns.acquire()
        except ExportGone as exc:
            raise OSError(errno.EIO, f"NBD server lost: {exc}") from None

    def _failed(self, exc: BaseException) -> BaseException:
        """The errno the caller sees for a request that raised ``exc``."""
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

    @contextlib.contextmanager
    def _client(self) -> Iterator[Client]:
        """A connection for one request; maps failures to the errno the caller sees."""
        c = self._acquire()
        try:
            yield c
        except Exception as exc:
            raise self._failed(exc) from None
        finally:
            self.conns.release(c)

    def _check_write(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only")

    # --- file operations ------------------------------------------------------------

    def read_into(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset``; 0 at or past the end."""
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        c = self._acquire()
        try:
            c.read_into(offset, view[:n] if n < len(view) else view)
        except Exception as exc:
            raise self._failed(exc) from None
        finally:
            self.conns.release(c)
        return n

    def write(self, offset: int, data: memoryview) -> int:
        """Write ``data`` at ``offset`` (short at the end, ENOSPC past it)."""
        self._check_write()
        if offset >= self.size and len(data):
            raise OSError(errno.ENOSPC, "write past the end of the export")
        n = min(len(data), self.size - offset)
        if n <= 0:
            return 0
        c = self._acquire()
        try:
            c.write(offset, data[:n] if n < len(data) else data)
        except Exception as exc:
            raise self._failed(exc) from None
        finally:
            self.conns.release(c)
        return n

    def fsync(self) -> None:
        """NBD_CMD_FLUSH (with CAN_MULTI_CONN it covers writes on every connection)."""
        if self.read_only or not self.can_flush:
            return
        with self._client() as c:
            c.flush()

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
        if punch:
            if not self.can_zero:
                raise OSError(errno.EOPNOTSUPP, "the server has no WRITE_ZEROES")
            if self.can_trim:
                self._ranges(lambda c, o, n: c.trim(o, n), offset, length)
            self._ranges(lambda c, o, n: c.write_zeroes(o, n), offset, length)
        elif self.can_zero:
            self._ranges(lambda c, o, n: c.write_zeroes(o, n, CmdFlag.NO_HOLE),
                         offset, length)
        else:
            self._write_zero_blocks(offset, length)

    def _ranges(self, fn: Callable[[Client, int, int], None], offset: int,
                length: int) -> None:
        with self._client() as c:
            end = offset + length
            pos = offset
            while pos < end:
                n = min(ZERO_CHUNK, end - pos)
                fn(c, pos, n)
                pos += n

    def _write_zero_blocks(self, offset: int, length: int) -> None:
        zeroes = memoryview(_ZEROES)
        with self._client() as c:
            end = offset + length
            pos = offset
            while pos < end:
                n = min(len(zeroes), end - pos)
                c.write(pos, zeroes[:n])
                pos += n

    def close(self) -> list[CloseResult]:
        return self.conns.close()


def open_export(uri: str | NBDURI, *, connections: int = 4, read_only: bool = False,
                timeout: float | None = 60.0,
                on_gone: Callable[[str], None] | None = None) -> ExportFile:
    """Connect to ``uri``: ``connections`` connections when the server advertises
    CAN_MULTI_CONN, otherwise one."""
    if connections < 1:
        raise ValueError("connections must be at least 1")
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
    return ExportFile(Connections(clients), read_only=read_only, on_gone=on_gone)
