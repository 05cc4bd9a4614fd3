"""Thread models and per-connection open/close, checked by what the server does to a
plugin that records its calls (tests/plugins/testplugins/recorder.py): how many calls
ran at once, on the export and on one connection, and how many connections were open at
once. No timing is asserted: a model that serializes must never show two calls at
once; one that does not, must (its calls wait for each other to prove it)."""

from __future__ import annotations

import threading
from pathlib import Path

import nbd
import pytest

from tests.plugins.conftest import TESTPLUGINS
from tests.plugins.testplugins.recorder import totals
from tests.server.rawnbd import CMD_READ, CMD_WRITE, Raw
from tests.support.pynbd_server import PynbdServer, ServerFactory, wait_until

RECORDER = f"python:{TESTPLUGINS / 'recorder.py'}"


def start(serve: ServerFactory, tmp_path: Path, cls: str, *params: str,
          workers: int = 1) -> tuple[PynbdServer, str]:
    record = str(tmp_path / "rec")
    srv = serve("--workers", str(workers), f"{RECORDER}:{cls}", f"record={record}", *params)
    return srv, record


def hammer(uri: str, conns: int = 4, depth: int = 8, rounds: int = 3) -> None:
    """``conns`` libnbd connections, each with ``depth`` requests in flight at once
    (writes, reads, flushes, zeroes), ``rounds`` times; all must succeed."""
    hs = []
    for _ in range(conns):
        h = nbd.NBD()
        h.set_strict_mode(nbd.STRICT_MASK)
        h.connect_uri(uri)
        hs.append(h)
    for r in range(rounds):
        cookies = []
        for i, h in enumerate(hs):
            for k in range(depth):
                off = ((i * depth + k) * 4096 + r * 65536) % (8 << 20)
                if k % 4 == 0:
                    cookies.append((h, h.aio_pwrite(bytes([k + 1]) * 4096, off)))
                elif k % 4 == 1:
                    cookies.append((h, h.aio_pread(nbd.Buffer(4096), off)))
                elif k % 4 == 2:
                    cookies.append((h, h.aio_zero(4096, off)))
                else:
                    cookies.append((h, h.aio_flush()))
        for h, c in cookies:
            while not h.aio_command_completed(c):
                h.poll(1)
    for h in hs:
        h.shutdown()


@pytest.mark.parametrize("cls", ["SerializeAllRequests", "SerializeConnections",
                                 "InlineSerializeAll"])
