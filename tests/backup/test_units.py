"""The backup pieces on their own (no peers, fast lane): bitmap maps and their store,
a view's copy-before-write state with deterministic interleavings, the chain format,
and the protocol core's refused and prefix-listed metadata contexts."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import pytest

from pynbd.backends.base import Backend, BackendError
from pynbd.backends.memory import MemoryBackend
from pynbd.backup.chain import Chain, ChainError, split
from pynbd.filters.cbw import BLOCK, CbwFilter, ViewState
from pynbd.protocol.server import ExportInfo
from pynbd.server.bitmaps import (
    Bitmap,
    BitmapError,
    BitmapMap,
    BitmapStore,
    check_granularity,
    check_name,
)

KiB, MiB = 1024, 1 << 20


# --- bitmap maps ------------------------------------------------------------------------

def test_map_marks_granules_and_reports_extents() -> None:
    size = 10 * 64 * KiB + 100  # a partial last granule
    m = BitmapMap(size, 64 * KiB)
    assert m.nchunks == 11
    m.mark(64 * KiB - 1, 2)  # straddles granules 0 and 1
    m.mark(10 * 64 * KiB + 50, 1)  # the partial one
    m.mark(5 * 64 * KiB, 0)  # nothing
    assert list(m.runs()) == [(0, 128 * KiB), (640 * KiB, 100)]
    assert m.dirty_bytes == 128 * KiB + 100
    ext = [(e.length, e.flags) for e in m.extents(0, size)]
    assert ext == [(128 * KiB, 1), (512 * KiB, 0), (100, 1)]
    # from the middle of a granule: the first extent starts at the request
    ext = [(e.length, e.flags) for e in m.extents(100 * KiB, 200 * KiB)]
    assert ext == [(28 * KiB, 1), (172 * KiB, 0)]
    # past the end: clipped to the export
    assert sum(e.length for e in m.extents(600 * KiB, 10 * MiB)) == size - 600 * KiB
    m.clear()
    assert m.dirty_bytes == 0 and [e.flags for e in m.extents(0, size)] == [0]
    m.close()


def test_worker_mapping_shares_marks() -> None:
    m = BitmapMap(4 * MiB, 4096)
    meta, fds = m.share()
    w = BitmapMap.attach(meta, os.dup(fds[0]))
    w.mark(8192, 1)
    assert list(m.runs()) == [(8192, 4096)]
    assert BitmapMap.mark_before
    w.close()
    m.close()


@pytest.mark.parametrize("bad", ["", "-x", "a/b", "a@b", "a:b", "x" * 65, 3, None])
def test_bad_names(bad: object) -> None:
    with pytest.raises(BitmapError):
        check_name(bad)


@pytest.mark.parametrize("bad", [0, 256, 3000, 1 << 31, "12Q", True])
def test_bad_granularity(bad: object) -> None:
    with pytest.raises((BitmapError, ValueError)):
        check_granularity(bad)


def test_granularity_parses_sizes() -> None:
    assert check_granularity("1M") == MiB and check_granularity(512) == 512


# --- the store ----------------------------------------------------------------------------

def _bitmap(name: str, size: int, gran: int, marks: list[tuple[int, int]],
            checkpoint: bool = False) -> Bitmap:
    m = BitmapMap(size, gran)
    for off, ln in marks:
        m.mark(off, ln)
    return Bitmap(name, m, checkpoint=checkpoint)


def test_store_round_trip_and_unclean_stop(tmp_path: Path) -> None:
    d = str(tmp_path / "img.pynbd-bitmaps")
    size = 8 * MiB
    s = BitmapStore(d, size)
    s.open()
    a = _bitmap("a", size, 64 * KiB, [(0, 1), (3 * MiB, 100 * KiB)])
    b = _bitmap("b", size, MiB, [(7 * MiB, 1)], checkpoint=True)
    s.write([a, b], in_use=True, with_data=False)
    # a second opener of the same store is refused while the first holds it
    other = BitmapStore(d, size)
    with pytest.raises(BitmapError, match="in use by another process"):
        other.open()
    # clean stop: maps and checksums, in_use false
    s.write([a, b], in_use=False, with_data=True)
    s.close()
    meta = json.loads(Path(d, "bitmaps.json").read_text())
    assert meta["in_use"] is False and all("sha256" in x for x in meta["bitmaps"])
    got = {x.name: x for x in BitmapStore(d, size).load()}
    assert got["a"].consistent and got["a"].data == a.map.snapshot()
    assert got["b"].checkpoint and got["b"].granularity == MiB
    # a server that loads it and dies: in_use stays true -> inconsistent
    s2 = BitmapStore(d, size)
    s2.open()
    s2.write([a, b], in_use=True, with_data=False)
    s2.close()
    got = BitmapStore(d, size).load()
    assert all(not x.consistent and "did not stop cleanly" in x.reason for x in got)
    assert all(x.data is None for x in got)


def test_store_damage_and_resize_make_bitmaps_inconsistent(tmp_path: Path) -> None:
    d = str(tmp_path / "s")
    s = BitmapStore(d, 4 * MiB)
    s.open()
    s.write([_bitmap("a", 4 * MiB, 64 * KiB, [(0, 1)]),
             _bitmap("b", 4 * MiB, 64 * KiB, [(0, 1)])], in_use=False, with_data=True)
    s.close()
    with open(os.path.join(d, "a.map"), "r+b") as f:
        f.write(b"\x00")
    os.unlink(os.path.join(d, "b.map"))
    got = {x.name: x for x in BitmapStore(d, 4 * MiB).load()}
    assert not got["a"].consistent and "damaged" in got["a"].reason
    assert not got["b"].consistent and "unreadable" in got["b"].reason
    got = BitmapStore(d, 8 * MiB).load()
    assert all(not x.consistent and "size changed" in x.reason for x in got)


def test_store_refuses_what_it_does_not_understand(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / "bitmaps.json").write_text("{not json")
    with pytest.raises(BitmapError, match="unreadable"):
        BitmapStore(str(d), MiB).load()
    (d / "bitmaps.json").write_text(json.dumps({"format": "pynbd-bitmaps", "version": 99}))
    with pytest.raises(BitmapError, match="newer"):
        BitmapStore(str(d), MiB).load()
    (d / "bitmaps.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(BitmapError, match="not a pynbd bitmap list"):
        BitmapStore(str(d), MiB).load()


# --- a view's copy-before-write state --------------------------------------------------------

SIZE = 2 * MiB


def _live(seed: int = 1) -> tuple[MemoryBackend, bytes]:
    b = MemoryBackend(SIZE)
    data = bytearray(random.Random(seed).randbytes(SIZE))
    data[BLOCK * 3:BLOCK * 5] = bytes(2 * BLOCK)  # two zero blocks
    b.pwrite(bytes(data), 0)
    return b, bytes(data)


def _view(tmp_path: Path, name: str = "v") -> ViewState:
    st, map_fd, scratch_fd, _ = ViewState.create(name, SIZE, str(tmp_path))
    os.close(map_fd)
    os.close(scratch_fd)
    return st


def _read(st: ViewState, live: Backend, off: int, n: int) -> bytes:
    buf = bytearray(n)
    st.read(live, memoryview(buf), off)
    return bytes(buf)


def test_view_keeps_old_data_through_writes_trims_and_zeroes(tmp_path: Path) -> None:
    live, before = _live()
    st = _view(tmp_path)
    f = CbwFilter(live, (st,))
    f.pwrite(b"\xaa" * 5000, BLOCK - 100)  # straddles blocks 0 and 1
    f.trim(BLOCK * 3, BLOCK)  # a zero block: saved without writing
    f.zero(BLOCK * 6 + 1, 3 * BLOCK)
    f.pwrite(b"\xbb" * 10, BLOCK - 100)  # already saved: no second copy
    assert _read(st, live, 0, SIZE) == before
    assert _read(st, live, BLOCK - 7, 3 * BLOCK + 11) == before[BLOCK - 7:4 * BLOCK + 4]
    in_scratch, zeros = st.counts()
    assert (in_scratch, zeros) == (2 + 4, 1)
    ext = st.extents(live, 0, SIZE)
    assert sum(e.length for e in ext) == SIZE
    pos = 0
    for e in ext:
        if e.flags & 2:
            assert before[pos:pos + e.length] == bytes(e.length)
        pos += e.length


def test_view_reader_rereads_a_block_saved_while_it_read(tmp_path: Path) -> None:
    """The interleaving the reader guards against: a writer saves the block and changes
    the live image between the reader's read of it and its look at the map."""
    live, before = _live(2)
    st = _view(tmp_path)
    writer = CbwFilter(live, (st,))

    class Sneaky(Backend):
        size = SIZE

        def pread_into(self, buf: memoryview, offset: int) -> None:
            # the writer runs right after the reader's read of the live image
            live.pread_into(buf, offset)
            writer.pwrite(b"\xee" * len(buf), offset)
            live.pread_into(buf, offset)  # and the reader saw the new data

    assert _read(st, Sneaky(), BLOCK, BLOCK) == before[BLOCK:2 * BLOCK]
    assert live.pread_into is not None and _read(st, live, 0, SIZE) == before


