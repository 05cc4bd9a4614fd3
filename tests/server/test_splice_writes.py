"""Large WRITE payloads spliced from the socket into a plain file export (conn_splice):
the bytes land where they belong whatever the segmentation (payload bytes arriving with
the header, pipelined with reads and small writes, TCP and Unix sockets); a client gone
mid-payload, a full filesystem and a stack that changes mid-payload (a write tracker
attached, the export paused) each end the way the normal path would, and the server's
one splice pipe never carries bytes from one WRITE into another."""

from __future__ import annotations

import errno
import os
import random
import select
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from pynbd.backends.file import FileBackend
from pynbd.server.conn_splice import SPLICE_MIN
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Server, ServerOptions
from pynbd.server.server_workers import LocalWorker
from tests.server.rawnbd import CMD_READ, CMD_WRITE, ENOSPC, Raw
from tests.support.pynbd_server import ServerFactory

MiB = 1024 * 1024
SIZE = 32 * MiB


def _start(path: Path, unix: Path | None = None) -> Server:
    srv = Server(ExportRegistry([Export("", FileBackend(str(path)))]), ServerOptions())
    if unix is not None:
        srv.listen_unix(str(unix))
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    return srv


def _spliced(srv: Server) -> bool:
    """Whether the worker has made its splice pipe (the spliced path ran)."""
    h = srv.workers[0]
    assert isinstance(h, LocalWorker)
    return h.worker._splice_pipe is not None


@pytest.fixture
def disk(tmp_path: Path) -> tuple[Path, bytearray]:
    data = bytearray(random.Random(1).randbytes(SIZE))
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def server(disk: tuple[Path, bytearray], tmp_path: Path) -> Iterator[Server]:
    srv = _start(disk[0], tmp_path / "nbd.sock")
    yield srv
    srv.shutdown(timeout=10)


def _port(srv: Server) -> int:
    return next(lst.port for lst in srv.listeners if lst.port)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_pipelined_large_and_small_writes(server: Server, disk: tuple[Path, bytearray],
                                          tmp_path: Path, transport: str) -> None:
    path, model = disk
    h = nbd.NBD()
    if transport == "tcp":
        h.connect_tcp("127.0.0.1", str(_port(server)))
    else:
        h.connect_unix(str(tmp_path / "nbd.sock"))
    rnd = random.Random(2)
    for _ in range(6):  # rounds of requests in flight together
        cookies = []
        for _ in range(12):
            kind = rnd.random()
            if kind < 0.5:
                n = rnd.choice([SPLICE_MIN, SPLICE_MIN + 1, MiB + 3, 3 * MiB - 7, 8 * MiB])
            elif kind < 0.8:
                n = rnd.randrange(1, SPLICE_MIN)
            else:
                n = 0
            off = rnd.randrange(0, SIZE - max(n, 1))
            if n:
                data = rnd.randbytes(n)
                model[off:off + n] = data
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
            else:
                cookies.append(h.aio_pread(nbd.Buffer(4096), off))
        while h.aio_in_flight():
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
    assert _spliced(server)
    h.flush()
    for off in range(0, SIZE, 4 * MiB):
        assert h.pread(4 * MiB, off) == model[off:off + 4 * MiB], off
    h.shutdown()
    assert path.read_bytes() == model


def test_payload_arriving_with_its_header(server: Server, disk: tuple[Path, bytearray]
                                          ) -> None:
    """The header, the whole payload and the next request in one send: the server's
    first receive takes part of the payload along with the header."""
    path, model = disk
    r = Raw(("127.0.0.1", _port(server))).connect("", structured=False)
    payload = random.Random(3).randbytes(SPLICE_MIN + 4097)
    off = 5 * MiB + 11
    r.request(CMD_WRITE, off, len(payload), cookie=1, payload=payload)
    r.request(CMD_READ, off, len(payload), cookie=2)
    assert r.response() == (1, 0, b"")
    assert r.response(len(payload)) == (2, 0, payload)
    model[off:off + len(payload)] = payload
    r.disc()
    assert _spliced(server)
    assert path.read_bytes() == model


