"""``pynbd prune`` (synthetic full backups, the oldest points deleted, every kept point
still restored byte for byte and, for qcow2 chains, still read by qemu through its
backing files), ``pynbd restore --verify``, and a prune interrupted between its steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.backup._support import SIZE16 as SIZE
from tests.backup._support import STEPS, Served, make_chain, pynbd, run


def _restores(tmp: Path, chain: Path, snaps: dict[int, bytes]) -> None:
    for i, want in snaps.items():
        out = tmp / f"r{i}.img"
        pynbd("restore", str(chain), str(out), "--at", str(i))
        assert out.read_bytes() == want, f"point {i}"
        out.unlink()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_prune_keeps_the_newest_points_and_the_chain_goes_on(tmp_path: Path,
                                                             fmt: str) -> None:
    chain, snaps = make_chain(tmp_path, fmt)
    ext = fmt
    out = json.loads(pynbd("prune", "--dry-run", "--json", "--keep", "3", str(chain)).stdout)
    assert out == {"dry_run": True, "kept": [2, 3, 4], "removed": [0, 1], "synthesized": 2}
    assert (chain / f"0000.{ext}").exists()  # nothing changed
    p = pynbd("prune", "--keep", "3", str(chain))
    assert b"removed backups 0, 1; kept 2, 3, 4; backup 2 is now a full backup" in p.stdout
    names = sorted(os.listdir(chain))
    assert names == sorted(["manifest.json", *(f"000{i}.{ext}" for i in (2, 3, 4)),
                            *(f"000{i}.json" for i in (2, 3, 4))])
    manifest = json.loads((chain / "manifest.json").read_text())
    assert manifest["version"] == 2
    b2 = manifest["backups"][0]
    assert b2["index"] == 2 and b2["type"] == "full" and b2["synthetic"] == {"from": [0, 1, 2]}
    assert b2["data_bytes"] + b2["zero_bytes"] == SIZE
    _restores(tmp_path, chain, {2: snaps[2], 3: snaps[3], 4: snaps[4]})
    p = pynbd("restore", str(chain), str(tmp_path / "x.img"), "--at", "1", ok=False)
    assert p.returncode == 1 and b"no backup 1" in p.stderr and b"(2 to 4)" in p.stderr
    v = pynbd("restore", str(chain), "--verify")
    assert b"verified backups 2, 3, 4" in v.stdout
    if fmt == "qcow2":
        info = json.loads(run("qemu-img", "info", "--output=json", "--backing-chain",
                              str(chain / "0004.qcow2")).stdout)
        assert [i["filename"].rsplit("/", 1)[-1] for i in info] == [
            "0004.qcow2", "0003.qcow2", "0002.qcow2"]
        assert "backing-filename" not in info[-1]
        for i in (2, 3, 4):
            run("qemu-img", "check", str(chain / f"000{i}.qcow2"))
            (tmp_path / "want.raw").write_bytes(snaps[i])
            run("qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                str(chain / f"000{i}.qcow2"), str(tmp_path / "want.raw"))
    # the chain goes on: the next backup is number 5, incremental from c4
    img = tmp_path / "disk.img"
    s = Served(tmp_path, img, workers=1, tag="2")
    try:
        run("qemu-io", "-f", "raw", "-c", "write -P 0x36 3M 64k", s.uri)
        s.checkpoint("c5")
        # the server restarted: its checkpoint bitmap c4 persisted, the view did not
        rec = json.loads(pynbd("backup", "--json", s.view_uri("c5"), str(chain)).stdout)
        assert rec["index"] == 5 and rec["type"] == "incremental" and rec["bitmap"] == "c4"
        want5 = img.read_bytes()
    finally:
        s.stop()
    _restores(tmp_path, chain, {5: want5})
    # prune down to one: the last becomes full by itself
    pynbd("prune", "--keep", "1", str(chain))
    assert sorted(os.listdir(chain)) == ["0005.json", f"0005.{ext}", "manifest.json"]
    _restores(tmp_path, chain, {5: want5})
    assert b"nothing to prune" in pynbd("prune", "--keep", "4", str(chain)).stdout


def test_prune_after_a_full_backup_only_deletes(tmp_path: Path) -> None:
    chain, snaps = make_chain(tmp_path, "raw", STEPS[:3])
    # backup 3: a full one
    img = tmp_path / "disk.img"
    s = Served(tmp_path, img, workers=1, tag="2")
    try:
        s.checkpoint("c9")
        pynbd("backup", "--full", s.view_uri("c9"), str(chain))
        want3 = img.read_bytes()
    finally:
        s.stop()
    before = (chain / "0003.raw").stat().st_ino
    out = json.loads(pynbd("prune", "--json", "--keep", "1", str(chain)).stdout)
    assert out["removed"] == [0, 1, 2] and out["synthesized"] is None
    assert (chain / "0003.raw").stat().st_ino == before  # not rewritten
    _restores(tmp_path, chain, {3: want3})
    assert len(snaps) == 3
    p = pynbd("prune", "--keep", "0", str(chain), ok=False)
    assert p.returncode == 1 and b"at least 1" in p.stderr
    p = pynbd("prune", "--keep", "1", str(tmp_path / "nowhere"), ok=False)
    assert p.returncode == 1 and b"not a directory" in p.stderr


def test_verify_finds_the_damaged_backup(tmp_path: Path) -> None:
    chain, _ = make_chain(tmp_path, "raw", STEPS[:3])
    assert b"verified backups 0, 1, 2" in pynbd("restore", str(chain), "--verify").stdout
    ranges = json.loads((chain / "0001.json").read_text())["ranges"]
    off = next(r[0] for r in ranges if r[2] is not None) + 77
    with open(chain / "0001.raw", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    p = pynbd("restore", str(chain), "--verify", ok=False)
    assert p.returncode == 1
    assert b"backup 1 (0001.raw)" in p.stderr and b"do not match the checksum" in p.stderr
    # only the backups that rebuild point 0: fine
    assert b"verified backups 0:" in pynbd("restore", str(chain), "--verify", "--at",
                                           "0").stdout
    # a damaged chain cannot be pruned into a synthetic full: the error names it, and
    # nothing was changed
    p = pynbd("prune", "--keep", "1", str(chain), ok=False)
    assert p.returncode == 1 and b"cannot rebuild backup 2" in p.stderr
    assert sorted(os.listdir(chain)) == sorted(
        ["manifest.json", *(f"000{i}.{e}" for i in range(3) for e in ("raw", "json"))])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_prune_interrupted_after_the_new_full_image_leaves_a_good_chain(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst moment: backup 2's data file is already the synthetic full image, its
    ranges file and the manifest are still the old ones. Every point still restores
    (and qemu still reads the qcow2 chain); running prune again finishes the job."""
    import pynbd.backup.prune as prune_mod
    from pynbd.backup.chain import ChainError

    chain, snaps = make_chain(tmp_path, fmt, STEPS[:4])

    def fail(path: str, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prune_mod, "write_atomic", fail)
    with pytest.raises(ChainError, match=r"cannot write 0002\.json"):
        prune_mod.prune(str(chain), 2)
    monkeypatch.undo()
    manifest = json.loads((chain / "manifest.json").read_text())
    assert [b["type"] for b in manifest["backups"]] == ["full", "incremental",
                                                        "incremental", "incremental"]
    if fmt == "raw":  # backup 2's file is already the whole image as of backup 2
        assert (chain / "0002.raw").read_bytes() == snaps[2]
    else:
        info = json.loads(run("qemu-img", "info", "--output=json",
                              str(chain / "0002.qcow2")).stdout)
        assert "backing-filename" not in info
    _restores(tmp_path, chain, dict(enumerate(snaps)))
    assert b"verified backups 0, 1, 2, 3" in pynbd("restore", str(chain), "--verify").stdout
    if fmt == "qcow2":
        (tmp_path / "want.raw").write_bytes(snaps[3])
        run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(chain / "0003.qcow2"),
            str(tmp_path / "want.raw"))
    pynbd("prune", "--keep", "2", str(chain))
    _restores(tmp_path, chain, {2: snaps[2], 3: snaps[3]})
    assert not any(n.endswith(".tmp") for n in os.listdir(chain))