def test_two_views_and_a_failed_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live, before = _live(3)
    ok = _view(tmp_path, "ok")
    bad = _view(tmp_path, "bad")
    real = os.pwrite

    def pwrite(fd: int, data: object, offset: int) -> int:
        if fd == bad.fd:  # the bad view's scratch file is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    f = CbwFilter(live, (bad, ok))
    f.pwrite(b"\x01" * BLOCK, 0)  # the live write goes through
    buf = bytearray(BLOCK)
    live.pread_into(memoryview(buf), 0)
    assert bytes(buf) == b"\x01" * BLOCK
    assert bad.failed and not ok.failed and "ENOSPC" in bad.error
    with pytest.raises(BackendError) as ei:
        _read(bad, live, 0, BLOCK)
    assert ei.value.errno == errno.EIO and "scratch space ran out" in str(ei.value)
    assert _read(ok, live, 0, SIZE) == before
    f.pwrite(b"\x02" * BLOCK, BLOCK)  # the failed view is skipped from now on
    assert _read(ok, live, 0, SIZE) == before
    assert bad.counts() == (0, 0)


def test_shared_state_across_attachments(tmp_path: Path) -> None:
    live, before = _live(4)
    st, map_fd, scratch_fd, _ = ViewState.create("v", SIZE, str(tmp_path))
    other = ViewState.attach(st.share_meta(), os.dup(map_fd), os.dup(scratch_fd))
    CbwFilter(live, (other,)).pwrite(b"\x05" * 100, 10 * BLOCK + 5)
    assert st.counts() == (1, 0)  # the first state sees the other's save
    assert _read(st, live, 0, SIZE) == before
    st.close()
    with pytest.raises(BackendError) as ei:
        _read(st, live, 0, 10)
    assert ei.value.errno == errno.ESHUTDOWN
    os.close(map_fd)
    os.close(scratch_fd)


