"""The ``blocksize`` filter in front of a plugin that refuses unaligned I/O.

The test plugin (written below, loaded with ``python:``) raises EINVAL unless every
offset and length is a multiple of 4096 and a READ/WRITE is at most 64 KiB (TRIM,
WRITE_ZEROES, CACHE and block status at most 1 MiB). Clients (libnbd in strict mode,
qemu-io, nbdcopy) send whatever they like through the filter; every result is compared
with a local model of the disk.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import nbd
import pytest

from pynbd.server.control import control_request
from tests.filters.helpers import (
    block_status,
    concurrent_partial_writes,
    make_base,
    nbdcopy_to,
    qemu_io,
    read_all,
    serve_fails,
    strict,
)
from tests.server.rawnbd import CMD_READ, CMD_WRITE, EINVAL, Raw
from tests.support.pynbd_server import ServerFactory

KiB = 1024
MiB = 1024 * KiB

STRICT_PLUGIN = '''
"""A file served only in aligned pieces (the kind of plugin the blocksize filter is for)."""
import errno
import os

from pynbd.backends import Backend, BackendError, Extent, Param, parse_bool

ALIGN = 4096
MAXDATA = 64 * 1024
MAXLEN = 1024 * 1024


def check(what, offset, length, limit):
    if offset % ALIGN or length % ALIGN or length <= 0 or length > limit:
        raise BackendError(errno.EINVAL, f"{what} at {offset} of {length} bytes: "
                                         f"not {ALIGN}-aligned or over {limit}")


class StrictFile(Backend):
    params = {"path": Param("the file", str),
              "blocking": Param("calls may wait", parse_bool, True),
              "advertise": Param("advertise the alignment to clients", parse_bool, True)}
    multi_process = True  # the file is the state: every worker opens it
    can_trim = True
    can_zero = True
    can_cache = True
    can_extents = True
    can_multi_conn = True
    block_size = (ALIGN, ALIGN, MAXDATA)

    def __init__(self, path, blocking, advertise):
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size
        self.blocking = blocking
        if not advertise:  # let everything reach the plugin (the server checks nothing)
            self.block_size = (1, ALIGN, 32 * 1024 * 1024)

    def pread_into(self, buf, offset):
        check("read", offset, len(buf), MAXDATA)
        buf[:] = os.pread(self.fd, len(buf), offset)

    def pwrite(self, buf, offset, fua=False):
        check("write", offset, len(buf), MAXDATA)
        os.pwrite(self.fd, buf, offset)

    def trim(self, offset, length, fua=False):
        check("trim", offset, length, MAXLEN)
        os.pwrite(self.fd, bytes(length), offset)  # trimmed blocks read as zeros

    def zero(self, offset, length, may_trim=True, fast=False, fua=False):
        check("zero", offset, length, MAXLEN)
        os.pwrite(self.fd, bytes(length), offset)

    def cache(self, offset, length):
        check("cache", offset, length, MAXLEN)

    def extents(self, offset, length):
        check("block status", offset, length, MAXLEN)
        return [Extent(length, 0)]

    def flush(self):
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)
'''


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    p = tmp_path / "strictfile.py"
    p.write_text(STRICT_PLUGIN)
    return p


def test_the_plugin_refuses_unaligned_io(serve: ServerFactory, tmp_path: Path,
                                         plugin: Path) -> None:
    """Without the filter the plugin refuses what the filter will later make work."""
    disk = tmp_path / "disk.img"
    make_base(disk, MiB)
    srv = serve(f"python:{plugin}", f"path={disk}", "advertise=false", "--workers", "1")
    c = Raw(("127.0.0.1", srv.port)).connect()
    assert c.call(CMD_READ, 100, 4096)[0] == EINVAL
    assert c.call(CMD_WRITE, 4096, 10, payload=b"x" * 10)[0] == EINVAL
    assert c.call(CMD_READ, 0, 128 * KiB)[0] == EINVAL
    assert c.call(CMD_READ, 4096, 4096)[0] == 0
    c.disc()
    srv.stop()
    assert "read at 100 of 4096 bytes: not 4096-aligned" in srv.stderr  # the plugin said so
    assert "read at 0 of 131072 bytes" in srv.stderr
    # with the filter the same requests work (the filter tells clients min 1 too)
    srv = serve(f"python:{plugin}", f"path={disk}", "advertise=false", "--workers", "1",
                "--filter", "blocksize:minblock=4K,maxdata=64K")
    c = Raw(("127.0.0.1", srv.port)).connect()
    err, data = c.call(CMD_READ, 100, 4096)
    assert err == 0 and data == disk.read_bytes()[100:4196]
    assert c.call(CMD_WRITE, 4096, 10, payload=b"x" * 10)[0] == 0
    err, data = c.call(CMD_READ, 0, 128 * KiB)
    assert err == 0 and data[4096:4106] == b"x" * 10
    c.disc()


def _trim_model(model: bytearray, off: int, n: int, align: int) -> None:
    """The filter passes the aligned part of a TRIM on and skips the rest."""
    a = -(-off // align) * align
    b = (off + n) // align * align
    if a < b:
        model[a:b] = bytes(b - a)


def _random_ops(h: nbd.NBD, model: bytearray, rng: random.Random, count: int,
                align: int = 4096) -> None:
    size = len(model)
    for i in range(count):
        op = rng.random()
        n = rng.choice([1, 3, 511, 4095, 4096, 4097, 65537, rng.randrange(1, 300 * KiB)])
        off = rng.choice([0, 1, 4095, 4096, rng.randrange(0, size - n)])
        off = min(off, size - n)
        if op < 0.35:
            data = rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
            model[off:off + n] = data
        elif op < 0.45:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
            model[off:off + n] = bytes(n)
        elif op < 0.52:
            h.trim(n, off)
            _trim_model(model, off, n, align)
        elif op < 0.56:
            h.flush()
        elif op < 0.6:
            h.cache(n, off)
        elif op < 0.65:
            ext = block_status(h, off, n)
            assert ext == [(n, 0)], ext  # the plugin reports data everywhere
        else:
            assert h.pread(n, off) == model[off:off + n], (i, off, n)


@pytest.mark.parametrize("workers", [1, 2])
def test_libnbd_unaligned_io_matches_model(serve: ServerFactory, tmp_path: Path,
                                           plugin: Path, workers: int) -> None:
    size = 4 * MiB
    disk = tmp_path / "disk.img"
    model = bytearray(make_base(disk, size, seed=21))
    srv = serve(f"python:{plugin}", f"path={disk}", "--workers", str(workers),
                "--filter", "blocksize:maxlen=1M")  # minblock, maxdata: the plugin's
    h = strict(srv.uri)
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    # requests are split in the filter: the server's --max-request-size (default 64M)
    # is all that bounds a client
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 * MiB
    _random_ops(h, model, random.Random(22), 400)
    h.flush()
    assert read_all(h, size) == model
    # one request far above maxdata, unaligned at both ends
    data = random.Random(23).randbytes(3 * MiB + 5)
    h.pwrite(data, 7)
    model[7:7 + len(data)] = data
    assert h.pread(len(data) + 10, 0) == model[:len(data) + 10]
    h.shutdown()
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == model
    srv.stop()
    assert disk.read_bytes() == model


def test_max_request_size_reaches_clients(serve: ServerFactory, tmp_path: Path,
                                          plugin: Path) -> None:
    """The filter splits any request, so the maximum clients are told is the server's
    --max-request-size (here above the classic 32M), and such a request
    works, unaligned, through the plugin's 64K limit."""
    size = 64 * MiB
    disk = tmp_path / "disk.img"
    model = bytearray(make_base(disk, size, seed=31))
    srv = serve(f"python:{plugin}", f"path={disk}", "--workers", "1",
                "--max-request-size", "48M", "--filter", "blocksize")
    h = strict(srv.uri)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 48 * MiB
    data = random.Random(32).randbytes(40 * MiB + 3)
    h.pwrite(data, 4097)
    model[4097:4097 + len(data)] = data
    assert h.pread(45 * MiB, 1) == model[1:1 + 45 * MiB]
    with pytest.raises(nbd.Error):  # past the maximum: libnbd (strict) refuses to send it
        h.pread(48 * MiB + 1, 0)
    h.flush()
    h.shutdown()
    srv.stop()
    assert disk.read_bytes() == model