def test_one_writer_or_many_readers_per_chain(tmp_path: Path) -> None:
    """While a process changes a chain (another pynbd backup or prune), backup, prune,
    restore and verify are refused at once with a clear error; while one reads it
    (a restore), restores and verifies go on and changes are refused. Without the lock
    a second backup's clean-up deleted the first one's image in progress."""
    import fcntl

    chain, snaps = make_chain(tmp_path, "raw", STEPS[:2])
    nowhere = "nbd://127.0.0.1:9/x"  # never reached: the chain is checked first
    fd = os.open(chain, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running backup holds it
        for args in (["backup", nowhere, str(chain)], ["prune", "--keep", "1", str(chain)],
                     ["restore", str(chain), str(tmp_path / "r.img")],
                     ["restore", "--verify", str(chain)]):
            p = pynbd(*args, ok=False)
            assert p.returncode == 1, args
            assert b"is in use" in p.stderr and b"try again" in p.stderr, p.stderr
        assert not (tmp_path / "r.img").exists()
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_SH)  # as a running restore holds it
        _restores(tmp_path, chain, {1: snaps[1]})
        assert b"verified backups 0, 1" in pynbd("restore", "--verify", str(chain)).stdout
        assert b"would remove backups 0" in pynbd("prune", "-n", "--keep", "1",
                                                  str(chain)).stdout
        for args in (["backup", nowhere, str(chain)], ["prune", "--keep", "1", str(chain)]):
            p = pynbd(*args, ok=False)
            assert p.returncode == 1 and b"is in use" in p.stderr, args
    finally:
        os.close(fd)
    pynbd("prune", "--keep", "1", str(chain))  # free again
    _restores(tmp_path, chain, {1: snaps[1]})


