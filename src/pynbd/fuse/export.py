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
only one (:class:`Pipeline`) when the server does not allow multi-conn; a connection that
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
        self._closed = False
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

    # --- one request on a borrowed connection ---------------------------------------

    def read_into(self, offset: int, view: memoryview) -> None:
        c = self.acquire()
        try:
            c.read_into(offset, view)
        finally:
            self.release(c)

    def write(self, offset: int, data: memoryview) -> None:
        c = self.acquire()
        try:
            c.write(offset, data)
        finally:
            self.release(c)

    def flush(self) -> None:
        with self.lease() as c:
            c.flush()

    def trim(self, offset: int, length: int) -> None:
        with self.lease() as c:
            c.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        with self.lease() as c:
            c.write_zeroes(offset, length, flags)

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
        if self.gone is not None or self._closed:
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
        self._closed = True
        results = []
        for c in self.clients:
            if self.gone is not None:
                c.hard_close()
                results.append(CloseResult(False, False, "none", self.gone))
            else:
                results.append(c.close())
        return results

_READ, _WRITE, _FLUSH, _TRIM, _ZERO = range(5)


class _Waiter:
    """One caller of :class:`Pipeline`: woken when its requests are done or when it
    is handed the connection to drive."""

    __slots__ = ("event", "lead", "pending")

    def __init__(self, pending: int) -> None:
        self.event = threading.Event()
        self.lead = False
        self.pending = pending


class _Op:
    __slots__ = ("data", "done", "error", "flags", "kind", "length", "offset", "waiter")

    def __init__(self, waiter: _Waiter, kind: int, offset: int, length: int,
                 data: memoryview | None = None, flags: int = 0) -> None:
        self.waiter = waiter
        self.kind = kind
        self.offset = offset
        self.length = length
        self.data = data
        self.flags = flags
        self.done = False
        self.error: BaseException | None = None


