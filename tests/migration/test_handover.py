"""The handover state machine (pynbd.migration.handover), without processes or kills.

Every path the SIGKILL tests (test_handover_kill.py, test_source_faults.py) reach by
killing a process at a named point is walked here event by event, and the effects are
checked in order: the order is the protocol (``committing`` durable before COMMIT, step
down before ``stepped-down`` is recorded, nothing unlinked before that record).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from pynbd.migration import handover as ho
from pynbd.migration.digests import ChunkDigests, image_digest, zero_digest
from pynbd.migration.states import MirrorState, SourceRecord

TO = "msgr2://127.0.0.1:1"
SIZE = 1 << 20


def machine(verified: bool = True, epoch_base: int = 3) -> ho.Handover:
    return ho.Handover(TO, SIZE, epoch_base, "msgr2" if verified else "nbd",
                       verified=verified, pause_timeout=2.0,
                       commit_fields={"psk_file": "/k", "secure": False, "insecure": False})


def kinds(effects: list[ho.Effect]) -> list[str]:
    """Effects as short names; records and halts say which."""
    out = []
    for e in effects:
        if isinstance(e, ho.Record):
            out.append(f"Record:{e.fields['state']}")
        elif isinstance(e, ho.Halt):
            out.append(f"Halt:{e.point}")
        else:
            out.append(type(e).__name__)
    return out


def to_flush(h: ho.Handover) -> None:
    assert kinds(h.start(10.0)) == ["Pause"]
    assert h.state is MirrorState.PAUSING
    assert kinds(h.paused(True, 10.5, 4096)) == ["FinalCopy"]
    assert kinds(h.final_copied(10.7)) == ["Flush"]


@dataclass(frozen=True)
class Path:
    """Events after the flush (name, args) and the effects each one must give."""

    verified: bool
    steps: tuple[tuple[str, tuple[Any, ...], tuple[str, ...]], ...]
    state: MirrorState
    authoritative: bool
    epoch: int
    epoch_base: int


FLUSHED = ("flushed", (11.0, 5, "d1g"), ("Halt:source:before-commit", "Record:committing",
                                          "Commit"))
PATHS = {
    "commit-acknowledged": Path(True, (
        FLUSHED,
        ("committed", (11.2,), ("Halt:source:acked", "StepDown", "Record:stepped-down",
                                "Completed")),
    ), MirrorState.COMPLETED, False, 6, 3),
    "commit-refused": Path(True, (
        FLUSHED,
        ("refused", ("digest mismatch",), ("Record:resumed", "MarkAllDirty", "Retry")),
    ), MirrorState.COPYING, True, 6, 6),
    "in-doubt-then-committed": Path(True, (
        FLUSHED,
        ("in_doubt", ("reply lost",), ("CloseTransport", "AskOutcome")),
        ("outcome", (True, 30.0), ("StepDown", "Record:stepped-down", "Completed")),
    ), MirrorState.COMPLETED, False, 6, 3),
    "in-doubt-then-not-committed": Path(True, (
        FLUSHED,
        ("in_doubt", ("reply lost",), ("CloseTransport", "AskOutcome")),
        ("outcome", (False, 30.0), ("Record:resumed", "Resume", "Retry")),
    ), MirrorState.COPYING, True, 6, 6),
    "unverified-transport": Path(False, (
        ("flushed", (11.0,), ("Record:stepped-down", "StepDown", "Completed")),
    ), MirrorState.COMPLETED, False, 4, 3),
}


@pytest.mark.parametrize("case", list(PATHS))
def test_handover_paths(case: str) -> None:
    p = PATHS[case]
    h = machine(p.verified)
    to_flush(h)
    for event, args, expected in p.steps:
        assert kinds(getattr(h, event)(*args)) == list(expected), event
    assert (h.state, h.authoritative, h.epoch, h.epoch_base) == \
        (p.state, p.authoritative, p.epoch, p.epoch_base)


def test_committing_record_names_what_a_restart_needs() -> None:
    h = machine()
    to_flush(h)
    _halt, record, commit = h.flushed(11.0, last_epoch=9, digest="abc")
    assert isinstance(record, ho.Record) and isinstance(commit, ho.Commit)
    # the epoch is past both ours and the newest the destination has seen
    assert commit == ho.Commit(SIZE, 10, "abc")
    assert record.fields == {"role": "source", "state": SourceRecord.COMMITTING,
                             "epoch": 10, "to": TO, "psk_file": "/k", "secure": False,
                             "insecure": False, "size": SIZE, "digest": "abc"}
    assert h.state is MirrorState.COMMITTING


def test_step_down_says_why_and_times_the_pause() -> None:
    h = machine()
    to_flush(h)
    h.flushed(11.0, 0, "d")
    effects = h.committed(11.5)
    step = next(e for e in effects if isinstance(e, ho.StepDown))
    assert step.reason == f"migrated to {TO} (epoch 4)"
    record = next(e for e in effects if isinstance(e, ho.Record))
    assert record.fields == {"role": "source", "state": SourceRecord.STEPPED_DOWN,
                             "epoch": 4, "to": TO, "transport": "msgr2", "verified": True}
    assert h.pause_ms == 1000.0  # paused at 10.5, stepped down at 11.5
    assert h.phases == {"final_bytes": 4096, "final_copy": 200.0, "flush": 300.0,
                        "commit": 500.0}


def test_clients_that_do_not_go_idle_mean_copy_on() -> None:
    h = machine()
    h.start(1.0)
    effects = h.paused(False, 3.0, 0)
    assert kinds(effects) == ["Resume", "CopyOn"]
    assert "2.0 s" in effects[1].reason  # type: ignore[union-attr]
    assert h.state is MirrorState.COPYING
    # and the same machine can try again
    assert kinds(h.start(5.0)) == ["Pause"]


def test_a_refused_commit_moves_the_epoch_on() -> None:
    """After a refusal the next attempt uses a new epoch, never the refused one."""
    h = machine(epoch_base=3)
    to_flush(h)
    h.flushed(11.0, 0, "d")
    h.refused("stale")
    again = machine(epoch_base=h.epoch_base)
    to_flush(again)
    *_, commit = again.flushed(20.0, 0, "d")
    assert isinstance(commit, ho.Commit) and commit.epoch == 5


def test_restart_in_doubt() -> None:
    """A source restarted with a ``committing`` record asks before anything else."""
    h = ho.Handover.recovered(TO, SIZE, 7, transport="")
    assert (h.state, h.authoritative, h.epoch) == (MirrorState.IN_DOUBT, False, 7)
    with pytest.raises(ho.HandoverError):
        h.start(0.0)
    assert kinds(h.outcome(True, 1.0)) == ["StepDown", "Record:stepped-down", "Completed"]
    assert h.pause_ms is None  # this process never paused anyone
    h = ho.Handover.recovered(TO, SIZE, 7, transport="")
    assert kinds(h.outcome(False, 1.0)) == ["Record:resumed", "Resume", "Retry"]
    assert h.authoritative and h.epoch_base == 7


@pytest.mark.parametrize(("event", "args"), [
    ("paused", (True, 0.0, 0)), ("final_copied", (0.0,)), ("flushed", (0.0,)),
    ("committed", (0.0,)), ("refused", ("x",)), ("in_doubt", ("x",)),
    ("outcome", (True, 0.0)),
])
def test_events_out_of_order_are_refused(event: str, args: tuple[Any, ...]) -> None:
    h = machine()
    with pytest.raises(ho.HandoverError):
        getattr(h, event)(*args)


# --- digests ---------------------------------------------------------------------------

def test_chunk_digests_follow_writes_and_zeroes() -> None:
    chunk = 4096
    image = bytearray(3 * chunk + 100)  # the last chunk is short
    d = ChunkDigests(len(image), chunk)
    assert d.nchunks == 4
    data = bytes(range(256)) * 32  # two chunks
    image[chunk:3 * chunk] = data
    d.wrote(chunk, data)
    assert list(d.valid) == [0, 1, 1, 0]
    d.zeroed(3 * chunk, 100)
    assert d.get(3) == zero_digest(100)
    d.wrote(100, b"x")  # part of chunk 0: unknown until read back
    image[100:101] = b"x"
    assert not d.valid[0]
    whole = d.complete(lambda off, n: image[off:off + n])
    other = ChunkDigests(len(image), chunk)
    assert other.complete(lambda off, n: image[off:off + n]) == whole
    assert d.digest() == image_digest(whole, len(image), chunk) == other.digest()
    theirs = bytearray(whole)
    theirs[32:64] = bytes(32)  # chunk 1 differs on the other side
    assert d.differing(bytes(theirs)) == [1]
    assert not d.valid[1]
