"""Limits that keep one client from hurting others, the request deadline (killswitch),
and the server side of the safe-close extension."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import nbd
import pytest

from pynbd.backends.base import Backend
from pynbd.backends.memory import MemoryBackend
from pynbd.filters.delay import DelayFilter
from pynbd.filters.error import ErrorFilter
from pynbd.server.control import control_request
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Limits, Server, ServerOptions
from tests.security.conftest import Served

IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def good_client_size(port: int, deadline_s: float) -> tuple[int, float]:
    """Connect like a well-behaved client, retrying while refused; returns size, wait."""
    t0 = time.monotonic()
    last: Exception | None = None
    for _ in range(400):
        if time.monotonic() - t0 > deadline_s:
            break
        h = nbd.NBD()
        try:
            h.connect_tcp("127.0.0.1", str(port))
            size = h.get_size()
            h.shutdown()
            return size, time.monotonic() - t0
        except nbd.Error as exc:
            last = exc
            time.sleep(0.1)
    raise AssertionError(f"well-behaved client kept out for {deadline_s} s: {last}")


def test_connection_flood_does_not_lock_out_clients(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--handshake-timeout", "3",
                      "--max-connections", "200", "--max-connections-per-address", "100",
                      "memory:1M")
    before = rss_kib(s.proc.pid)
    flood: list[socket.socket] = []
    try:
        for i in range(1000):
            c = socket.socket()
            c.settimeout(5)
            c.bind((f"127.0.{1 + i % 3}.{10 + i % 200}", 0))
            try:
                c.connect(("127.0.0.1", s.port))
            except OSError:
                c.close()
                continue
            flood.append(c)
        # the limits refuse most of the flood at accept time; a real client gets in at
        # the latest once the idle flooders hit the handshake deadline
        size, _waited = good_client_size(s.port, deadline_s=3 + 10)
        assert size == 1024 * 1024
        grown = rss_kib(s.proc.pid) - before
        assert grown < 200 * 1024, f"server RSS grew by {grown} KiB under the flood"
    finally:
        for c in flood:
            c.close()
    assert s.proc.poll() is None


def test_slow_loris_handshake_dropped_at_deadline(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--handshake-timeout", "1.5",
                      "memory:1M")
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        assert recv_exact(c, 18).startswith(b"NBDMAGIC")
        c.sendall(struct.pack(">I", 3))
        # an option header trickled one byte at a time, slower than the deadline allows
        hdr = struct.pack(">QII", IHAVEOPT, 3, 0)
        closed = False
        t0 = time.monotonic()
        for b in hdr:
            try:
                c.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.4)
            if time.monotonic() - t0 > 8:
                break
        if not closed:
            c.settimeout(10)
            try:
                closed = c.recv(100) == b""
            except ConnectionResetError:
                closed = True
        assert closed
    assert "handshake deadline" in s.log() or s.proc.poll() is None


def test_per_address_limit(serve) -> None:
    """Negotiated connections from one address are limited; the extra one is refused
    before any byte, and other addresses are not affected."""
    ctl = os.path.join(s_tmp := tempfile.mkdtemp(prefix="pynbd-"), "ctl.sock")
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--max-connections-per-address",
                      "2", "--control", ctl, "memory:1M")
    held = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_tcp("127.0.0.1", str(s.port))
        held.append(h)
    # workers report negotiated connections to the supervisor as messages: wait until
    # it has seen both
    for _ in range(100):
        if control_request(ctl, {"cmd": "status"})["status"]["clients"] == 2:
            break
        time.sleep(0.05)
    third = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    try:
        assert third.recv(18) == b""
    except ConnectionResetError:
        pass
    third.close()
    # another address is not affected
    other = socket.socket()
    other.bind(("127.0.0.5", 0))
    other.settimeout(10)
    other.connect(("127.0.0.1", s.port))
    assert recv_exact(other, 18).startswith(b"NBDMAGIC")
    other.close()
    for h in held:
        h.shutdown()
    # slots free again once they are closed
    for _ in range(50):
        h = nbd.NBD()
        try:
            h.connect_tcp("127.0.0.1", str(s.port))
            break
        except nbd.Error:
            time.sleep(0.1)
    assert h.get_size() == 1024 * 1024
    h.shutdown()
    shutil.rmtree(s_tmp, ignore_errors=True)


def test_negotiating_pool_evicts_silent_connections(serve) -> None:
    """Connections still negotiating have their own pool: when an address fills it, the
    oldest silent one is dropped to make room (a client that talks is kept)."""
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "--max-handshakes-per-address",
                      "2", "memory:1M")
    talker = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert recv_exact(talker, 18).startswith(b"NBDMAGIC")
    talker.sendall(struct.pack(">I", 3))  # client flags: it made progress
    silent = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert recv_exact(silent, 18).startswith(b"NBDMAGIC")
    time.sleep(0.2)
    newcomer = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert recv_exact(newcomer, 18).startswith(b"NBDMAGIC")
    try:
        assert silent.recv(18) == b""  # evicted
    except ConnectionResetError:
        pass
    # the talker is still served: finish its negotiation
    talker.sendall(struct.pack(">QII", IHAVEOPT, 1, 0))
    size, _flags = struct.unpack(">QH", recv_exact(talker, 10))
    assert size == 1024 * 1024
    for c in (talker, silent, newcomer):
        c.close()
    assert "evicted while negotiating" in s.log()


# --- in-process servers with injected backends -------------------------------------

# The fault hooks are filters now (tests/filters/ drives them through pynbd serve too):
# a plugin call that sleeps is the delay filter in mode=sleep, a failing flush is the
# error filter on flush.

def slow_reads(size: int, delay: float) -> Backend:
    """Reads sleep ``delay`` s in the call, on a worker thread (a stuck storage)."""
    return DelayFilter(MemoryBackend(size), rdelay=delay, mode="sleep")


def failing_flush(size: int) -> Backend:
    return ErrorFilter(MemoryBackend(size), ops=frozenset({"flush"}), error=errno.EIO)


@pytest.fixture
def inproc() -> Iterator[object]:
    servers: list[Server] = []

    def _start(backend: Backend, **limits: float) -> Server:
        reg = ExportRegistry([Export("", backend)])
        srv = Server(reg, ServerOptions(limits=Limits(**limits)))  # type: ignore[arg-type]
        srv.listen_tcp("127.0.0.1", 0)
        srv.start()
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.shutdown(timeout=10)


def test_request_deadline_drops_stuck_client(inproc) -> None:
    srv: Server = inproc(slow_reads(4 * 1024 * 1024, delay=3.0), request_timeout=0.5)
    port = srv.listeners[0].port
    stuck = nbd.NBD()
    stuck.connect_tcp("127.0.0.1", str(port))
    fine = nbd.NBD()
    fine.connect_tcp("127.0.0.1", str(port))
    with pytest.raises(nbd.Error):
        stuck.pread(4096, 2 * 1024 * 1024)  # takes 3 s > 0.5 s deadline: dropped
    fine.pwrite(b"f" * 4096, 0)  # writes do not sleep: the other client is served
    fine.flush()
    assert srv.killed_connections == 1
    fine.shutdown()


def x_close_session(port: int) -> tuple[int, bytes]:
    """Negotiate NBD_OPT_X_CLOSE + GO over a raw socket, write, then X_CLOSE."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        recv_exact(c, 18)
        c.sendall(struct.pack(">I", 3))
        c.sendall(struct.pack(">QII", IHAVEOPT, 0x4E42A001, 0))
        magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(c, 20))
        assert (opt, rtype, n) == (0x4E42A001, 1, 0)
        go = struct.pack(">I", 0) + struct.pack(">H", 0)
        c.sendall(struct.pack(">QII", IHAVEOPT, 7, len(go)) + go)
        flags = None
        while True:
            magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(c, 20))
            data = recv_exact(c, n)
            if rtype == 3 and struct.unpack(">H", data[:2])[0] == 0:
                flags = struct.unpack(">QH", data[2:12])[1]
            if rtype == 1:
                break
        assert flags is not None and flags & 0x8000
        c.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 1, 1, 0, 4) + b"abcd")
        assert struct.unpack(">IIQ", recv_exact(c, 16)) == (0x67446698, 0, 1)
        c.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0x7F01, 2, 0, 0))
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(c, 16))
        assert magic == 0x67446698 and cookie == 2
        rest = c.recv(100)  # nothing after the reply: the server closes
        return err, rest


