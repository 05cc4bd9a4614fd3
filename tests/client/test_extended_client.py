"""pynbd's blocking, asyncio and pooled clients with extended headers, against
``pynbd serve`` (the Debian 13 peers are in tests/interop/test_modern_*.py).

Requests are counted on the server (``pynbd status``) to show that a 64-bit TRIM,
WRITE_ZEROES, CACHE or BLOCK_STATUS over the whole export is one request, and that a
compact connection splits it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pynbd.client import aio as aio_client
from pynbd.client import connect
from pynbd.client.pool import Pool
from pynbd.protocol.errors import LocalProtocolError
from tests.support.processes import run_pynbd
from tests.support.pynbd_server import ServerFactory

pytestmark = pytest.mark.interop

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServerFactory]:
    f = ServerFactory(tmp_path)
    try:
        yield f
    finally:
        f.close()


def requests_served(control: str) -> int:
    p = run_pynbd("status", "--control", control, text=True, timeout=30, python=sys.executable)
    p.check_returncode()
    return sum(int(e["requests"]) for e in json.loads(p.stdout)["exports"])


def test_blocking_client_64_bit_requests(serve: ServerFactory, tmp_path: Path) -> None:
    control = str(tmp_path / "ctl")
    srv = serve("--control", control, "--allocation-depth", "memory:6T")
    with connect(srv.uri, meta_contexts=("base:allocation", "qemu:allocation-depth"),
                 timeout=60) as c:
        assert c.extended and c.structured and c.can_block_status_payload()
        assert c.max_request == 64 * MiB
        c.write(5 * TiB, b"\x42" * MiB)
        n0 = requests_served(control)
        c.cache(0, c.size)
        st = c.block_status(0, c.size)
        assert st["qemu:allocation-depth"] == [st["qemu:allocation-depth"][0]]
        assert st["qemu:allocation-depth"][0].length == 6 * TiB
        base = st["base:allocation"]
        assert (base[0].offset, base[0].length, base[0].flags) == (0, 5 * TiB, 3)
        only = c.block_status(0, c.size, contexts=("base:allocation",))
        assert list(only) == ["base:allocation"]
        c.trim(0, 3 * TiB)
        c.write_zeroes(3 * TiB, 3 * TiB)
        assert requests_served(control) - n0 == 5  # cache, 2 x status, trim, zero
        assert c.read(5 * TiB, MiB) == bytes(MiB)
        # one 64 MiB read and write, the advertised maximum
        data = os.urandom(64 * MiB)
        n0 = requests_served(control)
        c.write(0, data)
        assert c.read(0, 64 * MiB) == data
        assert requests_served(control) - n0 == 2
        ext = list(c.iter_extents(0, c.size))
        assert ext[0].offset == 0 and ext[-1].offset + ext[-1].length == c.size
    # the safe-close extension works the same under extended headers
    assert c.close_result is not None and c.close_result.safe
    assert c.close_result.method == "x_close"


def test_opting_out_and_compact_splitting(serve: ServerFactory, tmp_path: Path) -> None:
    control = str(tmp_path / "ctl")
    srv = serve("--control", control, "memory:10G")
    with connect(srv.uri, extended_headers=False, timeout=60) as c:
        assert not c.extended and c.structured and not c.can_block_status_payload()
        n0 = requests_served(control)
        c.trim(0, 10 * GiB)  # 10 GiB in pieces under 4 GiB: three requests
        assert requests_served(control) - n0 == 3
        with pytest.raises(LocalProtocolError, match="extended headers"):
            c.submit_trim(0, 5 * GiB)
        # contexts by name still work: the reply covers everything and is filtered
        assert list(c.block_status(0, MiB, contexts=("base:allocation",))) == \
            ["base:allocation"]
    srv2 = serve("--no-extended-headers", "memory:1M")
    with connect(srv2.uri, timeout=60) as c:
        assert not c.extended and c.structured


def test_asyncio_client_with_extended_headers(serve: ServerFactory, tmp_path: Path) -> None:
    control = str(tmp_path / "ctl")
    srv = serve("--control", control, "--allocation-depth", "memory:8G")

    async def run() -> None:
        c = await aio_client.connect(srv.uri, timeout=60, meta_contexts=(
            "base:allocation", "qemu:allocation-depth"))
        async with c:
            assert c.extended and c.structured
            await c.write(6 * GiB, b"\x01" * 65536)
            n0 = requests_served(control)
            await c.write_zeroes(0, 5 * GiB)
            await c.trim(0, 5 * GiB)
            await c.cache(0, 8 * GiB)
            st = await c.block_status(0, 8 * GiB, contexts=("qemu:allocation-depth",))
            assert requests_served(control) - n0 == 4
            assert [(e.offset, e.length, e.flags) for e in st["qemu:allocation-depth"]] == \
                [(0, 8 * GiB, 1)]
            st = await c.block_status(0, 8 * GiB)
            assert st["base:allocation"][0].length == 6 * GiB
            reads = await asyncio.gather(*(c.read(6 * GiB + i * 4096, 4096)
                                           for i in range(32)))
            assert b"".join(reads) == b"\x01" * 65536 + bytes(65536)
        c2 = await aio_client.connect(srv.uri, timeout=60, extended_headers=False)
        async with c2:
            assert not c2.extended
            n0 = requests_served(control)
            await c2.trim(0, 8 * GiB)
            assert requests_served(control) - n0 == 3

    asyncio.run(asyncio.wait_for(run(), 120))


def test_pool_with_extended_headers(serve: ServerFactory) -> None:
    srv = serve("memory:8G")
    with Pool(srv.uri, connections=3, timeout=60) as pool:
        assert pool.extended and pool.connections == 3
        pool.write(7 * GiB, b"\x09" * (8 * MiB))
        pool.trim(0, 7 * GiB)
        st = pool.block_status(0, 8 * GiB, contexts=("base:allocation",))
        assert st["base:allocation"][0].length == 7 * GiB
        assert pool.read(7 * GiB, 8 * MiB) == b"\x09" * (8 * MiB)
