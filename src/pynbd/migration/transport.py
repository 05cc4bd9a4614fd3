"""Where the mirror sends the image: the transport interface and the plain-NBD transport.

A transport is driven by one thread (the mirror). ``write``/``zero`` may return before
the destination confirmed them (requests in flight); ``flush`` waits for every request
and makes the data durable on the destination. Failures raise :class:`TransportError`
(the mirror reconnects and resumes) or :class:`RejectedError` (the destination refuses
this migration for good: wrong size, read-only, ...).
"""

from __future__ import annotations

import logging
import os
import socket
from collections import deque
from collections.abc import Callable

from pynbd.client import Client, NBDRequestError, ProtocolError, Request
from pynbd.client import connect as nbd_connect

log = logging.getLogger("pynbd.migration")

#: seconds to wait for the NBD handshake and for each reply (the msgr2 transport waits
#: as long for a reply); ``PYNBD_MIGRATION_NBD_TIMEOUT`` overrides both
CONNECT_TIMEOUT = 15.0
REPLY_TIMEOUT = 60.0
TIMEOUT_ENV = "PYNBD_MIGRATION_NBD_TIMEOUT"


def _env_timeout() -> float | None:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    log.warning("ignoring %s=%r: not a positive number of seconds", TIMEOUT_ENV, text)
    return None


class TransportError(Exception):
    """The connection failed; the mirror may reconnect and resume."""


class ConnectFailed(TransportError):
    """Could not reach the destination at all."""


class RejectedError(Exception):
    """The destination refused the migration (size mismatch, read-only, ...)."""


class InDoubtError(Exception):
    """A COMMIT was sent but its outcome is unknown."""