def test_client_gone_mid_payload(server: Server, disk: tuple[Path, bytearray]) -> None:
    """Half a payload then a close: never acknowledged, only the bytes sent can have
    changed, and the next client's large write is exact (nothing stale in the pipe)."""
    path, model = disk
    port = _port(server)
    r = Raw(("127.0.0.1", port)).connect("", structured=False)
    off, n, sent = 2 * MiB, 2 * MiB, 700 * 1024 + 5
    part = random.Random(4).randbytes(sent)
    r.request(CMD_WRITE, off, n, cookie=1, payload=part)
    r.close()
    other = Raw(("127.0.0.1", port)).connect("", structured=False)
    payload = random.Random(5).randbytes(MiB + 1)
    off2 = 20 * MiB
    assert other.call(CMD_WRITE, off2, len(payload), payload=payload) == (0, b"")
    model[off2:off2 + len(payload)] = payload
    assert other.call(CMD_READ, off2, len(payload)) == (0, payload)
    other.disc()
    server.shutdown(timeout=10)  # the dropped connection is gone too
    now = path.read_bytes()
    got = now[off:off + sent]
    # each byte sent is either old or new; nothing past what was sent changed
    assert all(g in (a, b) for g, a, b in zip(got, model[off:off + sent], part, strict=True))
    assert now[off + sent:] == model[off + sent:]
    assert now[:off] == model[:off]


def _wait_bytes(path: Path, off: int, data: bytes) -> None:
    """Until ``data`` is in the file at ``off`` (the server spliced it in)."""
    ev = threading.Event()
    for _ in range(2000):
        with open(path, "rb") as f:
            f.seek(off)
            if f.read(len(data)) == data:
                return
        ev.wait(0.005)
    pytest.fail("the spliced head never reached the file")


def test_tracker_attached_mid_payload_marks_the_write(server: Server,
                                                       disk: tuple[Path, bytearray]) -> None:
    """A migration attaches its write tracker while a payload is being spliced: the
    rest goes through the new stack and the whole WRITE is marked."""
    path, model = disk
    marks: list[tuple[int, int]] = []

    class Tracker:
        def mark(self, offset: int, length: int) -> None:
            marks.append((offset, length))

    r = Raw(("127.0.0.1", _port(server))).connect("", structured=False)
    off, n = 6 * MiB, 2 * MiB
    payload = random.Random(6).randbytes(n)
    head = payload[:SPLICE_MIN]
    r.request(CMD_WRITE, off, n, cookie=1, payload=head)
    _wait_bytes(path, off, head)
    assert _spliced(server)
    server.set_tracker("", Tracker())
    r.send(payload[SPLICE_MIN:])
    assert r.response() == (1, 0, b"")
    assert (off, n) in marks
    model[off:off + n] = payload
    assert r.call(CMD_READ, off, n) == (0, payload)
    r.disc()
    server.set_tracker("", None)
    assert path.read_bytes() == model


def test_pause_mid_payload_holds_the_write(server: Server,
                                           disk: tuple[Path, bytearray]) -> None:
    """The export is paused while a payload is being spliced: the WRITE is answered
    only after the resume, and its data is all there."""
    path, model = disk
    r = Raw(("127.0.0.1", _port(server))).connect("", structured=False)
    off, n = 9 * MiB + 512, 3 * MiB
    payload = random.Random(7).randbytes(n)
    head = payload[:MiB]
    r.request(CMD_WRITE, off, n, cookie=1, payload=head)
    _wait_bytes(path, off, head)
    assert server.gate_pause("", 10)
    r.send(payload[MiB:])
    # held while paused: no reply comes
    ready, _, _ = select.select([r.sock], [], [], 0.5)
    assert not ready
    server.gate_resume("")
    assert r.response() == (1, 0, b"")
    model[off:off + n] = payload
    assert r.call(CMD_READ, off, n) == (0, payload)
    r.disc()
    assert path.read_bytes() == model


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (the tests run as root): writes past its room fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True,
                   timeout=30)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def test_full_filesystem_answers_enospc_and_goes_on(small_fs: Path) -> None:
    path = small_fs / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)  # sparse: only 2 MiB of room behind it
    srv = _start(path)
    try:
        r = Raw(("127.0.0.1", _port(srv))).connect("", structured=True)
        first = random.Random(8).randbytes(MiB)
        assert r.call(CMD_WRITE, 0, MiB, payload=first) == (0, b"")
        assert _spliced(srv)
        big = random.Random(9).randbytes(4 * MiB)
        err, _ = r.call(CMD_WRITE, 8 * MiB, len(big), payload=big)
        assert err == ENOSPC
        # the connection goes on: the rest of that payload was read and dropped
        assert r.call(CMD_READ, 0, MiB) == (0, first)
        small = b"\x5a" * 4096
        assert r.call(CMD_WRITE, 4096, 4096, payload=small) == (0, b"")
        assert r.call(CMD_READ, 4096, 4096) == (0, small)
        r.disc()
        # another connection's large write still works where the space is allocated
        # (the failed write took what room was left)
        h = nbd.NBD()
        h.connect_tcp("127.0.0.1", str(_port(srv)))
        again = random.Random(10).randbytes(SPLICE_MIN)
        h.pwrite(again, 64 * 1024)
        assert h.pread(len(again), 64 * 1024) == again
        h.shutdown()
    finally:
        srv.shutdown(timeout=10)