def test_serializing_models_never_overlap_calls(serve: ServerFactory, tmp_path: Path,
                                                cls: str) -> None:
    # asked for two workers: a serializing export is served from one process
    srv, record = start(serve, tmp_path, cls, "sleep=0.002", workers=2)
    # four clients at once, each connecting three times: connections come and go (with
    # their final flushes) while the others' requests run
    errors: list[BaseException] = []

    def client() -> None:
        try:
            for _ in range(3):
                hammer(srv.uri, conns=1, depth=8, rounds=2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    srv.stop()  # final flushes and close_connection included
    t = totals(record)
    assert t["calls"] > 0
    assert t["max_active"] == 1, t
    assert t["opens"] == t["closes"] and t["close_errors"] == 0, t
    assert "serving with one worker" in srv.stderr


def test_serialize_requests_one_per_connection_connections_in_parallel(
        serve: ServerFactory, tmp_path: Path) -> None:
    srv, record = start(serve, tmp_path, "SerializeRequests", "wait_for=2")
    hammer(srv.uri, conns=2, depth=8, rounds=2)
    srv.stop()
    t = totals(record)
    assert t["max_per_conn"] == 1, t
    assert t["max_active"] >= 2, t  # two connections did run at once


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_model_overlaps_calls(serve: ServerFactory, tmp_path: Path,
                                       workers: int) -> None:
    srv, record = start(serve, tmp_path, "Recorder", "wait_for=2", workers=workers)
    hammer(srv.uri, conns=2, depth=8, rounds=1)
    srv.stop()
    t = totals(record)
    assert t["max_per_conn"] >= 2 and t["max_active"] >= 2, t


def test_serialize_connections_second_client_waits_for_the_first(
        serve: ServerFactory, tmp_path: Path) -> None:
    srv, record = start(serve, tmp_path, "SerializeConnections")
    addr = ("127.0.0.1", srv.port)
    a = Raw(addr).connect()
    assert a.call(CMD_WRITE, 0, 4096, payload=b"a" * 4096)[0] == 0
    b = Raw(addr).connect()  # negotiates, but is not served while a is connected
    b.request(CMD_READ, 0, 4096, cookie=42)
    for i in range(20):  # a keeps being served meanwhile
        assert a.call(CMD_WRITE, 4096 * i, 4096, payload=b"b" * 4096)[0] == 0
    b.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        b.sock.recv(1)  # nothing for b: its request has not run
    t = totals(record)
    assert t["max_open"] == 1, t  # b's connection was not opened in the plugin yet
    b.sock.settimeout(15)
    a.disc()
    cookie, err, data = b.response(4096)
    assert (cookie, err, data) == (42, 0, b"b" * 4096)
    b.disc()
    srv.stop()
    t = totals(record)
    assert t["max_open"] == 1 and t["opens"] == 2 and t["closes"] == 2, t


@pytest.mark.parametrize("workers", [1, 2])
def test_open_and_close_connection_once_per_connection(serve: ServerFactory,
                                                       tmp_path: Path, workers: int) -> None:
    srv, record = start(serve, tmp_path, "Recorder", workers=workers)
    addr = ("127.0.0.1", srv.port)
    n = 0
    # clean disconnects, with and without I/O
    for i in range(4):
        c = Raw(addr).connect()
        if i % 2:
            assert c.call(CMD_WRITE, 0, 4096, payload=b"x" * 4096)[0] == 0
        c.disc()
        n += 1
    # a client that goes away without NBD_CMD_DISC, with a request in flight
    c = Raw(addr).connect()
    c.request(CMD_WRITE, 0, 4096, cookie=1, payload=b"y" * 4096)
    c.request(CMD_READ, 0, 4096, cookie=2)
    c.close()
    n += 1
    # a client that disconnects before selecting an export never opens one
    Raw(addr).close()
    # libnbd clients
    hammer(srv.uri, conns=3, depth=4, rounds=1)
    n += 3
    assert wait_until(lambda: totals(record).get("closes", 0) == n, timeout=20), totals(record)
    t = totals(record)
    assert t["opens"] == n and t["closes"] == n and t["close_errors"] == 0, t
    srv.stop()
    t = totals(record)
    assert t["opens"] == n and t["closes"] == n, t


def test_a_slow_call_does_not_hold_up_other_connections(serve: ServerFactory,
                                                        tmp_path: Path) -> None:
    """A blocking plugin whose call takes long (here: until the test says so) holds up
    only the request that made it."""
    trigger = tmp_path / "go"
    srv = serve("--workers", "1", f"python:{TESTPLUGINS / 'broken.py'}:Sleepy",
                f"trigger={trigger}")
    addr = ("127.0.0.1", srv.port)
    slow = Raw(addr).connect()
    slow.request(CMD_READ, 0, 4096, cookie=9)  # offset 0 waits for the trigger file
    assert wait_until(lambda: Path(f"{trigger}.waiting").exists(), timeout=20)
    others = [Raw(addr).connect() for _ in range(3)]
    for k, c in enumerate(others):
        for i in range(1, 20):
            assert c.call(CMD_WRITE, i * 4096, 4096, payload=bytes([k]) * 4096)[0] == 0
            assert c.call(CMD_READ, i * 4096, 4096) == (0, bytes([k]) * 4096)
    # the slow connection's own later requests wait behind it only if the thread pool
    # ran out; one more request on it is answered
    slow.request(CMD_READ, 8192, 4096, cookie=10)
    assert slow.response(4096)[:2] == (10, 0)
    trigger.write_text("go")
    assert slow.response(4096)[:2] == (9, 0)
    for c in [slow, *others]:
        c.disc()


def test_a_client_with_many_slow_calls_does_not_starve_the_others(
        serve: ServerFactory, tmp_path: Path) -> None:
    """One client fills the server's thread pool with calls that do not return (here:
    until the test says so): the other clients are still served."""
    trigger = tmp_path / "go"
    srv = serve("--workers", "1", f"python:{TESTPLUGINS / 'broken.py'}:Sleepy",
                f"trigger={trigger}")
    addr = ("127.0.0.1", srv.port)
    slow = Raw(addr).connect()
    for cookie in range(64):  # every one waits for the trigger file
        slow.request(CMD_READ, 0, 4096, cookie=cookie)
    assert wait_until(lambda: Path(f"{trigger}.waiting").exists()
                      and len(Path(f"{trigger}.waiting").read_text()) >= 8, timeout=20)
    other = Raw(addr).connect()
    for i in range(1, 10):
        assert other.call(CMD_WRITE, i * 4096, 4096, payload=b"o" * 4096)[0] == 0
        assert other.call(CMD_READ, i * 4096, 4096) == (0, b"o" * 4096)
    trigger.write_text("go")
    assert sorted(slow.response(4096)[0] for _ in range(64)) == list(range(64))
    other.disc()
    slow.disc()


def test_a_slow_open_connection_holds_up_only_its_client(serve: ServerFactory,
                                                         tmp_path: Path) -> None:
    """A blocking plugin's open_connection runs on a thread: while one client's open
    takes long, other clients connect and are served; the slow client's requests wait
    for its open and then run."""
    trigger = tmp_path / "go"
    srv = serve("--workers", "1", f"python:{TESTPLUGINS / 'broken.py'}:SlowOpen",
                f"trigger={trigger}")
    addr = ("127.0.0.1", srv.port)
    slow = Raw(addr).connect()  # the handshake completes; the plugin is still opening
    assert wait_until(lambda: Path(f"{trigger}.waiting").exists(), timeout=20)
    slow.request(CMD_WRITE, 0, 4096, cookie=5, payload=b"s" * 4096)
    for k in range(3):
        c = Raw(addr).connect()
        assert c.call(CMD_WRITE, 4096, 4096, payload=bytes([k]) * 4096)[0] == 0
        assert c.call(CMD_READ, 4096, 4096) == (0, bytes([k]) * 4096)
        c.disc()
    slow.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        slow.sock.recv(1)  # not served before its open finished
    slow.sock.settimeout(15)
    trigger.write_text("go")
    assert slow.response()[:2] == (5, 0)
    assert slow.call(CMD_READ, 0, 4096) == (0, b"s" * 4096)
    slow.disc()
