"""pynbd.fuse.export without FUSE: the file operations against real servers."""

from __future__ import annotations

import errno
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.fuse.export import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Connections,
    ExportFile,
    Pipeline,
    open_export,
)
from tests.support.nbd_servers import start_nbdkit
from tests.support.pynbd_server import PynbdServer, free_unix_path, wait_until

MiB = 1 << 20
TIMEOUT = 20.0


@pytest.fixture
def pynbd(tmp_path: Path) -> Iterator[PynbdServer]:
    srv = PynbdServer(["--socket", free_unix_path(tmp_path, "p.sock"), "memory:4M"],
                      cwd=tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


def _errno(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as ei:
        fn(*args)
    return ei.value.errno  # type: ignore[no-any-return]


def test_reads_and_writes_clip_at_the_end(pynbd: PynbdServer) -> None:
    f = open_export(pynbd.uri, timeout=TIMEOUT)
    try:
        assert f.size == 4 * MiB and not f.read_only
        assert f.features.multi_conn and f.features.connections == 4
        assert f.write(4 * MiB - 3, memoryview(b"abcdef")) == 3
        buf = bytearray(10)
        assert f.read_into(4 * MiB - 5, memoryview(buf)) == 5
        assert bytes(buf[:5]) == b"\0\0abc"
        assert f.read_into(4 * MiB, memoryview(buf)) == 0
        assert _errno(f.write, 4 * MiB, memoryview(b"x")) == errno.ENOSPC
        f.fsync()
        f.truncate(4 * MiB)
        assert _errno(f.truncate, 0) == errno.EINVAL
    finally:
        assert all(r.safe for r in f.close())  # pynbd serve: safe close on every one


def test_fallocate_modes(pynbd: PynbdServer) -> None:
    f = open_export(pynbd.uri, connections=1, timeout=TIMEOUT)
    try:
        f.write(0, memoryview(b"\xff" * MiB))
        f.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 100, 200)
        f.fallocate(FALLOC_FL_ZERO_RANGE, 1000, 24)
        buf = bytearray(1100)
        f.read_into(0, memoryview(buf))
        assert buf == b"\xff" * 100 + bytes(200) + b"\xff" * 700 + bytes(24) + b"\xff" * 76
        # past the end: clipped with KEEP_SIZE, refused without (the file cannot grow)
        f.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 4 * MiB - 10, 100)
        assert _errno(f.fallocate, FALLOC_FL_ZERO_RANGE, 4 * MiB - 10, 100) == errno.EINVAL
        assert _errno(f.fallocate, FALLOC_FL_ZERO_RANGE, 4 * MiB, 1) == errno.EINVAL
        for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,  # punch needs KEEP_SIZE
                     FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                     0x20 | FALLOC_FL_KEEP_SIZE):
            assert _errno(f.fallocate, mode, 0, 4096) == errno.EOPNOTSUPP
        assert _errno(f.fallocate, FALLOC_FL_ZERO_RANGE, 0, 0) == errno.EINVAL
    finally:
        f.close()


def test_read_only(pynbd: PynbdServer, tmp_path: Path) -> None:
    f = open_export(pynbd.uri, read_only=True, timeout=TIMEOUT)
    try:
        assert f.read_only
        assert _errno(f.write, 0, memoryview(b"x")) == errno.EROFS
        assert _errno(f.fallocate, FALLOC_FL_ZERO_RANGE, 0, 1) == errno.EROFS
        f.fsync()  # nothing to flush
    finally:
        f.close()
    ro = PynbdServer(["--socket", free_unix_path(tmp_path, "ro.sock"), "--read-only",
                      "memory:1M"], cwd=tmp_path)
    try:
        g = open_export(ro.uri, timeout=TIMEOUT)
        assert g.read_only  # from the server's flags
        assert _errno(g.write, 0, memoryview(b"x")) == errno.EROFS
        g.close()
    finally:
        ro.stop()


def test_server_error_reply_keeps_the_export(tmp_path: Path) -> None:
    """An error reply is that request's errno; the connection stays usable."""
    srv = start_nbdkit(tmp_path / "k", "memory", ["1M", "error-pwrite-rate=1",
                                                  "error-pwrite=ENOSPC"],
                       transport="unix", filters=("error",))
    try:
        f = open_export(srv.uri(), timeout=TIMEOUT)
        assert _errno(f.write, 0, memoryview(b"x")) == errno.ENOSPC
        assert f.gone is None
        buf = bytearray(4)
        assert f.read_into(0, memoryview(buf)) == 4
        f.close()
    finally:
        srv.stop()


