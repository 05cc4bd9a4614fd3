"""A hostile peer against ``pynbd listen`` (issue 11): no key, a wrong key, the right key
replaying another session's HELLO, strangers connecting during a running mirror. The
destination must not let any of them write, commit or learn the image's size, epoch,
state or digests, and afterwards exactly one copy is authoritative and the destination
holds nothing but the real source's data.

The hostile peers are the project's own msgr2 code: the sans-I/O ``Connection`` on a
socket (``RawSource``, ``try_connect``) and the mirror's ``Msgr2Transport``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from pynbd.migration import wire
from pynbd.migration.digests import image_digest
from pynbd.migration.dirty import DEFAULT_CHUNK
from pynbd.migration.msgr2_transport import BusyError, Lease, Msgr2Transport
from pynbd.migration.transport import ConnectFailed, TransportError
from pynbd.msgr2.events import MessageReceived, SessionEstablished
from tests.migration._peers import RawSource, try_connect
from tests.migration._procs import (
    Procs,
    Writer,
    compare_images,
    ctl,
    listen,
    make_sparse_image,
    migration_status,
    run_cli,
    sparse_file,
)
from tests.migration._relay import CuttingRelay
from tests.support.net import read_until_eof

SIZE = 8 * 1024 * 1024
WRONG_KEY = b"this is not the key, but long enough"


def _port(m2: str) -> int:
    return int(m2.rsplit(":", 1)[1])


def _digest(data: bytes) -> str:
    chunks = b"".join(hashlib.sha256(data[i:i + DEFAULT_CHUNK]).digest()
                      for i in range(0, len(data), DEFAULT_CHUNK))
    return image_digest(chunks, len(data), DEFAULT_CHUNK)


def _send_image(t: Msgr2Transport, data: bytes, step: int = 1 << 20) -> None:
    for off in range(0, len(data), step):
        t.write(off, data[off:off + step])


def _listen_status(dctl: str) -> dict[str, object]:
    reply = ctl(dctl, {"cmd": "status"})
    assert reply["ok"], reply
    st: dict[str, object] = reply["status"]["listen"]
    return st


def _unauthenticated_learns_nothing(port: int, key: bytes | None) -> None:
    """A peer with ``key`` (None or wrong) gets no session and no message."""
    for lossless in (False, True):
        events, err = try_connect(port, key, lossless=lossless)
        assert err is not None, "an unauthenticated peer got a msgr2 session"
        assert not any(isinstance(e, (SessionEstablished, MessageReceived)) for e in events)
    t = Msgr2Transport("127.0.0.1", port, psk=key)
    try:
        with pytest.raises(ConnectFailed):
            t.connect(SIZE, purpose="query")
        assert t.hello == {}
    finally:
        t.close()


# --- the command line ----------------------------------------------------------------------


def test_listen_refuses_to_start_without_a_key(procs: Procs, tmp_path: Path) -> None:
    img = tmp_path / "img"
    sparse_file(img, SIZE)
    for args in (["--bind", "0.0.0.0"], []):
        r = run_cli(["listen", str(img), "--port", "0", *args], timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert "refusing to listen" in err and "without authentication" in err, err
        assert "--psk-file" in err and "--insecure" in err, err
        assert r.stdout == b""  # never listened, never printed an address
    short = tmp_path / "short"
    short.write_bytes(b"0123456789\n")
    for args, text in (
            (["--secure", "--insecure"], "--secure needs --psk-file"),
            (["--psk-file", str(short)], "at least 16 bytes"),
            (["--psk-file", str(tmp_path / "missing")], "cannot read the key file"),
            ([*procs.auth(), "--serve-port", "0", "--serve-bind", "0.0.0.0"],
             "refusing to serve the image over NBD on 0.0.0.0"),
            (["--insecure", "--allow", "not-a-network"], "invalid access list entry"),
            (["--insecure", "--takeover-after", "-1"], "--takeover-after")):
        r = run_cli(["listen", str(img), "--port", "0", *args], timeout=60)
        assert r.returncode == 2 and text in r.stderr.decode(), (args, r.stderr)
    assert not Path(str(img) + ".pynbd-migration.json").exists()


def test_insecure_listens_on_loopback_and_says_so(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=60, fraction=0.4)
    sparse_file(dst, SIZE)
    dctl = str(tmp_path / "dest.ctl")
    d = procs.pynbd(["listen", str(dst), "--port", "0", "--insecure", "--control", dctl],
                    "dest")
    m2 = d.first_line()
    assert m2.startswith("msgr2://127.0.0.1:"), m2
    d.wait_for(lambda: os.path.exists(dctl), "control socket")
    st = _listen_status(dctl)
    assert st["bind"] == "127.0.0.1" and st["authentication"] == "none", st
    assert "no authentication (--insecure)" in d.logs()
    # the mirror needs --insecure too to talk to it
    _s, _uri, sctl = procs.serve(src)
    r = run_cli(["mirror", "--control", sctl, "--to", m2, "--wait"])
    assert r.returncode == 1 and "without authentication" in r.stderr.decode(), r.stderr
    r = run_cli(["mirror", "--control", sctl, "--to", m2, "--wait", "--insecure"])
    assert r.returncode == 0, r.stderr
    assert compare_images(src, dst) == []
    # --insecure with an explicit non-loopback --bind starts, and says so loudly
    other = tmp_path / "other.img"
    sparse_file(other, SIZE)
    loud = procs.pynbd(["listen", str(other), "--port", "0", "--insecure", "--bind",
                        "0.0.0.0"], "loud")
    loud.first_line()
    loud.wait_for(lambda: "UNAUTHENTICATED" in loud.logs(), "the warning")


def test_mirror_refuses_destinations_nobody_authenticates(procs: Procs,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_sparse_image(src, SIZE, seed=61)
    _s, _uri, sctl = procs.serve(src)
    # refused before any connection is attempted (192.0.2.0/24 is never reached)
    for to, extra, text in (
            ("msgr2://127.0.0.1:1", [], "without authentication"),
            ("msgr2://127.0.0.1:1", ["--secure"], "--secure needs --psk-file"),
            ("nbd://192.0.2.1:10809/", [], "not loopback"),
            ("nbds://192.0.2.1:10809/?tls-verify-peer=0", [], "not loopback")):
        r = run_cli(["mirror", "--control", sctl, "--to", to, "--wait", *extra])
        assert r.returncode == 1 and text in r.stderr.decode(), (to, r.stderr)
    st = migration_status(sctl)
    assert st["authoritative"] is True and st["role"] == "none", st
    # a destination that only accepts secure mode: crc is refused, secure works
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    _d, m2, dctl, _ = listen(procs, dst, extra=["--secure"])
    r = run_cli(["mirror", *procs.auth(), "--control", sctl, "--to", m2, "--wait"])
    assert r.returncode == 10, r.stderr
    r = run_cli(["mirror", *procs.auth(), "--secure", "--control", sctl, "--to", m2, "--wait"])
    assert r.returncode == 0, r.stderr
    assert migration_status(dctl)["authoritative"] is True
    assert compare_images(src, dst) == []


# --- no key, a wrong key --------------------------------------------------------------------


def test_peers_without_the_key_learn_nothing_and_change_nothing(procs: Procs,
                                                                tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst)
    port = _port(m2)
    for key in (None, WRONG_KEY):
        _unauthenticated_learns_nothing(port, key)
    # a wrong key in secure mode, and a peer that asks for secure mode without a key
    events, err = try_connect(port, WRONG_KEY, secure=True)
    assert err is not None and not any(isinstance(e, MessageReceived) for e in events)
    st = migration_status(dctl)
    assert st["sessions"] == 0 and st["state"] == "idle" and st["bytes_received"] == 0, st
    assert st["owner"] is None
    assert dst.read_bytes() == bytes(SIZE)
    assert not Path(str(dst) + ".pynbd-migration.json").exists()
    d.wait_for(lambda: int(str(_listen_status(dctl)["failed_handshakes"])) >= 7,
               "every failed handshake to be counted")
    assert "msgr2 authentication failed" in d.logs()
    assert d.proc.poll() is None and "Traceback" not in d.logs()


# --- the right key, replaying another session's HELLO ---------------------------------------


def _captured_copy_hellos(recorded: bytes | bytearray) -> list[bytes]:
    """The front segments of the copy HELLOs in a captured crc-mode byte stream."""
    out: list[bytes] = []
    pos = 0
    while True:
        i = recorded.find(b'{"purpose": "copy"', pos)
        if i < 0:
            return out
        j = recorded.index(b"}", i)
        out.append(bytes(recorded[i:j + 1]))
        pos = j


def test_replayed_hello_cannot_take_over(procs: Procs, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst)
    port = _port(m2)
    relay = CuttingRelay(("127.0.0.1", port), seed=1, max_cuts=0, record=True)
    good = os.urandom(SIZE)
    lease = Lease()
    first = Msgr2Transport("127.0.0.1", relay.port, psk=procs.psk, lease=lease)
    second = Msgr2Transport("127.0.0.1", relay.port, psk=procs.psk, lease=lease)
    hostile: RawSource | None = None
    try:
        first.connect(SIZE)
        first.write(0, good[:1 << 20])
        first.flush()
        # the same source on a new msgr2 session (as after its old one failed): it proves
        # the lease and takes its own copy over at once
        second.connect(SIZE)
        with pytest.raises(TransportError):
            for _ in range(100):
                first.write(1 << 20, b"\x22" * (1 << 20))
                first.flush()
                time.sleep(0.05)
        captured = [h for stream in relay.recorded for h in _captured_copy_hellos(stream)]
        assert len(captured) == 2, captured
        assert b'"resume"' not in captured[0] and b'"resume"' in captured[1]
        assert json.loads(captured[1])["resume"]
        # an attacker with the key replays both HELLOs byte for byte on its own session,
        # then forges a proof: all refused, no lease handed out, no write accepted
        hostile = RawSource(port, procs.psk, lossless=True)
        for front in captured:
            reply = hostile.request_raw(wire.HELLO, front)
            assert reply["ok"] is False and reply["busy"] is True, reply
            assert "lease" not in reply
        reply = hostile.hello_reply(resume="00" * 32)
        assert reply["ok"] is False and reply["busy"] is True, reply
        hostile.send(wire.WRITE, wire.OFFSET.pack(0), b"\x66" * 65536)
        assert hostile.hung_up()
        # the real source goes on and commits exactly its data
        _send_image(second, good)
        second.flush()
        second.commit(SIZE, 1, _digest(good))
    finally:
        if hostile is not None:
            hostile.close()
        first.close()
        second.close()
        relay.close()
    st = migration_status(dctl)
    assert st["authoritative"] is True and st["epoch"] == 1, st
    assert st["hellos_refused"] == 3 and st["takeovers"] == 1, st
    assert dst.read_bytes() == good
    assert d.proc.poll() is None


def test_owner_is_replaced_only_by_itself_release_or_grace(procs: Procs,
                                                           tmp_path: Path) -> None:
    """While the owner's connection is gone but its grace (30 s) is not over, another
    source with the key is refused; the owner itself (its lease, on a new session) gets
    back in at once; after an explicit RELEASE anyone with the key may start."""
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst)
    port = _port(m2)
    owner = RawSource(port, procs.psk, lossless=True)
    reply = owner.hello()
    assert reply["ok"] is True
    lease = bytes.fromhex(reply["lease"])
    owner.send(wire.WRITE, wire.OFFSET.pack(0), b"\x11" * 65536)
    owner.close()  # gone without a RELEASE
    d.wait_for(lambda: (migration_status(dctl)["owner"] or {}).get("connected") is False,
               "the owner's connection to be gone")
    stranger = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    try:
        with pytest.raises(BusyError, match="gone for"):
            stranger.connect(SIZE)
    finally:
        stranger.close()
    back = RawSource(port, procs.psk, lossless=True)
    try:
        reply = back.hello_reply(resume=wire.resume_proof(lease, *back.cookies))
        assert reply["ok"] is True, reply
        assert migration_status(dctl)["takeovers"] == 1
        back.send(wire.WRITE, wire.OFFSET.pack(65536), b"\x22" * 65536)
        back.release()
        d.wait_for(lambda: migration_status(dctl)["owner"] is None, "the release")
        # once released, whoever has the key may start a copy
        later = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
        try:
            later.connect(SIZE)
        finally:
            later.close()
        # a message only the owner may send, from the session that released: refused
        back.send(wire.FLUSH, wire.OFFSET.pack(1))
        assert back.hung_up()
    finally:
        back.close()
    data = dst.read_bytes()
    assert data[:65536] == b"\x11" * 65536 and data[65536:131072] == b"\x22" * 65536
    assert migration_status(dctl)["authoritative"] is False


# --- strangers during a running mirror -----------------------------------------------------


def test_strangers_during_a_running_mirror(procs: Procs, tmp_path: Path) -> None:
    size = 16 * 1024 * 1024
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, size, seed=62, fraction=0.5)
    sparse_file(dst, size)
    _s, uri, sctl = procs.serve(src)
    d, m2, dctl, _ = listen(procs, dst)
    port = _port(m2)
    w = Writer(uri, size, seed=63, rate=256 * 1024)
    w.start()
    mirror = procs.mirror(["--control", sctl, "--to", m2, "--wait", "--max-speed", "256K"])
    d.wait_for(lambda: migration_status(dctl)["bytes_received"] > 0, "the copy to start")
    assert migration_status(sctl)["state"] in ("copying", "zeroing"), migration_status(sctl)
    # no key, a wrong key: nothing
    for key in (None, WRONG_KEY):
        _unauthenticated_learns_nothing(port, key)
    # the right key: a second source is refused while the mirror owns the copy
    t = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    try:
        with pytest.raises(BusyError, match="another source session owns this copy"):
            t.connect(size)
    finally:
        t.close()
    # a query is answered (the peer is authenticated), but nothing only the owner may do
    queried = False
    for msg_type, front in (
            (wire.WRITE, wire.OFFSET.pack(0)),
            (wire.ZERO, wire.RANGE.pack(0, size)),
            (wire.FLUSH, wire.OFFSET.pack(1)),
            (wire.DIGESTS, wire.enc({"token": 1, "chunk": DEFAULT_CHUNK, "first": 0,
                                     "count": 4})),
            (wire.COMMIT, wire.enc({"token": 1, "size": size, "epoch": 1,
                                    "digest": _digest(bytes(size))})),
            (wire.RELEASE, wire.enc({"token": 1}))):
        h = RawSource(port, procs.psk)
        try:
            reply = h.hello_reply(size=size, resume="ab" * 32)
            assert reply["ok"] is False and reply["busy"] is True, reply
            if not queried:
                q = h.hello_reply(size=size, purpose="query")
                assert q["ok"] is True and "lease" not in q
                # nor may it declare the connected owner's epochs not committed
                o = h.request(wire.OUTCOME, {"epoch": 1})
                assert o["busy"] is True and o["committed"] is None, o
                queried = True
            h.send(msg_type, front, b"\x66" * 65536 if msg_type == wire.WRITE else b"")
            assert h.hung_up(), msg_type
        finally:
            h.close()
    st = migration_status(dctl)
    assert st["authoritative"] is False and st["aborted_epochs"] == [] and \
        st["commits_refused"] == 0, st
    # let the real mirror finish
    assert ctl(sctl, {"cmd": "mirror-speed", "bps": 0})["ok"]
    assert mirror.proc.wait(120) == 0, mirror.logs()
    w.stop_event.set()
    w.join(30)
    s, dd = migration_status(sctl), migration_status(dctl)
    assert s["authoritative"] is False and s["state"] == "completed", s
    assert dd["authoritative"] is True and dd["epoch"] == 1, dd
    assert dd["hellos_refused"] >= 7 and dd["takeovers"] == 0, dd
    assert compare_images(src, dst) == []
    assert w.check_in(dst) == []


# --- the access list and the refusal log ----------------------------------------------------


def test_access_list_is_checked_before_any_byte(procs: Procs, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    _d, m2, dctl, _ = listen(procs, dst, extra=["--allow", "127.0.0.2/32"])
    port = _port(m2)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert read_until_eof(s) == b""  # not even the msgr2 banner
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=("127.0.0.2", 0)) as s:
        s.settimeout(5)
        assert s.recv(16).startswith(b"ceph v2")
    t = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    try:
        with pytest.raises(ConnectFailed):
            t.connect(SIZE)
    finally:
        t.close()
    st = _listen_status(dctl)
    assert st["refused_by_access_list"] == 2 and st["access_list"] == ["127.0.0.2/32"], st
    assert migration_status(dctl)["sessions"] == 0
    other = tmp_path / "other.img"
    sparse_file(other, SIZE)
    _d2, m2b, _dctl2, _ = listen(procs, other, name="deny", extra=["--default-deny"])
    with socket.create_connection(("127.0.0.1", _port(m2b)), timeout=5) as s:
        assert read_until_eof(s) == b""


def test_refusal_log_stays_small_under_a_flood(procs: Procs, tmp_path: Path) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=64)
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst, extra=["--allow", "127.0.0.1/32"])
    port = _port(m2)
    addresses = [f"127.0.0.{i}" for i in range(2, 52)]
    started = time.monotonic()
    for i in range(500):
        with socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(addresses[i % 50], 0)) as s:
            assert read_until_eof(s) == b""
    for _ in range(40):
        _events, err = try_connect(port, WRONG_KEY)
        assert err is not None
    # the real source still gets through
    _s, _uri, sctl = procs.serve(src)
    r = run_cli(["mirror", *procs.auth(), "--control", sctl, "--to", m2, "--wait"])
    assert r.returncode == 0, r.stderr
    st = _listen_status(dctl)
    assert st["refused_by_access_list"] == 500, st
    assert int(str(st["failed_handshakes"])) >= 40, st
    elapsed = int(time.monotonic() - started)
    d.kill(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    log = d.stderr
    refused = [ln for ln in log.splitlines() if "refused" in ln]
    summaries = [ln for ln in refused if re.search(r"refused \d+ connections from", ln)]
    # one line per address (50, and 127.0.0.1 for its failed authentications) per minute,
    # and summaries of the rest: not one line per refusal
    assert summaries and summaries[-1].split("refused ")[1].split()[0].isdigit(), log
    assert 51 <= len(refused) - len(summaries) <= 51 * (1 + elapsed // 60 + 1), log
    assert len(refused) < 540 // 4 and len(log) < 64 * 1024, len(log)
    assert compare_images(src, dst) == []


def test_refusal_log_is_bounded_per_interval() -> None:
    """The pure rate limiter: one line per address per interval, at most max_addresses
    lines, and a summary that counts the rest."""
    from pynbd.migration.listener import RefusalLog

    rl = RefusalLog(interval=60.0, max_addresses=100)
    lines = []
    for i in range(20000):
        line = rl.refused(f"10.0.{i % 500 // 256}.{i % 256}", "test", now=i * 0.001)
        if line is not None:
            lines.append(line)
    assert len(lines) == 100
    summary = rl.summary(now=20.0)
    assert summary is not None and "refused 20000 connections from 100 addresses" in summary
    assert "19900 connections" not in summary and "(and more addresses" in summary
    assert rl.summary(now=21.0) is None
    # after the interval an address is logged again, once
    assert rl.refused("10.0.0.1", "test", now=100.0) is not None
    assert rl.refused("10.0.0.1", "test", now=101.0) is None


def test_silent_connections_do_not_lock_out_the_source(procs: Procs, tmp_path: Path) -> None:
    """300 connections that never finish the msgr2 handshake, held open: the oldest are
    dropped beyond 128, the real source gets through, and the log stays small."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_sparse_image(src, SIZE, seed=65)
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst)
    port = _port(m2)
    silent: list[socket.socket] = []
    try:
        for i in range(300):
            silent.append(socket.create_connection(
                ("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{2 + i % 20}", 0)))
        d.wait_for(lambda: int(str(_listen_status(dctl)["handshakes_evicted"])) >= 172,
                   "the oldest silent connections to be dropped")
        assert int(str(_listen_status(dctl)["handshaking"])) <= 128
        _s, _uri, sctl = procs.serve(src)
        r = run_cli(["mirror", *procs.auth(), "--control", sctl, "--to", m2, "--wait"])
        assert r.returncode == 0, r.stderr
    finally:
        for s in silent:
            s.close()
    assert compare_images(src, dst) == []
    assert migration_status(dctl)["authoritative"] is True
    refused = [ln for ln in d.stderr.splitlines() if "refused" in ln]
    # per address: dropped in the handshake, and left before completing it (when the test
    # closed them), and a summary
    assert len(refused) <= 2 * 20 + 2, "\n".join(refused)
