"""Dirty bitmaps of ``pynbd serve`` read back by programs nobody here wrote.

Writes go in through qemu-io, libnbd (two connections at once) and ``pynbd write`` at
known offsets; the bitmaps are read with qemu-img's ``x-dirty-bitmap`` map, ``nbdinfo
--map`` (Debian 12 and 13), libnbd's block status (beside base:allocation, in one
request) and pynbd's client. Each must equal the written ranges rounded out to the
bitmap's granularity: nothing more, nothing less.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import nbd
import pytest

from tests.backup._support import (
    KiB,
    MiB,
    Served,
    covers,
    expected_dirty,
    libnbd_dirty,
    nbdinfo_dirty,
    pynbd,
    pynbd_dirty,
    qemu_img_dirty,
    run,
    runs,
)
from tests.support.images import make_image
from tests.support.pynbd_server import wait_until

SIZE = 64 * MiB + 12 * KiB  # the last granule of every bitmap is partial


def image(tmp: Path, size: int = SIZE) -> Path:
    return make_image(tmp / "disk.img", size, {0: 2 * MiB}, seed=1)


def libnbd_handle(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def check_all_readers(s: Served, bitmap: str, gran: int, writes: list[tuple[int, int]],
                      size: int = SIZE) -> None:
    want = expected_dirty(writes, gran, size)
    readers = {
        "qemu-img 7.2 x-dirty-bitmap": qemu_img_dirty(s.port, s.name, bitmap),
        "nbdinfo 1.14 --map": nbdinfo_dirty(s.uri, bitmap),
        "qemu-img 10 x-dirty-bitmap": qemu_img_dirty(s.port, s.name, bitmap, trixie_peer=True),
        "nbdinfo 1.22 --map": nbdinfo_dirty(s.uri, bitmap, trixie_peer=True),
        "pynbd client": pynbd_dirty(s.uri, bitmap),
    }
    dirty, alloc = libnbd_dirty(s.uri, bitmap, size)
    readers["libnbd block_status (with base:allocation)"] = dirty
    assert covers(alloc, size)
    for who, ext in readers.items():
        assert covers(ext, size), f"{who}: extents do not tile the export: {ext}"
        assert runs(ext) == want, f"{who} disagrees with the writes:\n{runs(ext)}\n{want}"
        # qemu-nbd's semantics: every boundary inside the export is a granule boundary
        for off, ln, _ in ext:
            assert off % gran == 0 and ((off + ln) % gran == 0 or off + ln == size), (who, ext)


@pytest.mark.parametrize("workers", [1, 2])
def test_bitmaps_equal_the_writes(tmp_path: Path, workers: int) -> None:
    img = image(tmp_path)
    s = Served(tmp_path, img, bitmaps=["b64k", {"name": "b1m", "granularity": "1M"}],
               workers=workers)
    try:
        # one more, added at run time with its own granularity
        out = json.loads(s.bitmap("add", "--granularity", "4K", "b4k").stdout)
        assert out["granularity"] == 4096 and out["state"] == "active"
        writes: list[tuple[int, int]] = []
        # qemu-io: WRITE, WRITE_ZEROES, TRIM, and the partial last granule
        run("qemu-io", "-f", "raw", "-c", "write -P 0x11 100k 8k", "-c", "write -z 10M 4k",
            "-c", "discard 20M 64k", "-c", f"write -P 0x12 {SIZE - 4096} 4096", s.uri)
        writes += [(100 * KiB, 8 * KiB), (10 * MiB, 4 * KiB), (20 * MiB, 64 * KiB),
                   (SIZE - 4096, 4096)]
        # libnbd, two connections at once (with two workers: on both of them)
        h1, h2 = libnbd_handle(s.uri), libnbd_handle(s.uri)

        def one() -> None:
            h1.pwrite(b"\x21" * 5000, 30 * MiB + 1)
            h1.trim(128 * KiB, 50 * MiB)

        def two() -> None:
            h2.zero(3 * MiB, 40 * MiB)
            h2.pwrite(b"\x22\x23", MiB - 1)

        ts = [threading.Thread(target=one), threading.Thread(target=two)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        h1.shutdown()
        h2.shutdown()
        writes += [(30 * MiB + 1, 5000), (50 * MiB, 128 * KiB), (40 * MiB, 3 * MiB),
                   (MiB - 1, 2)]
        # pynbd write
        pynbd("write", s.uri, "--from", str(57 * MiB + 333), input=os.urandom(70000))
        writes.append((57 * MiB + 333, 70000))
        # reads mark nothing
        run("qemu-io", "-f", "raw", "-r", "-c", "read 0 8M", s.uri)
        for name, gran in (("b64k", 64 * KiB), ("b1m", MiB), ("b4k", 4 * KiB)):
            check_all_readers(s, name, gran, writes)
        st = {b["name"]: b for b in s.export_status()["bitmaps"]}
        for name, gran in (("b64k", 64 * KiB), ("b1m", MiB), ("b4k", 4 * KiB)):
            want = sum(n for _, n in expected_dirty(writes, gran, SIZE))
            assert st[name]["dirty_bytes"] == want
        listed = json.loads(s.bitmap("list").stdout)
        assert sorted(b["name"] for b in listed) == ["b1m", "b4k", "b64k"]
        # clear: clean from then on, and marking again afterwards
        s.bitmap("clear", "b64k")
        assert nbdinfo_dirty(s.uri, "b64k") == [(0, SIZE, False)]
        run("qemu-io", "-f", "raw", "-c", "write 5M 1", s.uri)
        assert runs(nbdinfo_dirty(s.uri, "b64k")) == [(5 * MiB, 64 * KiB)]
    finally:
        s.stop()


def test_bitmap_added_at_run_time_reaches_every_worker(tmp_path: Path) -> None:
    s = Served(tmp_path, image(tmp_path), workers=2)
    try:
        # connections made before the bitmap exists, spread over both workers
        old = [libnbd_handle(s.uri) for _ in range(4)]
        assert wait_until(lambda: len({c["worker"] for c in s.status()["client_list"]
                                       if c["state"] == "negotiated"}) == 2)
        assert not old[0].can_meta_context("qemu:dirty-bitmap:late")
        s.bitmap("add", "late")
        writes = []
        for i, h in enumerate(old):
            h.pwrite(bytes([i + 1]) * 4096, (i * 7 + 1) * MiB)
            writes.append(((i * 7 + 1) * MiB, 4096))
        # new connections in every worker can select it and see every worker's writes
        new = [nbd.NBD() for _ in range(4)]
        for h in new:
            h.add_meta_context("qemu:dirty-bitmap:late")
            h.connect_uri(s.uri)
        assert len({c["worker"] for c in s.status()["client_list"]
                    if c["state"] == "negotiated"}) == 2
        want = expected_dirty(writes, 64 * KiB, SIZE)
        for h in new:
            assert h.can_meta_context("qemu:dirty-bitmap:late")
            seen: list[tuple[int, int, bool]] = []

            def cb(meta: str, off: int, ents: list[int], err: int, seen=seen) -> int:
                p = off
                for i in range(0, len(ents), 2):
                    seen.append((p, ents[i], bool(ents[i + 1] & 1)))
                    p += ents[i]
                return 0

            h.block_status(SIZE, 0, cb)
            assert runs(seen) == want
        # removal: gone for new connections everywhere, the name is free again
        s.bitmap("remove", "late")
        for _ in range(4):
            h = nbd.NBD()
            h.add_meta_context("qemu:dirty-bitmap:late")
            h.connect_uri(s.uri)
            assert not h.can_meta_context("qemu:dirty-bitmap:late")
            h.shutdown()
        for h in old + new:
            h.shutdown()
    finally:
        s.stop()


def test_list_meta_context_queries(tmp_path: Path) -> None:
    s = Served(tmp_path, image(tmp_path), bitmaps=["a", "b"], workers=1)
    try:
        def listed(*queries: str) -> list[str]:
            h = nbd.NBD()
            h.set_opt_mode(True)
            h.connect_uri(s.uri)
            for q in queries:
                h.add_meta_context(q)
            out: list[str] = []
            h.opt_list_meta_context(lambda name: out.append(name) or 0)
            h.opt_abort()
            return sorted(out)

        every = ["base:allocation", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]
        assert listed() == every
        assert listed("qemu:") == every[1:]
        assert listed("qemu:dirty-bitmap:") == every[1:]
        assert listed("qemu:dirty-bitmap:b") == every[2:]
        assert listed("base:") == every[:1]
        info = json.loads(run("nbdinfo", "--json", s.uri).stdout)
        assert sorted(info["exports"][0]["contexts"]) == every
    finally:
        s.stop()


def test_bitmaps_survive_a_clean_restart(tmp_path: Path) -> None:
    img = image(tmp_path)
    s = Served(tmp_path, img, bitmaps=["keep"], workers=2)
    try:
        s.bitmap("add", "--granularity", "1M", "added")
        run("qemu-io", "-f", "raw", "-c", "write 3M 10k", "-c", "write 33M 1M", s.uri)
        before = {b: nbdinfo_dirty(s.uri, b) for b in ("keep", "added")}
    finally:
        s.stop()
    meta = json.loads((tmp_path / "disk.img.pynbd-bitmaps" / "bitmaps.json").read_text())
    assert meta["in_use"] is False and {b["name"] for b in meta["bitmaps"]} == {"keep", "added"}
    s = Served(tmp_path, img, bitmaps=["keep"], workers=2, tag="2")
    try:
        for b, ext in before.items():
            assert nbdinfo_dirty(s.uri, b) == ext
        st = {b["name"]: b for b in s.export_status()["bitmaps"]}
        assert st["added"]["granularity"] == MiB and st["keep"]["state"] == "active"
        # and they go on marking
        run("qemu-io", "-f", "raw", "-c", "write 60M 1", s.uri)
        assert runs(nbdinfo_dirty(s.uri, "keep"))[-1] == (60 * MiB, 64 * KiB)
    finally:
        s.stop()


def test_sigkill_leaves_bitmaps_inconsistent_and_refused(tmp_path: Path) -> None:
    img = image(tmp_path)
    s = Served(tmp_path, img, bitmaps=["b0"], workers=2)
    try:
        run("qemu-io", "-f", "raw", "-c", "write 3M 10k", s.uri)
        s.kill()  # no chance to save: the store says in_use
    finally:
        s.stop()
    # the workers of the killed supervisor finish and exit; the store lock goes with it
    s = None
    for attempt in range(50):
        try:
            s = Served(tmp_path, img, bitmaps=["b0"], workers=2, tag=f"k{attempt}")
            break
        except RuntimeError as exc:
            assert "in use by another process" in str(exc)
            import time

            time.sleep(0.2)
    assert s is not None
    try:
        assert "bitmap 'b0' is inconsistent" in s.srv.stderr
        st = s.export_status()["bitmaps"][0]
        assert st["state"] == "inconsistent" and "did not stop cleanly" in st["reason"]
        assert st["dirty_bytes"] is None
        # not advertised; asking for it is refused with the reason
        info = json.loads(run("nbdinfo", "--json", s.uri).stdout)
        assert info["exports"][0]["contexts"] == ["base:allocation"]
        from pynbd.client import Client, OptionError

        c = Client.dial(s.uri)
        c.handshake()
        c.extended_headers()
        with pytest.raises(OptionError) as ei:
            c.set_meta_context("base:allocation", "qemu:dirty-bitmap:b0")
        assert "inconsistent" in str(ei.value) and "did not stop cleanly" in str(ei.value)
        c.hard_close()
        p = run("nbdinfo", "--map=qemu:dirty-bitmap:b0", s.uri, ok=False,
                env={"LIBNBD_DEBUG": "1"})
        assert p.returncode != 0 and "inconsistent" in p.stderr
        p = run("qemu-img", "map", "--output=json", "--image-opts",
                f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={s.port},"
                f"export=disk,x-dirty-bitmap=qemu:dirty-bitmap:b0", ok=False)
        assert p.returncode != 0
        # a clean restart does not make it consistent again
        s.stop()
        s = Served(tmp_path, img, bitmaps=["b0"], workers=1, tag="again")
        assert s.export_status()["bitmaps"][0]["state"] == "inconsistent"
        # clear: usable (and empty) from now on
        s.bitmap("clear", "b0")
        assert nbdinfo_dirty(s.uri, "b0") == [(0, SIZE, False)]
        run("qemu-io", "-f", "raw", "-c", "write 7M 1", s.uri)
        assert runs(nbdinfo_dirty(s.uri, "b0")) == [(7 * MiB, 64 * KiB)]
    finally:
        s.stop()


def test_memory_export_bitmaps_are_in_memory_only(tmp_path: Path) -> None:
    from tests.support.pynbd_server import PynbdServer

    ctl = str(tmp_path / "ctl.sock")
    srv = PynbdServer(["--workers", "2", "--bind", "127.0.0.1", "--port", "0", "--control",
                       ctl, "memory:16M"], cwd=tmp_path)
    try:
        out = pynbd("bitmap", "--control", ctl, "add", "m").stdout
        assert json.loads(out)["persistent"] is False
        run("qemu-io", "-f", "raw", "-c", "write 1M 1", srv.uri)
        assert runs(nbdinfo_dirty(srv.uri, "m")) == [(MiB, 64 * KiB)]
    finally:
        srv.stop()
    assert "live in memory only" in srv.stderr
    assert not list(tmp_path.glob("*.pynbd-bitmaps"))


def test_bitmap_command_errors(tmp_path: Path) -> None:
    s = Served(tmp_path, image(tmp_path), bitmaps=["b0"], workers=1)
    try:
        cases = [
            (("add", "b0"), "already has a bitmap 'b0'"),
            (("add", "bad/name"), "is not valid"),
            (("add", "x@y"), "is not valid"),
            (("add", "--granularity", "3000", "g"), "power of two"),
            (("add", "--granularity", "256", "g"), "power of two"),
            (("remove", "nope"), "has no bitmap 'nope'"),
            (("clear", "nope"), "has no bitmap 'nope'"),
            (("add", "--export", "nope", "x"), "no export 'nope'"),
        ]
        for args, msg in cases:
            p = s.bitmap(*args, ok=False)
            assert p.returncode == 1 and msg in p.stderr.decode(), (args, p.stderr)
        p = s.bitmap("add", ok=False)
        assert p.returncode == 2 and b"required: BITMAP" in p.stderr
        p = s.bitmap("list", "--granularity", "4K", ok=False)
        assert p.returncode == 2 and b"unrecognized arguments" in p.stderr
        p = pynbd("bitmap", "--control", str(tmp_path / "none.sock"), "list", ok=False)
        assert p.returncode == 3 and b"no control socket" in p.stderr
        # the server is fine afterwards
        assert [b["name"] for b in json.loads(s.bitmap("list").stdout)] == ["b0"]
    finally:
        s.stop()


def test_bad_bitmaps_in_the_config_are_refused(tmp_path: Path) -> None:
    img = image(tmp_path)
    for bad, msg in ((['"a"', '"a"'], "given twice"), (['"-x"'], "is not valid"),
                     (['{name = "g", granularity = "3K"}'], "power of two")):
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f'[[export]]\nname = "d"\ntarget = "{img}"\n'
                       f"bitmaps = [{', '.join(bad)}]\n")
        p = pynbd("serve", "--config", str(cfg), "--port", "0", ok=False, timeout=30)
        assert p.returncode == 2 and msg in p.stderr.decode(), p.stderr


def test_a_second_server_on_the_same_image_is_refused(tmp_path: Path) -> None:
    img = image(tmp_path)
    s = Served(tmp_path, img, bitmaps=["b0"], workers=1)
    try:
        cfg = tmp_path / "serve.toml"
        p = pynbd("serve", "--config", str(cfg), "--bind", "127.0.0.1", "--port", "0",
                  ok=False, timeout=30)
        assert p.returncode == 2 and b"in use by another process" in p.stderr
        assert nbdinfo_dirty(s.uri, "b0") == [(0, SIZE, False)]
    finally:
        s.stop()
