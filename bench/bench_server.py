#!/usr/bin/env python3
"""Benchmark ``pynbd serve`` side by side with nbdkit (file and python plugins) and
qemu-nbd, in one run, with the same fio and nbdcopy workloads.

    .venv/bin/python bench/bench_server.py [--runtime 5] [--size 512M] [--repeat 3]
        [--servers pynbd,pynbd-w1,nbdkit-file,nbdkit-python,qemu-nbd]
        [--group all|single|multi] [--workloads SUBSTR,...] [--markdown FILE]

Servers: ``pynbd`` is ``pynbd serve`` with its default worker processes (one per CPU),
``pynbd-wN`` the same with ``--workers N`` (``pynbd-w1``: one process); all serve the
same fully written raw image on TCP loopback.

Workloads (fio's nbd engine: one NBD connection per fio job; time based, no ramp):
  single connection: seq read / seq write 1 MiB QD8, rand read 4 KiB QD1 and QD32,
    rand write 4 KiB QD32, whole-export nbdcopy to null: (``--connections 1``),
    connections/s (one client: open + greeting + GO + DISC + close);
  several connections (fio ``numjobs`` with ``--group_reporting``): 4 x QD16 4 KiB rand
    read and rand write, 16 x QD4 4 KiB rand read and rand write, 4 x QD8 1 MiB seq read
    and seq write (each job on its own quarter of the image), nbdcopy to null: with
    ``--connections 4 --threads 4`` (nbdcopy caps connections at its thread count, which
    defaults to the CPU count), connections/s with 4 client processes.
The clients (fio, nbdcopy, the connection loop) run in sessions of their own: with the
kernel's autogroup scheduling each session is one CPU-share group, so the server under
test and its 4-16 client processes get separate shares (as on separate machines)
instead of the server's share depending on how many threads it has against the clients'.
Prints IOPS / MiB/s / connections/s, the server's CPU time per operation (user + system
time of the server process and every descendant, e.g. pynbd's worker processes),
how many CPUs the server kept busy and how long its threads waited for a CPU (a loaded
machine starves single-threaded event loops first), and pynbd/peer ratios; ``--markdown``
writes the tables between the markers in FILE.
Needs: fio, nbdcopy + nbdinfo (libnbd-bin), nbdkit + nbdkit-plugin-python, qemu-nbd.
This is a script, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO))

from tests.support.images import make_image  # noqa: E402
from tests.support.nbd_magic import IHAVEOPT, REQUEST_MAGIC  # noqa: E402
from tests.support.nbd_servers import (  # noqa: E402
    Server,
    require,
    start_nbdkit,
    start_pynbd,
    start_qemu_nbd,
)

from pynbd.util.sizes import parse_size  # noqa: E402

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

PYTHON_PLUGIN = '''\
import os
import nbdkit

API_VERSION = 2
path = None


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    global path
    if key == "file":
        path = value


def open(readonly):
    return os.open(path, os.O_RDONLY if readonly else os.O_RDWR)


def get_size(h):
    return os.fstat(h).st_size


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    buf[:] = os.pread(h, len(buf), offset)


def pwrite(h, buf, offset, flags):
    os.pwrite(h, buf, offset)


def flush(h, flags):
    os.fdatasync(h)


def close(h):
    os.close(h)
'''


# --- server CPU: the process and all its descendants --------------------------------

def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (pynbd's supervisor and its workers)."""
    seen: list[int] = []
    todo = [pid]
    while todo and len(seen) < 4096:  # bounded: a server has a handful of processes
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo += _children(p)
    return seen