def test_lost_server_is_eio_and_calls_on_gone_once(pynbd: PynbdServer) -> None:
    calls: list[str] = []
    f = open_export(pynbd.uri, connections=2, timeout=TIMEOUT, on_gone=calls.append)
    os.kill(pynbd.pid, signal.SIGKILL)
    pynbd.proc.wait(TIMEOUT)
    # the idle check sees the closed connections without any request
    assert wait_until(lambda: f.conns.check_idle() is not None, TIMEOUT)
    buf = bytearray(4096)
    assert _errno(f.read_into, 0, memoryview(buf)) == errno.EIO
    assert _errno(f.read_into, 0, memoryview(buf)) == errno.EIO
    assert _errno(f.fsync) == errno.EIO
    assert len(calls) == 1 and f.gone == calls[0]
    results = f.close()
    assert [r.method for r in results] == ["none", "none"]


def test_threads_waiting_for_a_connection_see_the_loss(pynbd: PynbdServer) -> None:
    f = open_export(pynbd.uri, connections=2, timeout=TIMEOUT)
    assert isinstance(f.conns, Connections)
    errors: list[int] = []
    started = threading.Event()

    def waiter() -> None:
        started.set()
        try:
            f.read_into(0, memoryview(bytearray(16)))
        except OSError as exc:
            errors.append(exc.errno or 0)

    with f.conns.lease(), f.conns.lease():  # hold both connections
        t = threading.Thread(target=waiter)
        t.start()
        started.wait(TIMEOUT)
        f.conns.mark_gone("test")
    t.join(TIMEOUT)
    assert not t.is_alive() and errors == [errno.EIO]
    f.close()


def _max_concurrency(log: str, kind: str) -> int:
    """Most requests of ``kind`` in progress at once in nbdkit's log filter output."""
    active: set[str] = set()
    most = 0
    for line in log.splitlines():
        if f" {kind} id=" in line:
            rid = line.split(" id=")[1].split()[0]
            if f"...{kind} id=" in line:
                active.discard(rid)
            else:
                active.add(rid)
                most = max(most, len(active))
    return most


def test_one_connection_carries_several_requests_at_once(tmp_path: Path) -> None:
    """Without multi-conn there is one connection; threads' requests are pipelined on
    it (nbdkit's delay filter holds each read, so the others queue up meanwhile) and
    each gets its own data back."""
    logf = tmp_path / "requests.log"
    srv = start_nbdkit(tmp_path / "k", "memory", ["4M", "delay-read=200ms",
                                                  "multi-conn-mode=disable",
                                                  f"logfile={logf}"],
                       transport="unix", filters=("multi-conn", "delay", "log"))
    try:
        f = open_export(srv.uri(), connections=4, timeout=TIMEOUT)
        assert isinstance(f.conns, Pipeline) and f.features.connections == 1
        for i in range(8):
            f.write(i * 65536, memoryview(bytes([i + 1]) * 65536))
        results: dict[int, bytes] = {}

        def reader(i: int) -> None:
            buf = bytearray(65536)
            f.read_into(i * 65536, memoryview(buf))
            results[i] = bytes(buf)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert results == {i: bytes([i + 1]) * 65536 for i in range(8)}
        f.fsync()
        assert [r.flushed for r in f.close()] == [True]
        assert _max_concurrency(logf.read_text(), "Read") >= 2
    finally:
        srv.stop()


