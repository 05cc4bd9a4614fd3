"""RbdBackend against a real single-node Ceph cluster (tests/support/ceph_cluster.py)."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import random
import re
import select
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import rados
import rbd
from tests.support.ceph_cluster import CephCluster
from tests.support.net import free_port

from pynbd.backends import CephOptions, open_backend
from pynbd.backends.base import STATE_HOLE, STATE_ZERO, BackendError, Extent
from pynbd.backends.rbd import RbdBackend, RbdTarget, parse_rbd_target

pytestmark = pytest.mark.ceph

MiB = 1 << 20
OBJ = 4 * MiB  # default RBD object size (order 22)
_names = itertools.count()


def _admin(cluster: CephCluster) -> rados.Rados:
    conf = {"client_mount_timeout": "15"}
    if cluster.keyring_path is not None:
        conf["keyring"] = str(cluster.keyring_path)
    r = rados.Rados(conffile=str(cluster.conf_path), name="client.admin", conf=conf)
    r.connect(timeout=15)
    return r


@pytest.fixture(scope="module")
def admin(ceph_cephx: CephCluster) -> Iterator[rados.Ioctx]:
    r = _admin(ceph_cephx)
    io = r.open_ioctx("rbd")
    yield io
    io.close()
    r.shutdown()


@pytest.fixture
def image(admin: rados.Ioctx) -> Iterator[str]:
    """A fresh 64 MiB image with the default features (exclusive-lock, fast-diff ...)."""
    name = f"img{os.getpid()}-{next(_names)}"
    rbd.RBD().create(admin, name, 64 * MiB)
    yield name
    _remove(admin, name)


def _remove(io: rados.Ioctx, name: str) -> None:
    with rbd.Image(io, name) as img:
        for snap in list(img.list_snaps()):
            img.remove_snap(snap["name"])
    rbd.RBD().remove(io, name)


def _open(cluster: CephCluster, target: str, **kw: object) -> RbdBackend:
    return RbdBackend.from_target(target, conf=str(cluster.conf_path),
                                  keyring=str(cluster.keyring_path), **kw)  # type: ignore[arg-type]


@pytest.fixture
def backend(ceph_cephx: CephCluster, image: str) -> Iterator[RbdBackend]:
    b = _open(ceph_cephx, f"rbd:rbd/{image}")
    yield b
    b.close()


def _read(b: RbdBackend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    b.pread_into(memoryview(buf), offset)
    return bytes(buf)


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


def _covered(extents: list[Extent]) -> int:
    return sum(e.length for e in extents)


# ------------------------------------------------------------------------- parsing
def test_parse_rbd_target() -> None:
    assert parse_rbd_target("rbd:pool/img") == RbdTarget("pool", "img")
    assert parse_rbd_target("rbd:pool/img@snap") == RbdTarget("pool", "img", "snap")
    assert parse_rbd_target("rbd:pool/ns/img@s") == RbdTarget("pool", "img", "s", "ns")
    assert parse_rbd_target("rbd:pool/ns/img@s").spec == "pool/ns/img@s"
    for bad in ("rbd:", "rbd:img", "rbd:/img", "rbd:pool/", "rbd:pool/img@", "file:/x",
                "rbd:a/b/c/d", "rbd:p/i@a@b"):
        with pytest.raises(ValueError):
            parse_rbd_target(bad)
    with pytest.raises(BackendError) as ei:
        RbdBackend.from_target("rbd:nopool")
    assert ei.value.errno == errno.EINVAL


# ---------------------------------------------------------------------- data paths
def test_properties(backend: RbdBackend) -> None:
    assert backend.size == 64 * MiB
    assert backend.blocking and backend.can_extents and backend.can_trim
    assert backend.can_zero and backend.can_fast_zero and backend.can_flush and backend.can_fua
    assert not backend.read_only
    # librbd's default cache (writearound) keeps no reads: safe for multi-conn
    assert backend.can_multi_conn
    assert backend.name.startswith("rbd:rbd/img")


def test_round_trip(backend: RbdBackend) -> None:
    cases = [(0, 4096), (5001, 1000), (OBJ - 100, 300), (10 * MiB, 9 * MiB + 17),
             (64 * MiB - 4096, 4096)]
    for seed, (off, n) in enumerate(cases):
        data = _pattern(n, seed)
        backend.pwrite(memoryview(data), off, fua=seed % 2 == 1)
        assert _read(backend, off, n) == data
    backend.flush()
    for seed, (off, n) in enumerate(cases):
        assert _read(backend, off, n) == _pattern(n, seed)
    assert _read(backend, 30 * MiB, 4096) == bytes(4096)  # never written
    backend.pwrite(b"bytes too", 5)
    assert _read(backend, 0, 20) == _pattern(4096, 0)[:5] + b"bytes too" + _pattern(4096, 0)[14:20]


def test_flushed_data_visible_to_another_client(ceph_cephx: CephCluster, image: str,
                                                backend: RbdBackend) -> None:
    backend.pwrite(b"A" * 8192, MiB)
    backend.flush()
    other = _open(ceph_cephx, f"rbd:rbd/{image}")
    try:
        assert other.can_multi_conn
        assert _read(other, MiB, 8192) == b"A" * 8192
        other.pwrite(b"B" * 4096, MiB, fua=True)  # the exclusive lock moves over
        assert _read(backend, MiB, 8192) == b"B" * 4096 + b"A" * 4096
    finally:
        other.close()


def test_extents_fresh_image_is_all_hole(backend: RbdBackend) -> None:
    ext = backend.extents(0, backend.size)
    assert ext == [Extent(64 * MiB, STATE_HOLE | STATE_ZERO)]


def test_trim_shows_hole(backend: RbdBackend) -> None:
    backend.pwrite(b"x" * (3 * OBJ), OBJ)
    backend.flush()
    assert backend.extents(OBJ, 3 * OBJ) == [Extent(3 * OBJ, 0)]
    backend.trim(2 * OBJ, OBJ)
    ext = backend.extents(0, 5 * OBJ)
    assert ext == [Extent(OBJ, STATE_HOLE | STATE_ZERO), Extent(OBJ, 0),
                   Extent(OBJ, STATE_HOLE | STATE_ZERO), Extent(OBJ, 0),
                   Extent(OBJ, STATE_HOLE | STATE_ZERO)]
    assert _read(backend, 2 * OBJ, 4096) == bytes(4096)
    assert _read(backend, 3 * OBJ, 4096) == b"x" * 4096
    # a request starting mid-object starts there
    ext = backend.extents(OBJ + 100, 1000)
    assert ext[0] == Extent(_covered(ext), 0) and _covered(ext) >= 1
    backend.trim(0, 0)  # nothing


def test_trim_without_fast_diff(ceph_cephx: CephCluster, admin: rados.Ioctx) -> None:
    name = f"plain{os.getpid()}-{next(_names)}"
    rbd.RBD().create(admin, name, 32 * MiB, features=rbd.RBD_FEATURE_LAYERING)
    b = _open(ceph_cephx, f"rbd:rbd/{name}")
    try:
        b.pwrite(b"d" * 8192, OBJ + 4096)
        ext = b.extents(0, 32 * MiB)
        # without fast-diff librbd reports allocation per object (or finer)
        assert ext[0].flags == STATE_HOLE | STATE_ZERO and OBJ <= ext[0].length <= OBJ + 4096
        assert ext[1].flags == 0 and ext[0].length + ext[1].length >= OBJ + 4096 + 8192
        b.trim(OBJ, OBJ)
        ext = b.extents(0, 32 * MiB)
        assert all(e.flags == STATE_HOLE | STATE_ZERO for e in ext)
        assert 1 <= _covered(ext) <= 32 * MiB
    finally:
        b.close()
        _remove(admin, name)


def test_zero(backend: RbdBackend) -> None:
    backend.pwrite(b"z" * (2 * OBJ), 0)
    backend.zero(OBJ, OBJ)  # whole object: deallocated
    assert _read(backend, OBJ, 8192) == bytes(8192)
    assert backend.extents(0, 2 * OBJ) == [Extent(OBJ, 0),
                                            Extent(OBJ, STATE_HOLE | STATE_ZERO)]
    backend.zero(100, 5000, fua=True)  # partial
    assert _read(backend, 0, 5200) == b"z" * 100 + bytes(5000) + b"z" * 100
    backend.zero(OBJ, 8192, may_trim=False)  # NO_HOLE: stays allocated, reads zeros
    assert _read(backend, OBJ, 8192) == bytes(8192)
    assert backend.extents(OBJ, OBJ)[0].flags == 0
    backend.zero(8192, 4096, fast=True)
    assert _read(backend, 8192, 4096) == bytes(4096)
    with pytest.raises(BackendError) as ei:
        backend.zero(8192, 4096, may_trim=False, fast=True)
    assert ei.value.errno == errno.ENOTSUP


def test_cache_is_harmless(backend: RbdBackend) -> None:
    backend.pwrite(b"c" * 4096, 0)
    backend.cache(0, 8 * MiB)
    assert _read(backend, 0, 4096) == b"c" * 4096


def test_many_threads(backend: RbdBackend) -> None:
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            off = i * 256 * 1024
            for rnd in range(8):
                data = bytes([i, rnd]) * 32768
                backend.pwrite(data, off)
                assert _read(backend, off, len(data)) == data
                if rnd % 3 == 0:
                    backend.flush()
                    backend.extents(off, 65536)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    for i in range(32):
        assert _read(backend, i * 256 * 1024, 65536) == bytes([i, 7]) * 32768


def test_close(ceph_cephx: CephCluster, image: str) -> None:
    b = _open(ceph_cephx, f"rbd:rbd/{image}")
    b.pwrite(b"q" * 512, 0)
    b.close()
    b.close()  # idempotent
    with pytest.raises(BackendError) as ei:
        _read(b, 0, 512)
    assert ei.value.errno == errno.ESHUTDOWN


def test_read_only_flag(ceph_cephx: CephCluster, image: str) -> None:
    b = _open(ceph_cephx, f"rbd:rbd/{image}", read_only=True)
    try:
        assert b.read_only and not b.can_trim and not b.can_zero
        with pytest.raises(BackendError) as ei:
            b.pwrite(b"no", 0)
        assert ei.value.errno == errno.EPERM
        assert _read(b, 0, 10) == bytes(10)
    finally:
        b.close()


# ---------------------------------------------------------------------- snapshots
def test_snapshot_is_read_only(ceph_cephx: CephCluster, admin: rados.Ioctx, image: str,
                               backend: RbdBackend) -> None:
    backend.pwrite(b"before" * 1000, 0)
    backend.flush()
    with rbd.Image(admin, image) as img:
        img.create_snap("s1")
    backend.pwrite(b"after!" * 1000, 0)
    backend.flush()
    snap = _open(ceph_cephx, f"rbd:rbd/{image}@s1")
    try:
        assert snap.read_only and snap.can_multi_conn and not snap.can_trim
        assert snap.name == f"rbd:rbd/{image}@s1"
        assert _read(snap, 0, 6000) == b"before" * 1000
        assert snap.extents(0, snap.size)[0] == Extent(OBJ, 0)
        for op in (lambda: snap.pwrite(b"x", 0), lambda: snap.trim(0, 4096),
                   lambda: snap.zero(0, 4096)):
            with pytest.raises(BackendError) as ei:
                op()
            assert ei.value.errno == errno.EPERM
        snap.flush()  # harmless
    finally:
        snap.close()
    assert _read(backend, 0, 6) == b"after!"


# ------------------------------------------------------------------------- errors
def test_missing_pool(ceph_cephx: CephCluster) -> None:
    with pytest.raises(BackendError) as ei:
        _open(ceph_cephx, "rbd:nosuchpool/img")
    assert ei.value.errno == errno.ENOENT
    assert "pool 'nosuchpool'" in str(ei.value) and str(ceph_cephx.conf_path) in str(ei.value)


def test_missing_image(ceph_cephx: CephCluster) -> None:
    with pytest.raises(BackendError) as ei:
        _open(ceph_cephx, "rbd:rbd/nosuchimage")
    assert ei.value.errno == errno.ENOENT
    assert "image 'nosuchimage'" in str(ei.value) and "pool 'rbd'" in str(ei.value)


def test_missing_snapshot(ceph_cephx: CephCluster, image: str) -> None:
    with pytest.raises(BackendError) as ei:
        _open(ceph_cephx, f"rbd:rbd/{image}@nosnap")
    assert ei.value.errno == errno.ENOENT
    assert "snapshot 'nosnap'" in str(ei.value) and image in str(ei.value)


def test_missing_conf(tmp_path: Path) -> None:
    with pytest.raises(BackendError) as ei:
        RbdBackend.from_target("rbd:rbd/x", conf=str(tmp_path / "nope.conf"))
    assert ei.value.errno == errno.ENOENT and "nope.conf" in str(ei.value)


def test_wrong_key_is_permission_denied(ceph_cephx: CephCluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad.keyring"
    bad.write_text("[client.admin]\n\tkey = AQBbGh9nAAAAABAAxT5aZqfdMcDGRPLhaI2dCA==\n")
    with pytest.raises(BackendError) as ei:
        RbdBackend.from_target("rbd:rbd/x", conf=str(ceph_cephx.conf_path), keyring=str(bad))
    assert ei.value.errno == errno.EACCES
    assert "permission denied" in str(ei.value) and "bad.keyring" in str(ei.value)


def test_caps_without_pool_access(ceph_cephx: CephCluster, image: str,
                                  tmp_path: Path) -> None:
    keyring = tmp_path / "limited.keyring"
    ceph_cephx.ceph("auth", "get-or-create", "client.limited", "mon", "profile rbd",
                    "osd", "profile rbd pool=otherpool", "-o", str(keyring))
    with pytest.raises(BackendError) as ei:
        RbdBackend.from_target(f"rbd:rbd/{image}", conf=str(ceph_cephx.conf_path),
                               name="client.limited", keyring=str(keyring))
    assert ei.value.errno == errno.EACCES
    assert "client.limited" in str(ei.value)


@pytest.mark.timeout(60)
def test_unreachable_cluster_fails_in_bounded_time(tmp_path: Path) -> None:
    port = free_port()  # a loopback port nobody listens on
    conf = tmp_path / "ceph.conf"
    conf.write_text(f"[global]\nmon_host = [v2:127.0.0.1:{port}]\nms_bind_msgr1 = false\n"
                    "auth_client_required = none\n")
    with pytest.raises(BackendError) as ei:
        RbdBackend("rbd", "img", conf=str(conf), connect_timeout=3)
    assert ei.value.errno == errno.ETIMEDOUT
    assert "cannot reach" in str(ei.value) and str(port) in str(ei.value)


# ------------------------------------------------------------------ other clusters
def test_auth_none_cluster_and_open_backend(ceph_none: CephCluster) -> None:
    r = _admin(ceph_none)
    try:
        with r.open_ioctx("rbd") as io:
            rbd.RBD().create(io, "plain", 8 * MiB)
            try:
                b = open_backend("rbd:rbd/plain",
                                 ceph=CephOptions(conf=str(ceph_none.conf_path)))
                try:
                    assert isinstance(b, RbdBackend) and b.size == 8 * MiB
                    b.pwrite(b"none" * 1024, 4096, fua=True)
                    assert _read(b, 4096, 4096) == b"none" * 1024  # type: ignore[arg-type]
                finally:
                    b.close()
            finally:
                rbd.RBD().remove(io, "plain")
    finally:
        r.shutdown()


# ---------------------------------------------------------- asynchronous interface
class Done:
    """A ``done`` callback for the aio_* methods: records every call (it must come
    exactly once) and lets the test wait for it, collecting the backend's completions
    the way the server's loop does (aio_completion_fd readable -> aio_poll)."""

    def __init__(self, backend: RbdBackend) -> None:
        self.backend = backend
        self.calls: list[tuple[OSError | None, bytes | None]] = []
        self.threads: list[int] = []

    def __call__(self, err: OSError | None, data: bytes | None = None) -> None:
        self.calls.append((err, data))
        self.threads.append(threading.get_ident())

    def wait(self, timeout: float = 60.0) -> Done:
        deadline = time.monotonic() + timeout
        while not self.calls:
            if time.monotonic() >= deadline:  # a hang guard, not a speed check
                pytest.fail(f"aio request never completed within {timeout:.0f} s")
            fd = self.backend.aio_completion_fd()
            if fd is None:  # closed: nothing more can come
                break
            select.select([fd], [], [], 0.1)
            self.backend.aio_poll()
        assert self.calls, "aio request never completed"
        return self

    @property
    def error(self) -> OSError | None:
        self.wait()
        assert len(self.calls) == 1, self.calls
        return self.calls[0][0]

    def ok(self) -> None:
        err = self.error
        assert err is None, err


