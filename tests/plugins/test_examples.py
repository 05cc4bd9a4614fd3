"""The example plugins (examples/plugins/) served by ``pynbd serve python:...`` and driven
by programs nobody here wrote: libnbd in strict mode, nbdinfo, nbdcopy, qemu-img,
qemu-io and fio, with one worker process and with two."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import nbd
import pytest

from tests.plugins.conftest import EXAMPLES, MiB, run
from tests.support.images import make_image
from tests.support.pynbd_server import PynbdServer, ServerFactory

pytestmark = pytest.mark.interop

SIZE = 64 * MiB
PLUGINS = ["ramdisk", "chunkdir"]
WORKERS = [1, 2]


def start(serve: ServerFactory, tmp_path: Path, plugin: str, workers: int,
          *extra: str) -> PynbdServer:
    args = ["--workers", str(workers), *extra, f"python:{EXAMPLES / plugin}.py",
            f"size={SIZE // MiB}M"]
    if plugin == "chunkdir":
        args += [f"dir={tmp_path / 'chunks'}", "chunk=256K"]
    return serve(*args)


def handle(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def block_status(h: nbd.NBD, length: int, offset: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []

    def cb(ctx: str, off: int, entries: list[int], err: int) -> int:
        out.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    h.block_status(length, offset, cb)
    return out


def image(path: Path, size: int, seed: int) -> bytes:
    """A file of ``size`` bytes with some random runs (the rest zeros, all of it
    written: nbdcopy sees no holes to skip)."""
    rnd = random.Random(seed)
    runs = []
    for _ in range(12):
        off = rnd.randrange(0, size - MiB)
        n = rnd.randrange(1, MiB)
        runs.append((off, rnd.randbytes(n)))
    return make_image(path, size, runs, sparse=False).read_bytes()


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_libnbd_strict(serve: ServerFactory, tmp_path: Path, plugin: str, workers: int) -> None:
    srv = start(serve, tmp_path, plugin, workers)
    h = handle(srv.uri)
    assert h.get_size() == SIZE
    assert h.can_multi_conn() and h.can_trim() and h.can_zero() and h.can_flush()
    assert h.can_fua() and h.can_fast_zero() and not h.is_read_only()
    # aligned, unaligned and chunk-crossing writes, with and without FUA
    rnd = random.Random(7)
    ref = bytearray(SIZE)
    for off, n in [(0, 4096), (4095, 3), (256 * 1024 - 100, 300), (MiB - 1, 2 * MiB + 7),
                   (SIZE - 5000, 5000), (10 * MiB, 64 * 1024)]:
        data = rnd.randbytes(n)
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if n % 2 else 0)
        ref[off:off + n] = data
    h.flush()
    for off, n in [(0, 8192), (4000, 200), (MiB - 10, 2 * MiB + 20), (SIZE - 8192, 8192),
                   (20 * MiB, MiB)]:
        assert h.pread(n, off) == bytes(ref[off:off + n]), (off, n)
    # WRITE_ZEROES: may trim, NO_HOLE, FAST_ZERO; TRIM; CACHE
    h.zero(MiB, 0)
    ref[0:MiB] = bytes(MiB)
    h.zero(1000, MiB + 5, nbd.CMD_FLAG_NO_HOLE)
    ref[MiB + 5:MiB + 1005] = bytes(1000)
    h.zero(64 * 1024, 10 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
    ref[10 * MiB:10 * MiB + 64 * 1024] = bytes(64 * 1024)
    h.trim(4096, 2 * MiB)  # advisory: reads may stay or turn zero
    h.cache(MiB, 0)
    got = h.pread(3 * MiB, 0)
    assert got[:MiB] == bytes(MiB)
    assert got[MiB + 5:MiB + 1005] == bytes(1000)
    assert got[3 * MiB - 4096:] == bytes(ref[3 * MiB - 4096:3 * MiB])
    assert h.pread(128 * 1024, 10 * MiB) == bytes(128 * 1024)
    # block status: extents cover the request, never past the end
    ext = block_status(h, SIZE, 0)
    assert ext and sum(n for n, _ in ext) <= SIZE and all(n > 0 for n, _ in ext)
    if plugin == "chunkdir":  # chunks never written are holes that read as zeros
        ext = block_status(h, 4 * MiB, 30 * MiB)
        assert ext[0][1] == nbd.STATE_HOLE | nbd.STATE_ZERO
        assert h.pread(MiB, 30 * MiB) == bytes(MiB)
    # a second connection sees the first one's flushed writes (multi-conn)
    h2 = handle(srv.uri)
    assert h2.pread(5000, SIZE - 5000) == bytes(ref[SIZE - 5000:])
    h2.shutdown()
    h.shutdown()


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_nbdinfo_and_nbdcopy(serve: ServerFactory, tmp_path: Path, plugin: str,
                             workers: int) -> None:
    srv = start(serve, tmp_path, plugin, workers)
    j = json.loads(run("nbdinfo", "--json", srv.uri).stdout)
    exp = j["exports"][0]
    assert exp["export-size"] == SIZE
    assert exp["can_multi_conn"] and exp["can_trim"] and exp["can_zero"]
    src = tmp_path / "src.img"
    data = image(src, SIZE, seed=workers)
    # file -> plugin over 4 connections (spread over the workers), and back
    run("nbdcopy", "--connections=4", "--requests=16", str(src), srv.uri)
    out = tmp_path / "out.img"
    run("nbdcopy", "--connections=2", srv.uri, str(out))
    assert out.read_bytes() == data
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), srv.uri)
    if plugin == "chunkdir":
        # the data really is in the chunk files: rebuild the disk from them
        chunks = tmp_path / "chunks"
        disk = bytearray(SIZE)
        names = [n for n in os.listdir(chunks) if not n.startswith(".")]
        for name in names:
            i = int(name, 16)
            body = (chunks / name).read_bytes()
            assert len(body) == 256 * 1024
            disk[i * 256 * 1024:(i + 1) * 256 * 1024] = body
        assert bytes(disk) == data
        # nbdcopy skips zero runs: chunks that stayed zero were never created
        assert len(names) < SIZE // (256 * 1024)
        mp = json.loads(run("nbdinfo", "--map", "--json", srv.uri).stdout)
        assert sum(e["length"] for e in mp) == SIZE
        holes = [e for e in mp if e["type"] & 1]
        assert holes and all(data[e["offset"]:e["offset"] + e["length"]].count(0) == e["length"]
                             for e in holes)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_qemu_io_and_qemu_img(serve: ServerFactory, tmp_path: Path, plugin: str,
                              workers: int) -> None:
    srv = start(serve, tmp_path, plugin, workers)
    uri = srv.uri
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd -f 1M 1M",  # FUA
        "aio_write -P 0x11 2M 64k", "aio_write -P 0x22 3M 64k", "aio_flush",
        "write -P 0x44 5000 3000",  # unaligned
        "read -P 0xab 0 5000",
        "read -P 0x44 5000 3000",
        "read -P 0xab 8000 1040576",
        "read -P 0xcd 1M 1M",
        "read -P 0x11 2M 64k",
        "read -P 0x22 3M 64k",
        "flush",
        "discard 0 64k",
        "write -z 64k 64k",  # WRITE_ZEROES, NO_HOLE
        "write -z -u 128k 64k",  # WRITE_ZEROES, may trim
        "write -z -u 4M 1M",  # whole chunks: chunkdir deletes them
        "read -P 0 64k 128k",
        "read -P 0xab 192k 64k",
        "read -P 0 4M 1M",
        "readv -P 0xcd 1M 4k 4k",
        "writev -P 0x33 6M 64k 64k",
        "read -P 0x33 6M 128k",
        "map",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, uri)
    assert "Pattern verification failed" not in p.stdout + p.stderr, p.stdout
    assert "failed" not in p.stdout.lower(), p.stdout
    # qemu-img map reads block status: with chunkdir only written chunks hold data
    m = json.loads(run("qemu-img", "map", "--output=json", "-f", "raw", uri).stdout)
    assert sum(e["length"] for e in m) == SIZE
    if plugin == "chunkdir":
        data = [(e["start"], e["length"]) for e in m if e["data"]]
        assert data[0][0] == 0
        assert not any(s <= 4 * MiB < s + n for s, n in data)  # the deleted chunks
        assert any(s <= 6 * MiB < s + n for s, n in data)
        assert not any(s <= 40 * MiB < s + n for s, n in data)  # never written
    # qemu-img convert onto the plugin and compare
    src = tmp_path / "src.img"
    image(src, SIZE, seed=3)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("plugin", PLUGINS)
def test_fio_verify(serve: ServerFactory, tmp_path: Path, plugin: str, workers: int) -> None:
    srv = start(serve, tmp_path, plugin, workers)
    # two jobs: two connections, each verifying its own half
    p = run("fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", "--numjobs=2", "--size=16M", "--offset_increment=16M",
            "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--output-format=json",
            timeout=240)
    j = json.loads(p.stdout[p.stdout.index("{"):])
    assert len(j["jobs"]) == 2
    for job in j["jobs"]:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 16 * MiB and job["read"]["io_bytes"] == 16 * MiB


@pytest.mark.parametrize("workers", WORKERS)
def test_tmpdisk_each_connection_its_own_disk(serve: ServerFactory, workers: int) -> None:
    srv = serve("--workers", str(workers), f"python:{EXAMPLES / 'tmpdisk.py'}", "size=16M")
    a, b = handle(srv.uri), handle(srv.uri)
    assert not a.can_multi_conn() and a.get_size() == 16 * MiB
    a.pwrite(b"A" * 4096, 0)
    b.pwrite(b"B" * 4096, 0)
    assert a.pread(4096, 0) == b"A" * 4096
    assert b.pread(4096, 0) == b"B" * 4096
    a.shutdown()
    # a new connection starts empty
    c = handle(srv.uri)
    assert c.pread(4096, 0) == bytes(4096)
    c.shutdown()
    b.shutdown()
    src = run("qemu-io", "-f", "raw", "-c", "write -P 0x7 1M 2M", "-c", "read -P 0x7 1M 2M",
              "-c", "write -z 1M 4k", "-c", "read -P 0 1M 4k", srv.uri)
    assert "Pattern verification failed" not in src.stdout
