"""CPU per request of the sans-I/O server core alone (no sockets, no backend).

Feeds batches of 32 request headers (and WRITE payloads) to a ``ServerConnection`` that
negotiated an export, takes every event and builds its reply, and prints microseconds per
request for 4 KiB READ and WRITE in each reply mode (simple, structured, extended). It
isolates the protocol core from the driver and the kernel: the numbers say what parsing,
validation, payload hand-off and reply packing cost in this interpreter.

    python bench/bench_core.py [--rounds 3000] [--repeat 5]

Medians of ``--repeat`` runs; compare revisions on the same machine, not across machines.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pynbd.protocol.constants import Opt
from pynbd.protocol.server import (
    NEED_DATA,
    ExportInfo,
    ExportSelected,
    ServerConfig,
    ServerConnection,
)

IHAVEOPT = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
N = 32
SIZE = 1 << 30


class _Provider:
    def __init__(self) -> None:
        self.info = ExportInfo(name="", size=SIZE)

    def lookup(self, name: str) -> ExportInfo | None:
        return self.info if name == "" else None

    def list_exports(self) -> list[ExportInfo]:
        return [self.info]


def _opt(o: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def negotiated(mode: str) -> ServerConnection:
    s = ServerConnection(_Provider(), ServerConfig())
    s.initiate()
    opts = b""
    if mode == "structured":
        opts += _opt(Opt.STRUCTURED_REPLY)
    elif mode == "extended":
        opts += _opt(Opt.EXTENDED_HEADERS)
    opts += _opt(Opt.GO, struct.pack(">IH", 0, 0))
    s.receive_data(struct.pack(">I", 3) + opts)
    while True:
        ev = s.next_event()
        s.take_output()
        if isinstance(ev, ExportSelected):
            return s
        if ev is NEED_DATA:
            raise RuntimeError(f"negotiation stalled ({mode})")


def requests(mode: str, cmd: int) -> bytes:
    out = []
    for i in range(N):
        off = (i * 7919 % 100_000) * 4096
        if mode == "extended":
            hdr = struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC, 0, cmd, i, off, 4096)
        else:
            hdr = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, i, off, 4096)
        out.append(hdr + (bytes(4096) if cmd == 1 else b""))
    return b"".join(out)


def run(mode: str, cmd: int, rounds: int) -> float:
    s = negotiated(mode)
    batch = requests(mode, cmd)
    buf = memoryview(bytearray(4096))
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        s.receive_data(batch)
        while True:
            ev = s.next_event()
            if ev is NEED_DATA:
                break
            if cmd == 0:
                s.read_reply_header(ev.cookie, ev.offset, ev.length, req_offset=ev.offset)
            else:
                s.payload_into(buf)
                s.ok_reply(ev.cookie, ev.offset)
            n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3000, help="batches of 32 per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per cell (median)")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}; us per request (median of {args.repeat})")
    print("| mode | 4 KiB READ | 4 KiB WRITE |")
    print("|---|---|---|")
    for mode in ("simple", "structured", "extended"):
        cells = []
        for cmd in (0, 1):
            cells.append(statistics.median(run(mode, cmd, args.rounds)
                                           for _ in range(args.repeat)))
        print(f"| {mode} | {cells[0]:.2f} | {cells[1]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
