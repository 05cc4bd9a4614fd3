"""``pynbd serve --workers 2``: what every worker must share (issue 12).

Connections are spread over worker processes by the supervisor; these tests place
connections on both workers (``status`` says which worker serves which client) and
check what crosses them: data and flushes (multi-conn), status counters, ACL changes,
a worker SIGKILLed mid-request, and SIGTERM with requests in flight everywhere.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import nbd
import pytest

from pynbd.server.control import control_request
from tests.server.rawnbd import CMD_FLUSH, CMD_READ, CMD_WRITE, Dropped, Raw, is_dropped
from tests.support.processes import Process, pynbd_argv, run_pynbd
from tests.support.pynbd_server import ServerFactory
from tests.support.workers import ENV

MiB = 1024 * 1024


def status(ctl: str) -> dict:
    reply = control_request(ctl, {"cmd": "status"})
    assert reply["ok"], reply
    return reply["status"]


def wait_clients(ctl: str, n: int) -> dict:
    for _ in range(200):
        st = status(ctl)
        if sum(1 for c in st["client_list"] if c["state"] == "negotiated") >= n:
            return st
        time.sleep(0.05)
    raise AssertionError(f"status never showed {n} clients: {st}")


def worker_of(st: dict, sock: socket.socket) -> int:
    port = sock.getsockname()[1]
    for c in st["client_list"]:
        if c["peer"].endswith(f":{port}"):
            return int(c["worker"])
    raise AssertionError(f"client :{port} not in status")


def spread(addr: tuple[str, int], ctl: str, n: int = 4, **kw: object) -> dict[int, list[Raw]]:
    """``n`` raw connections; returns them grouped by the worker serving each."""
    conns = [Raw(addr).connect(**kw) for _ in range(n)]  # type: ignore[arg-type]
    st = wait_clients(ctl, n)
    by: dict[int, list[Raw]] = {}
    for c in conns:
        by.setdefault(worker_of(st, c.sock), []).append(c)
    return by


@pytest.fixture
def two(serve: ServerFactory, tmp_path: Path):  # type: ignore[no-untyped-def]
    def start(target: str, *extra: str):  # type: ignore[no-untyped-def]
        ctl = str(tmp_path / f"ctl{len(serve.servers)}.sock")
        srv = serve("--workers", "2", "--control", ctl, *extra, target)
        return srv, ("127.0.0.1", srv.port), ctl
    return start


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_writes_visible_and_flushed_across_workers(two, tmp_path: Path, kind: str) -> None:
    target = "memory:16M"
    if kind == "file":
        img = tmp_path / "disk.img"
        img.write_bytes(bytes(16 * MiB))
        target = str(img)
    _srv, addr, ctl = two(target)
    by = spread(addr, ctl)
    assert len(by) == 2, f"connections were not spread over both workers: {by}"
    (_wa, ca), (_wb, cb) = [(w, cs[0]) for w, cs in sorted(by.items())]
    assert ca.tflags & (1 << 8), "CAN_MULTI_CONN must be advertised"
    data = os.urandom(64 * 1024)
    assert ca.call(CMD_WRITE, 3 * MiB, len(data), payload=data)[0] == 0
    # a FLUSH on the other worker's connection covers it, and it reads back there
    assert cb.call(CMD_FLUSH)[0] == 0
    err, got = cb.call(CMD_READ, 3 * MiB, len(data))
    assert err == 0 and got == data
    if kind == "file":
        with open(tmp_path / "disk.img", "rb") as f:
            f.seek(3 * MiB)
            assert f.read(len(data)) == data
    for cs in by.values():
        for c in cs:
            c.disc()


def test_status_sums_every_worker_and_acl_reaches_all(two) -> None:
    _srv, addr, ctl = two("memory:8M")
    conns = []
    for i in range(6):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i % 2}", 0))
        s.settimeout(15)
        s.connect(addr)
        r = Raw.__new__(Raw)
        r.sock, r.structured, r.size, r.tflags = s, False, 0, 0
        r.connect()
        conns.append(r)
    st = wait_clients(ctl, 6)
    workers = {worker_of(st, c.sock) for c in conns}
    assert workers == {0, 1}
    for i, c in enumerate(conns):
        assert c.call(CMD_WRITE, i * 4096, 4096, payload=bytes([i]) * 4096)[0] == 0
    st = status(ctl)
    export = st["exports"][0]
    assert export["bytes_written"] == 6 * 4096
    assert export["clients"] == 6
    assert st["workers"] == 2 and len(set(st["worker_pids"])) == 2
    # 127.0.0.3 is no longer allowed: its clients go, on whichever worker they are
    r = run_pynbd("acl", "--control", ctl, "127.0.0.2/32", text=True, timeout=30,
                  python=sys.executable)
    assert r.returncode == 0, r.stderr
    for c in conns:
        if c.sock.getsockname()[0] == "127.0.0.3":
            assert is_dropped(c.sock)
        else:
            assert c.call(CMD_READ, 0, 4096)[0] == 0
    for c in conns:
        c.close()


def test_worker_killed_mid_request_is_replaced(two, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(64 * MiB))
    srv, addr, ctl = two(str(img))
    by = spread(addr, ctl, structured=False)
    assert len(by) == 2
    st = status(ctl)
    victim_idx = min(by)
    other_idx = max(by)
    victim_pid = st["worker_pids"][victim_idx]
    assert victim_pid != srv.pid
    # requests in flight on the victim when it dies
    v = by[victim_idx][0]
    for i in range(32):
        v.request(CMD_READ, (i % 32) * MiB, MiB, cookie=i)
    os.kill(victim_pid, signal.SIGKILL)
    with pytest.raises(Dropped):
        for _ in range(32):
            v.response(MiB)
    # the other worker's clients see nothing
    o = by[other_idx][0]
    for _ in range(20):
        assert o.call(CMD_READ, 0, 4096)[0] == 0
    # the supervisor starts a new worker; new clients are served by both again
    for _ in range(200):
        st = status(ctl)
        if st["worker_restarts"] == 1 and victim_pid not in st["worker_pids"]:
            break
        time.sleep(0.05)
    assert st["worker_restarts"] == 1 and victim_pid not in st["worker_pids"]
    assert srv.alive()
    for _ in range(4):
        h = nbd.NBD()
        h.connect_tcp(*map(str, addr))
        assert h.pread(4096, 0) == img.read_bytes()[:4096]
        h.shutdown()
    assert "worker 0 exited" in srv.stderr or "worker 1 exited" in srv.stderr


def test_sigterm_finishes_in_flight_requests_in_every_worker(two, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(64 * MiB))
    srv, addr, ctl = two(str(img))
    by = spread(addr, ctl, structured=False)
    assert len(by) == 2
    conns = [cs[0] for cs in by.values()]
    blocks = {}
    for k, c in enumerate(conns):
        for i in range(16):
            off = (k * 16 + i) * MiB
            data = os.urandom(MiB)
            blocks[off] = data
            c.request(CMD_WRITE, off, MiB, cookie=i, payload=data)
    srv.proc.send_signal(signal.SIGTERM)
    for c in conns:
        got = set()
        for _ in range(16):
            cookie, err, _ = c.response()
            assert err == 0
            got.add(cookie)
        assert got == set(range(16))
        assert is_dropped(c.sock)
    assert srv.proc.wait(30) == 0
    with open(img, "rb") as f:
        for off, data in blocks.items():
            f.seek(off)
            assert f.read(MiB) == data


def test_workers_auto_and_explicit(serve: ServerFactory, tmp_path: Path) -> None:
    """``--workers auto`` (the default) is one per CPU, at most 8; status says so."""
    os.environ.pop(ENV, None)
    ctl = str(tmp_path / "auto.sock")
    serve("--control", ctl, "memory:1M")
    st = status(ctl)
    assert st["workers"] == max(1, min(os.cpu_count() or 1, 8))
    ctl1 = str(tmp_path / "one.sock")
    serve("--workers", "1", "--control", ctl1, "memory:1M")
    st1 = status(ctl1)
    assert st1["workers"] == 1 and st1["worker_pids"] == [st1["pid"]]
    r = run_pynbd("serve", "--workers", "0", "memory:1M", text=True, timeout=30,
                  python=sys.executable)
    assert r.returncode == 2 and "--workers 0" in r.stderr


def test_non_loopback_bind_needs_authentication_or_insecure(tmp_path: Path) -> None:
    r = run_pynbd("serve", "--bind", "0.0.0.0", "--port", "0", "memory:1M", text=True,
                  timeout=30, python=sys.executable)
    assert r.returncode == 2
    assert "without authenticating clients" in r.stderr and "--insecure" in r.stderr
    p = Process(pynbd_argv("serve", "--bind", "0.0.0.0", "--port", "0", "--insecure",
                           "memory:1M", python=sys.executable), stop_timeout=20.0)
    try:
        uri = p.first_line().strip()
        assert uri.startswith("nbd://")
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        h = nbd.NBD()
        h.connect_tcp("127.0.0.1", str(port))
        assert h.get_size() == MiB
        h.shutdown()
    finally:
        p.stop()
    assert "WITHOUT authenticating" in p.stderr


def test_default_listens_on_loopback_only(serve: ServerFactory, tmp_path: Path) -> None:
    from tests.support.pynbd_server import PynbdServer

    srv = PynbdServer(["--port", "0", "memory:1M"], cwd=tmp_path)
    serve.servers.append(srv)
    assert all(u.startswith(("nbd://127.0.0.1:", "nbd://[::1]:")) for u in srv.uris)
