"""``pynbd serve`` driven by libnbd (python3-libnbd, strict mode on).

Covers every option libnbd can send (EXPORT_NAME via structured-replies-off old path is
in the qemu tests; here: LIST, INFO, GO with NAME/DESCRIPTION/BLOCK_SIZE, ABORT,
STRUCTURED_REPLY, LIST/SET_META_CONTEXT base:allocation) and every command with its
flags, in structured and simple reply modes, over TCP IPv4/IPv6 and Unix sockets, on
the memory and file backends.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from tests.support.pynbd_server import PynbdServer, ServerFactory, wait_until

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


def handle(uri: str | None = None, *, structured: bool = True, meta: bool = True,
           opt_mode: bool = False, export: str | None = None) -> nbd.NBD:
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if opt_mode:
        h.set_opt_mode(True)
    if export is not None:
        h.set_export_name(export)
    if uri is not None:
        h.connect_uri(uri)
    return h


def pattern(seed: int, n: int) -> bytes:
    unit = struct.pack(">QQ", seed, seed ^ 0xA5A5A5A5A5A5A5A5)
    return (unit * (n // 16 + 1))[:n]


def extents(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def cb(ctx: str, off: int, entries: list[int], err: int) -> int:
        assert ctx == nbd.CONTEXT_BASE_ALLOCATION
        out.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def chunks(h: nbd.NBD, length: int, offset: int, flags: int = 0) -> list[tuple[int, int, int]]:
    """(offset, length, status) of every chunk of a structured read."""
    out: list[tuple[int, int, int]] = []

    def cb(buf: bytes, off: int, status: int, err: int) -> int:
        out.append((off, len(buf), status))
        return 0

    h.pread_structured(length, offset, cb, flags)
    return sorted(out)


# --- options ------------------------------------------------------------------------


def test_list_info_go_abort(serve: ServerFactory, tmp_path: Path) -> None:
    cfg = tmp_path / "exports.toml"
    cfg.write_text(
        '[server]\ndefault_export = "b"\n'
        '[[export]]\nname = "a"\ntarget = "memory:1M"\ndescription = "first disk"\n'
        '[[export]]\nname = "b"\ntarget = "memory:2M"\n'
        '[[export]]\nname = "r/o é"\ntarget = "memory:3M"\nread_only = true\n'
        'description = "read-only, non-ASCII name"\n')
    srv = serve("--config", str(cfg))
    h = handle(srv.uri, opt_mode=True)
    listed: list[tuple[str, str]] = []
    def on_export(name: str, desc: str) -> int:
        listed.append((name, desc))
        return 0

    assert h.opt_list(on_export) == 3
    assert listed == [("a", "first disk"), ("b", ""), ("r/o é", "read-only, non-ASCII name")]
    h.set_full_info(True)
    for name, size, desc, ro in (("a", MiB, "first disk", False), ("b", 2 * MiB, "", False),
                                 ("r/o é", 3 * MiB, "read-only, non-ASCII name", True),
                                 ("", 2 * MiB, "", False)):
        h.set_export_name(name)
        h.opt_info()
        assert h.get_size() == size
        assert h.is_read_only() == ro
        assert h.get_canonical_export_name() == (name or "b")
        if desc:
            assert h.get_export_description() == desc
        assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB  # the default --max-request-size
    # unknown export: INFO fails, the connection stays usable
    h.set_export_name("nope")
    with pytest.raises(nbd.Error):
        h.opt_info()
    metas: list[str] = []
    h.set_export_name("a")
    def on_meta(name: str) -> int:
        metas.append(name)
        return 0

    assert h.opt_list_meta_context(on_meta) == 1
    assert metas == ["base:allocation"]
    h.opt_go()
    assert h.get_size() == MiB
    assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_export_description() == "first disk"
    h.pwrite(b"x" * 512, 0)
    h.shutdown()
    # ABORT
    h2 = handle(srv.uri, opt_mode=True)
    h2.opt_abort()
    assert h2.aio_is_closed()
    # the server is fine afterwards
    h3 = handle(srv.uri_for("nbd://").rsplit("/", 1)[0] + "/a")
    assert h3.pread(512, 0) == b"x" * 512
    h3.shutdown()


def test_export_name_option_old_path(serve: ServerFactory) -> None:
    """NBD_OPT_EXPORT_NAME (no GO): libnbd falls back to it with structured replies
    off and no meta contexts? Not reliably; drive it with nbd handshake flags 0."""
    srv = serve("-e", "disk", "memory:1M")
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.set_handshake_flags(0)  # plain newstyle: only NBD_OPT_EXPORT_NAME is possible
    h.set_request_structured_replies(False)
    h.set_export_name("disk")
    h.connect_uri(srv.uri_for("nbd://").rsplit("/", 1)[0] + "/disk")
    assert h.get_size() == MiB
    assert h.get_protocol() == "newstyle"
    h.pwrite(b"q" * 4096, 4096)
    assert h.pread(4096, 4096) == b"q" * 4096
    h.shutdown()
    # with NO_ZEROES only (fixed newstyle off): still EXPORT_NAME
    h = nbd.NBD()
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_NO_ZEROES)
    h.set_request_structured_replies(False)
    h.connect_uri(srv.uri_for("nbd://").rsplit("/", 1)[0] + "/disk")
    assert h.pread(4096, 4096) == b"q" * 4096
    h.shutdown()


def test_go_unknown_export_then_known(serve: ServerFactory) -> None:
    srv = serve("-e", "disk", "memory:1M")
    h = handle(srv.uri, opt_mode=True)
    h.set_export_name("missing")
    with pytest.raises(nbd.Error):
        h.opt_go()
    h.set_export_name("disk")
    h.opt_go()
    assert h.get_size() == MiB
    h.shutdown()


# --- commands -----------------------------------------------------------------------


@pytest.mark.parametrize("structured", [True, False])
def test_every_command(serve: ServerFactory, tmp_path: Path, structured: bool) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    srv = serve(str(img))
    h = handle(srv.uri, structured=structured, meta=structured)
    assert h.get_structured_replies_negotiated() == structured
    assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
    assert h.can_cache() and h.can_multi_conn() and h.can_fast_zero()
    assert h.can_df() == structured
    assert not h.is_read_only()
    data = pattern(1, 2 * MiB)
    h.pwrite(data, MiB)
    h.pwrite(data[:4096], 8 * MiB, nbd.CMD_FLAG_FUA)
    h.flush()
    assert h.pread(2 * MiB, MiB) == data
    assert h.pread(4096, 8 * MiB) == data[:4096]
    if structured:
        assert chunks(h, 4096, 8 * MiB, nbd.CMD_FLAG_DF) == [(8 * MiB, 4096, nbd.READ_DATA)]
    h.cache(MiB, MiB)
    model = bytearray(4 * MiB)
    model[MiB:3 * MiB] = data
    h.trim(64 * 1024, MiB, nbd.CMD_FLAG_FUA)  # count, offset
    model[MiB:MiB + 64 * 1024] = bytes(64 * 1024)  # punched: reads as zeros here
    h.zero(128 * 1024, MiB + 128 * 1024, nbd.CMD_FLAG_NO_HOLE)
    model[MiB + 128 * 1024:MiB + 256 * 1024] = bytes(128 * 1024)
    h.zero(64 * 1024, 2 * MiB, nbd.CMD_FLAG_FUA)
    model[2 * MiB:2 * MiB + 64 * 1024] = bytes(64 * 1024)
    h.zero(4096, 3 * MiB - 4096, nbd.CMD_FLAG_FAST_ZERO)
    model[3 * MiB - 4096:3 * MiB] = bytes(4096)
    assert h.pread(3 * MiB, MiB) == model[MiB:]
    # errors libnbd lets through to the server with strict mode bits cleared
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as ei:
        h.pread(4096, 16 * MiB)
    assert ei.value.errno in (errno.EINVAL, "EINVAL")
    with pytest.raises(nbd.Error) as ei:
        h.pwrite(b"z" * 4096, 16 * MiB - 2048)
    assert ei.value.errno in (errno.ENOSPC, "ENOSPC")
    with pytest.raises(nbd.Error) as ei:
        h.zero(4096, 16 * MiB)
    assert ei.value.errno in (errno.ENOSPC, "ENOSPC")
    h.set_strict_mode(nbd.STRICT_MASK)
    assert h.pread(4096, 16 * MiB - 4096) == bytes(4096)
    h.shutdown()
    with open(img, "rb") as f:
        f.seek(8 * MiB)
        assert f.read(4096) == data[:4096]


@pytest.mark.parametrize("target", ["file", "memory"])
def test_sparse_read_and_block_status(serve: ServerFactory, tmp_path: Path,
                                      target: str) -> None:
    img = tmp_path / "sparse.img"
    if target == "file":
        with open(img, "wb") as f:
            f.truncate(32 * MiB)
            f.seek(4 * MiB)
            f.write(pattern(2, MiB))
        srv = serve(str(img))
    else:
        srv = serve("memory:32M")
    h = handle(srv.uri)
    if target == "memory":
        h.pwrite(pattern(2, MiB), 4 * MiB)
    # a read over hole + data + hole: OFFSET_HOLE chunks for the holes
    got = chunks(h, 8 * MiB, 2 * MiB)
    holes = [(o, n) for o, n, st in got if st == nbd.READ_HOLE]
    datas = [(o, n) for o, n, st in got if st == nbd.READ_DATA]
    assert holes and datas
    assert sum(n for _, n in holes) + sum(n for _, n in datas) == 8 * MiB
    assert (2 * MiB, 2 * MiB) in holes and (4 * MiB, MiB) in datas
    assert h.pread(8 * MiB, 2 * MiB) == bytes(2 * MiB) + pattern(2, MiB) + bytes(5 * MiB)
    # DF: a single data chunk, no holes
    got = chunks(h, 4 * MiB, 2 * MiB, nbd.CMD_FLAG_DF)
    assert got == [(2 * MiB, 4 * MiB, nbd.READ_DATA)]
    # block status
    ext = extents(h, 8 * MiB, 2 * MiB)
    assert ext[0] == (2 * MiB, nbd.STATE_HOLE | nbd.STATE_ZERO)
    assert ext[1] == (MiB, 0)
    assert ext[2][1] == nbd.STATE_HOLE | nbd.STATE_ZERO
    assert sum(n for n, _ in ext) <= 8 * MiB
    one = extents(h, 8 * MiB, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert one == [(2 * MiB, 3)]
    # after TRIM: a hole again
    h.trim(MiB, 4 * MiB)
    ext = extents(h, 2 * MiB, 4 * MiB)
    assert ext[0] == (2 * MiB, 3) or ext[0][1] & nbd.STATE_ZERO
    # after WRITE_ZEROES (may trim): zero; with NO_HOLE: zero but allocated (file: data)
    h.pwrite(pattern(3, 2 * MiB), 8 * MiB)
    h.zero(MiB, 8 * MiB)
    ext = extents(h, MiB, 8 * MiB)
    assert ext[0][1] & nbd.STATE_ZERO and ext[0][0] == MiB
    h.pwrite(pattern(3, 2 * MiB), 10 * MiB)
    h.zero(MiB, 10 * MiB, nbd.CMD_FLAG_NO_HOLE)
    assert h.pread(MiB, 10 * MiB) == bytes(MiB)
    ext = extents(h, MiB, 10 * MiB)
    assert not ext[0][1] & nbd.STATE_HOLE  # NO_HOLE: still allocated
    h.shutdown()
    if target == "file":
        st = os.stat(img)
        assert st.st_blocks * 512 < 8 * MiB  # holes punched, not written


def test_multi_conn_flush_visibility(serve: ServerFactory, tmp_path: Path) -> None:
    img = tmp_path / "mc.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    srv = serve(str(img))
    h1, h2 = handle(srv.uri), handle(srv.uri)
    assert h1.can_multi_conn() and h2.can_multi_conn()
    for i in range(8):
        data = pattern(100 + i, 64 * 1024)
        h1.pwrite(data, i * 64 * 1024)
        h2.flush()  # a flush on one connection covers writes acknowledged on the other
        assert h2.pread(64 * 1024, i * 64 * 1024) == data
        h2.pwrite(data[::-1], MiB + i * 4096, nbd.CMD_FLAG_FUA)
        assert h1.pread(64 * 1024, MiB + i * 4096)[:4096] == data[::-1][:4096]
    h1.shutdown()
    h2.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_pipelined_64_deep(serve: ServerFactory, structured: bool) -> None:
    srv = serve("memory:64M")
    h = handle(srv.uri, structured=structured, meta=False)
    size = 64 * 1024
    n = 256
    written: dict[int, bytes] = {}
    pending: list[int] = []
    # writes, 64 in flight
    for i in range(n):
        data = pattern(i, size)
        off = (i * 7919 % n) * size
        written[off] = data
        pending.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    for _ in range(10000):
        if h.aio_in_flight() == 0:
            break
        h.poll(-1)
    for c in pending:
        assert h.aio_command_completed(c)
    # reads, 64 in flight, verified
    bufs: dict[int, tuple[int, nbd.Buffer]] = {}
    offs = list(written)
    for off in offs:
        buf = nbd.Buffer(size)
        cookie = h.aio_pread(buf, off)
        bufs[cookie] = (off, buf)
        while h.aio_in_flight() >= 64:
            h.poll(-1)
    for _ in range(10000):
        if h.aio_in_flight() == 0:
            break
        h.poll(-1)
    for cookie, (off, buf) in bufs.items():
        assert h.aio_command_completed(cookie)
        assert buf.to_bytearray() == written[off]
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_32mib_requests(serve: ServerFactory, tmp_path: Path, structured: bool) -> None:
    img = tmp_path / "big.img"
    with open(img, "wb") as f:
        f.truncate(80 * MiB)
    srv = serve(str(img))
    h = handle(srv.uri, structured=structured)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) >= 32 * MiB
    data = pattern(32, 32 * MiB)
    h.pwrite(data, 4096)
    h.pwrite(data, 40 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(32 * MiB, 4096) == data
    assert h.pread(32 * MiB, 40 * MiB) == data
    h.zero(32 * MiB, 40 * MiB)
    assert h.pread(32 * MiB, 40 * MiB) == bytes(32 * MiB)
    h.shutdown()


@pytest.mark.parametrize("structured", [True, False])
def test_read_only_export(serve: ServerFactory, structured: bool) -> None:
    srv = serve("-r", "memory:4M")
    h = handle(srv.uri, structured=structured, meta=structured)
    assert h.is_read_only()
    assert not h.can_trim() and not h.can_zero() and not h.can_fua()
    assert h.pread(4096, 0) == bytes(4096)
    h.set_strict_mode(0)  # let the requests reach the server
    for name, args in (("pwrite", (b"a" * 4096, 0)), ("trim", (4096, 0)),
                       ("zero", (4096, 0))):
        with pytest.raises(nbd.Error) as ei:
            getattr(h, name)(*args)
        assert ei.value.errno in (errno.EPERM, "EPERM")
    h.flush()
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


# --- transports and config ----------------------------------------------------------


def test_tcp_ipv4_ipv6_unix(serve: ServerFactory) -> None:
    srv4 = serve("memory:1M", bind="127.0.0.1", unix=True)
    uris = [srv4.uri_for("nbd://"), srv4.uri_for("nbd+unix://")]
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        srv6 = serve("memory:1M", bind="::1")
        u6 = srv6.uri_for("nbd://")
        assert u6.startswith("nbd://[::1]:")
        uris.append(u6)
    except OSError:
        pytest.fail("IPv6 loopback unavailable")
    for i, uri in enumerate(uris):
        h = handle(uri)
        h.pwrite(bytes([i + 1]) * 512, 512 * i)
        assert h.pread(512, 512 * i) == bytes([i + 1]) * 512
        h.shutdown()


def test_default_bind_listens_on_ipv4_and_ipv6(serve: ServerFactory, tmp_path: Path) -> None:
    """No --bind: every address, IPv6 and IPv4 (dual-stack socket)."""
    srv = PynbdServer(["--port", "0", "memory:1M"], cwd=tmp_path)
    serve.servers.append(srv)
    port = srv.port
    for host in ("127.0.0.1", "[::1]"):
        h = handle(f"nbd://{host}:{port}/")
        assert h.get_size() == MiB
        h.shutdown()


def test_named_exports_from_config(serve: ServerFactory, tmp_path: Path) -> None:
    img = tmp_path / "f.img"
    img.write_bytes(pattern(9, 2 * MiB))
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[[export]]\nname = "file"\ntarget = "{img}"\n'
        '[[export]]\nname = "mem"\ntarget = "memory:8M"\n'
        f'[[export]]\nname = "file-ro"\ntarget = "{img}"\nread_only = true\n')
    srv = serve("--config", str(cfg), unix=True)
    base = srv.uri_for("nbd://").rsplit("/", 1)[0]
    for name, size, ro in (("file", 2 * MiB, False), ("mem", 8 * MiB, False),
                           ("file-ro", 2 * MiB, True), ("", 2 * MiB, False)):
        h = handle(f"{base}/{name}")
        assert h.get_size() == size and h.is_read_only() == ro
        h.shutdown()
    # default export = first export; write via "file", read via "" and via unix "file-ro"
    h = handle(f"{base}/file")
    h.pwrite(b"W" * 4096, 0)
    h.shutdown()
    h = handle(f"{base}/")
    assert h.pread(4096, 0) == b"W" * 4096
    h.shutdown()
    unix = srv.uri_for("nbd+unix://")
    h = handle(unix.replace(":///", ":///file-ro", 1) if ":///?" in unix else unix)
    assert h.pread(4096, 0) == b"W" * 4096
    h.shutdown()
    h = handle(f"{base}/mem")
    assert h.pread(4096, 0) == bytes(4096)
    h.shutdown()


def test_sigterm_finishes_inflight(serve: ServerFactory, tmp_path: Path) -> None:
    img = tmp_path / "t.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    srv = serve(str(img))
    # raw client: pipeline 24 x 1 MiB reads and 8 writes, stop reading, SIGTERM
    from tests.server.rawnbd import CMD_READ, CMD_WRITE, REQUEST_MAGIC, Raw

    r = Raw(("127.0.0.1", srv.port)).connect("", structured=False)
    reqs = []
    for i in range(8):
        reqs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1000 + i, i * MiB,
                                65536) + pattern(i, 65536))
    for i in range(24):
        reqs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, i, i * MiB, MiB))
    r.send(b"".join(reqs))
    time.sleep(0.3)  # the server has read the requests and is blocked sending replies
    srv.proc.send_signal(signal.SIGTERM)
    got = {}
    for _ in range(32):
        cookie, err, data = r.response(MiB if _ >= 8 else 0)
        got[cookie] = (err, data)
    assert all(got[1000 + i][0] == 0 for i in range(8))
    for i in range(24):
        err, data = got[i]
        assert err == 0
        if i < 8:
            assert data[:65536] == pattern(i, 65536)
    r.close()
    assert wait_until(lambda: not srv.alive(), 20)
    assert srv.proc.returncode == 0
    with open(img, "rb") as f:
        for i in range(8):
            f.seek(i * MiB)
            assert f.read(65536) == pattern(i, 65536)


def test_sigterm_with_libnbd_writes(serve: ServerFactory, tmp_path: Path) -> None:
    """Writes acknowledged before the server stops are on disk afterwards."""
    img = tmp_path / "w.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    srv = serve(str(img))
    h = handle(srv.uri)
    cookies = {}
    for i in range(48):
        data = pattern(500 + i, 256 * 1024)
        c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), i * MiB)
        cookies[c] = (i, data)
    srv.proc.send_signal(signal.SIGTERM)
    ok = []
    for _ in range(5000):
        if h.aio_in_flight() == 0 or h.aio_is_dead() or h.aio_is_closed():
            break
        try:
            h.poll(1000)
        except nbd.Error:
            break
    for c, (i, data) in cookies.items():
        try:
            if h.aio_command_completed(c):
                ok.append((i, data))
        except nbd.Error:
            pass
    assert wait_until(lambda: not srv.alive(), 20)
    assert srv.proc.returncode == 0
    with open(img, "rb") as f:
        for i, data in ok:
            f.seek(i * MiB)
            assert f.read(len(data)) == data


def test_sigterm_with_idle_clients(serve: ServerFactory) -> None:
    """Idle connections (transmission and mid-handshake) do not keep SIGTERM waiting."""
    srv = serve("memory:4M")
    h = handle(srv.uri)
    h.pwrite(b"i" * 4096, 0)
    stalled = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    stalled.recv(18)  # greeting read, nothing sent back
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: not srv.alive(), 15)
    assert srv.proc.returncode == 0
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    stalled.close()
