"""``pynbd copy`` round trips between nbdkit, qemu-nbd, nbd-server and pynbd serve,
with sha256 compared at every hop."""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tests/interop is not a package: find tests.support
    sys.path.insert(0, str(REPO))

from tests.support.certs import make_pki  # noqa: E402
from tests.support.images import make_image  # noqa: E402
from tests.support.nbd_servers import (  # noqa: E402
    Server,
    start_nbd_server,
    start_nbdkit,
    start_pynbd,
    start_qemu_nbd,
)

pytestmark = pytest.mark.interop

SIZE = 16 << 20
DATA = [(0, b"first block" * 100), (3 << 20, bytes(range(256)) * 4096),
        (SIZE - 4096, b"\x42" * 4096)]


def expected() -> bytes:
    img = bytearray(SIZE)
    for off, blob in DATA:
        img[off:off + len(blob)] = blob
    return bytes(img)


def copy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynbd.cli.copy", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def start(kind: str, d: Path, transport: str, source: bool, tls: Path | None = None) -> Server:
    d.mkdir(parents=True)
    img = make_image(d / "img", SIZE, DATA if source else [])
    if kind == "nbdkit":
        return start_nbdkit(d, "file", [str(img)], transport=transport, tls_dir=tls)
    if kind == "nbdkit-memory":
        if source:
            return start_nbdkit(d, "file", [str(img)], transport=transport, tls_dir=tls)
        return start_nbdkit(d, "memory", [f"size={SIZE}"], transport=transport, tls_dir=tls)
    if kind == "qemu-nbd":
        return start_qemu_nbd(d, img, transport=transport, tls_dir=tls)
    if kind == "nbd-server":
        return start_nbd_server(d, img, transport=transport)
    if kind == "pynbd":
        return start_pynbd(d, str(img), transport=transport)
    if kind == "pynbd-memory":
        if source:
            return start_pynbd(d, str(img), transport=transport)
        return start_pynbd(d, f"memory:{SIZE}", transport=transport)
    raise ValueError(kind)


CHAIN = ["nbdkit", "qemu-nbd", "pynbd", "nbd-server", "pynbd-memory", "nbdkit-memory",
         "qemu-nbd"]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_copy_chain(tmp_path: Path, transport: str) -> None:
    want = "sha256:" + hashlib.sha256(expected()).hexdigest()
    servers: list[Server] = []
    try:
        for i, kind in enumerate(CHAIN):
            servers.append(start(kind, tmp_path / f"{i}-{kind}", transport, source=i == 0))
        for a, b in itertools.pairwise(servers):
            r = copy(a.uri(), b.uri(), "--checksum", "sha256", "--verify", "--connections", "4")
            assert r.returncode == 0, f"{a.kind} -> {b.kind}: {r.stderr}"
            assert r.stdout.splitlines() == [want, "verify: OK"], f"{a.kind} -> {b.kind}"
        # and back to a file
        out = tmp_path / "final.img"
        r = copy(servers[-1].uri(), str(out), "--checksum")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == want
        assert out.read_bytes() == expected()
    finally:
        for s in servers:
            s.stop()


@pytest.mark.parametrize("src_kind,dst_kind", [("nbdkit", "qemu-nbd"), ("qemu-nbd", "nbdkit")])
def test_copy_over_tls(tmp_path: Path, src_kind: str, dst_kind: str) -> None:
    pki = make_pki(tmp_path / "pki")
    want = "sha256:" + hashlib.sha256(expected()).hexdigest()
    a = start(src_kind, tmp_path / "a", "tcp", True, pki)
    try:
        b = start(dst_kind, tmp_path / "b", "tcp", False, pki)
        try:
            r = copy(a.uri(), b.uri(), "--checksum", "--verify")
            assert r.returncode == 0, r.stderr
            assert r.stdout.splitlines() == [want, "verify: OK"]
        finally:
            b.stop()
    finally:
        a.stop()
