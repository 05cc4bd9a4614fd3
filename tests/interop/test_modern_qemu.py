"""qemu 10 (Debian 13) both ways, and the clean fallback against servers without
extended headers (nbdkit 1.42 from Debian 13; qemu-nbd 7.2 and nbdkit 1.32 from
Debian 12).

* qemu-io / qemu-img 10 against ``pynbd serve``: extended headers negotiated (qemu's own
  trace events show the option and its ACK), read, write, discard, write -z, map.
* pynbd's client against qemu-nbd 10: extended headers, 64-bit requests, the
  ``qemu:dirty-bitmap:NAME`` (-B) and ``qemu:allocation-depth`` (-A) contexts, the
  block status payload form; ``pynbd info --map``/``--list`` next to nbdinfo 1.22.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import trixie
from tests.support.nbd_servers import Server, start_nbdkit, start_qemu_nbd
from tests.support.processes import run_pynbd
from tests.support.pynbd_server import ServerFactory

from pynbd.client import connect
from pynbd.protocol.constants import TransmissionFlag

pytestmark = pytest.mark.interop

MiB, GiB = 1 << 20, 1 << 30
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    trixie.root()
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def peers() -> Iterator[list[Server]]:
    trixie.root()
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in started:
            s.stop()


def pynbd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_pynbd(*args, text=True, timeout=120, python=sys.executable)


# --- qemu 10 as the client -------------------------------------------------------------

def test_qemu_io_10_uses_extended_headers_with_pynbd(serve: ServerFactory) -> None:
    srv = serve("memory:64M")
    p = trixie.run(["qemu-io", "-f", "raw", "--trace", "nbd_*",
                    "-c", "write -P 0x5a 0 4M", "-c", "read -P 0x5a 0 4M",
                    "-c", "discard 1M 1M", "-c", "read -P 0 1M 1M",
                    "-c", "write -z 2M 1M", "-c", "read -P 0 2M 1M",
                    "-c", "write -z -u 3M 512k", "-c", "read -P 0x5a 3584k 512k",
                    "-c", "write -P 0x11 32M 32M", "-c", "read -P 0x11 32M 32M",
                    srv.uri])
    assert "Pattern verification failed" not in p.stdout and "failed" not in p.stdout
    trace = p.stderr
    assert "Sending option request 11 (extended headers)" in trace
    assert "Received option reply 11 (extended headers), type 1 (ack)" in trace
    assert "structured reply" not in trace  # extended headers took its place
    # a 32 MiB request went out whole (qemu's own limit is 32 MiB)
    assert ".len = 33554432" in trace and ".type = 1 (write)" in trace
    assert "extended headers True" in srv.stderr
    # qemu-img map through block status
    m = json.loads(trixie.run(["qemu-img", "map", "--output=json", "-f", "raw",
                               srv.uri]).stdout)
    zero = [(e["start"], e["length"]) for e in m if e["zero"] and not e["data"]]
    assert (MiB, MiB) in zero or any(s <= MiB and s + n >= 2 * MiB for s, n in zero)
    assert m[-1]["start"] + m[-1]["length"] == 64 * MiB


def test_qemu_img_convert_and_compare_through_pynbd(serve: ServerFactory,
                                                     tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    trixie.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "128M"])
    trixie.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 3M",
                "-c", "write -P 0x44 100M 5M", str(src)])
    srv = serve("memory:128M")
    trixie.run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), srv.uri])
    p = trixie.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), srv.uri],
                   check=False)
    assert p.returncode == 0 and "Images are identical" in p.stdout, p.stdout + p.stderr


# --- pynbd's client against qemu-nbd 10 --------------------------------------------------

def backing_chain(tmp_path: Path) -> Path:
    """base.qcow2 (data at 0-1M) <- top.qcow2 (data at 2M-3M, bitmap b0 dirty there),
    8 GiB virtual."""
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    trixie.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "8G"])
    trixie.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", str(base)])
    trixie.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                str(top)])
    trixie.run(["qemu-img", "bitmap", "--add", str(top), "b0"])
    trixie.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x62 2M 1M", str(top)])
    return top


def test_pynbd_client_with_qemu_nbd_10_contexts(peers: list[Server], tmp_path: Path) -> None:
    top = backing_chain(tmp_path)
    srv = trixie.start_qemu_nbd(tmp_path / "q", top, fmt="qcow2", export="disk",
                                extra=["-A", "-B", "b0"])
    peers.append(srv)
    ctxs = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0")
    with connect(srv.uri(), meta_contexts=ctxs) as c:
        assert c.extended and c.structured
        assert sorted(c.meta_contexts.values()) == sorted(ctxs)
        assert c.size == 8 * GiB
        # the whole 8 GiB in one 64-bit block status request
        st = c.block_status(0, c.size)
        depth = [(e.offset, e.length, e.flags) for e in st["qemu:allocation-depth"]]
        assert depth[:3] == [(0, MiB, 2), (MiB, MiB, 0), (2 * MiB, MiB, 1)]
        assert depth[3][0] == 3 * MiB and depth[3][2] == 0
        assert sum(e[1] for e in depth) == 8 * GiB
        dirty = [(e.offset, e.length, e.flags) for e in st["qemu:dirty-bitmap:b0"]]
        assert (2 * MiB, MiB, 1) in [(o, n, f) for o, n, f in dirty if f]
        assert sum(n for _, n, f in dirty if f) == MiB
        # one context at a time: the payload form when the server offers it
        offered = c.can_block_status_payload()
        only = c.block_status(0, 4 * MiB, contexts=("qemu:dirty-bitmap:b0",))
        assert list(only) == ["qemu:dirty-bitmap:b0"]
        assert next(e for e in only["qemu:dirty-bitmap:b0"] if e.flags).offset == 2 * MiB
        # data path with 64-bit effect lengths
        assert c.read(0, 4096) == b"\x61" * 4096
        assert c.read(2 * MiB, 4096) == b"\x62" * 4096
        c.write(5 * GiB, b"\x77" * 65536)
        assert c.read(5 * GiB, 65536) == b"\x77" * 65536
        c.cache(0, 8 * GiB)
        c.write_zeroes(4 * GiB, 4 * GiB)  # one request of 4 GiB (over 32 bits)
        assert c.read(5 * GiB, 65536) == bytes(65536)
        c.trim(0, 8 * GiB)
        c.flush()
        ext = list(c.iter_extents(0, c.size))
        assert ext[0].offset == 0 and ext[-1].offset + ext[-1].length == 8 * GiB
    p = trixie.run(["qemu-nbd", "--version"])
    assert "10.0" in p.stdout
    print("qemu-nbd 10 offers NBD_FLAG_BLOCK_STATUS_PAYLOAD:", offered)


def test_pynbd_info_map_labels_match_nbdinfo(peers: list[Server], tmp_path: Path) -> None:
    top = backing_chain(tmp_path)
    srv = trixie.start_qemu_nbd(tmp_path / "q", top, fmt="qcow2", export="disk",
                                read_only=True, extra=["-A", "-B", "b0"])
    peers.append(srv)
    for ctx in ("qemu:allocation-depth", "qemu:dirty-bitmap:b0", "base:allocation"):
        theirs = json.loads(trixie.run(["nbdinfo", "--json", f"--map={ctx}",
                                        srv.uri()]).stdout)
        p = pynbd_cli("info", "--json", "--map", ctx, srv.uri())
        assert p.returncode == 0, p.stderr
        ours = json.loads(p.stdout)
        assert [(r["offset"], r["length"], r["type"], r["description"]) for r in ours] == \
            [(r["offset"], r["length"], r["type"], r["description"]) for r in theirs], ctx
        if ctx == "qemu:allocation-depth":
            assert [r["description"] for r in ours][:3] == ["backing depth 2", "absent",
                                                            "local"]
    # the human form uses the same words
    p = pynbd_cli("info", "--map", "qemu:allocation-depth", srv.uri())
    assert "backing depth 2" in p.stdout and "local" in p.stdout and "dirty" not in p.stdout


def test_pynbd_info_list_negotiates_each_exports_contexts(peers: list[Server],
                                                          serve: ServerFactory,
                                                          tmp_path: Path) -> None:
    """--list used to set meta contexts for the URI's export and then select another:
    every listed export said can_block_status false."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    q = trixie.start_qemu_nbd(tmp_path / "q", img, export="disk", extra=["-A"])
    peers.append(q)
    cfg = tmp_path / "exports.toml"
    cfg.write_text('[[export]]\nname = "a"\ntarget = "memory:1M"\n'
                   '[[export]]\nname = "b"\ntarget = "memory:2M"\n')
    mine = serve("--config", str(cfg), "--allocation-depth")
    for uri, names in ((q.uri(export=""), ["disk"]), (mine.uri, ["a", "b"])):
        p = pynbd_cli("info", "--list", "--json", uri)
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert out["extended"] is True
        assert [e["export-name"] for e in out["exports"]] == names
        for e in out["exports"]:
            assert e["can_block_status"] is True, e
            assert e["extended_headers"] is True
            assert set(e["contexts"]) >= {"base:allocation", "qemu:allocation-depth"}
        theirs = json.loads(trixie.run(["nbdinfo", "--list", "--json", uri]).stdout)
        assert [e["export-name"] for e in theirs["exports"]] == names


