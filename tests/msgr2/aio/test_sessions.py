"""pynbd client <-> pynbd server over TCP on 127.0.0.1, in every mode, with a relay that
cuts the connection at random points: every message is delivered exactly once, in order."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import struct

import pytest

from pynbd.msgr2.aio import Msgr2Client, Msgr2Server, ServerSession, SessionOptions
from pynbd.msgr2.auth import AuthNone, PskAuth
from pynbd.msgr2.errors import AuthenticationError, ConnectionClosedError, SessionResetError
from tests.msgr2._pair import KEY, MODES
from tests.msgr2._relay import Relay

pytestmark = pytest.mark.timeout(120)

FAST = SessionOptions(keepalive_interval=0.5, keepalive_timeout=5.0, connect_timeout=5.0,
                      reconnect_timeout=30.0)


def auth_for(kind: str) -> AuthNone | PskAuth:
    return AuthNone() if kind == "none" else PskAuth(KEY)


def payload(i: int, rng: random.Random) -> tuple[bytes, bytes]:
    size = rng.choice([0, 10, 100, 4096, 65536, 300_000])
    data = rng.randbytes(size)
    front = struct.pack("<I", i) + hashlib.sha256(data).digest()
    return front, data


def check(front: bytes, data: bytes | memoryview) -> int:
    (i,) = struct.unpack_from("<I", front)
    assert hashlib.sha256(data).digest() == front[4:36], f"message {i} corrupted"
    return int(i)


async def run_exchange(kind: str, mode: str, seed: int, n: int, cuts: int,
                       max_bytes: int = 400_000) -> tuple[int, int]:
    rng = random.Random(seed)
    server_got: list[int] = []
    done = asyncio.Event()

    async def handler(s: ServerSession) -> None:
        while True:
            m = await s.recv()
            i = check(m.front, m.data)
            m.release()  # its buffer is reused for later messages
            server_got.append(i)
            # echo a small reply for every message
            await s.send(0x7002, struct.pack("<I", i) + hashlib.sha256(b"r%d" % i).digest(),
                         b"r%d" % i)
            if len(server_got) >= n:
                done.set()

    srv = await Msgr2Server.listen("127.0.0.1", 0, auth=auth_for(kind), handler=handler,
                                   options=FAST)
    relay = await Relay(srv.port, rng, cuts, max_bytes=max_bytes).start()
    client = await Msgr2Client.connect("127.0.0.1", relay.port, auth=auth_for(kind),
                                       mode=mode, lossless=True, options=FAST)
    client_got: list[int] = []

    async def reader() -> None:
        while len(client_got) < n:
            m = await client.recv()
            client_got.append(check(m.front, m.data))

    rtask = asyncio.ensure_future(reader())
    try:
        for i in range(n):
            front, data = payload(i, rng)
            await client.send(0x7001, front, data)
        await asyncio.wait_for(done.wait(), 60)
        await asyncio.wait_for(rtask, 60)
        await client.wait_acked(30)
    finally:
        rtask.cancel()
        await client.close()
        await relay.close()
        await srv.close()
    assert server_got == list(range(n)), "server: not exactly once, in order"
    assert client_got == list(range(n)), "client: not exactly once, in order"
    return relay.cuts_done, client.reconnects


@pytest.mark.parametrize("kind,mode", MODES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exactly_once_through_cuts(kind: str, mode: str, seed: int) -> None:
    cuts, reconnects = asyncio.run(run_exchange(kind, mode, seed, n=60, cuts=6))
    assert cuts >= 1 and reconnects >= 1


@pytest.mark.parametrize("kind,mode", MODES)
def test_cuts_during_reconnect_handshakes(kind: str, mode: str) -> None:
    """Most reconnections are cut again within their first 3000 bytes: in the banner, the
    auth exchange, the signatures, RECONNECT/RECONNECT_OK or the resent messages."""
    cuts, reconnects = asyncio.run(run_exchange(kind, mode, 7, n=40, cuts=25, max_bytes=3000))
    assert cuts >= 20 and reconnects >= 1


@pytest.mark.parametrize("kind,mode", MODES)
def test_no_cuts_large_messages(kind: str, mode: str) -> None:
    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            while True:
                m = await s.recv()
                await s.send(m.type, m.front, m.data)

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=auth_for(kind), handler=handler)
        c = await Msgr2Client.connect("127.0.0.1", srv.port, auth=auth_for(kind), mode=mode)
        try:
            data = os.urandom(4 << 20)
            for i in range(3):
                await c.send(0x7001, b"%d" % i, data)
            for i in range(3):
                m = await c.recv()
                assert m.front == b"%d" % i and m.data == data
            assert await c.keepalive() >= 0
        finally:
            await c.close()
            await srv.close()

    asyncio.run(main())


def test_wrong_key_fails_cleanly() -> None:
    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            await s.recv()

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler)
        try:
            with pytest.raises(AuthenticationError):
                await Msgr2Client.connect("127.0.0.1", srv.port, auth=PskAuth(b"k" * 32),
                                          mode="secure", options=FAST)
        finally:
            await srv.close()

    asyncio.run(main())


def test_dead_peer_detected_by_keepalive() -> None:
    """A peer that stops answering (relay frozen, TCP still open) is declared dead."""

    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            while True:
                await s.recv()

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler)
        relay = await Relay(srv.port, random.Random(0), cuts=0).start()
        opts = SessionOptions(keepalive_interval=0.1, keepalive_timeout=0.6, connect_timeout=2)
        c = await Msgr2Client.connect("127.0.0.1", relay.port, auth=PskAuth(KEY),
                                      mode="secure", lossless=False, options=opts)
        try:
            relay.frozen = True
            with pytest.raises(ConnectionClosedError, match="keepalive"):
                await asyncio.wait_for(c.recv(), 20)
        finally:
            relay.frozen = False
            await c.close()
            await relay.close()
            await srv.close()

    asyncio.run(main())


def test_back_pressure_then_drain() -> None:
    """A server that does not read makes send() wait; once it reads, everything arrives."""

    async def main() -> None:
        release = asyncio.Event()
        got: list[int] = []

        async def handler(s: ServerSession) -> None:
            await release.wait()
            while True:
                m = await s.recv()
                got.append(int(m.front))

        opts = SessionOptions(max_rx_queue=4)
        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler,
                                       options=opts)
        c = await Msgr2Client.connect("127.0.0.1", srv.port, auth=PskAuth(KEY), mode="crc",
                                      options=opts)
        data = bytes(1 << 20)
        n = 64

        async def sender() -> None:
            for i in range(n):
                await c.send(0x7001, b"%d" % i, data)

        task = asyncio.ensure_future(sender())
        try:
            await asyncio.sleep(1.0)
            assert not task.done(), "send() never waited for the slow reader"
            release.set()
            await asyncio.wait_for(task, 60)
            await c.wait_acked(60)
            assert got == list(range(n))
        finally:
            task.cancel()
            await c.close()
            await srv.close()

    asyncio.run(main())


def test_clean_close_delivers_everything() -> None:
    async def main() -> None:
        got: list[bytes] = []
        closed = asyncio.Event()

        async def handler(s: ServerSession) -> None:
            try:
                while True:
                    got.append((await s.recv()).front)
            except ConnectionClosedError:
                closed.set()
                raise

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=AuthNone(), handler=handler)
        c = await Msgr2Client.connect("127.0.0.1", srv.port, auth=AuthNone(), lossless=False)
        for i in range(100):
            await c.send(0x7001, b"%d" % i)
        await c.close()
        with pytest.raises(ConnectionClosedError):
            await c.send(0x7001, b"after close")
        await asyncio.wait_for(closed.wait(), 10)
        await srv.close()
        assert got == [b"%d" % i for i in range(100)]

    asyncio.run(main())


def test_server_survives_garbage_and_silent_peers() -> None:
    """Garbage gets the connection closed; a peer that sends nothing is dropped after the
    handshake timeout; the server keeps serving proper clients."""

    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            while True:
                m = await s.recv()
                await s.send(m.type, m.front)

        opts = SessionOptions(connect_timeout=1.0)
        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler,
                                       options=opts)
        rng = random.Random(5)
        try:
            for i in range(20):
                r, w = await asyncio.open_connection("127.0.0.1", srv.port)
                junk = rng.randbytes(rng.randint(1, 2000))
                if i % 2:  # a valid banner first, then garbage frames
                    junk = b"ceph v2\n" + struct.pack("<HQQ", 16, 1, 0) + junk
                w.write(junk)
                data = await asyncio.wait_for(r.read(), 10)  # server closes: EOF
                assert data.startswith(b"ceph v2\n")
                w.close()
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            assert await asyncio.wait_for(r.read(), 10)  # silent peer: banner, then EOF
            w.close()
            c = await Msgr2Client.connect("127.0.0.1", srv.port, auth=PskAuth(KEY),
                                          mode="secure", options=FAST)
            await c.send(0x7001, b"still alive")
            assert (await asyncio.wait_for(c.recv(), 10)).front == b"still alive"
            await c.close()
        finally:
            await srv.close()

    asyncio.run(main())


def test_server_restart_is_reported_not_hidden() -> None:
    """A lossless client whose server lost the session (restart) gets SessionResetError
    instead of a silent new session."""

    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            while True:
                m = await s.recv()
                await s.send(m.type, m.front)

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler,
                                       options=FAST)
        port = srv.port
        c = await Msgr2Client.connect("127.0.0.1", port, auth=PskAuth(KEY), mode="secure",
                                      options=FAST)
        await c.send(0x7001, b"one")
        assert (await asyncio.wait_for(c.recv(), 10)).front == b"one"
        await c.wait_acked(10)
        await srv.close()
        srv2 = await Msgr2Server.listen("127.0.0.1", port, auth=PskAuth(KEY), handler=handler,
                                        options=FAST)
        try:
            with pytest.raises(SessionResetError):
                await asyncio.wait_for(c.recv(), 30)
        finally:
            await c.close()
            await srv2.close()

    asyncio.run(main())
