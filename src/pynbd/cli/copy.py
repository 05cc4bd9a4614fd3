"""``pynbd copy SRC DST``: copy between NBD exports, files and streams (like nbdcopy).

SRC and DST are NBD URIs, local files (or block devices), or ``-`` for stdin/stdout.
The copy is sparse-aware: the source's holes and zero ranges (NBD block status
``base:allocation``, or ``SEEK_DATA``/``SEEK_HOLE`` on files) are not read; on the
destination they become NBD_CMD_WRITE_ZEROES (which lets the server punch holes unless
``--allocated``), or are skipped for a freshly truncated file or with
``--destination-is-zero``. ``--connections N`` worker threads each drive their own
source and destination connection with up to ``--requests N`` requests in flight
(more than one connection only where the server advertises CAN_MULTI_CONN). Without
a checksum or TLS, NBD -> NBD and file -> NBD copies are zero-copy: the kernel moves each
payload from the source socket (or file) to the destination socket (splice/sendfile).
``--checksum ALG`` prints the digest of the copied data; ``--verify`` re-reads the
destination and compares. A progress bar is drawn on stderr when it is a terminal (or
with ``--progress``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pynbd.client import Client, CmdFlag, connect, parse_uri
from pynbd.client.blocking import Request
from pynbd.client.uri import is_uri
from pynbd.protocol.constants import BASE_ALLOCATION, MAX_PAYLOAD

if TYPE_CHECKING:  # imported where needed: they cost start-up time
    import queue

DEFAULT_REQUEST_SIZE = 1 << 20
DEFAULT_REQUESTS = 16
ZERO_CHUNK = 64 << 20  # largest single WRITE_ZEROES
STALL_LIMIT = 600.0  # seconds without progress before giving up
#: SO_SNDBUF asked for on Unix-socket destinations when forwarding (see _grow_send_buffer)
SEND_BUFFER = 2 << 20
_ZEROES = bytes(4 << 20)


class CopyError(Exception):
    pass


# --- endpoints ---------------------------------------------------------------------

class Endpoint:
    """One side of a copy. ``size`` is None for a stream source of unknown length."""

    size: int | None = None
    name = ""
    #: at most this many connections/threads
    max_connections = 1
    sequential = False  # a stream: offsets must be processed in order

    def open_handles(self, n: int) -> list[Any]:
        return [self] * n

    def extents(self, handle: Any, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, is_zero) covering the range."""
        yield offset, length, False

    def close(self) -> None:
        pass


