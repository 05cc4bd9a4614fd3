"""The blocking client against real servers: nbdkit, qemu-nbd, nbd-server, pynbd serve,
over TCP (127.0.0.1 and ::1) and Unix sockets."""

from __future__ import annotations

import errno

import pytest

from pynbd.client import (
    Client,
    CmdFlag,
    LocalProtocolError,
    NBDRequestError,
    OptionError,
    PeerProtocolError,
    connect,
)
from pynbd.protocol.client import State
from pynbd.protocol.constants import Rep
from tests.client.conftest import (
    IMAGE_DATA,
    IMAGE_SIZE,
    SERVER_KINDS,
    TIMEOUT,
    Servers,
    expected_image,
)

pytestmark = pytest.mark.interop

STRUCTURED = {"nbdkit": True, "qemu-nbd": True, "nbd-server": False, "pynbd": True}


def _every_option(c: Client, export: str, kind: str) -> bool:
    """The negotiation calls, each checked; whether structured replies were agreed."""
    assert c.state is State.GREETING
    hs = c.handshake()
    assert hs.handshake_flags & 1  # fixed newstyle
    exports = c.list_exports()
    assert export in [e.name for e in exports]
    info = c.info()
    if kind != "nbd-server":  # nbd-server 3.24 reports size 0 in NBD_OPT_INFO
        assert info.size == IMAGE_SIZE
    structured = c.structured_replies()
    assert structured == STRUCTURED[kind]
    if structured:
        listed = c.list_meta_context("base:")
        assert "base:allocation" in [m.name for m in listed]
        chosen = c.set_meta_context("base:allocation")
        assert [m.name for m in chosen] == ["base:allocation"]
    assert c.negotiate_safe_close() == (kind == "pynbd")
    ex = c.go()
    assert c.state is State.TRANSMISSION
    assert ex.size == IMAGE_SIZE == c.size
    assert not c.is_read_only()
    return structured


