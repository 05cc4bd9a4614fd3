"""``pynbd serve`` driven by Debian 13's libnbd 1.22 (python3-libnbd in strict mode,
nbdinfo, nbdcopy) and fio 3.39, which ask for extended headers first.

The libnbd scripts run in the Debian 13 tree (tests/support/trixie.py) with its Python
3.13; they print what they observed as JSON and the assertions are made here. pynbd
runs on the host; both sides see /tmp.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import trixie
from tests.support.images import make_image
from tests.support.processes import run_pynbd
from tests.support.pynbd_server import PynbdServer, ServerFactory, wait_until

pytestmark = pytest.mark.interop

MiB, GiB = 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    trixie.root()  # fail (never skip) without the Debian 13 peers
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


PRELUDE = r'''
import errno, hashlib, json, sys
import nbd
URI = sys.argv[1]
out = {}

def handle(uri=None, extended=True, contexts=("base:allocation",), strict=nbd.STRICT_MASK):
    h = nbd.NBD()
    h.set_strict_mode(strict)
    h.set_request_extended_headers(extended)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri(uri or URI)
    return h

def status(h, length, offset=0, flags=0, filter=None):
    got = {}
    def cb(ctx, off, entries, err):
        got.setdefault(ctx, []).extend([list(e) for e in entries])
        return 0
    if filter is None:
        h.block_status_64(length, offset, cb, flags)
    else:
        h.block_status_filter(length, offset, filter, cb, flags)
    return got

def pattern(seed, n):
    unit = hashlib.sha256(str(seed).encode()).digest() * 128
    return (unit * (n // len(unit) + 1))[:n]

def errno_of(fn):
    try:
        fn()
    except nbd.Error as e:
        return e.errno
    return 0
'''


def libnbd(body: str, uri: str, *args: str, timeout: float = 300) -> dict[str, object]:
    """Run ``body`` (with PRELUDE) under libnbd 1.22; returns its ``out`` dict."""
    script = PRELUDE + body + "\nprint(json.dumps(out))\n"
    result = trixie.python(script, uri, *args, timeout=timeout)
    assert isinstance(result, dict)
    return result


def requests_served(srv: PynbdServer, control: str) -> int:
    """Requests the server has counted on every export (pynbd status)."""
    p = run_pynbd("status", "--control", control, text=True, timeout=30, python=sys.executable)
    p.check_returncode()
    return sum(int(e["requests"]) for e in json.loads(p.stdout)["exports"])


def selected_lines(srv: PynbdServer) -> list[str]:
    return [x for x in srv.stderr.splitlines() if "selected (structured replies" in x]


# --- libnbd 1.22 in strict mode -------------------------------------------------------

def test_libnbd_every_command_with_extended_headers(serve: ServerFactory) -> None:
    srv = serve("--allocation-depth", "memory:256M")
    out = libnbd(r'''
h = handle(contexts=("base:allocation", "qemu:allocation-depth"))
out["extended"] = h.get_extended_headers_negotiated()
out["structured"] = h.get_structured_replies_negotiated()
out["can"] = {k: getattr(h, "can_" + k)() for k in (
    "flush", "fua", "trim", "zero", "fast_zero", "df", "multi_conn", "cache",
    "block_status_payload")}
out["meta"] = [h.can_meta_context(c) for c in ("base:allocation", "qemu:allocation-depth")]
out["block_size"] = [h.get_block_size(k) for k in (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED,
                                                    nbd.SIZE_MAXIMUM)]
ok = {}
# WRITE (plain, FUA), READ (plain, DF), structured read
h.pwrite(pattern(1, 1 << 20), 0)
h.pwrite(pattern(2, 65536), 1 << 20, nbd.CMD_FLAG_FUA)
ok["read"] = h.pread(1 << 20, 0) == pattern(1, 1 << 20)
df = []
def one(buf, off, st, err):
    df.append([off, bytes(buf) == pattern(2, 65536), st])
    return 0
h.pread_structured(65536, 1 << 20, one, nbd.CMD_FLAG_DF)
ok["read_df"] = df == [[1 << 20, True, 1]]
chunks = []
def chunk(buf, off, st, err):
    chunks.append([off, len(buf), st])
    return 0
h.pread_structured(4 << 20, 0, chunk)
out["chunks"] = sorted(chunks)
h.flush()
# TRIM (plain, FUA), CACHE, WRITE_ZEROES (plain, NO_HOLE, FAST_ZERO, FUA)
h.trim(65536, 0)
h.trim(65536, 65536, nbd.CMD_FLAG_FUA)
h.cache(1 << 20, 0)
h.zero(65536, 2 << 20)
h.zero(65536, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 4 << 20, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_FUA)
ok["zeroed"] = h.pread(131072, 0) == bytes(131072)
# BLOCK_STATUS (both contexts, REQ_ONE, filtered to one context)
out["status"] = status(h, 8 << 20)
out["status_req_one"] = status(h, 8 << 20, 0, nbd.CMD_FLAG_REQ_ONE)
out["filter_depth"] = status(h, 8 << 20, filter=["qemu:allocation-depth"])
out["filter_base"] = status(h, 8 << 20, 65536, filter=["base:allocation"])
# 32 MiB and 64 MiB requests (the default maximum)
for n in (32 << 20, 64 << 20):
    h.pwrite(pattern(n, n), 128 << 20)
    ok["rw_%d" % n] = h.pread(n, 128 << 20) == pattern(n, n)
out["ok"] = ok
# pipelined: many requests in flight at once
for i in range(64):
    h.aio_pwrite(pattern(i, 4096), i * 8192)
while h.aio_in_flight():
    h.poll(-1)
bufs = [nbd.Buffer(4096) for _ in range(64)]
for i in range(64):
    h.aio_pread(bufs[i], i * 8192)
while h.aio_in_flight():
    h.poll(-1)
out["pipelined"] = all(bufs[i].to_bytearray() == pattern(i, 4096) for i in range(64))
h.shutdown()
''', srv.uri)
    assert out["extended"] is True and out["structured"] is True
    assert out["can"] == {"flush": True, "fua": True, "trim": True, "zero": True,
                          "fast_zero": True, "df": True, "multi_conn": True, "cache": True,
                          "block_status_payload": True}
    assert out["meta"] == [True, True]
    assert out["block_size"] == [1, 4096, 64 * MiB]
    assert out["ok"] == {"read": True, "read_df": True, "zeroed": True,
                         "rw_33554432": True, "rw_67108864": True}
    assert out["pipelined"] is True
    # the read of 4 MiB: data where written, holes elsewhere (64 KiB memory chunks)
    assert out["chunks"][0] == [0, MiB + 65536, 1]  # LIBNBD_READ_DATA = 1
    assert all(c[2] in (1, 2) for c in out["chunks"])
    assert sum(c[1] for c in out["chunks"]) == 4 * MiB
    st = out["status"]
    assert isinstance(st, dict)
    assert st["qemu:allocation-depth"] == [[8 * MiB, 1]]
    base = st["base:allocation"]
    assert base[0] == [2 * 65536, 3] and base[1][1] == 0  # trimmed, then data
    assert out["status_req_one"] == {"base:allocation": [[2 * 65536, 3]],
                                     "qemu:allocation-depth": [[8 * MiB, 1]]}
    assert out["filter_depth"] == {"qemu:allocation-depth": [[8 * MiB, 1]]}
    fb = out["filter_base"]
    assert isinstance(fb, dict) and list(fb) == ["base:allocation"]
    assert any("extended headers True" in x for x in selected_lines(srv))
    assert "Traceback" not in srv.stderr


def test_libnbd_compact_headers_still_work(serve: ServerFactory) -> None:
    """The same libnbd with extended headers turned off, and against a server that does
    not offer them: structured replies, 32-bit requests."""
    for args in (("memory:64M",), ("--no-extended-headers", "memory:64M")):
        srv = serve(*args)
        out = libnbd(r'''
for ext in (False, True):
    h = handle(extended=ext)
    key = "ext" if ext else "compact"
    out[key] = [h.get_extended_headers_negotiated(), h.get_structured_replies_negotiated(),
                h.can_block_status_payload()]
    h.pwrite(pattern(3, 65536), 0)
    out[key + "_read"] = h.pread(65536, 0) == pattern(3, 65536)
    h.trim(65536, 65536)
    out[key + "_status"] = status(h, 1 << 20)
    h.shutdown()
''', srv.uri)
        offered = "--no-extended-headers" not in args
        assert out["compact"] == [False, True, False]
        assert out["ext"] == [offered, True, offered]
        assert out["compact_read"] is True and out["ext_read"] is True
        assert out["compact_status"] == out["ext_status"] == {
            "base:allocation": [[65536, 0], [MiB - 65536, 3]]}


def sparse_16g(tmp_path: Path) -> Path:
    return make_image(tmp_path / "sparse16g.img", 16 * GiB, {6 * GiB: b"\xab" * 65536})


def test_block_status_ext_and_64_bit_trim_and_zero_on_16_gib(serve: ServerFactory,
                                                              tmp_path: Path) -> None:
    """BLOCK_STATUS_EXT with a first extent of 6 GiB (over 32 bits) in one reply, and
    TRIM / WRITE_ZEROES of the whole 16 GiB export, each as one request."""
    img = sparse_16g(tmp_path)
    control = str(tmp_path / "ctl.sock")
    srv = serve("--control", control, str(img))
    out = libnbd(r'''
h = handle()
out["extended"] = h.get_extended_headers_negotiated()
out["size"] = h.get_size()
out["status"] = status(h, h.get_size())
h.shutdown()
''', srv.uri)
    assert out["extended"] is True and out["size"] == 16 * GiB
    base = out["status"]["base:allocation"]  # type: ignore[index]
    assert base[0] == [6 * GiB, 3]  # hole,zero: longer than 4 GiB in one descriptor
    assert base[1][1] == 0 and sum(e[0] for e in base) == 16 * GiB
    assert len(base) == 3
    before = requests_served(srv, control)
    assert before == 1  # that status was one request
    out = libnbd(r'''
h = handle()
h.trim(h.get_size(), 0)
h.zero(h.get_size(), 0)
out["status"] = status(h, h.get_size())
out["tail"] = h.pread(65536, 6 << 30) == bytes(65536)
h.shutdown()
''', srv.uri)
    # one TRIM, one WRITE_ZEROES, one BLOCK_STATUS, one READ: nothing was split
    assert requests_served(srv, control) - before == 4
    assert out["status"] == {"base:allocation": [[16 * GiB, 3]]}
    assert out["tail"] is True
    assert os.stat(img).st_blocks == 0  # the whole file is a hole again


def test_compact_block_status_caps_extents_below_4_gib(serve: ServerFactory,
                                                        tmp_path: Path) -> None:
    srv = serve(str(sparse_16g(tmp_path)))
    out = libnbd(r'''
h = handle(extended=False)
out["status"] = status(h, 0xFFFFFFFF - 0xFFFF)
h.shutdown()
''', srv.uri)
    base = out["status"]["base:allocation"]  # type: ignore[index]
    assert base == [[0xFFFF0000, 3]]


def test_libnbd_server_side_checks_with_strictness_off(serve: ServerFactory) -> None:
    """With libnbd's client-side checks off, pynbd answers the spec's errors itself
    and the connection stays usable."""
    srv = serve("--allocation-depth", "--max-request-size", "32M", "memory:64M")
    out = libnbd(r'''
h = handle(strict=0, contexts=("base:allocation", "qemu:allocation-depth"))
out["extended"] = h.get_extended_headers_negotiated()
out["max"] = h.get_block_size(nbd.SIZE_MAXIMUM)
out["read_past_max"] = errno_of(lambda: h.pread((32 << 20) + 1, 0))
out["trim_past_end"] = errno_of(lambda: h.trim(1 << 40, 0))
out["zero_past_end"] = errno_of(lambda: h.zero(65536, 64 << 20))
out["status_past_end"] = errno_of(lambda: status(h, 1 << 40))
out["still_ok"] = h.pread(4096, 0) == bytes(4096)
h.shutdown()
''', srv.uri)
    assert out["extended"] is True and out["max"] == 32 * MiB
    assert out["read_past_max"] == "EOVERFLOW"
    assert out["trim_past_end"] == out["status_past_end"] == "EINVAL"
    assert out["zero_past_end"] == "ENOSPC"
    assert out["still_ok"] is True


def test_block_status_payload_bad_ids_on_a_live_server(serve: ServerFactory) -> None:
    """libnbd never sends them, so raw bytes: a payload naming a duplicate or unknown
    context id gets EINVAL (an extended error chunk), the stream stays in sync, and a
    good payload then selects one context."""
    import socket
    import struct

    srv = serve("--allocation-depth", "memory:8M")
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)

    def recv(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            assert chunk, "server closed"
            buf += chunk
        return buf

    def option(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        s.sendall(b"IHAVEOPT" + struct.pack(">II", opt, len(data)) + data)
        reps = []
        while True:
            _, _, rep, ln = struct.unpack(">QIII", recv(20))
            reps.append((rep, recv(ln)))
            if rep == 1 or rep & 0x80000000:
                return reps

    recv(18)
    s.sendall(struct.pack(">I", 3))
    assert option(11) == [(1, b"")]
    q = [b"base:allocation", b"qemu:allocation-depth"]
    data = struct.pack(">II", 0, 2) + b"".join(struct.pack(">I", len(x)) + x for x in q)
    ids = {payload[4:].decode(): struct.unpack(">I", payload[:4])[0]
           for rep, payload in option(10, data) if rep == 4}
    assert set(ids) == {"base:allocation", "qemu:allocation-depth"}
    reps = option(7, struct.pack(">IH", 0, 0))
    flags = struct.unpack(">HQH", reps[0][1])[2]
    assert flags & 0x1000  # NBD_FLAG_BLOCK_STATUS_PAYLOAD

    def bs(cookie: int, payload: bytes) -> tuple[int, int, int, bytes]:
        s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 32, 7, cookie, 4096, len(payload))
                  + payload)
        magic, rflags, rtype, ck, off, ln = struct.unpack(">IHHQQQ", recv(32))
        assert (magic, ck, off) == (0x6E8A278C, cookie, 4096)
        return rflags, rtype, ck, recv(ln)

    base, depth = ids["base:allocation"], ids["qemu:allocation-depth"]
    for cookie, bad in ((1, [base, base]), (2, [depth, 99]), (3, [])):
        rflags, rtype, _, body = bs(cookie, struct.pack(f">Q{len(bad)}I", MiB, *bad))
        assert (rflags, rtype) == (1, 0x8001) and struct.unpack(">I", body[:4])[0] == 22
    rflags, rtype, _, body = bs(4, struct.pack(">QI", MiB, depth))
    assert (rflags, rtype) == (1, 6)  # one BLOCK_STATUS_EXT chunk, for that context only
    assert struct.unpack(">IIQQ", body) == (depth, 1, MiB, 1)
    s.sendall(struct.pack(">IHHQQQ", 0x21E41C71, 0, 2, 5, 0, 0))  # DISC
    s.close()


# --- nbdinfo / nbdcopy 1.22 -----------------------------------------------------------

def test_nbdinfo_json_shows_extended_headers(serve: ServerFactory, tmp_path: Path) -> None:
    cfg = tmp_path / "exports.toml"
    cfg.write_text('[[export]]\nname = "a"\ntarget = "memory:1M"\n'
                   '[[export]]\nname = "b"\ntarget = "memory:2M"\ndescription = "second"\n')
    srv = serve("--config", str(cfg))
    info = json.loads(trixie.run(["nbdinfo", "--json", srv.uri]).stdout)
    assert info["extended"] is True and info["structured"] is True
    (ex,) = info["exports"]
    assert ex["export-size"] == MiB and ex["block_size_maximum"] == 64 * MiB
    assert ex["contexts"] == ["base:allocation"]
    human = trixie.run(["nbdinfo", srv.uri]).stdout
    assert "using extended packets" in human
    listed = json.loads(trixie.run(["nbdinfo", "--list", "--json", srv.uri]).stdout)
    assert [e["export-name"] for e in listed["exports"]] == ["a", "b"]
    assert listed["exports"][1]["description"] == "second"
    # without extended headers offered: nbdinfo falls back to structured replies
    srv2 = serve("--no-extended-headers", "memory:1M")
    info = json.loads(trixie.run(["nbdinfo", "--json", srv2.uri]).stdout)
    assert info["extended"] is False and info["structured"] is True


def test_nbdinfo_map_and_pynbd_info_agree(serve: ServerFactory) -> None:
    srv = serve("--allocation-depth", "memory:8M")
    libnbd(r'''
h = handle()
h.pwrite(pattern(9, 1 << 20), 2 << 20)
h.shutdown()
''', srv.uri)
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        theirs = json.loads(trixie.run(["nbdinfo", "--json", f"--map={ctx}", srv.uri]).stdout)
        p = run_pynbd("info", "--json", "--map", ctx, srv.uri, text=True, timeout=60,
                      python=sys.executable)
        p.check_returncode()
        ours = json.loads(p.stdout)
        assert [(r["offset"], r["length"], r["type"], r["description"]) for r in ours] == \
            [(r["offset"], r["length"], r["type"], r["description"]) for r in theirs], ctx
    assert [r["description"] for r in theirs] == ["local"]


def test_nbdcopy_through_pynbd_with_extended_headers(serve: ServerFactory,
                                                     tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(256 * MiB)
        for i in range(0, 256, 7):
            f.seek(i * MiB)
            f.write(os.urandom(MiB // 2))
    dst = tmp_path / "dst.img"
    a = serve("memory:256M")
    b = serve("memory:256M")
    trixie.run(["nbdcopy", "--request-size=33554432", str(src), a.uri])
    trixie.run(["nbdcopy", "--connections=4", "--requests=32", a.uri, b.uri])
    trixie.run(["nbdcopy", b.uri, str(dst)])
    assert hashlib.sha256(src.read_bytes()).digest() == hashlib.sha256(dst.read_bytes()).digest()
    for srv in (a, b):
        lines = selected_lines(srv)
        assert lines and all("extended headers True" in x for x in lines), lines


# --- fio 3.39 (nbd engine, libnbd 1.22) -----------------------------------------------

def test_fio_nbd_engine_verifies(serve: ServerFactory, tmp_path: Path) -> None:
    srv = serve("memory:128M")
    job = tmp_path / "verify.fio"
    job.write_text(
        "[global]\nioengine=nbd\nuri=" + srv.uri + "\nsize=64M\nverify=crc32c\n"
        "do_verify=1\nverify_fatal=1\n"
        "[randwrite-verify]\nrw=randwrite\nbs=4k\niodepth=32\nnumjobs=1\n"
        "[seq-big]\nrw=write\nbs=1M\niodepth=4\noffset=64M\nsize=64M\n")
    p = trixie.run(["fio", "--output-format=json", str(job)], timeout=600)
    result = json.loads(p.stdout[p.stdout.index("{"):])
    for j in result["jobs"]:
        assert j["error"] == 0, j["jobname"]
        assert j["write"]["io_bytes"] == 64 * MiB
        assert j["read"]["io_bytes"] == 64 * MiB  # the verify pass read it all back
    assert wait_until(lambda: len(selected_lines(srv)) >= 2)
    assert all("extended headers True" in x for x in selected_lines(srv))
    assert re.search(r"fio-3\.39", trixie.version("fio"))