# --- the chain --------------------------------------------------------------------------------

def test_split_at_piece_boundaries() -> None:
    assert split(0, 3 * MiB) == [(0, MiB), (MiB, MiB), (2 * MiB, MiB)]
    assert split(MiB - 1, 2) == [(MiB - 1, 1), (MiB, 1)]
    assert split(5, 0) == []


def test_chain_plan_and_partial_files(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="not a directory"):
        Chain.open(str(tmp_path / "none"))
    c = Chain.open(str(tmp_path / "c"), create=True)
    c.size = MiB
    from pynbd.backup.chain import Backup

    for i, kind in enumerate(["full", "incremental", "full", "incremental"]):
        idx, f, r = c.new_names()
        assert idx == i
        Path(c.path(f)).write_bytes(b"")
        c.add(Backup(idx, kind, f, r, "", "", None, None, 0.0, 0.0, 0, 0), [])
    assert [b.index for b in c.restore_plan(None)] == [2, 3]
    assert [b.index for b in c.restore_plan(1)] == [0, 1]
    with pytest.raises(ChainError, match="no backup 9"):
        c.restore_plan(9)
    Path(c.path("0004.raw")).write_bytes(b"x")  # a backup that never finished
    again = Chain.open(c.dir)
    again.clean_partial()
    assert not Path(c.path("0004.raw")).exists() and Path(c.path("0003.raw")).exists()
    assert len(again.backups) == 4


# --- the protocol core: refused and prefix-listed contexts ------------------------------------

