"""Live migration benchmark: a 1 GiB image, 50% allocated, over loopback.

nbdcopy runs with --flush so that both sides end with the data durable.

Rows: ``nbdcopy`` of the image file into ``qemu-nbd`` (the ceiling); ``pynbd mirror`` over
msgr2 to ``pynbd listen`` and over plain NBD to ``qemu-nbd``, each idle and with a writer
at 20 MiB/s (random 64 KiB writes through the pynbd client). The writer's worst write
latency is the client-visible pause at handover.

    .venv/bin/python bench/bench_migration.py [--size 1G] [--writer-rate 20M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support.images import make_image  # noqa: E402
from tests.support.migration import Procs, Writer, listen  # noqa: E402
from tests.support.net import free_port, port_open  # noqa: E402
from tests.support.processes import run_pynbd  # noqa: E402

MiB = 1024 * 1024


def make_source(path: Path, size: int, seed: int = 1) -> None:
    """50% allocated: every other 1 MiB extent holds random data."""
    make_image(path, size, {off: min(MiB, size - off) for off in range(0, size, 2 * MiB)},
               seed=seed, sync=True)


def fresh(path: Path, size: int) -> None:
    if path.exists():
        path.unlink()
    make_image(path, size)


def tcp_qemu_nbd(procs: Procs, image: Path, name: str) -> str:
    port = free_port()
    p = procs.start([shutil.which("qemu-nbd") or "qemu-nbd", "-f", "raw", "-b", "127.0.0.1",
                     "-p", str(port), "-t", "--cache=writeback", "--discard=unmap",
                     "-e", "8", str(image)], name)
    p.wait_for(lambda: port_open("127.0.0.1", port, timeout=0.2), "TCP port")
    return f"nbd://127.0.0.1:{port}/"


def bench_nbdcopy(work: Path, src: Path, size: int) -> float:
    procs = Procs(work)
    try:
        dst = work / "dst-nbdcopy.img"
        fresh(dst, size)
        uri = tcp_qemu_nbd(procs, dst, "qemu-nbdcopy")
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", "--flush", str(src), uri], check=True)
        return time.monotonic() - t0
    finally:
        procs.stop_all()


def bench_mirror(work: Path, src: Path, size: int, transport: str,
                 writer_rate: int) -> dict[str, float]:
    procs = Procs(work)
    try:
        dst = work / f"dst-{transport}.img"
        fresh(dst, size)
        for rec in work.glob("*.pynbd-migration.json"):
            rec.unlink()
        _s, uri, ctl = procs.serve(src, name=f"src-{transport}-{writer_rate}")
        if transport == "msgr2":
            _d, to, _dctl, _ = listen(procs, dst, name=f"dst-{transport}-{writer_rate}")
        else:
            to = tcp_qemu_nbd(procs, dst, f"qemu-{writer_rate}")
        w = None
        if writer_rate:
            w = Writer(uri, size, seed=3, rate=writer_rate)
            w.start()
            time.sleep(0.5)
        auth = procs.auth() if transport == "msgr2" else []
        r = run_pynbd("mirror", *auth, "--control", ctl, "--to", to, "--wait", "--json",
                      text=True, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"mirror failed ({r.returncode}): {r.stderr}")
        st = json.loads(r.stdout)
        out = {"seconds": st["elapsed_seconds"], "pause_ms": st["pause_ms"] or 0.0,
               "max_write_latency_ms": 0.0, "bytes_sent": st["bytes_done"]}
        if w is not None:
            w.stop_event.set()
            w.join(30)
            # the write that was held by the pause and then refused (ESHUTDOWN) counts too
            out["max_write_latency_ms"] = round(max(w.max_latency, w.error_latency) * 1000, 1)
        return out
    finally:
        procs.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--writer-rate", default="20M")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (median)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    args = ap.parse_args()
    from pynbd.util.sizes import parse_size

    size = parse_size(args.size)
    rate = parse_size(args.writer_rate)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        work = Path(d)
        src = work / "src.img"
        make_source(src, size)
        n = args.repeat
        base = statistics.median(bench_nbdcopy(work, src, size) for _ in range(n))
        rows = [("nbdcopy file -> qemu-nbd (ceiling)", base, None, None)]
        for transport in ("msgr2", "nbd"):
            for wr in (0, rate):
                results = []
                for _ in range(n):
                    make_source(src, size)  # the writer changed it: start from the same image
                    results.append(bench_mirror(work, src, size, transport, wr))
                label = (f"pynbd mirror {transport}"
                         + (" -> pynbd listen" if transport == "msgr2" else " -> qemu-nbd")
                         + (f", writer {wr // MiB} MiB/s" if wr else ", idle"))
                rows.append((label, statistics.median(r["seconds"] for r in results),
                             max(r["pause_ms"] for r in results),
                             max(r["max_write_latency_ms"] for r in results) if wr else None))
        print(f"image {size // MiB} MiB, 50% allocated, loopback, {os.cpu_count()} CPUs; "
              f"median seconds of {n} runs, worst pause and latency of the {n}\n")
        print("| run | seconds | throughput vs nbdcopy | pause (ms) | max write latency (ms) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, secs, pause, lat in rows:
            ratio = base / secs if secs else 0.0
            print(f"| {label} | {secs:.2f} | {ratio:.2f}x | "
                  f"{'' if pause is None else f'{pause:.0f}'} | "
                  f"{'' if lat is None else f'{lat:.0f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
