"""The asyncio client against real servers: concurrency, every call, teardown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pynbd.client import (
    CmdFlag,
    LocalProtocolError,
    NBDRequestError,
    OptionError,
    PeerProtocolError,
    aio,
)
from tests.client import fakeserver as fs
from tests.client.conftest import (
    IMAGE_DATA,
    IMAGE_SIZE,
    SERVER_KINDS,
    TIMEOUT,
    Servers,
    expected_image,
)
from tests.client.fakeserver import FakeServer

pytestmark = pytest.mark.interop


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro_fn(), 120)
    asyncio.run(bounded())


@pytest.mark.parametrize("transport", ["tcp", "tcp6", "unix"])
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_aio_every_call(servers: Servers, kind: str, transport: str) -> None:
    srv = servers.start(kind, transport)
    expected = expected_image()

    async def main() -> None:
        c = await aio.AsyncClient.dial(srv.uri(), timeout=TIMEOUT)
        await c.handshake()
        assert srv.export in [e.name for e in await c.list_exports()]
        await c.info()
        structured = await c.structured_replies()
        if structured:
            assert "base:allocation" in [m.name for m in await c.list_meta_context()]
            await c.set_meta_context("base:allocation")
        assert await c.negotiate_safe_close() == (kind == "pynbd")
        ex = await c.go()
        assert ex.size == IMAGE_SIZE
        # many reads in flight at once
        reads = await asyncio.gather(*[c.read(off, 65536)
                                       for off in range(0, IMAGE_SIZE, 65536)])
        assert b"".join(reads) == expected
        buf = bytearray(b"\xff" * 4096)
        await c.read_into(0, buf)
        assert buf == bytes(4096)
        data, chunks = await c.read_chunks(0, 2 << 20)
        assert data == expected[:2 << 20] and sum(ch.length for ch in chunks) == 2 << 20
        # concurrent writes, then read back
        await asyncio.gather(*[c.write(i * 4096, bytes([i + 1]) * 4096) for i in range(64)])
        got = await asyncio.gather(*[c.read(i * 4096, 4096) for i in range(64)])
        assert got == [bytes([i + 1]) * 4096 for i in range(64)]
        await c.write(0, b"big" * 400000)  # 1.2 MB, exercises write flow control
        assert await c.read(0, 1200000) == b"big" * 400000
        if c.can_fua():
            await c.write(0, b"f", CmdFlag.FUA)
        if c.can_flush():
            await c.flush()
        if c.can_zero():
            await c.write_zeroes(0, 4096)
            assert await c.read(0, 4096) == bytes(4096)
        if c.can_trim():
            await c.trim(2 << 20, 1 << 20)
        if c.can_cache():
            await c.cache(0, 65536)
        if structured:
            bs = await c.block_status(0, IMAGE_SIZE)
            assert bs["base:allocation"][0].offset == 0
        else:
            with pytest.raises(LocalProtocolError):
                await c.block_status(0, 4096)
        res = await c.close()
        assert res.safe == (kind == "pynbd")
    run(main)


@pytest.mark.parametrize("kind", ["nbdkit", "qemu-nbd", "pynbd"])
def test_aio_structured_off_and_errors(servers: Servers, kind: str) -> None:
    srv = servers.start(kind)

    async def main() -> None:
        async with await aio.connect(srv.uri(), structured=False, timeout=TIMEOUT,
                                     strict=False) as c:
            assert not c.structured
            off = IMAGE_DATA[0][0]
            results = await asyncio.gather(c.read(off, 6), c.read(IMAGE_SIZE, 512),
                                           c.read(off, 6), return_exceptions=True)
            assert results[0] == b"pynbd!" and results[2] == b"pynbd!"
            assert isinstance(results[1], NBDRequestError)
    run(main)


def test_aio_option_errors_and_abort(servers: Servers) -> None:
    srv = servers.start("qemu-nbd", export="real")

    async def main() -> None:
        c = await aio.AsyncClient.dial(srv.uri(), timeout=TIMEOUT)
        await c.handshake()
        with pytest.raises(OptionError):
            await c.go("nope")
        await c.abort()
        assert c.close_result is not None and c.close_result.method == "abort"
        c = await aio.AsyncClient.dial(srv.uri(), timeout=TIMEOUT)
        await c.handshake()
        info = await c.export_name("real")
        assert info.size == IMAGE_SIZE
        await c.disconnect()
    run(main)


def test_aio_bad_server() -> None:
    def handler(s, req):  # type: ignore[no-untyped-def]
        s.sendall(fs.data_chunk(req.cookie, req.offset, b"x" * 2048)
                  + fs.data_chunk(req.cookie, req.offset + 1024, b"y" * 3072, fs.DONE))
        return False

    async def main() -> None:
        with FakeServer(handler) as srv:
            c = await aio.connect(srv.uri, timeout=5)
            r = asyncio.gather(c.read(0, 4096), c.read(8192, 4096), return_exceptions=True)
            a, b = await r
            assert isinstance(a, PeerProtocolError) and "overlaps" in str(a)
            assert isinstance(b, PeerProtocolError)
            with pytest.raises(PeerProtocolError, match="unusable"):
                await c.read(0, 1)
            assert (await c.close()).method == "none"
    run(main)


def test_aio_early_close_and_timeout() -> None:
    async def main() -> None:
        with FakeServer(lambda s, r: False) as srv:
            c = await aio.connect(srv.uri, timeout=5)
            with pytest.raises(PeerProtocolError):
                await c.read(0, 4096)

        def stall(s, req):  # type: ignore[no-untyped-def]
            try:
                s.recv(1)
            except OSError:
                pass
            return False
        with FakeServer(stall) as srv:
            c = await aio.connect(srv.uri, timeout=0.5)
            with pytest.raises(TimeoutError):
                await c.read(0, 4096)
    run(main)


def test_aio_large_requests_are_split(servers: Servers) -> None:
    srv = servers.start("nbdkit-memory")

    async def main() -> None:
        async with await aio.connect(srv.uri(), timeout=TIMEOUT) as c:
            c.max_request = 1 << 20
            blob = bytes(range(256)) * (5 * 4096)  # 5 MiB
            await c.write(0, blob)
            assert await c.read(0, len(blob)) == blob
            buf = bytearray(len(blob))
            await c.read_into(0, buf)
            assert buf == blob
            assert await c.read(0, 0) == b""
    run(main)

