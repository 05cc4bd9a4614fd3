"""``pynbd serve backup:DIR at=N``: every point of raw and qcow2 chains served read-only
and read by real clients (nbdcopy, qemu-img compare, nbdinfo --map); a damaged range
fails only the reads that touch it; writes refused; a copy-on-write overlay on top
takes writes without touching the chain; the chain is held against prune meanwhile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.backup._support import STEPS, MiB, make_chain, pynbd, run
from tests.support.pynbd_server import PynbdServer


def _serve(tmp: Path, chain: Path, *extra: str, workers: int = 2) -> PynbdServer:
    return PynbdServer(["--workers", str(workers), "--bind", "127.0.0.1", "--port", "0",
                        f"backup:{chain}", *extra], cwd=tmp)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_every_point_served_as_it_was(tmp_path: Path, fmt: str) -> None:
    chain, snaps = make_chain(tmp_path, fmt)
    for i, want in enumerate(snaps):
        (tmp_path / "want.raw").write_bytes(want)
        srv = _serve(tmp_path, chain, f"at={i}")
        try:
            uri = srv.uri_for("nbd://")
            out = tmp_path / "copy.raw"
            run("nbdcopy", "--connections=4", uri, str(out))
            assert out.read_bytes() == want, i
            out.unlink()
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(tmp_path / "want.raw"))
            # base:allocation: the zeroed 4M..12M of the last point reads as a hole
            if i == len(snaps) - 1:
                m = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
                zero_at = [(e["offset"], e["length"]) for e in m if e["type"] & 2]
                assert any(o <= 4 * MiB and o + n >= 5 * MiB for o, n in zero_at), m
                assert not any(o <= 5 * MiB < o + n for o, n in zero_at), m  # 5M: data
            # writes are refused: the export is read-only
            p = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri, ok=False)
            assert p.returncode != 0
        finally:
            srv.stop()
    # the default point is the last one
    srv = _serve(tmp_path, chain, workers=1)
    try:
        out = tmp_path / "last.raw"
        run("nbdcopy", srv.uri_for("nbd://"), str(out))
        assert out.read_bytes() == snaps[-1]
    finally:
        srv.stop()


def test_damage_fails_only_its_reads_and_the_chain_is_held(tmp_path: Path) -> None:
    chain, snaps = make_chain(tmp_path, "raw", STEPS[:3])
    ranges = json.loads((chain / "0002.json").read_text())["ranges"]
    off, ln, _ = next(r for r in ranges if r[2] is not None)
    with open(chain / "0002.raw", "r+b") as f:
        f.seek(off + ln // 2)
        b = f.read(1)
        f.seek(off + ln // 2)
        f.write(bytes([b[0] ^ 0x10]))
    srv = _serve(tmp_path, chain, workers=1)
    try:
        uri = srv.uri_for("nbd://")
        p = run("qemu-io", "-r", "-f", "raw", "-c", f"read {off} 4096", uri, ok=False)
        assert "Input/output error" in p.stdout + p.stderr, p
        # other ranges still read, and are what they were
        other = 8 * MiB + 4096  # zeroed at step 1, untouched by backup 2
        p = run("qemu-io", "-r", "-f", "raw", "-c", f"read -P 0 {other} 4096", uri)
        assert "Pattern verification failed" not in p.stdout
        p = run("qemu-io", "-r", "-f", "raw", "-c", f"read {off} 4096", uri, ok=False)
        assert "Input/output error" in p.stdout + p.stderr, p  # every time, not once
        # a prune of the chain while it is served is refused
        p = pynbd("prune", "--keep", "1", str(chain), ok=False)
        assert p.returncode == 1 and b"is in use" in p.stderr
    finally:
        srv.stop()
    assert "backup 2 (0002.raw)" in srv.stderr and "do not match the checksum" in srv.stderr
    # without verify the damaged bytes come through as they are
    srv = _serve(tmp_path, chain, "verify=false", workers=1)
    try:
        out = tmp_path / "raw.out"
        run("nbdcopy", srv.uri_for("nbd://"), str(out))
        got = out.read_bytes()
        assert got != snaps[2] and got[:off] == snaps[2][:off]
    finally:
        srv.stop()


def test_bad_targets_are_clear_errors(tmp_path: Path) -> None:
    chain, _ = make_chain(tmp_path, "raw", STEPS[:2])
    (tmp_path / "empty").mkdir()
    cases = [([f"backup:{tmp_path / 'none'}"], "is not a directory"),
             ([f"backup:{tmp_path / 'empty'}"], "holds no backup chain"),
             ([f"backup:{chain}", "at=7"], "no backup 7"),
             ([f"backup:{chain}", "at=x"], "at"),
             ([f"backup:{chain}", "colour=blue"], "colour"),
             (["backup:"], "no chain directory")]
    for args, msg in cases:
        p = pynbd("serve", "--port", "0", "--bind", "127.0.0.1", *args, ok=False, timeout=60)
        assert p.returncode != 0, args
        err = p.stderr.decode()
        assert msg in err and "Traceback" not in err, (args, err)


def test_cow_overlay_on_a_backup_takes_writes(tmp_path: Path) -> None:
    """Instant recovery: a VM's disk served from the backup with a copy-on-write
    overlay; writes land in the overlay and the chain still verifies."""
    chain, snaps = make_chain(tmp_path, "qcow2", STEPS[:3])
    srv = _serve(tmp_path, chain, "--filter", f"cow:dir={tmp_path}", workers=1)
    try:
        uri = srv.uri_for("nbd://")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 64k", uri)
        out = tmp_path / "o.raw"
        run("nbdcopy", uri, str(out))
        got = out.read_bytes()
        want = bytearray(snaps[2])
        want[MiB:MiB + 65536] = b"\x77" * 65536
        assert got == bytes(want)
    finally:
        srv.stop()
    assert b"verified backups 0, 1, 2" in pynbd("restore", "--verify", str(chain)).stdout
    assert not [n for n in os.listdir(chain) if n.endswith(".tmp")]


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_random_reads_and_extents_match_every_point(tmp_path: Path, fmt: str) -> None:
    """The backend itself: 300 random unaligned reads per point, across pieces and the
    edges of every backup's ranges, equal the image at that point; every extent that
    says zero reads as zeros and the extents tile the image."""
    import random

    from pynbd.backends.backup_chain import BackupChainBackend

    chain, snaps = make_chain(tmp_path, fmt)
    rnd = random.Random(4)
    for i, want in enumerate(snaps):
        b = BackupChainBackend(str(chain), at=i)
        try:
            assert b.size == len(want)
            for _ in range(300):
                n = rnd.choice((1, 511, 4096, 65536, 100_000, MiB, 3 * MiB + 7))
                off = rnd.randrange(0, b.size - n)
                buf = bytearray(n)
                b.pread_into(memoryview(buf), off)
                assert buf == want[off:off + n], (i, off, n)
            pos = 0
            for e in b.extents(0, b.size):
                if e.flags & 2:
                    assert want[pos:pos + e.length] == bytes(e.length), (i, pos)
                pos += e.length
            assert pos == b.size
        finally:
            b.close()
