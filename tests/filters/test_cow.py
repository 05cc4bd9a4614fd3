"""The ``cow`` filter against real clients (qemu-io, libnbd strict, nbdcopy, nbdinfo).

The base is a file whose SHA-256 is taken before the server starts and after it stops:
it must not change, whatever the clients wrote, while every read through the export
returns what a local model says (the base's bytes, then the writes, zeroes and trims).
"""

from __future__ import annotations

import os
import random
import signal
import struct
from pathlib import Path

import nbd
import pytest

from pynbd.server.control import control_request
from tests.filters.helpers import (
    block_status,
    concurrent_partial_writes,
    flags_at,
    make_base,
    nbdcopy_to,
    qemu_io,
    read_all,
    serve_fails,
    sha256,
    strict,
)
from tests.server.rawnbd import CMD_READ, CMD_WRITE, Raw
from tests.support.images import make_image
from tests.support.pynbd_server import ServerFactory, wait_until

KiB = 1024
MiB = 1024 * KiB
HOLE, ZERO = nbd.STATE_HOLE, nbd.STATE_ZERO


@pytest.mark.parametrize("workers", [1, 2])
def test_qemu_io_writes_read_back_base_untouched(serve: ServerFactory, tmp_path: Path,
                                                 workers: int) -> None:
    size = 8 * MiB
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, size))
    before = sha256(base)
    srv = serve(str(base), "--workers", str(workers), "--filter", "cow")
    bs = 64 * KiB
    writes = [
        (0, 4096, 0x11),                # aligned, part of block 0
        (5000, 3000, 0x22),             # unaligned, inside block 0 (block 0 is in the overlay)
        (bs - 300, 1000, 0x33),         # spans blocks 0 and 1 (block 1: copied up)
        (3 * bs, bs, 0x44),             # one whole block: no copy
        (5 * bs + 7, 3 * bs, 0x55),     # head, two whole blocks, tail
        (size - 513, 513, 0x66),        # the last bytes
        (2 * MiB + 1, 1, 0x77),         # one byte
    ]
    cmds = []
    for off, n, pat in writes:
        cmds.append(f"write -P {pat} {off} {n}")
        model[off:off + n] = bytes([pat]) * n
    cmds += [f"read -P {pat} {off} {n}" for off, n, pat in writes]
    cmds.append("flush")
    qemu_io(srv.uri, *cmds)
    h = strict(srv.uri)
    assert read_all(h, size) == model  # writes and every untouched byte of the base
    h.shutdown()
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == model
    srv.stop()
    assert sha256(base) == before


def _random_ops(handles: list[nbd.NBD], model: bytearray, rng: random.Random,
                count: int) -> None:
    size = len(model)
    for i in range(count):
        h = handles[i % len(handles)]
        op = rng.random()
        n = rng.choice([1, 511, 4096, 65536, rng.randrange(1, 200 * KiB)])
        off = rng.randrange(0, size - n)
        if op < 0.5:
            data = rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            model[off:off + n] = data
        elif op < 0.6:
            h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
            model[off:off + n] = bytes(n)
        elif op < 0.67:
            try:
                h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO)
            except nbd.Error as exc:
                assert exc.errno == "ENOTSUP", exc  # allowed: nothing changed
            else:
                model[off:off + n] = bytes(n)
        elif op < 0.75:
            h.trim(n, off)
            model[off:off + n] = bytes(n)  # cow: trimmed bytes read as zeros
        elif op < 0.78:
            h.flush()
        else:
            assert h.pread(n, off) == model[off:off + n], (i, off, n)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("blocksize", ["4K", "64K"])
def test_libnbd_random_io_matches_model(serve: ServerFactory, tmp_path: Path, workers: int,
                                        blocksize: str) -> None:
    size = 4 * MiB
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, size, seed=2))
    before = sha256(base)
    srv = serve(str(base), "--workers", str(workers), "--filter", f"cow:blocksize={blocksize}")
    handles = [strict(srv.uri) for _ in range(3)]
    for h in handles:
        assert not h.is_read_only()
        assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_fua()
        assert h.can_multi_conn()
    _random_ops(handles, model, random.Random(3), 400)
    for h in handles:
        h.flush()
    for h in handles:
        assert read_all(h, size) == model
        h.shutdown()
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == model
    srv.stop()
    assert sha256(base) == before


