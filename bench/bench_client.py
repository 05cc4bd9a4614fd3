#!/usr/bin/env python3
"""Client benchmarks (not a test): pynbd vs libnbd in one run, same servers.

1. ``pynbd copy`` vs ``nbdcopy``: nbdkit memory -> nbdkit memory, SIZE (default 1 GiB)
   with 50% data (alternating 1 MiB data / 1 MiB hole), 1 and 4 connections, over Unix
   sockets (``--transport tcp|both`` for loopback TCP). Each row runs ``--reps`` pairs
   side by side and reports medians and the median of the per-pair ratios (the machine
   is shared: single runs vary a lot, pairs much less).
2. 4 KiB QD1 read latency: pynbd's blocking client vs libnbd's Python bindings
   (``import nbd``) against the same nbdkit memory export (Unix socket and TCP).

Prints a table with ratios. Usage: .venv/bin/python bench/bench_client.py [--size 1G]
[--reps 9] [--transport unix|tcp|both] [--bytecode-cache] [--copy-only]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support.nbd_servers import Server, start_nbdkit  # noqa: E402

from pynbd.client import connect  # noqa: E402
from pynbd.util.sizes import parse_size  # noqa: E402


def start_memory(workdir: Path, name: str, size: int, tcp: bool = False) -> tuple[Server, str]:
    """nbdkit memory of ``size`` bytes (TCP on loopback or a Unix socket): (server, URI)."""
    srv = start_nbdkit(workdir / name, "memory", [f"size={size}"],
                       transport="tcp" if tcp else "unix")
    return srv, srv.uri()


def fill_half(uri: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with connect(uri) as c:
        with c.batch():
            for i, off in enumerate(range(0, size, 2 << 20)):
                c.submit_write(off, block)
                if i % 16 == 15:
                    c.wait_all()


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child: user + system)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
                       env=env)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} failed: {r.stderr.decode()}")
    return dt, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


@dataclass
class CopyRow:
    name: str
    nbdcopy: list[tuple[float, float]]  # (wall, cpu) per run
    pynbd: list[tuple[float, float]]

    def ratios(self) -> list[float]:
        """Per run pair: pynbd throughput / nbdcopy throughput."""
        return [a[0] / b[0] for a, b in zip(self.nbdcopy, self.pynbd, strict=True)]


def bench_copy(size: int, reps: int, transport: str, bytecode_cache: bool) -> list[CopyRow]:
    rows = []
    env = None
    with tempfile.TemporaryDirectory() as d:
        wd = Path(d)
        if bytecode_cache:
            # like an installed package: compiled once, then loaded from .pyc (this
            # environment may set PYTHONDONTWRITEBYTECODE, which recompiles every run)
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "",
                   "PYTHONPYCACHEPREFIX": str(wd / "pycache")}
        src, suri = start_memory(wd, "src", size, tcp=transport == "tcp")
        dst, duri = start_memory(wd, "dst", size, tcp=transport == "tcp")
        try:
            fill_half(suri, size)
            for conns in (1, 4):
                nb_argv = ["nbdcopy", f"--connections={conns}", suri, duri]
                py_argv = [sys.executable, "-m", "pynbd.cli.copy", suri, duri,
                           f"--connections={conns}"]
                # warm-up: the first copy into a fresh nbdkit memory export pays for
                # page allocation (and compiles pynbd with --bytecode-cache)
                timed(nb_argv)
                timed(py_argv, env)
                row = CopyRow(f"copy {size >> 20} MiB, {conns} conn ({transport})", [], [])
                for i in range(reps):
                    # run pairs side by side, alternating which tool goes first
                    if i % 2:
                        row.pynbd.append(timed(py_argv, env))
                        row.nbdcopy.append(timed(nb_argv))
                    else:
                        row.nbdcopy.append(timed(nb_argv))
                        row.pynbd.append(timed(py_argv, env))
                rows.append(row)
        finally:
            for p in (src, dst):
                p.stop()
    return rows


def _measure(fn, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(median wall us/op, median client CPU us/op) over 5 rounds of n ops."""
    walls, cpus = [], []
    for _ in range(5):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(n)
        walls.append((time.perf_counter() - t0) / n * 1e6)
        cpus.append((time.process_time() - c0) / n * 1e6)
    return statistics.median(walls), statistics.median(cpus)


