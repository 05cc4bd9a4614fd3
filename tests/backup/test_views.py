"""Point-in-time views (``pynbd checkpoint``): the image exactly as it was at the
checkpoint while clients keep writing to the live export, in one worker and across two
worker processes, read back by qemu-img, nbdcopy and libnbd; a view whose scratch space
runs out fails alone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from tests.backup._support import KiB, MiB, Served, pynbd, run
from tests.support.images import make_image
from tests.support.pynbd_server import wait_until

SIZE = 32 * MiB


def image(tmp: Path, size: int = SIZE, seed: int = 1) -> Path:
    # data, holes and zeros
    return make_image(tmp / "disk.img", size, {off: 3 * MiB for off in range(0, size, 4 * MiB)},
                      seed=seed)


def handles(uri: str, n: int) -> list[nbd.NBD]:
    out = []
    for _ in range(n):
        h = nbd.NBD()
        h.connect_uri(uri)
        out.append(h)
    return out


def read_view(uri: str, dest: Path) -> bytes:
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dest))
    return dest.read_bytes()


@pytest.mark.parametrize("workers", [1, 2])
def test_view_is_the_image_at_the_checkpoint(tmp_path: Path, workers: int) -> None:
    img = image(tmp_path)
    before = img.read_bytes()
    s = Served(tmp_path, img, workers=workers)
    try:
        view = json.loads(s.checkpoint("c1").stdout)
        assert view["name"] == "disk@c1" and view["bitmap"] is None and view["state"] == "ok"
        assert view["uris"] == [s.view_uri("c1")]
        hs = handles(s.uri, 4)
        rnd = random.Random(2)
        expected_live = bytearray(before)
        # overwrite, trim and zero (data, holes, partial blocks, across block edges) from
        # four connections; some blocks twice
        for i in range(200):
            h = hs[i % 4]
            off = rnd.randrange(0, SIZE - 256 * KiB)
            n = rnd.randrange(1, 256 * KiB)
            kind = i % 10
            if kind == 8:
                h.zero(n, off)
                expected_live[off:off + n] = bytes(n)
            elif kind == 9:
                h.trim(n, off)  # the file backend punches a hole: zeros
                expected_live[off:off + n] = bytes(n)
            else:
                data = rnd.randbytes(n)
                h.pwrite(data, off)
                expected_live[off:off + n] = data
        for h in hs:
            h.flush()
        got = read_view(s.view_uri("c1"), tmp_path / "view.raw")
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(before).hexdigest()
        assert img.read_bytes() == bytes(expected_live)
        # nbdcopy and libnbd read the same; the view's base:allocation covers it
        run("nbdcopy", s.view_uri("c1"), str(tmp_path / "view2.raw"))
        assert (tmp_path / "view2.raw").read_bytes() == before
        hv = nbd.NBD()
        hv.add_meta_context("base:allocation")
        hv.connect_uri(s.view_uri("c1"))
        assert hv.is_read_only() and hv.get_size() == SIZE
        with pytest.raises(nbd.Error) as ei:
            hv.pwrite(b"x", 0)
        assert ei.value.errno in ("EPERM", "EROFS") or "read-only" in str(ei.value)
        m = json.loads(run("nbdinfo", "--json", "--map", s.view_uri("c1")).stdout)
        assert m[0]["offset"] == 0 and sum(e["length"] for e in m) == SIZE
        assert any(e["type"] & 2 for e in m) and any(not e["type"] & 2 for e in m)
        for e in m:
            if e["type"] & 2:  # the view says zero: it was zero at the checkpoint
                assert before[e["offset"]:e["offset"] + e["length"]] == bytes(e["length"])
        hv.shutdown()
        st = s.export_status()
        v = st["views"][0]
        assert v["state"] == "ok" and v["saved_bytes"] > 0 and v["scratch_bytes"] > 0
        assert s.export_status("disk@c1")["view"]["name"] == "disk@c1"
        for h in hs:
            h.shutdown()
        # release: gone for new clients, its scratch space freed
        out = s.checkpoint("--release", "c1").stdout.decode()
        assert "released disk@c1" in out
        p = run("nbdinfo", s.view_uri("c1"), ok=False)
        assert p.returncode != 0
        assert s.export_status()["views"] == []
        assert not [e for e in s.status()["exports"] if e["name"] == "disk@c1"]
    finally:
        s.stop()


def test_two_workers_writing_the_same_blocks_keep_the_old_data(tmp_path: Path) -> None:
    """Writers in two processes race for the same unsaved blocks: the copy-before-write
    lock must let exactly one save each block, before any write lands."""
    img = image(tmp_path, seed=3)
    s = Served(tmp_path, img, workers=2)
    try:
        hs = handles(s.uri, 4)
        assert wait_until(lambda: len({c["worker"] for c in s.status()["client_list"]
                                       if c["state"] == "negotiated"}) == 2)
        for rnd_no in range(4):
            before = img.read_bytes()
            s.checkpoint(f"r{rnd_no}")
            errors: list[BaseException] = []

            def hammer(h: nbd.NBD, seed: int, errors: list[BaseException] = errors) -> None:
                rnd = random.Random(seed)
                try:
                    for _ in range(150):
                        blk = rnd.randrange(0, 48)  # 48 blocks of 64 KiB: many collisions
                        off = blk * 64 * KiB + rnd.randrange(0, 60 * KiB)
                        h.pwrite(bytes([seed & 0xFF]) * rnd.randrange(1, 8 * KiB), off)
                except BaseException as exc:
                    errors.append(exc)

            ts = [threading.Thread(target=hammer, args=(h, 100 * rnd_no + i))
                  for i, h in enumerate(hs)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(120)
            assert not errors
            got = read_view(s.view_uri(f"r{rnd_no}"), tmp_path / f"v{rnd_no}.raw")
            assert got[:4 * MiB] == before[:4 * MiB]
            assert got == before
            s.checkpoint("--release", f"r{rnd_no}")
        for h in hs:
            h.shutdown()
    finally:
        s.stop()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, so a scratch file on it runs out of space (unmounted after)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,mode=0700", "tmpfs",
                        str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root): {p.stderr}", pytrace=False)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_scratch_out_of_space_fails_the_view_not_the_live_export(tmp_path: Path,
                                                                  small_tmpfs: Path) -> None:
    img = image(tmp_path, seed=4)
    before = img.read_bytes()
    s = Served(tmp_path, img, workers=2)
    try:
        small = json.loads(s.checkpoint("--scratch", str(small_tmpfs), "small").stdout)
        assert str(small_tmpfs) in small["scratch"]
        roomy = json.loads(s.checkpoint("roomy").stdout)  # scratch next to the image
        assert roomy["state"] == "ok"
        hs = handles(s.uri, 2)
        rnd = random.Random(5)
        live = bytearray(before)
        # 4 MiB of new data over blocks that hold data: far more than 1 MiB to save
        for i in range(64):
            data = rnd.randbytes(64 * KiB)
            off = i * 64 * KiB
            hs[i % 2].pwrite(data, off)  # every write succeeds
            live[off:off + len(data)] = data
        for h in hs:
            h.flush()
        assert img.read_bytes() == bytes(live)
        st = {v["name"]: v for v in s.export_status()["views"]}
        assert st["disk@small"]["state"] == "failed"
        assert "ENOSPC" in st["disk@small"]["error"]
        assert st["disk@roomy"]["state"] == "ok"
        assert s.export_status()["errors"] == 0
        assert "view disk@small failed" in s.srv.stderr
        # the failed view's readers get an error; the other view is intact
        hv = nbd.NBD()
        hv.connect_uri(s.view_uri("small"))
        with pytest.raises(nbd.Error) as ei:
            hv.pread(64 * KiB, 0)
        assert ei.value.errno == "EIO"
        hv.shutdown()
        p = run("qemu-img", "convert", "-f", "raw", "-O", "raw", s.view_uri("small"),
                str(tmp_path / "x.raw"), ok=False)
        assert p.returncode != 0
        assert read_view(s.view_uri("roomy"), tmp_path / "roomy.raw") == before
        # a backup of the failed view fails cleanly and leaves no half backup behind
        bk = tmp_path / "bk"
        p = pynbd("backup", s.view_uri("small"), str(bk), ok=False)
        assert p.returncode == 1 and b"EIO" in p.stderr and b"failed" in p.stderr
        assert sorted(x.name for x in bk.iterdir()) == []
        # the live export keeps working after the failure
        hs[0].pwrite(b"after", 5 * MiB)
        assert hs[1].pread(5, 5 * MiB) == b"after"
        # release frees the space
        s.checkpoint("--release", "small")
        st_fs = os.statvfs(small_tmpfs)
        assert st_fs.f_bfree == st_fs.f_blocks or wait_until(
            lambda: os.statvfs(small_tmpfs).f_bfree == os.statvfs(small_tmpfs).f_blocks, 5)
        for h in hs:
            h.shutdown()
    finally:
        s.stop()


def test_checkpoint_errors(tmp_path: Path) -> None:
    img = image(tmp_path)
    s = Served(tmp_path, img, bitmaps=["user"], workers=1)
    try:
        s.checkpoint("c1")
        cases = [
            (("c1",), "already has a bitmap 'c1'"),
            (("user",), "already has a bitmap 'user'"),
            (("bad/name",), "is not valid"),
            (("--release", "nope"), "has no checkpoint view 'nope'"),
            (("--export", "disk@c1", "c2"), "is a point-in-time view"),
            (("--export", "nope", "c2"), "no export 'nope'"),
            (("--scratch", str(img), "c3"), "cannot create the scratch file"),
        ]
        for args, msg in cases:
            p = s.checkpoint(*args, ok=False)
            assert p.returncode == 1 and msg in p.stderr.decode(), (args, p.stderr)
        p = s.bitmap("clear", "c1", ok=False)  # would make the next backup incomplete
        assert p.returncode == 1 and b"cannot be cleared" in p.stderr
        p = s.bitmap("remove", "c1")  # the active chain bitmap may go
        p = s.checkpoint("c2")
        assert json.loads(p.stdout)["bitmap"] is None  # the chain was broken: no bitmap
        # a frozen bitmap cannot be removed or cleared behind its view
        s.checkpoint("c3")
        for act in ("remove", "clear"):
            p = s.bitmap(act, "c2", ok=False)
            assert p.returncode == 1 and b"frozen in view disk@c3" in p.stderr
        views = json.loads(s.checkpoint("--list").stdout)
        assert sorted(v["name"] for v in views) == ["disk@c1", "disk@c2", "disk@c3"]
        # the server is fine afterwards
        assert read_view(s.view_uri("c1"), tmp_path / "c1.raw") == img.read_bytes()
    finally:
        s.stop()


def test_memory_export_views(tmp_path: Path) -> None:
    from tests.support.pynbd_server import PynbdServer

    ctl = str(tmp_path / "ctl.sock")
    srv = PynbdServer(["--workers", "2", "--bind", "127.0.0.1", "--port", "0", "--control",
                       ctl, "-e", "mem", "memory:16M"], cwd=tmp_path)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri)
        h.pwrite(b"\x01" * MiB, 0)
        view = json.loads(pynbd("checkpoint", "--control", ctl, "c1").stdout)
        h.pwrite(b"\x02" * MiB, 0)
        h.trim(MiB, 0)
        base = srv.uri.rsplit("/", 1)[0]
        hv = nbd.NBD()
        hv.connect_uri(f"{base}/mem@c1")
        assert hv.pread(MiB, 0) == b"\x01" * MiB
        assert hv.pread(MiB, MiB) == bytes(MiB)
        assert view["scratch"].startswith(os.environ.get("TMPDIR", "/tmp"))
        hv.shutdown()
        h.shutdown()
    finally:
        srv.stop()


def test_a_replaced_worker_serves_the_views_and_bitmaps(tmp_path: Path) -> None:
    """Run-time state reaches a worker started later (one replaced after a crash)."""
    import signal

    img = image(tmp_path, seed=6)
    before = img.read_bytes()
    s = Served(tmp_path, img, workers=2)
    try:
        s.bitmap("add", "b")
        s.checkpoint("c1")
        pids = s.status()["worker_pids"]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: set(s.status()["worker_pids"]).isdisjoint(pids)
                          and s.status()["worker_restarts"] >= 2, 20)
        assert wait_until(lambda: run("nbdinfo", s.view_uri("c1"), ok=False).returncode == 0,
                          10)
        hs = handles(s.uri, 4)
        for i, h in enumerate(hs):
            h.pwrite(bytes([i + 7]) * 100 * KiB, i * 3 * MiB)
        assert read_view(s.view_uri("c1"), tmp_path / "v.raw") == before
        from tests.backup._support import nbdinfo_dirty, runs

        assert [o for o, _ in runs(nbdinfo_dirty(s.uri, "b"))] == [0, 3 * MiB, 6 * MiB,
                                                                    9 * MiB]
        for h in hs:
            h.shutdown()
    finally:
        s.stop()