def test_one_connection_broken_fails_every_waiting_request(tmp_path: Path) -> None:
    srv = start_nbdkit(tmp_path / "k", "memory", ["4M", "delay-read=20"],
                       transport="unix", filters=("delay",))
    calls: list[str] = []
    try:
        f = open_export(srv.uri(), connections=1, timeout=TIMEOUT, on_gone=calls.append)
        errors: list[int] = []

        def reader(i: int) -> None:
            try:
                f.read_into(i * 4096, memoryview(bytearray(4096)))
            except OSError as exc:
                errors.append(exc.errno or 0)

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        pipe = f.conns
        assert isinstance(pipe, Pipeline)
        # all four queued or in flight (nbdkit holds the reads for 20 s)
        assert wait_until(lambda: pipe.clients[0].in_flight + len(pipe._queue) == 4, TIMEOUT)
        os.kill(srv.proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(TIMEOUT)
        assert errors == [errno.EIO] * 4 and len(calls) == 1
        assert _errno(f.write, 0, memoryview(b"x")) == errno.EIO
        f.close()
    finally:
        srv.stop()


def test_idle_check_is_quiet_while_the_server_lives(pynbd: PynbdServer) -> None:
    f: ExportFile = open_export(pynbd.uri, timeout=TIMEOUT)
    try:
        f.write(0, memoryview(b"data"))
        assert f.conns.check_idle() is None
    finally:
        f.close()


@pytest.mark.parametrize("connections", [1, 3])
def test_concurrent_mixed_load(connections: int, pynbd: PynbdServer) -> None:
    """8 threads, each on its own region, mix writes, reads, zeroes and flushes on one
    pipelined connection or three shared ones (bounded: 150 operations each); every
    read sees that thread's last write."""
    import random

    f = open_export(pynbd.uri, connections=connections, timeout=TIMEOUT)
    assert isinstance(f.conns, Pipeline if connections == 1 else Connections)
    region = (4 * MiB) // 8
    failures: list[str] = []

    def worker(i: int) -> None:
        rnd = random.Random(i)
        base = i * region
        shadow = bytearray(region)
        try:
            for _ in range(150):
                off = rnd.randrange(0, region - 1)
                n = rnd.randrange(1, min(region - off, 256 * 1024) + 1)
                op = rnd.random()
                if op < 0.4:
                    data = rnd.randbytes(n)
                    assert f.write(base + off, memoryview(data)) == n
                    shadow[off:off + n] = data
                elif op < 0.5:
                    f.fallocate(FALLOC_FL_ZERO_RANGE, base + off, n)
                    shadow[off:off + n] = bytes(n)
                elif op < 0.55:
                    f.fsync()
                else:
                    buf = bytearray(n)
                    assert f.read_into(base + off, memoryview(buf)) == n
                    if buf != shadow[off:off + n]:
                        failures.append(f"thread {i}: mismatch at {off}+{n}")
                        return
        except Exception as exc:  # reported below
            failures.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert f.gone is None
    f.close()


# --- reconnect ------------------------------------------------------------------------

def _image_server(tmp: Path, name: str) -> tuple[Path, str, PynbdServer]:
    """A 1 MiB zeroed image served on its own socket: (image, socket, server)."""
    image = tmp / f"{name}.img"
    image.write_bytes(bytes(MiB))
    sock = free_unix_path(tmp, f"{name}.sock")
    return image, sock, _file_server(tmp, sock, image)


def _file_server(tmp: Path, sock: str, image: Path) -> PynbdServer:
    # one process: SIGKILL of the supervisor would leave worker processes serving
    return PynbdServer(["--workers", "1", "--socket", sock, str(image)], cwd=tmp)


@pytest.mark.parametrize("connections", [1, 3])
def test_reconnect_after_the_server_restarts(tmp_path: Path, connections: int) -> None:
    """The server is killed with a read waiting: the read waits while the export is
    dialled again, completes with the right bytes once a new server listens on the same
    socket, and the export goes on (writes, flushes) on the new connections."""
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(4 * MiB))
    sock = free_unix_path(tmp_path, "r.sock")
    srv = _file_server(tmp_path, sock, image)
    calls: list[str] = []
    f = open_export(srv.uri, connections=connections, timeout=TIMEOUT, reconnect=60,
                    on_gone=calls.append)
    try:
        assert isinstance(f.conns, Pipeline if connections == 1 else Connections)
        f.write(MiB, memoryview(b"\x5a" * 65536))
        f.fsync()
        os.kill(srv.pid, signal.SIGKILL)
        srv.proc.wait(TIMEOUT)
        got = bytearray(65536)
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                f.read_into(MiB, memoryview(got))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        t.join(0.5)
        assert t.is_alive(), errors  # waiting for a server, not failed
        srv2 = _file_server(tmp_path, sock, image)
        try:
            t.join(TIMEOUT)
            assert not t.is_alive() and errors == [], errors
            assert got == b"\x5a" * 65536
            assert f.reconnects == 1 and f.gone is None and calls == []
            f.write(2 * MiB, memoryview(b"\x33" * 4096))
            f.fsync()
            assert image.read_bytes()[2 * MiB:2 * MiB + 4096] == b"\x33" * 4096
            assert len(f.conns) == connections
        finally:
            f.close()
            srv2.stop()
    finally:
        srv.stop()


