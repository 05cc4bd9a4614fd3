"""The reply queue of one connection: replies leave in one ``sendmsg`` when the socket
takes them (the common case, no Python per item), large file reads with
``os.sendfile``; what the socket cannot take yet waits in a queue, counted so the
connection stops reading and executing over :data:`~.conn_state.HIGH_WATER`. TLS
connections encrypt in order before queueing. Release callbacks in the queue hand
pooled buffers back once their bytes are sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from pynbd.server.buffers import Buffer
from pynbd.server.conn_state import MAX_IOV, ConnState, OutItem, Phase

log = logging.getLogger("pynbd.server")

_ZEROS = bytes(1024 * 1024)
_MORE = socket.MSG_MORE


class _FileSlice:
    """``length`` bytes of file ``fd`` at ``offset``, sent with os.sendfile."""

    __slots__ = ("fd", "length", "offset")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length


def _releaser(pool: Any, buf: Buffer, mv: memoryview) -> Callable[[], None]:
    def release() -> None:
        mv.release()
        pool.put(buf)
    return release


class OutputMixin(ConnState):
    """Sending replies for :class:`~pynbd.server.connection.Connection`."""

    def _send(self, bufs: list[OutItem]) -> None:
        if self.closed:
            for item in bufs:
                if callable(item):
                    item()
            return
        if self.tls is not None and self.tls.established:
            # encrypt in order; release callbacks run once the ciphertext is queued
            plain = [b for b in bufs if not callable(b)]
            cbs = [b for b in bufs if callable(b)]
            self._send_raw([self.tls.encrypt(plain), *cbs])
            return
        self._send_raw(bufs)

    def _send_raw(self, bufs: list[OutItem]) -> None:  # noqa: C901 - per-reply hot path, kept in one frame
        wq = self._wq
        if wq:
            for b in bufs:
                wq.append(b)
                if not callable(b):
                    self._wq_bytes += b.length if type(b) is _FileSlice else len(b)
            return
        # fast path: nothing queued, every item plain bytes (sendmsg refuses anything
        # else with TypeError before sending a byte): one call, no per-item Python
        if len(bufs) <= MAX_IOV:
            try:
                sent = self.sock.sendmsg(bufs)
            except TypeError:
                pass
            except (BlockingIOError, InterruptedError):
                sent = 0
                bufs = list(bufs)
                self._queue_rest(bufs, 0, 0)
                return
            except OSError as exc:
                self._send_failed(exc)
                return
            else:
                if sent == sum(map(len, bufs)):
                    return
                self._queue_rest(bufs, 0, sent)
                return
        i = 0
        n = len(bufs)
        while i < n:
            item = bufs[i]
            if callable(item):
                item()
                i += 1
                continue
            if type(item) is _FileSlice:
                if not self._sendfile(item):
                    break
                i += 1
                continue
            j = i
            batch: list[OutItem] = []
            while j < n and j - i < MAX_IOV:
                b = bufs[j]
                if callable(b) or type(b) is _FileSlice:
                    break
                batch.append(b)
                j += 1
            try:
                # a header followed by its sendfile payload leaves in the same segments
                sent = self.sock.sendmsg(batch, (), _MORE if j < n and type(bufs[j]) is
                                         _FileSlice else 0)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self._send_failed(exc)
                for b in bufs[i:]:
                    if callable(b):
                        b()
                return
            k = i
            while k < j:
                ln = len(bufs[k])
                if sent >= ln:
                    sent -= ln
                    k += 1
                else:
                    break
            if k < j:
                if sent:
                    bufs[k] = memoryview(bufs[k]).cast("B")[sent:]
                i = k
                break
            i = j
        if i < n:
            for b in bufs[i:]:
                wq.append(b)
                if not callable(b):
                    self._wq_bytes += b.length if type(b) is _FileSlice else len(b)
            self._update_interest()

    def _queue_rest(self, bufs: list[OutItem], i: int, sent: int) -> None:
        """Queue what ``sendmsg`` did not take of plain ``bufs[i:]``."""
        wq = self._wq
        for b in bufs[i:]:
            ln = len(b)
            if sent >= ln:
                sent -= ln
                continue
            if sent:
                b = memoryview(b).cast("B")[sent:]
                sent = 0
            wq.append(b)
            self._wq_bytes += len(b)
        self._update_interest()

    def _sendfile(self, item: _FileSlice) -> bool:
        """Send what the socket takes of ``item``; True when all of it is sent."""
        while item.length:
            try:
                if item.fd < 0:
                    n = self.sock.send(_ZEROS[:min(item.length, len(_ZEROS))])
                else:
                    n = os.sendfile(self.fd, item.fd, item.offset, item.length)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._send_failed(exc)
                return True
            if n == 0 and item.fd >= 0:
                item.fd = -1  # the file shrank underneath us: the rest reads as zeros
                continue
            item.offset += n
            item.length -= n
        return True

    def _send_failed(self, exc: OSError) -> None:
        log.info("%s: send failed: %s", self.peer, exc)
        self.loop.call_soon(self.close)

    def _flush_wq(self) -> None:  # noqa: C901 - per-reply hot path (each item kind sent its own way)
        wq = self._wq
        while wq and not self.closed:
            item = wq[0]
            if callable(item):
                wq.popleft()
                item()
                continue
            if type(item) is _FileSlice:
                before = item.length
                done = self._sendfile(item)
                self._wq_bytes -= before - item.length
                if not done:
                    break
                wq.popleft()
                continue
            batch: list[OutItem] = []
            more = 0
            for b in wq:
                if callable(b) or len(batch) >= MAX_IOV:
                    break
                if type(b) is _FileSlice:
                    more = _MORE
                    break
                batch.append(b)
            try:
                sent = self.sock.sendmsg(batch, (), more)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._send_failed(exc)
                return
            self._wq_bytes -= sent
            while sent:
                b = wq[0]
                ln = len(b)
                if sent >= ln:
                    sent -= ln
                    wq.popleft()
                else:
                    wq[0] = memoryview(b).cast("B")[sent:]
                    sent = 0
                    break
            else:
                continue
            break
        if self.closed:
            return
        if not wq:
            if self.phase is Phase.CLOSING or self._eof:
                self._maybe_finish()
                if self.closed:
                    return
            elif self._payload is None and self._can_execute():
                self._process()
        self._update_interest()
