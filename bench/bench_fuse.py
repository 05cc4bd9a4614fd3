#!/usr/bin/env python3
"""FUSE benchmark (not a test): ``pynbd fuse`` vs libnbd's ``nbdfuse`` in one run.

Both mount the same nbdkit memory export (Unix socket) side by side with ``-C 4``
(nbdfuse's default), first one with CAN_MULTI_CONN (4 connections each), then one
without (nbdkit's multi-conn filter: 1 connection each, requests pipelined on it).
Every workload runs ``--reps`` times on each mount, alternating, and the table shows
medians and the median of the per-pair ratios (shared machine: pairs vary much less
than single runs). Workloads (the 1-job rows only with multi-conn):

* dd 1 MiB sequential write through the page cache (write-through), ``conv=fsync``;
* dd 1 MiB sequential read through the page cache (kernel readahead: pynbd fuse sets
  4 MiB by default, nbdfuse leaves the kernel's 128 KiB; ``--readahead 128K`` compares
  like with like);
* fio 1 MiB sequential read / write with O_DIRECT, 1 job and 4 jobs;
* fio 4 KiB random read with O_DIRECT, 1 job and 4 jobs (IOPS).

Each table ends with the CPU seconds the two FUSE processes used.
Usage: .venv/bin/python bench/bench_fuse.py [--size 1G] [--reps 3] [--runtime 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support.nbd_servers import Server, start_nbdkit  # noqa: E402
from tests.support.processes import Process, pynbd_argv  # noqa: E402

from pynbd.client import connect  # noqa: E402


def parse_size(s: str) -> int:
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(s[:-1]) * mult[s[-1].lower()] if s[-1].lower() in mult else int(s)


def fill(uri: str, size: int) -> None:
    block = os.urandom(1 << 20)
    with connect(uri) as c, c.batch():
        for i, off in enumerate(range(0, size, 1 << 20)):
            c.submit_write(off, block)
            if i % 16 == 15:
                c.wait_all()


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def wait_mounted(path: Path, proc: Process) -> None:
    proc.wait_for(lambda: is_mounted(path) and os.path.exists(path / "nbd"),
                  f"{path} mounted", timeout=30)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dd(args: list[str]) -> float:
    """Seconds for one dd run."""
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True, timeout=600)
    return time.perf_counter() - t0


def fio(path: str, rw: str, bs: str, jobs: int, size: int, runtime: float) -> dict[str, float]:
    argv = ["fio", "--name=b", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
            "--direct=1", "--ioengine=psync", f"--numjobs={jobs}", "--group_reporting",
            f"--size={size // jobs}", f"--offset_increment={size // jobs}",
            "--time_based", f"--runtime={runtime}", "--output-format=json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout)["jobs"][0]
    side = job["write" if "write" in rw else "read"]
    return {"mib": side["bw_bytes"] / (1 << 20), "iops": side["iops"]}


def run_workloads(mp: dict[str, Path], fuse: dict[str, Process],
                  size: int, args: argparse.Namespace, full: bool) -> None:
    cpu0 = {n: cpu_seconds(p.pid) for n, p in fuse.items()}
    mib = size / (1 << 20)

    def path(n: str) -> str:
        return str(mp[n] / "nbd")

    workloads = [
        ("dd write 1M (page cache, fsync)", "MiB/s", lambda n: mib / dd(
            ["if=/dev/zero", f"of={path(n)}", "bs=1M", f"count={int(mib)}",
             "conv=notrunc,fsync"])),
        ("dd read 1M (page cache)", "MiB/s", lambda n: mib / dd(
            [f"if={path(n)}", "of=/dev/null", "bs=1M"])),
        ("fio seq read 1M direct, 1 job", "MiB/s",
         lambda n: fio(path(n), "read", "1m", 1, size, args.runtime)["mib"]),
        ("fio seq read 1M direct, 4 jobs", "MiB/s",
         lambda n: fio(path(n), "read", "1m", 4, size, args.runtime)["mib"]),
        ("fio seq write 1M direct, 1 job", "MiB/s",
         lambda n: fio(path(n), "write", "1m", 1, size, args.runtime)["mib"]),
        ("fio seq write 1M direct, 4 jobs", "MiB/s",
         lambda n: fio(path(n), "write", "1m", 4, size, args.runtime)["mib"]),
        ("fio rand read 4K direct, 1 job", "IOPS",
         lambda n: fio(path(n), "randread", "4k", 1, size, args.runtime)["iops"]),
        ("fio rand read 4K direct, 4 jobs", "IOPS",
         lambda n: fio(path(n), "randread", "4k", 4, size, args.runtime)["iops"]),
    ]
    if not full:
        workloads = [w for w in workloads if "1 job" not in w[0]]
    print(f"{'workload':34} {'unit':6} {'pynbd fuse':>11} {'nbdfuse':>9} {'ratio':>6}")
    for label, unit, fn in workloads:
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(args.reps):
            ours.append(fn("pynbd"))
            theirs.append(fn("nbdfuse"))
        ratio = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
        print(f"{label:34} {unit:6} {statistics.median(ours):11.0f} "
              f"{statistics.median(theirs):9.0f} {ratio:6.2f}", flush=True)
    cpu = {n: cpu_seconds(p.pid) - cpu0[n] for n, p in fuse.items()}
    print(f"CPU seconds of the FUSE process: pynbd fuse {cpu['pynbd']:.1f}, "
          f"nbdfuse {cpu['nbdfuse']:.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="export size (default 1G)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    ap.add_argument("--readahead", default="4M", help="pynbd fuse --readahead (default 4M)")
    args = ap.parse_args()
    size = parse_size(args.size)
    for tool in ("nbdkit", "nbdfuse", "fio", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-fuse-"))
    procs: list[Process | Server] = []
    mounts: list[Path] = []
    try:
        for server, mode in (("multi-conn", []),
                             ("no multi-conn (1 connection)", ["multi-conn-mode=disable"])):
            nbdkit = start_nbdkit(tmp / f"nbdkit{len(procs)}", "memory", [f"size={size}", *mode],
                                  transport="unix", filters=["multi-conn"] if mode else [])
            procs.append(nbdkit)
            uri = nbdkit.uri()
            fill(uri, size)
            mp = {"pynbd": tmp / f"pynbd{len(procs)}", "nbdfuse": tmp / f"nbdfuse{len(procs)}"}
            for d in mp.values():
                d.mkdir()
                mounts.append(d)
            fuse = {
                "pynbd": Process(pynbd_argv("fuse", "-C", "4", "--readahead", args.readahead,
                                            uri, str(mp["pynbd"])), stop_timeout=30),
                "nbdfuse": Process(["nbdfuse", "-C", "4", str(mp["nbdfuse"]), uri],
                                   stop_timeout=30),
            }
            procs += fuse.values()
            for name, d in mp.items():
                wait_mounted(d, fuse[name])
            print(f"\nnbdkit memory {args.size} over a Unix socket, {server}; {args.reps} "
                  f"pairs per row, medians; pynbd fuse --readahead {args.readahead}")
            run_workloads(mp, fuse, size, args, full=server == "multi-conn")
            for p in fuse.values():
                p.kill(signal.SIGTERM)
                p.wait(60)
    finally:
        for p in reversed(procs):  # both FUSE programs unmount on SIGTERM
            p.stop()
        for d in mounts:
            if d.exists() and is_mounted(d):
                subprocess.run(["umount", "-l", str(d)], check=False, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