def test_trim_zero_and_block_status(serve: ServerFactory, tmp_path: Path) -> None:
    bs = 64 * KiB
    size = 32 * bs
    base = tmp_path / "base.img"
    make_image(base, size, {0: size // 2}, seed=4)  # data in the first half, a hole after
    model = bytearray(base.read_bytes())
    before = sha256(base)
    srv = serve(str(base), "--workers", "1", "--filter", "cow")
    h = strict(srv.uri)
    ext = block_status(h, 0, size)
    assert flags_at(ext, 0) == 0 and flags_at(ext, size - 1) & HOLE  # the base's own map

    h.zero(bs, 2 * bs)                                # a whole block: hole
    h.zero(bs, 4 * bs, nbd.CMD_FLAG_NO_HOLE)          # a whole block, allocated
    h.trim(2 * bs, 6 * bs)                            # two whole blocks
    h.zero(1000, 10 * bs + 100)                       # part of a block
    h.trim(300, 12 * bs + 5)                          # part of a block
    for off, n in ((2 * bs, bs), (4 * bs, bs), (6 * bs, 2 * bs), (10 * bs + 100, 1000),
                   (12 * bs + 5, 300)):
        model[off:off + n] = bytes(n)
    h.pwrite(b"\xaa" * 10, 2 * bs + 50)  # into a zeroed block: the rest stays zero
    model[2 * bs + 50:2 * bs + 60] = b"\xaa" * 10
    h.pwrite(b"\xbb" * 10, 20 * bs + 7)  # into the base's hole
    model[20 * bs + 7:20 * bs + 17] = b"\xbb" * 10
    assert read_all(h, size) == model

    ext = block_status(h, 0, size)
    assert flags_at(ext, 2 * bs) == 0                      # written again: data
    assert flags_at(ext, 4 * bs) == ZERO                   # NO_HOLE: zero, not a hole
    assert flags_at(ext, 6 * bs) == HOLE | ZERO
    assert flags_at(ext, 7 * bs + bs - 1) == HOLE | ZERO
    assert flags_at(ext, 10 * bs) == 0                     # partly zeroed: data
    assert flags_at(ext, 20 * bs) == 0                     # copied up from the hole
    assert flags_at(ext, 21 * bs) == HOLE | ZERO           # still the base's hole
    assert flags_at(ext, 0) == 0

    # a fast zero of part of a block still in the base would need a copy: refused,
    # nothing changes; of whole blocks it is fine
    with pytest.raises(nbd.Error) as ei:
        h.zero(100, 14 * bs + 1, nbd.CMD_FLAG_FAST_ZERO)
    assert ei.value.errno == "ENOTSUP"
    h.zero(2 * bs, 14 * bs, nbd.CMD_FLAG_FAST_ZERO)
    model[14 * bs:16 * bs] = bytes(2 * bs)
    assert read_all(h, size) == model
    h.shutdown()
    srv.stop()
    assert sha256(base) == before


def _status(ctl: str) -> dict:
    reply = control_request(ctl, {"cmd": "status"})
    assert reply["ok"], reply
    return reply["status"]


def test_two_workers_share_one_overlay(serve: ServerFactory, tmp_path: Path) -> None:
    """Connections served by different worker processes see each other's writes, and
    concurrent partial writes to the same new blocks from several connections keep
    every byte (the copy-up lock works across processes)."""
    bs = 64 * KiB
    size = 16 * MiB
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, size, seed=5))
    before = sha256(base)
    ctl = str(tmp_path / "ctl")
    srv = serve(str(base), "--workers", "2", "--control", ctl, "--filter", "cow")
    addr = ("127.0.0.1", srv.port)

    # raw connections until both workers serve at least one
    conns = [Raw(addr).connect() for _ in range(4)]
    wait_until(lambda: sum(c["state"] == "negotiated"
                           for c in _status(ctl)["client_list"]) >= 4)
    st = _status(ctl)
    by_port = {int(c["peer"].rsplit(":", 1)[1]): int(c["worker"]) for c in st["client_list"]}
    workers = {by_port[c.sock.getsockname()[1]] for c in conns}
    assert len(workers) == 2, st["client_list"]
    for i, c in enumerate(conns):  # each writes part of one new block...
        data = bytes([0x10 + i]) * 1000
        off = 7 * bs + i * 4096 + 3
        assert c.call(CMD_WRITE, off, len(data), payload=data)[0] == 0
        model[off:off + 1000] = data
    for c in conns:  # ...and every connection, on either worker, reads all of them
        err, got = c.call(CMD_READ, 7 * bs, bs)
        assert err == 0 and got == model[7 * bs:8 * bs]
    for c in conns:
        c.disc()

    for rnd in range(4):
        concurrent_partial_writes(srv.uri, model, 4, 16 + rnd * 32, 32, bs, seed=rnd)
    h = strict(srv.uri)
    assert read_all(h, size) == model
    h.shutdown()
    stats = _status(ctl)["exports"][0]["filters"]["cow"]
    assert stats["copy_ups"] >= 4 * 32  # summed over both workers
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == model
    srv.stop()
    assert sha256(base) == before