def test_protocol_refuses_an_inconsistent_context_with_its_reason() -> None:
    from pynbd.protocol.constants import Rep
    from pynbd.protocol.server import ExportSelected
    from tests.protocol.test_protocol_server import (
        GO,
        LIST_META,
        META_CONTEXT,
        SET_META,
        STRUCTURED_REPLY,
        Provider,
        events,
        info_data,
        kinds,
        meta_data,
        opt,
        parse_replies,
        started,
    )

    info = ExportInfo("d", MiB, meta_contexts=(
        "base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:a",
        "qemu:dirty-bitmap:b"), refused_contexts=(("qemu:dirty-bitmap:bad", "it is broken"),))
    prov = Provider([info], default="d")
    conn = started(provider=prov)
    events(conn, opt(STRUCTURED_REPLY) + opt(LIST_META, meta_data("d", ["qemu:dirty-bitmap:"])))
    reps = parse_replies(conn.take_output())[1:]
    assert [r[2][4:].decode() for r in reps if r[1] == META_CONTEXT] == [
        "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]
    # SET naming the refused one: ERR_POLICY with the reason, nothing selected
    events(conn, opt(SET_META, meta_data("d", ["base:allocation", "qemu:dirty-bitmap:bad"])))
    out = conn.take_output()
    assert kinds(out) == [(SET_META, Rep.ERR_POLICY)]
    assert b"qemu:dirty-bitmap:bad: it is broken" in out
    evs = events(conn, opt(GO, info_data("d")))
    assert isinstance(evs[-1], ExportSelected) and evs[-1].meta_contexts == {}


def test_damaged_manifests_are_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    base = {"format": "pynbd-backup", "version": 1, "size": MiB}
    entry = {"index": 0, "type": "full", "file": "0000.raw", "ranges": "0000.json"}
    for bad in ({**base, "backups": [{"index": 0}]},
                {**base, "backups": [{**entry, "file": "../../etc/passwd"}]},
                {**base, "backups": [entry, {**entry, "index": 2, "type": "incremental"}]},
                {**base, "backups": [{**entry, "index": 3, "type": "incremental"}]},
                {**base, "backups": [{**entry, "index": -1}]},
                {**base, "backups": [{**entry, "format": "vmdk"}]},
                {**base, "backups": [{**entry, "file": "manifest.json"}]},
                {**base, "backups": [{**entry, "ranges": "0000.raw"}]},
                {**base, "backups": [entry, {**entry, "index": 1, "type": "incremental"}]},
                {**base, "version": None}, {**base, "version": "x"},
                {**base, "piece": 1 << 40}, {**base, "piece": 4096},
                {**base, "backups": [{**entry, "type": "weekly"}]},
                {**base, "size": "big"},
                {**base, "backups": "x"},
                {"format": "pynbd-backup", "version": 7, "size": 1}):
        (d / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(ChainError):
            Chain.open(str(d))
    # a pruned chain starts above 0 with a full backup: fine
    (d / "manifest.json").write_text(json.dumps(
        {**base, "version": 2, "backups": [{**entry, "index": 3}]}))
    assert [b.index for b in Chain.open(str(d)).backups] == [3]


def test_control_verbs_refuse_bad_requests(tmp_path: Path) -> None:
    from pynbd.backup.manager import BackupManager
    from pynbd.server.control import ControlServer
    from pynbd.server.exports import Export, ExportRegistry
    from pynbd.server.server import Server

    srv = Server(ExportRegistry([Export("m", MemoryBackend(MiB))]))
    mgr = BackupManager(srv)
    ctl = ControlServer(str(tmp_path / "ctl"))
    mgr.register(ctl)
    for req in ({"cmd": "bitmap", "action": "add", "name": "x", "granularity": "abc"},
                {"cmd": "bitmap", "action": "add", "name": "x", "granularity": 1.5},
                {"cmd": "bitmap", "action": "add", "name": 7},
                {"cmd": "bitmap", "action": "explode", "name": "x"},
                {"cmd": "bitmap", "action": "add", "name": "x", "export": 3},
                {"cmd": "checkpoint"},
                {"cmd": "checkpoint", "name": "c", "scratch_dir": 5},
                {"cmd": "checkpoint", "name": "c", "release": True}):
        reply = ctl.handle_line(json.dumps(req).encode())
        assert reply["ok"] is False and reply["error"] and "failed:" not in reply["error"], req
    assert ctl.handle_line(b'{"cmd": "bitmap", "action": "list"}')["bitmaps"] == []
    srv.shutdown()


def test_bitmaps_have_bounded_memory() -> None:
    from pynbd.server.bitmaps import MAX_GRANULES

    with pytest.raises(BitmapError, match="too fine") as ei:
        BitmapMap(MAX_GRANULES * 512 + 1, 512)
    least = int(str(ei.value).rsplit("use ", 1)[1].split()[0])
    BitmapMap(MAX_GRANULES * 512 + 1, least).close()  # what it suggests fits


def test_overlapping_ranges_are_damage(tmp_path: Path) -> None:
    """From review: restore applied overlapping ranges of one backup in file order while
    the backup: backend assumed none; such a ranges file is refused as damaged."""
    from pynbd.backup.chain import Backup

    c = Chain.open(str(tmp_path / "c"), create=True)
    c.size = MiB
    _idx, f, r = c.new_names()
    Path(c.path(f)).write_bytes(b"")
    b = Backup(0, "full", f, r, "", "", None, None, 0.0, 0.0, 0, 0)
    c.add(b, [(0, 65536, "ab" * 32), (4096, 4096, None)])
    with pytest.raises(ChainError, match="overlaps"):
        Chain.open(c.dir).ranges(b)