def test_reconnect_gives_up_after_its_time(tmp_path: Path) -> None:
    _image, _sock, srv = _image_server(tmp_path, "g")
    calls: list[str] = []
    f = open_export(srv.uri, connections=2, timeout=TIMEOUT, reconnect=1.0,
                    on_gone=calls.append)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(TIMEOUT)
    buf = memoryview(bytearray(4096))
    assert _errno(f.read_into, 0, buf) == errno.EIO
    assert len(calls) == 1 and "no new connection within 1 s" in calls[0], calls
    assert f.gone == calls[0]
    assert _errno(f.read_into, 0, buf) == errno.EIO  # at once, no second attempt
    assert len(calls) == 1
    f.close()
    srv.stop()


def test_reconnect_refuses_an_export_that_changed(tmp_path: Path) -> None:
    _image, sock, srv = _image_server(tmp_path, "c")
    calls: list[str] = []
    f = open_export(srv.uri, connections=1, timeout=TIMEOUT, reconnect=60,
                    on_gone=calls.append)
    srv.stop()
    other = tmp_path / "bigger.img"
    other.write_bytes(bytes(2 * MiB))
    srv2 = _file_server(tmp_path, sock, other)
    try:
        assert _errno(f.read_into, 0, memoryview(bytearray(512))) == errno.EIO
        assert len(calls) == 1 and "its size changed" in calls[0], calls
    finally:
        f.close()
        srv2.stop()