#: a read-only plugin whose calls block: the server runs them (and cow) on threads
SLOW_BASE = """
import os
import time

from pynbd.backends import Backend, Param


class SlowBase(Backend):
    params = {"path": Param("the base file", str)}
    multi_process = True
    blocking = True
    read_only = True
    can_trim = False
    can_zero = False

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    def pread_into(self, buf, offset):
        time.sleep(0.0005)  # long enough for other threads to reach the same block
        data = os.pread(self.fd, len(buf), offset)
        buf[:len(data)] = data

    def close(self):
        os.close(self.fd)
"""


def test_concurrent_partial_writes_threads(serve: ServerFactory, tmp_path: Path) -> None:
    """The same race inside one process: over a blocking plugin, cow runs on the
    server's threads; the base is a plugin that cannot be written at all."""
    bs = 4 * KiB
    size = 4 * MiB
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, size, seed=6))
    before = sha256(base)
    plugin = tmp_path / "slowbase.py"
    plugin.write_text(SLOW_BASE)
    srv = serve(f"python:{plugin}", f"path={base}", "--workers", "1",
                "--filter", "cow:blocksize=4K")
    for rnd in range(3):
        concurrent_partial_writes(srv.uri, model, 4, rnd * 256, 256, bs, seed=10 + rnd)
    h = strict(srv.uri)
    assert read_all(h, size) == model
    h.shutdown()
    srv.stop()
    assert sha256(base) == before


def test_named_overlay_survives_restart(serve: ServerFactory, tmp_path: Path) -> None:
    size = 8 * MiB
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, size, seed=7))
    before = sha256(base)
    ov = tmp_path / "overlay.img"
    spec = f"cow:file={ov},blocksize=32K"
    rng = random.Random(8)

    srv = serve(str(base), "--workers", "2", "--filter", spec)
    handles = [strict(srv.uri) for _ in range(3)]
    _random_ops(handles, model, rng, 200)
    for h in handles:
        h.shutdown()
    srv.stop()
    assert sha256(base) == before
    assert ov.exists() and Path(f"{ov}.map").exists()
    header = Path(f"{ov}.map").read_bytes()[:32]
    magic, version, bs, msize, nblocks = struct.unpack("<8sIIQQ", header)
    assert (magic, version, bs, msize, nblocks) == (b"PYNBDCOW", 1, 32 * KiB, size, 256)

    # restarted (with one worker; blocksize comes from the overlay): the same disk
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov}")
    h = strict(srv.uri)
    assert read_all(h, size) == model
    _random_ops([h], model, rng, 100)
    h.shutdown()
    srv.stop()
    srv = serve(str(base), "--workers", "2", "--filter", spec)
    assert nbdcopy_to(srv.uri, tmp_path / "copy.img") == model
    srv.stop()
    assert sha256(base) == before


