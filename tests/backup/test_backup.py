"""``pynbd backup`` and ``pynbd restore`` end to end: a chain of a full and five
incremental backups taken from checkpoints while two writers keep writing, every point
restored and compared with the image at its checkpoint instant; backups from qemu-nbd
``-B`` (Debian 12 and 13); the errors that keep a chain honest."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest

from tests.backup._support import (
    KiB,
    MiB,
    Served,
    expected_dirty,
    nbdinfo_dirty,
    pynbd,
    pynbd_dirty,
    run,
    runs,
)
from tests.support import trixie
from tests.support.images import make_image

SIZE = 32 * MiB
HALF = SIZE // 2


def image(tmp: Path, seed: int = 1) -> Path:
    return make_image(tmp / "disk.img", SIZE,
                      {off: MiB + 4096 for off in range(0, SIZE, 2 * MiB)}, seed=seed)


def pattern(writer: int, seq: int, n: int) -> bytes:
    seed = hashlib.sha256(f"{writer}/{seq}".encode()).digest()
    return (seed * (n // 32 + 1))[:n]


@dataclass
class Op:
    seq: int
    kind: str  # write, zero, trim
    off: int
    n: int
    t0: float
    t1: float


class Writer(threading.Thread):
    """Writes one half of the export, one request at a time, recording each with the
    time it was sent and the time it was answered."""

    def __init__(self, uri: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.index = index
        self.stop_ev = stop
        self.ops: list[Op] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(self.index)
        h = nbd.NBD()
        h.connect_uri(self.uri)
        base = self.index * HALF
        try:
            for seq in range(200000):  # bounded; stopped long before
                if self.stop_ev.is_set():
                    break
                n = rnd.choice((512, 4096, 4096, 65536, 100_000, 300_000))
                off = base + rnd.randrange(0, HALF - n)
                kind = "zero" if seq % 17 == 16 else "trim" if seq % 23 == 22 else "write"
                t0 = time.monotonic()
                if kind == "write":
                    h.pwrite(pattern(self.index, seq, n), off)
                elif kind == "zero":
                    h.zero(n, off)
                else:
                    h.trim(n, off)  # the file backend punches a hole: zeros
                self.ops.append(Op(seq, kind, off, n, t0, time.monotonic()))
                if seq % 64 == 0:
                    time.sleep(0.002)  # let the checkpoints and backups breathe
        except BaseException as exc:
            self.error = exc
        finally:
            h.shutdown()


def apply(model: bytearray, base: int, writer: int, op: Op) -> None:
    lo = op.off - base
    model[lo:lo + op.n] = pattern(writer, op.seq, op.n) if op.kind == "write" else bytes(op.n)


@pytest.mark.parametrize("workers", [1, 2])
def test_chain_under_writes_restores_every_checkpoint(tmp_path: Path, workers: int) -> None:
    img = image(tmp_path)
    initial = img.read_bytes()
    s = Served(tmp_path, img, workers=workers)
    chain = tmp_path / "chain"
    windows: list[tuple[float, float]] = []
    stop = threading.Event()
    writers = [Writer(s.uri, i, stop) for i in range(2)]
    try:
        for w in writers:
            w.start()
        time.sleep(0.3)
        for i in range(1, 7):
            t0 = time.monotonic()  # the control verb itself: a tight window
            s.control({"cmd": "checkpoint", "name": f"c{i}"})
            windows.append((t0, time.monotonic()))
            time.sleep(0.2)  # the writers overwrite what the backup is about to read
            out = json.loads(pynbd("backup", "--json", s.view_uri(f"c{i}"), str(chain)).stdout)
            assert out["index"] == i - 1 and out["checkpoint"] == f"c{i}"
            assert out["bitmap"] == (None if i == 1 else f"c{i - 1}")
            assert out["type"] == ("full" if i == 1 else "incremental")
            s.checkpoint("--release", f"c{i}")
            time.sleep(0.2)
        stop.set()
        for w in writers:
            w.join(60)
            assert w.error is None, w.error
            assert len(w.ops) > 100
        st = s.export_status()
        assert st["errors"] == 0 and st["views"] == []
    finally:
        stop.set()
        s.stop()
    listing = json.loads(pynbd("restore", str(chain), "--list").stdout)
    assert [b["type"] for b in listing["backups"]] == ["full"] + ["incremental"] * 5
    full = listing["backups"][0]["data_bytes"] + listing["backups"][0]["zero_bytes"]
    assert full == SIZE
    # every point: the restored image is the image at its checkpoint instant. Each
    # writer's requests are sequential, so that image is the initial one plus a prefix
    # of each writer's requests: every one answered before the checkpoint was asked
    # for, and maybe some of those sent while it was being taken (the pause decides).
    models = [bytearray(initial[:HALF]), bytearray(initial[HALF:])]
    done = [0, 0]
    for n, (t0, t1) in enumerate(windows):
        out = tmp_path / f"restored{n}.img"
        p = pynbd("restore", str(chain), str(out), "--at", str(n))
        assert b"every range verified" in p.stdout
        got = out.read_bytes()
        assert len(got) == SIZE
        for wi, w in enumerate(writers):
            base = wi * HALF
            half = got[base:base + HALF]
            ops = w.ops
            lo = sum(1 for op in ops if op.t1 < t0)
            hi = sum(1 for op in ops if op.t0 <= t1)
            while done[wi] < lo:
                apply(models[wi], base, wi, ops[done[wi]])
                done[wi] += 1
            matched = bytes(models[wi]) == half
            trial = bytearray(models[wi]) if not matched else models[wi]
            k = lo
            while not matched and k < hi:
                apply(trial, base, wi, ops[k])
                k += 1
                matched = bytes(trial) == half
            assert matched, (f"restore of backup {n} (checkpoint c{n + 1}), writer {wi}: "
                             f"not the image after any of requests {lo}..{hi} "
                             f"({len(ops)} in all)")
        out.unlink()


def test_chain_continues_after_a_clean_restart(tmp_path: Path) -> None:
    img = image(tmp_path, seed=2)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=2)
    try:
        s.checkpoint("c1")
        pynbd("backup", s.view_uri("c1"), str(chain))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x41 5M 70k", "-c", "write -z 9M 1M",
            s.uri)
    finally:
        s.stop()  # the view goes; the bitmap c1 (changes since c1) is saved
    s = Served(tmp_path, img, workers=2, tag="2")
    try:
        bms = {b["name"]: b for b in s.export_status()["bitmaps"]}
        assert bms["c1"]["state"] == "active" and bms["c1"]["kind"] == "checkpoint"
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 20M 4k", s.uri)
        v = json.loads(s.checkpoint("c2").stdout)
        assert v["bitmap"] == "c1"
        assert runs(nbdinfo_dirty(s.view_uri("c2"), "c1")) == expected_dirty(
            [(5 * MiB, 70 * KiB), (9 * MiB, MiB), (20 * MiB, 4096)], 64 * KiB, SIZE)
        p = pynbd("backup", "--progress", s.view_uri("c2"), str(chain))
        assert b"incremental, bitmap c1" in p.stdout
        assert b"backup [" in p.stderr and b"100.0%" in p.stderr
        expected = img.read_bytes()
    finally:
        s.stop()
    pynbd("restore", "--progress", str(chain), str(tmp_path / "r.img"))
    assert (tmp_path / "r.img").read_bytes() == expected
    # and the incremental read only what changed
    listing = json.loads(pynbd("restore", str(chain), "--list").stdout)
    inc = listing["backups"][1]
    assert inc["data_bytes"] + inc["zero_bytes"] == sum(
        n for _, n in expected_dirty([(5 * MiB, 70 * KiB), (9 * MiB, MiB), (20 * MiB, 4096)],
                                     64 * KiB, SIZE))


def test_backup_refuses_what_it_cannot_know(tmp_path: Path) -> None:
    img = image(tmp_path, seed=3)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=1)
    try:
        # an incremental needs a chain; a full needs no bitmap
        s.checkpoint("c1")
        pynbd("backup", s.view_uri("c1"), str(chain))
        s.checkpoint("c2")
        s.checkpoint("c3")  # c2's changes end up in view c3: c2 is never backed up
        p = pynbd("backup", s.view_uri("c3"), str(chain), ok=False)
        assert p.returncode == 1
        assert b"checkpoint 'c1'" in p.stderr and b"--full" in p.stderr
        # the server itself is no help without a checkpoint in the last backup
        p = pynbd("backup", s.uri, str(tmp_path / "plain"))  # full, of the live export
        p = pynbd("backup", s.uri, str(tmp_path / "plain"), ok=False)
        assert p.returncode == 1 and b"--bitmap NAME" in p.stderr
        # a different image does not join a chain
        other = tmp_path / "other.img"
        other.write_bytes(b"\0" * MiB)
        from tests.support.pynbd_server import PynbdServer

        o = PynbdServer(["--workers", "1", "--bind", "127.0.0.1", "--port", "0", str(other)],
                        cwd=tmp_path)
        try:
            p = pynbd("backup", "--full", o.uri, str(chain), ok=False)
            assert p.returncode == 1 and b"the source is 1048576 bytes" in p.stderr
            assert b"33554432-byte image" in p.stderr
        finally:
            o.stop()
        s.kill()
    finally:
        s.stop()
    # after an unclean stop the chain bitmap is inconsistent: refused with the reason
    s = None
    for attempt in range(50):
        try:
            s = Served(tmp_path, img, workers=1, tag=f"k{attempt}")
            break
        except RuntimeError:
            time.sleep(0.2)
    assert s is not None
    try:
        v = json.loads(s.checkpoint("c4").stdout)
        assert v["bitmap"] == "c3" and v["bitmap_state"] == "inconsistent"
        chain2 = tmp_path / "chain2"
        pynbd("backup", "--checkpoint", "c3", s.uri, str(chain2))  # pretend: c3 backed up
        p = pynbd("backup", s.view_uri("c4"), str(chain2), ok=False)
        assert p.returncode == 1 and b"inconsistent" in p.stderr
        assert b"did not stop cleanly" in p.stderr
        out = json.loads(pynbd("backup", "--full", "--json", s.view_uri("c4"),
                               str(chain2)).stdout)
        assert out["type"] == "full" and out["index"] == 1
        expected = img.read_bytes()  # nothing writes now: the view equals the image
    finally:
        s.stop()
    pynbd("restore", str(chain2), str(tmp_path / "r.img"))
    assert (tmp_path / "r.img").read_bytes() == expected
    # restore's own errors
    for args, msg in (((str(tmp_path / "nochain"), str(tmp_path / "x")), b"not a directory"),
                      ((str(chain2), str(tmp_path / "x"), "--at", "7"), b"no backup 7"),
                      ((str(chain2),), b"give TARGET")):
        p = pynbd("restore", *args, ok=False)
        assert p.returncode in (1, 2) and msg in p.stderr, (args, p.stderr)


def test_restore_detects_a_damaged_backup(tmp_path: Path) -> None:
    img = image(tmp_path, seed=4)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=1)
    try:
        s.checkpoint("c1")
        pynbd("backup", s.view_uri("c1"), str(chain))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 3M 200k", s.uri)
        s.checkpoint("c2")
        pynbd("backup", s.view_uri("c2"), str(chain))
    finally:
        s.stop()
    ranges = json.loads((chain / "0001.json").read_text())["ranges"]
    off = next(r[0] for r in ranges if r[2] is not None) + 1000
    with open(chain / "0001.raw", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    p = pynbd("restore", str(chain), str(tmp_path / "r1.img"), ok=False)
    assert p.returncode == 1
    assert b"backup 1 (0001.raw)" in p.stderr and b"do not match the checksum" in p.stderr
    # the point before it is intact
    pynbd("restore", str(chain), str(tmp_path / "r0.img"), "--at", "0")


@pytest.mark.parametrize("peer", ["debian12", "debian13"])
def test_backup_from_qemu_nbd_bitmap(tmp_path: Path, peer: str) -> None:
    """pynbd's client reads qemu-nbd's qemu:dirty-bitmap like any tool, so pynbd backup
    takes incrementals from a qcow2 persistent bitmap served with qemu-nbd -B (with
    Debian 13's qemu, into a qcow2 chain that its qemu-img then reads)."""
    from tests.support import nbd_servers

    use_trixie = peer == "debian13"
    fmt = ["--format", "qcow2"] if use_trixie else []

    def q(*cmd: str) -> None:
        if use_trixie:
            trixie.run(list(cmd))
        else:
            run(*cmd)

    def serve(*extra: str) -> nbd_servers.Server:
        wd = tmp_path / f"qemu-nbd-{len(list(tmp_path.glob('qemu-nbd-*')))}"
        if use_trixie:
            return trixie.start_qemu_nbd(wd, img, fmt="qcow2", read_only=True,
                                         extra=list(extra))
        return nbd_servers.start_qemu_nbd(wd, img, fmt="qcow2", read_only=True,
                                          extra=list(extra))

    img = tmp_path / "q.qcow2"
    q("qemu-img", "create", "-f", "qcow2", str(img), str(SIZE))
    q("qemu-io", "-f", "qcow2", "-c", "write -P 0x01 0 3M", "-c", "write -P 0x02 20M 1M",
      str(img))
    chain = tmp_path / "chain"
    srv = serve()
    try:
        pynbd("backup", *fmt, srv.uri(), str(chain))
    finally:
        srv.stop()
    # a persistent bitmap from now on; qemu-io writes (data, zeroes, discard) mark it
    q("qemu-img", "bitmap", "--add", str(img), "b0")
    q("qemu-io", "-f", "qcow2", "-c", "write -P 0x03 100k 8k", "-c", "write -z 2M 64k",
      "-c", "discard 20M 128k", "-c", "write -P 0x04 30M 1M", str(img))
    writes = [(100 * KiB, 8 * KiB), (2 * MiB, 64 * KiB), (20 * MiB, 128 * KiB),
              (30 * MiB, MiB)]
    srv = serve("-B", "b0")
    try:
        uri = srv.uri()
        # pynbd's client reads the bitmap as nbdinfo does, and as written
        mine = pynbd_dirty(uri, "b0")
        assert mine == nbdinfo_dirty(uri, "b0", trixie_peer=use_trixie)
        assert runs(mine) == expected_dirty(writes, 64 * KiB, SIZE)
        out = json.loads(pynbd("backup", "--bitmap", "b0", "--json", uri, str(chain)).stdout)
        assert out["type"] == "incremental" and out["bitmap"] == "b0"
        assert out["data_bytes"] + out["zero_bytes"] == sum(
            n for _, n in expected_dirty(writes, 64 * KiB, SIZE))
        assert out.get("format", "raw") == ("qcow2" if use_trixie else "raw")
    finally:
        srv.stop()
    raw = tmp_path / "q.raw"
    q("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw))
    pynbd("restore", str(chain), str(tmp_path / "r.img"))
    assert (tmp_path / "r.img").read_bytes() == raw.read_bytes()
    if use_trixie:  # the chain's last image is the disk for qemu 10, without pynbd
        q("qemu-img", "check", str(chain / "0001.qcow2"))
        q("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(chain / "0001.qcow2"),
          str(raw))
    pynbd("restore", str(chain), str(tmp_path / "r0.img"), "--at", "0")
    r0 = (tmp_path / "r0.img").read_bytes()
    assert r0[:3 * MiB] == b"\x01" * 3 * MiB and r0[30 * MiB:31 * MiB] == bytes(MiB)


def test_restore_to_an_nbd_target(tmp_path: Path) -> None:
    img = image(tmp_path, seed=5)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=1)
    try:
        s.checkpoint("c1")
        pynbd("backup", s.view_uri("c1"), str(chain))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x55 1M 1M", "-c", "write -z 4M 1M", s.uri)
        s.checkpoint("c2")
        pynbd("backup", s.view_uri("c2"), str(chain))
        expected = img.read_bytes()
    finally:
        s.stop()
    target = tmp_path / "t.img"
    target.write_bytes(random.Random(9).randbytes(SIZE))  # garbage everywhere
    from tests.support.pynbd_server import PynbdServer

    t = PynbdServer(["--workers", "2", "--bind", "127.0.0.1", "--port", "0", str(target)],
                    cwd=tmp_path)
    try:
        pynbd("restore", str(chain), t.uri)
    finally:
        t.stop()
    assert hashlib.sha256(target.read_bytes()).hexdigest() == \
        hashlib.sha256(expected).hexdigest()


def test_a_removed_chain_bitmap_means_a_full_backup(tmp_path: Path) -> None:
    img = image(tmp_path, seed=6)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=1)
    try:
        s.checkpoint("c1")
        pynbd("backup", s.view_uri("c1"), str(chain))
        s.checkpoint("--release", "c1")
        s.bitmap("remove", "c1")  # the changes since c1 are forgotten
        v = json.loads(s.checkpoint("c2").stdout)
        assert v["bitmap"] is None
        p = pynbd("backup", s.view_uri("c2"), str(chain), ok=False)
        assert p.returncode == 1
        assert b"does not offer qemu:dirty-bitmap:c1" in p.stderr and b"--full" in p.stderr
        out = json.loads(pynbd("backup", "--full", "--json", s.view_uri("c2"),
                               str(chain)).stdout)
        assert out["type"] == "full" and out["checkpoint"] == "c2"
        s.checkpoint("c3")
        out = json.loads(pynbd("backup", "--json", s.view_uri("c3"), str(chain)).stdout)
        assert out["type"] == "incremental" and out["bitmap"] == "c2"
    finally:
        s.stop()