@pytest.mark.parametrize("connections", [1, 2])
def test_request_sent_to_a_dead_server_is_eio_not_zeros(tmp_path: Path,
                                                        connections: int) -> None:
    """Found while testing reconnect: with one connection, a read whose send failed
    (the server had died between requests) returned success with its buffer untouched
    (zeros), and a write was reported done without reaching anything."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x77" * MiB)
    srv = _file_server(tmp_path, free_unix_path(tmp_path, "d.sock"), image)
    f = open_export(srv.uri, connections=connections, timeout=TIMEOUT)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(TIMEOUT)
    buf = bytearray(4096)
    assert _errno(f.read_into, 0, memoryview(buf)) == errno.EIO
    assert _errno(f.write, 0, memoryview(b"x" * 4096)) == errno.EIO
    assert f.gone is not None
    f.close()
    srv.stop()


def test_write_queued_behind_reads_fails_with_the_connection(tmp_path: Path) -> None:
    """Found by an audit: on one connection a WRITE waits for the READs in flight; it
    used to be taken off the queue first, so when the connection broke while those
    reads were collected it was in no list, and its caller waited for ever."""
    srv = start_nbdkit(tmp_path / "k", "memory", ["4M", "delay-read=2"],
                       transport="unix", filters=("delay",))
    p = Pipeline(connect_for_test(srv.uri()))
    outcome: dict[str, str] = {}

    def run(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            outcome[name] = "ok"
        except BaseException as exc:
            outcome[name] = type(exc).__name__

    threads = [
        threading.Thread(target=run, args=("read0", lambda: p.read_into(
            0, memoryview(bytearray(4096))))),
        threading.Thread(target=run, args=("read1", lambda: p.read_into(
            4096, memoryview(bytearray(4096))))),
        threading.Thread(target=run, args=("write", lambda: p.write(
            8192, memoryview(b"x" * 4096))), daemon=True),
    ]
    try:
        for t in threads:  # a read leads, a read follows, the write queues behind them
            t.start()
            t.join(0.3)
        # kill while the second read is collected and the write waits for it
        assert wait_until(lambda: outcome.get("read0") is not None, TIMEOUT)
        os.kill(srv.proc.pid, signal.SIGKILL)
        for t in threads:
            t.join(TIMEOUT)  # a hang guard
        assert not any(t.is_alive() for t in threads), outcome
        assert outcome["write"] != "ok" and outcome["read1"] != "ok", outcome
    finally:
        srv.stop()


def connect_for_test(uri: str):  # type: ignore[no-untyped-def]
    from pynbd.client import connect

    return connect(uri, timeout=TIMEOUT, meta_contexts=())


def test_fsync_after_a_reconnect_reports_writes_the_server_lost(tmp_path: Path) -> None:
    """nbdkit with a writeback cache loses acknowledged, unflushed writes when killed.
    After the reconnect the next fsync fails once with EIO (it used to succeed while the
    data was gone); written again, the data is flushed and kept."""
    import shutil
    import subprocess

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    sock = str(tmp_path / "wb.sock")
    argv = [shutil.which("nbdkit") or "nbdkit", "-f", "-U", sock, "--filter", "cache",
            "file", f"file={image}", "cache=writeback"]

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        assert wait_until(lambda: os.path.exists(sock), TIMEOUT)
        return p

    srv = start()
    f = open_export(f"nbd+unix:///?socket={sock}", connections=1, timeout=TIMEOUT,
                    reconnect=60)
    srv2 = None
    try:
        f.write(0, memoryview(b"A" * 4096))  # acknowledged, in nbdkit's cache only
        srv.kill()
        srv.wait(TIMEOUT)
        os.unlink(sock)
        srv2 = start()
        assert _errno(f.fsync) == errno.EIO
        f.fsync()  # reported once
        got = bytearray(4096)
        f.read_into(0, memoryview(got))
        assert got == bytes(4096)  # it really was lost
        f.write(0, memoryview(b"A" * 4096))
        f.fsync()
        assert image.read_bytes()[:4096] == b"A" * 4096
        assert f.reconnects == 1 and f.gone is None
    finally:
        f.close()
        for p in (srv, srv2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(TIMEOUT)


def test_reconnect_is_not_for_a_slow_server(tmp_path: Path) -> None:
    """From review: a request that timed out may still be carried out by a server that
    is slow rather than dead; sending its write again elsewhere could let the old copy
    land over newer data. A timeout ends the export even with --reconnect."""
    srv = start_nbdkit(tmp_path / "k", "memory", ["4M", "delay-read=5"],
                       transport="unix", filters=("delay",))
    calls: list[str] = []
    f = open_export(srv.uri(), connections=1, timeout=1.0, reconnect=30,
                    on_gone=calls.append)
    try:
        assert _errno(f.read_into, 0, memoryview(bytearray(512))) == errno.EIO
        assert f.reconnects == 0 and len(calls) == 1 and "no reply" in calls[0], calls
    finally:
        f.close()
        srv.stop()


def test_reconnect_refuses_a_server_that_lost_a_feature(tmp_path: Path) -> None:
    """From review: a server back without WRITE_ZEROES would turn ZERO_RANGE into
    EINVAL and leave a punched hole half done; it ends the export instead."""
    import shutil
    import subprocess

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    sock = str(tmp_path / "z.sock")

    def start(*filters: str) -> subprocess.Popen[bytes]:
        argv = [shutil.which("nbdkit") or "nbdkit", "-f", "-U", sock]
        for flt in filters:
            argv += ["--filter", flt]
        p = subprocess.Popen([*argv, "file", f"file={image}"], stderr=subprocess.DEVNULL)
        assert wait_until(lambda: os.path.exists(sock), TIMEOUT)
        return p

    first = start()
    calls: list[str] = []
    f = open_export(f"nbd+unix:///?socket={sock}", connections=1, timeout=TIMEOUT,
                    reconnect=30, on_gone=calls.append)
    assert f.can_zero
    first.kill()
    first.wait(TIMEOUT)
    os.unlink(sock)
    second = start("nozero")
    try:
        assert _errno(f.read_into, 0, memoryview(bytearray(512))) == errno.EIO
        assert len(calls) == 1 and "lost FLUSH, TRIM or WRITE_ZEROES" in calls[0], calls
    finally:
        f.close()
        second.kill()
        second.wait(TIMEOUT)


def test_reconnect_window_bounds_a_mute_listener(tmp_path: Path) -> None:
    """From review: with no request timeout, a listener that accepts but never speaks
    NBD held the reconnect (and every request) for ever; the window bounds each dial."""
    import socket

    _image, sock, srv = _image_server(tmp_path, "m")
    calls: list[str] = []
    f = open_export(srv.uri, connections=1, timeout=None, reconnect=2,
                    on_gone=calls.append)
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(TIMEOUT)
    os.unlink(sock)
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(sock)
    mute.listen(16)
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(
        _errno(f.read_into, 0, memoryview(bytearray(512)))), daemon=True)
    try:
        t.start()
        t.join(60)  # a hang guard: the window is 2 s
        assert not t.is_alive() and done == [errno.EIO], calls
        assert len(calls) == 1
    finally:
        mute.close()
        f.close()
        srv.stop()