def test_named_overlay_keeps_flushed_writes_after_a_crash(serve: ServerFactory,
                                                          tmp_path: Path) -> None:
    """SIGKILL (no clean stop): what was flushed is there; what was written after the
    last flush reads as the base or as the write, never as anything else."""
    bs = 64 * KiB
    size = 4 * MiB
    base = tmp_path / "base.img"
    data = make_base(base, size, seed=9)
    model = bytearray(data)
    ov = tmp_path / "overlay.img"
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov}")
    h = strict(srv.uri)
    flushed = [(100, 5000), (bs * 3 - 10, 200), (bs * 10, 2 * bs)]
    for off, n in flushed:
        d = random.Random(off).randbytes(n)
        h.pwrite(d, off)
        model[off:off + n] = d
    h.zero(bs, 20 * bs)
    model[20 * bs:21 * bs] = bytes(bs)
    h.flush()
    later = (30 * bs + 5, 1000)  # a new block, not flushed
    h.pwrite(b"\xee" * later[1], later[0])
    os.kill(srv.pid, signal.SIGKILL)
    srv.proc.wait(10)
    srv.stop()

    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov}")
    h2 = strict(srv.uri)
    got = read_all(h2, size)
    off, n = later
    block = slice(30 * bs, 31 * bs)
    assert got[block] in (data[block], bytes(model[30 * bs:off]) + b"\xee" * n
                          + bytes(model[off + n:31 * bs]))
    model[off:off + n] = got[off:off + n]
    assert got == model
    h2.shutdown()


def test_ephemeral_overlay_leaves_nothing(serve: ServerFactory, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    make_base(base, 2 * MiB)
    before = sha256(base)
    ovdir = tmp_path / "ovdir"
    ovdir.mkdir()
    srv = serve(str(base), "--workers", "2", "--filter", f"cow:dir={ovdir}")
    qemu_io(srv.uri, "write -P 0x5a 0 1M", "read -P 0x5a 0 1M")
    links = [os.readlink(f"/proc/{srv.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{srv.pid}/fd")]
    assert any(str(ovdir) in x and "(deleted)" in x for x in links), links
    assert list(ovdir.iterdir()) == []  # never visible by name
    srv.stop()
    assert list(ovdir.iterdir()) == []
    assert sha256(base) == before
    # a new server starts from the base again
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:dir={ovdir}")
    h = strict(srv.uri)
    assert h.pread(MiB, 0) == base.read_bytes()[:MiB]
    h.shutdown()


def test_writable_over_a_read_only_base(serve: ServerFactory, tmp_path: Path) -> None:
    """cow in front of ``readonly``: the layer below refuses every write, the export
    takes them (the base is only read)."""
    base = tmp_path / "base.img"
    model = bytearray(make_base(base, 2 * MiB, seed=11))
    before = sha256(base)
    srv = serve(str(base), "--workers", "2", "--filter", "cow", "--filter", "readonly")
    h = strict(srv.uri)
    assert not h.is_read_only()
    h.pwrite(b"\x01" * 3000, 777)
    h.zero(64 * KiB, 128 * KiB)
    h.trim(10, 300 * KiB)
    model[777:3777] = b"\x01" * 3000
    model[128 * KiB:192 * KiB] = bytes(64 * KiB)
    model[300 * KiB:300 * KiB + 10] = bytes(10)
    assert read_all(h, len(model)) == model
    h.shutdown()
    srv.stop()
    assert sha256(base) == before


# --- bad parameters ------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("cow:size=1", ["unknown parameter 'size'", "blocksize"]),
    ("cow:blocksize=3000", ["blocksize", "power of 2"]),
    ("cow:blocksize=abc", ["blocksize", "invalid size"]),
    ("cow:blocksize=1G", ["blocksize", "power of 2"]),
    ("cow:blocksize=256", ["blocksize", "power of 2"]),
    ("cow:dir=/nonexistent/dir", ["dir=/nonexistent/dir", "not a directory"]),
    ("cow:file=ov.img,dir=/tmp", ["dir=", "file="]),
    ("cow:file=/nonexistent/dir/ov.img", ["cannot create the overlay"]),
])
def test_bad_parameters(tmp_path: Path, spec: str, words: list[str]) -> None:
    base = tmp_path / "base.img"
    make_base(base, MiB)
    p = serve_fails(str(base), "--filter", spec, cwd=tmp_path)
    for w in words:
        assert w in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == [base]  # nothing created


