"""The server's dispatch of an asynchronous backend (``aio = True``): completions from
another thread, a read handed back as the backend's own buffer, and backend bugs
(a wrong-length buffer, an exception at the start) answered without dropping anyone;
and completions a backend queues behind a descriptor that the server's loop polls
(``aio_completion_fd``/``aio_poll``, as the RBD backend does with librbd's eventfd)."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator
from typing import Any

import nbd
import pytest

from pynbd.backends.base import AioDone, AioReadDone
from pynbd.backends.memory import MemoryBackend
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Server, ServerOptions

MiB = 1 << 20


class ThreadedAioBackend(MemoryBackend):
    """Memory, but every aio request completes on a thread of its own (as librbd's
    completions do). Reads at offsets >= 1 MiB are handed back as ``bytes``; a read at
    ``bad_offset`` returns 3 bytes; a write at ``raise_offset`` raises TypeError."""

    blocking = True
    aio = True
    bad_offset = 2 * MiB
    raise_offset = 3 * MiB

    def _later(self, fn: Any) -> None:
        threading.Thread(target=fn, daemon=True).start()

    def aio_pread(self, buf: memoryview, offset: int, done: AioReadDone) -> None:
        def run() -> None:
            if offset == self.bad_offset:
                done(None, b"abc")
            elif offset >= MiB:
                data = bytearray(len(buf))
                self.pread_into(memoryview(data), offset)
                done(None, bytes(data))
            else:
                self.pread_into(buf, offset)
                done(None)
        self._later(run)

    def aio_pwrite(self, buf: memoryview, offset: int, fua: bool, done: AioDone) -> None:
        if offset == self.raise_offset:
            raise TypeError("backend bug")
        self.pwrite(buf, offset)
        self._later(lambda: done(None))

    def aio_flush(self, done: AioDone) -> None:
        self._later(lambda: done(None))

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        self._later(lambda: done(None))

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        self.zero(offset, length)
        self._later(lambda: done(None))


@pytest.fixture
def server() -> Iterator[Server]:
    reg = ExportRegistry([Export("", ThreadedAioBackend(8 * MiB))])
    srv = Server(reg, ServerOptions())
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    yield srv
    srv.shutdown(timeout=10)


def _connect(srv: Server) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(srv.listeners[0].port))
    return h


def test_aio_completions_from_other_threads(server: Server) -> None:
    h = _connect(server)
    data = bytes(range(256)) * 64
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
               for off in (0, 65536, MiB, MiB + 65536)]
    while h.aio_in_flight():
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    h.flush()
    assert h.pread(len(data), 0) == data  # filled into the server's buffer
    assert h.pread(len(data), MiB) == data  # the backend's own bytes, sent as they are
    h.zero(4096, MiB)
    assert h.pread(4096, MiB) == bytes(4096)
    h.shutdown()


def test_wrong_length_read_buffer_is_an_error(server: Server) -> None:
    h = _connect(server)
    with pytest.raises(nbd.Error) as ei:
        h.pread(4096, ThreadedAioBackend.bad_offset)
    assert ei.value.errnum == errno.EIO
    assert h.pread(16, 0) == bytes(16)  # the connection goes on
    h.shutdown()


def test_exception_starting_a_request_is_answered(server: Server) -> None:
    h = _connect(server)
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"x" * 512, ThreadedAioBackend.raise_offset)
    assert ei.value.errnum == errno.EIO
    h.pwrite(b"y" * 512, 0)  # the connection goes on
    assert h.pread(512, 0) == b"y" * 512
    h.shutdown()


class PolledAioBackend(MemoryBackend):
    """Memory whose aio requests finish on a thread of their own but are only *queued*
    there: the thread signals an eventfd and ``done`` runs in :meth:`aio_poll`, on the
    server's loop. A thread finishes ``batch`` requests at a time (several completions
    per poll); a read at ``refuse_offset`` is refused inside the aio call itself."""

    blocking = True
    aio = True
    refuse_offset = 5 * MiB
    #: a read here is answered with something that is not an OSError (a plugin bug)
    bug_offset = 6 * MiB

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.queued: list[tuple[Any, OSError | None]] = []
        self.lock = threading.Lock()
        self.polls: list[int] = []  # completions delivered per aio_poll
        self.poll_threads: set[int] = set()
        self.held: list[tuple[Any, OSError | None]] = []

    def aio_completion_fd(self) -> int | None:
        return self.efd

    def aio_poll(self) -> None:
        self.poll_threads.add(threading.get_ident())
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        with self.lock:
            ready, self.queued = self.queued, []
        self.polls.append(len(ready))
        for done, err in ready:
            done(err)

    def _finish(self, done: Any, err: OSError | None = None) -> None:
        # hold completions until 8 are ready (or the last of a burst): like librbd under
        # load, one poll then delivers many
        with self.lock:
            self.held.append((done, err))
            if len(self.held) < 8:
                timer = threading.Timer(0.05, self._release_held)
                timer.daemon = True
                timer.start()
                return
            self.queued += self.held
            self.held = []
        os.eventfd_write(self.efd, 1)

    def _release_held(self) -> None:
        with self.lock:
            self.queued += self.held
            self.held = []
        os.eventfd_write(self.efd, 1)

    def aio_pread(self, buf: memoryview, offset: int, done: AioReadDone) -> None:
        if offset == self.refuse_offset:
            done(OSError(errno.ENOSPC, "refused at once"))  # inside the call: deferred
            return
        if offset == self.bug_offset:
            bogus: Any = RuntimeError("not an OSError")
            threading.Thread(target=self._finish, args=(done, bogus), daemon=True).start()
            return
        self.pread_into(buf, offset)
        threading.Thread(target=self._finish, args=(done,), daemon=True).start()

    def aio_pwrite(self, buf: memoryview, offset: int, fua: bool, done: AioDone) -> None:
        self.pwrite(buf, offset)
        threading.Thread(target=self._finish, args=(done,), daemon=True).start()

    def aio_flush(self, done: AioDone) -> None:
        threading.Thread(target=self._finish, args=(done,), daemon=True).start()

    def aio_trim(self, offset: int, length: int, fua: bool, done: AioDone) -> None:
        threading.Thread(target=self._finish, args=(done,), daemon=True).start()

    def aio_zero(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool,
                 done: AioDone) -> None:
        self.zero(offset, length)
        threading.Thread(target=self._finish, args=(done,), daemon=True).start()


def test_completions_polled_on_the_loop() -> None:
    """Many completions per poll, delivered on the loop thread, each request answered
    once and correctly; a request refused inside the aio call is answered too."""
    backend = PolledAioBackend(8 * MiB)
    reg = ExportRegistry([Export("", backend)])
    srv = Server(reg, ServerOptions())
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    try:
        h = _connect(srv)
        blocks = {i * 65536: bytes([i % 251 + 1]) * 65536 for i in range(48)}
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), off)
                   for off, d in blocks.items()]
        while h.aio_in_flight():
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        bufs = {off: nbd.Buffer(65536) for off in blocks}
        reads = [h.aio_pread(bufs[off], off) for off in blocks]
        while h.aio_in_flight():
            h.poll(-1)
        for c in reads:
            assert h.aio_command_completed(c)
        for off, d in blocks.items():
            assert bufs[off].to_bytearray() == d, off
        with pytest.raises(nbd.Error) as ei:
            h.pread(4096, PolledAioBackend.refuse_offset)
        assert ei.value.errnum == errno.ENOSPC
        h.flush()
        h.zero(4096, 0)
        assert h.pread(4096 + 16, 0) == bytes(4096) + blocks[0][:16]
        h.shutdown()
        assert max(backend.polls) >= 2  # completions were answered in batches
        # each exactly once: the writes, the reads, FLUSH, WRITE_ZEROES and the last READ
        assert sum(backend.polls) == 2 * len(blocks) + 3
        # aio_poll ran on the server's loop thread only
        assert len(backend.poll_threads) == 1
        assert threading.get_ident() not in backend.poll_threads
    finally:
        srv.shutdown(timeout=10)


def test_bug_in_the_middle_of_a_batch_ends_every_request() -> None:
    """A completion the server cannot answer (the backend passed a bogus error) in a
    batch with others: that connection is dropped, every request of the batch is still
    accounted for (the export quiesces, buffers go back), other connections go on."""
    backend = PolledAioBackend(8 * MiB)
    srv = Server(ExportRegistry([Export("", backend)]), ServerOptions())
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    try:
        other = _connect(srv)
        h = _connect(srv)
        bufs = [nbd.Buffer(4096) for _ in range(12)]
        cookies = []
        for i, buf in enumerate(bufs):
            off = PolledAioBackend.bug_offset if i == 5 else i * 4096
            cookies.append(h.aio_pread(buf, off))
        try:
            while h.aio_in_flight():
                h.poll(-1)
        except nbd.Error:
            pass
        assert h.aio_is_closed() or h.aio_is_dead()  # that connection was dropped
        with pytest.raises(nbd.Error):
            h.aio_command_completed(cookies[5])
        rt = srv.workers[0].worker.runtimes[""]  # type: ignore[attr-defined]
        for _ in range(200):
            if rt.active == 0:
                break
            threading.Event().wait(0.05)
        assert rt.active == 0
        other.pwrite(b"z" * 4096, 0)
        assert other.pread(4096, 0) == b"z" * 4096
        other.shutdown()
    finally:
        srv.shutdown(timeout=10)
