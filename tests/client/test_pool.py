"""Multi-connection pool: CAN_MULTI_CONN is used where offered."""

from __future__ import annotations

import os
import threading

import pytest

from pynbd.client.pool import Pool
from tests.client.conftest import IMAGE_SIZE, TIMEOUT, Servers, expected_image

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("kind,multi", [("nbdkit", True), ("nbdkit-memory", True),
                                        ("qemu-nbd", True), ("nbd-server", True),
                                        ("pynbd", None)])
def test_pool_multi_conn(servers: Servers, kind: str, multi: bool | None) -> None:
    srv = servers.start(kind)
    with Pool(srv.uri(), connections=4, timeout=TIMEOUT) as pool:
        expect_multi = pool.can_multi_conn() if multi is None else multi
        assert pool.can_multi_conn() == expect_multi
        assert pool.connections == (4 if expect_multi else 1)
        size = pool.size
        if kind != "nbdkit-memory":
            assert pool.read(0, size) == expected_image()
        blob = os.urandom(4 << 20)
        pool.write(0, blob)  # split over the connections
        if pool.can_flush():
            pool.flush()
        assert pool.read(0, len(blob)) == blob
        # many threads sharing the pool
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                for j in range(20):
                    off = ((i * 20 + j) * 4096) % (size - 4096)
                    pool.write(off, bytes([i]) * 4096)
                    assert pool.read(off, 4096) == bytes([i]) * 4096
            except BaseException as exc:
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert all(not t.is_alive() for t in threads)
        results = pool.map(lambda c, off: c.read(off, 512), list(range(0, 1 << 20, 65536)))
        assert len(results) == 16
    assert len(pool.close_results) == pool.connections


def test_pool_single_connection_without_multi_conn(servers: Servers) -> None:
    # nbdkit's multi-conn filter can turn CAN_MULTI_CONN off
    srv = servers.start("nbdkit", filters=["multi-conn"],
                        plugin_extra=["multi-conn-mode=disable"])
    with Pool(srv.uri(), connections=4, timeout=TIMEOUT) as pool:
        assert not pool.can_multi_conn()
        assert pool.connections == 1
        assert pool.read(0, IMAGE_SIZE) == expected_image()
        pool.write(0, b"one connection" * 1000)
        pool.flush()
        assert pool.read(0, 14000) == b"one connection" * 1000
