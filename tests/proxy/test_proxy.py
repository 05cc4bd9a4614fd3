"""``pynbd proxy``: clients see no I/O error across upstream failures and a handover."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.migration._procs import (
    Procs,
    Writer,
    ctl,
    listen,
    make_sparse_image,
    migration_status,
    sparse_file,
)

SIZE = 64 * 1024 * 1024


def _proxy(procs: Procs, tmp_path: Path, upstream: str) -> tuple[str, str]:
    sock = str(tmp_path / "proxy.sock")
    pctl = str(tmp_path / "proxy.ctl")
    p = procs.pynbd(["proxy", "--upstream", upstream, "--socket", sock, "--control", pctl],
                    "proxy")
    uri = p.first_line()
    p.wait_for(lambda: os.path.exists(pctl), "control socket")
    return uri, pctl


def test_proxy_clients_see_only_a_pause_across_handover(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=31)
    sparse_file(dst, SIZE)
    _s, uri, sctl = procs.serve(src)
    _d, m2, dctl, served = listen(procs, dst)
    puri, pctl = _proxy(procs, tmp_path, uri)
    part = SIZE // 4
    ws = [Writer(puri, SIZE, seed=40 + i, rate=1 << 20, region=(i * part, (i + 1) * part))
          for i in range(4)]
    for w in ws:
        w.start()
    time.sleep(0.5)
    mirror = procs.mirror(["--control", sctl, "--to", m2,
                           "--wait"], "mirror")
    # the orchestrator: once the destination is authoritative, point the proxy at it
    for _ in range(1200):
        if migration_status(dctl)["authoritative"]:
            break
        time.sleep(0.05)
    for _ in range(200):
        reply = ctl(pctl, {"cmd": "upstream", "uri": served})
        if reply["ok"]:
            break
        time.sleep(0.05)
    assert reply["ok"], reply
    assert mirror.proc.wait(60) == 0, mirror.logs()
    writes_at_switch = [w.writes for w in ws]
    time.sleep(1.0)
    for w in ws:
        w.stop_event.set()
        w.join(30)
    for w, before in zip(ws, writes_at_switch, strict=True):
        assert w.error is None, w.error
        assert w.writes > before  # kept writing on the new upstream
        assert w.check_in(dst) == []
    st = ctl(pctl, {"cmd": "status"})["status"]["proxy"]
    assert st["switches"] == 1 and st["failed_requests"] == 0 and st["upstream"] == served


def test_proxy_replays_when_upstream_dies(procs: Procs, tmp_path: Path) -> None:
    img = tmp_path / "img"
    make_sparse_image(img, SIZE, seed=32)
    s1, uri, _sctl = procs.serve(img, name="up")
    puri, pctl = _proxy(procs, tmp_path, uri)
    part = SIZE // 8
    ws = [Writer(puri, SIZE, seed=50 + i, rate=2 << 20, region=(i * part, (i + 1) * part))
          for i in range(8)]
    for w in ws:
        w.start()
    for round_ in range(2):
        time.sleep(0.5)
        s1.kill(signal.SIGKILL)
        s1.proc.wait(10)
        time.sleep(0.3)
        for p in (tmp_path / "up.sock", tmp_path / "up.ctl"):
            if p.exists():
                os.unlink(p)
        s1, _uri, _ = procs.serve(img, name="up")
        assert _uri == uri, round_
    time.sleep(0.5)
    for w in ws:
        w.stop_event.set()
        w.join(30)
        assert w.error is None, w.error
        assert w.check_in(img) == []
    st = ctl(pctl, {"cmd": "status"})["status"]["proxy"]
    assert st["retries"] > 0 and st["failed_requests"] == 0
    # a 32 MiB request through the proxy (flexnbd's proxy checklist)
    from pynbd.client import connect

    big = os.urandom(32 * 1024 * 1024)
    with connect(puri, timeout=30) as c:
        c.write(0, big)
        assert c.read(0, len(big)) == big


def test_flush_reaches_every_upstream_connection_without_multi_conn(procs: Procs,
                                                                     tmp_path: Path) -> None:
    """Behind an upstream that does not advertise multi-conn, a client's FLUSH through the
    proxy is sent on every upstream connection that carried writes before it (nbdkit's log
    filter shows which connection got what)."""
    import re
    import shutil
    import threading

    from pynbd.client import connect

    img, log = tmp_path / "img", tmp_path / "nbdkit.log"
    sparse_file(img, SIZE)
    sock = tmp_path / "up.sock"
    procs.start([shutil.which("nbdkit") or "nbdkit", "-f", "-U", str(sock),
                 "--filter=log", "--filter=multi-conn", "file", f"file={img}",
                 "multi-conn-mode=disable", f"logfile={log}"], "nbdkit")
    procs.all[-1].wait_for(sock.exists, "socket")
    puri, pctl = _proxy(procs, tmp_path, f"nbd+unix:///?socket={sock}")
    start = threading.Barrier(6)

    def writer(i: int) -> None:
        with connect(puri, timeout=30) as c:
            start.wait(10)
            for j in range(40):
                c.write((i * 40 + j) * 65536, bytes([i + 1]) * 65536)

    ts = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
        assert not t.is_alive()
    with connect(puri, timeout=30) as c:
        assert c.can_multi_conn()  # the proxy's own flush covers all its connections
        c.flush()
    st = ctl(pctl, {"cmd": "status"})["status"]["proxy"]
    assert st["upstream_multi_conn"] is False
    last_write: dict[str, int] = {}
    last_flush: dict[str, int] = {}
    for n, line in enumerate(log.read_text().splitlines()):
        m = re.search(r"connection=(\d+) (Write|Flush) id=", line)
        if m:
            (last_write if m.group(2) == "Write" else last_flush)[m.group(1)] = n
    assert len(last_write) > 1, "the writes should have used several upstream connections"
    for conn, n in last_write.items():
        assert last_flush.get(conn, -1) > n, f"upstream connection {conn} never flushed"
    assert st["flushes_fanned_out"] >= 1
    data = img.read_bytes()
    for i in range(6):
        assert data[i * 40 * 65536:(i + 1) * 40 * 65536] == bytes([i + 1]) * 40 * 65536