def test_bad_named_overlays(serve: ServerFactory, tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    make_base(base, MiB)
    ov = tmp_path / "ov.img"
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov},blocksize=4K")
    # in use by another server
    p = serve_fails(str(base), "--filter", f"cow:file={ov}")
    assert "in use by another process" in p.stderr
    assert srv.alive()
    srv.stop()
    # made with another block size
    p = serve_fails(str(base), "--filter", f"cow:file={ov},blocksize=8K")
    assert "blocksize=4096" in p.stderr
    # made for a base of another size
    other = tmp_path / "other.img"
    make_base(other, 2 * MiB)
    p = serve_fails(str(other), "--filter", f"cow:file={ov}")
    assert "1048576-byte base" in p.stderr
    # a file that is not an overlay (no map beside it)
    foreign = tmp_path / "foreign.img"
    foreign.write_bytes(b"precious")
    p = serve_fails(str(base), "--filter", f"cow:file={foreign}")
    assert "not a cow overlay" in p.stderr
    assert foreign.read_bytes() == b"precious"
    # a corrupt map
    mp = Path(f"{ov}.map")
    raw = bytearray(mp.read_bytes())
    raw[:8] = b"XXXXXXXX"
    mp.write_bytes(raw)
    p = serve_fails(str(base), "--filter", f"cow:file={ov}")
    assert "not a cow block map" in p.stderr
    # the overlay gone, its map still there
    raw[:8] = b"PYNBDCOW"
    mp.write_bytes(raw)
    ov.unlink()
    p = serve_fails(str(base), "--filter", f"cow:file={ov}")
    assert "does not" in p.stderr


def test_server_keeps_serving_after_bad_requests(serve: ServerFactory, tmp_path: Path) -> None:
    """A write past the end is refused; the connection and others carry on."""
    base = tmp_path / "base.img"
    make_base(base, MiB)
    srv = serve(str(base), "--workers", "1", "--filter", "cow")
    c = Raw(("127.0.0.1", srv.port)).connect()
    err, _ = c.call(CMD_WRITE, MiB - 10, 20, payload=b"x" * 20)
    assert err != 0
    assert c.call(CMD_WRITE, 0, 5, payload=b"hello")[0] == 0
    assert c.call(CMD_READ, 0, 5) == (0, b"hello")
    c.disc()
    h = strict(srv.uri)
    assert h.pread(5, 0) == b"hello"
    h.shutdown()


def test_config_file(serve: ServerFactory, tmp_path: Path) -> None:
    """The TOML spelling: a cow export (table form, named overlay) and a readonly export
    (string form) of the same base; writes through the first never reach the second."""
    base = tmp_path / "base.img"
    data = make_base(base, MiB, seed=12)
    before = sha256(base)
    ov = tmp_path / "scratch.img"
    cfg = tmp_path / "pynbd.toml"
    cfg.write_text(f"""
[[export]]
name = "scratch"
target = "{base}"
filters = [{{name = "cow", file = "{ov}", blocksize = "16K"}}]

[[export]]
name = "pristine"
target = "{base}"
filters = ["readonly"]
""")
    srv = serve("--workers", "2", "--config", str(cfg))
    root = srv.uri.rsplit("/", 1)[0]
    qemu_io(f"{root}/scratch", "write -P 0x42 1000 100000", "read -P 0x42 1000 100000")
    h = strict(f"{root}/pristine")
    assert h.is_read_only() and h.pread(MiB, 0) == data
    h.shutdown()
    srv.stop()
    assert sha256(base) == before
    assert struct.unpack("<8sIIQQ", Path(f"{ov}.map").read_bytes()[:32])[2] == 16 * KiB


def test_named_overlay_after_an_interrupted_first_start(serve: ServerFactory,
                                                        tmp_path: Path) -> None:
    """What a crash during the first start can leave: an empty PATH and a PATH.map.tmp
    (a fresh start), or a map with a PATH not grown yet (grown)."""
    base = tmp_path / "base.img"
    data = make_base(base, MiB, seed=13)
    ov = tmp_path / "ov.img"
    ov.write_bytes(b"")
    Path(f"{ov}.map.tmp").write_bytes(b"half a map")
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov}")
    qemu_io(srv.uri, "write -P 0x61 0 70000")
    srv.stop()
    assert not Path(f"{ov}.map.tmp").exists()
    os.truncate(ov, 0)  # as if the crash came before the overlay got its size
    Path(f"{ov}.map").write_bytes(Path(f"{ov}.map").read_bytes()[:4096] + bytes(16))
    srv = serve(str(base), "--workers", "1", "--filter", f"cow:file={ov}")
    h = strict(srv.uri)
    assert h.pread(MiB, 0) == data  # an empty map: the base
    h.shutdown()