def test_pynbd_info_json_reports_extended_headers(peers: list[Server],
                                                  tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    q = trixie.start_qemu_nbd(tmp_path / "q", img)
    peers.append(q)
    theirs = json.loads(trixie.run(["nbdinfo", "--json", q.uri()]).stdout)
    ours = json.loads(pynbd_cli("info", "--json", q.uri()).stdout)
    assert theirs["extended"] is ours["extended"] is True
    assert theirs["structured"] is ours["structured"] is True
    assert pynbd_cli("info", "--can", "extended-headers", q.uri()).returncode == 0
    old = json.loads(pynbd_cli("info", "--json", "--no-extended-headers", q.uri()).stdout)
    assert old["extended"] is False and old["structured"] is True
    assert pynbd_cli("info", "--no-extended-headers", "--can", "extended-headers",
                     q.uri()).returncode == 2


# --- the clean fallback --------------------------------------------------------------------

def exercise_fallback(uri: str, size: int) -> None:
    with connect(uri) as c:
        assert not c.extended and c.structured
        assert not c.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
        c.write(0, b"\x5a" * 65536)
        assert c.read(0, 65536) == b"\x5a" * 65536
        # a range over 4 GiB goes out in 32-bit pieces
        c.trim(0, size)
        c.write_zeroes(0, size)
        assert c.read(0, 65536) == bytes(65536)
        ext = list(c.iter_extents(0, size))
        assert ext[-1].offset + ext[-1].length == size
        assert all(e.zero for e in ext)
        assert c.block_status(0, 65536, contexts=("base:allocation",))["base:allocation"]
        c.flush()
    with connect(uri, extended_headers=False) as c:
        assert not c.extended and c.structured


def test_fallback_against_nbdkit_1_42(peers: list[Server], tmp_path: Path) -> None:
    srv = trixie.start_nbdkit(tmp_path / "k", "memory", ["size=6G"])
    peers.append(srv)
    assert "1.42" in trixie.version("nbdkit")
    exercise_fallback(srv.uri(), 6 * GiB)


def test_fallback_against_debian_12_peers(peers: list[Server], tmp_path: Path) -> None:
    k = start_nbdkit(tmp_path / "k12", "memory", ["size=6G"])
    peers.append(k)
    exercise_fallback(k.uri(), 6 * GiB)
    img = tmp_path / "q12.img"
    with open(img, "wb") as f:
        f.truncate(6 * GiB)
    q = start_qemu_nbd(tmp_path / "q12", img)
    peers.append(q)
    exercise_fallback(q.uri(), 6 * GiB)


def test_pynbd_client_extended_against_pynbd_and_qemu_the_same(
        peers: list[Server], serve: ServerFactory, tmp_path: Path) -> None:
    """The same sequence through both servers that speak extended headers gives the
    same bytes and extents."""
    img = tmp_path / "q.raw"
    with open(img, "wb") as f:
        f.truncate(6 * GiB)
    q = trixie.start_qemu_nbd(tmp_path / "q", img)
    peers.append(q)
    mine = serve("memory:6G")
    results = []
    for uri in (q.uri(), mine.uri):
        with connect(uri) as c:
            assert c.extended
            c.write(5 * GiB, b"\xcd" * MiB)
            c.write_zeroes(5 * GiB + 65536, 65536)
            data = bytes(c.read(5 * GiB, 2 * MiB))
            st = [(e.offset, e.length, e.flags & 1)
                  for e in c.iter_extents(0, 6 * GiB)]
            results.append((data, st))
    (d1, s1), (d2, s2) = results
    assert d1 == d2
    assert d1[:65536] == b"\xcd" * 65536 and d1[65536:131072] == bytes(65536)
    # the first extent is a hole of 5 GiB (more than 32 bits) from both
    assert s1[0] == s2[0] == (0, 5 * GiB, 1)
