#!/usr/bin/env python3
"""Benchmark incremental backup: ``pynbd backup`` of a point-in-time view with 5% of a
4 GiB image changed, against a full ``nbdcopy`` of the same view (and, for qcow2 backups,
a full ``qemu-img convert -O qcow2`` of it); and the live export's
4 KiB random-write rate (fio, nbd engine) without bitmaps, with the checkpoint bitmap,
and with a fresh view open (copy-before-write), side by side in one run.

    .venv/bin/python bench/bench_backup.py [--size 4G] [--changed 0.05] [--runtime 10]
                                           [--workers 2] [--markdown FILE]

Needs: fio (nbd engine), nbdcopy (libnbd-bin), qemu-img. A script, not a test: numbers depend on
the machine (compare the rows of one run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support.images import make_image  # noqa: E402
from tests.support.processes import Process, pynbd_argv, pynbd_env  # noqa: E402

from pynbd.server.control import control_request  # noqa: E402
from pynbd.util.sizes import parse_size  # noqa: E402

MiB = 1024 * 1024
BLOCK = 64 * 1024


def fio_randwrite(uri: str, runtime: float, size: int) -> float:
    argv = ["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=32", f"--size={size}", "--time_based",
            f"--runtime={runtime:g}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
            "--output-format=json"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=runtime + 120)
    if p.returncode != 0:
        raise RuntimeError(f"fio failed: {p.stderr.strip()[-500:]}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    return float(job["write"]["iops"])


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=3600, env=pynbd_env())
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed: {p.stderr.strip()[-800:]}")
    return dt, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("4G"))
    ap.add_argument("--changed", type=float, default=0.05, help="fraction changed")
    ap.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args()
    for prog in ("fio", "nbdcopy", "qemu-img"):
        if shutil.which(prog) is None:
            print(f"bench_backup: {prog} is missing", file=sys.stderr)
            return 1
    work = Path(args.dir or tempfile.mkdtemp(prefix="pynbd-bench-backup-"))
    work.mkdir(parents=True, exist_ok=True)
    img = work / "disk.img"
    ctl = str(work / "ctl.sock")
    size = args.size
    rows: list[tuple[str, str]] = []
    print(f"creating a {size // MiB} MiB image in {work} ...", flush=True)
    # every byte data, all of it different: nothing for a sparse copy to skip
    make_image(img, size, fill=True, seed=1, sync=True)
    srv = Process(pynbd_argv("serve", "-q", "--workers", args.workers, "--bind", "127.0.0.1",
                             "--port", "0", "--control", ctl, "-e", "disk", str(img),
                             python=sys.executable), name="serve")
    try:
        uri = srv.first_line().strip()
        base = uri.rsplit("/", 1)[0]

        def ctl_req(req: dict[str, object]) -> dict[str, object]:
            r = control_request(ctl, req, timeout=120)
            if not r.get("ok"):
                raise RuntimeError(str(r))
            return r

        print("fio warm-up ...", flush=True)
        fio_randwrite(uri, 2, size)
        # 2. checkpoint c1, full backups
        ctl_req({"cmd": "checkpoint", "name": "c1"})
        chain = work / "chain"
        print("pynbd backup (full) ...", flush=True)
        t_full, _ = timed(pynbd_argv("backup", "--no-progress", f"{base}/disk@c1", str(chain),
                                     python=sys.executable))
        chain_q = work / "chain-qcow2"
        print("pynbd backup --format qcow2 (full) ...", flush=True)
        t_full_q, _ = timed(pynbd_argv("backup", "--no-progress", "--format", "qcow2",
                                       f"{base}/disk@c1", str(chain_q), python=sys.executable))
        print("qemu-img convert -O qcow2 (full) ...", flush=True)
        t_qemu_img, _ = timed(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                               f"{base}/disk@c1", str(work / "qemu-img.qcow2")])
        (work / "qemu-img.qcow2").unlink()
        print("nbdcopy (full) ...", flush=True)
        t_nbdcopy, _ = timed(["nbdcopy", f"{base}/disk@c1", str(work / "nbdcopy.img")])
        (work / "nbdcopy.img").unlink()
        t_nbdcopy_null, _ = timed(["nbdcopy", f"{base}/disk@c1", "null:"])
        ctl_req({"cmd": "checkpoint", "name": "c1", "release": True})
        # 3. change a fraction of the image (64 KiB blocks at random), checkpoint c2
        import nbd

        nblocks = size // BLOCK
        changed = random.Random(2).sample(range(nblocks), int(nblocks * args.changed))
        h = nbd.NBD()
        h.connect_uri(uri)
        data = random.Random(3).randbytes(BLOCK)
        for b in changed:
            h.pwrite(data, b * BLOCK)
        h.flush()
        h.shutdown()
        changed_bytes = len(changed) * BLOCK
        ctl_req({"cmd": "checkpoint", "name": "c2"})
        print("pynbd backup (incremental) ...", flush=True)
        t_inc, out = timed(pynbd_argv("backup", "--no-progress", "--json", f"{base}/disk@c2",
                                      str(chain), python=sys.executable))
        inc = json.loads(out)
        print("pynbd backup (incremental, qcow2) ...", flush=True)
        t_inc_q, _ = timed(pynbd_argv("backup", "--no-progress", f"{base}/disk@c2",
                                      str(chain_q), python=sys.executable))
        ctl_req({"cmd": "checkpoint", "name": "c2", "release": True})
        # 4. write rate with one view open (fresh: every first write to a block copies it)
        ctl_req({"cmd": "checkpoint", "name": "c3"})
        print("fio 4k randwrite: view open ...", flush=True)
        iops_view = fio_randwrite(uri, args.runtime, size)
        st = ctl_req({"cmd": "checkpoint", "list": True})
        views = st["views"]
        assert isinstance(views, list)
        saved = sum(int(v["saved_bytes"]) for v in views)
        ctl_req({"cmd": "checkpoint", "name": "c3", "release": True})
        # 5. with the checkpoint bitmap only, then with nothing tracked at all
        print("fio 4k randwrite: bitmap, no view ...", flush=True)
        iops_bitmap = fio_randwrite(uri, args.runtime, size)
        ctl_req({"cmd": "bitmap", "action": "remove", "name": "c3"})
        print("fio 4k randwrite: no bitmap, no view ...", flush=True)
        iops_plain = fio_randwrite(uri, args.runtime, size)
    finally:
        srv.stop(60)
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    gib = size / (1 << 30)
    rows += [
        (f"full `nbdcopy` of the view ({gib:g} GiB) to a file", f"{t_nbdcopy:.2f} s "
         f"({size / MiB / t_nbdcopy:.0f} MiB/s)"),
        (f"full `nbdcopy` of the view ({gib:g} GiB) to null:", f"{t_nbdcopy_null:.2f} s "
         f"({size / MiB / t_nbdcopy_null:.0f} MiB/s)"),
        (f"full `pynbd backup` of the view ({gib:g} GiB, sha256 per MiB, fsync)",
         f"{t_full:.2f} s ({size / MiB / t_full:.0f} MiB/s)"),
        (f"incremental `pynbd backup`, {args.changed:.0%} changed "
         f"({changed_bytes / MiB:.0f} MiB in {len(changed)} blocks)",
         f"{t_inc:.2f} s ({inc['data_bytes'] / MiB:.0f} MiB copied; "
         f"{t_nbdcopy / t_inc:.1f}x faster than the full nbdcopy)"),
        (f"full `qemu-img convert -O qcow2` of the view ({gib:g} GiB)",
         f"{t_qemu_img:.2f} s ({size / MiB / t_qemu_img:.0f} MiB/s)"),
        (f"full `pynbd backup --format qcow2` of the view ({gib:g} GiB, sha256, fsync)",
         f"{t_full_q:.2f} s ({size / MiB / t_full_q:.0f} MiB/s; "
         f"{t_qemu_img / t_full_q:.2f}x qemu-img's rate)"),
        (f"incremental `pynbd backup`, qcow2, {args.changed:.0%} changed",
         f"{t_inc_q:.2f} s ({t_inc_q / t_inc:.2f}x the raw incremental's time)"),
        ("live 4 KiB random writes (fio QD32), no bitmap, no view", f"{iops_plain:.0f} IOPS"),
        ("live 4 KiB random writes, checkpoint bitmap, no view",
         f"{iops_bitmap:.0f} IOPS ({iops_bitmap / iops_plain:.2f}x)"),
        ("live 4 KiB random writes, a fresh view open (copy-before-write)",
         f"{iops_view:.0f} IOPS ({iops_view / iops_plain:.2f}x; {saved / MiB:.0f} MiB "
         "saved to scratch)"),
    ]
    header = (f"pynbd backup benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
              f"--workers {args.workers}, fio runtime {args.runtime:g} s")
    print("\n" + header)
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{header}\n\n| what | result |\n| --- | --- |\n")
            for k, v in rows:
                f.write(f"| {k} | {v} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
