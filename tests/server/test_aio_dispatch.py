"""The server's dispatch of an asynchronous backend (``aio = True``): completions from
another thread, a read handed back as the backend's own buffer, and backend bugs
(a wrong-length buffer, an exception at the start) answered without dropping anyone."""

from __future__ import annotations

import errno
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