class NBDEndpoint(Endpoint):
    def __init__(self, uri: str, connections: int, write: bool, timeout: float | None) -> None:
        self.uri = parse_uri(uri)
        self.name = uri
        self.write = write
        self.timeout = timeout
        first = connect(self.uri, timeout=timeout, meta_contexts=() if write else
                        (BASE_ALLOCATION,))
        self.clients: list[Client] = [first]
        self.size = first.size
        if write and first.is_read_only():
            first.close()
            raise CopyError(f"{uri}: export is read-only")
        self.max_connections = connections if first.can_multi_conn() else 1
        self.block_status = BASE_ALLOCATION in first.meta_contexts.values()
        self.can_zero = first.can_zero()
        self.can_fast_zero = first.can_fast_zero()
        self.max_request = first.max_request

    def open_handles(self, n: int) -> list[Any]:
        n = max(1, min(n, self.max_connections))
        for _ in range(n - len(self.clients)):
            self.clients.append(connect(self.uri, timeout=self.timeout,
                                        meta_contexts=() if self.write else (BASE_ALLOCATION,)))
        return list(self.clients[:n])

    def extra_handle(self) -> Client:
        c = connect(self.uri, timeout=self.timeout, meta_contexts=(BASE_ALLOCATION,))
        self.clients.append(c)
        return c

    def extents(self, handle: Any, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        if not self.block_status:
            yield offset, length, False
            return
        c: Client = handle
        for e in c.iter_extents(offset, length, BASE_ALLOCATION, step=1 << 30):
            yield e.offset, e.length, e.zero

    def close(self) -> None:
        errors = []
        for c in self.clients:
            res = c.close()
            if self.write and res.error:
                errors.append(res.error)
        if errors:
            raise CopyError(f"{self.name}: closing failed: {errors[0]}")


class FileEndpoint(Endpoint):
    def __init__(self, path: str, write: bool, size_hint: int | None = None) -> None:
        self.name = path
        self.write = write
        self.max_connections = 64
        self.fresh = False
        if write:
            exists = os.path.exists(path)
            is_reg = not exists or stat.S_ISREG(os.stat(path).st_mode)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            if is_reg:
                # like cp: replace the contents; a fresh file reads as zeroes everywhere,
                # so zero ranges are skipped and stay sparse
                os.ftruncate(self.fd, 0)
                os.ftruncate(self.fd, size_hint or 0)
                self.fresh = True
        else:
            self.fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self.fd)
        self.regular = stat.S_ISREG(st.st_mode)
        if stat.S_ISBLK(st.st_mode):
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif write and self.regular and size_hint is None:
            self.size = None  # a stream source: the file grows as needed
        else:
            self.size = st.st_size

    def extents(self, handle: Any, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        end = offset + length
        pos = offset
        if not self.regular:
            yield offset, length, False
            return
        for _ in range(1 << 30):
            if pos >= end:
                return
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                yield pos, end - pos, True
                return
            if data > pos:
                yield pos, min(data, end) - pos, True
                pos = min(data, end)
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            yield pos, hole - pos, False
            pos = hole

    def close(self) -> None:
        if self.write:
            os.fsync(self.fd)
        os.close(self.fd)


class StreamEndpoint(Endpoint):
    sequential = True

    def __init__(self, stream: BinaryIO, write: bool) -> None:
        self.name = "-"
        self.stream = stream
        self.write = write
        self.max_connections = 1
        self.size = None


def open_endpoint(spec: str, write: bool, connections: int, timeout: float | None,
                  size_hint: int | None = None) -> Endpoint:
    if spec == "-":
        return StreamEndpoint(sys.stdout.buffer if write else sys.stdin.buffer, write)
    if is_uri(spec):
        return NBDEndpoint(spec, connections, write, timeout)
    return FileEndpoint(spec, write, size_hint)


# --- ordered checksum -----------------------------------------------------------

class OrderedHasher:
    """Hash pieces delivered by several threads, in offset order (each thread hands in
    its own pieces in increasing order, so the earliest piece is never waiting)."""

    def __init__(self, algorithm: str) -> None:
        import hashlib
        self.h = hashlib.new(algorithm)
        self.next = 0
        self.cond = threading.Condition()
        self.failed = False

    def update(self, offset: int, data: memoryview | None, length: int) -> None:
        with self.cond:
            deadline = time.monotonic() + STALL_LIMIT
            while self.next != offset:
                if self.failed:
                    raise CopyError("copy aborted")
                if self.next > offset or time.monotonic() > deadline:
                    raise CopyError(f"checksum out of order at {offset} (at {self.next})")
                self.cond.wait(1.0)
        # only the thread whose turn it is gets here: hash outside the lock (GIL released)
        if data is None:
            pos = 0
            while pos < length:
                k = min(length - pos, len(_ZEROES))
                self.h.update(memoryview(_ZEROES)[:k])
                pos += k
        else:
            self.h.update(data)
        with self.cond:
            self.next = offset + length
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


# --- the copy --------------------------------------------------------------------

@dataclass
class Options:
    connections: int = 4
    #: worker threads (each drives one source and one destination connection);
    #: like nbdcopy's --threads, defaults to the number of CPUs
    threads: int = os.cpu_count() or 1
    requests: int = DEFAULT_REQUESTS
    request_size: int = DEFAULT_REQUEST_SIZE
    allocated: bool = False
    destination_is_zero: bool = False
    checksum: str | None = None
    #: NBD -> NBD and file -> NBD without buffers (splice/sendfile, see
    #: _Worker._run_forward); None = whenever possible (no checksum, no TLS)
    zero_copy: bool | None = {"1": True, "0": False}.get(
        os.environ.get("PYNBD_COPY_ZERO_COPY", ""))
    #: a reader and a writer thread per connection pair (else one thread does both);
    #: None = only when there is a single pair (several pairs already overlap each other)
    split_threads: bool | None = {"1": True, "0": False}.get(
        os.environ.get("PYNBD_COPY_SPLIT", ""))
    progress: Callable[[int, int | None], None] | None = None


class Progress:
    def __init__(self) -> None:
        self.done = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.done += n


class WorkQueue:
    """Hands out (offset, length, is_zero) pieces in increasing offset order."""

    def __init__(self, src: Endpoint, handle: Any, size: int, request_size: int) -> None:
        self.lock = threading.Lock()
        self.it = self._pieces(src, handle, size, request_size)

    @staticmethod
    def _pieces(src: Endpoint, handle: Any, size: int,
                request_size: int) -> Iterator[tuple[int, int, bool]]:
        for off, ln, zero in src.extents(handle, 0, size):
            step = ZERO_CHUNK if zero else request_size
            end = off + ln
            while off < end:
                n = min(step, end - off)
                if not zero and n == step and off % step:
                    n = min(step - off % step, end - off)  # align later pieces
                yield off, n, zero
                off += n

    def next(self) -> tuple[int, int, bool] | None:
        with self.lock:
            return next(self.it, None)


class _Worker:
    def __init__(self, src: Endpoint, sh: Any, dst: Endpoint, dh: Any, opts: Options,
                 queue: WorkQueue, hasher: OrderedHasher | None, progress: Progress) -> None:
        self.src, self.sh, self.dst, self.dh = src, sh, dst, dh
        self.opts = opts
        self.queue = queue
        self.hasher = hasher
        self.progress = progress
        self.error: BaseException | None = None
        self.split = bool(opts.split_threads)
        self.forward = False
        # buffers are allocated on first use (zero-filling 2 x requests MiB up front
        # cost more CPU than small copies take), at most 2 * requests of them
        self.free: list[memoryview] = []
        self.buffers_left = 2 * opts.requests

    def _new_buffer(self) -> memoryview | None:
        if not self.buffers_left:
            return None
        self.buffers_left -= 1
        return memoryview(bytearray(self.opts.request_size))

    def run(self) -> None:
        try:
            if self.forward:
                self._run_forward()
            elif self.split:
                self._run_split()
            else:
                self._run()
        except BaseException as exc:
            self.error = exc
            if self.hasher is not None:
                self.hasher.abort()

    def _run_split(self) -> None:
        """A reader thread (this one) and a writer thread per connection pair, so that
        receiving from the source and sending to the destination overlap (both release
        the GIL in their system calls). Items reach the writer in offset order."""
        import queue
        depth = self.opts.requests
        free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for b in self.free:
            free.put(b)

        def take(block: bool) -> memoryview:
            try:
                return free.get_nowait()
            except queue.Empty:
                b = self._new_buffer()
                if b is not None:
                    return b
                if not block:
                    raise
            return free.get(timeout=0.5)
        handoff: queue.Queue[tuple[int, int, bool, memoryview | None] | None] = \
            queue.Queue(maxsize=2 * depth)
        failed = threading.Event()
        writer_error: list[BaseException] = []

        def put(item: tuple[int, int, bool, memoryview | None] | None) -> None:
            deadline = time.monotonic() + STALL_LIMIT
            while True:
                if failed.is_set():
                    raise CopyError("copy aborted")
                try:
                    handoff.put(item, timeout=0.5)
                    return
                except queue.Full:
                    if time.monotonic() > deadline:
                        raise CopyError("destination stalled") from None

        def writer() -> None:
            writes: collections.deque[tuple[Any, memoryview | None, int]] = \
                collections.deque()
            try:
                deadline = time.monotonic() + STALL_LIMIT
                while True:
                    try:
                        item = handoff.get(timeout=0.5)
                    except queue.Empty:
                        if failed.is_set():
                            return
                        if time.monotonic() > deadline:
                            raise CopyError("source stalled") from None
                        continue
                    deadline = time.monotonic() + STALL_LIMIT
                    if item is None:
                        break
                    off, ln, zero, view = item
                    if zero:
                        writes.append((self._zero(off, ln), None, ln))
                    else:
                        assert view is not None
                        writes.append((self._write(off, view), view, ln))
                    while writes and (len(writes) > depth or writes[0][0] is None):
                        self._reap_to(writes, free)
                while writes:
                    self._reap_to(writes, free)
            except BaseException as exc:
                writer_error.append(exc)
                failed.set()

        wt = threading.Thread(target=writer, daemon=True, name="pynbd-copy-writer")
        wt.start()
        try:
            reads: collections.deque[tuple[int, int, bool, Any, memoryview | None]] = \
                collections.deque()
            hasher = self.hasher
            exhausted = False
            while True:
                while not exhausted and len(reads) < depth:
                    try:
                        buf = take(not reads)
                    except queue.Empty:
                        if failed.is_set():
                            raise CopyError("copy aborted") from None
                        if reads:
                            break
                        continue
                    item = self.queue.next()
                    if item is None:
                        free.put(buf)
                        exhausted = True
                        break
                    off, ln, zero = item
                    if zero:
                        free.put(buf)
                        reads.append((off, ln, True, None, None))
                    else:
                        rview = buf[:ln]
                        reads.append((off, ln, False, self._read_submit(off, rview), rview))
                if not reads:
                    break
                off, ln, zero, token, view = reads.popleft()
                if not zero:
                    self._read_wait(token)
                if hasher is not None:
                    hasher.update(off, view, ln)
                put((off, ln, zero, view))
            put(None)
        except BaseException:
            failed.set()
            raise
        finally:
            wt.join(STALL_LIMIT)
        if writer_error:
            raise writer_error[0]

    def _run_forward(self) -> None:
        """NBD -> NBD (or file -> NBD) without buffers: each data chunk of a source read
        reply becomes a WRITE whose payload the kernel moves from the source socket to
        the destination socket (splice through a pipe; sendfile from a file source).
        Python sees only the request and reply headers. Up to ``requests`` reads and
        ``requests`` writes in flight; replies may complete in any order."""
        depth = self.opts.requests
        sh, dh = self.sh, self.dh
        _grow_send_buffer(dh)
        writes: collections.deque[tuple[Any, int]] = collections.deque()
        reads: collections.deque[Request] = collections.deque()
        file_fd = self.src.fd if isinstance(self.src, FileEndpoint) else None
        sink = _Forward(self, writes)
        exhausted = False
        while True:
            while not exhausted and len(reads) < depth:
                item = self.queue.next()
                if item is None:
                    exhausted = True
                    break
                off, ln, zero = item
                if zero:
                    writes.append((self._zero(off, ln), ln))
                elif file_fd is not None:
                    writes.append((dh.submit_write_from(off, ln, file_fd, fd_offset=off), ln))
                else:
                    reads.append(sh.submit_read(off, ln, sink=sink))
                while len(writes) > depth:
                    self._reap_forward(writes)
            if not reads:
                break
            sh.wait(reads.popleft())
            while writes and (len(writes) > depth or writes[0][0] is None):
                self._reap_forward(writes)
        while writes:
            self._reap_forward(writes)

    def _reap_forward(self, writes: collections.deque[tuple[Any, int]]) -> None:
        wt, wl = writes.popleft()
        if wt is not None:
            self.dh.wait(wt)
        self.progress.add(wl)

    def _reap_to(self, writes: collections.deque[tuple[Any, memoryview | None, int]],
                 free: queue.SimpleQueue[memoryview]) -> None:
        wt, wv, wl = writes.popleft()
        self._write_wait(wt)
        if wv is not None:
            free.put(memoryview(wv.obj))
        self.progress.add(wl)

    # source reads ---------------------------------------------------------------
    def _read_submit(self, off: int, view: memoryview) -> Any:
        if isinstance(self.src, NBDEndpoint):
            return self.sh.submit_read(off, view)
        assert isinstance(self.src, FileEndpoint)
        n = os.preadv(self.src.fd, [view], off)
        if n != len(view):
            raise CopyError(f"{self.src.name}: short read at {off}")
        return None

    def _read_wait(self, token: Any) -> None:
        if token is not None:
            self.sh.wait(token)

    # destination writes ---------------------------------------------------------
    def _write(self, off: int, view: memoryview) -> Any:
        dst = self.dst
        if isinstance(dst, NBDEndpoint):
            return self.dh.submit_write(off, view)
        if isinstance(dst, FileEndpoint):
            pos = 0
            for _ in range(1 << 20):
                if pos >= len(view):
                    break
                pos += os.pwritev(dst.fd, [view[pos:]], off + pos)
            return None
        assert isinstance(dst, StreamEndpoint)
        dst.stream.write(view)
        return None

    def _zero(self, off: int, ln: int) -> Any:
        dst = self.dst
        if self.opts.destination_is_zero:
            return None
        if isinstance(dst, NBDEndpoint):
            if dst.can_zero:
                flags = CmdFlag.NO_HOLE if self.opts.allocated else 0
                return self.dh.submit_write_zeroes(off, ln, flags)
            tokens = []
            pos = 0
            while pos < ln:
                k = min(ln - pos, dst.max_request, len(_ZEROES))
                tokens.append(self.dh.submit_write(off + pos, memoryview(_ZEROES)[:k]))
                pos += k
            for t in tokens[:-1]:
                self.dh.wait(t)
            return tokens[-1] if tokens else None
        if isinstance(dst, FileEndpoint) and dst.fresh and not self.opts.allocated:
            return None
        pos = 0
        while pos < ln:
            k = min(ln - pos, len(_ZEROES))
            self._write(off + pos, memoryview(_ZEROES)[:k])
            pos += k
        return None

    def _write_wait(self, token: Any) -> None:
        if token is not None:
            self.dh.wait(token)

    def _run(self) -> None:
        # up to `depth` reads and `depth` writes in flight, 2*depth buffers
        reads: collections.deque[tuple[int, int, bool, Any, memoryview | None]] = \
            collections.deque()
        writes: collections.deque[tuple[Any, memoryview | None, int]] = collections.deque()
        depth = self.opts.requests
        hasher = self.hasher
        free = self.free
        exhausted = False
        while True:
            # keep the read pipeline full; free buffers by reaping the oldest writes
            while not exhausted and len(reads) < depth:
                if not free:
                    b = self._new_buffer()
                    if b is not None:
                        free.append(b)
                        continue
                    if not writes:
                        break
                    self._reap(writes)
                    continue
                item = self.queue.next()
                if item is None:
                    exhausted = True
                    break
                off, ln, zero = item
                if zero:
                    reads.append((off, ln, True, None, None))
                else:
                    rview = free.pop()[:ln]
                    reads.append((off, ln, False, self._read_submit(off, rview), rview))
            if not reads:
                break
            off, ln, zero, token, view = reads.popleft()
            if zero:
                if hasher is not None:
                    hasher.update(off, None, ln)
                writes.append((self._zero(off, ln), None, ln))
            else:
                assert view is not None
                self._read_wait(token)
                if hasher is not None:
                    hasher.update(off, view, ln)
                writes.append((self._write(off, view), view, ln))
            while writes and (len(writes) > depth or writes[0][0] is None):
                self._reap(writes)
        while writes:
            self._reap(writes)

    def _reap(self, writes: collections.deque[tuple[Any, memoryview | None, int]]) -> None:
        wt, wv, wl = writes.popleft()
        self._write_wait(wt)
        if wv is not None:
            self.free.append(memoryview(wv.obj))
        self.progress.add(wl)


def _grow_send_buffer(c: Client) -> None:
    """A Unix socket queues at most its send buffer (212992 bytes by default) towards
    the peer: with the payload moved by the kernel, a larger one lets the destination
    server work through more writes while the source is being read. Capped by
    net.core.wmem_max. (TCP is left alone: setting it would turn off autotuning.)"""
    sock = c.socket
    if sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


class _Forward:
    """ReadSink of :meth:`_Worker._run_forward`: data chunks go straight on to the
    destination as writes, holes become zero writes."""

    def __init__(self, worker: _Worker, writes: collections.deque[tuple[Any, int]]) -> None:
        self.worker = worker
        self.dh: Client = worker.dh
        self.writes = writes

    def data(self, offset: int, length: int, head: memoryview, fd: int) -> None:
        self.writes.append((self.dh.submit_write_from(offset, length, fd, head), length))

    def hole(self, offset: int, length: int) -> None:
        self.writes.append((self.worker._zero(offset, length), length))


def _copy_stream_source(src: StreamEndpoint, dst: Endpoint, dh: Any, opts: Options,
                        hasher: Any, progress: Progress) -> int:
    """stdin -> anything: sequential, all-zero blocks become zero writes."""
    stream = src.stream
    total = 0
    pending: collections.deque[tuple[Any, memoryview]] = collections.deque()
    free: list[memoryview] = []
    allocated = 0
    worker = _Worker(src, None, dst, dh, opts, WorkQueue.__new__(WorkQueue), None, progress)
    for _ in range(1 << 62):
        if not free:
            if allocated < opts.requests:
                free.append(memoryview(bytearray(opts.request_size)))
                allocated += 1
            else:
                t, v = pending.popleft()
                worker._write_wait(t)
                free.append(v)
        buf = free.pop()
        n = 0
        while n < len(buf):
            k = stream.readinto(buf[n:])  # type: ignore[attr-defined]
            if not k:
                break
            n += k
        if n == 0:
            free.append(buf)
            break
        if dst.size is not None and total + n > dst.size:
            raise CopyError(f"{dst.name}: destination is smaller than the input")
        view = buf[:n]
        if hasher is not None:
            hasher.update(view)
        if n <= len(_ZEROES) and view == memoryview(_ZEROES)[:n]:
            t = worker._zero(total, n)
        else:
            t = worker._write(total, view)
        pending.append((t, buf))
        total += n
        progress.add(n)
        if n < len(buf):
            break
    for t, _ in pending:
        worker._write_wait(t)
    return total


def _can_forward(src: Endpoint, shs: list[Any], dst: Endpoint, dhs: list[Any],
                 opts: Options) -> bool:
    """Can the workers move data without buffers (:meth:`_Worker._run_forward`)?"""
    if opts.zero_copy is False or opts.checksum is not None:
        return False
    if not isinstance(dst, NBDEndpoint) or any(c.tls_active for c in dhs):
        return False
    if isinstance(src, NBDEndpoint):
        return not any(c.tls_active for c in shs)
    return isinstance(src, FileEndpoint) and not src.sequential


def copy(src_spec: str, dst_spec: str, opts: Options,
         timeout: float | None = None) -> tuple[int, str | None]:
    """Copy; returns (bytes copied, hex digest or None)."""
    src = open_endpoint(src_spec, False, opts.connections, timeout)
    dst: Endpoint | None = None
    try:
        dst = open_endpoint(dst_spec, True, opts.connections, timeout, src.size)
        if isinstance(dst, NBDEndpoint):
            opts.request_size = min(opts.request_size, dst.max_request)
        if isinstance(src, NBDEndpoint):
            opts.request_size = min(opts.request_size, src.max_request)
        opts.request_size = max(4096, min(opts.request_size, MAX_PAYLOAD))
        if src.size is not None and dst.size is not None and dst.size < src.size:
            raise CopyError(f"{dst_spec}: destination ({dst.size} bytes) is smaller than "
                            f"the source ({src.size} bytes)")
        progress = Progress()
        stop = threading.Event()
        reporter = None
        if opts.progress is not None:
            cb = opts.progress
            total_size = src.size

            def report() -> None:
                while not stop.wait(0.2):
                    cb(progress.done, total_size)
                cb(progress.done, total_size)
            reporter = threading.Thread(target=report, daemon=True)
            reporter.start()
        try:
            if isinstance(src, StreamEndpoint):
                dh = dst.open_handles(1)[0]
                import hashlib
                h = hashlib.new(opts.checksum) if opts.checksum else None
                total = _copy_stream_source(src, dst, dh, opts, h, progress)
                if isinstance(dst, FileEndpoint) and dst.regular and \
                        os.fstat(dst.fd).st_size < total:
                    os.ftruncate(dst.fd, total)  # trailing zero ranges were skipped
                digest = h.hexdigest() if h is not None else None
            else:
                assert src.size is not None
                n = max(1, min(opts.connections, opts.threads))
                if dst.sequential or src.sequential:
                    n = 1
                shs = src.open_handles(n)
                dhs = dst.open_handles(n)
                n = min(len(shs), len(dhs)) if isinstance(dst, NBDEndpoint) or \
                    isinstance(src, NBDEndpoint) else n
                # with a single-connection side, share nothing: use one worker
                if (isinstance(src, NBDEndpoint) and src.max_connections == 1) or \
                        (isinstance(dst, NBDEndpoint) and dst.max_connections == 1):
                    n = 1
                hasher = OrderedHasher(opts.checksum) if opts.checksum else None
                map_handle = shs[0]
                if n > 1 and isinstance(src, NBDEndpoint) and src.block_status:
                    map_handle = src.extra_handle()  # shs[0] belongs to worker 0's thread
                queue = WorkQueue(src, map_handle, src.size, opts.request_size)
                workers = [_Worker(src, shs[i], dst, dhs[i], opts, queue, hasher, progress)
                           for i in range(n)]
                forward = _can_forward(src, shs, dst, dhs, opts)
                for w in workers:
                    w.forward = forward
                    w.split = opts.split_threads if opts.split_threads is not None else n == 1
                if n == 1:
                    workers[0].run()
                else:
                    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                for w in workers:
                    if w.error is not None:
                        raise w.error
                total = src.size
                digest = hasher.hexdigest() if hasher is not None else None
            if isinstance(dst, StreamEndpoint):
                dst.stream.flush()
        finally:
            stop.set()
            if reporter is not None:
                reporter.join(5)
        return total, digest
    finally:
        errors = []
        for ep in (src, dst):
            if ep is not None:
                try:
                    ep.close()
                except Exception as exc:
                    errors.append(exc)
        if errors and sys.exc_info()[0] is None:
            raise errors[0]


def digest_of(spec: str, algorithm: str, size: int, timeout: float | None,
              request_size: int = DEFAULT_REQUEST_SIZE) -> str:
    """Re-read ``size`` bytes of an endpoint and hash them (for --verify)."""
    import hashlib
    h = hashlib.new(algorithm)
    if is_uri(spec):
        with connect(spec, timeout=timeout) as c:
            depth = 8
            step = min(request_size, c.max_request)
            q: collections.deque[Request] = collections.deque()
            pos = 0
            while pos < size or q:
                while pos < size and len(q) < depth:
                    q.append(c.submit_read(pos, min(step, size - pos)))
                    pos += min(step, size - pos)
                r = c.wait(q.popleft())
                assert r.view is not None
                h.update(r.view)
        return h.hexdigest()
    with open(spec, "rb") as f:
        left = size
        while left > 0:
            data = f.read(min(left, 4 << 20))
            if not data:
                raise CopyError(f"{spec}: shorter than {size} bytes")
            h.update(data)
            left -= len(data)
    return h.hexdigest()


# --- CLI -------------------------------------------------------------------------

def _size_arg(text: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().rstrip("b").rstrip("i")
    if t and t[-1] in mult:
        return int(t[:-1]) * mult[t[-1]]
    return int(t)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "copy", help="copy between NBD exports, files and streams (like nbdcopy)",
        description="Copy SRC to DST. Each is an NBD URI, a file or block device, or "
                    "'-' for stdin/stdout. Sparse-aware.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--connections", "-C", type=int, default=4,
                   help="connections per side (used only with CAN_MULTI_CONN; default 4)")
    p.add_argument("--threads", "-T", type=int, default=os.cpu_count() or 1,
                   help="worker threads, each with its own connection pair; caps "
                        "--connections (default: number of CPUs)")
    p.add_argument("--requests", "-R", type=int, default=DEFAULT_REQUESTS,
                   help=f"requests in flight per connection (default {DEFAULT_REQUESTS})")
    p.add_argument("--request-size", type=_size_arg, default=DEFAULT_REQUEST_SIZE,
                   help="bytes per read/write request (default 1M)")
    p.add_argument("--allocated", action="store_true",
                   help="fully allocate the destination (zero with NO_HOLE, no holes)")
    p.add_argument("--destination-is-zero", "--target-is-zero", action="store_true",
                   help="the destination already reads as zeroes: skip zero ranges")
    p.add_argument("--checksum", nargs="?", const="sha256", metavar="ALG",
                   help="print the digest (default sha256) of the copied data")
    p.add_argument("--verify", action="store_true",
                   help="re-read the destination and compare its digest (implies --checksum)")
    prog = p.add_mutually_exclusive_group()
    prog.add_argument("--progress", "-p", action="store_true", default=None,
                      help="draw a progress bar on stderr even if it is not a terminal")
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=handler)