def test_safe_close_after_writes(inproc) -> None:
    backend = MemoryBackend(1024 * 1024)
    srv: Server = inproc(backend)
    err, rest = x_close_session(srv.listeners[0].port)
    assert err == 0 and rest == b""
    buf = bytearray(4)
    backend.pread_into(memoryview(buf), 0)
    assert bytes(buf) == b"abcd"


def test_safe_close_reports_failed_flush(inproc) -> None:
    srv: Server = inproc(failing_flush(1024 * 1024))
    err, rest = x_close_session(srv.listeners[0].port)
    assert err == 5 and rest == b""  # NBD_EIO: the close was not safe


def test_x_close_flag_off_for_clients_that_do_not_ask(inproc) -> None:
    srv: Server = inproc(MemoryBackend(1024 * 1024))
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_FLAGS | nbd.STRICT_BOUNDS)
    h.connect_tcp("127.0.0.1", str(srv.listeners[0].port))
    # libnbd sees only standard flags; bit 15 stays off
    assert h.can_flush() and h.can_multi_conn()
    h.shutdown()
    with socket.create_connection(("127.0.0.1", srv.listeners[0].port), timeout=10) as c:
        recv_exact(c, 18)
        c.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 0))
        size, flags = struct.unpack(">QH", recv_exact(c, 10))
        assert size == 1024 * 1024 and not flags & 0x8000
        # X_CLOSE without the option is an unknown command: EINVAL, connection stays
        c.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0x7F01, 9, 0, 0))
        assert struct.unpack(">IIQ", recv_exact(c, 16)) == (0x67446698, 22, 9)
        c.sendall(struct.pack(">IHHQQI", REQ_MAGIC, 0, 0, 10, 0, 4))
        assert struct.unpack(">IIQ", recv_exact(c, 16)) == (0x67446698, 0, 10)
        assert recv_exact(c, 4) == bytes(4)


def test_sigterm_with_connections_open_exits_cleanly(serve) -> None:
    s: Served = serve("--bind", "127.0.0.1", "--port", "0", "memory:1M")
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(s.port))
    h.pwrite(b"z" * 512, 0)
    stop = threading.Thread(target=s.stop)
    stop.start()
    stop.join(timeout=30)
    assert s.proc.returncode == 0
    assert os.path.exists(f"/proc/{s.proc.pid}") is False or s.proc.poll() is not None
