"""Fault injection: a relay that cuts the connection; a destination restart mid-copy."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.migration._procs import (
    Procs,
    compare_images,
    listen,
    make_sparse_image,
    migration_status,
    run_cli,
    sparse_file,
)
from tests.migration._relay import CuttingRelay

SIZE = 128 * 1024 * 1024


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_relay_cuts_connection_resume_not_restart(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=11, fraction=0.5)
    sparse_file(dst, SIZE)
    _s, _uri, ctl = procs.serve(src)
    _d, m2, dctl, _ = listen(procs, dst)
    port = int(m2.rsplit(":", 1)[1])
    relay = CuttingRelay(("127.0.0.1", port), seed=5, max_cuts=6)
    try:
        r = run_cli(["mirror", *procs.auth(), "--control", ctl, "--to", relay.uri, "--wait",
                     "--max-attempts", "10"], timeout=180)
        assert r.returncode == 0, r.stderr
        assert relay.cuts >= 3, relay.cuts
        data = _allocated(src)
        resent = relay.upstream_bytes - data
        # resume, not restart: what went over the wire again is a small part of the image
        assert resent < SIZE // 4, (relay.upstream_bytes, data, relay.cuts)
        d = migration_status(dctl)
        assert d["bytes_received"] < data + SIZE // 4
        assert d["authoritative"] is True
        assert compare_images(src, dst) == []
    finally:
        relay.close()


def test_destination_restart_resumes_from_digests(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=12, fraction=0.25)
    sparse_file(dst, SIZE)
    _s, _uri, ctl = procs.serve(src)
    d1, m2, dctl, _ = listen(procs, dst, name="dest1")
    port = m2.rsplit(":", 1)[1]
    data = _allocated(src)
    mirror = procs.mirror(["--control", ctl, "--to", m2, "--wait",
                           "--max-speed", "16M", "--max-attempts", "20"], "mirror")
    for _ in range(2000):
        if migration_status(dctl)["bytes_received"] > data // 2:
            break
        time.sleep(0.01)
    before = migration_status(dctl)["bytes_received"]
    d1.kill(signal.SIGKILL)
    d1.proc.wait(10)
    # the same port again, so the source's reconnects find it
    d2 = procs.pynbd(["listen", str(dst), *procs.auth(), "--bind", "127.0.0.1", "--port", port,
                      "--control", str(tmp_path / "dest2.ctl")], "dest2")
    d2.first_line()
    assert mirror.proc.wait(120) == 0, mirror.logs()
    after = migration_status(str(tmp_path / "dest2.ctl"))
    assert after["authoritative"] is True and after["digest_requests"] >= 1
    # the second destination received far less than everything
    assert after["bytes_received"] < data - before // 2, (before, after["bytes_received"], data)
    st = migration_status(ctl)
    assert st["attempts"] >= 2 and st["authoritative"] is False
    assert compare_images(src, dst) == []