def _progress_bar(stream: Any) -> Callable[[int, int | None], None]:
    start = time.monotonic()

    def draw(done: int, total: int | None) -> None:
        elapsed = max(time.monotonic() - start, 1e-6)
        rate = done / elapsed / (1 << 20)
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * 40)
            stream.write(f"\r[{bar:<40}] {frac * 100:5.1f}% {rate:8.1f} MiB/s")
        else:
            stream.write(f"\r{done / (1 << 20):10.1f} MiB {rate:8.1f} MiB/s")
        stream.flush()
    return draw


def handler(args: argparse.Namespace) -> int:
    if args.connections < 1 or args.requests < 1:
        sys.stderr.write("pynbd copy: --connections and --requests must be >= 1\n")
        return 1
    algorithm = args.checksum or ("sha256" if args.verify else None)
    if algorithm is not None:
        try:
            import hashlib
            hashlib.new(algorithm)
        except ValueError:
            sys.stderr.write(f"pynbd copy: unknown checksum algorithm {algorithm!r}\n")
            return 1
    if args.verify and args.dst == "-":
        sys.stderr.write("pynbd copy: --verify cannot re-read stdout\n")
        return 1
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    opts = Options(connections=args.connections, threads=max(1, args.threads),
                   requests=args.requests,
                   request_size=args.request_size, allocated=args.allocated,
                   destination_is_zero=args.destination_is_zero, checksum=algorithm,
                   progress=_progress_bar(sys.stderr) if show else None)
    out = sys.stderr if args.dst == "-" else sys.stdout
    try:
        total, digest = copy(args.src, args.dst, opts, args.timeout)
        if show:
            sys.stderr.write("\n")
        if digest is not None:
            out.write(f"{algorithm}:{digest}\n")
            out.flush()
        if args.verify:
            assert algorithm is not None and digest is not None
            again = digest_of(args.dst, algorithm, total, args.timeout)
            if again != digest:
                sys.stderr.write(f"pynbd copy: verify FAILED: destination {algorithm} is "
                                 f"{again}, copied data was {digest}\n")
                return 1
            out.write("verify: OK\n")
        return 0
    except (OSError, ValueError, RuntimeError, CopyError) as exc:
        sys.stderr.write(f"pynbd copy: {exc}\n")
        return 1
    except Exception as exc:  # protocol errors from a server
        from pynbd.protocol.errors import ProtocolError
        if isinstance(exc, ProtocolError):
            sys.stderr.write(f"pynbd copy: {exc}\n")
            return 1
        raise



def main(argv: list[str] | None = None) -> int:
    """Run ``pynbd copy`` on its own (``python -m pynbd.cli.copy``)."""
    parser = argparse.ArgumentParser(prog="pynbd")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["copy", *(sys.argv[1:] if argv is None else argv)])
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
