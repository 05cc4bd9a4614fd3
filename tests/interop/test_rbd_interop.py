"""``pynbd serve rbd:POOL/IMAGE[@SNAP]`` driven by clients nobody here wrote (nbdinfo,
qemu-img, qemu-io, nbdcopy, python3-libnbd) against the real single-node Ceph cluster."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
import rados
import rbd
from tests.support.ceph_cluster import CephCluster
from tests.support.net import free_port
from tests.support.pynbd_server import PynbdServer, ServerFactory

pytestmark = [pytest.mark.interop, pytest.mark.ceph]

MiB = 1 << 20
OBJ = 4 * MiB
SIZE = 32 * MiB
_names = itertools.count()


def run(*cmd: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{cmd}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def admin(ceph_cephx: CephCluster) -> Iterator[rados.Ioctx]:
    conf = {"keyring": str(ceph_cephx.keyring_path), "client_mount_timeout": "15"}
    r = rados.Rados(conffile=str(ceph_cephx.conf_path), name="client.admin", conf=conf)
    r.connect(timeout=15)
    io = r.open_ioctx("rbd")
    yield io
    io.close()
    r.shutdown()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[ServerFactory]:
    factory = ServerFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def image(admin: rados.Ioctx, servers: ServerFactory) -> Iterator[str]:
    name = f"nbd{os.getpid()}-{next(_names)}"
    rbd.RBD().create(admin, name, SIZE)
    yield name
    servers.close()  # their librbd watches keep the image busy
    with rbd.Image(admin, name) as img:
        for snap in list(img.list_snaps()):
            img.remove_snap(snap["name"])
    rbd.RBD().remove(admin, name)


@pytest.fixture
def serve_rbd(servers: ServerFactory, ceph_cephx: CephCluster) -> Callable[..., PynbdServer]:
    def start(spec: str, *extra: str) -> PynbdServer:
        return servers("--ceph-conf", str(ceph_cephx.conf_path),
                       "--ceph-keyring", str(ceph_cephx.keyring_path), *extra, f"rbd:{spec}")

    return start


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h: nbd.NBD, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) runs of base:allocation over the whole range."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    got: list[int] = []

    def cb(metacontext: str, off: int, entries: list[int], err: int) -> int:
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0

    while pos < end:
        got.clear()
        h.block_status(end - pos, pos, cb)
        assert got, "no base:allocation reply"
        for i in range(0, len(got), 2):
            n = min(got[i], end - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= end:
                break
    return out


def flags_at(runs: list[tuple[int, int, int]], offset: int) -> int:
    return next(f for o, n, f in runs if o <= offset < o + n)


HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


# ------------------------------------------------------------------------------ tests
def test_nbdinfo(serve_rbd: Callable[..., PynbdServer], image: str) -> None:
    srv = serve_rbd(f"rbd/{image}")
    info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == SIZE
    assert exp["can_multi_conn"] and exp["can_trim"] and exp["can_flush"] and exp["can_fua"]
    assert exp["can_zero"] and not exp["is_read_only"]
    assert "base:allocation" in exp["contexts"]
    # a fresh image is one hole
    m = run("nbdinfo", "--map", "--json", srv.uri).stdout
    assert json.loads(m) == [{"offset": 0, "length": SIZE, "type": 3, "description": "hole,zero"}]


def test_qemu_img_convert_compare_map(serve_rbd: Callable[..., PynbdServer], image: str,
                                      tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        f.write(randbytes(MiB, 1))
        f.seek(20 * MiB)
        f.write(randbytes(3 * MiB + 5, 2))
    srv = serve_rbd(f"rbd/{image}")
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri)
    out = tmp_path / "out.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out))
    assert out.read_bytes() == src.read_bytes()
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", srv.uri).stdout)
    assert sum(e["length"] for e in m) == SIZE
    data = [e for e in m if e["data"]]
    assert any(e["start"] <= 0 < e["start"] + e["length"] for e in data)
    assert any(e["start"] <= 21 * MiB < e["start"] + e["length"] for e in data)
    assert any(not e["data"] and e["start"] <= 10 * MiB < e["start"] + e["length"] for e in m)


def test_qemu_io_write_read_discard_zero(serve_rbd: Callable[..., PynbdServer],
                                         image: str) -> None:
    srv = serve_rbd(f"rbd/{image}")
    run("qemu-io", "-f", "raw", srv.uri,
        "-c", "write -P 0x55 0 12M", "-c", "write -f -P 0xaa 100k 64k", "-c", "flush",
        "-c", "discard 4M 4M", "-c", "write -z -u 8M 4M", "-c", "write -z 512 512")
    r = run("qemu-io", "-f", "raw", "-r", srv.uri,
            "-c", "read -P 0x55 0 512", "-c", "read -P 0 512 512",
            "-c", "read -P 0x55 1024 99k", "-c", "read -P 0xaa 100k 64k",
            "-c", "read -P 0 8M 4M", "-c", "read -P 0 12M 4M")
    assert "Pattern verification failed" not in r.stdout + r.stderr
    h = connect(srv.uri)
    try:
        runs = block_status(h, 0, SIZE)
        assert flags_at(runs, 0) == 0
        assert flags_at(runs, 4 * MiB) & nbd.STATE_HOLE  # discarded object
        assert flags_at(runs, 8 * MiB) == HOLE_ZERO  # zeroed whole object
        assert flags_at(runs, 20 * MiB) == HOLE_ZERO  # never written
        assert h.pread(4, 8 * MiB) == bytes(4)
    finally:
        h.shutdown()


def test_nbdcopy_round_trip(serve_rbd: Callable[..., PynbdServer], image: str,
                            tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for i, off in enumerate((0, 7 * MiB + 123, 17 * MiB, SIZE - MiB)):
            f.seek(off)
            f.write(randbytes(MiB - 1, 10 + i))
    srv = serve_rbd(f"rbd/{image}")
    # nbdcopy opens several connections when multi-conn is advertised
    run("nbdcopy", "--flush", "--connections=4", "--requests=32", str(src), srv.uri)
    back = tmp_path / "back.img"
    run("nbdcopy", srv.uri, str(back))
    assert back.read_bytes() == src.read_bytes()
    # sparse-aware: holes in the RBD image stay holes in the copy
    m = json.loads(run("nbdinfo", "--map", "--json", srv.uri).stdout)
    assert any(e["type"] == 3 and e["offset"] <= 25 * MiB < e["offset"] + e["length"]
               for e in m)


def test_libnbd_round_trip_trim_zero(serve_rbd: Callable[..., PynbdServer],
                                     image: str) -> None:
    srv = serve_rbd(f"rbd/{image}")
    h = connect(srv.uri)
    try:
        assert h.get_size() == SIZE
        assert h.can_multi_conn() and h.can_trim() and h.can_zero() and h.can_fast_zero()
        assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        data = randbytes(3 * OBJ, 7)
        h.pwrite(data, OBJ)
        h.pwrite(b"fua!" * 1024, 0, nbd.CMD_FLAG_FUA)
        h.flush()
        assert h.pread(len(data), OBJ) == data
        assert h.pread(4096, 0) == b"fua!" * 1024
        assert block_status(h, OBJ, OBJ) == [(OBJ, OBJ, 0)]
        h.trim(OBJ, 2 * OBJ)  # whole object: becomes a hole
        runs = block_status(h, 0, SIZE)
        assert flags_at(runs, 2 * OBJ) == HOLE_ZERO
        assert flags_at(runs, 3 * OBJ) == 0
        assert h.pread(4096, 2 * OBJ) == bytes(4096)
        h.zero(50, 3 * OBJ, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(8192, 3 * OBJ) == bytes(50) + data[2 * OBJ + 50:2 * OBJ + 8192]
        h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(4096, 0) == bytes(4096)
        assert flags_at(block_status(h, 0, OBJ), 0) == 0  # NO_HOLE keeps it allocated
        h.cache(OBJ, 0)
        # many requests in flight at once
        bufs = [randbytes(65536, 100 + i) for i in range(64)]
        cookies = [h.aio_pwrite(b, 16 * MiB + i * 65536) for i, b in enumerate(bufs)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        h.flush()
        assert h.pread(64 * 65536, 16 * MiB) == b"".join(bufs)
    finally:
        h.shutdown()


def test_snapshot_export_is_read_only(serve_rbd: Callable[..., PynbdServer], image: str,
                                      admin: rados.Ioctx) -> None:
    with rbd.Image(admin, image) as img:
        img.write(b"snapshot" * 512, 0)
        img.create_snap("s1")
        img.write(b"newdata!" * 512, 0)
    srv = serve_rbd(f"rbd/{image}@s1")
    info = json.loads(run("nbdinfo", "--json", srv.uri).stdout)["exports"][0]
    assert info["is_read_only"] and not info["can_trim"]
    r = run("qemu-io", "-f", "raw", srv.uri, "-c", "write -P 1 0 4k", ok=False)
    assert r.returncode != 0 or "failed" in (r.stdout + r.stderr).lower()
    h = connect(srv.uri)
    try:
        assert h.is_read_only()
        assert h.pread(4096, 0) == b"snapshot" * 512
        with pytest.raises(nbd.Error):
            h.pwrite(b"x" * 512, 0)
        runs = block_status(h, 0, SIZE)
        assert flags_at(runs, 0) == 0 and flags_at(runs, 8 * MiB) == HOLE_ZERO
    finally:
        h.shutdown()
    # the head image kept its own data
    with rbd.Image(admin, image, read_only=True) as img:
        assert img.read(0, 8) == b"newdata!"


def test_two_servers_same_image(serve_rbd: Callable[..., PynbdServer], image: str) -> None:
    a = serve_rbd(f"rbd/{image}")
    b = serve_rbd(f"rbd/{image}")
    ha, hb = connect(a.uri), connect(b.uri)
    try:
        # librbd's default cache policy keeps no reads: both must advertise multi-conn
        assert ha.can_multi_conn() and hb.can_multi_conn()
        for rnd in range(4):
            writer, reader = (ha, hb) if rnd % 2 == 0 else (hb, ha)
            data = randbytes(OBJ + 4096, rnd)
            writer.pwrite(data, 2 * MiB)
            writer.flush()
            assert reader.pread(len(data), 2 * MiB) == data
        ha.trim(3 * OBJ, OBJ)
        ha.flush()
        assert flags_at(block_status(hb, 0, SIZE), 3 * OBJ) & nbd.STATE_HOLE
    finally:
        ha.shutdown()
        hb.shutdown()


def test_missing_image_fails_clearly(serve_rbd: Callable[..., PynbdServer]) -> None:
    with pytest.raises(RuntimeError) as ei:
        serve_rbd("rbd/no-such-image")
    assert "no-such-image" in str(ei.value) and "does not exist" in str(ei.value)


@pytest.mark.timeout(90)
def test_unreachable_cluster_fails_clearly(servers: ServerFactory, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    conf = tmp_path / "unreachable.conf"
    conf.write_text(f"[global]\nmon_host = [v2:127.0.0.1:{port}]\nms_bind_msgr1 = false\n"
                    "auth_client_required = none\n")
    with pytest.raises(RuntimeError) as ei:
        servers("--ceph-conf", str(conf), "rbd:rbd/img")
    assert "cannot reach the Ceph cluster" in str(ei.value) and str(port) in str(ei.value)


def test_failed_rbd_export_does_not_stop_the_others(servers: ServerFactory,
                                                   ceph_cephx: CephCluster,
                                                   image: str, tmp_path: Path) -> None:
    cfg = tmp_path / "exports.toml"
    cfg.write_text(
        '[[export]]\nname = "scratch"\ntarget = "memory:8M"\n\n'
        '[[export]]\nname = "gone"\ntarget = "rbd:rbd/no-such-image"\n\n'
        f'[[export]]\nname = "ceph"\ntarget = "rbd:rbd/{image}"\n')
    srv = servers("--ceph-conf", str(ceph_cephx.conf_path),
                  "--ceph-keyring", str(ceph_cephx.keyring_path), "--config", str(cfg))
    base = srv.uri.rsplit("/", 1)[0]
    listed = run("nbdinfo", "--list", "--json", srv.uri)
    names = sorted(e["export-name"] for e in json.loads(listed.stdout)["exports"])
    assert names == ["ceph", "scratch"]
    assert run("nbdinfo", "--size", f"{base}/ceph").stdout.strip() == str(SIZE)
    assert run("nbdinfo", "--size", f"{base}/scratch").stdout.strip() == str(8 * MiB)
    gone = run("nbdinfo", "--size", f"{base}/gone", ok=False)
    assert gone.returncode != 0
    assert "no-such-image" in srv.stderr and "cannot open" in srv.stderr


# ------------------------------------------------- the aio path (librbd completions)
def _drive(h: nbd.NBD, start: list[Callable[[], int]], depth: int) -> list[tuple[int, int]]:
    """Start requests with up to ``depth`` in flight on ``h``; (index, cookie) each."""
    cookies: list[tuple[int, int]] = []
    for i, fn in enumerate(start):
        cookies.append((i, fn()))
        while h.aio_in_flight() >= depth:
            h.poll(-1)
    for _ in range(100000):
        if h.aio_in_flight() == 0:
            break
        h.poll(-1)
    assert h.aio_in_flight() == 0
    return cookies


def test_pipelined_requests_on_two_connections(serve_rbd: Callable[..., PynbdServer],
                                              image: str) -> None:
    """Two connections, each with up to 48 requests in flight at once (writes, FUA
    writes, zeroes, reads, flushes) on its own half of the image, driven by two
    threads: every request completes, and every read returns what the model says."""
    srv = serve_rbd(f"rbd/{image}")
    model = bytearray(SIZE)
    slot = 256 * 1024
    errors: list[BaseException] = []

    def client(seed: int, base: int) -> None:
        try:
            h = connect(srv.uri)
            rnd = random.Random(seed)
            bufs: list[nbd.Buffer] = []
            ops: list[Callable[[], int]] = []
            for s in range(base, base + SIZE // 2, slot):  # one request per slot at once
                kind = rnd.choice(("write", "write", "fua", "zero", "zero-nohole"))
                off = s + rnd.randrange(0, slot // 2)
                n = rnd.randrange(1, slot // 2)
                if kind in ("write", "fua"):
                    data = rnd.randbytes(n)
                    model[off:off + n] = data
                    b = nbd.Buffer.from_bytearray(bytearray(data))
                    bufs.append(b)
                    flags = nbd.CMD_FLAG_FUA if kind == "fua" else 0
                    ops.append(lambda b=b, off=off, flags=flags: h.aio_pwrite(b, off,
                                                                              flags=flags))
                else:
                    model[off:off + n] = bytes(n)
                    flags = nbd.CMD_FLAG_NO_HOLE if kind == "zero-nohole" else 0
                    ops.append(lambda off=off, n=n, flags=flags: h.aio_zero(n, off,
                                                                            flags=flags))
                if rnd.random() < 0.1:
                    ops.append(lambda: h.aio_flush())
            for _, cookie in _drive(h, ops, 48):
                assert h.aio_command_completed(cookie)
            h.flush()
            # reads of every slot, pipelined, checked against the model
            reads: list[tuple[int, nbd.Buffer]] = []
            starts: list[Callable[[], int]] = []
            for s in range(base, base + SIZE // 2, slot):
                rb = nbd.Buffer(slot)
                reads.append((s, rb))
                starts.append(lambda rb=rb, s=s: h.aio_pread(rb, s))
            for i, cookie in _drive(h, starts, 48):
                assert h.aio_command_completed(cookie)
                s, rb = reads[i]
                assert rb.to_bytearray() == model[s:s + slot], s
            h.shutdown()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, i * SIZE // 2)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    # a third connection sees all of it
    h = connect(srv.uri)
    try:
        assert h.pread(SIZE, 0) == model
    finally:
        h.shutdown()


def test_write_past_the_end(serve_rbd: Callable[..., PynbdServer], image: str,
                            admin: rados.Ioctx) -> None:
    """Past the export's end the server refuses (ENOSPC for writes, as the spec says);
    past the end of an image shrunk under the export, librbd refuses in the completion
    and the client gets EINVAL; a read across the new end returns zeros past it."""
    srv = serve_rbd(f"rbd/{image}")
    h = connect(srv.uri)
    try:
        h.set_strict_mode(0)  # let the requests reach the server
        with pytest.raises(nbd.Error) as ei:
            h.pwrite(b"x" * 4096, SIZE - 512)
        assert ei.value.errnum == errno.ENOSPC
        with pytest.raises(nbd.Error) as ei:
            h.zero(4096, SIZE)
        assert ei.value.errnum == errno.ENOSPC
        with pytest.raises(nbd.Error) as ei:
            h.pread(4096, SIZE)
        assert ei.value.errnum == errno.EINVAL
        data = randbytes(8192, 3)
        h.pwrite(data, 16 * MiB - 4096, nbd.CMD_FLAG_FUA)  # takes the exclusive lock
        with rbd.Image(admin, image) as img:
            img.resize(16 * MiB)  # carried out by the lock owner: the server's librbd
        for op in (lambda: h.pwrite(b"y" * 4096, 20 * MiB), lambda: h.pread(4096, 20 * MiB),
                   lambda: h.zero(4096, 20 * MiB)):
            with pytest.raises(nbd.Error) as ei:
                op()
            assert ei.value.errnum == errno.EINVAL
        assert h.pread(8192, 16 * MiB - 4096) == data[:4096] + bytes(4096)
        assert h.get_size() == SIZE  # the export keeps its size until a restart
        assert h.pread(4096, 0) == bytes(4096)  # and the rest keeps working
    finally:
        h.shutdown()
    assert srv.alive()


def _watcher(cluster: CephCluster, spec: str) -> str:
    out = cluster.run("rbd", "status", spec).stdout
    addrs = re.findall(r"watcher=(\S+)", out)
    assert len(addrs) == 1, out
    return addrs[0]


def test_errors_from_librbd_reach_the_client(servers: ServerFactory, ceph_cephx: CephCluster,
                                             image: str, tmp_path: Path) -> None:
    """The server's librbd client is blocklisted: every request on the RBD export fails
    in its completion with ESHUTDOWN, which the client receives as such; the memory
    export of the same server, and the server, keep working."""
    cfg = tmp_path / "exports.toml"
    cfg.write_text('[[export]]\nname = "scratch"\ntarget = "memory:8M"\n\n'
                   f'[[export]]\nname = "ceph"\ntarget = "rbd:rbd/{image}"\n')
    srv = servers("--ceph-conf", str(ceph_cephx.conf_path),
                  "--ceph-keyring", str(ceph_cephx.keyring_path), "--config", str(cfg))
    base = srv.uri.rsplit("/", 1)[0]
    h = connect(f"{base}/ceph")
    h.pwrite(b"before" * 100, 0, nbd.CMD_FLAG_FUA)
    addr = _watcher(ceph_cephx, f"rbd/{image}")
    ceph_cephx.ceph("osd", "blocklist", "add", addr)
    try:
        for op in (lambda: h.pread(4096, 0), lambda: h.pwrite(b"x" * 4096, 8192),
                   lambda: h.flush(), lambda: h.trim(OBJ, OBJ), lambda: h.zero(4096, 0),
                   lambda: h.pwrite(b"f" * 512, 0, nbd.CMD_FLAG_FUA)):
            with pytest.raises(nbd.Error) as ei:
                op()
            assert ei.value.errnum == errno.ESHUTDOWN, ei.value
        # many at once: each answered with the error, the connection stays usable
        cookies = [h.aio_pread(nbd.Buffer(4096), i * 4096) for i in range(32)]
        while h.aio_in_flight():
            h.poll(-1)
        for c in cookies:
            with pytest.raises(nbd.Error) as ei:
                h.aio_command_completed(c)
            assert ei.value.errnum == errno.ESHUTDOWN
        m = connect(f"{base}/scratch")
        m.pwrite(b"memory" * 100, 0)
        assert m.pread(600, 0) == b"memory" * 100
        m.shutdown()
        h.shutdown()
        assert srv.alive()
    finally:
        ceph_cephx.ceph("osd", "blocklist", "rm", addr)


def test_flushed_writes_survive_sigkill(serve_rbd: Callable[..., PynbdServer], image: str,
                                        ceph_cephx: CephCluster) -> None:
    """Pipelined writes, then FLUSH; FUA writes without a flush: all of it is in the
    image after the server is SIGKILLed (no close, no final flush) and a new one
    serves it."""
    srv = serve_rbd(f"rbd/{image}")
    h = connect(srv.uri)
    flushed = [(i * 300 * 1024, randbytes(200 * 1024 + i, 40 + i)) for i in range(48)]
    cookies = _drive(h, [lambda o=o, d=d: h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)),
                                                       o)
                         for o, d in flushed], 32)
    for _, c in cookies:
        assert h.aio_command_completed(c)
    h.flush()
    fua = [(20 * MiB + i * 65536, randbytes(65536, 200 + i)) for i in range(16)]
    cookies = _drive(h, [lambda o=o, d=d: h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)),
                                                       o, flags=nbd.CMD_FLAG_FUA)
                         for o, d in fua], 16)
    for _, c in cookies:
        assert h.aio_command_completed(c)
    addr = _watcher(ceph_cephx, f"rbd/{image}")
    srv.proc.kill()
    srv.proc.wait(10)
    # the dead client's watch and lock would linger for 30 s: evict it, as an operator would
    ceph_cephx.ceph("osd", "blocklist", "add", addr)
    try:
        again = serve_rbd(f"rbd/{image}")
        h2 = connect(again.uri)
        try:
            for off, data in flushed + fua:
                assert h2.pread(len(data), off) == data, off
            h2.pwrite(b"new owner" * 100, 0, nbd.CMD_FLAG_FUA)  # takes over the lock
        finally:
            h2.shutdown()
    finally:
        ceph_cephx.ceph("osd", "blocklist", "rm", addr)


def test_sigterm_with_requests_in_flight(serve_rbd: Callable[..., PynbdServer], image: str,
                                         admin: rados.Ioctx) -> None:
    """SIGTERM while 64 writes of 256 KiB are in flight: the server answers what it
    received, flushes and exits; every write the client saw acknowledged is in the
    image."""
    srv = serve_rbd(f"rbd/{image}")
    h = connect(srv.uri)
    writes = [(i * 256 * 1024, randbytes(256 * 1024, 500 + i)) for i in range(64)]
    cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), o) for o, d in writes]
    srv.proc.terminate()
    acked: list[tuple[int, bytes]] = []
    for _ in range(100000):
        if not h.aio_in_flight():
            break
        try:
            h.poll(1000)
        except nbd.Error:  # the connection closed
            break
    for (off, data), c in zip(writes, cookies, strict=True):
        try:
            if h.aio_command_completed(c):
                acked.append((off, data))
        except nbd.Error:
            pass  # not received before the server stopped reading, or dropped
    assert srv.proc.wait(60) == 0, srv.stderr[-3000:]
    del h  # the connection went with the server
    assert acked, "no write was answered before the server stopped"
    with rbd.Image(admin, image, read_only=True) as img:
        for off, data in acked:
            assert img.read(off, len(data)) == data, off


def test_workers_2_serves_rbd_from_one_process(serve_rbd: Callable[..., PynbdServer],
                                               image: str, ceph_cephx: CephCluster,
                                               tmp_path: Path) -> None:
    """``--workers 2``: an RBD export is served from one process (one librbd client:
    several would take the exclusive lock in turns); multi-conn clients work."""
    srv = serve_rbd(f"rbd/{image}", "--workers", "2")
    src = tmp_path / "src.img"
    src.write_bytes(randbytes(SIZE, 77))
    run("nbdcopy", "--flush", "--connections=4", str(src), srv.uri)
    back = tmp_path / "back.img"
    run("nbdcopy", "--connections=4", srv.uri, str(back))
    assert back.read_bytes() == src.read_bytes()
    watchers = re.findall(r"watcher=(\S+)", ceph_cephx.run("rbd", "status",
                                                          f"rbd/{image}").stdout)
    assert len(watchers) == 1, watchers
    assert "serving with one worker" in srv.stderr and "keeps its state in one process" \
        in srv.stderr