@pytest.mark.parametrize("transport", ["tcp", "tcp6", "unix"])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_every_call(servers: Servers, kind: str, transport: str) -> None:
    srv = servers.start(kind, transport)
    expected = expected_image()
    c = Client.dial(srv.uri(), timeout=TIMEOUT)
    structured = _every_option(c, srv.export, kind)

    # read: data and holes
    assert c.read(0, IMAGE_SIZE) == expected
    off, _blob = IMAGE_DATA[0]
    assert c.read(off + 5, 100) == expected[off + 5:off + 105]
    buf = bytearray(b"\xff" * 65536)
    c.read_into(0, buf)  # a hole: caller's bytes must be overwritten with zeroes
    assert buf == bytes(65536)
    data, chunks = c.read_chunks(off - 4096, 8192)
    assert data == expected[off - 4096:off + 4096]
    assert sum(ch.length for ch in chunks) == 8192
    if c.can_df():  # don't fragment: at most one content chunk
        data, chunks = c.read_chunks(off - 4096, 8192, CmdFlag.DF)
        assert data == expected[off - 4096:off + 4096]
        assert len([ch for ch in chunks if ch.length]) == 1

    # write, FUA, flush
    c.write(4096, b"A" * 4096)
    assert c.read(4096, 4096) == b"A" * 4096
    if c.can_fua():
        c.write(8192, b"B" * 512, CmdFlag.FUA)
        assert c.read(8192, 512) == b"B" * 512
    if c.can_flush():
        c.flush()
    else:
        with pytest.raises(LocalProtocolError):
            c.flush()
    # write_zeroes (+ NO_HOLE), trim, cache
    if c.can_zero():
        c.write_zeroes(4096, 1024)
        assert c.read(4096, 4096) == bytes(1024) + b"A" * 3072
        c.write_zeroes(5120, 1024, CmdFlag.NO_HOLE)
        assert c.read(5120, 1024) == bytes(1024)
    if c.can_fast_zero():
        try:
            c.write_zeroes(6144, 1024, CmdFlag.FAST_ZERO)
        except NBDRequestError as exc:  # allowed: "cannot zero fast"
            assert exc.errno == errno.ENOTSUP
    if c.can_trim():
        c.trim(2 << 20, 1 << 20)  # contents unspecified afterwards; must not fail
    if c.can_cache():
        c.cache(0, 1 << 20)
    # block status
    if structured:
        bs = c.block_status(0, IMAGE_SIZE)
        extents = bs["base:allocation"]
        assert extents[0].offset == 0
        assert all(e.length > 0 for e in extents)
        allext = list(c.iter_extents())
        assert sum(e.length for e in allext) == IMAGE_SIZE
        # the data regions written in the image are never reported as zero
        for e in allext:
            for doff, dblob in IMAGE_DATA[1:]:
                if e.offset < doff + len(dblob) and doff < e.offset + e.length:
                    assert not e.zero
        one = c.block_status(0, IMAGE_SIZE, CmdFlag.REQ_ONE)["base:allocation"]
        assert len(one) == 1
    else:
        with pytest.raises(LocalProtocolError):
            c.block_status(0, 4096)

    result = c.close()
    assert c.close() is result  # idempotent
    if kind == "pynbd":
        assert result.safe and result.flushed and result.method == "x_close"
    else:
        assert not result.safe
        assert result.method == ("flush+disc" if c.can_flush() else "disc")


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "pynbd"])
def test_structured_replies_off(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    with connect(srv.uri(), structured=False, timeout=TIMEOUT) as c:
        assert not c.structured
        assert c.read(0, IMAGE_SIZE) == expected_image()
        _data, chunks = c.read_chunks(0, 65536)
        assert len(chunks) == 1 and not chunks[0].hole  # simple reply: one data chunk
        c.write(0, b"x" * 100)
        assert c.read(0, 100) == b"x" * 100


@pytest.mark.parametrize("kind", ["qemu-nbd", "pynbd"])
def test_sparse_read_reports_holes(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        data, chunks = c.read_chunks(0, 2 << 20)
        assert data == expected_image()[:2 << 20]
        holes = [ch for ch in chunks if ch.hole]
        assert holes, chunks
        assert sum(ch.length for ch in chunks) == 2 << 20
        # holes really are the unwritten ranges
        for ch in holes:
            assert data[ch.offset:ch.offset + ch.length] == bytes(ch.length)


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_export_name(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    c = Client.dial(srv.uri(), timeout=TIMEOUT)
    c.handshake()
    info = c.export_name()
    assert info.size == IMAGE_SIZE
    assert c.read(IMAGE_DATA[0][0], 6) == b"pynbd!"
    c.disconnect()
    assert c.close_result is not None and c.close_result.method == "disc"


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_pipelining(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    expected = expected_image()
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        reqs = [c.submit_read(off, 65536) for off in range(0, IMAGE_SIZE, 65536)]
        assert c.in_flight == len(reqs)
        done = c.wait_all()
        assert len(done) == len(reqs) and c.in_flight == 0
        for r in reqs:
            assert r.view is not None
            assert r.view == expected[r.offset:r.offset + r.length]
        # pipelined writes then reads, with batch()
        with c.batch():
            for i in range(32):
                c.submit_write(i * 4096, bytes([i]) * 4096)
        bufs = [bytearray(4096) for _ in range(32)]
        with c.batch():
            for i in range(32):
                c.submit_read(i * 4096, bufs[i])
        assert bufs == [bytearray([i]) * 4096 for i in range(32)]
        # wait() on one specific request out of order
        r1 = c.submit_read(0, 4096)
        r2 = c.submit_read(4096, 4096)
        assert c.wait(r2).view == bytes([1]) * 4096
        assert c.wait(r1).view == bytes([0]) * 4096


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_error_replies_keep_connection(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    c = connect(srv.uri(), timeout=TIMEOUT, strict=False)
    with c:
        with pytest.raises(NBDRequestError) as ei:
            c.read(IMAGE_SIZE, 4096)  # past the end
        assert ei.value.errno in (errno.EINVAL, errno.ENOSPC, errno.EIO)
        assert ei.value.nbd_error != 0
        with pytest.raises(NBDRequestError):
            c.write(IMAGE_SIZE - 512, b"z" * 4096)
        # the connection is still in sync
        assert c.read(IMAGE_DATA[0][0], 6) == b"pynbd!"
        # pipelined: an error on one request does not lose the others
        bad = c.submit_read(IMAGE_SIZE + 4096, 512)
        good = c.submit_read(IMAGE_DATA[0][0], 6)
        with pytest.raises(NBDRequestError):
            c.wait_all()
        assert bad.error is not None and good.error is None and good.view == b"pynbd!"


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_read_only_export(servers: Servers, kind: str) -> None:
    srv = servers.start(kind, read_only=True)
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        assert c.is_read_only()
        with pytest.raises(LocalProtocolError):
            c.write(0, b"x")
    with connect(srv.uri(), timeout=TIMEOUT, strict=False) as c:
        with pytest.raises(NBDRequestError) as ei:
            c.write(0, b"x" * 512)
        assert ei.value.errno in (errno.EPERM, errno.EROFS, errno.EINVAL)
        assert c.read(IMAGE_DATA[0][0], 6) == b"pynbd!"


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbd-server", "pynbd"])
def test_unknown_export_is_option_error(servers: Servers, kind: str) -> None:
    srv = servers.start(kind, export="real")
    c = Client.dial(srv.uri(), timeout=TIMEOUT)
    c.handshake()
    with pytest.raises(OptionError) as ei:
        c.go("no-such-export")
    assert ei.value.reply in (Rep.ERR_UNKNOWN, Rep.ERR_UNSUP, Rep.ERR_INVALID, Rep.ERR_POLICY)
    # negotiation continues after a refused option
    assert c.go("real").size == IMAGE_SIZE
    c.close()


def test_export_name_refused_is_clear(servers: Servers) -> None:
    srv = servers.start("qemu-nbd", export="real")
    c = Client.dial(srv.uri(), timeout=TIMEOUT)
    c.handshake()
    with pytest.raises(PeerProtocolError, match="refused"):
        c.export_name("no-such-export")


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_context_manager_teardown(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)
    # option phase only: abort
    with Client.dial(srv.uri(), timeout=TIMEOUT) as c:
        c.handshake()
        c.list_exports()
    assert c.close_result is not None and c.close_result.method == "abort"
    # transmission with requests in flight: drained, then closed
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        c.submit_read(0, 4096)
        c.submit_write(0, b"q" * 4096)
    assert c.close_result is not None and c.in_flight == 0
    # an exception inside the block still closes the connection
    with pytest.raises(ZeroDivisionError), connect(srv.uri(), timeout=TIMEOUT) as c:
        c.read(0, 512)
        raise ZeroDivisionError
    assert c.close_result is not None
    with connect(srv.uri(), timeout=TIMEOUT) as c2:
        assert c2.read(0, 1) == b"q"


def test_safe_close_write_durable_pynbd(servers: Servers) -> None:
    srv = servers.start("pynbd")
    c = connect(srv.uri(), timeout=TIMEOUT)
    assert c.can_safe_close()
    c.write(0, b"durable" * 100)
    res = c.close()
    assert res.safe and res.method == "x_close"
    with connect(srv.uri(), timeout=TIMEOUT, safe_close=False) as c2:
        assert not c2.can_safe_close()
        assert c2.read(0, 700) == b"durable" * 100
    assert c2.close_result is not None and c2.close_result.method == "flush+disc"


def test_large_requests_are_split(servers: Servers) -> None:
    srv = servers.start("nbdkit-memory")
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        c.max_request = 1 << 20  # force splitting of 5 MiB
        blob = bytes(range(256)) * (5 * 4096)
        c.write(0, blob)
        assert c.read(0, len(blob)) == blob


def test_two_meta_contexts_dirty_bitmap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from tests.support.nbd_servers import start_qemu_nbd
    img = tmp_path / "img.qcow2"
    for argv in (["qemu-img", "create", "-f", "qcow2", str(img), "8M"],
                 ["qemu-img", "bitmap", "--add", str(img), "b0"],
                 ["qemu-io", "-c", "write -P 0x41 1M 64k", str(img)]):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    srv = start_qemu_nbd(tmp_path / "srv", img, fmt="qcow2", transport="unix",
                         extra=["-B", "b0"])
    try:
        ctxs = ("base:allocation", "qemu:dirty-bitmap:b0")
        with connect(srv.uri(), meta_contexts=ctxs, timeout=TIMEOUT) as c:
            assert sorted(c.meta_contexts.values()) == sorted(ctxs)
            bs = c.block_status(0, 8 << 20)
            dirty = [(e.offset, e.length) for e in bs["qemu:dirty-bitmap:b0"] if e.flags & 1]
            assert dirty == [(1 << 20, 65536)]
            data = [(e.offset, e.length) for e in bs["base:allocation"] if not e.zero]
            assert data == [(1 << 20, 65536)]
        r = subprocess.run([sys.executable, "-m", "pynbd.cli.info", "--map=qemu:dirty-bitmap:b0",
                            srv.uri()], capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines()]
        assert ["1048576", "65536", "1", "dirty"] in rows
    finally:
        srv.stop()
