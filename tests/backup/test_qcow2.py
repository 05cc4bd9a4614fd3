"""qcow2 backup images: the writer's files checked by qemu-img (Debian 12's qemu 7.2 and
Debian 13's qemu 10) and compared byte for byte with what they should hold; the reader
against images qemu made; ``pynbd backup --format qcow2`` chains of views, read by
qemu through their backing files and by ``pynbd restore``; the refusals."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from pynbd.backup.engine import _cluster_plan
from pynbd.backup.qcow2 import CLUSTER, Qcow2Error, Qcow2Reader, Qcow2Writer
from tests.backup._support import KiB, MiB, Served, pynbd, run
from tests.support import trixie
from tests.support.images import make_image

Runner = Callable[..., None]


def _qemu(peer: str) -> Runner:
    """Run a qemu tool of the given Debian release; a non-zero exit fails the test."""
    def go(*cmd: str) -> None:
        if peer == "debian13":
            trixie.run(list(cmd))
        else:
            run(*cmd)
    return go


def _qemu_out(peer: str, *cmd: str) -> str:
    if peer == "debian13":
        return trixie.run(list(cmd)).stdout
    return run(*cmd).stdout


def _write(path: Path, size: int, backing: str | None, fmt: str | None,
           ops: list[tuple[str, int, bytes | int]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, size, backing, fmt)
        for kind, off, what in ops:
            if kind == "write":
                assert isinstance(what, bytes)
                w.write(off, what)
            else:
                assert isinstance(what, int)
                w.zero(off, what)
        w.finish()
    finally:
        os.close(fd)


def _model_ops(rnd: random.Random, size: int, count: int, zero_share: float
               ) -> list[tuple[str, int, bytes | int]]:
    """Non-overlapping cluster-aligned writes (some all-zero, some with zero clusters
    inside) and zeroings, in random order."""
    clusters = size // CLUSTER  # whole clusters only: the tail is the caller's
    used: set[int] = set()
    ops: list[tuple[str, int, bytes | int]] = []
    for c in rnd.sample(range(clusters), min(count, clusters)):
        k = rnd.choice((1, 1, 2, 5))
        span = [x for x in range(c, min(c + k, clusters))]
        if used.intersection(span):
            continue
        used.update(span)
        off = c * CLUSTER
        n = min(len(span) * CLUSTER, size - off)
        if rnd.random() < zero_share:
            ops.append(("zero", off, n))
        else:
            data = bytearray(rnd.randbytes(n))
            if len(span) > 2:
                data[CLUSTER:2 * CLUSTER] = bytes(CLUSTER)  # a zero cluster in a run
            ops.append(("write", off, bytes(data)))
    return ops


def _apply(model: bytearray, ops: list[tuple[str, int, bytes | int]]) -> None:
    for kind, off, what in ops:
        if kind == "write":
            assert isinstance(what, bytes)
            model[off:off + len(what)] = what
        else:
            assert isinstance(what, int)
            model[off:off + what] = bytes(what)


@pytest.mark.parametrize("peer", ["debian12", "debian13"])
def test_written_images_pass_qemu_img_check_and_hold_the_data(tmp_path: Path,
                                                              peer: str) -> None:
    """A full image spanning several L2 tables with an unaligned tail, then two
    incremental images on top (backing qcow2, then one on a raw base): qemu-img check
    finds no error, qemu reads each one through its chain as the model says, and the
    reader returns the same bytes."""
    q = _qemu(peer)
    rnd = random.Random(7)
    size = 1536 * MiB + 3 * 512  # three L2 tables, a last cluster of 1,536 bytes
    model = bytearray(size)
    first = _model_ops(rnd, size, 160, 0.2)
    first.append(("write", size - 1536, rnd.randbytes(1536)))
    _write(tmp_path / "0.qcow2", size, None, None, first)
    _apply(model, first)
    later = _model_ops(rnd, size, 120, 0.4)
    _write(tmp_path / "1.qcow2", size, "0.qcow2", "qcow2", later)
    _apply(model, later)
    expect = tmp_path / "model.raw"
    for name in ("0.qcow2", "1.qcow2"):
        out = _qemu_out(peer, "qemu-img", "check", "--output=json", str(tmp_path / name))
        rep = json.loads(out)
        assert rep.get("check-errors", 0) == 0 and rep.get("corruptions", 0) == 0, rep
        assert rep.get("leaks", 0) == 0, rep
    with open(expect, "wb") as f:
        f.write(model)
    q("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "1.qcow2"),
      str(expect))
    info = json.loads(_qemu_out(peer, "qemu-img", "info", "--output=json",
                                "--backing-chain", str(tmp_path / "1.qcow2")))
    assert [i["filename"].rsplit("/", 1)[-1] for i in info] == ["1.qcow2", "0.qcow2"]
    assert info[0]["backing-filename-format"] == "qcow2"
    assert info[0]["virtual-size"] == size
    # the reader: each image alone (clusters it does not hold read as zeros)
    fd = os.open(tmp_path / "1.qcow2", os.O_RDONLY)
    try:
        r = Qcow2Reader(fd, "1.qcow2")
        assert r.size == size and r.backing == "0.qcow2"
        for kind, off, what in later:
            n = len(what) if isinstance(what, bytes) else what
            got = r.pread(off, n)
            assert got == (what if isinstance(what, bytes) else bytes(n)), (kind, off)
    finally:
        os.close(fd)
    # compressed: random data stays as it is; text shrinks, and qemu reads it back
    fd = os.open(tmp_path / "0z.qcow2", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, size, compress=6)
        for kind, off, what in first:
            if kind == "write":
                assert isinstance(what, bytes)
                w.write(off, what)
        w.finish()
        # random data does not shrink; only the short last cluster (padded with zeros) does
        assert w.compressed_clusters == 1 and w.data_clusters > 100
    finally:
        os.close(fd)
    texty: list[tuple[str, int, bytes | int]] = [
        ("write", off, ((b"pynbd %08d " % off) * CLUSTER)[:CLUSTER])
        for off in range(0, 300 * CLUSTER, 3 * CLUSTER)]
    texty.append(("write", size - 1536, b"end!" * 384))  # the short last cluster
    fd = os.open(tmp_path / "0y.qcow2", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        w = Qcow2Writer(fd, size, compress=6)
        for _kind, off, what in texty:
            assert isinstance(what, bytes)
            w.write(off, what)
        w.finish()
        assert w.compressed_clusters == len(texty) and w.data_clusters == 0
    finally:
        os.close(fd)
    assert (tmp_path / "0y.qcow2").stat().st_size < MiB  # 6.3 MiB of data
    text_model = bytearray(size)
    _apply(text_model, texty)
    (tmp_path / "text.raw").write_bytes(text_model)
    for name, raw_file in (("0z.qcow2", None), ("0y.qcow2", tmp_path / "text.raw")):
        rep = json.loads(_qemu_out(peer, "qemu-img", "check", "--output=json",
                                   str(tmp_path / name)))
        assert rep.get("check-errors", 0) == 0 and rep.get("corruptions", 0) == 0, rep
        assert rep.get("leaks", 0) == 0, rep
        if raw_file is not None:
            assert rep["compressed-clusters"] == len(texty)
            q("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / name),
              str(raw_file))
    fd = os.open(tmp_path / "0y.qcow2", os.O_RDONLY)
    try:
        assert Qcow2Reader(fd, "0y.qcow2", size).pread(0, size) == text_model
    finally:
        os.close(fd)
    # a qcow2 incremental on a raw full image
    with open(tmp_path / "base.raw", "wb") as f:
        f.write(model)
    top: list[tuple[str, int, bytes | int]] = [("write", 5 * CLUSTER, b"\x5a" * CLUSTER),
                                               ("zero", 0, 2 * CLUSTER)]
    _write(tmp_path / "2.qcow2", size, "base.raw", "raw", top)
    _apply(model, top)
    with open(expect, "wb") as f:
        f.write(model)
    q("qemu-img", "check", str(tmp_path / "2.qcow2"))
    q("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(tmp_path / "2.qcow2"),
      str(expect))


def test_reader_reads_images_qemu_made_and_refuses_what_it_cannot(tmp_path: Path) -> None:
    img = tmp_path / "q.qcow2"
    run("qemu-img", "create", "-f", "qcow2", str(img), str(8 * MiB))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 100k 300k", "-c", "write -z 1M 64k",
        "-c", "write -P 0x22 5M 1k", str(img))
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    want = (tmp_path / "q.raw").read_bytes()
    fd = os.open(img, os.O_RDONLY)
    try:
        r = Qcow2Reader(fd)
        assert r.size == 8 * MiB and r.backing is None
        assert r.pread(0, 8 * MiB) == want
        assert r.pread(100 * KiB + 7, 5000) == want[100 * KiB + 7:100 * KiB + 5007]
        with pytest.raises(Qcow2Error, match="outside"):
            r.pread(8 * MiB - 10, 11)
    finally:
        os.close(fd)
    # compressed by qemu-img -c: inflated; a damaged stream is an error naming it
    comp = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(tmp_path / "q.raw"),
        str(comp))
    fd = os.open(comp, os.O_RDONLY)
    try:
        r = Qcow2Reader(fd, "c.qcow2")
        assert r.pread(0, 8 * MiB) == want
        table = r._table(0)
        assert table is not None
        entry = table[100 * KiB // CLUSTER]
        assert entry & (1 << 62)  # qemu compressed it
        at = entry & ((1 << 54) - 1)
    finally:
        os.close(fd)
    with open(comp, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 16)
    fd = os.open(comp, os.O_RDONLY)
    try:
        with pytest.raises(Qcow2Error, match="compressed cluster at offset 65536 is damaged"):
            Qcow2Reader(fd, "c.qcow2").pread(100 * KiB, 10)
    finally:
        os.close(fd)
    # not qcow2; an unfinished backup (header still zeros); a corrupt-marked image
    (tmp_path / "x").write_bytes(b"hello" * 100)
    unfinished = tmp_path / "u.qcow2"
    fd = os.open(unfinished, os.O_RDWR | os.O_CREAT, 0o644)
    Qcow2Writer(fd, MiB).write(0, b"\x01" * CLUSTER)
    os.close(fd)
    corrupt = tmp_path / "k.qcow2"
    shutil.copy(img, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(72)
        f.write((2).to_bytes(8, "big"))  # incompatible feature bit 1: corrupt
    for path, msg in ((tmp_path / "x", "is not a qcow2 image"),
                      (unfinished, "is not a qcow2 image"),
                      (corrupt, "marked corrupt")):
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(Qcow2Error, match=msg):
                Qcow2Reader(fd, path.name)
        finally:
            os.close(fd)


def test_writer_refuses_what_qemu_could_not_read(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "w.qcow2", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with pytest.raises(Qcow2Error, match="multiple of 512"):
            Qcow2Writer(fd, MiB + 100)
        with pytest.raises(Qcow2Error, match="backing format"):
            Qcow2Writer(fd, MiB, "0000.vmdk", "vmdk")
        with pytest.raises(Qcow2Error, match="L1 table larger than qemu's 32 MiB"):
            Qcow2Writer(fd, 4 << 50)  # 4 PiB
        w = Qcow2Writer(fd, 4 * CLUSTER, "b.qcow2", "qcow2")
        with pytest.raises(Qcow2Error, match="not cluster-aligned"):
            w.write(512, b"x" * 512)
        with pytest.raises(Qcow2Error, match="not cluster-aligned"):
            w.write(3 * CLUSTER, b"x" * 2 * CLUSTER)  # past the end
        w.write(0, b"x" * CLUSTER)
        with pytest.raises(Qcow2Error, match="given twice"):
            w.zero(0, CLUSTER)
        w.finish()
        with pytest.raises(Qcow2Error, match="finished"):
            w.write(CLUSTER, b"y" * CLUSTER)
    finally:
        os.close(fd)
    run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "b.qcow2"), str(4 * CLUSTER))
    run("qemu-img", "check", str(tmp_path / "w.qcow2"))
    # an empty image (no L1 table at all), with and without a backing file
    _write(tmp_path / "e0.qcow2", 0, None, None, [])
    _write(tmp_path / "e1.qcow2", 0, "e0.qcow2", "qcow2", [])
    run("qemu-img", "check", str(tmp_path / "e1.qcow2"))
    run("qemu-img", "check", str(tmp_path / "e0.qcow2"))
    fd = os.open(tmp_path / "e1.qcow2", os.O_RDONLY)
    try:
        assert Qcow2Reader(fd, "e1", 0).pread(0, 0) == b""
    finally:
        os.close(fd)


def test_cluster_plan_widens_reads_and_keeps_whole_zero_clusters() -> None:
    cs = 64 * KiB
    size = 10 * cs + 1024
    # a 4 KiB dirty write, a zeroing covering clusters 3-5 exactly plus a 4 KiB tail,
    # a zeroing inside one cluster, and a zero range up to the unaligned end
    read = [(cs + 4096, 4096)]
    zero = [(3 * cs, 3 * cs + 4096), (8 * cs + 100, 200), (10 * cs, 1024)]
    r, z = _cluster_plan(read, zero, cs, size)
    assert z == [(3 * cs, 3 * cs), (10 * cs, 1024)]
    assert r == [(cs, cs), (6 * cs, cs), (8 * cs, cs)]
    # every byte the plan touched is read or zero, nothing twice
    covered = sorted(r + z)
    for (a, n), (b, _m) in itertools.pairwise(covered):
        assert a + n <= b
    # a full backup: everything, the zeros that fill clusters stay zero
    r, z = _cluster_plan([(0, cs + 10), (2 * cs + 10, size - 2 * cs - 10)],
                         [(cs + 10, cs)], cs, size)
    assert r == [(0, size)] and z == []
    assert _cluster_plan([], [], cs, size) == ([], [])


SIZE = 24 * MiB


def _image(tmp: Path) -> Path:
    return make_image(tmp / "disk.img", SIZE, {off: MiB + 4096 for off in
                                               range(0, SIZE, 3 * MiB)}, seed=11)


@pytest.mark.parametrize("peer", ["debian12", "debian13"])
def test_qcow2_chain_of_views_reads_as_each_checkpoint_in_qemu(tmp_path: Path,
                                                               peer: str) -> None:
    """A full and three incremental qcow2 backups of checkpoint views, with small
    unaligned writes (4 KiB bitmap granules inside 64 KiB clusters), zeroings and
    trims between them: every image passes qemu-img check, qemu reads each one through
    its backing chain as the disk was at its checkpoint, and pynbd restore rebuilds
    every point."""
    q = _qemu(peer)
    img = _image(tmp_path)
    chain = tmp_path / "chain"
    snaps: list[bytes] = []
    s = Served(tmp_path, img, workers=2)
    steps = [
        [],
        ["write -P 0x41 4k 4k", "write -P 0x42 1000k 72k", "write -z 6M 192k",
         "discard 9M 64k"],
        ["write -P 0x43 0 512", "write -z 3M 4k", "write -P 0x44 23M 1M"],
        ["write -z 0 24M", "write -P 0x45 12M 64k"],
    ]
    try:
        for i, cmds in enumerate(steps):
            if cmds:
                args = [c for cmd in cmds for c in ("-c", cmd)]
                run("qemu-io", "-f", "raw", *args, s.uri)
            s.checkpoint("--granularity", "4096", f"c{i}")
            snaps.append(img.read_bytes())  # nothing writes now: the view's instant
            fmt = ["--format", "qcow2"] if i == 0 else []  # later ones follow the chain
            out = json.loads(pynbd("backup", "--json", *fmt, s.view_uri(f"c{i}"),
                                   str(chain)).stdout)
            assert out["file"] == f"{i:04d}.qcow2" and out["format"] == "qcow2"
            assert out["backing"] == (None if i == 0 else f"{i - 1:04d}.qcow2")
            assert out["type"] == ("full" if i == 0 else "incremental")
            if i:
                s.checkpoint("--release", f"c{i - 1}")
    finally:
        s.stop()
    manifest = json.loads((chain / "manifest.json").read_text())
    assert manifest["version"] == 2
    for i, want in enumerate(snaps):
        f = chain / f"{i:04d}.qcow2"
        rep = json.loads(_qemu_out(peer, "qemu-img", "check", "--output=json", str(f)))
        assert rep.get("check-errors", 0) == 0 and rep.get("corruptions", 0) == 0, rep
        assert rep.get("leaks", 0) == 0, rep
        (tmp_path / "want.raw").write_bytes(want)
        q("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(f), str(tmp_path / "want.raw"))
        got = tmp_path / f"r{i}.img"
        p = pynbd("restore", str(chain), str(got), "--at", str(i))
        assert b"every range verified" in p.stdout
        assert got.read_bytes() == want, i
        got.unlink()
    # an incremental holds only what changed: the last step zeroed the disk and wrote
    # one cluster; its image takes a few clusters of data plus tables
    assert (chain / "0003.qcow2").stat().st_size < 2 * MiB
    # the whole chain without pynbd: qemu-img convert flattens the last point
    q("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(chain / "0003.qcow2"),
      str(tmp_path / "flat.raw"))
    assert (tmp_path / "flat.raw").read_bytes() == snaps[-1]


def test_qcow2_after_raw_and_the_refusals(tmp_path: Path) -> None:
    """A qcow2 incremental on a raw full backup (backing format raw); a qcow2
    incremental after a raw incremental is refused (qemu could not use the raw one as a
    backing file); a damaged qcow2 backup fails its restore by name; an image whose size
    qcow2 cannot hold is refused with a hint and leaves the chain as it was."""
    img = _image(tmp_path)
    chain = tmp_path / "chain"
    s = Served(tmp_path, img, workers=1)
    try:
        s.checkpoint("c0")
        pynbd("backup", s.view_uri("c0"), str(chain))  # raw, full
        run("qemu-io", "-f", "raw", "-c", "write -P 0x61 2M 100k", s.uri)
        s.checkpoint("c1")
        out = json.loads(pynbd("backup", "--json", "--format", "qcow2", s.view_uri("c1"),
                               str(chain)).stdout)
        assert out["backing"] == "0000.raw" and out["format"] == "qcow2"
        want1 = img.read_bytes()
        s.checkpoint("--release", "c0")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x62 5M 64k", s.uri)
        s.checkpoint("c2")
        out = json.loads(pynbd("backup", "--json", "--format", "raw", s.view_uri("c2"),
                               str(chain)).stdout)
        assert out["file"] == "0002.raw" and "format" not in out
        s.checkpoint("--release", "c1")
        s.checkpoint("c3")
        p = pynbd("backup", "--format", "qcow2", s.view_uri("c3"), str(chain), ok=False)
        assert p.returncode == 1
        assert b"raw incremental" in p.stderr and b"--full --format qcow2" in p.stderr
        pynbd("backup", "--full", "--format", "qcow2", s.view_uri("c3"), str(chain))
    finally:
        s.stop()
    run("qemu-img", "check", str(chain / "0001.qcow2"))
    (tmp_path / "want1.raw").write_bytes(want1)
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(chain / "0001.qcow2"),
        str(tmp_path / "want1.raw"))
    pynbd("restore", str(chain), str(tmp_path / "r1.img"), "--at", "1")
    assert (tmp_path / "r1.img").read_bytes() == want1
    listing = json.loads(pynbd("restore", str(chain), "--list").stdout)
    assert [b["file"] for b in listing["backups"]] == [
        "0000.raw", "0001.qcow2", "0002.raw", "0003.qcow2"]
    # damage one data cluster of backup 1: its restore names it, backup 0 still restores
    fd = os.open(chain / "0001.qcow2", os.O_RDONLY)
    try:
        r = Qcow2Reader(fd)
        table = r._table(0)
        assert table is not None
        host = next(e for e in table if e & 0x00FFFFFFFFFFFE00) & 0x00FFFFFFFFFFFE00
    finally:
        os.close(fd)
    with open(chain / "0001.qcow2", "r+b") as f:
        f.seek(host + 10)
        b = f.read(1)
        f.seek(host + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    p = pynbd("restore", str(chain), str(tmp_path / "bad.img"), "--at", "1", ok=False)
    assert p.returncode == 1
    assert b"backup 1 (0001.qcow2)" in p.stderr and b"do not match the checksum" in p.stderr
    with open(chain / "0001.qcow2", "r+b") as f:
        f.write(b"JUNK")
    p = pynbd("restore", str(chain), str(tmp_path / "bad.img"), "--at", "1", ok=False)
    assert p.returncode == 1 and b"not a qcow2 image: the backup is damaged" in p.stderr
    pynbd("restore", str(chain), str(tmp_path / "r0.img"), "--at", "0")
    # a size qcow2 cannot hold (not a multiple of 512): refused, nothing left behind
    odd = make_image(tmp_path / "odd.img", MiB + 100, {0: 4096}, seed=3)
    s = Served(tmp_path, odd, workers=1, tag="odd")
    try:
        p = pynbd("backup", "--format", "qcow2", s.uri, str(tmp_path / "oddchain"), ok=False)
    finally:
        s.stop()
    assert p.returncode == 1 and b"multiple of 512" in p.stderr and b"--format raw" in p.stderr
    assert sorted(os.listdir(tmp_path / "oddchain")) == []


def test_reader_on_damaged_images_errors_clearly(tmp_path: Path) -> None:
    """Random damage to the header and tables of a backup image: the reader either
    reads (the sha256 of restore catches wrong data) or raises Qcow2Error; never another
    exception, never a huge allocation (the L1 table must lie inside the file)."""
    size = 8 * MiB
    good = tmp_path / "good.qcow2"
    rnd = random.Random(5)
    _write(good, size, "base.qcow2", "qcow2",
           [("write", 0, rnd.randbytes(3 * CLUSTER)), ("zero", 5 * CLUSTER, CLUSTER),
            ("write", 100 * CLUSTER, rnd.randbytes(CLUSTER))])
    raw = bytearray(good.read_bytes())
    # where damage matters: the header, the L1 table, the L2 entries in use
    fd = os.open(good, os.O_RDONLY)
    try:
        ok = Qcow2Reader(fd, "good.qcow2", size)
        l1_at = int.from_bytes(raw[40:48], "big")
        l2_at = ok.l1[0] & 0x00FFFFFFFFFFFE00
        table = ok._table(0)
        assert table is not None
        used = [i for i, e in enumerate(table) if e]
    finally:
        os.close(fd)
    meta = [*range(0, 104), *range(l1_at, l1_at + 8),
            *(l2_at + 8 * i + k for i in used for k in range(8))]
    outcomes = {"read": 0, "refused": 0}
    for trial in range(400):
        bad = bytearray(raw)
        for _ in range(rnd.choice((1, 2, 8))):
            pos = rnd.choice(meta)
            bad[pos] = rnd.randrange(256) if trial % 2 else bad[pos] ^ (1 << rnd.randrange(8))
        path = tmp_path / "bad.qcow2"
        path.write_bytes(bad)
        fd = os.open(path, os.O_RDONLY)
        try:
            r = Qcow2Reader(fd, "bad.qcow2", size)
            r.pread(0, size)
            outcomes["read"] += 1
        except Qcow2Error:
            outcomes["refused"] += 1
        finally:
            os.close(fd)
    assert outcomes["refused"] > 20 and outcomes["read"] > 20, outcomes  # both paths ran
    fd = os.open(good, os.O_RDONLY)
    try:
        with pytest.raises(Qcow2Error, match="not 1048576 bytes"):
            Qcow2Reader(fd, "good.qcow2", MiB)
    finally:
        os.close(fd)
    # fields that would make the reader seek past 2^63 or allocate a lot
    big = tmp_path / "big.qcow2"
    for field, value, msg in ((8, 1 << 63, "backing file name"),  # backing_file_offset
                              (16, 4000, "backing file name"),  # backing_file_size
                              (36, 1 << 24, "L1 table"),  # l1_size: 128 MiB
                              (40, (1 << 63) + CLUSTER, "L1 table")):  # l1_table_offset
        bad = bytearray(raw)
        width = 4 if field in (16, 36) else 8
        bad[field:field + width] = value.to_bytes(width, "big")
        big.write_bytes(bad)
        os.truncate(big, 200 * MiB)  # room for a large table: it still must not be read
        fd = os.open(big, os.O_RDONLY)
        try:
            with pytest.raises(Qcow2Error, match=msg):
                Qcow2Reader(fd, "big.qcow2", size)
        finally:
            os.close(fd)


def test_compressed_chain_restores_reads_in_qemu_and_prunes_compressed(tmp_path: Path) -> None:
    """--compress on the first qcow2 backup; the next ones follow the chain. The images
    pass qemu-img check with compressed clusters, hold each point for qemu and for
    pynbd restore, are smaller than the data; a synthetic full made by prune is
    compressed too; --compress with raw is refused."""
    img = make_image(tmp_path / "disk.img", SIZE)  # sparse: patterns written below
    chain = tmp_path / "chain"
    snaps: list[bytes] = []
    steps = [["write -P 0x11 0 6M", "write -P 0x12 10M 3M"],
             ["write -P 0x13 1M 100k", "write -z 11M 1M"],
             ["write -P 0x14 20M 2M"]]
    s = Served(tmp_path, img, workers=1)
    try:
        p = pynbd("backup", "--compress", s.uri, str(tmp_path / "rawchain"), ok=False)
        assert p.returncode == 1 and b"--compress needs --format qcow2" in p.stderr
        for i, cmds in enumerate(steps):
            run("qemu-io", "-f", "raw", *[c for cmd in cmds for c in ("-c", cmd)], s.uri)
            s.checkpoint(f"c{i}")
            snaps.append(img.read_bytes())
            extra = ["--format", "qcow2", "--compress"] if i == 0 else []
            rec = json.loads(pynbd("backup", "--json", *extra, s.view_uri(f"c{i}"),
                                   str(chain)).stdout)
            assert rec["compressed"] is True and rec["format"] == "qcow2"
            if i:
                s.checkpoint("--release", f"c{i - 1}")
    finally:
        s.stop()
    for i, want in enumerate(snaps):
        f = chain / f"{i:04d}.qcow2"
        rep = json.loads(run("qemu-img", "check", "--output=json", str(f)).stdout)
        assert rep.get("check-errors", 0) == 0 and rep.get("leaks", 0) == 0, rep
        assert rep["compressed-clusters"] > 0
        (tmp_path / "want.raw").write_bytes(want)
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(f), str(tmp_path / "want.raw"))
    assert (chain / "0000.qcow2").stat().st_size < MiB  # 9 MiB of patterns
    _restore_each(tmp_path, chain, snaps)
    pynbd("prune", "--keep", "1", str(chain))
    rep = json.loads(run("qemu-img", "check", "--output=json", str(chain / "0002.qcow2")).stdout)
    assert rep.get("check-errors", 0) == 0 and rep["compressed-clusters"] > 0
    assert (chain / "0002.qcow2").stat().st_size < MiB
    _restore_each(tmp_path, chain, {2: snaps[2]})


def _restore_each(tmp: Path, chain: Path, snaps: list[bytes] | dict[int, bytes]) -> None:
    for i, want in (snaps.items() if isinstance(snaps, dict) else enumerate(snaps)):
        out = tmp / f"r{i}.img"
        pynbd("restore", str(chain), str(out), "--at", str(i))
        assert out.read_bytes() == want, i
        out.unlink()