def bench_latency(n: int, tcp: bool) -> tuple[str, tuple[float, float], tuple[float, float]]:
    import nbd  # libnbd's Python bindings
    with tempfile.TemporaryDirectory() as d:
        proc, uri = start_memory(Path(d), "lat", 64 << 20, tcp=tcp)
        try:
            h = nbd.NBD()
            h.connect_uri(uri)

            def lib(k: int) -> None:
                for i in range(k):
                    h.pread(4096, (i * 4096) % (32 << 20))
            c = connect(uri)
            out = bytearray(4096)

            def ours(k: int) -> None:
                for i in range(k):
                    c.read_into((i * 4096) % (32 << 20), out)
            lib(1000)
            ours(1000)
            # interleave the two so that machine noise hits both alike
            rl, rp = [], []
            for _ in range(3):
                rl.append(_measure(lib, n))
                rp.append(_measure(ours, n))
            h.shutdown()
            c.close()
        finally:
            proc.stop()
    name = f"4 KiB QD1 read ({'TCP' if tcp else 'Unix'})"
    best_l = (min(x[0] for x in rl), min(x[1] for x in rl))
    best_p = (min(x[0] for x in rp), min(x[1] for x in rp))
    return name, best_l, best_p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1G")
    ap.add_argument("--reps", type=int, default=9, help="copy pairs per row (default 9)")
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--transport", choices=["unix", "tcp", "both"], default="unix",
                    help="how the copy reaches the nbdkit servers (default unix)")
    ap.add_argument("--bytecode-cache", action="store_true",
                    help="run pynbd from compiled bytecode even if PYTHONDONTWRITEBYTECODE "
                         "is set (as an installed package would)")
    ap.add_argument("--copy-only", action="store_true", help="skip the latency benchmark")
    args = ap.parse_args()
    size = parse_size(args.size)
    for prog in ("nbdkit", "nbdcopy"):
        if shutil.which(prog) is None:
            raise SystemExit(f"{prog} is required")
    print(f"pynbd client benchmark  (python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"copy: `nbdcopy --connections=N SRC DST` vs `python -m pynbd.cli.copy SRC DST "
          f"--connections=N`, {args.reps} pairs run side by side (alternating which goes "
          f"first), medians; ratio = median over the pairs of pynbd/nbdcopy throughput"
          + (" (pynbd from cached bytecode)" if args.bytecode_cache else ""))
    print()
    print(f"{'benchmark':34} {'nbdcopy':>10} {'pynbd':>10} {'ratio':>8}  "
          f"{'range':>11}  {'client CPU nbdcopy / pynbd':>26}")
    gb = size / (1 << 30)
    for transport in (("unix", "tcp") if args.transport == "both" else (args.transport,)):
        for row in bench_copy(size, args.reps, transport, args.bytecode_cache):
            nb = statistics.median(w for w, _ in row.nbdcopy)
            py = statistics.median(w for w, _ in row.pynbd)
            r = row.ratios()
            print(f"{row.name:34} {gb / nb:5.2f} GiB/s {gb / py:5.2f} GiB/s "
                  f"{statistics.median(r):5.2f}x  {min(r):4.2f}-{max(r):4.2f}x  "
                  f"{statistics.median(c for _, c in row.nbdcopy):9.3f} s / "
                  f"{statistics.median(c for _, c in row.pynbd):.3f} s")
    if args.copy_only:
        return 0
    print()
    print(f"{'benchmark':34} {'libnbd-py':>10} {'pynbd':>10} {'ratio':>8}")
    for tcp in (False, True):
        name, lib, py = bench_latency(args.ops, tcp)
        print(f"{name + ' wall':34} {lib[0]:7.1f} us {py[0]:7.1f} us  {py[0] / lib[0]:5.2f}x  "
              "(latency per op, lower is better)")
        print(f"{name + ' client CPU':34} {lib[1]:7.1f} us {py[1]:7.1f} us  "
              f"{py[1] / lib[1]:5.2f}x  (client CPU per op, lower is better)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
