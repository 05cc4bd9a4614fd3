"""Read sinks and ``submit_write_from``: a read reply's payload moved from one connection
to another (or from a file to a connection) by the kernel, with splice(2)/sendfile(2),
and the fallbacks where the kernel cannot."""

from __future__ import annotations

import collections
import errno
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from pynbd.client import Client, LocalProtocolError, PeerProtocolError, Request, _splice, connect
from pynbd.client._splice import Mover
from tests.client.conftest import IMAGE_SIZE, SERVER_KINDS, TIMEOUT, Servers, expected_image

pytestmark = pytest.mark.interop

MiB = 1 << 20


class Forward:
    """A ReadSink: every data chunk becomes a WRITE on ``dst``, holes zero writes."""

    def __init__(self, dst: Client) -> None:
        self.dst = dst
        self.chunks: list[tuple[int, int, int, int]] = []  # offset, length, len(head), fd
        self.holes: list[tuple[int, int]] = []

    def data(self, offset: int, length: int, head: memoryview, fd: int) -> None:
        self.chunks.append((offset, length, len(head), fd))
        self.dst.submit_write_from(offset, length, fd, head)

    def hole(self, offset: int, length: int) -> None:
        self.holes.append((offset, length))
        self.dst.submit_write_zeroes(offset, length)


def forward_all(src: Client, dst: Client, step: int = MiB, depth: int = 8) -> Forward:
    """Pipelined: up to ``depth`` reads in flight (the client reads replies only while
    waiting, so what is in flight must stay bounded)."""
    sink = Forward(dst)
    reqs: collections.deque[Request] = collections.deque()
    for off in range(0, IMAGE_SIZE, step):
        reqs.append(src.submit_read(off, min(step, IMAGE_SIZE - off), sink=sink))
        if len(reqs) >= depth:
            src.wait(reqs.popleft())
            while dst.in_flight > 2 * depth:
                dst.wait_any()
    while reqs:
        src.wait(reqs.popleft())
    dst.wait_all()
    return sink


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_forward_between_servers(servers: Servers, kind: str, transport: str) -> None:
    src = servers.start(kind, transport)
    dst = servers.start("nbdkit-memory", transport)
    with connect(src.uri(), timeout=TIMEOUT) as s, connect(dst.uri(), timeout=TIMEOUT) as d:
        d.write(0, b"\xee" * IMAGE_SIZE)  # garbage that must be overwritten
        sink = forward_all(s, d)
        assert s.in_flight == 0 and s._sinks == 0
        assert sum(c[1] for c in sink.chunks) + sum(h[1] for h in sink.holes) == IMAGE_SIZE
        if kind in ("qemu-nbd", "pynbd"):
            assert sink.holes  # sparse read replies: the holes reached the sink
        assert d._mover is not None and d._mover.spliced > 0 and d._mover.copied == 0
        # only a little of each chunk was received ahead of the sink
        assert all(head <= 4096 and fd >= 0 for _, _, head, fd in sink.chunks)
        assert d.read(0, IMAGE_SIZE) == expected_image()
        # both connections are still in step
        assert s.read(IMAGE_SIZE - 4096, 4096) == expected_image()[-4096:]


def test_forward_small_requests_many_in_flight(servers: Servers) -> None:
    src = servers.start("pynbd", "unix")
    dst = servers.start("nbdkit-memory", "unix")
    with connect(src.uri(), timeout=TIMEOUT) as s, connect(dst.uri(), timeout=TIMEOUT) as d:
        forward_all(s, d, step=4096 * 3)
        assert d.read(0, IMAGE_SIZE) == expected_image()


def test_forward_without_splice(servers: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_splice, "HAVE_SPLICE", False)
    src = servers.start("qemu-nbd")
    dst = servers.start("nbdkit-memory")
    with connect(src.uri(), timeout=TIMEOUT) as s, connect(dst.uri(), timeout=TIMEOUT) as d:
        forward_all(s, d)
        assert d._mover is not None and d._mover.spliced == 0 and d._mover.copied > 0
        assert d.read(0, IMAGE_SIZE) == expected_image()


@pytest.mark.parametrize("refuse", ["in", "out"])
def test_splice_refused_falls_back(servers: Servers, monkeypatch: pytest.MonkeyPatch,
                                   refuse: str) -> None:
    """EINVAL from splice (the kernel cannot splice these descriptors): copy instead,
    without losing what is already in the pipe."""
    real = os.splice
    calls = []

    def fake(src: int, dst: int, count: int, *a: Any, **kw: Any) -> int:
        from_pipe = stat.S_ISFIFO(os.fstat(src).st_mode)
        calls.append(from_pipe)
        if from_pipe == (refuse == "out"):
            raise OSError(errno.EINVAL, "refused")
        return real(src, dst, count, *a, **kw)
    monkeypatch.setattr(os, "splice", fake)
    src = servers.start("nbdkit")
    dst = servers.start("nbdkit-memory")
    with connect(src.uri(), timeout=TIMEOUT) as s, connect(dst.uri(), timeout=TIMEOUT) as d:
        forward_all(s, d)
        assert d._mover is not None and not d._mover.splice_ok and d._mover.copied > 0
        assert d.read(0, IMAGE_SIZE) == expected_image()
    assert (True in calls) == (refuse == "out")