def _aio_read(b: RbdBackend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    d = Done(b)
    b.aio_pread(memoryview(buf), offset, d)
    d.ok()
    data = d.calls[0][1]
    if data is not None:  # the backend handed over its own buffer
        assert len(data) == n
        return bytes(data)
    return bytes(buf)


def _aio(b: RbdBackend, start: Callable[[Done], None]) -> Done:
    d = Done(b)
    start(d)
    return d.wait()


def test_aio_round_trip(backend: RbdBackend) -> None:
    assert backend.aio
    data = _pattern(3 * OBJ, 3)
    _aio(backend, lambda d: backend.aio_pwrite(memoryview(data), OBJ, False, d)).ok()
    assert _aio_read(backend, OBJ, 3 * OBJ) == data
    # a small write straight from a bytearray (handed to librbd without a copy), FUA
    small = bytearray(_pattern(4096, 9))
    fua = _aio(backend, lambda d: backend.aio_pwrite(memoryview(small), 12345, True, d))
    fua.ok()
    # delivered by aio_poll on the polling thread: librbd's threads never run Python
    assert fua.threads == [threading.get_ident()]
    assert _aio_read(backend, 12345, 4096) == bytes(small)
    assert _read(backend, 12345, 4096) == bytes(small)  # the synchronous path agrees
    _aio(backend, lambda d: backend.aio_flush(d)).ok()
    # trim a whole object: a hole; zero part of one (FUA), then with NO_HOLE
    _aio(backend, lambda d: backend.aio_trim(2 * OBJ, OBJ, False, d)).ok()
    assert _aio_read(backend, 2 * OBJ, 8192) == bytes(8192)
    assert backend.extents(2 * OBJ, OBJ) == [Extent(OBJ, STATE_HOLE | STATE_ZERO)]
    _aio(backend, lambda d: backend.aio_zero(OBJ + 100, 5000, True, True, True, d)).ok()
    assert _aio_read(backend, OBJ, 5200) == data[:100] + bytes(5000) + data[5100:5200]
    _aio(backend, lambda d: backend.aio_zero(3 * OBJ, 8192, False, False, False, d)).ok()
    assert _aio_read(backend, 3 * OBJ, 8192) == bytes(8192)
    assert backend.extents(3 * OBJ, OBJ)[0].flags == 0  # NO_HOLE kept it allocated
    # empty requests complete at once
    for start in (lambda d: backend.aio_pwrite(memoryview(b""), 0, True, d),
                  lambda d: backend.aio_trim(0, 0, False, d),
                  lambda d: backend.aio_zero(0, 0, True, False, True, d),
                  lambda d: backend.aio_pread(memoryview(bytearray()), 0, d)):
        _aio(backend, start).ok()


def test_aio_many_in_flight(backend: RbdBackend) -> None:
    """Hundreds of requests started at once from one thread, completing on librbd's."""
    rnd = random.Random(5)
    model = bytearray(16 * MiB)
    writes = []
    for _ in range(256):
        off = rnd.randrange(0, len(model) - 65536)
        n = rnd.choice((512, 4096, 65536))
        data = rnd.randbytes(n)
        writes.append((off, data))
    pending = []
    # non-overlapping batches: requests in flight together may complete in any order
    for batch in (writes[i::4] for i in range(4)):
        spans: list[tuple[int, int]] = []
        for off, data in batch:
            if any(off < e and s < off + len(data) for s, e in spans):
                continue
            spans.append((off, off + len(data)))
            model[off:off + len(data)] = data
            d = Done(backend)
            backend.aio_pwrite(memoryview(data), off, False, d)
            pending.append(d)
        for d in pending:
            d.ok()
        pending.clear()
    reads = [(off, bytearray(65536), Done(backend)) for off in range(0, len(model), 65536)]
    for off, buf, d in reads:
        backend.aio_pread(memoryview(buf), off, d)
    for off, buf, d in reads:
        d.ok()
        got = d.calls[0][1] if d.calls[0][1] is not None else bytes(buf)
        assert got == model[off:off + 65536], off


def test_aio_refusals(ceph_cephx: CephCluster, image: str, backend: RbdBackend) -> None:
    ro = _open(ceph_cephx, f"rbd:rbd/{image}", read_only=True)
    try:
        for start in (lambda d: ro.aio_pwrite(memoryview(b"x"), 0, False, d),
                      lambda d: ro.aio_trim(0, 4096, False, d),
                      lambda d: ro.aio_zero(0, 4096, True, False, False, d)):
            err = _aio(ro, start).error
            assert err is not None and err.errno == errno.EPERM and "read-only" in str(err)
        _aio(ro, lambda d: ro.aio_flush(d)).ok()  # nothing to flush
        assert _aio_read(ro, 0, 512) == bytes(512)
    finally:
        ro.close()
    err = _aio(backend, lambda d: backend.aio_zero(0, 4096, False, True, False, d)).error
    assert err is not None and err.errno == errno.ENOTSUP
    backend.close()
    for start in (lambda d: backend.aio_pread(memoryview(bytearray(512)), 0, d),
                  lambda d: backend.aio_pwrite(memoryview(b"x"), 0, False, d),
                  lambda d: backend.aio_flush(d)):
        err = _aio(backend, start).error
        assert err is not None and err.errno == errno.ESHUTDOWN


def test_aio_past_the_end_of_a_shrunk_image(admin: rados.Ioctx, image: str,
                                            backend: RbdBackend) -> None:
    """The export keeps its size; librbd refuses I/O past the image's new end in the
    completion, and a read across it returns zeros past the end."""
    data = _pattern(8192, 4)
    _aio(backend, lambda d: backend.aio_pwrite(memoryview(data), 16 * MiB - 4096, True, d)).ok()
    with rbd.Image(admin, image) as img:
        img.resize(16 * MiB)  # proxied to the lock owner: the backend's librbd
    assert backend.size == 64 * MiB
    err = _aio(backend, lambda d: backend.aio_pwrite(memoryview(b"y" * 4096), 20 * MiB, False,
                                            d)).error
    assert err is not None and err.errno == errno.EINVAL
    assert "write at 20971520+4096" in str(err)
    for off in (20 * MiB, 16 * MiB):  # past the new end, and exactly at it
        err = _aio(backend, lambda d, o=off: backend.aio_pread(memoryview(bytearray(4096)),
                                                               o, d)).error
        assert err is not None and err.errno == errno.EINVAL
        assert f"read at {off}+4096" in str(err)
    # across the new end: the part inside, then zeros (never uninitialised memory)
    assert _aio_read(backend, 16 * MiB - 4096, 8192) == data[:4096] + bytes(4096)


def _blocklist(cluster: CephCluster, spec: str) -> str:
    """Blocklist the librbd client watching ``spec``; returns its address."""
    out = cluster.run("rbd", "status", spec).stdout
    addrs = re.findall(r"watcher=(\S+)", out)
    assert len(addrs) == 1, out
    cluster.ceph("osd", "blocklist", "add", addrs[0])
    return addrs[0]


def test_aio_errors_from_completions(ceph_cephx: CephCluster, image: str,
                                     backend: RbdBackend) -> None:
    """A blocklisted client: librbd fails every request in its completion with
    ESHUTDOWN (EBLOCKLISTED); the errno reaches ``done`` unchanged."""
    _aio(backend, lambda d: backend.aio_pwrite(memoryview(b"w" * 4096), 0, True, d)).ok()
    addr = _blocklist(ceph_cephx, f"rbd/{image}")
    try:
        starts = {
            "read": lambda d: backend.aio_pread(memoryview(bytearray(4096)), 0, d),
            "write": lambda d: backend.aio_pwrite(memoryview(b"x" * 4096), 8192, False, d),
            "flush": lambda d: backend.aio_flush(d),
            "trim": lambda d: backend.aio_trim(OBJ, OBJ, False, d),
            "write zeroes": lambda d: backend.aio_zero(0, 4096, True, False, False, d),
        }
        for what, start in starts.items():
            err = _aio(backend, start).error
            assert isinstance(err, BackendError), (what, err)
            assert err.errno == errno.ESHUTDOWN, (what, err)
            assert what in str(err) and "blocklisted" in str(err)
        backend.close()  # still closes (its final flush fails and is logged)
    finally:
        ceph_cephx.ceph("osd", "blocklist", "rm", addr)


@pytest.mark.timeout(120)
def test_aio_timeout(ceph_cephx: CephCluster, image: str) -> None:
    """OSDs that do not answer: the request fails with ETIMEDOUT after osd_op_timeout."""
    b = _open(ceph_cephx, f"rbd:rbd/{image}", osd_op_timeout=2)
    try:
        _aio(b, lambda d: b.aio_pwrite(memoryview(b"t" * 4096), 0, True, d)).ok()
        ceph_cephx.ceph("osd", "pause")
        try:
            # librbd learns of the pause with its next OSD map: until then reads work
            for _ in range(40):
                err = _aio(b, lambda d: b.aio_pread(memoryview(bytearray(4096)), 0, d)).error
                if err is not None:
                    break
                time.sleep(0.25)
            assert err is not None and err.errno == errno.ETIMEDOUT, err
            assert "read at 0+4096 failed" in str(err) and "timed out" in str(err)
            # a FUA write is acknowledged by librbd's cache, its flush needs the OSD
            err = _aio(b, lambda d: b.aio_pwrite(memoryview(b"u" * 4096), 4096, True, d)).error
            assert err is not None and err.errno == errno.ETIMEDOUT, err
            assert "write (FUA flush)" in str(err)
        finally:
            ceph_cephx.ceph("osd", "unpause")
        assert _aio_read(b, 0, 4096) == b"t" * 4096  # works again
    finally:
        b.close()


def test_aio_close_with_requests_in_flight(ceph_cephx: CephCluster, image: str) -> None:
    """close() waits for what is in flight: every request gets exactly one answer and
    every write acknowledged is in the image afterwards."""
    b = _open(ceph_cephx, f"rbd:rbd/{image}")
    writes = [(i * MiB, _pattern(MiB, i), Done(b)) for i in range(48)]
    for off, data, d in writes:
        b.aio_pwrite(memoryview(data), off, False, d)
    b.close()
    late = Done(b)
    b.aio_pwrite(memoryview(b"late"), 0, False, late)
    assert late.error is not None and late.error.errno == errno.ESHUTDOWN
    acked = [(off, data) for off, data, d in writes if d.error is None]
    assert len(acked) == len(writes)  # nothing was cut off: close waited
    for _, _, d in writes:
        assert len(d.calls) == 1
    again = _open(ceph_cephx, f"rbd:rbd/{image}")
    try:
        for off, data in acked:
            assert _read(again, off, MiB) == data, off
    finally:
        again.close()


@pytest.mark.timeout(120)
def test_aio_close_answers_requests_that_outlast_its_wait(ceph_cephx: CephCluster,
                                                         image: str) -> None:
    """OSDs that do not answer and a close() whose wait ends first: librbd's close
    waits for the requests (they time out after osd_op_timeout) and every one of them
    still gets exactly one answer, after close() returned."""
    b = _open(ceph_cephx, f"rbd:rbd/{image}", osd_op_timeout=3)
    _aio(b, lambda d: b.aio_pwrite(memoryview(b"a" * 4096), 0, True, d)).ok()
    ceph_cephx.ceph("osd", "pause")
    try:
        time.sleep(1)  # let librbd see the OSD map with the pause
        stuck = [Done(b) for _ in range(4)]
        for i, d in enumerate(stuck):
            b.aio_pwrite(memoryview(b"b" * 4096), (i + 1) * 4096, True, d)
        b.close(timeout=0.5)
    finally:
        ceph_cephx.ceph("osd", "unpause")
    for d in stuck:
        assert len(d.calls) == 1, d.calls
        err = d.calls[0][0]
        assert err is None or err.errno == errno.ETIMEDOUT, err
    assert b.aio_completion_fd() is None


def test_aio_done_that_raises_is_contained(backend: RbdBackend,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """A ``done`` that raises inside aio_poll is logged; the other completions of the
    same poll are still delivered and the request counts as finished (close does not
    wait for it)."""
    good = Done(backend)
    bad = _Raising(backend)

    with caplog.at_level(logging.ERROR, logger="pynbd.backends.rbd"):
        backend.aio_pwrite(memoryview(b"r" * 4096), 0, False, bad)
        backend.aio_pwrite(memoryview(b"s" * 4096), 8192, False, good)
        good.ok()
        # The two completions may arrive in different polls: wait for the bad one too
        # (its exception must stay inside aio_poll, which wait() calls).
        bad.wait()
    assert len(bad.calls) == 1 and bad.calls[0][0] is None, bad.calls
    assert any("completion handler failed" in r.message for r in caplog.records)
    t = threading.Thread(target=backend.close, args=(30.0,))
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert _read_closed_ok(backend)


class _Raising(Done):
    """A ``done`` with a bug: records the call, then raises."""

    def __call__(self, err: OSError | None, data: bytes | None = None) -> None:
        super().__call__(err, data)
        raise RuntimeError("handler bug")


def _read_closed_ok(backend: RbdBackend) -> bool:
    """After close, every call is refused with ESHUTDOWN (nothing hangs)."""
    with pytest.raises(BackendError) as e:
        backend.pread_into(memoryview(bytearray(16)), 0)
    return e.value.errno == errno.ESHUTDOWN
