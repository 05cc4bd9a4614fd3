"""Requests of one connection that run off the loop: on the worker's thread pool for
backends marked ``blocking`` (and reads not in the page cache, FLUSH and FUA writes of
slow-sync backends), or started through a backend's asynchronous interface (librbd
aio) without a thread. Either way the reply is built where the call ran and sent back
on the loop, with the in-flight counts and the killswitch's clock kept.
"""

from __future__ import annotations

import errno
import time
from threading import get_ident
from typing import Any

from pynbd.protocol.constants import Cmd
from pynbd.protocol.server import Command
from pynbd.server.buffers import Buffer
from pynbd.server.conn_output import _releaser
from pynbd.server.conn_state import _FAST_ZERO, _FUA, _NO_HOLE, ConnState, OutItem, Phase

_AIO_COMMANDS = frozenset((Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES))


class OffloadMixin(ConnState):
    """Threads and aio for :class:`~pynbd.server.connection.Connection`."""

    def _submit(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None:
        rt = self.runtime
        assert rt is not None
        self.inflight += 1
        rt.active += 1
        rt.begin(self, ev.cookie)
        self.busy[ev.cookie] = time.monotonic()
        if rt.aio and ev.cmd in _AIO_COMMANDS:
            self._submit_aio(ev, buf, mv)
            return
        self.worker.run_blocking(self._blocking_call, ev, buf, mv, self._completed)

    def _submit_aio(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None:
        """Start a request on a backend with an asynchronous interface (librbd aio):
        the call returns at once, the completion comes back on the loop."""
        backend = self.backend
        cmd = ev.cmd
        loop = self.loop
        if cmd is Cmd.READ:
            buf = self.worker.buffers.get(ev.length)
            mv = memoryview(buf)[:ev.length]
        fua = bool(ev.flags & _FUA)

        rt = self.runtime
        assert rt is not None
        if rt.aio_on_loop:
            ready = self._aio_ready
            loop_thread = loop.thread_id

            def done(err: OSError | None, data: Any = None) -> None:  # the loop thread
                if get_ident() != loop_thread:  # e.g. the backend's close() collecting
                    loop.call_soon_threadsafe(lambda: self._aio_done(ev, buf, mv, err, data))
                    return
                # completions delivered together (one aio_poll) leave in one sendmsg; and
                # a request refused at once calls back inside the aio_* call: deferred
                ready.append((ev, buf, mv, err, data))
                if len(ready) == 1:
                    loop.call_soon(self._aio_batch_done)
        else:
            def done(err: OSError | None, data: Any = None) -> None:  # any thread
                loop.call_soon_threadsafe(lambda: self._aio_done(ev, buf, mv, err, data))

        try:
            if cmd is Cmd.READ:
                assert mv is not None
                backend.aio_pread(mv, ev.offset, done)
            elif cmd is Cmd.WRITE:
                backend.aio_pwrite(mv if mv is not None else memoryview(b""), ev.offset, fua,
                                   done)
            elif cmd is Cmd.FLUSH:
                backend.aio_flush(done)
            elif cmd is Cmd.TRIM:
                backend.aio_trim(ev.offset, ev.length, fua, done)
            else:
                backend.aio_zero(ev.offset, ev.length, not ev.flags & _NO_HOLE,
                                 bool(ev.flags & _FAST_ZERO), fua, done)
        except OSError as exc:
            done(exc)
        except BaseException as exc:
            self._log_bug(cmd, exc)
            done(OSError(errno.EIO, "internal error in the backend"))

    def _aio_done(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                  err: OSError | None, data: Any = None) -> None:
        self._guarded(self._aio_done_impl, ev, buf, mv, err, data)

    def _aio_done_impl(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                       err: OSError | None, data: Any = None) -> None:
        out: list[OutItem] = []
        try:
            self._aio_reply(ev, buf, mv, err, data, out)
        except BaseException:
            self._request_ended(ev, buf, mv)  # counted out even so; _guarded drops us
            raise
        self._completed_tail(out)

    def _aio_batch_done(self) -> None:
        self._guarded(self._aio_batch_impl)

    def _aio_batch_impl(self) -> None:
        """The completions collected on the loop since the last batch: every reply, then
        one send."""
        ready = self._aio_ready
        batch = ready[:]
        ready.clear()  # the list ``done`` closures append to: same object, emptied
        out: list[OutItem] = []
        for i, (ev, buf, mv, err, data) in enumerate(batch):
            try:
                self._aio_reply(ev, buf, mv, err, data, out)
            except BaseException:
                # a bug answering one request: the rest still end (counts, buffers) so
                # nothing waits for them forever; _guarded then drops the connection
                for ev2, buf2, mv2, _, _ in batch[i:]:
                    self._request_ended(ev2, buf2, mv2)
                for item in out:
                    if callable(item):
                        item()  # give read buffers back
                raise
        self._completed_tail(out)

    def _aio_reply(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                   err: OSError | None, data: Any, out: list[OutItem]) -> None:
        """Account for one finished aio request and append its reply to ``out``."""
        cmd = ev.cmd
        if err is not None:
            out.append(self._error(ev, err))
        elif cmd is Cmd.READ and data is not None:
            # the backend handed over a buffer of its own (buf stayed untouched)
            if len(data) != ev.length:
                out.append(self._error(ev, OSError(
                    errno.EIO, f"backend returned {len(data)} bytes for a {ev.length}-byte "
                    "read")))
            else:
                out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
                out.append(data)
                self.counters.bytes_read += ev.length
        elif cmd is Cmd.READ and buf is not None and mv is not None:
            out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
            out.append(mv)
            out.append(_releaser(self.worker.buffers, buf, mv))
            self.counters.bytes_read += ev.length
            buf = mv = None  # released once sent
        else:
            if cmd is Cmd.WRITE:
                self.counters.bytes_written += ev.length
            out.append(self.proto.ok_reply(ev.cookie, ev.offset))
        self._request_ended(ev, buf, mv)

    def _blocking_call(self, ev: Command, mv: memoryview | None) -> list[OutItem]:
        """Runs on a worker thread: the backend call and its reply bytes (always one
        reply, whatever the backend does)."""
        out: list[OutItem] = []
        lock = self._serial
        if lock is not None:
            lock.acquire()
        try:
            if mv is not None:
                self._do_write(ev, mv, out)
            elif ev.cmd is Cmd.READ:
                self._read_threaded(ev, out)
            else:
                self._execute(ev, out)
        except BaseException as exc:
            out = [self._bug(ev, exc)]
        finally:
            if lock is not None:
                lock.release()
        return out

    def _read_threaded(self, ev: Command, out: list[OutItem]) -> None:
        data = bytearray(ev.length)
        try:
            self.backend.pread_into(memoryview(data), ev.offset)
        except OSError as exc:
            out.append(self._error(ev, exc))
            return
        except BaseException as exc:
            out.append(self._bug(ev, exc))
            return
        out.append(self.proto.read_reply_header(ev.cookie, ev.offset, ev.length))
        out.append(data)
        self.counters.bytes_read += ev.length

    def _completed(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                   out: list[OutItem]) -> None:
        self._guarded(self._completed_impl, ev, buf, mv, out)

    def _completed_impl(self, ev: Command, buf: Buffer | None, mv: memoryview | None,
                        out: list[OutItem]) -> None:
        """Back on the loop: send the reply of a request that ran on a thread."""
        self._request_ended(ev, buf, mv)
        self._completed_tail(out)

    def _request_ended(self, ev: Command, buf: Buffer | None, mv: memoryview | None) -> None:
        """A request off the loop finished: uncount it, give its buffer back."""
        rt = self.runtime
        assert rt is not None
        self.inflight -= 1
        rt.active -= 1
        rt.end(self, ev.cookie)
        self.busy.pop(ev.cookie, None)
        if mv is not None:
            mv.release()
        if buf is not None:
            self.worker.buffers.put(buf)

    def _completed_tail(self, out: list[OutItem]) -> None:
        """After one or more requests ended: send their replies, go on reading."""
        rt = self.runtime
        assert rt is not None
        if rt.active == 0:
            rt.quiesced()
        if self.closed:
            self._close_own()
            return
        if out:
            self._send(out)
        if self.phase is Phase.CLOSING or self._eof:
            self._maybe_finish()
            return
        if self._payload is None and self._can_execute():
            self._process()
        self._update_interest()