@pytest.mark.parametrize("sendfile", [True, False])
def test_write_from_file(servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         sendfile: bool) -> None:
    if not sendfile:
        monkeypatch.delattr(os, "sendfile")
    blob = os.urandom(3 * MiB + 123)
    f = tmp_path / "blob"
    f.write_bytes(blob)
    dst = servers.start("nbdkit-memory", "unix")
    with connect(dst.uri(), timeout=TIMEOUT) as d, open(f, "rb") as fh:
        fd = fh.fileno()
        d.submit_write_from(0, len(blob), fd, fd_offset=0)
        d.submit_write_from(8 * MiB, 1000, fd, b"head", fd_offset=50)  # head + file bytes
        d.wait_all()
        assert d.read(0, len(blob)) == blob
        assert d.read(8 * MiB, 1000) == b"head" + blob[50:50 + 996]
        assert d._mover is not None
        assert (d._mover.spliced > 0) == sendfile and (d._mover.copied > 0) != sendfile
        # past the end of the file: an error, and the connection is unusable (the server
        # got a request header without its payload)
        with pytest.raises(OSError, match="short read"):
            d.submit_write_from(0, 4096, fd, fd_offset=len(blob) - 100)
        with pytest.raises(PeerProtocolError, match="unusable"):
            d.read(0, 1)


def test_write_from_checks(servers: Servers) -> None:
    dst = servers.start("nbdkit-memory")
    with connect(dst.uri(), timeout=TIMEOUT) as d:
        with pytest.raises(ValueError):
            d.submit_write_from(0, 2, -1, b"abc")
        with pytest.raises(LocalProtocolError, match="beyond the export size"):
            d.submit_write_from(d.size, 1, -1, b"x")
        with pytest.raises(TypeError):
            d.submit_read(0, bytearray(10), sink=Forward(d))
        # the whole payload in head: fd is never touched
        d.wait(d.submit_write_from(100, 3, -1, b"abc"))
        assert d.read(100, 3) == b"abc"


def test_sink_error_breaks_source(servers: Servers) -> None:
    class Boom:
        def data(self, offset: int, length: int, head: memoryview, fd: int) -> None:
            raise RuntimeError("sink failed")

        def hole(self, offset: int, length: int) -> None:
            raise RuntimeError("sink failed")
    src = servers.start("nbdkit")
    with connect(src.uri(), timeout=TIMEOUT) as s:
        req = s.submit_read(0, MiB, sink=Boom())
        with pytest.raises(RuntimeError, match="sink failed"):
            s.wait(req)
        with pytest.raises(PeerProtocolError, match="unusable"):
            s.read(0, 1)


@pytest.mark.parametrize("tls_side", ["src", "dst"])
def test_forward_with_tls(servers: Servers, pki: Path, tls_side: str) -> None:
    """Over TLS the payload cannot be spliced: a TLS source hands the sink the whole
    chunk, a TLS destination reads the payload into a buffer and sends it."""
    src = servers.start("nbdkit", tls_dir=pki if tls_side == "src" else None)
    dst = servers.start("nbdkit-memory", tls_dir=pki if tls_side == "dst" else None)
    with connect(src.uri(), timeout=TIMEOUT) as s, connect(dst.uri(), timeout=TIMEOUT) as d:
        assert (s.tls_active, d.tls_active) == (tls_side == "src", tls_side == "dst")
        sink = forward_all(s, d)
        if tls_side == "src":
            assert all(fd == -1 and head == length for _, length, head, fd in sink.chunks)
        else:
            assert d._mover is not None and d._mover.copied > 0 and d._mover.spliced == 0
        assert d.read(0, IMAGE_SIZE) == expected_image()


# --- Mover on socket pairs -------------------------------------------------------------

def _pairs(nonblocking: bool) -> tuple[socket.socket, socket.socket, socket.socket,
                                       socket.socket]:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    if nonblocking:
        a2.settimeout(TIMEOUT)
        b1.settimeout(TIMEOUT)
    return a1, a2, b1, b2


@pytest.mark.parametrize("splice", [True, False])
@pytest.mark.parametrize("nonblocking", [True, False])
def test_mover_stream(splice: bool, nonblocking: bool) -> None:
    a1, a2, b1, b2 = _pairs(nonblocking)
    blob = os.urandom(5 * MiB + 7)
    got = bytearray()

    def produce() -> None:
        for i in range(0, len(blob), 300000):  # in bursts, so that the mover waits
            a1.sendall(blob[i:i + 300000])

    def consume() -> None:
        while len(got) < len(blob):
            got.extend(b2.recv(1 << 20))
    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    m = Mover()
    m.splice_ok = splice
    try:
        m.stream(a2.fileno(), b1.fileno(), len(blob), TIMEOUT, b1.sendall)
    finally:
        for t in threads:
            t.join(TIMEOUT)
        m.close()
    assert bytes(got) == blob
    assert (m.spliced, m.copied) == ((len(blob), 0) if splice else (0, len(blob)))
    for s in (a1, a2, b1, b2):
        s.close()


def test_mover_source_closed_mid_payload() -> None:
    a1, a2, b1, b2 = _pairs(False)
    a1.sendall(b"x" * 100)
    a1.close()
    m = Mover()
    with pytest.raises(PeerProtocolError, match="mid-payload"):
        m.stream(a2.fileno(), b1.fileno(), 1000, TIMEOUT, b1.sendall)
    assert b2.recv(1000) == b"x" * 100
    m.close()
    for s in (a2, b1, b2):
        s.close()


def test_mover_timeout() -> None:
    a1, a2, b1, b2 = _pairs(True)
    m = Mover()
    with pytest.raises(TimeoutError):
        m.stream(a2.fileno(), b1.fileno(), 1000, 0.2, b1.sendall)
    m.close()
    for s in (a1, a2, b1, b2):
        s.close()
