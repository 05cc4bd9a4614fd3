"""Bad input over a raw socket: the spec's answer, and nothing else breaks.

One server for the whole module (memory exports: "disk" read-write and default, "ro"
read-only). A bystander connection stays open through every test and must keep working
after each one; every test ends by checking that a fresh connection works too.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.server.rawnbd import (
    CMD_BS,
    CMD_CACHE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_ZERO,
    EINVAL,
    ENOSPC,
    EPERM,
    F_DF,
    F_FAST_ZERO,
    F_FUA,
    F_NO_HOLE,
    F_REQ_ONE,
    IHAVEOPT,
    OPT_GO,
    OPT_LIST,
    OPT_STRUCTURED,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_UNSUP,
    REP_SERVER,
    REQUEST_MAGIC,
    Raw,
    healthy,
    is_dropped,
)
from tests.support.pynbd_server import PynbdServer, free_unix_path

SIZE = 64 * 1024 * 1024
RO_SIZE = 16 * 1024 * 1024
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PynbdServer]:
    tmp = tmp_path_factory.mktemp("bad")
    sock = free_unix_path(tmp)
    cfg = tmp / "exports.toml"
    img = tmp / "file.img"
    with open(img, "wb") as f:
        f.write(os.urandom(MiB) * 64)
    cfg.write_text(
        '[server]\ndefault_export = "disk"\n'
        '[[export]]\nname = "disk"\ntarget = "memory:64M"\n'
        '[[export]]\nname = "ro"\ntarget = "memory:16M"\nread_only = true\n'
        f'[[export]]\nname = "file"\ntarget = "{img}"\n')
    # a 32 MiB maximum payload: the oversized-request cases below sit between it and
    # the 64 MiB past which the server drops instead of discarding
    srv = PynbdServer(["-v", "--bind", "127.0.0.1", "--port", "0", "--socket", sock,
                       "--max-request-size", "32M", "--config", str(cfg)], cwd=tmp)
    srv.unix_path = sock  # type: ignore[attr-defined]
    try:
        yield srv
        assert srv.alive()
    finally:
        srv.stop()
    assert "Traceback" not in srv.stderr and "internal error" not in srv.stderr, \
        srv.stderr[-5000:]


@pytest.fixture(scope="module")
def addr(server: PynbdServer) -> tuple[str, int]:
    return ("127.0.0.1", server.port)


@pytest.fixture(scope="module")
def bystander(addr: tuple[str, int]) -> Iterator[Raw]:
    c = Raw(addr).connect("disk")
    yield c
    c.disc()


@pytest.fixture(autouse=True)
def still_fine(request: pytest.FixtureRequest, server: PynbdServer, addr: tuple[str, int],
               bystander: Raw) -> Iterator[None]:
    """After every test: server alive, bystander works, fresh connections work."""
    yield
    assert server.alive(), server.stderr[-3000:]
    off = 60 * MiB + (hash(request.node.name) % 1000) * 4096
    data = struct.pack(">Q", off) * 512
    assert bystander.call(CMD_WRITE, off, 4096, payload=data)[0] == 0
    assert bystander.call(CMD_READ, off, 4096) == (0, data)
    healthy(addr, offset=off)
    healthy(server.unix_path, "disk", offset=off)  # type: ignore[attr-defined]


def fresh(addr: tuple[str, int]) -> Raw:
    r = Raw(addr)
    r.greeting()
    return r


# --- handshake ----------------------------------------------------------------------


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF, 3 | 1 << 5])
def test_unknown_client_flags_drop(addr: tuple[str, int], flags: int) -> None:
    r = Raw(addr)
    r.greeting(client_flags=flags)
    r.send_option(OPT_LIST)
    assert is_dropped(r.sock)
    r.close()


def test_wrong_option_magic_drops(addr: tuple[str, int]) -> None:
    r = fresh(addr)
    r.send(struct.pack(">QII", IHAVEOPT ^ 1, OPT_LIST, 0))
    assert is_dropped(r.sock)
    r.close()


def test_greeting_garbage_drops(addr: tuple[str, int]) -> None:
    r = Raw(addr)
    r.recv(18)
    r.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert is_dropped(r.sock)
    r.close()


def test_unknown_option_unsup_data_consumed(addr: tuple[str, int]) -> None:
    r = fresh(addr)
    # data that looks like an option header: if not consumed, the stream desyncs
    evil = struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * 8
    for opt in (0x1234, 4, 5, 0x7FFFFFFF, 0xFFFFFFFF):
        reps = r.option(opt, evil)
        assert [rep for rep, _ in reps] == [REP_ERR_UNSUP], (opt, reps)
    # a known option that takes no data: refused, its data consumed all the same
    reps = r.option(11, evil)  # NBD_OPT_EXTENDED_HEADERS
    assert [rep for rep, _ in reps] == [REP_ERR_INVALID], reps
    reps = r.option(OPT_LIST)
    assert [rep for rep, _ in reps] == [REP_SERVER] * 3 + [REP_ACK]
    r.go("disk")
    assert r.call(CMD_READ, 0, 512)[0] == 0
    r.disc()


def test_big_unknown_option_discarded_in_sync(addr: tuple[str, int]) -> None:
    r = fresh(addr)
    payload = struct.pack(">QII", IHAVEOPT, OPT_LIST, 0) * (300 * 1024 // 16)
    reps = r.option(0x4242, payload)  # 300 KiB: read and thrown away, not buffered
    assert len(reps) == 1 and reps[0][0] & (1 << 31)
    assert r.option(OPT_STRUCTURED)[-1][0] == REP_ACK
    r.go("disk")
    r.disc()


def test_option_with_bad_payload_is_invalid_and_in_sync(addr: tuple[str, int]) -> None:
    r = fresh(addr)
    assert r.option(OPT_LIST, b"junk")[-1][0] == REP_ERR_INVALID
    # GO whose name length overruns the data
    assert r.option(OPT_GO, struct.pack(">I", 1000) + b"x")[-1][0] == REP_ERR_INVALID
    assert r.option(OPT_STRUCTURED, b"x")[-1][0] == REP_ERR_INVALID
    r.go("")
    r.disc()


def test_absurd_option_length_dropped_without_allocation(server: PynbdServer,
                                                           addr: tuple[str, int]) -> None:
    before = server.rss_kib()
    socks = []
    for _ in range(8):
        r = fresh(addr)
        r.send(struct.pack(">QII", IHAVEOPT, 0x1234, 0xFFFFFFFF) + b"\0" * 65536)
        socks.append(r)
    for r in socks:
        assert is_dropped(r.sock)
        r.close()
    assert server.rss_kib() - before < 64 * 1024, "server allocated for a 4 GiB option"


@pytest.mark.parametrize("cut", ["flags", "opt-header", "opt-data", "go-data"])
def test_truncated_handshake(addr: tuple[str, int], cut: str) -> None:
    r = Raw(addr)
    r.recv(18)
    if cut == "flags":
        r.send(b"\0\0")
    else:
        r.send(struct.pack(">I", 3))
        if cut == "opt-header":
            r.send(struct.pack(">QI", IHAVEOPT, OPT_GO))
        elif cut == "opt-data":
            r.send(struct.pack(">QII", IHAVEOPT, 0x99, 100) + b"x" * 50)
        else:
            r.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 10) + b"\0\0")
    r.sock.shutdown(socket.SHUT_WR)
    assert is_dropped(r.sock)
    r.close()


def test_abort(addr: tuple[str, int]) -> None:
    r = fresh(addr)
    assert r.option(2)[-1][0] == REP_ACK  # NBD_OPT_ABORT: ACK (optional), then close
    assert is_dropped(r.sock)
    r.close()


# --- transmission -------------------------------------------------------------------


@pytest.mark.parametrize("structured", [False, True])
def test_wrong_request_magic_drops(addr: tuple[str, int], structured: bool) -> None:
    r = Raw(addr).connect("disk", structured)
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC ^ 0x100, 0, CMD_READ, 1, 0, 512))
    assert is_dropped(r.sock)
    r.close()


@pytest.mark.parametrize("structured", [False, True])
def test_past_the_end(addr: tuple[str, int], structured: bool) -> None:
    r = Raw(addr).connect("disk", structured, meta=structured)
    assert r.size == SIZE
    big = 2**64 - 4096  # offset + length overflows 64 bits
    mark = bytes([0x30 + structured]) * 4096
    assert r.call(CMD_WRITE, SIZE - 4096, 4096, payload=mark)[0] == 0
    for off in (SIZE - 512, SIZE, big):
        # WRITE: ENOSPC and the payload is consumed (next request still parsed)
        assert r.call(CMD_WRITE, off, 4096, payload=b"\xaa" * 4096)[0] == ENOSPC
        assert r.call(CMD_ZERO, off, 4096)[0] == ENOSPC
        assert r.call(CMD_READ, off, 4096)[0] == EINVAL
        assert r.call(CMD_TRIM, off, 4096)[0] == EINVAL
        assert r.call(CMD_CACHE, off, 4096)[0] == EINVAL
        if structured:
            assert r.call(CMD_BS, off, 4096)[0] == EINVAL
    # the bytes just before the end were not touched by the refused write
    assert r.call(CMD_READ, SIZE - 4096, 4096) == (0, mark)
    r.disc()


@pytest.mark.parametrize("structured", [False, True])
def test_read_only_export_eperm(addr: tuple[str, int], structured: bool) -> None:
    r = Raw(addr).connect("ro", structured)
    assert r.tflags & 2  # NBD_FLAG_READ_ONLY
    assert r.call(CMD_WRITE, 0, 4096, payload=b"\x11" * 4096)[0] == EPERM
    assert r.call(CMD_WRITE, 0, 65536, payload=b"\x11" * 65536)[0] == EPERM
    assert r.call(CMD_TRIM, 0, 4096)[0] == EPERM
    assert r.call(CMD_ZERO, 0, 4096)[0] == EPERM
    assert r.call(CMD_READ, 0, 4096) == (0, bytes(4096))
    assert r.call(CMD_FLUSH)[0] == 0
    r.disc()


@pytest.mark.parametrize("structured", [False, True])
def test_unknown_commands_and_flags_einval(addr: tuple[str, int], structured: bool) -> None:
    r = Raw(addr).connect("disk", structured)
    for cmd in (8, 9, 100, 0x7F01, 0xFFFF):
        assert r.call(cmd, 0, 0)[0] == EINVAL, cmd
    # unknown flag bits on known commands
    for cmd, flags in ((CMD_READ, 1 << 7), (CMD_FLUSH, 1 << 9), (CMD_TRIM, F_NO_HOLE << 8),
                       (CMD_READ, F_REQ_ONE), (CMD_BS, 1 << 15)):
        assert r.call(cmd, 0, 4096 if cmd != CMD_FLUSH else 0, flags)[0] == EINVAL, (cmd, flags)
    # a WRITE with an invalid flag is refused and its payload consumed
    assert r.call(CMD_WRITE, 0, 4096, 1 << 6, payload=b"\x99" * 4096)[0] == EINVAL
    if not structured:
        # DF needs structured replies; BLOCK_STATUS needs a meta context
        assert r.call(CMD_READ, 0, 4096, F_DF)[0] == EINVAL
    assert r.call(CMD_BS, 0, 4096)[0] == EINVAL
    assert r.call(CMD_READ, 0, 4096)[0] == 0
    r.disc()


def test_fua_accepted_on_every_command(addr: tuple[str, int]) -> None:
    """Spec: FUA is valid for all commands once SEND_FUA is negotiated; the server MUST
    accept it (existing clients set it on reads and flushes)."""
    r = Raw(addr).connect("disk", True, meta=True)
    assert r.tflags & 8
    assert r.call(CMD_READ, 0, 4096, F_FUA)[0] == 0
    assert r.call(CMD_FLUSH, 0, 0, F_FUA)[0] == 0
    assert r.call(CMD_CACHE, 0, 4096, F_FUA)[0] == 0
    assert r.call(CMD_BS, 0, 4096, F_FUA)[0] == 0
    assert r.call(CMD_ZERO, 0, 4096, F_FUA | F_NO_HOLE | F_FAST_ZERO)[0] == 0
    r.disc()


@pytest.mark.parametrize("what", ["header", "write-payload"])
def test_truncated_request(server: PynbdServer, addr: tuple[str, int], what: str) -> None:
    r = Raw(addr).connect("disk", True)
    off = 40 * MiB
    if what == "header":
        r.send(struct.pack(">IHHQ", REQUEST_MAGIC, 0, CMD_READ, 5))
    else:
        # 1 MiB write, only half the payload arrives: nothing may be acknowledged
        r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 5, off, MiB)
               + b"\xee" * (MiB // 2))
    r.sock.shutdown(socket.SHUT_WR)
    assert is_dropped(r.sock)
    r.close()


def test_huge_write_lengths_bounded_memory(server: PynbdServer, addr: tuple[str, int]) -> None:
    before = server.rss_kib()
    conns = []
    # 4 GiB - 1 WRITE: must be dropped (or discarded), never allocated
    for _ in range(6):
        r = Raw(addr).connect("disk", True)
        r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 9, 0, 0xFFFFFFFF)
               + b"\0" * 65536)
        conns.append(r)
    for r in conns:
        r.sock.settimeout(15)
        try:
            # either dropped, or an error reply (then we stop, as the payload never ends)
            data = r.sock.recv(64)
            assert data == b"" or struct.unpack(">I", data[:4])[0] in (0x67446698, 0x668E33EF)
        except ConnectionResetError:
            pass
        r.close()
    assert server.rss_kib() - before < 64 * 1024, "server allocated for absurd WRITE lengths"


def test_oversized_write_discarded_in_sync(server: PynbdServer, addr: tuple[str, int]) -> None:
    """A 40 MiB WRITE (past the 32 MiB maximum) gets an error and its payload is
    consumed; the next request on the same connection is parsed correctly."""
    r = Raw(addr).connect("disk", False)
    n = 40 * MiB
    before = server.rss_kib()
    r.request(CMD_WRITE, 0, n, cookie=77)
    chunk = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 5, 0, 4096) * (MiB // 28)
    chunk += b"\0" * (MiB - len(chunk))
    for _ in range(n // MiB):
        r.send(chunk)
    cookie, err, _ = r.response()
    assert cookie == 77 and err == EINVAL
    assert r.call(CMD_READ, 0, 4096, cookie=78)[0] == 0
    assert server.rss_kib() - before < 36 * 1024
    r.disc()


def test_huge_read_length_refused(addr: tuple[str, int]) -> None:
    for structured in (False, True):
        r = Raw(addr).connect("disk", structured)
        err, _ = r.call(CMD_READ, 0, 0xFFFFFFFF)
        assert err in (EINVAL, 75)  # EOVERFLOW allowed with structured replies
        assert r.call(CMD_READ, 0, 4096)[0] == 0
        r.disc()


@pytest.mark.parametrize("export", ["disk", "file"])
def test_reset_with_many_replies_pending(server: PynbdServer, addr: tuple[str, int],
                                         export: str) -> None:
    """Pipeline many 1 MiB reads, never read a reply, reset (SO_LINGER 0). nbdkit 1.32
    aborts on this; pynbd must keep serving (memory backend: buffered sends; file
    backend: sendfile)."""
    for round_ in range(3):
        r = Raw(addr).connect(export, structured=bool(round_ % 2))
        reqs = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, i % 60 * MiB, MiB)
                        for i in range(200))
        r.send(reqs)
        time.sleep(0.2)
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        r.close()
    # also: reset in the middle of a WRITE payload stream
    r = Raw(addr).connect(export, True)
    r.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 8 * MiB) + b"\1" * MiB)
    r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    r.close()
    time.sleep(0.2)


def test_handshake_leaves_other_connections_alone(addr: tuple[str, int]) -> None:
    """A client stalled mid-handshake does not block others (thread per connection)."""
    stalled = Raw(addr)
    stalled.recv(18)
    healthy(addr, "disk", offset=30 * MiB)
    stalled.close()


def test_many_idle_connections_then_data(addr: tuple[str, int]) -> None:
    conns = [Raw(addr).connect("disk", bool(i % 2)) for i in range(20)]
    for i, c in enumerate(conns):
        data = bytes([i]) * 4096
        assert c.call(CMD_WRITE, i * 4096, 4096, payload=data)[0] == 0
    for i, c in enumerate(conns):
        assert c.call(CMD_READ, i * 4096, 4096) == (0, bytes([i]) * 4096)
        c.disc()


@pytest.mark.parametrize("structured", [False, True])
def test_zero_length_requests(addr: tuple[str, int], structured: bool) -> None:
    """Length 0 is unspecified but must not disconnect; a structured reply to a 0-byte
    READ must not be an OFFSET_DATA chunk (its length must be >= 9)."""
    r = Raw(addr).connect("disk", structured, meta=structured)
    if structured:
        r.request(CMD_READ, 4096, 0, cookie=3)
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", r.recv(20))
        assert magic == 0x668E33EF and cookie == 3 and flags & 1
        assert rtype == 0 or (rtype & 0x8000), rtype  # NONE or an error chunk
        r.recv(length)
    else:
        assert r.call(CMD_READ, 4096, 0) == (0, b"")
    assert r.call(CMD_WRITE, 4096, 0)[0] == 0
    assert r.call(CMD_TRIM, 4096, 0)[0] == 0
    assert r.call(CMD_ZERO, 4096, 0)[0] == 0
    assert r.call(CMD_CACHE, 4096, 0)[0] == 0
    assert r.call(CMD_READ, SIZE, 0)[0] in (0, EINVAL)
    assert r.call(CMD_READ, 0, 4096)[0] == 0
    r.disc()


def test_connection_churn_after_dirty_writes(server: PynbdServer, addr: tuple[str, int]) -> None:
    """Many short connections (GO + DISC) while the file export has dirty pages: a
    session that wrote nothing must not pay (and queue up on) an fdatasync, or short
    connections pile up past the per-address limit and get refused."""
    w = Raw(addr).connect("file", False)
    block = os.urandom(MiB)
    for i in range(32):
        assert w.call(CMD_WRITE, i * MiB, MiB, payload=block)[0] == 0
    for _ in range(150):
        r = Raw(addr).connect("file", False)
        r.disc()  # NBD_CMD_DISC, then wait for the server to close
    assert w.call(CMD_READ, 31 * MiB, MiB) == (0, block)
    w.disc()


@pytest.mark.parametrize("export", ["disk", "file"])
def test_disc_finishes_pending_requests(addr: tuple[str, int], export: str) -> None:
    """Requests pipelined before NBD_CMD_DISC all get their replies, then the server
    closes (qemu-nbd can drop them)."""
    r = Raw(addr).connect(export, structured=export == "file")
    reqs = [struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 100, 50 * MiB, 65536)
            + b"\x42" * 65536]
    for i in range(40):
        reqs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, i * MiB, 256 * 1024))
    reqs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, 101, 0, 0))
    reqs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 102, 0, 0))  # DISC
    r.send(b"".join(reqs))
    seen = set()
    for k in range(42):
        cookie, err, _data = r.response(256 * 1024 if k not in (0, 41) else 0)
        assert err == 0
        seen.add(cookie)
    assert seen == {100, 101, *range(40)}
    assert is_dropped(r.sock)
    r.close()
    c = Raw(addr).connect(export)
    assert c.call(CMD_READ, 50 * MiB, 65536) == (0, b"\x42" * 65536)
    c.disc()
