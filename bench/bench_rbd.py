#!/usr/bin/env python3
"""Benchmark ``pynbd serve rbd:...`` (fio's nbd engine over NBD) against ``rbd bench``
(librbd directly, the ceiling) and ``qemu-nbd`` (qemu's rbd driver: the C NBD server in
pynbd's place, same fio client) on the same Ceph cluster, in one run.

Workloads: 4 MiB sequential write/read and 4 KiB random write/read at QD32 (the
sequential ones at the same queue depth as well). By default it starts a throw-away
single-node cluster (mon + memstore OSD, loopback, tests/support/ceph_cluster.py) and
stops it at the end; ``--ceph-conf`` uses an existing cluster instead (it creates and
removes three images in ``--pool``).

    cd /work/main && .venv/bin/python bench/bench_rbd.py [--size 1G] [--qd 32] \
        [--repeat 3] [--workloads "4M seq read,4K rand read"] [--qemu-nbd trixie] [--json]

``--qemu-nbd host`` (default) runs Debian 12's qemu-nbd 7.2 (``apt-get install
qemu-block-extra`` for its rbd driver), ``trixie`` Debian 13's qemu-nbd 10 from the
interop tests' chroot tree (scripts/provision-trixie.sh; the bench installs
qemu-block-extra inside it), ``none`` leaves it out.

Each workload runs ``--repeat`` times, ``rbd bench``, pynbd and qemu-nbd interleaved. Per run it
prints MiB/s, IOPS, the pynbd/rbd-bench ratio and the CPU each party spent per request
(rbd bench; the pynbd server, fio and, on the cluster it started, the OSD), then the
median ratio of the runs and the ratio of the best runs. Targets (issue 12): >= 0.9x
for 4 MiB sequential read and write, >= 0.7x for 4 KiB random read. On a shared
2-core machine both sides compete for the CPU with the OSD and each other, so the CPU
per request says more than one throughput figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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
    #: CPU microseconds per request, by party ("rbd bench", "pynbd", "fio", "osd")
    cpu_us: dict[str, float] = field(default_factory=dict)


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
#: pynbd / rbd bench targets (issue 12)
TARGETS = {"4M seq write": 0.9, "4M seq read": 0.9, "4K rand read": 0.7}
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) a live process has used, 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def rbd_bench(env: dict[str, str], spec: str, w: Workload, qd: int, total: int,
              osd_pid: int | None) -> Result:
    t0 = time.monotonic()
    c0, o0 = children_cpu(), proc_cpu(osd_pid)
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
    n = max(1, total // w.bs)
    cpu = {"rbd bench": (children_cpu() - c0) / n * 1e6}
    if osd_pid is not None:
        cpu["osd"] = (proc_cpu(osd_pid) - o0) / n * 1e6
    return Result(w.name, "rbd bench", ops_s * w.bs / MiB, ops_s, cpu)


def fio_nbd(env: dict[str, str], uri: str, w: Workload, qd: int, total: int, conns: int,
            size: int, server_pid: int, osd_pid: int | None, server: str = "pynbd") -> Result:
    cmd = ["fio", "--name=pynbd", "--ioengine=nbd", f"--uri={uri}", f"--rw={w.rw}",
           f"--bs={w.bs}", f"--iodepth={max(1, qd // conns)}", f"--numjobs={conns}",
           f"--size={size}", f"--io_size={max(w.bs, total // conns)}", "--group_reporting",
           "--randrepeat=0", "--norandommap", "--output-format=json"]
    if conns > 1 and w.rbd_pattern == "seq":
        cmd.append(f"--offset_increment={size // conns}")
        cmd[cmd.index(f"--size={size}")] = f"--size={size // conns}"
    c0, s0, o0 = children_cpu(), proc_cpu(server_pid), proc_cpu(osd_pid)
    out = run(cmd, env)
    data = json.loads(out[out.index("{"):])  # the nbd engine prints a line first
    job = data["jobs"][0]
    side = job["write"] if "write" in w.rw else job["read"]
    n = max(1, int(side["total_ios"]))
    cpu = {server: (proc_cpu(server_pid) - s0) / n * 1e6,
           "fio": (children_cpu() - c0) / n * 1e6}
    if osd_pid is not None:
        cpu["osd"] = (proc_cpu(osd_pid) - o0) / n * 1e6
    return Result(w.name, f"{server}+fio ({conns} conn)", side["bw_bytes"] / MiB,
                  side["iops"], cpu)


class QemuNbd:
    """``qemu-nbd`` serving an RBD image through qemu's rbd driver (librbd's aio with
    callbacks, one main loop): the C NBD server in the same place as pynbd."""

    def __init__(self, spec: str, conf: str, keyring: str | None, env: dict[str, str],
                 where: str) -> None:
        from tests.support.net import free_port
        self.port = free_port()
        target = f"rbd:{spec}:conf={conf}" + (f":keyring={keyring}" if keyring else "")
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "-b", "127.0.0.1", "-p",
               str(self.port), "-x", "", "--cache=writeback", target]
        if where == "trixie":  # Debian 13's qemu 10 from the interop tests' chroot tree
            from tests.support import trixie
            # the tree needs qemu's rbd module once (apt-get, inside the tree)
            if not (trixie.root() / "usr/lib/x86_64-linux-gnu/qemu/block-rbd.so").exists():
                trixie.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            "qemu-block-extra"], env={"DEBIAN_FRONTEND": "noninteractive"},
                           timeout=900)
            cmd = trixie.argv(cmd)
            env = {**env, **trixie._host_env()}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                hint = (" (qemu's rbd driver is in Debian's qemu-block-extra: apt-get "
                        "install qemu-block-extra)" if "rbd" in err else "")
                raise SystemExit(f"qemu-nbd {target} exited {self.proc.returncode}: "
                                 f"{err.strip()}{hint}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit("qemu-nbd did not listen within 60 s") from None
                time.sleep(0.1)
        self.uri = f"nbd://127.0.0.1:{self.port}/"
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_text(r: Result) -> str:
    return " ".join(f"{k} {v:.0f}" for k, v in r.cpu_us.items())


def main() -> int:  # noqa: C901 - a benchmark driver: options, then one table of cells
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="image size and bytes per sequential run")
    ap.add_argument("--rand-total", default="128M", help="bytes per 4K random run")
    ap.add_argument("--qd", type=int, default=32, help="queue depth (all workloads)")
    ap.add_argument("--conns", type=int, default=1,
                    help="NBD connections fio opens (QD split between them)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per workload and tool, interleaved")
    ap.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                    help="comma-separated workload names (reads write the images in "
                         "full first unless the sequential write ran)")
    ap.add_argument("--auth", choices=("none", "cephx"), default="cephx")
    ap.add_argument("--ceph-conf", help="use this existing cluster instead of starting one")
    ap.add_argument("--ceph-keyring", help="keyring for --ceph-conf")
    ap.add_argument("--pool", default="rbd")
    ap.add_argument("--qemu-nbd", choices=("host", "trixie", "none"), default="host",
                    help="qemu-nbd through qemu's rbd driver, the C NBD server in pynbd's "
                         "place: the host's (Debian 12: qemu 7.2, needs qemu-block-extra), "
                         "Debian 13's qemu 10 from the interop tests' chroot tree, or none")
    ap.add_argument("--json", action="store_true", help="print results as JSON too")
    args = ap.parse_args()
    for tool in ("fio", "rbd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install fio ceph-common")
    size, rand_total = parse_size(args.size), parse_size(args.rand_total)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(chosen) - {w.name for w in WORKLOADS}
    if unknown:
        raise SystemExit(f"unknown workloads {sorted(unknown)}; "
                         f"known: {[w.name for w in WORKLOADS]}")

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
        osd = cluster._procs.get("osd.0") if cluster is not None else None
        osd_pid = osd.pid if osd is not None else None
        rbd_img = f"{args.pool}/bench-librbd-{os.getpid()}"
        nbd_img = f"{args.pool}/bench-pynbd-{os.getpid()}"
        qemu_img = f"{args.pool}/bench-qemu-{os.getpid()}"
        images = [rbd_img, nbd_img] + ([] if args.qemu_nbd == "none" else [qemu_img])
        for spec in images:
            run(["rbd", "create", "--size", str(size // MiB), spec], env)
        serve_args = ["--bind", "127.0.0.1", "--port", "0", "--quiet", "--ceph-conf", conf]
        if keyring:
            serve_args += ["--ceph-keyring", keyring]
        server = PynbdServer([*serve_args, f"rbd:{nbd_img}"])
        qemu: QemuNbd | None = None
        results: list[tuple[str, list[tuple[Result, Result, Result | None]]]] = []
        try:
            if not args.qemu_nbd == "none":
                qemu = QemuNbd(qemu_img, conf, keyring, env, args.qemu_nbd)
            uri = server.uri_for("nbd://")
            print(f"pynbd serving rbd:{nbd_img} at {uri}; image size {size // MiB} MiB, "
                  f"QD {args.qd}, fio over {args.conns} NBD connection(s), {args.repeat} "
                  f"runs each; load average {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} CPUs", flush=True)
            if qemu is not None:
                print(f"qemu-nbd serving rbd:{qemu_img} at {qemu.uri}", flush=True)
            print("CPU per request in us: rbd bench / osd | server / fio / osd",
                  flush=True)
            filled = False
            for w in WORKLOADS:
                if w.name not in chosen:
                    continue
                if w.rbd_type == "read" and not filled:  # reads need written images
                    fill = WORKLOADS[0]
                    rbd_bench(env, rbd_img, fill, args.qd, size, None)
                    fio_nbd(env, uri, fill, args.qd, size, args.conns, size,
                            server.pid, None)
                    if qemu is not None:
                        fio_nbd(env, qemu.uri, fill, args.qd, size, args.conns, size,
                                qemu.pid, None, "qemu-nbd")
                filled = filled or (w.rbd_pattern == "seq" and w.rbd_type == "write")
                total = size if w.bs >= MiB else rand_total
                pairs: list[tuple[Result, Result, Result | None]] = []
                for _ in range(args.repeat):  # interleaved
                    ra = rbd_bench(env, rbd_img, w, args.qd, total, osd_pid)
                    rb = fio_nbd(env, uri, w, args.qd, total, args.conns, size,
                                 server.pid, osd_pid)
                    rq = None if qemu is None else fio_nbd(
                        env, qemu.uri, w, args.qd, total, args.conns, size, qemu.pid,
                        osd_pid, "qemu-nbd")
                    pairs.append((ra, rb, rq))
                    line = (f"  {w.name:14s} rbd bench {ra.iops:7.0f} IOPS [{cpu_text(ra)}] | "
                            f"pynbd {rb.iops:7.0f} IOPS [{cpu_text(rb)}]")
                    if rq is not None:
                        line += f" | qemu-nbd {rq.iops:7.0f} IOPS [{cpu_text(rq)}]"
                    line += f" | pynbd/rbd {rb.iops / ra.iops if ra.iops else 0:4.2f}"
                    if rq is not None:
                        line += (f" qemu-nbd/rbd {rq.iops / ra.iops if ra.iops else 0:4.2f} "
                                 f"pynbd/qemu-nbd {rb.iops / rq.iops if rq.iops else 0:4.2f}")
                    print(line, flush=True)
                results.append((w.name, pairs))
            if not server.alive():
                raise SystemExit(f"pynbd died:\n{server.stderr[-3000:]}")
            if qemu is not None and qemu.proc.poll() is not None:
                raise SystemExit(f"qemu-nbd died ({qemu.proc.returncode})")
        finally:
            server.stop()
            if qemu is not None:
                qemu.stop()
            for spec in images:
                subprocess.run(["rbd", "rm", "--no-progress", spec], env=env,
                               capture_output=True, timeout=120)
        print()
        print(f"{'workload':14s} {'rbd IOPS':>9s} {'pynbd IOPS':>11s} {'median':>7s} "
              f"{'best/best':>9s} {'target':>7s}  {'qemu-nbd IOPS':>13s} {'qemu/rbd':>8s} "
              f"{'pynbd/qemu':>10s}  (medians over {args.repeat} runs)")
        summary = []
        for name, pairs in results:
            ra_med = statistics.median(a.iops for a, _, _ in pairs)
            rb_med = statistics.median(b.iops for _, b, _ in pairs)
            med = statistics.median(b.iops / a.iops for a, b, _ in pairs if a.iops)
            best = max(b.iops for _, b, _ in pairs) / max(a.iops for a, _, _ in pairs)
            target = TARGETS.get(name)
            verdict = "" if target is None else ("meets" if med >= target else "misses")
            line = (f"{name:14s} {ra_med:9.0f} {rb_med:11.0f} {med:7.2f} {best:9.2f} "
                    f"{'' if target is None else f'{target:.1f}x':>7s}  {verdict:6s}")
            entry: dict[str, object] = {"workload": name, "median_ratio": med,
                                        "best_ratio": best, "target": target}
            qs = [(a, b, q) for a, b, q in pairs if q is not None]
            if qs:
                q_med = statistics.median(q.iops for _, _, q in qs)
                q_ratio = statistics.median(q.iops / a.iops for a, _, q in qs if a.iops)
                pq = statistics.median(b.iops / q.iops for _, b, q in qs if q.iops)
                line += f" {q_med:13.0f} {q_ratio:8.2f} {pq:10.2f}"
                entry.update(qemu_median_ratio=q_ratio, pynbd_over_qemu=pq)
            print(line)
            entry["runs"] = [{"rbd": asdict(a), "pynbd": asdict(b),
                              "qemu-nbd": asdict(q) if q is not None else None}
                             for a, b, q in pairs]
            summary.append(entry)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
        if args.json:
            print(json.dumps(summary))
        return 0
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
