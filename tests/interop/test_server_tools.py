"""``pynbd serve`` driven by command-line clients nobody here wrote: qemu-img, qemu-io,
nbdinfo, nbdcopy and fio's nbd engine."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.images import make_image, randbytes
from tests.support.pynbd_server import ServerFactory

pytestmark = pytest.mark.interop

MiB = 1024 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


def run(*cmd: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert p.returncode == 0, f"{cmd}: rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


# --- qemu ---------------------------------------------------------------------------


def test_qemu_img_info_convert_compare(serve: ServerFactory, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 32 * MiB, {0: randbytes(MiB, 1), 20 * MiB: randbytes(3 * MiB, 2)})
    dst = tmp_path / "dst.img"
    make_image(dst, 32 * MiB, {5 * MiB: b"\xff" * MiB})
    srv = serve(str(dst), unix=True)
    uri = srv.uri_for("nbd://")
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 32 * MiB
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    # and over the Unix socket, the other way round
    out = tmp_path / "out.img"
    unix = srv.uri_for("nbd+unix://")
    run("qemu-img", "convert", "-O", "raw", unix, str(out))
    assert out.read_bytes() == src.read_bytes()
    # qemu-img map goes through BLOCK_STATUS base:allocation
    m = json.loads(run("qemu-img", "map", "--output=json", uri).stdout)
    data = [e for e in m if e["data"]]
    assert data[0]["start"] == 0 and sum(e["length"] for e in m) == 32 * MiB
    assert any(e["start"] <= 20 * MiB < e["start"] + e["length"] for e in data)
    assert any(not e["data"] and e["start"] <= 10 * MiB < e["start"] + e["length"] for e in m)


def test_qemu_io_commands(serve: ServerFactory, tmp_path: Path) -> None:
    img = tmp_path / "q.img"
    make_image(img, 16 * MiB, {})
    srv = serve(str(img))
    uri = srv.uri
    cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd -f 1M 1M",  # FUA
        "aio_write -P 0x11 2M 64k", "aio_write -P 0x22 3M 64k", "aio_flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 1M",
        "read -P 0x11 2M 64k",
        "read -P 0x22 3M 64k",
        "flush",
        "discard 0 64k",
        "write -z 64k 64k",  # WRITE_ZEROES, NO_HOLE
        "write -z -u 128k 64k",  # WRITE_ZEROES, may trim
        "read -P 0 64k 128k",
        "read -P 0xab 192k 64k",
        "readv -P 0xcd 1M 4k 4k",
        "writev -P 0x33 4M 64k 64k",
        "read -P 0x33 4M 128k",
        "map",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = run(*argv, uri)
    assert "Pattern verification failed" not in p.stdout + p.stderr, p.stdout
    assert "failed" not in p.stdout.lower(), p.stdout
    with open(img, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(128 * 1024) == b"\x33" * 128 * 1024


def test_qemu_io_read_only_and_past_end(serve: ServerFactory) -> None:
    srv = serve("-r", "memory:4M")
    # qemu opens read-write by default: the server's READ_ONLY flag makes it refuse
    p = run("qemu-io", "-f", "raw", "-c", "write -P 0x1 0 4k", srv.uri, ok=False)
    assert p.returncode != 0 and "wrote" not in p.stdout
    p = run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 1M", "-c", "map", srv.uri)
    assert "read 1048576/1048576" in p.stdout
    assert "Pattern verification failed" not in p.stdout
    # past the end: qemu refuses before sending; the export stays usable
    p = run("qemu-io", "-r", "-f", "raw", "-c", "read 4M 4k", srv.uri, ok=False)
    assert "read 4096/4096" not in p.stdout


def test_qemu_old_style_export_name(serve: ServerFactory) -> None:
    """qemu-img with a named export over the nbd: driver syntax."""
    srv = serve("-e", "vol1", "memory:8M")
    port = srv.port
    p = run("qemu-io", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M",
            f"json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":"
            f"{{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"{port}\"}},"
            f"\"export\":\"vol1\"}}}}")
    assert "Pattern verification failed" not in p.stdout


# --- libnbd tools -------------------------------------------------------------------


def test_nbdinfo(serve: ServerFactory, tmp_path: Path) -> None:
    img = tmp_path / "i.img"
    make_image(img, 8 * MiB, {2 * MiB: randbytes(MiB, 3)})
    srv = serve("--description", "test disk", "-e", "d1", str(img))
    uri = srv.uri
    j = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert j["protocol"] == "newstyle-fixed"
    exp = j["exports"][0]
    assert exp["export-name"] == "d1" and exp["export-size"] == 8 * MiB
    assert exp["description"] == "test disk"
    assert exp["can_multi_conn"] and exp["can_trim"] and exp["can_fua"]
    assert "base:allocation" in exp["contexts"]
    assert exp["block_size_maximum"] == 64 * MiB
    assert run("nbdinfo", "--size", uri).stdout.strip() == str(8 * MiB)
    mp = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in mp] == [
        (0, 2 * MiB, 3), (2 * MiB, MiB, 0), (3 * MiB, 5 * MiB, 3)]
    lst = json.loads(run("nbdinfo", "--list", "--json", uri).stdout)
    assert [e["export-name"] for e in lst["exports"]] == ["d1"]
    assert run("nbdinfo", "--can", "trim", uri, ok=False).returncode == 0
    assert run("nbdinfo", "--is", "read-only", uri, ok=False).returncode == 2
    srv_ro = serve("-r", str(img))
    assert run("nbdinfo", "--is", "read-only", srv_ro.uri, ok=False).returncode == 0


def test_nbdcopy_roundtrip_sparse(serve: ServerFactory, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_image(src, 64 * MiB, {MiB: randbytes(5 * MiB, 4), 40 * MiB: randbytes(MiB, 5)})
    srv_a = serve("memory:64M")
    dst_file = tmp_path / "dst.img"
    make_image(dst_file, 64 * MiB, {})
    srv_b = serve(str(dst_file), unix=True)
    # file -> pynbd(memory), 4 connections (multi-conn), 16 requests each
    run("nbdcopy", "--connections=4", "--requests=16", str(src), srv_a.uri)
    # pynbd(memory) -> pynbd(file) over a Unix socket
    run("nbdcopy", "--connections=2", srv_a.uri, srv_b.uri_for("nbd+unix://"))
    # pynbd(file) -> local file
    out = tmp_path / "out.img"
    run("nbdcopy", srv_b.uri, str(out))
    assert out.read_bytes() == src.read_bytes()
    # sparse: the destination file was not filled with zeros
    assert os.stat(dst_file).st_blocks * 512 <= 16 * MiB
    # nbdcopy to stdout ("-")
    p = subprocess.run(["nbdcopy", srv_a.uri, "-"], capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout == src.read_bytes()


# --- fio ------------------------------------------------------------------------------


@pytest.mark.parametrize("rw,bs,qd", [("randwrite", "4k", 32), ("write", "1m", 8),
                                      ("randrw", "64k", 16)])
def test_fio_verify(serve: ServerFactory, rw: str, bs: str, qd: int) -> None:
    srv = serve("memory:64M")
    p = run("fio", "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={qd}", "--size=32M", "--verify=crc32c",
            "--verify_fatal=1", "--do_verify=1", "--output-format=json", timeout=180)
    j = json.loads(p.stdout[p.stdout.index("{"):])
    job = j["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0


def test_qemu_nbd_list_and_config_server_table(serve: ServerFactory, tmp_path: Path) -> None:
    """`qemu-nbd -L` (LIST + INFO + LIST_META_CONTEXT per export) against a server whose
    address comes from the config file's [server] table."""
    cfg = tmp_path / "exports.toml"
    cfg.write_text('[server]\nbind = "127.0.0.1"\nport = 0\ndefault_export = "b"\n'
                   '[[export]]\nname = "a"\ntarget = "memory:1M"\ndescription = "disk a"\n'
                   '[[export]]\nname = "b"\ntarget = "memory:2M"\nread_only = true\n')
    srv = serve("--config", str(cfg), tcp=False)
    assert srv.uri.startswith("nbd://127.0.0.1:") and srv.uri.endswith("/b")
    out = run("qemu-nbd", "-L", "-b", "127.0.0.1", "-p", str(srv.port)).stdout
    assert "exports available: 2" in out
    assert "export: 'a'" in out and "description: disk a" in out
    assert "export: 'b'" in out and "readonly" in out
    assert out.count("base:allocation") == 2
    assert "max block: 67108864" in out
