#!/usr/bin/env python3
"""Benchmark ``pynbd serve rbd:...`` (fio's nbd engine over NBD) against ``rbd bench``
(librbd directly, the ceiling) on the same Ceph cluster, in one run.

Workloads: 4 MiB sequential write/read and 4 KiB random write/read at QD32 (the
sequential ones at the same queue depth as well). By default it starts a throw-away
single-node cluster (mon + memstore OSD, loopback, tests/support/ceph_cluster.py) and
stops it at the end; ``--ceph-conf`` uses an existing cluster instead (it creates and
removes two images in ``--pool``).

    cd /work/main && .venv/bin/python bench/bench_rbd.py [--size 1G] [--qd 32] [--json]

Prints MiB/s, IOPS and the pynbd/rbd-bench ratio per workload. Target: >= 0.7x for
4 MiB sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support.ceph_cluster import CephCluster  # noqa: E402
from tests.support.pynbd_server import PynbdServer  # noqa: E402

from pynbd.util.sizes import parse_size  # noqa: E402

MiB = 1 << 20


@dataclass
class Result:
    workload: str
    tool: str
    mib_s: float
    iops: float


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str  # fio --rw
    rbd_type: str  # rbd bench --io-type
    rbd_pattern: str  # rbd bench --io-pattern
    bs: int


WORKLOADS = [
    Workload("4M seq write", "write", "write", "seq", 4 * MiB),
    Workload("4M seq read", "read", "read", "seq", 4 * MiB),
    Workload("4K rand write", "randwrite", "write", "rand", 4096),
    Workload("4K rand read", "randread", "read", "rand", 4096),
]


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def rbd_bench(env: dict[str, str], spec: str, w: Workload, qd: int, total: int) -> Result:
    t0 = time.monotonic()
    out = run(["rbd", "bench", "--io-type", w.rbd_type, "--io-pattern", w.rbd_pattern,
               "--io-size", str(w.bs), "--io-threads", str(qd), "--io-total", str(total),
               spec], env)
    elapsed = time.monotonic() - t0
    # last line: "elapsed: 5   ops: 256   ops/sec: 49.86   bytes/sec: 199 MiB/s"
    m = re.search(r"elapsed:\s*([\d.]+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", out)
    if not m:
        raise SystemExit(f"cannot parse rbd bench output:\n{out}")
    ops, ops_s = int(m.group(2)), float(m.group(3))
    if ops_s <= 0:
        ops_s = ops / elapsed
    return Result(w.name, "rbd bench", ops_s * w.bs / MiB, ops_s)


def fio_nbd(env: dict[str, str], uri: str, w: Workload, qd: int, total: int, conns: int,
            size: int) -> Result:
    cmd = ["fio", "--name=pynbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
           f"--bs={w.bs}", f"--iodepth={max(1, qd // conns)}", f"--numjobs={conns}",
           f"--size={size}", f"--io_size={max(w.bs, total // conns)}", "--group_reporting",
           "--randrepeat=0", "--norandommap", "--output-format=json"]
    if conns > 1 and w.rbd_pattern == "seq":
        cmd.append(f"--offset_increment={size // conns}")
        cmd[cmd.index(f"--size={size}")] = f"--size={size // conns}"
    out = run(cmd, env)
    data = json.loads(out[out.index("{"):])  # the nbd engine prints a line first
    job = data["jobs"][0]
    side = job["write"] if "write" in w.rw else job["read"]
    return Result(w.name, f"pynbd+fio ({conns} conn)", side["bw_bytes"] / MiB, side["iops"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size and bytes per sequential run")
    ap.add_argument("--rand-total", default="128M", help="bytes per 4K random run")
    ap.add_argument("--qd", type=int, default=32, help="queue depth (all workloads)")
    ap.add_argument("--conns", type=int, default=1,
                    help="NBD connections fio opens (QD split between them)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per workload and tool, interleaved; the best one counts")
    ap.add_argument("--auth", choices=("none", "cephx"), default="cephx")
    ap.add_argument("--ceph-conf", help="use this existing cluster instead of starting one")
    ap.add_argument("--ceph-keyring", help="keyring for --ceph-conf")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--json", action="store_true", help="print results as JSON too")
    args = ap.parse_args()
    for tool in ("fio", "rbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install fio ceph-common")
    size, rand_total = parse_size(args.size), parse_size(args.rand_total)

    cluster: CephCluster | None = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-rbd-"))
    try:
        if args.ceph_conf:
            conf, keyring = args.ceph_conf, args.ceph_keyring
            env = dict(os.environ, CEPH_CONF=conf)
            if keyring:
                env["CEPH_KEYRING"] = keyring
        else:
            cluster = CephCluster(tmp / "ceph", auth=args.auth,
                                  memstore_bytes=f"{max(4, 3 * size // (1 << 30) + 2)}G")
            t0 = time.monotonic()
            cluster.start()
            print(f"cluster up in {time.monotonic() - t0:.1f} s ({cluster.mon_host}, "
                  f"auth {args.auth})", flush=True)
            conf = str(cluster.conf_path)
            keyring = str(cluster.keyring_path) if cluster.keyring_path else None
            env = dict(cluster.env)
        rbd_img = f"{args.pool}/bench-librbd-{os.getpid()}"
        nbd_img = f"{args.pool}/bench-pynbd-{os.getpid()}"
        for spec in (rbd_img, nbd_img):
            run(["rbd", "create", "--size", str(size // MiB), spec], env)
        serve_args = ["--bind", "127.0.0.1", "--port", "0", "--quiet", "--ceph-conf", conf]
        if keyring:
            serve_args += ["--ceph-keyring", keyring]
        server = PynbdServer([*serve_args, f"rbd:{nbd_img}"])
        results: list[tuple[Result, Result]] = []
        try:
            uri = server.uri_for("nbd://")
            print(f"pynbd serving rbd:{nbd_img} at {uri}; image size {size // MiB} MiB, "
                  f"QD {args.qd}, fio over {args.conns} NBD connection(s), best of "
                  f"{args.repeat}", flush=True)
            for w in WORKLOADS:
                total = size if w.bs >= MiB else rand_total
                a = b = None
                for _ in range(args.repeat):  # interleaved; best of N for each tool
                    ra = rbd_bench(env, rbd_img, w, args.qd, total)
                    rb = fio_nbd(env, uri, w, args.qd, total, args.conns, size)
                    a = ra if a is None or ra.iops > a.iops else a
                    b = rb if b is None or rb.iops > b.iops else b
                assert a is not None and b is not None
                results.append((a, b))
                print(f"  {w.name:14s} rbd bench {a.mib_s:8.1f} MiB/s {a.iops:9.0f} IOPS | "
                      f"pynbd {b.mib_s:8.1f} MiB/s {b.iops:9.0f} IOPS | "
                      f"ratio {b.iops / a.iops if a.iops else 0:5.2f}", flush=True)
            if not server.alive():
                raise SystemExit(f"pynbd died:\n{server.stderr[-3000:]}")
        finally:
            server.stop()
            for spec in (rbd_img, nbd_img):
                subprocess.run(["rbd", "rm", "--no-progress", spec], env=env,
                               capture_output=True, timeout=120)
        print()
        print(f"{'workload':14s} {'rbd MiB/s':>10s} {'rbd IOPS':>9s} {'pynbd MiB/s':>12s} "
              f"{'pynbd IOPS':>11s} {'ratio':>6s}")
        for a, b in results:
            print(f"{a.workload:14s} {a.mib_s:10.1f} {a.iops:9.0f} {b.mib_s:12.1f} "
                  f"{b.iops:11.0f} {b.iops / a.iops if a.iops else 0:6.2f}")
        seq = [b.iops / a.iops for a, b in results if "seq" in a.workload and a.iops]
        if seq:
            verdict = "meets" if min(seq) >= 0.7 else "misses"
            print(f"4 MiB sequential: worst ratio {min(seq):.2f} ({verdict} the 0.7x target)")
        if args.json:
            print(json.dumps([{"rbd": asdict(a), "pynbd": asdict(b)} for a, b in results]))
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