def _stat_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of one process (all its threads, plus children it
    has reaped), in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a server: the process, its live descendants, and (through
    cutime/cstime) descendants already reaped, e.g. a replaced worker."""
    return sum(_stat_cpu(p) for p in process_tree(pid))


def _task_waits(pid: int) -> dict[int, int]:
    """Run-queue wait (ns) of every thread of ``pid`` and its descendants."""
    out: dict[int, int] = {}
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    out[int(tid)] = int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


class WaitSampler:
    """Seconds a server's threads spent runnable but waiting for a CPU during a cell
    (schedstat's run_delay). Threads are sampled every ``interval`` seconds so that
    threads that start and end within the cell (nbdkit's per-connection threads) are
    counted up to their last sample."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.base = _task_waits(pid)
        self.last = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.last.update(_task_waits(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.last.update(_task_waits(self.pid))
        return sum(v - self.base.get(t, 0) for t, v in self.last.items()) / 1e9


# --- servers ------------------------------------------------------------------------

@dataclass
class Peer:
    name: str
    start_fn: Callable[[], Server]
    srv: Server | None = None
    multi_conn: str = "?"

    @property
    def uri(self) -> str:
        assert self.srv is not None
        return self.srv.uri()

    @property
    def port(self) -> int:
        assert self.srv is not None and self.srv.port is not None
        return self.srv.port

    @property
    def pid(self) -> int:
        assert self.srv is not None
        return self.srv.proc.pid

    def start(self) -> None:
        self.srv = self.start_fn()
        p = subprocess.run(["nbdinfo", "--json", "--no-content", self.uri],
                           capture_output=True, text=True, timeout=60, check=False)
        if p.returncode == 0:
            exports = json.loads(p.stdout).get("exports") or [{}]
            self.multi_conn = "yes" if exports[0].get("can_multi_conn") else "no"

    def stop(self) -> None:
        if self.srv is not None:
            self.srv.stop()


def make_peers(names: list[str], img: Path, tmp: Path) -> list[Peer]:
    plugin = tmp / "fileplugin.py"
    plugin.write_text(PYTHON_PLUGIN)
    peers: list[Peer] = []
    for name in names:
        wd = tmp / name
        m = re.fullmatch(r"pynbd(?:-w(\d+))?", name)
        if m:
            extra = ["-q"] + (["--workers", m.group(1)] if m.group(1) else [])
            peers.append(Peer(name, partial(start_pynbd, wd, str(img), extra=extra)))
        elif name == "nbdkit-file":
            peers.append(Peer(name, partial(start_nbdkit, wd, "file", [str(img)])))
        elif name == "nbdkit-python":
            peers.append(Peer(name, partial(start_nbdkit, wd, "python",
                                            [str(plugin), f"file={img}"])))
        elif name == "qemu-nbd":
            # 32 shared clients: room for the 16-connection rows plus stragglers
            peers.append(Peer(name, partial(start_qemu_nbd, wd, img, shared=32)))
        else:
            raise ValueError(f"unknown server {name!r} (pynbd, pynbd-wN, nbdkit-file, "
                             "nbdkit-python, qemu-nbd)")
    return peers


# --- workloads ----------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    group: str  # "single" or "multi"
    kind: str  # "fio", "nbdcopy", "conns"
    rw: str = ""
    bs: str = ""
    qd: int = 1
    jobs: int = 1  # fio jobs / nbdcopy connections / client processes

    @property
    def unit(self) -> str:
        if self.kind == "conns":
            return "conn/s"
        if self.kind == "fio" and self.bs == "4k":
            return "IOPS"
        return "MiB/s"

    @property
    def op(self) -> str:
        return {"IOPS": "request", "MiB/s": "MiB", "conn/s": "connection"}[self.unit]


WORKLOADS: list[Workload] = [
    Workload("seq read 1M QD8", "single", "fio", "read", "1m", 8),
    Workload("seq write 1M QD8", "single", "fio", "write", "1m", 8),
    Workload("rand read 4K QD1", "single", "fio", "randread", "4k", 1),
    Workload("rand read 4K QD32", "single", "fio", "randread", "4k", 32),
    Workload("rand write 4K QD32", "single", "fio", "randwrite", "4k", 32),
    Workload("nbdcopy export->null", "single", "nbdcopy"),
    Workload("connections/s", "single", "conns"),
    Workload("rand read 4K 4x QD16", "multi", "fio", "randread", "4k", 16, 4),
    Workload("rand write 4K 4x QD16", "multi", "fio", "randwrite", "4k", 16, 4),
    Workload("rand read 4K 16x QD4", "multi", "fio", "randread", "4k", 4, 16),
    Workload("rand write 4K 16x QD4", "multi", "fio", "randwrite", "4k", 4, 16),
    Workload("seq read 1M 4x QD8", "multi", "fio", "read", "1m", 8, 4),
    Workload("seq write 1M 4x QD8", "multi", "fio", "write", "1m", 8, 4),
    Workload("nbdcopy export->null 4 conns", "multi", "nbdcopy", jobs=4),
    Workload("connections/s 4 clients", "multi", "conns", jobs=4),
]

# multi-connection rows compared with pynbd's own single-connection rate
SCALING = [("rand read 4K 4x QD16", "rand read 4K QD32"),
           ("rand write 4K 4x QD16", "rand write 4K QD32"),
           ("rand read 4K 16x QD4", "rand read 4K QD32"),
           ("rand write 4K 16x QD4", "rand write 4K QD32")]


def autogroup() -> str:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return "on" if f.read().strip() == "1" else "off"
    except OSError:
        return "unknown"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # run the cleanup: stop the servers


def run_fio(uri: str, w: Workload, runtime: float, size: int) -> tuple[float, float]:
    """(value in w.unit, operations completed)."""
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
            f"--bs={w.bs}", f"--iodepth={w.qd}", "--time_based", f"--runtime={runtime:g}",
            "--norandommap", "--randrepeat=0", "--output-format=json"]
    if w.jobs > 1:
        argv += [f"--numjobs={w.jobs}", "--group_reporting"]
        if w.rw in ("read", "write"):  # sequential: each job streams its own region
            part = size // w.jobs
            argv += [f"--size={part}", f"--offset_increment={part}"]
        else:
            argv.append(f"--size={size}")
    else:
        argv.append(f"--size={size}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120,
                       check=False, start_new_session=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    jobs = json.loads(p.stdout[p.stdout.index("{"):])["jobs"]
    side = [j["read"] if "read" in w.rw else j["write"] for j in jobs]
    iops = sum(s["iops"] for s in side)
    ios = sum(s["total_ios"] for s in side)
    if w.unit == "IOPS":
        return iops, ios
    mib = sum(s["bw_bytes"] for s in side) / MiB
    return mib, sum(s["io_bytes"] for s in side) / MiB


def run_nbdcopy(uri: str, w: Workload, size: int, runtime: float) -> tuple[float, float]:
    rates = []
    argv = ["nbdcopy", f"--connections={w.jobs}", f"--threads={w.jobs}", uri, "null:"]
    deadline = time.monotonic() + runtime
    for _ in range(50):
        t0 = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False,
                           start_new_session=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"nbdcopy failed: {p.stderr.strip()[-500:]}")
        rates.append(size / MiB / dt)
        if time.monotonic() > deadline and len(rates) >= 3:
            break
    return statistics.median(rates), len(rates) * size / MiB


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise RuntimeError("server closed the connection during the handshake")
        buf += chunk
    return buf


def handshake_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _recv_exact(s, 18)  # NBDMAGIC, IHAVEOPT, handshake flags
        # client flags FIXED_NEWSTYLE|NO_ZEROES, then NBD_OPT_GO (7) for export "" with
        # no info requests
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 6)
                  + struct.pack(">IH", 0, 0))
        while True:  # option replies until NBD_REP_ACK (1) or an error
            _, _, rep, length = struct.unpack(">QIII", _recv_exact(s, 20))
            _recv_exact(s, length)
            if rep == 1:
                break
            if rep & (1 << 31):
                raise RuntimeError(f"GO refused: 0x{rep:x}")
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 0, 0, 0))  # NBD_CMD_DISC


