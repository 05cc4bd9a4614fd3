"""A fault-injecting TCP relay on 127.0.0.1 for tests: forwards to a target and cuts each
connection after a random number of bytes (either direction), or freezes it."""

from __future__ import annotations

import asyncio
import contextlib
import random


class Relay:
    def __init__(self, target_port: int, rng: random.Random, cuts: int,
                 first_min: int = 4000, max_bytes: int = 400_000) -> None:
        self.target_port = target_port
        self.rng = rng
        self.cuts_left = cuts
        self.first_min = first_min
        self.max_bytes = max_bytes
        self.connections = 0
        self.cuts_done = 0
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cw.close()
            return
        self._writers |= {cw, sw}
        budget: list[int | None] = [None]
        if self.cuts_left > 0:
            self.cuts_left -= 1
            if first:
                budget[0] = self.rng.randint(self.first_min, max(self.first_min,
                                                                 self.max_bytes) * 4)
            else:
                budget[0] = self.rng.randint(1, self.max_bytes)
        done = asyncio.Event()

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while not done.is_set():
                    data = await r.read(65536)
                    if not data:
                        break
                    while self.frozen and not done.is_set():
                        await asyncio.sleep(0.05)
                    b = budget[0]
                    if b is not None:
                        if len(data) >= b:
                            w.write(data[:b])
                            self.cuts_done += 1
                            break
                        budget[0] = b - len(data)
                    w.write(data)
                    await w.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                done.set()

        t1 = asyncio.ensure_future(pump(cr, sw))
        t2 = asyncio.ensure_future(pump(sr, cw))
        await done.wait()
        for w in (cw, sw):
            with contextlib.suppress(Exception):
                w.transport.abort()
        for t in (t1, t2):
            t.cancel()
        self._writers -= {cw, sw}

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
