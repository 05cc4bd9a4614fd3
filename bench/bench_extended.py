"""``pynbd serve`` with and without extended headers, side by side, driven by Debian
13's fio 3.39 (nbd engine, libnbd 1.22, which asks for extended headers).

Two ``pynbd serve`` processes share one image file: one offers extended headers, the
other runs with ``--no-extended-headers`` (so libnbd falls back to structured replies).
Each workload runs on both, alternating which goes first, ``--rounds`` times; the table
shows medians, the median of the per-round ratios (extended / compact) and their range,
and the server CPU per operation.

Workloads: 4 KiB random read QD32, 1 MiB sequential read QD8, 1 MiB sequential write QD8.

Needs the Debian 13 tree (``scripts/provision-trixie.sh``) and root (the chroot).
Run: ``.venv/bin/python bench/bench_extended.py [--runtime 5] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import trixie  # noqa: E402
from tests.support.images import make_image  # noqa: E402
from tests.support.processes import Process, pynbd_argv  # noqa: E402

MiB = 1 << 20
WORKLOADS = [
    ("rand read 4K QD32", "randread", "4k", 32),
    ("seq read 1M QD8", "read", "1m", 8),
    ("seq write 1M QD8", "write", "1m", 8),
]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(python: str, image: Path, *extra: str) -> tuple[Process, str]:
    # one process: the CPU read from /proc/PID is all of the server's (with worker
    # processes the supervisor's own would be ~0)
    p = Process(pynbd_argv("serve", "--bind", "127.0.0.1", "--port", "0", "-q",
                           "--workers", "1", *extra,
                           str(image), python=python), name="serve", new_session=True,
                stop_timeout=15.0)
    uri = p.first_line().strip()
    if "://" not in uri:
        p.stop()
        raise RuntimeError(f"pynbd serve printed no URI: {p.logs()}")
    return p, uri


def fio(uri: str, rw: str, bs: str, qd: int, runtime: float, size: int) -> tuple[float, float]:
    argv = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--size={size}", "--time_based", f"--runtime={runtime:g}",
            "--ramp_time=1", "--norandommap", "--randrepeat=0", "--output-format=json"]
    p = trixie.run(argv, timeout=runtime + 120)
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return side["bw_bytes"] / MiB, side["iops"]


def negotiated(uri: str) -> bool:
    out = json.loads(trixie.run(["nbdinfo", "--json", uri]).stdout)
    return bool(out["extended"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0, help="seconds per cell (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--size", type=int, default=512, help="image MiB (default 512)")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    args = ap.parse_args()
    trixie.root()
    fio_version = trixie.version("fio")
    tmp = Path(tempfile.mkdtemp(prefix="pynbd-bench-ext-", dir="/tmp"))
    image = tmp / "disk.img"
    make_image(image, args.size * MiB, fill=True, seed=1)
    python = args.python if Path(args.python).exists() else sys.executable
    servers = {"extended": serve(python, image), "compact": serve(python, image,
                                                                  "--no-extended-headers")}
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        assert negotiated(servers["extended"][1]) is True
        assert negotiated(servers["compact"][1]) is False
        for r in range(args.rounds):
            for wname, rw, bs, qd in WORKLOADS:
                order = ["extended", "compact"] if r % 2 == 0 else ["compact", "extended"]
                for mode in order:
                    proc, uri = servers[mode]
                    cpu0 = cpu_seconds(proc.pid)
                    mib, iops = fio(uri, rw, bs, qd, args.runtime, args.size * MiB)
                    cpu = cpu_seconds(proc.pid) - cpu0
                    us = cpu / (iops * (args.runtime + 1)) * 1e6 if iops else float("nan")
                    results.setdefault((wname, mode), []).append((mib, iops, us))
                    print(f"  round {r + 1} {wname:18} {mode:8} {mib:9.1f} MiB/s "
                          f"{iops:10.0f} IOPS {us:7.1f} server-CPU-us/op",
                          file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.stop()
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    print(f"\nfio: {fio_version} (libnbd 1.22, Debian 13); pynbd serve on a file, "
          f"{args.size} MiB; {args.rounds} rounds x {args.runtime:g} s; "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| workload | extended headers | compact (structured) | ratio ext/compact "
          "(range) | server CPU us/op ext / compact |")
    print("| --- | --- | --- | --- | --- |")
    for wname, _, bs, _ in WORKLOADS:
        e, c = results[(wname, "extended")], results[(wname, "compact")]
        key = 1 if bs == "4k" else 0  # IOPS for 4K, MiB/s for 1M
        unit = "IOPS" if key else "MiB/s"
        ratios = [a[key] / b[key] for a, b in zip(e, c, strict=True)]
        print(f"| {wname} | {statistics.median(x[key] for x in e):.0f} {unit} "
              f"| {statistics.median(x[key] for x in c):.0f} {unit} "
              f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {statistics.median(x[2] for x in e):.1f} / "
              f"{statistics.median(x[2] for x in c):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
