"""Requests of one connection, run on the loop: a WRITE's payload taken into a pooled
buffer, a filter's admission (run, refuse, or park until it lets go), then the backend
call inline for fast backends (memory, page-cache files) or a hand-off to
:mod:`.conn_offload`; READs sparse (hole chunks), by ``sendfile`` or from a buffer;
BLOCK_STATUS for every selected context.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING, cast

from pynbd.backends.base import STATE_HOLE, Extent
from pynbd.filters.base import Verdict
from pynbd.protocol.constants import BASE_ALLOCATION, Cmd, Errno
from pynbd.protocol.server import Command
from pynbd.server.buffers import Buffer
from pynbd.server.conn_output import _FileSlice, _releaser
from pynbd.server.conn_state import (
    _DF,
    _FAST_ZERO,
    _FUA,
    _NO_HOLE,
    _REQ_ONE,
    BIG_REPLY,
    SPARSE_READ_MIN,
    ConnState,
    OutItem,
    Phase,
    _Payload,
)
from pynbd.server.logsafe import safe

if TYPE_CHECKING:
    from pynbd.server.connection import Connection

log = logging.getLogger("pynbd.server")


class RequestsMixin(ConnState):
    """Running requests for :class:`~pynbd.server.connection.Connection`."""

    def _command(self, ev: Command, out: list[OutItem]) -> None:
        self.counters.requests += 1
        cmd = ev.cmd
        # identity tests: an Enum's __hash__ is Python code (a set lookup costs ~0.3 us)
        if cmd is Cmd.WRITE or cmd is Cmd.TRIM or cmd is Cmd.WRITE_ZEROES:
            self._wrote = True
        if ev.cmd is Cmd.WRITE and ev.length:
            if self._splice_fd >= 0 and self._start_splice(ev, out):
                if self._payload is not None and out:
                    self._send(out)
                    out.clear()
                return
            buf = self.worker.buffers.get(ev.length)
            mv = memoryview(buf)[:ev.length]
            got = self.proto.payload_into(mv)
            if got < ev.length:
                self._payload = _Payload(ev, buf, mv, got)
                if out:
                    self._send(out)
                    out.clear()
                return
            self._dispatch(ev, buf, mv, out)
            return
        self._dispatch(ev, None, None, out)

    def _execute_write(self, ev: Command, buf: Buffer, mv: memoryview) -> None:
        """A WRITE whose payload has just arrived."""
        out: list[OutItem] = []
        self._dispatch(ev, buf, mv, out)
        if out:
            self._send(out)

    def _dispatch(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                  out: list[OutItem], front: bool = False) -> bool:
        """Admission (if a filter asks for it), then run the request inline or start it
        on a thread. False when it was held (parked) instead."""
        rt = self.runtime
        assert rt is not None
        if self._debug:
            log.debug("%s: %s offset %d length %d flags 0x%x cookie %d", self.peer,
                      ev.cmd.name, ev.offset, ev.length, ev.flags, ev.cookie)
        if rt.admits:
            a = self.backend.admit(ev.cmd.name, ev.offset, ev.length, time.monotonic())
            if a.verdict is Verdict.WAIT:
                if out:
                    self._send(out)
                    out.clear()
                if front:
                    self._parked.appendleft((ev, buf, mv))
                else:
                    self._parked.append((ev, buf, mv))
                rt.parked_connections.add(cast("Connection", self))
                if a.delay is not None:
                    self.loop.call_later(a.delay, self.unpark)
                return False
            if a.verdict is Verdict.REFUSE:
                self._release(buf, mv)
                self.counters.errors += 1
                out.append(self.proto.error_reply(ev.cookie, a.errno, a.message, ev.offset))
                return True
        if rt.blocking or (rt.slow_sync and (ev.cmd is Cmd.FLUSH or ev.flags & _FUA)):
            self._submit(ev, buf, mv)
        elif mv is not None:
            try:
                self._do_write(ev, mv, out)
            finally:
                self._release(buf, mv)
        else:
            self._execute(ev, out)
        return True

    def _release(self, buf: Buffer | None, mv: memoryview | None) -> None:
        if mv is not None:
            mv.release()
        if buf is not None:
            self.worker.buffers.put(buf)

    def unpark(self) -> None:
        """A filter that held requests lets them go (resumed, or its delay passed)."""
        self._guarded(self._unpark)

    def _unpark(self) -> None:
        if self.runtime is None or self.closed:
            return
        out: list[OutItem] = []
        while self._parked:
            ev, buf, mv = self._parked.popleft()
            if not self._dispatch(ev, buf, mv, out, front=True):
                break
        if out:
            self._send(out)
        if not self._parked and not self.closed:
            if self.phase is Phase.CLOSING or self._eof:
                self._maybe_finish()
                return
            self._process()
            self._update_interest()

    def _do_write(self, ev: Command, mv: memoryview, out: list[OutItem]) -> None:
        try:
            self.backend.pwrite(mv, ev.offset, bool(ev.flags & _FUA))
            self.counters.bytes_written += ev.length
            out.append(self.proto.ok_reply(ev.cookie, ev.offset))
        except OSError as exc:
            out.append(self._error(ev, exc))
        except BaseException as exc:
            out.append(self._bug(ev, exc))

    def _execute(self, ev: Command, out: list[OutItem]) -> None:
        """Run one request inline and append its reply to ``out``."""
        cmd = ev.cmd
        if cmd is Cmd.READ:
            self._read(ev, out)
            return
        backend = self.backend
        proto = self.proto
        try:
            if cmd is Cmd.FLUSH:
                backend.flush()
            elif cmd is Cmd.TRIM:
                backend.trim(ev.offset, ev.length, bool(ev.flags & _FUA))
            elif cmd is Cmd.WRITE_ZEROES:
                backend.zero(ev.offset, ev.length,
                             may_trim=not ev.flags & _NO_HOLE,
                             fast=bool(ev.flags & _FAST_ZERO),
                             fua=bool(ev.flags & _FUA))
            elif cmd is Cmd.CACHE:
                backend.cache(ev.offset, ev.length)
            elif cmd is Cmd.BLOCK_STATUS:
                out.extend(self._block_status_chunks(ev))
                return
            elif cmd is Cmd.WRITE:  # zero-length write
                backend.pwrite(memoryview(b""), ev.offset, bool(ev.flags & _FUA))
            else:  # pragma: no cover - the core validated the command
                out.append(proto.error_reply(ev.cookie, Errno.EINVAL, "unsupported", ev.offset))
                return
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        except BaseException as exc:
            out.append(self._bug(ev, exc))
            return
        out.append(proto.ok_reply(ev.cookie, ev.offset))

    def _block_status_chunks(self, ev: Command) -> list[bytes]:
        """Status chunks for the contexts the request asks about (every selected one, or
        those its payload named under extended headers)."""
        rt = self.runtime
        assert rt is not None
        names = self.proto.meta_contexts
        per: dict[int, list[tuple[int, int]]] = {}
        base: list[tuple[int, int]] | None = None
        for cid in ev.contexts:
            name = names.get(cid, "")
            if name == BASE_ALLOCATION:
                if base is None:
                    base = self._block_status(self.backend.extents(ev.offset, ev.length), ev)
                per[cid] = base
            else:
                per[cid] = self._block_status(rt.context_extents(name, ev.offset, ev.length),
                                              ev)
        return self.proto.block_status_reply(ev.cookie, (), contexts=ev.contexts,
                                             req_offset=ev.offset, per_context=per)

    @staticmethod
    def _block_status(extents: list[Extent], ev: Command) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        left = ev.length
        for e in extents:
            if left <= 0:
                break
            n = min(e.length, left)
            if n <= 0:
                break
            out.append((n, e.flags))
            left -= n
            if ev.flags & _REQ_ONE:
                break
        if not out:
            raise OSError(errno.EIO, "backend returned no extents")
        return out

    def _read(self, ev: Command, out: list[OutItem]) -> None:
        try:
            self._read_inline(ev, out)
        except BaseException as exc:
            out.append(self._bug(ev, exc))

    def _read_inline(self, ev: Command, out: list[OutItem]) -> None:
        rt = self.runtime
        assert rt is not None
        backend = self.backend
        proto = self.proto
        length, offset, cookie = ev.length, ev.offset, ev.cookie
        if (length >= SPARSE_READ_MIN and self.structured and rt.can_extents
                and not ev.flags & _DF):
            extents = self._read_extents(ev)
            if extents is not None:
                self._sparse_read(ev, extents, out)
                return
        if length >= BIG_REPLY:
            if not backend.resident(offset, length):
                self._submit(ev, None, None)  # not in the page cache: read on a thread
                return
            if self._sendfile_ok:
                out.append(proto.read_reply_header(cookie, offset, length))
                out.append(_FileSlice(self._sendfile_fd, offset, length))
                self.counters.bytes_read += length
                return
            pool = self.worker.buffers
            buf = pool.get(length)
            mv = memoryview(buf)[:length]
            try:
                backend.pread_into(mv, offset)
            except BaseException as exc:
                mv.release()
                pool.put(buf)
                out.append(self._error(ev, exc) if isinstance(exc, OSError)
                           else self._bug(ev, exc))
                return
            out.append(proto.read_reply_header(cookie, offset, length))
            out.append(mv)
            out.append(_releaser(pool, buf, mv))
            self.counters.bytes_read += length
            return
        data = bytearray(length)
        try:
            if not backend.pread_nowait(memoryview(data), offset):
                self._submit(ev, None, None)  # not in the page cache: read on a thread
                return
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        out.append(proto.read_reply_header(cookie, offset, length))
        out.append(data)
        self.counters.bytes_read += length

    def _read_extents(self, ev: Command) -> list[Extent] | None:
        """The extents of a large READ if some of it is a hole (sent as hole chunks),
        else None. Extents are only a hint here: if the backend fails or answers
        nonsense, the whole range is read."""
        try:
            extents = self.backend.extents(ev.offset, ev.length)
            if not isinstance(extents, list) or not all(
                    type(e) is Extent and type(e.length) is int and e.length > 0
                    and type(e.flags) is int for e in extents):
                raise TypeError(f"extents() returned {safe(repr(extents)[:100])}, not a "
                                "list of Extent with lengths > 0")
        except OSError:
            return None
        except BaseException as exc:
            self._log_bug(Cmd.BLOCK_STATUS, exc)
            return None
        if any(e.flags & STATE_HOLE for e in extents):
            return extents
        return None

    def _sparse_read(self, ev: Command, extents: list[Extent], out: list[OutItem]) -> None:
        rt = self.runtime
        assert rt is not None
        proto = self.proto
        end = ev.offset + ev.length
        pos = ev.offset
        pieces: list[tuple[int, int, bool]] = []
        for e in extents:
            if pos >= end:
                break
            n = min(e.length, end - pos)
            hole = bool(e.flags & STATE_HOLE)
            if pieces and pieces[-1][2] == hole:
                p = pieces[-1]
                pieces[-1] = (p[0], p[1] + n, hole)
            else:
                pieces.append((pos, n, hole))
            pos += n
        if pos < end:  # extents stopped short: the rest is data
            if pieces and not pieces[-1][2]:
                p = pieces[-1]
                pieces[-1] = (p[0], p[1] + end - pos, False)
            else:
                pieces.append((pos, end - pos, False))
        pool = self.worker.buffers
        chunks: list[OutItem] = []
        for i, (off, n, hole) in enumerate(pieces):
            last = i == len(pieces) - 1
            if hole:
                chunks.append(proto.hole_chunk(ev.cookie, off, n, last, ev.offset))
                continue
            if self._sendfile_ok and n >= BIG_REPLY:
                chunks.append(proto.read_reply_header(ev.cookie, off, n, done=last,
                                                      req_offset=ev.offset))
                chunks.append(_FileSlice(self._sendfile_fd, off, n))
                continue
            buf = pool.get(n)
            mv = memoryview(buf)[:n]
            try:
                self.backend.pread_into(mv, off)
            except BaseException as exc:
                mv.release()
                pool.put(buf)
                # the chunks built so far are dropped: one error reply for the request
                for c in chunks:
                    if callable(c):
                        c()
                out.append(self._error(ev, exc) if isinstance(exc, OSError)
                           else self._bug(ev, exc))
                return
            chunks.append(proto.read_reply_header(ev.cookie, off, n, done=last,
                                                  req_offset=ev.offset))
            chunks.append(mv)
            chunks.append(_releaser(pool, buf, mv))
        out.extend(chunks)
        self.counters.bytes_read += ev.length
