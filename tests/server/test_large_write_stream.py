"""Streams of large WRITEs (each followed by one header-sized read, so the next payload
goes straight into its own buffer) mixed with small writes, reads, flushes and zeroes,
pipelined, under compact headers (libnbd) and extended headers (pynbd's client): every
byte lands where it was sent and every reply is right."""

from __future__ import annotations

import random
from collections.abc import Iterator

import nbd
import pytest

from pynbd.backends.memory import MemoryBackend
from pynbd.client.blocking import connect
from pynbd.server.connection import HEADER_ONLY_AFTER
from pynbd.server.exports import Export, ExportRegistry
from pynbd.server.server import Server, ServerOptions

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(ExportRegistry([Export("", MemoryBackend(SIZE))]), ServerOptions())
    srv.listen_tcp("127.0.0.1", 0)
    srv.start()
    yield srv
    srv.shutdown(timeout=10)


def _plan(seed: int) -> list[tuple[str, int, int]]:
    """(kind, offset, length): large and small writes, reads, zeroes, flushes."""
    rnd = random.Random(seed)
    sizes = [HEADER_ONLY_AFTER, HEADER_ONLY_AFTER - 1, MiB, 3 * MiB + 17, 4096, 1, 65536]
    plan = []
    for _ in range(120):
        kind = rnd.choice(["write", "write", "write", "read", "zero", "flush"])
        n = rnd.choice(sizes)
        plan.append((kind, rnd.randrange(0, SIZE - n), n))
    return plan


def _change(model: bytearray, rnd: random.Random, kind: str, off: int, n: int) -> bytes:
    """Apply a write (random bytes, returned) or a zero to the model."""
    data = rnd.randbytes(n) if kind == "write" else bytes(n) if kind == "zero" else b""
    if data:
        model[off:off + n] = data
    return data


def test_compact_headers_pipelined(server: Server) -> None:
    h = nbd.NBD()
    h.connect_tcp("127.0.0.1", str(server.listeners[0].port))
    model = bytearray(SIZE)
    rnd = random.Random(1)
    for batch_start in range(0, 120, 12):
        plan = _plan(batch_start)[batch_start:batch_start + 12]
        # requests in flight together never overlap: they may complete in any order
        spans: list[tuple[int, int]] = []
        reads: list[tuple[int, int, nbd.Buffer]] = []
        for kind, off, n in plan:
            if any(off < e and s < off + n for s, e in spans):
                continue
            spans.append((off, off + n))
            data = _change(model, rnd, kind, off, n)
            if kind == "write":
                h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)
            elif kind == "zero":
                h.aio_zero(n, off)
            elif kind == "flush":
                h.aio_flush()
            else:
                buf = nbd.Buffer(n)
                reads.append((off, n, buf))
                h.aio_pread(buf, off)
        while h.aio_in_flight():
            h.poll(-1)
        for off, n, buf in reads:
            assert buf.to_bytearray() == model[off:off + n], (off, n)
    assert h.pread(SIZE, 0) == model
    h.shutdown()


def test_extended_headers_sequential(server: Server) -> None:
    c = connect(f"nbd://127.0.0.1:{server.listeners[0].port}/")
    try:
        assert c.extended
        model = bytearray(SIZE)
        rnd = random.Random(2)
        for kind, off, n in _plan(7):
            data = _change(model, rnd, kind, off, n)
            if kind == "write":
                c.write(off, data)
            elif kind == "zero":
                c.write_zeroes(off, n)
            elif kind == "flush":
                c.flush()
            else:
                assert c.read(off, n) == model[off:off + n], (off, n)
        for off in range(0, SIZE, 4 * MiB):
            assert c.read(off, 4 * MiB) == model[off:off + 4 * MiB], off
    finally:
        c.close()