def test_chain_files_are_never_clobbered(tmp_path: Path) -> None:
    """From review: a backup into a directory whose manifest is gone deleted every
    backup file; a restore target inside the chain's directory overwrote a backup; a
    synthetic full was world-readable; a user's own files that start with digits were
    deleted; a damaged range length made restore allocate its whole length."""
    import stat

    chain, snaps = make_chain(tmp_path, "raw", STEPS[:3])
    mine = [chain / "2024-05-retention.json", chain / "1234-host.raw"]
    for f in mine:
        f.write_text("the operator's own file\n")
    # restore into the chain's directory: refused, nothing touched
    before = {n: (chain / n).read_bytes() for n in os.listdir(chain)}
    for target in (chain / "0001.raw", chain / "manifest.json", chain / "new.img"):
        p = pynbd("restore", str(chain), str(target), "--at", "1", ok=False)
        assert p.returncode == 1 and b"inside the chain's directory" in p.stderr, target
    assert {n: (chain / n).read_bytes() for n in os.listdir(chain)} == before
    # prune: the synthetic full is 0600 like the rest; the operator's files stay
    pynbd("prune", "--keep", "2", str(chain))
    for n in os.listdir(chain):
        if n.startswith("000"):
            assert stat.S_IMODE((chain / n).stat().st_mode) == 0o600, n
    assert all(f.exists() for f in mine)
    _restores(tmp_path, chain, {1: snaps[1], 2: snaps[2]})
    # the manifest goes missing: a backup refuses to start a new chain over the files
    (chain / "manifest.json").rename(tmp_path / "manifest.json")
    p = pynbd("backup", "nbd://127.0.0.1:9/x", str(chain), ok=False)
    assert p.returncode == 1 and b"holds backup files" in p.stderr and b"manifest" in p.stderr
    assert (chain / "0001.raw").exists() and (chain / "0002.raw").exists()
    (tmp_path / "manifest.json").rename(chain / "manifest.json")
    _restores(tmp_path, chain, {2: snaps[2]})
    # a range longer than a piece (a damaged ranges file): an error, no huge buffer
    doc = json.loads((chain / "0002.json").read_text())
    doc["ranges"][0][1] = 8 << 30
    (chain / "0002.json").write_text(json.dumps(doc))
    for args in (["restore", "--verify", str(chain)],
                 ["restore", str(chain), str(tmp_path / "x.img")]):
        p = pynbd(*args, ok=False)
        assert p.returncode == 1 and b"damaged" in p.stderr and b"Traceback" not in p.stderr