def _conns_loop(port: int, runtime: float) -> tuple[int, int, str]:
    """(handshakes completed, handshakes that failed, the first failure)."""
    ok = failed = 0
    first = ""
    end = time.perf_counter() + runtime
    while time.perf_counter() < end and failed < 1000:
        try:
            handshake_once(port)
            ok += 1
        except (OSError, RuntimeError) as exc:  # refused or dropped: count it, go on
            failed += 1
            first = first or str(exc)
    return ok, failed, first


def _client_init() -> None:
    os.setsid()  # a CPU-share group of its own (see the module docstring)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up


def run_conns(port: int, w: Workload, runtime: float) -> tuple[float, float, str]:
    pool = multiprocessing.get_context("fork").Pool(w.jobs, initializer=_client_init)
    try:
        t0 = time.perf_counter()
        res = pool.starmap(_conns_loop, [(port, runtime)] * w.jobs)
        dt = time.perf_counter() - t0
    finally:
        pool.close()
        pool.join()
    ok = sum(r[0] for r in res)
    failed = sum(r[1] for r in res)
    note = ""
    if failed:
        first = next(r[2] for r in res if r[2])
        note = f"{failed} of {ok + failed} handshakes failed ({first})"
    return ok / dt, ok, note


# --- results and tables ---------------------------------------------------------------

@dataclass
class Cell:
    #: (value, CPU us/op, CPUs busy, CPUs' worth of run-queue wait)
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)

    def _median(self, i: int) -> float:
        ok = [s[i] for s in self.samples if s[0] == s[0] and s[i] == s[i]]  # not NaN
        return statistics.median(ok) if ok else float("nan")

    @property
    def value(self) -> float:
        return self._median(0)

    @property
    def us_per_op(self) -> float:
        return self._median(1)

    @property
    def busy(self) -> float:
        return self._median(2)

    @property
    def waiting(self) -> float:
        return self._median(3)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or a != a or b != b:
        return "-"
    return f"{a / b:.2f}x"