class Transport:
    """Interface; see the module docstring."""

    #: the destination takes part in the two-phase commit (msgr2 to ``pynbd listen``)
    supports_commit = False
    #: the mirror must keep per-chunk digests of what it sent (commit, resume)
    wants_digests = False
    description = ""

    def connect(self, size: int) -> None:
        raise NotImplementedError

    def connect_for_query(self, size: int) -> None:
        """Connect only to ask for a commit outcome."""
        self.connect(size)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def zero(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def take_unconfirmed(self) -> list[tuple[int, int]]:
        """After a failure: the ranges sent but not confirmed (the mirror re-sends them)."""
        return []

    def chunk_digests(self, chunk: int) -> bytes | None:
        """Digests of what the destination verifiably holds, per chunk (resume), or None."""
        return None

    def last_epoch(self) -> int:
        return 0

    def commit(self, size: int, epoch: int, digest: str,
               on_sent: Callable[[], None] | None = None) -> None:
        """Ask the destination to take over; returns on its ACK, raises InDoubtError when
        the outcome is unknown, RejectedError when it refused. ``on_sent`` runs once the
        COMMIT left (a test hook)."""
        raise RejectedError("this destination cannot take part in a commit")

    def query_outcome(self, epoch: int) -> bool:
        """In doubt: did the destination commit ``epoch``? (It then refuses it for good.)"""
        raise TransportError("this destination cannot answer")

    def abort(self) -> None:
        """From another thread: make calls blocked on the destination fail now."""

    def close(self, release: bool = True) -> None:
        """Disconnect. ``release=False``: the mirror will come back (another attempt), so
        a destination that keeps an owner may keep it for us."""


#: an NBD destination is asked to FLUSH at least this often (bytes acknowledged), so a
#: reconnect re-sends at most this much that the destination may have lost
FLUSH_EVERY = 256 << 20


class NBDTransport(Transport):
    """Plain NBD to any server (qemu-nbd, nbdkit, pynbd serve), many requests in flight.

    A write the destination acknowledged is not safe until a FLUSH succeeds after it: a
    destination that dies may lose it (its page cache, a writeback cache). Such writes
    are kept (offset, length) until a FLUSH covers them and are handed back with the
    unanswered ones by :meth:`take_unconfirmed`, so the next attempt sends them again.
    A FLUSH goes out every :data:`FLUSH_EVERY` bytes to bound what a reconnect re-sends.
    """

    description = "nbd"

    def __init__(self, uri: str, window: int = 16, timeout: float | None = None,
                 reply_timeout: float | None = None) -> None:
        self.uri = uri
        self.window = window
        env = _env_timeout()
        self.timeout = timeout or env or CONNECT_TIMEOUT
        #: a destination that stops answering (or reading) fails the attempt after this
        #: long instead of blocking the mirror forever
        self.reply_timeout = reply_timeout or env or REPLY_TIMEOUT
        self.client: Client | None = None
        self._inflight: deque[tuple[Request | None, int, int]] = deque()
        #: acknowledged, not yet covered by a successful FLUSH
        self._unflushed: list[tuple[int, int]] = []
        self._unflushed_bytes = 0
        self._max = 32 * 1024 * 1024
        self._zero_buf = b""

    def connect(self, size: int) -> None:
        try:
            c = nbd_connect(self.uri, timeout=self.timeout)
        except TimeoutError as exc:
            raise ConnectFailed(f"cannot connect to {self.uri}: the connection and NBD "
                                f"handshake did not complete within {self.timeout:g} s "
                                "(timed out)") from exc
        except (OSError, ProtocolError) as exc:
            raise ConnectFailed(f"cannot connect to {self.uri}: {exc}") from exc
        try:
            c.socket.settimeout(self.reply_timeout)
        except OSError:
            pass
        if c.size != size:
            c.hard_close()
            raise RejectedError(f"destination size {c.size} does not match local size {size}")
        if c.is_read_only():
            c.hard_close()
            raise RejectedError("destination export is read-only")
        self.client = c
        self._max = min(c.max_request, 32 * 1024 * 1024)
        self._inflight.clear()
        self._unflushed.clear()
        self._unflushed_bytes = 0

    def _reap(self, limit: int) -> None:
        c = self.client
        assert c is not None
        while len(self._inflight) > limit:
            try:
                req = c.wait_any()
            except TimeoutError as exc:
                raise TransportError(f"destination did not answer within "
                                     f"{self.reply_timeout:g} s (timed out)") from exc
            except (OSError, ProtocolError) as exc:
                raise TransportError(f"destination connection failed: {exc}") from exc
            if req.error is not None:
                raise TransportError(f"destination refused a request: {req.error}")
            for i, (r, o, n) in enumerate(self._inflight):
                if r is req:
                    del self._inflight[i]
                    self._unflushed.append((o, n))
                    self._unflushed_bytes += n
                    break

    def _submit(self, kind: str, offset: int, length: int, data: memoryview | None) -> None:
        c = self.client
        if c is None:
            raise TransportError("not connected")
        if self._unflushed_bytes >= FLUSH_EVERY:
            self.flush()
        self._reap(self.window - 1)
        try:
            if kind == "w":
                assert data is not None
                req = c.submit_write(offset, data)
            else:
                req = c.submit_write_zeroes(offset, length)
        except (OSError, ProtocolError) as exc:
            self._inflight.append((None, offset, length))
            raise TransportError(f"destination connection failed: {exc}") from exc
        self._inflight.append((req, offset, length))

    def write(self, offset: int, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        pos = 0
        while pos < len(mv):
            n = min(self._max, len(mv) - pos)
            self._submit("w", offset + pos, n, mv[pos:pos + n])
            pos += n

    def zero(self, offset: int, length: int) -> None:
        c = self.client
        if c is None:
            raise TransportError("not connected")
        if not c.can_zero():
            if len(self._zero_buf) < self._max:
                self._zero_buf = bytes(min(self._max, 4 * 1024 * 1024))
            end = offset + length
            while offset < end:
                n = min(len(self._zero_buf), end - offset)
                self._submit("w", offset, n, memoryview(self._zero_buf)[:n])
                offset += n
            return
        end = offset + length
        while offset < end:
            n = min(1 << 30, end - offset)
            self._submit("z", offset, n, None)
            offset += n

    def flush(self) -> None:
        self._reap(0)
        c = self.client
        assert c is not None
        if c.can_flush():
            try:
                c.flush()
            except NBDRequestError as exc:
                raise TransportError(f"destination flush failed: {exc}") from exc
            except TimeoutError as exc:
                raise TransportError(f"destination did not answer FLUSH within "
                                     f"{self.reply_timeout:g} s (timed out)") from exc
            except (OSError, ProtocolError) as exc:
                raise TransportError(f"destination connection failed: {exc}") from exc
        # without FLUSH support the server promises nothing more: acknowledged it is
        self._unflushed.clear()
        self._unflushed_bytes = 0

    def take_unconfirmed(self) -> list[tuple[int, int]]:
        """Unanswered writes and answered ones no FLUSH has covered yet."""
        out = [(o, n) for _r, o, n in self._inflight] + self._unflushed
        self._inflight.clear()
        self._unflushed = []
        self._unflushed_bytes = 0
        return out

    def abort(self) -> None:
        c = self.client
        if c is not None:
            try:
                c.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self, release: bool = True) -> None:
        c = self.client
        self.client = None
        if c is None:
            return
        try:
            if not self._inflight:
                c.close()
            else:
                c.hard_close()
        except Exception:
            c.hard_close()