class Pipeline:
    """One connection shared by every thread, with several requests in flight.

    Used when the server does not allow multi-conn (or ``--connections 1``). Callers
    queue their requests; whoever finds the connection free drives it (leader and
    followers): it sends everything queued, up to :attr:`MAX_IN_FLIGHT` requests, and
    collects replies, completing other callers' requests as they come, until its own
    are done; then it hands the connection to a caller that still waits. A lone caller
    thus drives its own request with no thread switch, and concurrent callers' requests
    share the connection instead of taking turns.

    The blocking client sends a write's whole payload before it reads any reply, so a
    WRITE goes out only when no READ is in flight: a server blocked on sending read
    replies that nobody reads could otherwise stop reading the payload.
    """

    MAX_IN_FLIGHT = 16

    def __init__(self, client: Client) -> None:
        self.clients = [client]
        self._client = client
        self._cond = threading.Condition()
        # under _cond:
        self._queue: collections.deque[_Op] = collections.deque()
        self._driving = False
        self._broken: BaseException | None = None
        self._closed = False
        self.gone: str | None = None
        # only the driver touches these:
        self._inflight: dict[int, _Op] = {}  # cookie -> op
        self._reads = 0

    def __len__(self) -> int:
        return 1

    # --- callers ------------------------------------------------------------------

    def _call(self, ops: list[_Op]) -> None:
        waiter = ops[0].waiter
        with self._cond:
            if self.gone is not None:
                raise ExportGone(self.gone)
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise LocalProtocolError("connection is closed")
            self._queue.extend(ops)
            if not self._driving:
                self._driving = waiter.lead = True
        while not waiter.lead and waiter.pending:
            waiter.event.wait()
            waiter.event.clear()
        if waiter.lead:
            self._drive(waiter)
        for op in ops:
            if op.error is not None:
                raise op.error

    def _ops(self, kind: int, offset: int, view: memoryview) -> list[_Op]:
        step = self._client.max_request
        if len(view) <= step:
            return [_Op(_Waiter(1), kind, offset, len(view), view)]
        parts = range(0, len(view), step)
        w = _Waiter(len(parts))
        return [_Op(w, kind, offset + p, len(view[p:p + step]), view[p:p + step])
                for p in parts]

    def read_into(self, offset: int, view: memoryview) -> None:
        self._call(self._ops(_READ, offset, view))

    def write(self, offset: int, data: memoryview) -> None:
        self._call(self._ops(_WRITE, offset, data))

    def flush(self) -> None:
        self._call([_Op(_Waiter(1), _FLUSH, 0, 0)])

    def trim(self, offset: int, length: int) -> None:
        self._call([_Op(_Waiter(1), _TRIM, offset, length)])

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        self._call([_Op(_Waiter(1), _ZERO, offset, length, None, flags)])

    # --- the driver -------------------------------------------------------------------

    def _finish(self, op: _Op, error: BaseException | None) -> None:
        """Complete ``op`` (with ``_cond`` held)."""
        if op.done:
            return
        op.done = True
        op.error = error
        w = op.waiter
        w.pending -= 1
        if not w.pending:
            w.event.set()

    def _submit(self, op: _Op) -> None:
        c = self._client
        k = op.kind
        try:
            if k == _READ:
                assert op.data is not None
                req = c.submit_read(op.offset, op.data)
            elif k == _WRITE:
                assert op.data is not None
                req = c.submit_write(op.offset, op.data)
            elif k == _FLUSH:
                req = c.submit_flush()
            elif k == _TRIM:
                req = c.submit_trim(op.offset, op.length)
            else:
                req = c.submit_write_zeroes(op.offset, op.length, op.flags)
        except (LocalProtocolError, NBDRequestError) as exc:  # refused: this op only
            with self._cond:
                self._finish(op, exc)
            return
        self._inflight[req.cookie] = op
        if k == _READ:
            self._reads += 1

    def _collect(self) -> None:
        """Wait for the next reply and complete its request."""
        req = self._client.wait_any()
        op = self._inflight.pop(req.cookie)
        if op.kind == _READ:
            self._reads -= 1
        with self._cond:
            self._finish(op, req.error)

    def _send_queued(self, wait: bool) -> None:
        """Send what is queued (up to the limit); a WRITE waits for the READs in flight
        to finish, or with ``wait=False`` stays queued."""
        while True:
            with self._cond:
                if not self._queue or len(self._inflight) >= self.MAX_IN_FLIGHT:
                    return
                op = self._queue[0]
                if op.kind == _WRITE and self._reads and not wait:
                    return
                self._queue.popleft()
            if op.kind == _WRITE:
                while self._reads:
                    self._collect()
            if self._client.server_shutting_down:
                with self._cond:
                    self._queue.appendleft(op)
                raise ConnectionError("the server is shutting down (NBD_ESHUTDOWN)")
            self._submit(op)

    def _drive(self, me: _Waiter) -> None:
        try:
            while me.pending:
                self._send_queued(wait=True)
                if not me.pending:
                    break
                if not self._inflight:  # cannot happen: our requests went somewhere
                    raise LocalProtocolError("pipeline lost track of a request")
                self._collect()
            self._send_queued(wait=False)  # get the others' requests going
        except BaseException as exc:  # the connection is broken: fail everything
            with self._cond:
                self._broken = exc
                for op in [*self._inflight.values(), *self._queue]:
                    self._finish(op, exc)
                self._inflight.clear()
                self._queue.clear()
                self._reads = 0
                self._driving = me.lead = False
            return
        with self._cond:
            me.lead = False
            nxt = next(iter(self._inflight.values()), None) or \
                (self._queue[0] if self._queue else None)
            if nxt is None:
                self._driving = False
            else:  # hand the connection to a caller that still waits
                nxt.waiter.lead = True
                nxt.waiter.event.set()

    # --- state ------------------------------------------------------------------------

    def mark_gone(self, reason: str) -> bool:
        with self._cond:
            first = self.gone is None
            if first:
                self.gone = reason
            for op in self._queue:
                self._finish(op, ExportGone(reason))
            self._queue.clear()
            return first

    def check_idle(self) -> str | None:
        with self._cond:  # nobody starts driving while this is held
            if self.gone is not None or self._closed or self._driving or self._queue:
                return None
            if self._broken is not None:
                return str(self._broken) or type(self._broken).__name__
            return _closed_by_server([self._client])

    def close(self) -> list[CloseResult]:
        """Close the connection (callers are gone: the FUSE loop has ended)."""
        with self._cond:
            self._closed = True
        if self.gone is None:
            return [self._client.close()]
        self._client.hard_close()
        return [CloseResult(False, False, "none", self.gone)]


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

    def __init__(self, conns: Connections | Pipeline, *, read_only: bool = False,
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

    # --- file operations ------------------------------------------------------------

    def read_into(self, offset: int, view: memoryview) -> int:
        """Read up to ``len(view)`` bytes at ``offset``; 0 at or past the end."""
        n = min(len(view), self.size - offset)
        if n <= 0:
            return 0
        try:
            self.conns.read_into(offset, view[:n] if n < len(view) else view)
        except Exception as exc:
            raise self._failed(exc) from None
        return n

    def write(self, offset: int, data: memoryview) -> int:
        """Write ``data`` at ``offset`` (short at the end, ENOSPC past it)."""
        self._check_write()
        if offset >= self.size and len(data):
            raise OSError(errno.ENOSPC, "write past the end of the export")
        n = min(len(data), self.size - offset)
        if n <= 0:
            return 0
        try:
            self.conns.write(offset, data[:n] if n < len(data) else data)
        except Exception as exc:
            raise self._failed(exc) from None
        return n

    def fsync(self) -> None:
        """NBD_CMD_FLUSH (with CAN_MULTI_CONN it covers writes on every connection)."""
        if self.read_only or not self.can_flush:
            return
        try:
            self.conns.flush()
        except Exception as exc:
            raise self._failed(exc) from None

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
        conns = self.conns
        try:
            if punch:
                if self.can_trim:
                    _ranges(conns.trim, offset, length, ZERO_CHUNK)
                _ranges(conns.write_zeroes, offset, length, ZERO_CHUNK)
            elif self.can_zero:
                _ranges(lambda o, n: conns.write_zeroes(o, n, CmdFlag.NO_HOLE),
                        offset, length, ZERO_CHUNK)
            else:
                zeroes = memoryview(_ZEROES)
                _ranges(lambda o, n: conns.write(o, zeroes[:n]), offset, length,
                        len(zeroes))
        except Exception as exc:
            raise self._failed(exc) from None

    def close(self) -> list[CloseResult]:
        return self.conns.close()


def _ranges(fn: Callable[[int, int], None], offset: int, length: int, step: int) -> None:
    end = offset + length
    for pos in range(offset, end, step):
        fn(pos, min(step, end - pos))


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
    conns = Connections(clients) if len(clients) > 1 else Pipeline(first)
    return ExportFile(conns, read_only=read_only, on_gone=on_gone)