def _fmt(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def render(group: str, selected: list[Workload], names: list[str],
           results: dict[tuple[str, str], Cell], info: str) -> str:
    rows = [w for w in selected if w.group == group]
    ours = [n for n in names if n.startswith("pynbd")]
    others = [n for n in names if not n.startswith("pynbd")]
    pairs = [(a, b) for a in ours for b in others]

    def get(w: str, n: str) -> Cell | None:
        return results.get((w, n))

    out = ["| workload | unit | " + " | ".join(names)
           + "".join(f" | {a}/{b}" for a, b in pairs) + " |",
           "|" + "---|" * (2 + len(names) + len(pairs))]
    for w in rows:
        vals = {n: (c.value if (c := get(w.name, n)) else None) for n in names}
        out.append(_row([w.name, w.unit, *[_fmt(vals[n]) for n in names],
                         *[_ratio(vals[a], vals[b]) for a, b in pairs]]))
    out += ["", "Server CPU per operation in microseconds (user + system time of the server "
            "process and all its descendants, divided by requests for 4K rows, MiB for 1M "
            "and nbdcopy rows, connections for connections/s; lower is better):", ""]
    out += ["| workload | per | " + " | ".join(names)
            + "".join(f" | {a}/{b}" for a, b in pairs) + " |",
            "|" + "---|" * (2 + len(names) + len(pairs))]
    for w in rows:
        cpu = {n: (c.us_per_op if (c := get(w.name, n)) else None) for n in names}
        out.append(_row([w.name, w.op, *[_fmt(cpu[n], 1) for n in names],
                         *[_ratio(cpu[a], cpu[b]) for a, b in pairs]]))
    out += ["", "Server CPUs busy (CPU seconds / wall seconds of the cell) / CPUs' worth of "
            "time its threads spent runnable but waiting for a CPU (run-queue wait from "
            "schedstat, threads sampled every 0.25 s). A server that is not busy and not "
            "waiting is waiting for its clients:", ""]
    out += ["| workload | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for w in rows:
        cells = []
        for n in names:
            c = get(w.name, n)
            cells.append(f"{c.busy:.2f} / {c.waiting:.2f}" if c else "-")
        out.append(_row([w.name, *cells]))
    if group == "multi":
        scal = [(m, s) for m, s in SCALING
                if any(get(m, n) and get(s, n) for n in names)]
        if scal:
            out += ["", "Scaling: the multi-connection rate over the same server's "
                    "single-connection QD32 rate in this run (>= 1.00x: more connections "
                    "do not cost throughput):", ""]
            out += ["| rows | " + " | ".join(names) + " |",
                    "|" + "---|" * (1 + len(names))]
            for m, s in scal:
                cells = []
                for n in names:
                    cm, cs = get(m, n), get(s, n)
                    cells.append(_ratio(cm.value if cm else None, cs.value if cs else None))
                out.append(_row([f"{m} / {s.split(' ', 3)[-1]}", *cells]))
    return "\n".join(out) + "\n\n" + info


MARKERS = {
    "single": ("<!-- bench_server:begin -->", "<!-- bench_server:end -->"),
    "multi": ("<!-- bench_server_multi:begin -->", "<!-- bench_server_multi:end -->"),
}


def write_markdown(path: Path, tables: dict[str, str]) -> None:
    """Replace the text between each group's markers in ``path``; a group whose markers
    are missing goes after the previous group's block (or at the end of the file). Text
    outside the markers is kept as it is."""
    text = path.read_text() if path.exists() else ""
    prev_end: str | None = None
    for group, (begin, end) in MARKERS.items():
        if group in tables:
            block = f"{begin}\n{tables[group]}\n{end}"
            if begin in text and end in text:
                head, rest = text.split(begin, 1)
                text = head + block + rest.split(end, 1)[1]
            elif prev_end is not None and prev_end in text:
                head, rest = text.split(prev_end, 1)
                text = head + prev_end + "\n\n" + block + rest
            else:
                text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
        prev_end = end
    path.write_text(text)


def main() -> int:  # noqa: C901 - a benchmark driver: options, then one table of cells
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per cell (default 5)")
    ap.add_argument("--size", default="512M", help="image size (default 512M)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    ap.add_argument("--servers", default="pynbd,pynbd-w1,nbdkit-file,nbdkit-python,qemu-nbd",
                    help="comma-separated subset (pynbd-wN: pynbd serve --workers N)")
    ap.add_argument("--group", choices=("all", "single", "multi"), default="all",
                    help="single-connection rows, multi-connection rows, or both")
    ap.add_argument("--workloads", default="",
                    help="comma-separated substrings of workload names to select")
    ap.add_argument("--markdown", metavar="FILE",
                    help="also write the tables between the bench_server markers in FILE")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    size = parse_size(args.size)
    for tool in ("fio", "nbdcopy", "nbdinfo", "nbdkit", "qemu-nbd"):
        require(tool)
    selected = [w for w in WORKLOADS
                if args.group in ("all", w.group)
                and (not args.workloads or any(s in w.name for s in args.workloads.split(",")))]
    if not selected:
        ap.error("no workload selected")
    names = [n for n in args.servers.split(",") if n]
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-"))
    img = tmp / "disk.img"
    try:
        peers = make_peers(names, img, tmp)
    except ValueError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        ap.error(str(exc))
    results: dict[tuple[str, str], Cell] = {}
    loads: list[float] = []
    notes: list[str] = []
    try:
        make_image(img, size, fill=True, seed=1)  # every byte data: no holes to skip
        for p in peers:
            p.start()
            print(f"{p.name}: {p.uri} pid {p.pid}, processes {len(process_tree(p.pid))}, "
                  f"multi-conn {p.multi_conn}", file=sys.stderr, flush=True)
        for rnd in range(args.repeat):
            order = peers[rnd % len(peers):] + peers[:rnd % len(peers)]
            for w in selected:
                for p in order:
                    load = os.getloadavg()[0]
                    loads.append(load)
                    cpu0, sampler = tree_cpu_seconds(p.pid), WaitSampler(p.pid)
                    t0 = time.perf_counter()
                    note = ""
                    try:
                        if w.kind == "fio":
                            value, ops = run_fio(p.uri, w, args.runtime, size)
                        elif w.kind == "nbdcopy":
                            value, ops = run_nbdcopy(p.uri, w, size, args.runtime)
                        else:
                            value, ops, note = run_conns(p.port, w, args.runtime)
                    except Exception as exc:  # keep the other cells
                        note = f"failed: {exc}"
                        value, ops = float("nan"), float("nan")
                    if note:
                        notes.append(f"round {rnd + 1}, {w.name}, {p.name}: {note}")
                        print(f"  {notes[-1]}", file=sys.stderr)
                        assert p.srv is not None
                        for line in p.srv.logs().splitlines()[-3:]:
                            print(f"    {p.name} log: {line}", file=sys.stderr)
                    cpu = tree_cpu_seconds(p.pid) - cpu0
                    wall = time.perf_counter() - t0
                    wait = sampler.stop()
                    us = cpu / ops * 1e6 if ops > 0 else float("nan")
                    results.setdefault((w.name, p.name), Cell()).samples.append(
                        (value, us, cpu / wall, wait / wall))
                    print(f"  [{rnd + 1}/{args.repeat} load {load:4.1f}] {w.name:28} "
                          f"{p.name:14} {value:10,.0f} {w.unit:6} {us:9.1f} us/{w.op}  "
                          f"server busy {cpu / wall:4.2f} CPUs, waiting for a CPU "
                          f"{wait / wall:4.2f}",
                          file=sys.stderr, flush=True)
    finally:
        for p in peers:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ncpu = os.cpu_count()
    mc = ", ".join(f"{p.name} {p.multi_conn}" for p in peers)
    info = (f"{platform.node()} {platform.machine()}, {ncpu} CPUs, Python "
            f"{platform.python_version()}; {args.runtime:g} s per cell, image {args.size}, "
            f"{args.repeat} round(s), median; 1-min load average at the start of each cell "
            f"(includes the benchmark itself) {min(loads):.1f}-{statistics.median(loads):.1f}"
            f"-{max(loads):.1f} (min-median-max); scheduler autogroup {autogroup()}, clients in "
            f"their own sessions; {time.strftime('%Y-%m-%d')}. pynbd: "
            f"default workers (one per CPU); pynbd-wN: --workers N. Advertises multi-conn: "
            f"{mc}. nbdcopy: MiB/s of a whole-export copy to null:. connections/s: open + "
            "greeting + GO + DISC + close, raw-socket Python client(s); failed cells are "
            "left out of the medians.")
    if notes:
        info += " Problems: " + "; ".join(notes) + "."
    tables = {g: render(g, selected, names, results, info)
              for g in MARKERS if any(w.group == g for w in selected)}
    for g, t in tables.items():
        print(f"\n{'Single connection' if g == 'single' else 'Several connections'}\n")
        print(t)
    if args.markdown:
        write_markdown(Path(args.markdown), tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
