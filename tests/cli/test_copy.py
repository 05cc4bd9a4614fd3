"""``pynbd copy`` (nbdcopy conventions) run as a program: URIs, files, streams, sparseness,
checksums, messages and exit codes. The engine on its own is tested in tests/copy."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pynbd.cli import copy as copy_cli
from pynbd.client import connect
from tests.client.conftest import IMAGE_SIZE, TIMEOUT, Servers, expected_image
from tests.support.images import make_image


def pynbd_copy(*args: str, stdin: bytes | None = None, split: bool = True,
               zero_copy: bool | None = None) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYNBD_COPY_SPLIT": "1" if split else "0"}
    if zero_copy is not None:
        env["PYNBD_COPY_ZERO_COPY"] = "1" if zero_copy else "0"
    return subprocess.run([sys.executable, "-m", "pynbd.cli.copy", *args], input=stdin,
                          capture_output=True, timeout=300, check=False, env=env)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def test_register_adds_parser() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    copy_cli.register(sub)
    a = p.parse_args(["copy", "a", "b", "--connections", "2", "--requests", "8",
                      "--checksum", "sha256", "--verify"])
    assert a.func is copy_cli.handler and a.connections == 2 and a.requests == 8


def test_file_to_nbd_to_file(servers: Servers, tmp_path: Path) -> None:
    srv = servers.start("nbdkit-memory")
    src = tmp_path / "src.bin"
    blob = os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(12345)
    src.write_bytes(blob)
    r = pynbd_copy(str(src), srv.uri(), "--checksum", "sha256")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "sha256:" + sha(blob)
    assert r.stderr == b""  # no progress bar: stderr is not a terminal
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, len(blob)) == blob
        size = c.size
    dst = tmp_path / "dst.bin"
    r = pynbd_copy(srv.uri(), str(dst), "--checksum", "--verify")
    assert r.returncode == 0, r.stderr
    out = dst.read_bytes()
    assert len(out) == size and out[:len(blob)] == blob
    assert out[len(blob):] == bytes(size - len(blob))
    assert b"verify: OK" in r.stdout
    # the destination file is sparse: the zero ranges were not written
    assert os.stat(dst).st_blocks * 512 < size // 2


def test_streams(servers: Servers) -> None:
    srv = servers.start("nbdkit-memory")
    blob = os.urandom(1 << 20) + bytes(2 << 20) + os.urandom(1000)
    r = pynbd_copy("-", srv.uri(), "--checksum", stdin=blob)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "sha256:" + sha(blob)
    r = pynbd_copy(srv.uri(), "-", "--checksum")
    assert r.returncode == 0, r.stderr
    assert r.stdout[:len(blob)] == blob and len(r.stdout) == 64 << 20
    assert b"sha256:" + sha(r.stdout).encode() in r.stderr  # digest goes to stderr here


@pytest.mark.parametrize("kind", ["qemu-nbd", "pynbd", "nbdkit"])
def test_sparse_source_to_file(servers: Servers, tmp_path: Path, kind: str) -> None:
    srv = servers.start(kind)
    dst = tmp_path / "out.img"
    r = pynbd_copy(srv.uri(), str(dst), "--checksum")
    assert r.returncode == 0, r.stderr
    data = dst.read_bytes()
    assert data == expected_image()
    assert r.stdout.decode().strip() == "sha256:" + sha(data)
    assert os.stat(dst).st_blocks * 512 < IMAGE_SIZE // 2


@pytest.mark.parametrize("split", [True, False], ids=["reader+writer", "one-thread"])
@pytest.mark.parametrize("conns,requests", [(1, 1), (4, 16), (2, 3)])
def test_nbd_to_nbd_connections(servers: Servers, conns: int, requests: int,
                                split: bool) -> None:
    src = servers.start("qemu-nbd")
    dst = servers.start("nbdkit-memory")
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        c.write(0, b"\xee" * (IMAGE_SIZE + 4096))  # garbage that must be overwritten
    r = pynbd_copy(src.uri(), dst.uri(), f"--connections={conns}", f"--requests={requests}",
                   "--threads=4", "--request-size=256K", "--checksum", "--verify", split=split)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["sha256:" + sha(expected_image()), "verify: OK"]
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, IMAGE_SIZE) == expected_image()
        assert c.read(IMAGE_SIZE, 4096) == b"\xee" * 4096  # beyond the source: untouched


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "buffered"])
@pytest.mark.parametrize("conns", [1, 4])
@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit", "pynbd", "nbd-server"])
def test_nbd_to_nbd_without_checksum(servers: Servers, kind: str, conns: int,
                                     zero_copy: bool) -> None:
    """Without --checksum the data does not pass through Python (splice between the
    sockets) unless PYNBD_COPY_ZERO_COPY=0; qemu-nbd and pynbd send holes inside read
    replies, nbd-server has no structured replies."""
    src = servers.start(kind, "unix" if conns == 1 else "tcp")
    dst = servers.start("nbdkit-memory", "unix" if conns == 1 else "tcp")
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        c.write(0, b"\xee" * (IMAGE_SIZE + 4096))  # garbage that must be overwritten
    r = pynbd_copy(src.uri(), dst.uri(), f"--connections={conns}", "--request-size=256K",
                   "--requests=4", zero_copy=zero_copy)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, IMAGE_SIZE) == expected_image()
        assert c.read(IMAGE_SIZE, 4096) == b"\xee" * 4096


@pytest.mark.parametrize("zero_copy", [True, False], ids=["sendfile", "buffered"])
def test_file_to_nbd_without_checksum(servers: Servers, tmp_path: Path,
                                      zero_copy: bool) -> None:
    srv = servers.start("nbdkit-memory", "unix")
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        c.write(0, b"\xee" * (16 << 20))
    src = tmp_path / "src.img"
    blob = os.urandom(3 << 20) + bytes(5 << 20) + os.urandom(12345)
    with open(src, "wb") as f:  # sparse: the zero range is a hole
        f.write(blob[:3 << 20])
        f.seek(8 << 20)
        f.write(blob[8 << 20:])
    r = pynbd_copy(str(src), srv.uri(), "--connections=2", zero_copy=zero_copy)
    assert r.returncode == 0, r.stderr
    with connect(srv.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, len(blob)) == blob
        assert c.read(len(blob), 4096) == b"\xee" * 4096


def test_allocated_and_destination_is_zero(servers: Servers) -> None:
    src = servers.start("qemu-nbd")
    dst = servers.start("nbdkit-memory")
    r = pynbd_copy(src.uri(), dst.uri(), "--allocated")
    assert r.returncode == 0, r.stderr
    r = pynbd_copy(src.uri(), dst.uri(), "--destination-is-zero")
    assert r.returncode == 0, r.stderr
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, IMAGE_SIZE) == expected_image()


def test_progress_forced(servers: Servers, tmp_path: Path) -> None:
    srv = servers.start("qemu-nbd")
    r = pynbd_copy(srv.uri(), str(tmp_path / "o"), "--progress")
    assert r.returncode == 0, r.stderr
    assert b"100.0%" in r.stderr


def test_errors(servers: Servers, tmp_path: Path) -> None:
    big = servers.start("nbdkit-memory")  # 64 MiB
    small = servers.start("qemu-nbd")  # 8 MiB
    r = pynbd_copy(big.uri(), small.uri())
    assert r.returncode == 1 and b"smaller" in r.stderr
    ro = servers.start("qemu-nbd", read_only=True)
    r = pynbd_copy(small.uri(), ro.uri())
    assert r.returncode == 1 and b"read-only" in r.stderr
    r = pynbd_copy(str(tmp_path / "missing"), big.uri())
    assert r.returncode == 1
    r = pynbd_copy(small.uri(), "-", "--verify")
    assert r.returncode == 1


def test_stdin_to_file_and_file_to_file(tmp_path: Path) -> None:
    blob = os.urandom(1 << 20) + bytes(3 << 20) + os.urandom(999) + bytes(1 << 20)
    out = tmp_path / "from-stdin.img"
    r = pynbd_copy("-", str(out), "--checksum", stdin=blob)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == blob
    assert r.stdout.decode().strip() == "sha256:" + sha(blob)
    again = tmp_path / "copy.img"
    again.write_bytes(b"old contents that must go" * 100000)
    r = pynbd_copy(str(out), str(again), "--checksum", "--verify")
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == blob
    assert os.stat(again).st_blocks * 512 < len(blob)  # holes stayed holes


def _sparse_file(path: Path, blob: bytes, holes: list[tuple[int, int]]) -> None:
    """Write ``blob`` to ``path`` leaving the (offset, length) ranges as holes."""
    extents = []
    pos = 0
    for off, ln in [*holes, (len(blob), 0)]:
        extents.append((pos, blob[pos:off]))
        pos = off + ln
    make_image(path, len(blob), extents)


def test_destination_is_zero_does_not_shorten_a_stream(tmp_path: Path) -> None:
    """A stream destination has no earlier contents: --destination-is-zero must not drop
    the source's zero ranges from it (it used to write a shorter stream)."""
    blob = os.urandom(1 << 20) + bytes(3 << 20) + os.urandom(4096) + bytes(2 << 20)
    src = tmp_path / "sparse.img"
    _sparse_file(src, blob, [(1 << 20, 3 << 20), ((4 << 20) + 4096, 2 << 20)])
    assert os.stat(src).st_blocks * 512 < len(blob)  # the holes are real
    for extra in ([], ["--connections=4", "--threads=4"], ["--allocated"]):
        r = pynbd_copy(str(src), "-", "--destination-is-zero", "--checksum", *extra)
        assert r.returncode == 0, r.stderr
        assert len(r.stdout) == len(blob) and r.stdout == blob, extra
        assert b"sha256:" + sha(blob).encode() in r.stderr
    # stdin -> stdout: all-zero blocks are written out too
    r = pynbd_copy("-", "-", "--destination-is-zero", "--request-size=1M", stdin=blob)
    assert r.returncode == 0, r.stderr
    assert r.stdout == blob


