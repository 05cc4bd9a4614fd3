#!/usr/bin/env python3
"""What each filter layer costs per request: ``pynbd serve memory:1G`` with no filter, with
one no-op-ish filter of each kind, and with stacks of several, side by side in one run.

    .venv/bin/python bench/bench_filters.py [--runtime 5] [--repeat 2] [--workers 1]

Workloads: fio's nbd engine, 4 KiB random read and random write, queue depth 32, one
TCP loopback connection. For every cell: IOPS and the server's CPU time per request
(utime + stime of the server processes over the run, divided by the requests); the
cost of a filter is its CPU time per request minus the no-filter stack's, per layer.
Because the server's CPU time on a shared machine is noisy, the same stacks are also
timed in this process without network or client ("stack calls"): admission (when a
layer asks for it) plus the read or write call; the stacks take turns in short runs
and the best run of each is reported.
"No filter" is the plugin itself: ``pynbd status`` shows the stack, and with no
``--filter`` it is the memory backend alone (no wrapper, no admission).

The filters are configured so that they do nothing visible: ``stats`` counts,
``log`` writes to /dev/null, ``error`` with rate=0, ``rate`` with a limit never reached
(its buckets are charged on every read and write), ``delay`` with no delay set (the
admission path still runs). Needs fio. A script, not a test: numbers depend on the
machine; compare the ratios within one run.
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
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.processes import Process, pynbd_argv, run_pynbd  # noqa: E402

FIVE = ["stats", "log:file=/dev/null", "error:rate=0", "rate:rate=1T", "delay:delay-trim=0"]

#: (label, --filter arguments, layers)
CONFIGS: list[tuple[str, list[str]]] = [
    ("no filter", []),
    ("stats", ["stats"]),
    ("log file=/dev/null", ["log:file=/dev/null"]),
    ("error rate=0", ["error:rate=0"]),
    ("rate rate=1T", ["rate:rate=1T"]),
    ("delay (none set)", ["delay:delay-trim=0"]),
    ("5 layers (all five)", FIVE),
    ("10 x stats", ["stats"] * 10),
]

WORKLOADS = [("rand read 4K QD32", "randread"), ("rand write 4K QD32", "randwrite")]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            pass
    return total


@dataclass
class Server:
    label: str
    filters: list[str]
    workers: int
    python: str
    tmp: Path
    proc: Process | None = None
    uri: str = ""
    control: str = ""
    stack: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.control = str(self.tmp / f"ctl-{len(os.listdir(self.tmp))}.sock")
        args = ["serve", "-q", "--bind", "127.0.0.1", "--port", "0", "--workers",
                str(self.workers), "--control", self.control, "memory:1G"]
        for f in self.filters:
            args += ["--filter", f]
        self.proc = Process(pynbd_argv(*args, python=self.python), name="serve",
                            new_session=True, stop_timeout=15.0)
        try:
            self.uri = self.proc.first_line().strip()
        except RuntimeError as exc:
            raise RuntimeError(f"{self.label}: the server printed no URI") from exc
        st = self.status()
        self.stack = st["exports"][0]["stack"]
        self.pids = sorted(set(st["worker_pids"]) | {self.proc.pid})

    def status(self) -> dict:  # type: ignore[type-arg]
        p = run_pynbd("status", "--control", self.control, text=True, timeout=30,
                      python=self.python)
        if p.returncode != 0:
            raise RuntimeError(p.stderr)
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def fio(uri: str, rw: str, runtime: float) -> float:
    argv = ["fio", "--name=f", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            "--iodepth=32", "--size=1G", "--time_based", f"--runtime={runtime:g}",
            "--ramp_time=1", "--norandommap", "--randrepeat=0", "--output-format=json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"])


def micro(n: int, repeat: int) -> dict[tuple[str, str], float]:
    """In this process, without a network or a client: the stack's calls for one 4 KiB
    request as the server makes them (admission when a layer asks for it, then the
    data call). Short runs of ``n`` requests, the stacks taking turns, ``repeat``
    rounds; the best run of each (the least disturbed by other processes) in us per
    request."""
    sys.path.insert(0, str(REPO / "src"))
    from pynbd.backends.loader import open_stack, parse_filter
    from pynbd.filters.base import Filter

    stacks = []
    for label, filters in CONFIGS:
        top = open_stack("memory:64M", {}, [parse_filter(f) for f in filters])
        conn = top.open_connection("", False)
        layers = conn.layers if isinstance(conn, Filter) else [conn]
        stacks.append((label, top, conn, any(getattr(b, "admits", False) for b in layers)))
    buf = memoryview(bytearray(4096))
    data = bytes(4096)
    out: dict[tuple[str, str], float] = {}
    for _ in range(repeat):
        for wname, rw in WORKLOADS:
            cmd = "READ" if "read" in rw else "WRITE"
            for label, _top, conn, admits in stacks:
                now = time.monotonic()
                t0 = time.perf_counter()
                for i in range(n):
                    off = (i * 7919 % 16384) * 4096
                    if admits:
                        conn.admit(cmd, off, 4096, now)
                    if cmd == "READ":
                        conn.pread_nowait(buf, off)
                    else:
                        conn.pwrite(data, off)
                us = (time.perf_counter() - t0) / n * 1e6
                key = (wname, label)
                out[key] = min(out.get(key, us), us)
    for _label, top, conn, _admits in stacks:
        conn.close_connection()
        top.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per cell (default 5)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds; the median is reported")
    ap.add_argument("--workers", type=int, default=1,
                    help="pynbd serve --workers (default 1: one process, one core)")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="interpreter that runs pynbd")
    ap.add_argument("--calls", type=int, default=10_000,
                    help="requests per in-process run (default 10000)")
    ap.add_argument("--call-rounds", type=int, default=30,
                    help="in-process rounds; the best is reported (default 30)")
    args = ap.parse_args()
    calls = micro(args.calls, args.call_rounds)
    if shutil.which("fio") is None:
        print("missing tool: fio", file=sys.stderr)
        return 2
    python = args.python if Path(args.python).exists() else sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-filters-"))
    servers = [Server(label, f, args.workers, python, tmp) for label, f in CONFIGS]
    samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        for s in servers:
            s.start()
        for _round in range(args.repeat):
            for wname, rw in WORKLOADS:
                for s in servers:
                    cpu0, t0 = cpu_seconds(s.pids), time.perf_counter()
                    iops = fio(s.uri, rw, args.runtime)
                    cpu = cpu_seconds(s.pids) - cpu0
                    # fio's ramp second is served too: count it in the requests
                    ops = iops * (time.perf_counter() - t0)
                    us = cpu / ops * 1e6 if ops > 0 else float("nan")
                    samples.setdefault((wname, s.label), []).append((iops, us))
                    print(f"  {wname:18} {s.label:22} {iops:10.0f} IOPS {us:7.1f} "
                          "server-CPU-us/op", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(servers, samples, calls, args))
    return 0


def render(servers: list[Server], samples: dict[tuple[str, str], list[tuple[float, float]]],
           calls: dict[tuple[str, str], float], args: argparse.Namespace) -> str:
    out = [f"pynbd filter layers, memory:1G, --workers {args.workers}, fio nbd engine 4 KiB "
           f"QD32 one connection, {args.runtime:g} s x {args.repeat} rounds (median)", ""]
    for wname, _rw in WORKLOADS:
        base_iops, base_us = (statistics.median(x) for x in zip(
            *samples[(wname, servers[0].label)], strict=True))
        base_call = calls[(wname, servers[0].label)]
        out.append(f"| {wname} | layers | IOPS | vs none | server CPU us/req | "
                   "+us/req per layer | stack calls us/req | +us per layer (calls) |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in servers:
            iops, us = (statistics.median(x) for x in zip(*samples[(wname, s.label)],
                                                             strict=True))
            c = calls[(wname, s.label)]
            n = len(s.filters)
            per = f"{(us - base_us) / n:+.2f}" if n else "-"
            per_call = f"{(c - base_call) / n:+.2f}" if n else "-"
            out.append(f"| {s.label} | {n} | {iops:.0f} | {iops / base_iops:.2f} | {us:.1f} "
                       f"| {per} | {c:.2f} | {per_call} |")
        out.append("")
    out.append("Stacks (pynbd status): " + "; ".join(
        f"{s.label}: {' > '.join(s.stack)}" for s in servers[:2]))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
