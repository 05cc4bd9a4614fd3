#!/usr/bin/env python3
"""msgr2 framing throughput: pynbd client -> pynbd server over loopback (server in its own
process), crc and secure mode, 4 KiB and 4 MiB messages, beside the raw AES-128-GCM and
CRC32-C ceilings measured on the same buffers. Also the sans-I/O cost alone (build + parse
in memory, one thread).

    python bench/bench_msgr2.py [--seconds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import crc32c
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pynbd.msgr2.aio import Msgr2Client, Msgr2Server, ServerSession
from pynbd.msgr2.auth import PskAuth
from pynbd.msgr2.constants import Tag
from pynbd.msgr2.crypto import GcmStream
from pynbd.msgr2.frames import BufferPool, FrameAssembler, FrameReader
from pynbd.msgr2.payloads import MessageHeader2

KEY = b"bench-psk-key-0123456789abcdef!!"
SIZES = [("4 KiB", 4096), ("4 MiB", 4 << 20)]
MiB = 1 << 20


def timed(fn: object, nbytes: int, seconds: float) -> tuple[float, float]:
    """(MiB/s, ops/s) running fn() repeatedly for about ``seconds``."""
    f = fn  # type: ignore[assignment]
    n = 0
    t0 = time.perf_counter()
    while True:
        for _ in range(8):
            f()  # type: ignore[operator]
        n += 8
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n * nbytes / dt / MiB, n / dt


def raw_ceilings(size: int, seconds: float) -> tuple[float, float]:
    buf = os.urandom(size)
    out = bytearray(size + 16)
    aead = AESGCM(os.urandom(16))
    nonce = os.urandom(12)
    gcm, _ = timed(lambda: aead.encrypt_into(nonce, buf, None, out), size, seconds)
    mv = memoryview(buf)
    crc, _ = timed(lambda: crc32c.crc32c(mv), size, seconds)
    return gcm, crc


def sansio(size: int, secure: bool, seconds: float) -> tuple[float, float]:
    tx_pool, rx_pool = BufferPool(), BufferPool()
    asm, rd = FrameAssembler(tx_pool), FrameReader(pool=rx_pool)
    if secure:
        asm.tx = GcmStream(KEY[:16], KEY[16:28])
        rd.rx = GcmStream(KEY[:16], KEY[16:28])
        rd._reset_unit()
    data = os.urandom(size)
    hdr = MessageHeader2(1, 0, 0x7001).encode()

    def one() -> None:
        for chunk in asm.build(Tag.MESSAGE, [hdr, b"front", b"", data]):
            mv = memoryview(chunk)
            while len(mv):
                # receive in place, as the asyncio layer does for large units
                target = rd.buffer()
                n = min(len(target), len(mv))
                target[:n] = mv[:n]
                mv = mv[n:]
                frame = rd.advance(n)
                if frame is not None and frame.buffer is not None:
                    rx_pool.put(frame.buffer)
            tx_pool.put(chunk)

    def tx_only() -> None:
        for chunk in asm.build(Tag.MESSAGE, [hdr, b"front", b"", data]):
            tx_pool.put(chunk)

    return timed(one, size, seconds)[0], timed(tx_only, size, seconds)[0]


def _server_proc(conn: object, mode: str) -> None:
    async def main() -> None:
        async def handler(s: ServerSession) -> None:
            cpu0 = time.process_time()
            while True:
                m = await s.recv()
                m.release()
                if m.front == b"start":
                    cpu0 = time.process_time()
                elif m.front == b"end":
                    await s.send(0x7002, b"%f" % (time.process_time() - cpu0))

        srv = await Msgr2Server.listen("127.0.0.1", 0, auth=PskAuth(KEY), handler=handler)
        conn.send(srv.port)  # type: ignore[attr-defined]
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # type: ignore[attr-defined]
        await srv.close()

    asyncio.run(main())


async def _loopback(port: int, mode: str, size: int,
                    seconds: float) -> tuple[float, float, float, float]:
    """(MiB/s, frames/s, client CPU us/frame, server CPU us/frame)"""
    c = await Msgr2Client.connect("127.0.0.1", port, auth=PskAuth(KEY), mode=mode)
    data = os.urandom(size)
    try:
        # warm up
        for _ in range(4):
            await c.send(0x7001, b"x", data)
        await c.send(0x7001, b"end")
        await c.recv()
        await c.send(0x7001, b"start")
        n = 0
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        while time.perf_counter() - t0 < seconds:
            for _ in range(16):
                await c.send(0x7001, b"x", data)
            n += 16
        await c.send(0x7001, b"end")
        server_cpu = float((await c.recv()).front)
        dt = time.perf_counter() - t0
        client_cpu = time.process_time() - cpu0
    finally:
        await c.close()
    return n * size / dt / MiB, n / dt, client_cpu / n * 1e6, server_cpu / n * 1e6


def _tcp_sink(conn: object, size: int) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    conn.send(srv.getsockname()[1])  # type: ignore[attr-defined]
    c, _ = srv.accept()
    buf = memoryview(bytearray(size))
    while c.recv_into(buf):
        pass


def raw_tcp(size: int, seconds: float) -> float:
    """Blocking sendall of the same buffer to a recv_into sink process: the loopback TCP
    ceiling (MiB/s) that no msgr2 stack on this host can beat."""
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_tcp_sink, args=(b, size), daemon=True)
    p.start()
    try:
        c = socket.create_connection(("127.0.0.1", a.recv()))
        data = os.urandom(size)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            c.sendall(data)
            n += 1
        dt = time.perf_counter() - t0
        c.close()
        return n * size / dt / MiB
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()


def loopback(mode: str, size: int, seconds: float) -> tuple[float, float, float, float]:
    ctx = mp.get_context("fork")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_server_proc, args=(b, mode), daemon=True)
    p.start()
    try:
        port = a.recv()
        return asyncio.run(_loopback(port, mode, size, seconds))
    finally:
        a.send("stop")
        p.join(10)
        if p.is_alive():
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per measurement (default 2)")
    args = ap.parse_args()
    rows = []
    for label, size in SIZES:
        gcm, crc = raw_ceilings(size, args.seconds)
        tcp = raw_tcp(size, args.seconds)
        for mode in ("crc", "secure"):
            s_mib, tx_mib = sansio(size, mode == "secure", args.seconds)
            l_mib, l_fps, c_us, s_us = loopback(mode, size, args.seconds)
            ceiling = gcm if mode == "secure" else crc
            rows.append((label, mode, l_mib, l_fps, s_mib, tx_mib, ceiling, tcp, c_us, s_us))
    print("loopback: client -> server process over 127.0.0.1 (PSK auth), whole stack;")
    print("tx: sans-I/O frame building alone; rx+tx: build + parse in one thread;")
    print("ceiling: one raw AESGCM.encrypt_into (secure) or crc32c (crc) pass per byte")
    print("raw TCP: blocking sendall of the same buffer to another process (loopback limit)")
    print(f"{'size':6} {'mode':6} | {'loopback MiB/s':>14} {'frames/s':>9} | {'tx MiB/s':>9} "
          f"{'rx+tx MiB/s':>11} | {'ceiling MiB/s':>21} {'raw TCP':>8} | {'loopback':>8} "
          f"{'tx':>6} {'rx+tx':>6} (of ceiling) {'loopback/TCP':>12}")
    for label, mode, l_mib, l_fps, s_mib, tx_mib, ceiling, tcp, _, _ in rows:
        what = "AES-GCM" if mode == "secure" else "CRC32-C"
        print(f"{label:6} {mode:6} | {l_mib:14.0f} {l_fps:9.0f} | {tx_mib:9.0f} {s_mib:11.0f} | "
              f"{ceiling:13.0f} {what:7} {tcp:8.0f} | {l_mib / ceiling:8.1%} "
              f"{tx_mib / ceiling:6.1%} {s_mib / ceiling:6.1%}              {l_mib / tcp:12.1%}")
    print()
    print("CPU per frame over loopback (stabler than throughput on a shared host):")
    print(f"{'size':6} {'mode':6} | {'client us/frame':>15} {'server us/frame':>15} | "
          f"{'client CPU MiB/s':>16} {'server CPU MiB/s':>16}")
    for label, mode, *_, c_us, s_us in rows:
        size = dict(SIZES)[label]
        print(f"{label:6} {mode:6} | {c_us:15.1f} {s_us:15.1f} | "
              f"{size / MiB / (c_us / 1e6):16.0f} {size / MiB / (s_us / 1e6):16.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