def test_destination_is_zero_still_skips_for_files(tmp_path: Path) -> None:
    """... while a file destination keeps the holes (and reads back the same)."""
    blob = os.urandom(4096) + bytes(8 << 20) + os.urandom(4096)
    src = tmp_path / "sparse.img"
    _sparse_file(src, blob, [(4096, 8 << 20)])
    dst = tmp_path / "out.img"
    r = pynbd_copy(str(src), str(dst), "--destination-is-zero")
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == blob
    assert os.stat(dst).st_blocks * 512 < len(blob) // 2
    r = pynbd_copy("-", str(dst), "--destination-is-zero", stdin=blob)
    assert r.returncode == 0, r.stderr
    assert dst.read_bytes() == blob


def test_request_size_units(tmp_path: Path) -> None:
    """--request-size takes the same sizes as every other size option (binary units)."""
    src = tmp_path / "src.img"
    blob = os.urandom(3 << 20)
    src.write_bytes(blob)
    for size in ("256K", "256KiB", "1m", "4096", "1MB"):
        r = pynbd_copy(str(src), str(tmp_path / "dst.img"), f"--request-size={size}")
        assert r.returncode == 0, (size, r.stderr)
        assert (tmp_path / "dst.img").read_bytes() == blob
    for bad in ("-1M", "1.5M", "12Q", ""):
        r = pynbd_copy(str(src), str(tmp_path / "dst.img"), f"--request-size={bad}")
        assert r.returncode == 2 and b"--request-size" in r.stderr, (bad, r.stderr)


def test_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    src.write_bytes(b"x" * 4096)
    for args, msg in [(["--connections=0"], b">= 1"), (["--requests=0"], b">= 1"),
                      (["--checksum=nosuchhash"], b"unknown checksum"),
                      (["--verify"], b"cannot re-read stdout")]:
        r = pynbd_copy(str(src), "-", *args)
        assert r.returncode == 1 and msg in r.stderr, (args, r.stderr)
        assert r.stdout == b""
