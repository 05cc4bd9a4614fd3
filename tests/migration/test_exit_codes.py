"""Exit codes of ``pynbd mirror``, PSK/secure transport, --unlink, and a destination that
refuses a partial copy or a bogus COMMIT."""

from __future__ import annotations

from pathlib import Path

import pytest

from pynbd.migration.transport import RejectedError
from tests.migration._procs import (
    Procs,
    compare_images,
    listen,
    make_sparse_image,
    migration_status,
    run_cli,
    sparse_file,
)
from tests.support.net import free_port

SIZE = 16 * 1024 * 1024


def test_cannot_connect_and_size_mismatch(procs: Procs, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_sparse_image(src, SIZE, seed=1)
    _s, _uri, ctl = procs.serve(src)
    r = run_cli(["mirror", *procs.auth(), "--control", ctl, "--to",
                 f"msgr2://127.0.0.1:{free_port()}", "--wait"])
    assert r.returncode == 10, r.stderr
    r = run_cli(["mirror", "--control", ctl, "--to",
                 f"nbd+unix:///?socket={tmp_path}/nothing.sock", "--wait"])
    assert r.returncode == 10, r.stderr
    small = tmp_path / "small.img"
    sparse_file(small, SIZE // 2)
    _d, m2, _dctl, _ = listen(procs, small)
    r = run_cli(["mirror", *procs.auth(), "--control", ctl, "--to", m2, "--wait"])
    assert r.returncode == 11, r.stderr
    assert "size" in r.stderr.decode()
    r = run_cli(["mirror", "--control", ctl, "--to", "ftp://x", "--wait"])
    assert r.returncode == 1
    st = migration_status(ctl)
    assert st["authoritative"] is True


def test_psk_secure_and_unlink(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=2)
    copy = tmp_path / "expected.img"
    copy.write_bytes(src.read_bytes())
    sparse_file(dst, SIZE)
    key, wrong = tmp_path / "psk", tmp_path / "wrong"
    key.write_bytes(b"0123456789abcdef0123456789abcdef\n")
    wrong.write_bytes(b"fedcba9876543210fedcba9876543210\n")
    _s, _uri, ctl = procs.serve(src)
    _d, m2, dctl, _ = listen(procs, dst, auth=["--psk-file", str(key)])
    r = run_cli(["mirror", "--control", ctl, "--to", m2, "--wait", "--psk-file", str(wrong),
                 "--secure"])
    assert r.returncode == 10, r.stderr
    r = run_cli(["mirror", "--control", ctl, "--to", m2, "--wait", "--psk-file", str(key),
                 "--secure", "--unlink"])
    assert r.returncode == 0, r.stderr
    assert not src.exists()
    assert compare_images(copy, dst) == []
    assert migration_status(dctl)["authoritative"] is True
    # a second mirror to an authoritative destination is rejected; the source stepped down
    r = run_cli(["mirror", "--control", ctl, "--to", m2, "--wait", "--psk-file", str(key)])
    assert r.returncode == 1 and "stepped down" in r.stderr.decode()


def test_destination_refuses_partial_copy_and_bogus_commit(procs: Procs,
                                                           tmp_path: Path) -> None:
    from pynbd.migration.msgr2_transport import Msgr2Transport

    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst)
    host, port = m2[len("msgr2://"):].rsplit(":", 1)
    t = Msgr2Transport(host, int(port), psk=procs.psk)
    try:
        t.connect(SIZE)
        t.write(0, b"8 bytes!" * 8192)
        t.flush()
        with pytest.raises(RejectedError, match="digest"):
            t.commit(SIZE, 1, "0" * 64)
    finally:
        t.close()
    st = migration_status(dctl)
    assert st["authoritative"] is False and st["commits_refused"] == 1
    assert st["state"] == "receiving"
    assert d.proc.poll() is None  # a closed session is not completion either


def test_read_write_one_off_ranges(procs: Procs, tmp_path: Path) -> None:
    img = tmp_path / "img"
    sparse_file(img, SIZE)
    _s, uri, ctl = procs.serve(img)
    payload = bytes(range(256)) * 300
    r = run_cli(["write", uri, "--from", "12345"], stdin=payload)
    assert r.returncode == 0, r.stderr
    r = run_cli(["read", "--control", ctl, "--from", "12345", "--size", str(len(payload))])
    assert r.returncode == 0 and r.stdout == payload
    assert img.read_bytes()[12345:12345 + len(payload)] == payload
    r = run_cli(["write", uri, "--from", str(SIZE - 10)], stdin=b"x" * 100)
    assert r.returncode != 0
    r = run_cli(["read", uri, "--from", str(SIZE), "--size", "1"])
    assert r.returncode != 0
    r = run_cli(["write", uri, "--from", "0", "--size", "100"], stdin=b"short")
    assert r.returncode != 0
    r = run_cli(["read", f"nbd+unix:///?socket={tmp_path}/none.sock", "--size", "1"])
    assert r.returncode != 0
