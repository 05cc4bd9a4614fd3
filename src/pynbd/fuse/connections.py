"""How ``pynbd fuse`` reaches the server: requests spread over several connections
(:class:`Connections`), or pipelined on the only one (:class:`Pipeline`) when the server
does not allow multi-conn. A connection that breaks makes the export *gone*
(:class:`ExportGone`) for every request from then on."""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import threading
from collections.abc import Iterator

from pynbd.client import Client, CloseResult
from pynbd.protocol.errors import LocalProtocolError, NBDRequestError

log = logging.getLogger("pynbd.fuse")

#: how long a request waits for a free connection before re-checking for shutdown
_LEASE_POLL = 1.0
_POLL_BAD = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP | \
    getattr(select, "POLLRDHUP", 0)


class ExportGone(Exception):
    """The connection to the server is lost; the export cannot be used any more."""


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
            if not op.done:  # never: every path completes its ops, or fails them
                raise ConnectionError("an NBD request was lost by the connection pipeline")

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
        except BaseException as exc:  # the connection broke while sending it
            with self._cond:
                self._finish(op, exc)  # it is in no list the driver fails: fail it here
            raise
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
                settle = op.kind == _WRITE and self._reads > 0
                if settle and not wait:
                    return
                if not settle:
                    self._queue.popleft()
            if settle:
                # the WRITE stays queued while the reads finish: if the connection
                # breaks meanwhile, failing the queue fails it too (taken off first, it
                # was in no list and its caller waited for ever)
                self._collect()
                continue
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


