"""Fixtures for the client tests: real NBD servers (nbdkit, qemu-nbd, nbd-server,
pynbd serve) started on loopback/Unix sockets, and a generated test PKI."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.certs import make_pki
from tests.support.images import make_image
from tests.support.nbd_servers import (
    Server,
    start_nbd_server,
    start_nbdkit,
    start_pynbd,
    start_qemu_nbd,
)

#: every socket operation in the tests is bounded by this
TIMEOUT = 20.0
IMAGE_SIZE = 8 * 1024 * 1024
#: (offset, data) written into test images: data surrounded by holes
IMAGE_DATA = [(1 << 20, b"pynbd!" * 2048), (5 << 20, bytes(range(256)) * 256)]

SERVER_KINDS = ["nbdkit", "qemu-nbd", "nbd-server", "pynbd"]


def expected_image() -> bytearray:
    img = bytearray(IMAGE_SIZE)
    for off, blob in IMAGE_DATA:
        img[off:off + len(blob)] = blob
    return img


class Servers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Server] = []
        self.n = 0

    def _dir(self, kind: str) -> Path:
        self.n += 1
        d = self.tmp / f"{kind}-{self.n}"
        d.mkdir()
        return d

    def image(self, name: str = "disk.img") -> Path:
        return make_image(self.tmp / f"{self.n}-{name}", IMAGE_SIZE, IMAGE_DATA)

    def start(self, kind: str, transport: str = "tcp", *, read_only: bool = False,
              tls_dir: Path | None = None, export: str | None = None, **kw: object) -> Server:
        d = self._dir(kind)
        if kind == "nbdkit":
            img = self.image()
            more = list(kw.pop("plugin_extra", []))  # type: ignore[call-overload]
            srv = start_nbdkit(d, "file", [str(img), *more], transport=transport, tls_dir=tls_dir,
                               read_only=read_only, export=export or "", **kw)  # type: ignore[arg-type]
        elif kind == "nbdkit-memory":
            srv = start_nbdkit(d, "memory", ["size=64M"], transport=transport, tls_dir=tls_dir,
                               read_only=read_only, export=export or "", **kw)  # type: ignore[arg-type]
        elif kind == "qemu-nbd":
            srv = start_qemu_nbd(d, self.image(), transport=transport, tls_dir=tls_dir,
                                 read_only=read_only, export=export or "", **kw)  # type: ignore[arg-type]
        elif kind == "nbd-server":
            assert tls_dir is None
            srv = start_nbd_server(d, self.image(), transport=transport, read_only=read_only,
                                   export=export or "disk")
        elif kind == "pynbd":
            assert tls_dir is None
            srv = start_pynbd(d, str(self.image()), transport=transport, read_only=read_only,
                              export=export or "", **kw)  # type: ignore[arg-type]
        else:
            raise ValueError(kind)
        self.started.append(srv)
        return srv

    def close(self) -> None:
        for srv in self.started:
            srv.stop()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


StartFn = Callable[..., Server]
