"""``pynbd copy`` (nbdcopy conventions): URIs, files, streams, sparseness, checksums."""

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

pytestmark = pytest.mark.interop


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
    assert len(out) == size and out[:len(blob)] == blob and out[len(blob):] == bytes(size - len(blob))
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


def test_zero_copy_is_chosen_when_possible(servers: Servers, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: which workers forward without buffers (no checksum, no TLS, an NBD
    destination) and which buffer the data."""
    used: list[bool] = []
    real = copy_cli._Worker.run

    def run(self: copy_cli._Worker) -> None:
        used.append(self.forward)
        real(self)
    monkeypatch.setattr(copy_cli._Worker, "run", run)
    src = servers.start("qemu-nbd", "unix")
    dst = servers.start("nbdkit-memory", "unix")
    img = tmp_path / "img"
    img.write_bytes(bytes(expected_image()))
    cases: list[tuple[str, str, copy_cli.Options, bool]] = [
        (src.uri(), dst.uri(), copy_cli.Options(connections=2, threads=2), True),
        (str(img), dst.uri(), copy_cli.Options(connections=1), True),
        (src.uri(), dst.uri(), copy_cli.Options(connections=1, checksum="sha256"), False),
        (src.uri(), dst.uri(), copy_cli.Options(connections=1, zero_copy=False), False),
        (src.uri(), str(tmp_path / "out"), copy_cli.Options(connections=1), False),
    ]
    for s_uri, d_uri, opts, forward in cases:
        used.clear()
        total, _ = copy_cli.copy(s_uri, d_uri, opts, timeout=TIMEOUT)
        assert total == IMAGE_SIZE
        assert used and all(u == forward for u in used), (s_uri, d_uri, opts)
    assert (tmp_path / "out").read_bytes() == expected_image()
    with connect(dst.uri(), timeout=TIMEOUT) as c:
        assert c.read(0, IMAGE_SIZE) == expected_image()


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