def test_fua_write_takes_the_usual_path(server: Server, disk: tuple[Path, bytearray]
                                          ) -> None:
    """A FUA write of a large payload takes the usual path (and is durable)."""
    path, model = disk
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(_port(server)))
    data = random.Random(11).randbytes(MiB)
    h.pwrite(data, 12 * MiB, nbd.CMD_FLAG_FUA)
    model[12 * MiB:13 * MiB] = data
    assert not _spliced(server)  # nothing else ran: the pipe was never needed
    h.shutdown()
    assert path.read_bytes() == model


def test_two_transports_share_the_pipe_without_stale_bytes(server: Server, tmp_path: Path,
                                                    disk: tuple[Path, bytearray]) -> None:
    """Two connections, one per transport, alternate large writes to the same range:
    each read returns exactly the last write (one pipe serves both)."""
    path, model = disk
    a = Raw(("127.0.0.1", _port(server))).connect("", structured=False)
    b = Raw(str(tmp_path / "nbd.sock"), socket.AF_UNIX).connect("", structured=False)
    rnd = random.Random(12)
    off = 16 * MiB + 3
    for i in range(8):
        c = a if i % 2 else b
        data = rnd.randbytes(SPLICE_MIN + rnd.randrange(MiB))
        assert c.call(CMD_WRITE, off, len(data), payload=data) == (0, b"")
        model[off:off + len(data)] = data
        other = b if c is a else a
        assert other.call(CMD_READ, off, len(data)) == (0, data)
    a.disc()
    b.disc()
    assert path.read_bytes() == model
    assert os.path.getsize(path) == SIZE


def test_resume_rebinds_new_connections_work(disk: tuple[Path, bytearray]) -> None:
    """After a pause and a resume (a failed migration handover, a view taken), a new
    connection's requests run (its stack has no pause layer to admit them) and large
    writes are spliced again."""
    path, model = disk
    srv = _start(path)
    try:
        assert srv.gate_pause("", 10)
        srv.gate_resume("")
        r = Raw(("127.0.0.1", _port(srv))).connect("", structured=False)
        assert r.call(CMD_READ, 0, 4096) == (0, bytes(model[:4096]))
        data = random.Random(13).randbytes(MiB)
        assert r.call(CMD_WRITE, 3 * MiB, MiB, payload=data) == (0, b"")
        assert _spliced(srv)
        model[3 * MiB:4 * MiB] = data
        r.disc()
    finally:
        srv.shutdown(timeout=10)
    assert path.read_bytes() == model


@pytest.mark.parametrize("side", ["file", "socket"])
def test_splice_refused_falls_back(disk: tuple[Path, bytearray],
                                   monkeypatch: pytest.MonkeyPatch, side: str) -> None:
    """A file (or socket) that cannot be spliced (EINVAL): the payload goes through
    memory instead, byte-exact, also when it arrives in pieces."""
    path, model = disk
    real = os.splice
    refused = []

    def fake(src: int, dst: int, count: int, offset_src: int | None = None,
             offset_dst: int | None = None, flags: int = 0) -> int:
        if (offset_dst is not None) == (side == "file"):
            refused.append(count)
            raise OSError(errno.EINVAL, "splice refused (test)")
        return real(src, dst, count, offset_src, offset_dst, flags)

    monkeypatch.setattr(os, "splice", fake)
    srv = _start(path)
    try:
        r = Raw(("127.0.0.1", _port(srv))).connect("", structured=False)
        rnd = random.Random(14)
        for i in range(4):
            n = rnd.choice([SPLICE_MIN, MiB + 3, 3 * MiB - 7])
            off = rnd.randrange(0, SIZE - n)
            data = rnd.randbytes(n)
            r.request(CMD_WRITE, off, n, cookie=i, payload=data[:1000])
            r.send(data[1000:])
            assert r.response() == (i, 0, b"")
            model[off:off + n] = data
            assert r.call(CMD_READ, off, n) == (0, data)
        r.disc()
    finally:
        srv.shutdown(timeout=10)
    assert refused
    assert path.read_bytes() == model


