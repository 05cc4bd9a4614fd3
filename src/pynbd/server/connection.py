"""One client connection: a thin blocking-socket driver around the sans-I/O core.

Thread per connection (see docs/design.md for the measurements behind it). Fast
backends (memory, page-cache files) are called inline and replies to a burst of
pipelined requests go out in one ``sendmsg``; backends marked ``blocking`` (librbd)
run on a bounded worker pool so replies complete out of order and one slow request
does not stall the others.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pynbd.backends.base import STATE_HOLE, Extent
from pynbd.protocol.constants import (
    QEMU_ALLOCATION_DEPTH,
    Cmd,
    CmdFlag,
    Errno,
    errno_to_nbd,
)
from pynbd.protocol.errors import PeerProtocolError
from pynbd.protocol.server import (
    NEED_DATA,
    Aborted,
    Command,
    Disconnect,
    ExportSelected,
    InvalidCommand,
    OptionHandled,
    SafeClose,
    ServerConnection,
    StartTLS,
)
from pynbd.server.buffers import BufferPool
from pynbd.server.exports import Counters, Export

if TYPE_CHECKING:
    from pynbd.server.server import Server

log = logging.getLogger("pynbd.server")

RECV_SIZE = 256 * 1024
#: reads at least this large are checked for holes (structured replies only)
SPARSE_READ_MIN = 64 * 1024
#: reads at least this large are sent at once instead of batched
BIG_REPLY = 64 * 1024
MAX_IOV = 512


_MODIFYING = frozenset((Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES))


class ConnectionClosed(Exception):
    pass


class ClientConnection:
    def __init__(self, server: Server, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.peer = peer
        self.proto = ServerConnection(server.registry, server.protocol_config)
        self.export: Export | None = None
        self.counters: Counters | None = None
        self.started = time.monotonic()
        self.tls = False
        self._send_lock = threading.Lock()
        self._stopping = False
        self._inflight = 0
        self._inflight_cv = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self.pool: BufferPool = server.buffers
        self.closed = threading.Event()
        #: a WRITE/TRIM/WRITE_ZEROES was received: flush at disconnect
        self._wrote = False
        self.host = ""
        #: monotonic start times of requests being executed (for the request deadline)
        self.busy: dict[int, float] = {}

    # --- socket helpers -------------------------------------------------------------

    def _sendv(self, bufs: list[bytes | memoryview | bytearray]) -> None:
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket):
            sock.sendall(b"".join(bufs))
            return
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            batch = views[:MAX_IOV]
            sent = sock.sendmsg(batch)
            # drop what was sent
            i = 0
            while i < len(batch) and sent >= len(batch[i]):
                sent -= len(batch[i])
                i += 1
            if i < len(batch) and sent:
                batch[i] = batch[i][sent:]
            views = batch[i:] + views[len(batch):]

    def send(self, bufs: list[bytes | memoryview | bytearray]) -> None:
        if not bufs:
            return
        with self._send_lock:
            self._sendv(bufs)

    def stop(self) -> None:
        """Ask the connection to finish: stop reading, complete what was received."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def oldest_request_age(self, now: float) -> float:
        busy = list(self.busy.values())
        return now - min(busy) if busy else 0.0

    def abort(self) -> None:
        """Drop the connection now (ACL change, killswitch)."""
        self._stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # --- main loop -----------------------------------------------------------------

    def run(self) -> None:
        try:
            selected = self._handshake()
            if selected is not None:
                self._transmission(selected)
        except PeerProtocolError as exc:
            log.warning("%s: protocol error: %s; dropping connection", self.peer, exc)
        except (ConnectionClosed, ConnectionError, TimeoutError) as exc:
            log.info("%s: connection ended: %s", self.peer, exc or type(exc).__name__)
        except ssl.SSLError as exc:
            log.warning("%s: TLS error: %s", self.peer, exc)
        except OSError as exc:
            log.info("%s: socket error: %s", self.peer, exc)
        except Exception:  # never let one connection take the server down
            log.exception("%s: internal error; dropping connection", self.peer)
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._pool is not None:
            self._wait_inflight()
            self._pool.shutdown(wait=True)
        if self.export is not None and self.counters is not None:
            self.export.detach(self.counters)
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed.set()
        self.server._connection_closed(self)

    def _recv(self) -> bytes:
        try:
            data = self.sock.recv(RECV_SIZE)
        except TimeoutError as exc:
            raise TimeoutError("handshake deadline passed") from exc
        if not data:
            raise ConnectionClosed("client closed the connection")
        return data

    def _handshake(self) -> ExportSelected | None:
        proto = self.proto
        deadline = time.monotonic() + self.server.limits.handshake_timeout
        self.sock.settimeout(self.server.limits.handshake_timeout)
        self.send([proto.initiate()])
        while True:
            try:
                ev = proto.next_event()
            finally:
                out = proto.take_output()
                if out:
                    self.send([out])
            if ev is NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("handshake deadline passed")
                self.sock.settimeout(left)
                proto.receive_data(self._recv())
                continue
            if isinstance(ev, OptionHandled):
                continue
            if isinstance(ev, StartTLS):
                self._start_tls()
                continue
            if isinstance(ev, Aborted):
                log.debug("%s: client aborted negotiation", self.peer)
                self._tls_shutdown()
                return None
            if isinstance(ev, ExportSelected):
                self.sock.settimeout(None)
                return ev
            raise PeerProtocolError(f"unexpected event during handshake: {ev!r}")

    def _start_tls(self) -> None:
        ctx = self.server.tls_context
        assert ctx is not None and isinstance(self.sock, socket.socket)
        tls_sock = ctx.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        tls_sock.do_handshake()
        self.sock = tls_sock
        self.tls = True
        self.proto.tls_established()

    def _tls_shutdown(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.settimeout(2)
                self.sock.unwrap()  # close_notify
            except (OSError, ValueError):
                pass

    def _transmission(self, selected: ExportSelected) -> None:
        export = self.server.registry.get(selected.export.name)
        assert export is not None
        self.export = export
        self.counters = export.attach()
        self.structured = selected.structured_replies
        backend = export.backend
        if backend.blocking:
            self._pool = ThreadPoolExecutor(
                max_workers=self.server.limits.workers_per_connection,
                thread_name_prefix=f"nbd-io-{self.peer}")
        log.info("%s: export %r selected (structured replies %s, extended headers %s, "
                 "flags 0x%x)", self.peer, export.name, selected.structured_replies,
                 selected.extended_headers, selected.flags)
        proto = self.proto
        sock = self.sock
        rbuf = bytearray(RECV_SIZE)
        rmv = memoryview(rbuf)
        out: list[bytes | memoryview | bytearray] = []
        out_bytes = 0
        counters = self.counters
        while True:
            ev = proto.next_event()
            if ev is NEED_DATA:
                if out:
                    self.send(out)
                    out, out_bytes = [], 0
                try:
                    n = sock.recv_into(rbuf)
                except OSError as exc:
                    if self._stopping:
                        n = 0
                    else:
                        raise ConnectionClosed(str(exc)) from exc
                if n == 0:
                    if not self._stopping:
                        log.info("%s: client closed without NBD_CMD_DISC", self.peer)
                    self._wait_inflight()  # writes still on worker threads first
                    self._flush_on_close()
                    return
                proto.receive_data(rmv[:n])
                continue
            if isinstance(ev, Command):
                counters.requests += 1
                if ev.cmd in _MODIFYING:
                    self._wrote = True
                if self._pool is not None:
                    if export.gate is not None and not export.gate.enter():
                        self._discard_payload(ev)
                        out.append(self._stepped_down_reply(ev))
                        continue
                    self._submit(ev)
                    continue
                gate = export.gate
                if gate is not None and not gate.enter():
                    self._discard_payload(ev)
                    out.append(self._stepped_down_reply(ev))
                    continue
                busy = self.busy
                busy[ev.cookie] = time.monotonic()
                try:
                    out_bytes += self._execute(ev, out)
                finally:
                    busy.pop(ev.cookie, None)
                    if gate is not None:
                        gate.leave()
                if out_bytes >= BIG_REPLY or len(out) >= MAX_IOV:
                    self.send(out)
                    out, out_bytes = [], 0
                continue
            if isinstance(ev, InvalidCommand):
                counters.requests += 1
                counters.errors += 1
                log.debug("%s: refused request: %s", self.peer, ev.message)
                out.append(proto.error_reply(ev.cookie, ev.error, ev.message, ev.offset))
                continue
            if isinstance(ev, Disconnect):
                self.send(out)
                self._wait_inflight()
                self._flush_on_close()
                self._tls_shutdown()
                log.info("%s: client disconnected (NBD_CMD_DISC)", self.peer)
                return
            if isinstance(ev, SafeClose):
                self.send(out)
                self._wait_inflight()
                try:
                    if not export.read_only:
                        backend.flush()
                    reply = proto.ok_reply(ev.cookie, 0)
                    log.info("%s: safe close", self.peer)
                except OSError as exc:
                    counters.errors += 1
                    reply = proto.error_reply(ev.cookie, errno_to_nbd(exc.errno),
                                              f"flush failed: {exc}", 0)
                    log.warning("%s: safe close failed: flush: %s", self.peer, exc)
                self.send([reply])
                self._tls_shutdown()
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            raise PeerProtocolError(f"unexpected event in transmission: {ev!r}")

    def _flush_on_close(self) -> None:
        export = self.export
        if export is None or export.read_only or not self._wrote:
            # nothing written on this connection: nothing of ours to make durable (an
            # fdatasync per read-only session made short connections pile up)
            return
        try:
            export.backend.flush()
        except OSError as exc:
            log.warning("%s: flush at disconnect failed: %s", self.peer, exc)

    # --- request execution ------------------------------------------------------------

    def _recv_payload(self, length: int) -> tuple[bytearray, memoryview]:
        buf = self.pool.get(length)
        mv = memoryview(buf)[:length]
        got = self.proto.payload_into(mv)
        sock = self.sock
        while got < length:
            n = sock.recv_into(mv[got:])
            if n == 0:
                self.pool.put(buf)
                raise ConnectionClosed(f"client closed in the middle of a {length}-byte WRITE payload")
            self.proto.payload_received(n)
            got += n
        return buf, mv

    def _execute(self, ev: Command, out: list[bytes | memoryview | bytearray]) -> int:
        """Run one request inline; append its reply to ``out``; return bytes appended."""
        proto = self.proto
        cmd = ev.cmd
        export = self.export
        assert export is not None and self.counters is not None
        backend = export.backend
        if cmd is Cmd.WRITE:
            buf, mv = self._recv_payload(ev.length) if ev.length else (None, memoryview(b""))
            try:
                backend.pwrite(mv, ev.offset, bool(ev.flags & CmdFlag.FUA))
                self.counters.bytes_written += ev.length
                if export.tracker is not None:
                    export.tracker.mark(ev.offset, ev.length)
                out.append(proto.ok_reply(ev.cookie, ev.offset))
            except OSError as exc:
                out.append(self._error(ev, exc))
            finally:
                if buf is not None:
                    self.pool.put(buf)
            return 16
        if cmd is Cmd.READ:
            return self._read(ev, out)
        try:
            if cmd is Cmd.FLUSH:
                backend.flush()
            elif cmd is Cmd.TRIM:
                backend.trim(ev.offset, ev.length, bool(ev.flags & CmdFlag.FUA))
            elif cmd is Cmd.WRITE_ZEROES:
                backend.zero(ev.offset, ev.length,
                             may_trim=not ev.flags & CmdFlag.NO_HOLE,
                             fast=bool(ev.flags & CmdFlag.FAST_ZERO),
                             fua=bool(ev.flags & CmdFlag.FUA))
            elif cmd is Cmd.CACHE:
                backend.cache(ev.offset, ev.length)
                out.append(proto.ok_reply(ev.cookie, ev.offset))
                return 16
            elif cmd is Cmd.BLOCK_STATUS:
                chunks = self._block_status_chunks(ev)
                out.extend(chunks)
                return sum(len(c) for c in chunks)
            else:  # pragma: no cover - the core validated the command
                out.append(proto.error_reply(ev.cookie, Errno.EINVAL, "unsupported", ev.offset))
                return 16
        except OSError as exc:
            if cmd is not Cmd.FLUSH and export.tracker is not None:
                export.tracker.mark(ev.offset, ev.length)  # may have partly happened
            out.append(self._error(ev, exc))
            return 16
        if cmd is not Cmd.FLUSH and export.tracker is not None:
            export.tracker.mark(ev.offset, ev.length)  # TRIM, WRITE_ZEROES
        out.append(proto.ok_reply(ev.cookie, ev.offset))
        return 16

    def _discard_payload(self, ev: Command) -> None:
        """Receive and drop the payload of a WRITE that will not be executed."""
        if ev.cmd is Cmd.WRITE and ev.length:
            buf, _mv = self._recv_payload(ev.length)
            self.pool.put(buf)

    def _stepped_down_reply(self, ev: Command) -> bytes:
        assert self.counters is not None and self.export is not None
        self.counters.errors += 1
        gate = self.export.gate
        reason = gate.step_down_reason if gate is not None else ""
        return self.proto.error_reply(ev.cookie, Errno.ESHUTDOWN,
                                      f"export has stepped down: {reason}", ev.offset)

    def _error(self, ev: Command, exc: OSError) -> bytes:
        assert self.counters is not None
        self.counters.errors += 1
        err = errno_to_nbd(exc.errno)
        if ev.cmd is Cmd.WRITE_ZEROES and ev.flags & CmdFlag.FAST_ZERO and err == Errno.ENOTSUP:
            log.debug("%s: fast zero refused", self.peer)
        else:
            log.warning("%s: %s offset %d length %d failed: %s", self.peer, ev.cmd.name,
                        ev.offset, ev.length, exc)
        return self.proto.error_reply(ev.cookie, err, f"{ev.cmd.name} failed: {exc.strerror or exc}",
                                      ev.offset)

    def _block_status_chunks(self, ev: Command) -> list[bytes]:
        """Status chunks for the contexts the request asks about (all selected ones,
        or those its payload named under extended headers)."""
        assert self.export is not None
        names = self.proto.meta_contexts
        per: dict[int, list[tuple[int, int]]] = {}
        base: list[tuple[int, int]] | None = None
        for cid in ev.contexts:
            if names.get(cid) == QEMU_ALLOCATION_DEPTH:
                # pynbd's backends have no backing chain: every byte is local (depth 1),
                # what qemu-nbd -A reports for a raw image
                per[cid] = [(ev.length, 1)]
            else:  # base:allocation
                if base is None:
                    base = self._block_status(self.export.backend.extents(ev.offset,
                                                                          ev.length), ev)
                per[cid] = base
        return self.proto.block_status_reply(ev.cookie, (), contexts=ev.contexts,
                                             req_offset=ev.offset, per_context=per)

    @staticmethod
    def _block_status(extents: list[Extent], ev: Command) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        left = ev.length
        for e in extents:
            if left <= 0:
                break
            # clipped to the request (64-bit under extended headers; the protocol core
            # caps what a compact reply can carry)
            n = min(e.length, left)
            if n <= 0:
                break
            out.append((n, e.flags))
            left -= n
            if ev.flags & CmdFlag.REQ_ONE:
                break
        if not out:
            raise OSError(errno.EIO, "backend returned no extents")
        return out

    def _read(self, ev: Command, out: list[bytes | memoryview | bytearray]) -> int:
        proto = self.proto
        export = self.export
        assert export is not None and self.counters is not None
        backend = export.backend
        length, offset, cookie = ev.length, ev.offset, ev.cookie
        if (self.structured and length >= SPARSE_READ_MIN and backend.can_extents
                and not ev.flags & CmdFlag.DF):
            try:
                extents = backend.extents(offset, length)
            except OSError:
                extents = [Extent(length, 0)]
            if any(e.flags & STATE_HOLE for e in extents):
                return self._sparse_read(ev, extents, out)
        if length >= BIG_REPLY:
            sf_fd = getattr(backend, "sendfile_fd", None)
            if sf_fd is not None and not isinstance(self.sock, ssl.SSLSocket):
                # zero-copy: page cache -> socket, no user-space buffer
                out.append(proto.read_reply_header(cookie, offset, length))
                self._sendfile(out, sf_fd, offset, length)
                out.clear()
                self.counters.bytes_read += length
                return 0
            buf = self.pool.get(length)
            mv = memoryview(buf)[:length]
            try:
                backend.pread_into(mv, offset)
            except OSError as exc:
                self.pool.put(buf)
                out.append(self._error(ev, exc))
                return 16
            out.append(proto.read_reply_header(cookie, offset, length))
            out.append(mv)
            self.send(out)
            out.clear()
            self.pool.put(buf)
            self.counters.bytes_read += length
            return 0
        data = bytearray(length)
        try:
            backend.pread_into(memoryview(data), offset)
        except OSError as exc:
            out.append(self._error(ev, exc))
            return 16
        out.append(proto.read_reply_header(cookie, offset, length))
        out.append(data)
        self.counters.bytes_read += length
        return length + 16

    def _sendfile(self, head: list[bytes | memoryview | bytearray], fd: int, offset: int,
                  length: int) -> None:
        """Send ``head`` then ``length`` bytes of file ``fd`` at ``offset`` (os.sendfile)."""
        sock = self.sock
        with self._send_lock:
            sock.sendall(b"".join(head), socket.MSG_MORE)
            sent = 0
            out_fd = sock.fileno()
            while sent < length:
                n = os.sendfile(out_fd, fd, offset + sent, length - sent)
                if n == 0:  # the file shrank underneath us: the rest reads as zeros
                    sock.sendall(bytes(length - sent))
                    break
                sent += n

    def _sparse_read(self, ev: Command, extents: list[Extent],
                     out: list[bytes | memoryview | bytearray]) -> int:
        proto = self.proto
        assert self.export is not None and self.counters is not None
        backend = self.export.backend
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
        self.send(out)
        out.clear()
        for i, (off, n, hole) in enumerate(pieces):
            last = i == len(pieces) - 1
            if hole:
                self.send([proto.hole_chunk(ev.cookie, off, n, last, ev.offset)])
                continue
            buf = self.pool.get(n)
            mv = memoryview(buf)[:n]
            try:
                backend.pread_into(mv, off)
            except OSError as exc:
                self.pool.put(buf)
                self.send([self._error(ev, exc)])
                return 0
            self.send([proto.read_reply_header(ev.cookie, off, n, done=last,
                                               req_offset=ev.offset), mv])
            self.pool.put(buf)
        self.counters.bytes_read += ev.length
        return 0

    # --- worker pool path (blocking backends) ---------------------------------------

    def _submit(self, ev: Command) -> None:
        limit = self.server.limits.max_inflight
        with self._inflight_cv:
            while self._inflight >= limit:
                self._inflight_cv.wait()
            self._inflight += 1
        payload: tuple[bytearray, memoryview] | None = None
        if ev.cmd is Cmd.WRITE and ev.length:
            try:
                payload = self._recv_payload(ev.length)
            except BaseException:
                self._done_one()
                raise
        assert self._pool is not None
        self.busy[ev.cookie] = time.monotonic()
        self._pool.submit(self._run_pooled, ev, payload)

    def _run_pooled(self, ev: Command, payload: tuple[bytearray, memoryview] | None) -> None:
        try:
            out: list[bytes | memoryview | bytearray] = []
            if payload is not None:
                buf, mv = payload
                try:
                    assert self.export is not None and self.counters is not None
                    self.export.backend.pwrite(mv, ev.offset, bool(ev.flags & CmdFlag.FUA))
                    self.counters.bytes_written += ev.length
                    if self.export.tracker is not None:
                        self.export.tracker.mark(ev.offset, ev.length)
                    out.append(self.proto.ok_reply(ev.cookie, ev.offset))
                except OSError as exc:
                    out.append(self._error(ev, exc))
                finally:
                    self.pool.put(buf)
            else:
                self._execute(ev, out)
            self.send(out)
        except OSError as exc:
            log.info("%s: reply to %s failed: %s", self.peer, ev.cmd.name, exc)
        except Exception:
            log.exception("%s: internal error in %s", self.peer, ev.cmd.name)
        finally:
            self.busy.pop(ev.cookie, None)
            if self.export is not None and self.export.gate is not None:
                self.export.gate.leave()
            self._done_one()

    def _done_one(self) -> None:
        with self._inflight_cv:
            self._inflight -= 1
            self._inflight_cv.notify_all()

    def _wait_inflight(self) -> None:
        with self._inflight_cv:
            self._inflight_cv.wait_for(lambda: self._inflight == 0)


RunCallback = Callable[[ClientConnection], None]
