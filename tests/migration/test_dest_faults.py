"""flexnbd's destination fault checklist: ``pynbd listen`` against sources that go away,
misuse the protocol, or compete.

A misbehaving source must never make the destination authoritative, never write outside
the image, and never take the destination down: after each fault a proper
``pynbd serve`` + ``pynbd mirror`` migration completes and the images compare equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynbd.migration import wire
from pynbd.migration.dirty import DEFAULT_CHUNK
from pynbd.migration.msgr2_transport import BusyError, Msgr2Transport
from pynbd.migration.transport import RejectedError
from pynbd.msgr2.auth import AuthNone
from pynbd.msgr2.connection import Connection, ConnectionConfig, Role
from pynbd.msgr2.session import Session
from tests.migration._peers import RawSource, hello_when_free
from tests.migration._procs import (
    Procs,
    compare_images,
    listen,
    make_sparse_image,
    migration_status,
    run_cli,
    sparse_file,
)
from tests.support.processes import Process

SIZE = 8 * 1024 * 1024


def _port(m2: str) -> int:
    return int(m2.rsplit(":", 1)[1])


def _raw_hung_up(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Read (bounded) until the peer closes; True if it did."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 16):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


@pytest.fixture
def dest(procs: Procs, tmp_path: Path) -> Iterator[tuple[Process, str, str, Path]]:
    """A ``pynbd listen`` on an all-zero sparse image: (proc, msgr2 uri, control, image).

    These sources vanish without releasing the copy; a short takeover grace lets the next
    one in quickly (test_hostile.py checks the grace itself)."""
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE)
    d, m2, dctl, _ = listen(procs, dst, extra=["--takeover-after", "0.5"])
    yield d, m2, dctl, dst


def _untouched(d: Process, dctl: str, dst: Path, state: str = "idle") -> None:
    """Alive, not authoritative, in ``state``, the image still all zeros and its size."""
    assert d.proc.poll() is None, d.logs()
    st = migration_status(dctl)
    assert st["authoritative"] is False and st["state"] == state, st
    assert os.path.getsize(dst) == SIZE
    assert dst.read_bytes() == bytes(SIZE)
    assert "Traceback" not in d.logs(), d.logs()


def _proper_migration(procs: Procs, tmp_path: Path, m2: str, dctl: str, dst: Path,
                      seed: int = 1, name: str = "source") -> Path:
    """pynbd serve + pynbd mirror --wait into the destination: completes, images equal."""
    src = tmp_path / f"{name}.img"
    make_sparse_image(src, SIZE, seed=seed, fraction=0.4)
    _s, _uri, ctl = procs.serve(src, name=name)
    r = run_cli(["mirror", *procs.auth(), "--control", ctl, "--to", m2, "--wait"], timeout=60)
    assert r.returncode == 0, r.stderr
    st = migration_status(dctl)
    assert st["authoritative"] is True and st["state"] == "authoritative", st
    assert migration_status(ctl)["authoritative"] is False
    assert compare_images(src, dst) == []
    return src


# --- the source goes away during the handshake ------------------------------------------


def test_source_goes_away_before_and_after_greeting(procs: Procs, tmp_path: Path,
                                                    dest: tuple[Process, str, str, Path]) -> None:
    d, m2, dctl, dst = dest
    port = _port(m2)
    # TCP connect, close at once
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    # close right after the destination's banner arrived
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        assert s.recv(10).startswith(b"ceph v2")
    # send our banner, then close
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(64)
        probe = Connection(Role.CLIENT, ConnectionConfig(auth_client=AuthNone()),
                           Session(lossless=True))
        s.sendall(b"".join(bytes(c) for c in probe.data_to_send()))
    # msgr2 session established, gone before the migration HELLO
    RawSource(port, procs.psk, lossless=True).close()
    RawSource(port, procs.psk, lossless=False).close()
    _untouched(d, dctl, dst)
    # after a successful HELLO: receiving, still not authoritative
    r = RawSource(port, procs.psk, lossless=True)
    assert r.hello()["ok"] is True
    r.close()
    _untouched(d, dctl, dst, state="receiving")
    # the same with the mirror's own transport (once the vanished one's grace passed)
    t = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    for _ in range(100):
        try:
            t.connect(SIZE)
            break
        except BusyError:
            t.close()
            time.sleep(0.1)
            t = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    t.close()
    _untouched(d, dctl, dst, state="receiving")
    assert migration_status(dctl)["sessions"] >= 4
    _proper_migration(procs, tmp_path, m2, dctl, dst)


# --- protocol misuse ----------------------------------------------------------------------


def _write(off: int, data: bytes) -> tuple[int, bytes, bytes]:
    return wire.WRITE, wire.OFFSET.pack(off), data


def _zero(off: int, n: int) -> tuple[int, bytes, bytes]:
    return wire.ZERO, wire.RANGE.pack(off, n), b""


DATA = b"\xa5" * 65536
#: (messages before the one that must end the session: "hello", "query" or None,
#:  the offending message)
MISUSE: dict[str, tuple[str | None, tuple[int, bytes, bytes]]] = {
    "write-before-hello": (None, _write(0, DATA)),
    "zero-before-hello": (None, _zero(0, SIZE)),
    "flush-before-hello": (None, (wire.FLUSH, wire.OFFSET.pack(1), b"")),
    "commit-before-hello": (None, (wire.COMMIT, wire.enc(
        {"token": 1, "size": SIZE, "epoch": 1, "digest": "0" * 64}), b"")),
    "digests-before-hello": (None, (wire.DIGESTS, wire.enc(
        {"token": 1, "chunk": DEFAULT_CHUNK, "first": 0, "count": 4}), b"")),
    "unknown-type-before-hello": (None, (0x5FFF, b"{}", b"")),
    "unknown-type-after-hello": ("hello", (0x5FFF, b"{}", b"")),
    "hello-not-json": (None, (wire.HELLO, b"\xff not json", b"")),
    "hello-json-list": (None, (wire.HELLO, b"[1, 2]", b"")),
    "write-after-refused-hello": ("wrong-size", _write(0, DATA)),
    "write-after-query-hello": ("query", _write(0, DATA)),
    "zero-after-query-hello": ("query", _zero(0, 4096)),
    "write-short-front": ("hello", (wire.WRITE, b"\x01", DATA)),
    "zero-short-front": ("hello", (wire.ZERO, wire.OFFSET.pack(0), b"")),
    "commit-missing-fields": ("hello", (wire.COMMIT, wire.enc({"token": 1}), b"")),
    "write-past-end": ("hello", _write(SIZE - 512, DATA)),
    "write-huge-offset": ("hello", _write(1 << 62, DATA)),
    "zero-past-end": ("hello", _zero(SIZE - 4096, 8192)),
    "zero-huge-length": ("hello", _zero(0, 1 << 62)),
}


@pytest.mark.parametrize("case", list(MISUSE))
def test_protocol_misuse(procs: Procs, tmp_path: Path, dest: tuple[Process, str, str, Path],
                         case: str) -> None:
    d, m2, dctl, dst = dest
    before, (msg_type, front, data) = MISUSE[case]
    r = RawSource(_port(m2), procs.psk)
    try:
        state = "idle"
        if before == "hello":
            assert r.hello()["ok"] is True
            state = "receiving"
        elif before == "query":
            assert r.hello(purpose="query")["ok"] is True
        elif before == "wrong-size":
            reply = r.hello(size=SIZE * 2)
            assert reply["ok"] is False and "size" in reply["error"]
        r.send(msg_type, front, data)
        assert r.hung_up(), f"the destination kept the session after {case}"
    finally:
        r.close()
    _untouched(d, dctl, dst, state=state)
    st = migration_status(dctl)
    assert st["bytes_received"] == 0 and st["zeroes"] == 0, st
    _proper_migration(procs, tmp_path, m2, dctl, dst)


@pytest.mark.parametrize("junk", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"ceph v027" + bytes(64),
                                  os.urandom(4096)], ids=["http", "msgr1", "random"])
def test_garbage_instead_of_banner(procs: Procs, tmp_path: Path,
                                   dest: tuple[Process, str, str, Path], junk: bytes) -> None:
    d, m2, dctl, dst = dest
    with socket.create_connection(("127.0.0.1", _port(m2)), timeout=5) as s:
        s.sendall(junk)
        assert _raw_hung_up(s)
    # garbage after a correct handshake: frames that fail their checks
    r = RawSource(_port(m2), procs.psk)
    try:
        r.sock.sendall(os.urandom(8192))
        assert r.hung_up()
    finally:
        r.close()
    _untouched(d, dctl, dst)
    _proper_migration(procs, tmp_path, m2, dctl, dst)


# --- the source goes away mid-write --------------------------------------------------------


def test_disconnect_mid_write(procs: Procs, tmp_path: Path,
                              dest: tuple[Process, str, str, Path]) -> None:
    d, m2, dctl, dst = dest
    port = _port(m2)
    for lossless in (False, True):
        r = hello_when_free(port, procs.psk, lossless=lossless)
        r.send_part(*_write(1 << 20, b"\x5a" * (1 << 20)), fraction=0.5)
        r.close()
    # what never arrived whole was never written
    _untouched(d, dctl, dst, state="receiving")
    assert migration_status(dctl)["bytes_received"] == 0
    # a whole WRITE then a cut: written, but that is no completion
    r = hello_when_free(port, procs.psk, lossless=True)
    r.send(*_write(0, DATA))
    r.send_part(*_write(len(DATA), DATA), fraction=0.3)
    r.close()
    d.wait_for(lambda: migration_status(dctl)["bytes_received"] == len(DATA), "the write")
    st = migration_status(dctl)
    assert st["authoritative"] is False and st["state"] == "receiving", st
    _proper_migration(procs, tmp_path, m2, dctl, dst)


# --- two sources at once -------------------------------------------------------------------


def _image_digest(data: bytes) -> str:
    from pynbd.migration.digests import image_digest

    chunks = b"".join(hashlib.sha256(data[i:i + DEFAULT_CHUNK]).digest()
                      for i in range(0, len(data), DEFAULT_CHUNK))
    return image_digest(chunks, len(data), DEFAULT_CHUNK)


def _send_image(t: Msgr2Transport, data: bytes, step: int = 1 << 20) -> None:
    for off in range(0, len(data), step):
        t.write(off, data[off:off + step])


def test_two_sources_at_once(procs: Procs, tmp_path: Path,
                             dest: tuple[Process, str, str, Path]) -> None:
    """One source owns the copy: a second one (with the key) is refused while the first
    is connected, gets in once the first released the copy, and then the first one's
    writes cannot land any more; the second one's verified commit makes the destination
    authoritative with exactly its data."""
    d, m2, dctl, dst = dest
    port = _port(m2)
    good = os.urandom(SIZE)
    older = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    newer = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    try:
        older.connect(SIZE)
        older.write(0, b"\x11" * (1 << 20))
        older.flush()
        with pytest.raises(BusyError, match="another source session owns this copy"):
            newer.connect(SIZE)
        newer.close()
        older.write(1 << 20, b"\x11" * (1 << 20))  # still the owner
        older.flush()
        older.close()  # releases the copy
        newer = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
        newer.connect(SIZE)
        _send_image(newer, good)
        newer.flush()
        # and now the first one is the one refused
        again = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
        try:
            with pytest.raises(BusyError):
                again.connect(SIZE)
        finally:
            again.close()
        newer.commit(SIZE, 1, _image_digest(good))
    finally:
        older.close()
        newer.close()
    st = migration_status(dctl)
    assert st["authoritative"] is True and st["epoch"] == 1, st
    assert st["hellos_refused"] == 2, st
    assert dst.read_bytes() == good
    # a third source is refused: the destination took over
    late = Msgr2Transport("127.0.0.1", port, psk=procs.psk)
    try:
        with pytest.raises(RejectedError, match="authoritative"):
            late.connect(SIZE)
    finally:
        late.close()
    assert d.proc.poll() is None


def test_two_mirrors_at_once(procs: Procs, tmp_path: Path,
                             dest: tuple[Process, str, str, Path]) -> None:
    """Two real sources mirror into one destination at the same time: exactly one wins,
    the destination holds exactly its image, the other one stays authoritative."""
    d, m2, dctl, dst = dest
    srcs, ctls, mirrors = [], [], []
    for i in range(2):
        src = tmp_path / f"src{i}.img"
        make_sparse_image(src, SIZE, seed=40 + i, fraction=0.4)
        _s, _uri, ctl = procs.serve(src, name=f"source{i}")
        srcs.append(src)
        ctls.append(ctl)
    for i in range(2):
        mirrors.append(procs.mirror(["--control", ctls[i], "--to",
                                     m2, "--wait", "--max-speed", "8M", "--max-attempts", "8"],
                                     f"mirror{i}"))
    codes = [m.proc.wait(60) for m in mirrors]
    assert 0 in codes and codes != [0, 0], [m.logs() for m in mirrors]
    winner = codes.index(0)
    loser = 1 - winner
    assert codes[loser] in (11, 13), mirrors[loser].logs()
    assert migration_status(ctls[winner])["authoritative"] is False
    assert migration_status(ctls[loser])["authoritative"] is True
    st = migration_status(dctl)
    assert st["authoritative"] is True, st
    assert compare_images(srcs[winner], dst) == []
    assert d.proc.poll() is None


# --- SIGTERM of the destination ------------------------------------------------------------


def test_sigterm_destination(procs: Procs, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    sparse_file(dst, SIZE * 2)
    src = tmp_path / "src.img"
    make_sparse_image(src, SIZE * 2, seed=5, fraction=0.5)
    # idle, with a half-open handshake and a session that stopped mid-frame: exits at once
    d0, m2, _dctl0, _ = listen(procs, dst, name="dest0")
    port = _port(m2)
    hanging = socket.create_connection(("127.0.0.1", port), timeout=5)
    r = RawSource(port, procs.psk, lossless=True)
    r.request(wire.HELLO, {"size": SIZE * 2, "purpose": "copy"})
    r.send_part(*_write(0, DATA), fraction=0.5)
    d0.kill(signal.SIGTERM)
    assert d0.proc.wait(20) == 0, d0.logs()
    hanging.close()
    r.close()
    # mid-transfer
    _s, _uri, ctl = procs.serve(src)
    d1, m2, dctl, _ = listen(procs, dst, name="dest1")
    port = _port(m2)
    mirror = procs.mirror(["--control", ctl, "--to", m2, "--wait",
                           "--max-speed", "6M", "--max-attempts", "20"], "mirror")
    d1.wait_for(lambda: migration_status(dctl)["bytes_received"] > 0, "data")
    d1.kill(signal.SIGTERM)
    assert d1.proc.wait(20) == 0, d1.logs()
    rec = json.loads(Path(str(dst) + ".pynbd-migration.json").read_text())
    assert rec["state"] == "receiving", rec
    st = migration_status(ctl)
    assert st["authoritative"] is True and st["result"] is None, st
    # back on the same port: the mirror resumes and completes
    d2 = procs.pynbd(["listen", str(dst), *procs.auth(), "--bind", "127.0.0.1", "--port", str(port),
                      "--control", str(tmp_path / "dest2.ctl")], "dest2")
    d2.first_line()
    assert mirror.proc.wait(60) == 0, mirror.logs()
    assert migration_status(str(tmp_path / "dest2.ctl"))["authoritative"] is True
    assert compare_images(src, dst) == []


# --- complete transfer, then misuse of the new owner -----------------------------------------


def test_complete_transfer_then_misuse_refused(procs: Procs, tmp_path: Path,
                                               dest: tuple[Process, str, str, Path]) -> None:
    d, m2, dctl, dst = dest
    src = _proper_migration(procs, tmp_path, m2, dctl, dst)
    epoch = migration_status(dctl)["epoch"]
    port = _port(m2)
    # no HELLO; a query HELLO (accepted) then WRITE or ZERO; each ends the session
    for hello, msg in ((None, _write(0, DATA)), ("query", _write(0, DATA)),
                       ("query", _zero(0, SIZE))):
        r = RawSource(port, procs.psk)
        try:
            if hello is not None:
                assert r.hello(purpose=hello)["ok"] is True
            r.send(*msg)
            assert r.hung_up()
        finally:
            r.close()
    # a copy HELLO is refused outright; a COMMIT from a session that does not own the copy
    # (a query) ends that session; OUTCOME tells the truth
    r = RawSource(port, procs.psk)
    try:
        reply = r.hello()
        assert reply["ok"] is False and "authoritative" in reply["error"]
        q = RawSource(port, procs.psk)
        try:
            assert q.hello(purpose="query")["ok"] is True
            q.send(wire.COMMIT, wire.enc({"token": 1, "size": SIZE, "epoch": epoch + 1,
                                          "digest": _image_digest(bytes(SIZE))}))
            assert q.hung_up()
        finally:
            q.close()
        q = RawSource(port, procs.psk)
        try:
            assert q.hello(purpose="query")["ok"] is True
            assert q.request(wire.OUTCOME, {"epoch": epoch})["committed"] is True
        finally:
            q.close()
    finally:
        r.close()
    st = migration_status(dctl)
    assert st["authoritative"] is True and st["epoch"] == epoch, st
    assert compare_images(src, dst) == []
    assert d.proc.poll() is None
