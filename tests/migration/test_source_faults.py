"""flexnbd's source fault checklist: ``pynbd mirror --to nbd://...`` against a scripted NBD
server that misbehaves at a chosen point.

Every case checks the documented exit code, an error message that names the problem, and
that the source stays authoritative: not paused, serving its clients, data intact. Faults
during the transfer are then tried once more with the fault happening only on the first
connection: the mirror reconnects, re-sends what was not confirmed, and the copy on the
fake destination compares equal to the source.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    Cmd,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from tests.migration._procs import (
    Procs,
    Writer,
    compare_images,
    migration_status,
    run_cli,
    sparse_file,
    stepped_down_error,
)
from tests.migration._relay import stop_listener
from tests.support.images import make_image

SIZE = 8 * 1024 * 1024
#: seconds the source waits for the fake's greeting or for a reply (env of pynbd serve)
NBD_TIMEOUT = "1.5"
SERVE_ENV = {"PYNBD_MIGRATION_NBD_TIMEOUT": NBD_TIMEOUT}

GREETING = struct.Struct(">QQH")
OPTION_REQUEST = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
         | TransmissionFlag.SEND_WRITE_ZEROES)

#: faults before the transmission phase: the first connection fails, no retry
HANDSHAKE_FAULTS = {
    # fault: (exit code, words one of which the error must contain)
    "close-on-accept": (10, ("closed", "Broken pipe", "reset")),
    "refuse-go": (10, ("NBD_REP_ERR_POLICY",)),
    "no-greeting": (10, ("timed out",)),
    "bad-magic": (10, ("magic",)),
    "close-after-greeting": (10, ("closed", "Broken pipe", "reset")),
    "wrong-size": (11, ("size",)),
    "read-only": (11, ("read-only",)),
}
#: faults during the transfer: retried until --max-attempts
TRANSFER_FAULTS = {
    "close-mid-write": ("closed", "Broken pipe", "reset"),
    "error-on-write": ("EIO", "refused"),
    "bad-reply-magic": ("magic",),
    "hang-on-write": ("timed out",),
    "lose-final-flush": ("closed",),
    "hang-final-flush": ("timed out",),
}


class _Closed(Exception):
    pass


class FakeNBD:
    """A newstyle NBD server on a Unix socket that stores what it receives in ``image``
    (simple replies, one export) and misbehaves as ``fault`` says on the first ``times``
    connections (None: on every one)."""

    def __init__(self, sock_path: Path, image: Path, size: int) -> None:
        self.path = str(sock_path)
        self.image = image
        self.size = size
        self.fault: str | None = None
        #: tells the handover's flush from a pre-flush (default: the second flush is
        #: it, but a mirror whose clients outran it flushes again before pausing)
        self.final_flush: Callable[[], bool] | None = None
        self.times: int | None = None
        self.connections = 0
        self.faults_done = 0
        self.writes = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads: list[threading.Thread] = []
        self.fd = os.open(image, os.O_RDWR)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        t = threading.Thread(target=self._accept, daemon=True, name="fake-nbd")
        t.start()
        self.threads.append(t)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.path}"

    def set_fault(self, fault: str | None, times: int | None = None) -> None:
        with self.lock:
            self.fault = fault
            self.times = times
            self.faults_done = 0

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                fault = self.fault
                if self.times is not None and self.faults_done >= self.times:
                    fault = None
                elif fault is not None:
                    self.faults_done += 1
                self.conns.append(c)
            t = threading.Thread(target=self._serve, args=(c, fault), daemon=True)
            t.start()
            self.threads.append(t)

    # --- one connection ------------------------------------------------------------------

    def _recv(self, c: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                b = c.recv(n - len(buf))
            except TimeoutError:
                if self.stop.is_set():
                    raise _Closed() from None
                continue
            if not b:
                raise _Closed()
            buf += b
        return bytes(buf)

    def _hang(self) -> None:
        """Keep the connection open and say nothing (bounded by close())."""
        self.stop.wait(60)

    def _serve(self, c: socket.socket, fault: str | None) -> None:
        c.settimeout(0.2)
        try:
            self._session(c, fault)
        except (_Closed, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                c.close()

    def _session(self, c: socket.socket, fault: str | None) -> None:
        if fault == "close-on-accept":
            return
        if fault == "no-greeting":
            self._hang()
            return
        magic = 0x4E42444D41474943 ^ 0xFF if fault == "bad-magic" else NBDMAGIC
        c.sendall(GREETING.pack(magic, IHAVEOPT,
                                HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES))
        if fault == "close-after-greeting":
            return
        self._recv(c, 4)  # client flags
        size = self.size + 512 if fault == "wrong-size" else self.size
        flags = FLAGS | (TransmissionFlag.READ_ONLY if fault == "read-only" else 0)
        while True:
            _magic, opt, length = OPTION_REQUEST.unpack(self._recv(c, OPTION_REQUEST.size))
            if length:
                self._recv(c, length)
            if opt == Opt.GO:
                if fault == "refuse-go":
                    c.sendall(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, Rep.ERR_POLICY, 0))
                    continue
                info = struct.pack(">HQH", Info.EXPORT, size, flags)
                c.sendall(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, Rep.INFO, len(info))
                          + info + OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, Rep.ACK, 0))
                break
            if opt == Opt.ABORT:
                c.sendall(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, Rep.ACK, 0))
                return
            c.sendall(OPTION_REPLY.pack(OPTION_REPLY_MAGIC, opt, Rep.ERR_UNSUP, 0))
        self._transmission(c, fault)

    def _transmission(self, c: socket.socket, fault: str | None) -> None:
        writes = flushes = 0
        while True:
            magic, _fl, cmd, cookie, off, length = REQUEST.unpack(self._recv(c, REQUEST.size))
            assert magic == REQUEST_MAGIC
            err = 0
            reply_magic = SIMPLE_REPLY_MAGIC
            if cmd == Cmd.WRITE:
                writes += 1
                if fault == "close-mid-write" and writes == 2:
                    self._recv(c, length // 2)
                    return
                if fault == "hang-on-write" and writes == 2:
                    self._hang()
                    return
                data = self._recv(c, length)
                if fault == "error-on-write" and writes == 2:
                    err = 5  # EIO, nothing written
                else:
                    os.pwrite(self.fd, data, off)
                    with self.lock:
                        self.writes += 1
                if fault == "bad-reply-magic" and writes == 2:
                    reply_magic ^= 0x01010101
            elif cmd == Cmd.WRITE_ZEROES:
                os.pwrite(self.fd, bytes(length), off)
            elif cmd == Cmd.FLUSH:
                flushes += 1
                os.fsync(self.fd)
                # the pre-flush is the first, the flush in the handover the second
                final = fault in ("lose-final-flush", "hang-final-flush") and (
                    flushes == 2 if self.final_flush is None else
                    flushes >= 2 and self.final_flush())
                if fault == "lose-final-flush" and final:
                    return
                if fault == "hang-final-flush" and final:
                    self._hang()
                    return
            elif cmd == Cmd.READ:
                c.sendall(SIMPLE_REPLY.pack(reply_magic, 0, cookie) + os.pread(self.fd, length,
                                                                                off))
                continue
            elif cmd == Cmd.DISC:
                return
            else:
                err = 22
            c.sendall(SIMPLE_REPLY.pack(reply_magic, err, cookie))

    def close(self) -> None:
        stop_listener(self.stop, self.sock, self.lock, self.conns)
        for t in self.threads:
            t.join(5)
        os.close(self.fd)


def _make_image(path: Path) -> None:
    """Data in three separate places (several WRITEs), holes elsewhere."""
    make_image(path, SIZE, [(off, bytes([i + 1]) * 4096 + os.urandom(n - 4096))
                            for i, (off, n) in enumerate(((0, 1 << 20), (3 << 20, 512 << 10),
                                                          (5 << 20, 2 << 20)))])


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeNBD]:
    dst = tmp_path / "fake-dst.img"
    sparse_file(dst, SIZE)
    f = FakeNBD(tmp_path / "fake.sock", dst, SIZE)
    try:
        yield f
    finally:
        f.close()


def _source(procs: Procs, tmp_path: Path,
            env: dict[str, str] | None = SERVE_ENV) -> tuple[Path, bytes, str, str]:
    """pynbd serve of a fresh image: (path, its content, uri, control)."""
    src = tmp_path / "src.img"
    _make_image(src)
    _p, uri, ctl = procs.serve(src, env=env)
    return src, src.read_bytes(), uri, ctl


def _mirror(ctl: str, to: str, *extra: str) -> tuple[int, str]:
    r = run_cli(["mirror", "--control", ctl, "--to", to, "--wait", *extra], timeout=60)
    return r.returncode, r.stderr.decode(errors="replace")


def _assert_source_serving(uri: str, ctl: str, probe: int) -> None:
    """Authoritative, not paused, serving reads and writes (at 6-8 MiB, where the
    writers do not write)."""
    st = migration_status(ctl)
    assert st["authoritative"] is True and not st.get("paused"), st
    r = run_cli(["read", uri, "--from", str(6 << 20), "--size", str(2 << 20)], timeout=30)
    assert r.returncode == 0, r.stderr
    before = r.stdout
    payload = probe.to_bytes(4, "little") * 1024
    r = run_cli(["write", uri, "--from", str(7 << 20)], stdin=payload, timeout=30)
    assert r.returncode == 0, r.stderr
    r = run_cli(["read", uri, "--from", str(6 << 20), "--size", str(2 << 20)], timeout=30)
    assert r.returncode == 0, r.stderr
    after = before[:1 << 20] + payload + before[(1 << 20) + len(payload):]
    assert r.stdout == after


@pytest.mark.parametrize("fault", sorted(HANDSHAKE_FAULTS))
def test_handshake_fault(procs: Procs, tmp_path: Path, fake: FakeNBD, fault: str) -> None:
    code, words = HANDSHAKE_FAULTS[fault]
    src, content, uri, ctl = _source(procs, tmp_path)
    fake.set_fault(fault)
    rc, err = _mirror(ctl, fake.uri, "--max-attempts", "3")
    assert rc == code, err
    assert any(w in err for w in words), err
    st = migration_status(ctl)
    assert st["result"] == ("connect-failed" if code == 10 else "rejected"), st
    assert st["attempts"] == 1  # a failed handshake is not retried
    assert any(w in st["error"] for w in words), st
    assert fake.writes == 0
    assert src.read_bytes() == content
    _assert_source_serving(uri, ctl, probe=1)
    # the destination mended: the same source migrates there completely
    fake.set_fault(None)
    rc, err = _mirror(ctl, fake.uri)
    assert rc == 0, err
    assert compare_images(src, fake.image) == []
    assert migration_status(ctl)["authoritative"] is False


@pytest.mark.parametrize("fault", sorted(TRANSFER_FAULTS))
def test_transfer_fault(procs: Procs, tmp_path: Path, fake: FakeNBD, fault: str) -> None:
    words = TRANSFER_FAULTS[fault]
    src, _content, uri, ctl = _source(procs, tmp_path)
    w = Writer(uri, SIZE, seed=len(fault), rate=2 * 1024 * 1024, region=(0, 6 << 20))
    w.start()
    try:
        # on every connection: the mirror gives up after --max-attempts
        fake.set_fault(fault)
        rc, err = _mirror(ctl, fake.uri, "--max-attempts", "2")
        assert rc == 13, err
        assert "gave up after 2 attempts" in err and any(w in err for w in words), err
        st = migration_status(ctl)
        assert st["result"] == "failed" and st["attempts"] == 2, st
        assert fake.connections == 2
        _assert_source_serving(uri, ctl, probe=2)
        # the writer never noticed (a pause at most)
        assert w.error is None and w.is_alive()
        # on the first connection only: the mirror reconnects, re-sends what was not
        # confirmed, and completes
        fake.set_fault(fault, times=1)
        rc, err = _mirror(ctl, fake.uri, "--max-attempts", "3")
        assert rc == 0, err
        st = migration_status(ctl)
        assert st["result"] == "completed" and st["attempts"] == 2, st
        assert st["authoritative"] is False
    finally:
        w.stop_event.set()
        w.join(10)
    assert w.writes > 0 and stepped_down_error(w.error), w.error
    assert compare_images(src, fake.image) == []
    assert w.check_in(fake.image) == []


def test_break_while_destination_hangs(procs: Procs, tmp_path: Path, fake: FakeNBD) -> None:
    """With the default 60 s reply timeout: break aborts the connection instead of waiting
    for a reply that never comes (the break command itself waits at most 30 s)."""
    src, content, uri, ctl = _source(procs, tmp_path, env=None)
    fake.set_fault("hang-on-write")
    mirror = procs.pynbd(["mirror", "--control", ctl, "--to", fake.uri,
                          "--wait", "--max-attempts", "50"], "mirror")
    mirror.wait_for(lambda: fake.writes >= 1, "first write at the destination")
    r = run_cli(["break", "--control", ctl], timeout=60)
    assert r.returncode == 0, r.stderr
    assert mirror.proc.wait(30) == 12, mirror.logs()
    assert "broken" in mirror.logs()
    st = migration_status(ctl)
    assert st["result"] == "broken", st
    assert src.read_bytes() == content
    _assert_source_serving(uri, ctl, probe=3)


@pytest.mark.parametrize("phase", ["copying", "final-pause"])
def test_sigterm_source_while_mirroring(procs: Procs, tmp_path: Path, fake: FakeNBD,
                                        phase: str) -> None:
    """SIGTERM while the destination does not answer: during the copy, and during the
    handover's final flush (clients paused, a writer's request held by the pause).
    The default 60 s reply timeout applies: stopping abandons the mirror at once."""
    src, content, uri, ctl = _source(procs, tmp_path, env=None)
    s1 = procs.all[-1]
    w = Writer(uri, SIZE, seed=6, rate=2 * 1024 * 1024, region=(0, 6 << 20))
    if phase == "final-pause":
        fake.set_fault("hang-final-flush")
        fake.final_flush = lambda: bool(migration_status(ctl).get("paused"))
        w.start()
    else:
        fake.set_fault("hang-on-write")
    mirror = procs.pynbd(["mirror", "--control", ctl, "--to", fake.uri,
                          "--wait", "--max-attempts", "50"], "mirror")
    if phase == "final-pause":
        mirror.wait_for(lambda: bool(migration_status(ctl).get("paused")), "the handover pause")
    else:
        mirror.wait_for(lambda: fake.writes >= 1, "first write at the destination")
    s1.kill(signal.SIGTERM)
    assert s1.proc.wait(20) == 0, s1.logs()
    # the waiting mirror command loses its control socket
    assert mirror.proc.wait(20) == 3, mirror.logs()
    w.stop_event.set()
    if w.is_alive():
        w.join(10)
    assert not os.path.exists(str(src) + ".pynbd-migration.json")
    if phase == "copying":
        assert src.read_bytes() == content
    assert w.check_in(src) == []
    # restarted, the source is authoritative and serves its data
    _s2, uri2, ctl2 = procs.serve(src, name="source2", env=SERVE_ENV)
    assert migration_status(ctl2)["state"] == "idle"
    _assert_source_serving(uri2, ctl2, probe=4)
    fake.set_fault(None)
    rc, err = _mirror(ctl2, fake.uri)
    assert rc == 0, err
    assert compare_images(src, fake.image) == []


def test_cannot_connect_and_rejected_over_tcp(procs: Procs, tmp_path: Path) -> None:
    """Over TCP too: nothing listening (10), and a listener that closes at once (10)."""
    src, content, uri, ctl = _source(procs, tmp_path)
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    port = lst.getsockname()[1]
    # bound but not listening: connection refused
    rc, err = _mirror(ctl, f"nbd://127.0.0.1:{port}/")
    assert rc == 10 and "cannot connect" in err, err
    lst.listen(4)
    stop = threading.Event()

    def reject() -> None:
        lst.settimeout(0.1)
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                c, _ = lst.accept()
                c.close()

    t = threading.Thread(target=reject, daemon=True)
    t.start()
    try:
        rc, err = _mirror(ctl, f"nbd://127.0.0.1:{port}/")
        assert rc == 10 and any(x in err for x in ("closed", "Broken pipe", "reset")), err
    finally:
        stop.set()
        t.join(5)
        lst.close()
    assert src.read_bytes() == content
    _assert_source_serving(uri, ctl, probe=5)


def test_mirror_timeout_option(procs: Procs, tmp_path: Path, fake: FakeNBD) -> None:
    """`pynbd mirror --timeout` bounds the wait for a silent destination (no environment
    override here: the default would be 60 s)."""
    src, content, uri, ctl = _source(procs, tmp_path, env=None)
    fake.set_fault("hang-on-write")
    rc, err = _mirror(ctl, fake.uri, "--timeout", "1", "--max-attempts", "1")
    assert rc == 13 and "timed out" in err, err
    assert src.read_bytes() == content
    _assert_source_serving(uri, ctl, probe=5)