def test_explicit_parameters(serve: ServerFactory, tmp_path: Path, plugin: Path) -> None:
    """minblock=8K (more than the plugin needs), maxdata=16K, maxlen=64K; the plugin
    runs inline (non-blocking)."""
    size = 2 * MiB
    disk = tmp_path / "disk.img"
    model = bytearray(make_base(disk, size, seed=24))
    srv = serve(f"python:{plugin}", f"path={disk}", "blocking=false", "--workers", "1",
                "--filter", "blocksize:minblock=8K,maxdata=16K,maxlen=64K")
    out = subprocess.run(["nbdinfo", "--json", srv.uri], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert '"block_size_minimum": 1' in out and '"block_size_preferred": 8192' in out
    h = strict(srv.uri)
    _random_ops(h, model, random.Random(25), 300, align=8192)
    # trims: only whole 8K blocks are passed on
    h.trim(3 * 8192, 8192 + 100)
    _trim_model(model, 8192 + 100, 3 * 8192, 8192)
    assert read_all(h, size) == model
    h.shutdown()


@pytest.mark.parametrize("workers", [1, 2])
def test_qemu_io_odd_offsets(serve: ServerFactory, tmp_path: Path, plugin: Path,
                             workers: int) -> None:
    size = 2 * MiB
    disk = tmp_path / "disk.img"
    model = bytearray(make_base(disk, size, seed=26))
    srv = serve(f"python:{plugin}", f"path={disk}", "--workers", str(workers),
                "--filter", "blocksize:minblock=4K,maxdata=64K,maxlen=1M")
    writes = [(1, 3, 0x11), (4095, 2, 0x22), (5000, 70000, 0x33), (131071, 65538, 0x44),
              (300001, 1, 0x55), (size - 4097, 4097, 0x66)]
    cmds = []
    for off, n, pat in writes:
        cmds.append(f"write -P {pat} {off} {n}")
        model[off:off + n] = bytes([pat]) * n
    cmds.append("write -z 400003 9000")
    model[400003:409003] = bytes(9000)
    cmds += [f"read -P {pat} {off} {n}" for off, n, pat in writes]
    cmds += ["read -P 0 400003 9000", "flush"]
    qemu_io(srv.uri, *cmds)
    h = strict(srv.uri)
    assert read_all(h, size) == model
    h.shutdown()


def test_concurrent_unaligned_writes_to_one_block(serve: ServerFactory, tmp_path: Path,
                                                  plugin: Path) -> None:
    """Four connections over two worker processes write disjoint, unaligned slices of
    the same 4K blocks at once: every read-modify-write holds the block's lock (shared
    by the processes), so none undoes another."""
    size = 4 * MiB
    disk = tmp_path / "disk.img"
    model = bytearray(make_base(disk, size, seed=27))
    ctl = str(tmp_path / "ctl")
    srv = serve(f"python:{plugin}", f"path={disk}", "--workers", "2", "--control", ctl,
                "--filter", "blocksize:maxlen=1M")
    for rnd in range(3):
        concurrent_partial_writes(srv.uri, model, 4, rnd * 256, 256, 4096, seed=30 + rnd)
    h = strict(srv.uri)
    assert read_all(h, size) == model
    h.shutdown()
    reply = control_request(ctl, {"cmd": "status"})
    assert reply["ok"], reply
    export = reply["status"]["exports"][0]
    assert export["stack"][0] == "blocksize:maxlen=1M"
    # one read-modify-write per slice, summed over both workers
    assert export["filters"]["blocksize"]["rmw"] == 3 * 4 * 256


def test_size_rounded_down(serve: ServerFactory, tmp_path: Path, plugin: Path) -> None:
    disk = tmp_path / "disk.img"
    data = make_base(disk, MiB + 1000, seed=28)
    srv = serve(f"python:{plugin}", f"path={disk}", "--workers", "1",
                "--filter", "blocksize")
    h = strict(srv.uri)
    assert h.get_size() == MiB
    assert h.pread(3000, MiB - 3000) == data[MiB - 3000:MiB]
    h.shutdown()


@pytest.mark.parametrize("spec, words", [
    ("blocksize:minblock=3000", ["minblock=3000", "power of 2"]),
    ("blocksize:minblock=0", ["minblock", "at least 1"]),
    ("blocksize:minblock=128M", ["minblock", "power of 2"]),
    ("blocksize:maxdata=5000", ["maxdata=5000", "multiple of minblock=4096"]),
    ("blocksize:minblock=8K,maxlen=4K", ["maxlen=4096", "multiple of minblock=8192"]),
    ("blocksize:maxlen=lots", ["maxlen", "invalid size"]),
    ("blocksize:block=4K", ["unknown parameter 'block'", "maxdata, maxlen, minblock"]),
])
def test_bad_parameters(tmp_path: Path, plugin: Path, spec: str, words: list[str]) -> None:
    disk = tmp_path / "disk.img"
    make_base(disk, MiB)
    p = serve_fails(f"python:{plugin}", f"path={disk}", "--filter", spec)
    for w in words:
        assert w in p.stderr, p.stderr
