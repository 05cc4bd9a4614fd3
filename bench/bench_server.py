#!/usr/bin/env python3
"""Benchmark ``pynbd serve`` side by side with nbdkit (file and python plugins) and
qemu-nbd, in one run, with the same fio and nbdcopy workloads.

    .venv/bin/python bench/bench_server.py [--runtime 5] [--size 512M] [--markdown FILE]

Workloads (one TCP loopback connection per fio job, fio's nbd engine):
  seq read / seq write 1 MiB QD8, rand read 4 KiB QD1 and QD32, rand write 4 KiB QD32,
  whole-export nbdcopy (export -> null:), connections/s (open + handshake + GO + DISC +
  close, a raw-socket Python client in a loop).
Prints a table of MiB/s, IOPS and the ratio pynbd/peer; ``--markdown`` writes it too.
Needs: fio, nbdcopy (libnbd-bin), nbdkit + nbdkit-plugin-python, qemu-nbd (qemu-utils).
This is a script, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from pynbd.util.sizes import parse_size  # noqa: E402

MiB = 1024 * 1024

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early (rc={proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(18)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


@dataclass
class Peer:
    name: str
    argv: list[str]
    port: int
    proc: subprocess.Popen[bytes] | None = None
    uri: str = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        if self.port == 0:  # pynbd: the URI is the first line on stdout
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode().strip()
            if not line:
                raise RuntimeError(f"{self.name}: no URI printed")
            self.uri = line
            self.port = int(line.split("/")[2].rsplit(":", 1)[1])
        else:
            self.uri = f"nbd://127.0.0.1:{self.port}/"
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return float("nan")


@dataclass
class Result:
    mib_s: float = 0.0
    iops: float = 0.0
    us_per_op: float = 0.0
    samples: list[tuple[float, float, float]] = field(default_factory=list)


def fio(uri: str, rw: str, bs: str, qd: int, runtime: float, size: int) -> tuple[float, float]:
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--size={size}", "--time_based", f"--runtime={runtime:g}",
            "--ramp_time=1", "--norandommap", "--randrepeat=0", "--output-format=json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / MiB, side["iops"]


def nbdcopy(uri: str, size: int, runtime: float) -> tuple[float, float]:
    rates = []
    deadline = time.monotonic() + runtime
    for _ in range(50):
        t0 = time.perf_counter()
        p = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, text=True,
                           timeout=300)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"nbdcopy failed: {p.stderr.strip()[-500:]}")
        rates.append(size / MiB / dt)
        if time.monotonic() > deadline and len(rates) >= 3:
            break
    mib = statistics.median(rates)
    return mib, mib  # one "op" per MiB: IOPS column shows MiB/s for this row


def handshake_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while len(buf) < 18:
            chunk = s.recv(18 - len(buf))
            if not chunk:
                raise RuntimeError("closed in greeting")
            buf += chunk
        s.sendall(struct.pack(">I", 3)
                  + struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
        # read option replies until ACK (1) or an error
        pending = b""
        while True:
            while len(pending) < 20:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("closed during GO")
                pending += chunk
            _, _, rep, length = struct.unpack(">QIII", pending[:20])
            while len(pending) < 20 + length:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError("closed during GO")
                pending += chunk
            pending = pending[20 + length:]
            if rep == 1:
                break
            if rep & (1 << 31):
                raise RuntimeError(f"GO refused: 0x{rep:x}")
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC


def conns_per_s(port: int, runtime: float) -> tuple[float, float]:
    n = 0
    t0 = time.perf_counter()
    end = t0 + runtime
    while time.perf_counter() < end:
        handshake_once(port)
        n += 1
    rate = n / (time.perf_counter() - t0)
    return 0.0, rate


WORKLOADS: list[tuple[str, str, tuple[str, str, int] | tuple[()]]] = [
    ("seq read 1M QD8", "fio", ("read", "1m", 8)),
    ("seq write 1M QD8", "fio", ("write", "1m", 8)),
    ("rand read 4K QD1", "fio", ("randread", "4k", 1)),
    ("rand read 4K QD32", "fio", ("randread", "4k", 32)),
    ("rand write 4K QD32", "fio", ("randwrite", "4k", 32)),
    ("nbdcopy export->null", "nbdcopy", ()),
    ("connections/s", "conns", ()),
]


def main() -> int:  # noqa: C901 - a benchmark driver: options, then one table of cells
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per cell (default 5)")
    ap.add_argument("--size", default="512M", help="image size (default 512M)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds; the median is reported")
    ap.add_argument("--servers", default="pynbd,nbdkit-file,nbdkit-python,qemu-nbd",
                    help="comma-separated subset")
    ap.add_argument("--workloads", default="", help="comma-separated substrings to select")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table here")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"),
                    help="interpreter that runs pynbd")
    args = ap.parse_args()
    size = parse_size(args.size)
    for tool in ("fio", "nbdcopy", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"missing tool: {tool}", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-"))
    img = tmp / "disk.img"
    block = os.urandom(MiB)
    with open(img, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
    plugin = tmp / "fileplugin.py"
    plugin.write_text(PYTHON_PLUGIN)
    env_py = args.python if Path(args.python).exists() else sys.executable
    wanted = args.servers.split(",")
    peers: list[Peer] = []
    for name in wanted:
        if name == "pynbd":
            peers.append(Peer(name, [env_py, "-m", "pynbd", "serve", "--bind", "127.0.0.1",
                                     "--port", "0", "-q", str(img)], 0))
        elif name == "nbdkit-file":
            port = free_port()
            peers.append(Peer(name, ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                                     "file", str(img)], port))
        elif name == "nbdkit-python":
            port = free_port()
            peers.append(Peer(name, ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                                     "python", str(plugin), f"file={img}"], port))
        elif name == "qemu-nbd":
            port = free_port()
            peers.append(Peer(name, ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p",
                                     str(port), "-t", "-e", "16", "-x", "", str(img)], port))
        else:
            ap.error(f"unknown server {name}")
    env = os.environ.copy()
    env["PYTHONPATH"] = str(REPO / "src")
    os.environ.update(env)
    selected = [w for w in WORKLOADS
                if not args.workloads or any(s in w[0] for s in args.workloads.split(","))]
    results: dict[tuple[str, str], Result] = {}
    try:
        for p in peers:
            p.start()
        for _round in range(args.repeat):
            for wname, kind, params in selected:
                for p in peers:
                    assert p.proc is not None
                    cpu0, t0 = cpu_seconds(p.proc.pid), time.perf_counter()
                    try:
                        if kind == "fio":
                            assert len(params) == 3
                            rw, bs, qd = params
                            mib, iops = fio(p.uri, rw, bs, qd, args.runtime, size)
                        elif kind == "nbdcopy":
                            mib, iops = nbdcopy(p.uri, size, args.runtime)
                        else:
                            mib, iops = conns_per_s(p.port, args.runtime)
                    except Exception as exc:  # keep the other cells
                        print(f"{wname} / {p.name}: {exc}", file=sys.stderr)
                        mib, iops = float("nan"), float("nan")
                    cpu = cpu_seconds(p.proc.pid) - cpu0
                    ops = iops * (time.perf_counter() - t0 - (1 if kind == "fio" else 0))
                    us = cpu / ops * 1e6 if ops > 0 else float("nan")
                    r = results.setdefault((wname, p.name), Result())
                    r.samples.append((mib, iops, us))
                    print(f"  {wname:22} {p.name:14} {mib:10.1f} MiB/s {iops:12.0f} IOPS"
                          f" {us:9.1f} server-CPU-us/op", file=sys.stderr, flush=True)
    finally:
        for p in peers:
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results.values():
        r.mib_s = statistics.median(s[0] for s in r.samples)
        r.iops = statistics.median(s[1] for s in r.samples)
        r.us_per_op = statistics.median(s[2] for s in r.samples)
    table = render(selected, peers, results, args)
    print(table)
    if args.markdown:
        write_markdown(Path(args.markdown), table)
    return 0


BEGIN, END = "<!-- bench_server:begin -->", "<!-- bench_server:end -->"


def write_markdown(path: Path, table: str) -> None:
    """Replace the text between the bench markers in ``path`` (or write the file)."""
    block = f"{BEGIN}\n{table}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = (text + "\n" if text else "") + block + "\n"
    path.write_text(text)


def render(selected: list[tuple[str, str, tuple[str, str, int] | tuple[()]]], peers: list[Peer],
           results: dict[tuple[str, str], Result], args: argparse.Namespace) -> str:
    names = [p.name for p in peers]
    others = [n for n in names if n != "pynbd"]
    head = ["workload"]
    for n in names:
        head.append(f"{n} MiB/s" if True else n)
        head.append(f"{n} IOPS")
    head += [f"pynbd/{n}" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wname, kind, _ in selected:
        row = [wname]
        for n in names:
            r = results.get((wname, n)) or Result(float("nan"), float("nan"))
            row.append("-" if kind == "conns" else f"{r.mib_s:,.0f}")
            row.append(f"{r.iops:,.0f}" if kind != "nbdcopy" else "-")
        base = results.get((wname, "pynbd"))
        for n in others:
            peer = results.get((wname, n))
            if base is None or peer is None:
                row.append("-")
                continue
            a, b = (base.iops, peer.iops) if kind == "conns" else (base.mib_s, peer.mib_s)
            row.append(f"{a / b:.2f}x" if b and b == b and a == a else "-")
        lines.append("| " + " | ".join(row) + " |")
    # server CPU per operation: stable even when wall-clock numbers are noisy
    lines += ["", "Server CPU per operation (user + system time of the server process divided "
              "by operations; lower is better):", ""]
    head = ["workload", *[f"{n} CPU us/op" for n in names],
            *[f"pynbd/{n} CPU" for n in others]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for wname, _kind, _ in selected:
        row = [wname]
        for n in names:
            cell = results.get((wname, n))
            row.append(f"{cell.us_per_op:,.1f}" if cell is not None else "-")
        base = results.get((wname, "pynbd"))
        for n in others:
            peer = results.get((wname, n))
            ok = base is not None and peer is not None and peer.us_per_op > 0
            row.append(f"{base.us_per_op / peer.us_per_op:.2f}x"
                       if ok and base is not None and peer is not None else "-")
        lines.append("| " + " | ".join(row) + " |")
    info = (f"\n{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}; {args.runtime:g} s per cell, image {args.size}, "
            f"{args.repeat} round(s), median. nbdcopy: MiB/s of a whole-export copy to null:. "
            "connections/s: open + handshake (GO) + DISC + close, one client thread.")
    return "\n".join(lines) + "\n" + info


if __name__ == "__main__":
    sys.exit(main())
