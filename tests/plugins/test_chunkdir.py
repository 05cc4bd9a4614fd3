"""examples/plugins/chunkdir.py beyond interop: the chunk files on disk, writers racing to
create the same chunk, several worker processes sharing the directory (no stale
per-process state, a FLUSH anywhere covering writes made everywhere), reopening, and
bad parameters."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import nbd
import pytest

from pynbd.backends.loader import load_plugin_class
from pynbd.server.control import control_request
from tests.plugins.conftest import EXAMPLES, MiB, run, serve_fails
from tests.server.rawnbd import CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_ZERO, Raw
from tests.support.pynbd_server import PynbdServer, ServerFactory

CHUNKDIR = f"python:{EXAMPLES / 'chunkdir.py'}"
K = 1024


def chunk_files(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_layout_one_file_per_written_chunk(serve: ServerFactory, tmp_path: Path) -> None:
    d = tmp_path / "disk"
    srv = serve("--workers", "1", CHUNKDIR, f"dir={d}", "size=10M", "chunk=1M")
    h = nbd.NBD()
    h.set_strict_mode(nbd.STRICT_MASK)
    h.connect_uri(srv.uri)
    assert chunk_files(d) == []
    assert h.pread(10 * MiB, 0) == bytes(10 * MiB)
    assert chunk_files(d) == []  # reading creates nothing
    h.pwrite(b"x" * 10, 3 * MiB - 5)  # straddles chunks 2 and 3
    h.pwrite(b"y" * 4096, 9 * MiB + 4096)
    assert chunk_files(d) == [f"{i:016x}" for i in (2, 3, 9)]
    assert all((d / n).stat().st_size == MiB for n in chunk_files(d))
    assert (d / f"{2:016x}").read_bytes()[-5:] == b"xxxxx"
    assert (d / f"{3:016x}").read_bytes()[:5] == b"xxxxx"
    # whole chunk zeroed (may trim) or trimmed: the file goes; partial: it stays
    h.zero(MiB, 2 * MiB)
    assert chunk_files(d) == [f"{i:016x}" for i in (3, 9)]
    h.trim(MiB, 9 * MiB)
    assert chunk_files(d) == [f"{i:016x}" for i in (3,)]
    h.zero(MiB, 3 * MiB, nbd.CMD_FLAG_NO_HOLE)  # NO_HOLE: the chunk stays, zeroed
    assert chunk_files(d) == [f"{3:016x}"]
    assert h.pread(10 * MiB, 0) == bytes(10 * MiB)
    h.flush()
    assert (d / ".dirty").read_bytes() == bytes(11)  # nothing left unflushed
    h.shutdown()


def test_last_chunk_shorter_than_chunk_size(serve: ServerFactory, tmp_path: Path) -> None:
    d = tmp_path / "disk"
    size = 3 * MiB + 12 * K
    srv = serve("--workers", "1", CHUNKDIR, f"dir={d}", f"size={size}", "chunk=1M")
    h = nbd.NBD()
    h.connect_uri(srv.uri)
    h.pwrite(b"z" * 12 * K, 3 * MiB)
    assert (d / f"{3:016x}").stat().st_size == 12 * K
    h.zero(12 * K, 3 * MiB)  # the whole (short) last chunk: deleted
    assert chunk_files(d) == []
    h.shutdown()


def test_racing_writers_create_the_same_chunk(tmp_path: Path) -> None:
    """Two openings of one directory (as two worker processes have), eight threads each
    writing their own blocks of the same not-yet-existing chunks at the same moment:
    every block is there afterwards."""
    cls = load_plugin_class(str(EXAMPLES / "chunkdir.py"))
    d = str(tmp_path / "disk")
    a = cls.open_target("", {"dir": d, "size": "64M", "chunk": "64K"}, False)
    b = cls.open_target("", {"dir": d, "size": "64M", "chunk": "64K"}, False)
    nthreads, rounds = 8, 100
    barrier = threading.Barrier(nthreads)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        backend = a if k % 2 else b
        try:
            for r in range(rounds):
                barrier.wait(timeout=30)
                # thread k writes 8 KiB block k of chunk r, all at once
                backend.pwrite(bytes([k + 1]) * 8 * K, r * 64 * K + k * 8 * K)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    buf = bytearray(64 * K)
    for r in range(rounds):
        a.pread_into(memoryview(buf), r * 64 * K)
        want = b"".join(bytes([k + 1]) * 8 * K for k in range(nthreads))
        assert buf == want, f"chunk {r} lost a write"
    a.close()
    b.close()


def status(ctl: str) -> dict:
    reply = control_request(ctl, {"cmd": "status"})
    assert reply["ok"], reply
    return reply["status"]  # type: ignore[no-any-return]


def two_workers(serve: ServerFactory, tmp_path: Path, *params: str) -> tuple[PynbdServer, str,
                                                                              Raw, Raw]:
    """A chunkdir served by two worker processes, and one raw connection on each."""
    ctl = str(tmp_path / "ctl.sock")
    srv = serve("--workers", "2", "--control", ctl, CHUNKDIR, *params)
    addr = ("127.0.0.1", srv.port)
    conns = [Raw(addr).connect() for _ in range(6)]
    by: dict[int, Raw] = {}
    for _ in range(200):
        st = status(ctl)
        workers = {c["peer"]: int(c["worker"]) for c in st["client_list"]
                   if c["state"] == "negotiated"}
        if len(workers) == len(conns):
            break
        time.sleep(0.05)
    for c in conns:
        w = workers[f"127.0.0.1:{c.sock.getsockname()[1]}"]
        by.setdefault(w, c)
    assert len(by) == 2, f"connections all on one worker: {workers}"
    for c in conns:
        if c not in by.values():
            c.disc()
    first, second = by.values()
    return srv, ctl, first, second


def test_no_stale_state_across_worker_processes(serve: ServerFactory, tmp_path: Path) -> None:
    d = tmp_path / "disk"
    _srv, _ctl, a, b = two_workers(serve, tmp_path, f"dir={d}", "size=8M", "chunk=64K")
    blk = 64 * K
    one = bytes(range(256)) * (blk // 256)
    # a creates chunk 5 and reads it; b deletes it; a writes into it again: the write
    # must land in the file b and later readers see, not in a remembered deleted one
    assert a.call(CMD_WRITE, 5 * blk, blk, payload=one)[0] == 0
    assert a.call(CMD_READ, 5 * blk, blk) == (0, one)
    assert b.call(CMD_TRIM, 5 * blk, blk)[0] == 0
    assert not (d / f"{5:016x}").exists()
    assert a.call(CMD_WRITE, 5 * blk + 4096, 4096, payload=b"\x07" * 4096)[0] == 0
    assert b.call(CMD_READ, 5 * blk, blk)[1] == bytes(4096) + b"\x07" * 4096 + bytes(blk - 8192)
    # and the other way round: b writes, a zeroes the whole chunk, b reads zeros
    assert b.call(CMD_WRITE, 6 * blk, blk, payload=one)[0] == 0
    assert a.call(CMD_READ, 6 * blk, blk) == (0, one)
    assert a.call(CMD_ZERO, 6 * blk, blk)[0] == 0
    assert b.call(CMD_READ, 6 * blk, blk) == (0, bytes(blk))
    assert b.call(CMD_WRITE, 6 * blk, 4096, payload=b"\x09" * 4096)[0] == 0
    assert a.call(CMD_READ, 6 * blk, 4096) == (0, b"\x09" * 4096)
    a.disc()
    b.disc()


def test_flush_on_one_worker_covers_writes_on_the_other(serve: ServerFactory,
                                                        tmp_path: Path) -> None:
    """CAN_MULTI_CONN across processes: the chunks written through worker A are marked
    in the shared map; a FLUSH through worker B syncs them and clears the marks."""
    d = tmp_path / "disk"
    _srv, _ctl, a, b = two_workers(serve, tmp_path, f"dir={d}", "size=4M", "chunk=64K")
    for i in (1, 7, 40):
        assert a.call(CMD_WRITE, i * 64 * K + 100, 4096, payload=b"w" * 4096)[0] == 0
    marks = (d / ".dirty").read_bytes()
    assert marks[0] == 1  # new chunk files: the directory needs a sync
    assert [i - 1 for i, m in enumerate(marks) if m and i] == [1, 7, 40]
    assert b.call(CMD_FLUSH)[0] == 0
    assert (d / ".dirty").read_bytes() == bytes(65)
    a.disc()
    b.disc()


def test_reopen_keeps_data_and_refuses_another_chunk_size(serve: ServerFactory,
                                                          tmp_path: Path) -> None:
    d = tmp_path / "disk"
    srv = serve("--workers", "2", CHUNKDIR, f"dir={d}", "size=8M", "chunk=128K")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 300k", srv.uri)
    srv.stop()
    srv = serve("--workers", "1", CHUNKDIR, f"dir={d}", "size=16M", "chunk=128K")  # grown
    p = run("qemu-io", "-f", "raw", "-c", "read -P 0x5c 1M 300k", "-c", "read -P 0 8M 8M",
            srv.uri)
    assert "Pattern verification failed" not in p.stdout
    srv.stop()
    bad = serve_fails(CHUNKDIR, f"dir={d}", "size=8M", "chunk=1M")
    assert bad.returncode == 2
    assert "holds chunks of chunk=131072 bytes, not chunk=1048576" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("params,message", [
    ([], "parameter 'dir' is required"),
    (["dir=D"], "parameter 'size' is required"),
    (["dir=D", "size=1M", "chunk=3000"], "chunk=3000: must be a power of two"),
    (["dir=D", "size=0"], "size must be more than 0"),
    (["dir=D", "size=lots"], "size='lots': invalid size"),
    (["dir=FILE", "size=1M"], "FILE: not a directory"),
    (["dir=D", "size=1M", "colour=red"], "unknown parameter 'colour'"),
])
def test_bad_parameters(tmp_path: Path, params: list[str], message: str) -> None:
    (tmp_path / "FILE").write_text("not a directory")
    params = [p.replace("=D", f"={tmp_path / 'd'}").replace("=FILE", f"={tmp_path / 'FILE'}")
              for p in params]
    p = serve_fails(CHUNKDIR, *params)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
