#!/usr/bin/env python3
"""A plugin in Python, served by pynbd and by nbdkit: the same RAM-disk logic as a pynbd
plugin (examples/plugins/ramdisk.py) and as an nbdkit Python plugin (API_VERSION 2,
THREAD_MODEL_PARALLEL, written below), next to pynbd's built-in memory backend with one
worker process and with the default number, in one run.

    .venv/bin/python bench/bench_plugins.py [--runtime 5] [--size 256M] [--repeat 3]

Workloads: fio's nbd engine, 4 KiB random read and random write at queue depth 32, with
one job and with four (one connection per job). Reported per cell: IOPS and the server's
CPU time per request (user + system of the server's whole process tree: the supervisor
and its worker processes), the median of ``--repeat`` rounds, and the ratios the plugin
API is held to: the pynbd plugin >= 3x nbdkit's Python plugin, >= 0.8x pynbd's built-in
memory backend (one worker). ``--profile SECONDS`` records the pynbd plugin server
with py-spy during one extra 4 KiB random-write run and prints the top lines.
Needs: fio, nbdkit with its python plugin. A script, not a test: numbers depend on the
machine; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
sys.path.insert(0, str(REPO / "src"))

from tests.support.net import free_port, port_open  # noqa: E402
from tests.support.processes import Process, pynbd_argv  # noqa: E402

from pynbd.util.sizes import parse_size  # noqa: E402

MiB = 1024 * 1024

#: examples/plugins/ramdisk.py, as an nbdkit Python plugin
NBDKIT_RAMDISK = '''\
import nbdkit

API_VERSION = 2
disk = None
size = 0


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global size
    if key == "size":
        size = nbdkit.parse_size(value)
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    global disk
    disk = bytearray(size)


def open(readonly):
    return 1


def get_size(h):
    return size


def can_multi_conn(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = memoryview(disk)[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def trim(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)


def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)
'''

WORKLOADS = [  # (name, fio rw, jobs)
    ("4K randread QD32 x1", "randread", 1),
    ("4K randread QD32 x4", "randread", 4),
    ("4K randwrite QD32 x1", "randwrite", 1),
    ("4K randwrite QD32 x4", "randwrite", 4),
]

PLUGIN = "pynbd-plugin"
NBDKIT = "nbdkit-python"
MEM1 = "pynbd-memory-w1"
MEMD = "pynbd-memory-default"


@dataclass
class Peer:
    """A server under test: ``argv`` listening on ``port`` (0: a ``pynbd serve`` that
    picks its own and prints its URI)."""

    name: str
    argv: list[str]
    port: int
    proc: Process | None = None
    uri: str = ""

    def start(self) -> None:
        self.proc = Process(self.argv, name=self.name, new_session=True, stop_timeout=15.0)
        if self.port == 0:  # pynbd: the URI is the first line on stdout
            self.uri = self.proc.first_line().strip()
            self.port = int(self.uri.split("/")[2].rsplit(":", 1)[1])
        else:
            self.uri = f"nbd://127.0.0.1:{self.port}/"
        self.proc.wait_for(lambda: port_open("127.0.0.1", self.port), "a listening port")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (through /proc/PID/task/TID/children)."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    out.extend(int(c) for c in f.read().split())
            except OSError:
                pass
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (utime + stime) of every process in the tree, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[p] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(p, 0.0) for p, v in after.items())


def fio(uri: str, rw: str, jobs: int, runtime: float, size: int) -> float:
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            "--iodepth=32", f"--numjobs={jobs}", "--group_reporting", f"--size={size}",
            "--time_based", f"--runtime={runtime:g}", "--ramp_time=1", "--norandommap",
            "--randrepeat=0", "--output-format=json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return float(side["iops"])


@dataclass
class Cell:
    iops: list[float] = field(default_factory=list)
    us: list[float] = field(default_factory=list)

    @property
    def med_iops(self) -> float:
        return statistics.median(self.iops) if self.iops else float("nan")

    @property
    def med_us(self) -> float:
        return statistics.median(self.us) if self.us else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "-"


def render(cells: dict[tuple[str, str], Cell], names: list[str],
           args: argparse.Namespace) -> str:
    lines = ["| workload | " + " | ".join(f"{n} IOPS" for n in names)
             + " | plugin/nbdkit | plugin/memory-w1 | plugin/memory-default |",
             "|---" * (len(names) + 4) + "|"]
    for w, _rw, _jobs in WORKLOADS:
        c = {n: cells.get((w, n), Cell()) for n in names}
        row = [w, *[f"{c[n].med_iops:,.0f}" for n in names]]
        p = c[PLUGIN].med_iops
        row += [ratio(p, c[NBDKIT].med_iops) if NBDKIT in c else "-",
                ratio(p, c[MEM1].med_iops) if MEM1 in c else "-",
                ratio(p, c[MEMD].med_iops) if MEMD in c else "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Server CPU per request (user + system time of the server's process tree "
              "/ requests; lower is better):", "",
              "| workload | " + " | ".join(f"{n} CPU us/op" for n in names)
              + " | nbdkit/plugin CPU |", "|---" * (len(names) + 2) + "|"]
    for w, _rw, _jobs in WORKLOADS:
        c = {n: cells.get((w, n), Cell()) for n in names}
        row = [w, *[f"{c[n].med_us:,.1f}" for n in names]]
        row.append(ratio(c[NBDKIT].med_us, c[PLUGIN].med_us) if NBDKIT in c else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}; {args.runtime:g} s per cell (+1 s ramp), "
                 f"disk {args.size}, {args.repeat} round(s), median; targets: plugin/nbdkit "
                 ">= 3x, plugin/memory-w1 >= 0.8x.")
    return "\n".join(lines)


def profile(peer: Peer, seconds: float, size: int, out: Path) -> str:
    """py-spy the pynbd plugin server (all its processes) under 4 KiB random writes."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert peer.proc is not None
    # --gil: only samples holding the GIL, i.e. Python running (not waiting in epoll)
    prof = subprocess.Popen([pyspy, "record", "--pid", str(peer.proc.pid), "--subprocesses",
                             "--gil", "--rate", "250", "--duration", f"{seconds:g}",
                             "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        fio(peer.uri, "randwrite", 1, seconds, size)
        fio(peer.uri, "randread", 1, 2, size)
    finally:
        try:
            prof.wait(seconds + 60)
        except subprocess.TimeoutExpired:
            prof.kill()
            prof.wait()
    if not out.exists():
        err = prof.stderr.read().decode() if prof.stderr else ""
        return f"py-spy produced nothing: {err.strip()[-300:]}"
    # leaf frames (where the time is spent), and the lines of the plugin file itself
    leaf: dict[str, int] = {}
    mine: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + count
        for fr in frames:
            if "ramdisk.py" in fr:
                mine[fr] = mine.get(fr, 0) + count
    top = sorted(leaf.items(), key=lambda kv: -kv[1])[:15]
    text = [f"py-spy: {total} samples; leaf frames (self time):"]
    text += [f"  {100 * c / total:5.1f}%  {f}" for f, c in top]
    text += ["frames in the plugin (total time, incl. callees):"]
    text += [f"  {100 * c / total:5.1f}%  {f}"
             for f, c in sorted(mine.items(), key=lambda kv: -kv[1])[:6]]
    return "\n".join(text)


def main() -> int:  # noqa: C901 - a benchmark driver: options, then one table of cells
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per cell (default 5)")
    ap.add_argument("--size", default="256M", help="disk size (default 256M)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    ap.add_argument("--servers", default=f"{PLUGIN},{NBDKIT},{MEM1},{MEMD}",
                    help="comma-separated subset")
    ap.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                    help="afterwards, py-spy the pynbd plugin server for this long")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="interpreter that runs pynbd")
    args = ap.parse_args()
    size = parse_size(args.size)
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    py = args.python if Path(args.python).exists() else sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-plugins-"))
    nbdkit_plugin = tmp / "ramdisk_nbdkit.py"
    nbdkit_plugin.write_text(NBDKIT_RAMDISK)
    pynbd = pynbd_argv("serve", "--bind", "127.0.0.1", "--port", "0", "-q", python=py)
    peers: list[Peer] = []
    for name in args.servers.split(","):
        if name == PLUGIN:
            peers.append(Peer(name, [*pynbd, f"python:{REPO / 'examples/plugins/ramdisk.py'}",
                                     f"size={size}"], 0))
        elif name == NBDKIT:
            port = free_port()
            peers.append(Peer(name, ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                                     "python", str(nbdkit_plugin), f"size={size}"], port))
        elif name == MEM1:
            peers.append(Peer(name, [*pynbd, "--workers", "1", f"memory:{size}"], 0))
        elif name == MEMD:
            peers.append(Peer(name, [*pynbd, f"memory:{size}"], 0))
        else:
            ap.error(f"unknown server {name}")
    cells: dict[tuple[str, str], Cell] = {}
    prof_text = ""
    try:
        for p in peers:
            p.start()
        for _round in range(args.repeat):
            for wname, rw, jobs in WORKLOADS:
                for p in peers:
                    assert p.proc is not None
                    c0 = tree_cpu(p.proc.pid)
                    t0 = time.perf_counter()
                    try:
                        iops = fio(p.uri, rw, jobs, args.runtime, size)
                    except Exception as exc:  # keep the other cells
                        print(f"{wname} / {p.name}: {exc}", file=sys.stderr)
                        continue
                    cpu = cpu_used(c0, tree_cpu(p.proc.pid))
                    ops = iops * (time.perf_counter() - t0 - 1.0)  # ramp time: ~same rate
                    us = cpu / ops * 1e6 if ops > 0 else float("nan")
                    cell = cells.setdefault((wname, p.name), Cell())
                    cell.iops.append(iops)
                    cell.us.append(us)
                    print(f"  {wname:22} {p.name:22} {iops:10,.0f} IOPS {us:8.1f} "
                          "server-CPU-us/op", file=sys.stderr, flush=True)
        if args.profile > 0:
            plugin_peer = next((p for p in peers if p.name == PLUGIN), None)
            if plugin_peer is not None:
                prof_text = profile(plugin_peer, args.profile, size, tmp / "profile.txt")
    finally:
        for p in peers:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(render(cells, [p.name for p in peers], args))
    if prof_text:
        print("\n" + prof_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