def test_subclass_with_own_pwrite_sees_large_writes(disk: tuple[Path, bytearray]) -> None:
    """A backend built on FileBackend with a pwrite of its own (a plugin adding a
    checksum map, say) gets every WRITE: splice would go around it."""
    path, model = disk
    seen: list[tuple[int, int]] = []

    class Audited(FileBackend):
        def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
            seen.append((offset, len(buf)))
            super().pwrite(buf, offset, fua)

    srv = Server(ExportRegistry([Export("", Audited(str(path)))]), ServerOptions())
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    try:
        h = nbd.NBD()
        h.connect_tcp("127.0.0.1", str(_port(srv)))
        data = random.Random(15).randbytes(2 * MiB)
        h.pwrite(data, MiB)
        model[MiB:3 * MiB] = data
        h.shutdown()
    finally:
        srv.shutdown(timeout=10)
    assert seen == [(MiB, 2 * MiB)]
    assert path.read_bytes() == model


def test_two_worker_processes_four_connections(serve: ServerFactory,
                                               disk: tuple[Path, bytearray]) -> None:
    """`pynbd serve --workers 2`: four connections (spread over both processes, each
    with its own splice pipe) write large pieces in flight together; a FLUSH on one
    covers them all and every connection reads back the same bytes."""
    path, model = disk
    srv = serve(str(path), "--workers", "2")
    handles = [nbd.NBD() for _ in range(4)]
    for h in handles:
        h.connect_uri(srv.uri)
    rnd = random.Random(16)
    cookies: list[tuple[nbd.NBD, int]] = []
    for i, h in enumerate(handles):
        base = i * (SIZE // 4)
        for j in range(3):  # disjoint: writes in flight together never overlap
            n = rnd.choice([SPLICE_MIN, MiB + 5, 2 * MiB - 3])
            off = base + j * (SIZE // 12) + rnd.randrange(4096)
            data = rnd.randbytes(n)
            model[off:off + n] = data
            cookies.append((h, h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                            off)))
    for h in handles:
        while h.aio_in_flight():
            h.poll(-1)
    for h, c in cookies:
        assert h.aio_command_completed(c)
    handles[0].flush()
    for i, h in enumerate(handles):
        off = ((i + 1) % 4) * (SIZE // 4)  # what another connection wrote
        assert h.pread(SIZE // 4, off) == model[off:off + SIZE // 4]
    for h in handles:
        h.shutdown()
    srv.stop()
    assert path.read_bytes() == model


def test_shutdown_mid_payload_is_not_held_up(disk: tuple[Path, bytearray]) -> None:
    """The server stops while a client is half-way through a large payload: the stop
    does not wait for the rest, the WRITE is never acknowledged, and nothing past what
    was sent changed."""
    path, model = disk
    srv = _start(path)
    r = Raw(("127.0.0.1", _port(srv))).connect("", structured=False)
    off, n = 4 * MiB, 4 * MiB
    head = random.Random(17).randbytes(MiB)
    r.request(CMD_WRITE, off, n, cookie=1, payload=head)
    _wait_bytes(path, off, head)
    done = threading.Event()

    def stop() -> None:
        srv.shutdown(timeout=10)
        done.set()

    t = threading.Thread(target=stop, daemon=True)
    t.start()
    t.join(30)
    assert done.is_set(), "shutdown waited for the rest of the payload"
    r.sock.settimeout(10)
    assert r.sock.recv(1) == b""  # closed, no reply
    r.close()
    now = path.read_bytes()
    assert now[off + MiB:] == model[off + MiB:]
    assert now[:off] == model[:off]
